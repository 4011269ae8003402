//! Makes the `VERSION` file the single source of the agent's version.

fn main() {
    println!("cargo:rerun-if-changed=VERSION");
    let version =
        std::fs::read_to_string("VERSION").expect("VERSION file at the top of the repository");
    println!("cargo:rustc-env=GRAPHEON_AGENT_VERSION={}", version.trim());
}
