//! Network namespaces that a test builds and tears down: every interface, address, neighbour and
//! route these tests create lives inside them, never on the host.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Fails the test (never skips it: CI runs as root and must not pass by doing nothing) when the
/// process cannot build namespaces.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the equivalence tests build network namespaces and must run as root (CI does); \
         run them with `sudo -E cargo test --test native_equivalence`"
    );
    assert!(
        ip_command().is_some(),
        "the equivalence tests need iproute2's `ip` (apt-get install iproute2)"
    );
}

/// The absolute path of `ip`, found in this process's PATH and the system directories; the
/// agent itself may run with an empty PATH, so `ip netns exec` is always started by path.
pub fn ip_command() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join("ip"))
        .find(|p| p.is_file())
}

fn ip() -> PathBuf {
    ip_command().expect("ip is installed (checked by require_root)")
}

/// A named network namespace, deleted on drop.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    /// A new, empty namespace `ga-eq-<pid>-<n>` with its loopback up.
    pub fn new() -> Namespace {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ga-eq-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        // A namespace of an earlier run with the same pid (only after a crash) would be reused.
        let _ = Command::new(ip())
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(Command::new(ip()).args(["netns", "add", &name]));
        let ns = Namespace { name };
        ns.ip("link set lo up");
        ns
    }

    /// Runs `ip -n <ns> <args>` (split on whitespace) and fails the test if it fails.
    pub fn ip(&self, args: &str) {
        run(Command::new(ip())
            .args(["-n", &self.name])
            .args(args.split_whitespace()));
    }

    /// Runs many `ip` commands at once (`ip -n <ns> -batch -`), one per line.
    pub fn ip_batch(&self, lines: &str) {
        let mut child = Command::new(ip())
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ip -batch");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(lines.as_bytes())
            .expect("write ip -batch input");
        let out = child.wait_with_output().expect("wait for ip -batch");
        assert!(
            out.status.success(),
            "ip -n {} -batch failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `ip netns exec <ns> <program>`, not yet started: the program runs inside the namespace
    /// (and is exec'd by `ip`, so the child's pid is the program's pid).
    pub fn exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(ip());
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new(ip())
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
