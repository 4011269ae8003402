//! Entry point: everything happens in [`grapheon_agent::run`].

#[cfg(all(grapheon_no_unwinder, panic = "abort"))]
mod unwinder;

fn main() {
    std::process::exit(grapheon_agent::run::main());
}
