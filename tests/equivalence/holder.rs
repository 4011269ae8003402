//! Processes that hold sockets with a known pid and process name: the test binary re-executes
//! itself (one `#[test]` is the child's entry point) inside a namespace, so the tests need
//! nothing but the toolchain and iproute2.
//!
//! The child reports on stdout, one line each, prefixed with `GA-EQ `:
//! `accepted <local> <peer>`, `connected <local> <peer>`, `ready <name> <pid>`; then it holds
//! every socket until its stdin closes or it is killed.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::namespace::Namespace;

/// The `#[test]` function that is the child's entry point (see [`child_main`]).
pub const ENTRY_POINT: &str = "socket_holder_child_process";
const PREFIX: &str = "GA-EQ ";
/// Generous: other builds share the CI machine.
const WAIT: Duration = Duration::from_secs(30);

/// What one holder process opens.
#[derive(Default, Clone)]
pub struct Spec {
    /// The process name (`/proc/<pid>/comm`, at most 15 bytes).
    pub name: &'static str,
    /// TCP listeners: `addr:port`, or `[::]:port/v6only` for an IPv6-only socket.
    pub listen: Vec<&'static str>,
    /// UDP sockets: `addr:port`, `[::]:port/v6only`, or `local>remote` for a connected one.
    pub udp: Vec<&'static str>,
    /// TCP connections to open, each `repeat` times (1 when 0).
    pub connect: Vec<&'static str>,
    pub repeat: usize,
    /// A second process, named so, that inherits the first listener (two owners of a socket).
    pub sharer: Option<&'static str>,
    /// A cgroup directory the holder moves itself into before opening anything.
    pub cgroup: Option<String>,
}

/// A running holder, killed (with its sharer) on drop.
pub struct Holder {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    /// False when the reported pids are those of another pid namespace: they are never
    /// signalled by number (the caller ends that namespace instead).
    own_pids: bool,
}

impl Holder {
    /// Starts a holder inside `ns` and waits until it (and its sharer) is ready.
    pub fn start(ns: &Namespace, spec: &Spec) -> Holder {
        let exe = std::env::current_exe().expect("test binary path");
        Holder::spawn(ns.exec(exe), spec, true)
    }

    /// Starts a holder with `cmd`, a launcher that runs this test binary where it chose
    /// (`nsenter ... -- <test binary>`), and waits until it is ready. `own_pids`: the pids
    /// it reports are this pid namespace's.
    pub fn spawn(mut cmd: Command, spec: &Spec, own_pids: bool) -> Holder {
        cmd.args(["--exact", ENTRY_POINT, "--nocapture", "--test-threads=1"])
            .env("GA_EQ_NAME", spec.name)
            .env("GA_EQ_LISTEN", spec.listen.join(","))
            .env("GA_EQ_UDP", spec.udp.join(","))
            .env("GA_EQ_CONNECT", spec.connect.join(","))
            .env("GA_EQ_REPEAT", spec.repeat.max(1).to_string())
            .env("GA_EQ_SHARER", spec.sharer.unwrap_or(""))
            .env("GA_EQ_CGROUP", spec.cgroup.as_deref().unwrap_or(""))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("start the socket holder");
        let stdout = child.stdout.take().expect("holder stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest prints `test <name> ... ` without a newline before running it.
                if let Some((_, rest)) = line.split_once(PREFIX) {
                    if tx.send(rest.to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        let mut holder = Holder {
            child,
            lines,
            seen: Vec::new(),
            own_pids,
        };
        let ready = 1 + usize::from(spec.sharer.is_some());
        holder.wait_for("ready", ready);
        holder
    }

    /// The pid of the process that reported itself ready under `name`.
    pub fn pid(&self, name: &str) -> u32 {
        self.seen
            .iter()
            .filter_map(|l| l.strip_prefix("ready "))
            .find_map(|l| {
                let (n, pid) = l.split_once(' ')?;
                (n == name).then(|| pid.parse().ok()).flatten()
            })
            .unwrap_or_else(|| panic!("no holder named {name} is ready"))
    }

    /// The lines `<kind> ...` seen so far (without the kind), waiting until there are `count`.
    pub fn wait_for(&mut self, kind: &str, count: usize) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let found = self.lines_of(kind);
            if found.len() >= count {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Timeout) => panic!(
                    "holder: {} of {count} `{kind}` lines after {WAIT:?}; saw {:?}",
                    found.len(),
                    self.seen
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "holder exited with {} of {count} `{kind}` lines; saw {:?}",
                    found.len(),
                    self.seen
                ),
            }
        }
    }

