//! Makes the `VERSION` file the single source of the agent's version, and gives the static musl
//! release binary the link options that keep it small (docs/benchmark.md, "Binary size").

fn main() {
    println!("cargo:rerun-if-changed=VERSION");
    println!("cargo:rustc-check-cfg=cfg(grapheon_no_unwinder)");
    let version =
        std::fs::read_to_string("VERSION").expect("VERSION file at the top of the repository");
    println!("cargo:rustc-env=GRAPHEON_AGENT_VERSION={}", version.trim());
    release_link_args();
}

/// Link options for the release binaries (the only `panic = "abort"` profile) of the targets
/// they were measured and run on.
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

    // Unwind tables (.eh_frame, its index and the landing-pad tables, 218 KB on x86_64) are
    // read only to unwind the stack. With `panic = "abort"` nothing unwinds; only the backtrace
    // of a panic's message walks the stack, and in a stripped binary it names no function.
    // A panic still prints its message and location, then aborts. The C start files' own
    // frames stay: their code refers to them. INSERT keeps the linker's default script.
    let script = std::path::Path::new(&cfg("OUT_DIR")).join("discard-unwind-tables.ld");
    std::fs::write(
        &script,
        "SECTIONS {\n  /DISCARD/ : { EXCLUDE_FILE(*crtbegin*.o *crtend*.o) *(.eh_frame) \
         *(.gcc_except_table .gcc_except_table.*) }\n} INSERT AFTER .text;\n",
    )
    .expect("write the linker script into OUT_DIR");
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());

    // Without tables and with nothing that unwinds, the unwinder itself is dead weight: the
    // binary defines its entry points (src/unwinder.rs) so that it is not linked.
    println!("cargo:rustc-cfg=grapheon_no_unwinder");
}
