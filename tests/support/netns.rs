//! Network namespaces made and removed by a test, so tests can build hosts with known
//! addresses, listeners and connections without touching the machine's own network.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A network namespace that exists while this value lives.
pub struct Netns {
    pub name: String,
}

/// Panics with a clear message unless the test runs as root (CI does).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test builds network namespaces and must run as root (CI runs as root)");
    }
}

/// Raises the open-files limit to its hard maximum, for tests holding thousands of sockets.
pub fn raise_fd_limit() {
    // SAFETY: plain get/setrlimit on a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

impl Netns {
    /// Creates `ga-<tag>-<pid>-<n>` with its loopback up.
    pub fn new(tag: &str) -> Netns {
        require_root();
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ga-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip("link set lo up");
        ns
    }

    /// Runs `ip -n <ns> <args>` (space-separated) and panics when it fails.
    pub fn ip(&self, args: &str) {
        let mut all = vec!["-n", &self.name];
        all.extend(args.split_whitespace());
        run("ip", &all);
    }

    /// Opens `pairs` established loopback TCP connections inside the namespace (2 × pairs
    /// sockets, held open while the returned streams live; the listener is closed).
    pub fn loopback_pairs(&self, pairs: usize) -> Vec<std::net::TcpStream> {
        use std::net::{TcpListener, TcpStream};
        raise_fd_limit();
        self.enter(|| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut held = Vec::with_capacity(pairs * 2);
            for _ in 0..pairs {
                held.push(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
                held.push(listener.accept().unwrap().0);
            }
            held
        })
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it creates belong to the
    /// namespace and stay open after it returns (file descriptors are process-wide).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: setns on a namespace fd we own; it changes only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread inside the namespace panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