    /// The `connected` lines as (local, peer) pairs.
    pub fn connections(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.lines_of("connected")
            .iter()
            .map(|l| {
                let (local, peer) = l.split_once(' ').expect("connected <local> <peer>");
                (local.parse().unwrap(), peer.parse().unwrap())
            })
            .collect()
    }

    fn lines_of(&self, kind: &str) -> Vec<String> {
        self.seen
            .iter()
            .filter_map(|l| l.strip_prefix(kind)?.strip_prefix(' '))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // The sharer is the holder's own child: kill it too rather than wait for it to notice.
        for pid in self.seen.iter().filter_map(|l| {
            l.strip_prefix("ready ")?
                .split_once(' ')?
                .1
                .parse::<u32>()
                .ok()
        }) {
            if self.own_pids && pid != self.child.id() {
                // SAFETY: kill has no memory preconditions; the pid is our descendant.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- the child side ------------------------------------------------------------------------

fn list(var: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn say(line: String) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{PREFIX}{line}");
    let _ = out.flush();
}

/// The holder's body, run by the entry-point test when `GA_EQ_NAME` is set; returns at once
/// otherwise (a plain `cargo test` run).
pub fn child_main() {
    let Ok(name) = std::env::var("GA_EQ_NAME") else {
        return;
    };
    // /proc/self is the thread-group leader, whose comm is what ss and the agent read.
    std::fs::write("/proc/self/comm", &name).expect("set the process name");
    let cgroup = std::env::var("GA_EQ_CGROUP").unwrap_or_default();
    if !cgroup.is_empty() {
        // 0 is the writing process, whatever pid namespace it is in.
        std::fs::write(format!("{cgroup}/cgroup.procs"), "0")
            .unwrap_or_else(|e| panic!("move into {cgroup}: {e}"));
    }

    let listeners: Vec<TcpListener> = list("GA_EQ_LISTEN").iter().map(|s| listen(s)).collect();
    let mut sharer = None;
    let sharer_name = std::env::var("GA_EQ_SHARER").unwrap_or_default();
    if let (false, Some(first)) = (sharer_name.is_empty(), listeners.first()) {
        inheritable(first.as_raw_fd());
        // The sharer opens nothing: it holds the inherited listener until its stdin closes,
        // which happens when this process dies.
        sharer = Some(
            Command::new(std::env::current_exe().expect("test binary path"))
                .args(std::env::args_os().skip(1))
                .env("GA_EQ_NAME", &sharer_name)
                .env_remove("GA_EQ_LISTEN")
                .env_remove("GA_EQ_UDP")
                .env_remove("GA_EQ_CONNECT")
                .env_remove("GA_EQ_SHARER")
                .stdin(Stdio::piped())
                .spawn()
                .expect("start the sharer"),
        );
    }
    for listener in listeners {
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while let Ok((stream, peer)) = listener.accept() {
                say(format!("accepted {} {peer}", stream.local_addr().unwrap()));
                held.push(stream);
            }
        });
    }
    let udp: Vec<UdpSocket> = list("GA_EQ_UDP").iter().map(|s| udp(s)).collect();
    let repeat: usize = std::env::var("GA_EQ_REPEAT")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let mut streams = Vec::new();
    for target in list("GA_EQ_CONNECT") {
        let addr = resolve(&target);
        for _ in 0..repeat {
            let s = TcpStream::connect_timeout(&addr, WAIT)
                .unwrap_or_else(|e| panic!("{name}: connect to {addr}: {e}"));
            say(format!(
                "connected {} {}",
                s.local_addr().unwrap(),
                s.peer_addr().unwrap()
            ));
            streams.push(s);
        }
    }
    say(format!("ready {name} {}", std::process::id()));
    let _ = io::stdin().read_to_end(&mut Vec::new());
    drop((udp, streams, sharer));
    std::process::exit(0);
}

fn listen(spec: &str) -> TcpListener {
    match spec.strip_suffix("/v6only") {
        Some(addr) => {
            let fd = v6only(libc::SOCK_STREAM, addr);
            // SAFETY: `fd` is a bound socket we own.
            assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), 128) }, 0, "listen");
            TcpListener::from(fd)
        }
        None => {
            TcpListener::bind(resolve(spec)).unwrap_or_else(|e| panic!("listen on {spec}: {e}"))
        }
    }
}

