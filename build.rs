//! Makes the `VERSION` file the single source of the agent's version, and gives the static musl
//! release binary the link options that keep it small (docs/size.md).

fn main() {
    println!("cargo:rerun-if-changed=VERSION");
    let version =
        std::fs::read_to_string("VERSION").expect("VERSION file at the top of the repository");
    println!("cargo:rustc-env=GRAPHEON_AGENT_VERSION={}", version.trim());
    release_link_args();
}

/// Link options for the release binaries of the targets they were measured and run on.
fn release_link_args() {
    let cfg = |name: &str| std::env::var(name).unwrap_or_default();
    let measured = matches!(cfg("CARGO_CFG_TARGET_ARCH").as_str(), "x86_64" | "aarch64");
    if cfg("CARGO_CFG_TARGET_OS") != "linux"
        || cfg("CARGO_CFG_TARGET_ENV") != "musl"
        || !measured
        || cfg("PROFILE") != "release"
    {
        return;
    }
    // The binary is a static PIE: the start code relocates it to a random address. Its ~3,000
    // relative relocations take 24 bytes each as RELA entries (70 KB); packed as RELR (musl
    // applies them since 1.2.4) they take under 1 KB, and the address stays random.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
