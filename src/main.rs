//! Entry point: everything happens in [`grapheon_agent::run`].

fn main() {
    std::process::exit(grapheon_agent::run::main());
}