/// `addr:port`, where an IPv6 address may carry a zone by interface name (`[fe80::1%eq0]:80`),
/// resolved inside the namespace the holder runs in.
fn resolve(spec: &str) -> SocketAddr {
    let Some((head, tail)) = spec.split_once('%') else {
        return spec.parse().unwrap_or_else(|e| panic!("{spec}: {e}"));
    };
    let (name, rest) = tail.split_once(']').expect("[addr%interface]:port");
    let name = std::ffi::CString::new(name).expect("interface name");
    // SAFETY: `name` is NUL-terminated.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {name:?}");
    format!("{head}%{index}]{rest}")
        .parse()
        .unwrap_or_else(|e| panic!("{spec}: {e}"))
}

fn udp(spec: &str) -> UdpSocket {
    let (local, remote) = match spec.split_once('>') {
        Some((l, r)) => (l, Some(r)),
        None => (spec, None),
    };
    let socket = match local.strip_suffix("/v6only") {
        Some(addr) => UdpSocket::from(v6only(libc::SOCK_DGRAM, addr)),
        None => UdpSocket::bind(local).unwrap_or_else(|e| panic!("bind udp {local}: {e}")),
    };
    if let Some(r) = remote {
        socket
            .connect(r)
            .unwrap_or_else(|e| panic!("connect udp {r}: {e}"));
    }
    socket
}

/// An IPv6 socket with `IPV6_V6ONLY` set, bound to `addr` (std cannot set the option before
/// binding).
fn v6only(kind: libc::c_int, addr: &str) -> OwnedFd {
    let addr: SocketAddrV6 = addr.parse().expect("an IPv6 socket address");
    // SAFETY: plain socket calls on a descriptor we own; every result is checked; the
    // sockaddr is a fully initialised sockaddr_in6 of the size passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, kind | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let r = libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&one as *const libc::c_int).cast(),
            size,
        );
        assert_eq!(r, 0, "IPV6_V6ONLY: {}", io::Error::last_os_error());
        let sa = libc::sockaddr_in6 {
            sin6_family: libc::AF_INET6 as libc::sa_family_t,
            sin6_port: addr.port().to_be(),
            sin6_flowinfo: 0,
            sin6_addr: libc::in6_addr {
                s6_addr: addr.ip().octets(),
            },
            sin6_scope_id: 0,
        };
        let r = libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "bind {addr}: {}", io::Error::last_os_error());
        fd
    }
}

/// Lets a child process inherit `fd` (std opens every descriptor close-on-exec).
fn inheritable(fd: libc::c_int) {
    // SAFETY: fcntl on a descriptor we own; results are checked.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        assert!(flags >= 0, "F_GETFD");
        assert_eq!(
            libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC),
            0,
            "F_SETFD"
        );
    }
}
