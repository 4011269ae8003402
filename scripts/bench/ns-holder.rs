//! The namespace benchmark's holder, compiled by scripts/bench-namespaces.sh with plain
//! `rustc` (std only).
//!
//!   ns-holder measure <command> [args...]
//!       Runs the command (output to /dev/null) and prints `<exit code> <wall s> <user s>
//!       <sys s> <peak RSS KiB>` from the rusage of wait4: user and system CPU apart, since
//!       listing another namespace's TCP table is mostly kernel time.
//!   ns-holder probe <runs> <pid>...
//!       Times the kernel's answer to each read the agent makes per namespace, through each
//!       pid's /proc directory as the agent does (one read per page, no final empty read of
//!       a table): `<what> <read calls> <median µs of CPU>` per line, the CPU of this thread
//!       (CLOCK_THREAD_CPUTIME_ID, to the nanosecond) around open, reads and close, the
//!       median over every pid and run. `fd/*` is the listing of /proc/<pid>/fd and one
//!       readlink per descriptor.
//!   ns-holder floor <pid>...
//!       Reads, once per pid, what the agent reads per namespace and nothing else: the
//!       ns/net link twice, net/sockstat and net/sockstat6, the socket tables those count
//!       sockets in, net/if_inet6, net/fib_trie, cgroup, comm, and one readlink per
//!       descriptor; no parsing, no records. Run under `measure`, the kernel's floor for the
//!       agent's collection of those namespaces.
//!   ns-holder <ready-file> <sockets> --fresh <parent-netns> <count>
//!       The same in <count> namespaces each process makes itself as a child of the named
//!       one (unshare after setns), so that they take the parent's sysctls such as
//!       net.ipv4.tcp_child_ehash_entries; each gets a veth `d0` with 10.204.<i/200>.<i%200+1>.
//!   ns-holder <ready-file> <sockets> --same <netns-name> <count>
//!       The same sockets held by <count> processes all in the one named namespace, process i
//!       on ports 7000+2i and 7001+2i: what those sockets cost when no other namespace is
//!       involved.
//!   ns-holder <ready-file> <sockets> <netns-name>...
//!       Forks one process per named network namespace (/run/netns/<name>); each enters its
//!       namespace (setns) and holds <sockets> sockets there: a TCP listener on the first
//!       address of the namespace, connections to it (both ends) and one UDP socket, so
//!       that every socket is reported (none is loopback-only). Writes <ready-file> once
//!       every process holds its sockets, then waits until killed; the children die with it.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

const CLONE_NEWNET: i32 = 0x4000_0000;
const PR_SET_PDEATHSIG: i32 = 1;
const SIGKILL: i32 = 9;

#[repr(C)]
struct Timeval {
    sec: i64,
    usec: i64,
}

#[repr(C)]
struct Rusage {
    utime: Timeval,
    stime: Timeval,
    maxrss: i64,
    rest: [i64; 13],
}

extern "C" {
    fn wait4(pid: i32, status: *mut i32, options: i32, rusage: *mut Rusage) -> i32;
    fn setns(fd: i32, nstype: i32) -> i32;
    fn unshare(flags: i32) -> i32;
    fn fork() -> i32;
    fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
    fn pause() -> i32;
    fn clock_gettime(clock: i32, ts: *mut Timeval) -> i32;
    fn opendir(path: *const std::ffi::c_char) -> *mut std::ffi::c_void;
    fn readdir(dir: *mut std::ffi::c_void) -> *const std::ffi::c_void;
    fn dirfd(dir: *mut std::ffi::c_void) -> i32;
    fn closedir(dir: *mut std::ffi::c_void) -> i32;
    fn readlinkat(fd: i32, path: *const std::ffi::c_char, buf: *mut u8, len: usize) -> isize;
}

const CLOCK_THREAD_CPUTIME_ID: i32 = 3;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("measure") && args.len() > 1 {
        measure(&args[1..]);
        return;
    }
    if args.first().map(String::as_str) == Some("floor") {
        for pid in &args[1..] {
            floor(pid);
        }
        return;
    }
    if args.first().map(String::as_str) == Some("probe") && args.len() > 2 {
        probe(args[1].parse().expect("a run count"), &args[2..]);
        return;
    }
    let [ready, sockets, names @ ..] = args.as_slice() else {
        eprintln!("usage: ns-holder <ready-file> <sockets> <netns-name>...");
        std::process::exit(2);
    };
    let sockets: usize = sockets.parse().expect("a socket count");
    let marks = std::env::temp_dir().join(format!("ns-holder-{}", std::process::id()));
    std::fs::create_dir_all(&marks).expect("marks dir");
    let places: Vec<Place> = match names {
        [flag, parent, count] if flag == "--fresh" => (0..count.parse().expect("a count"))
            .map(|i| Place::Fresh(parent.clone(), i))
            .collect(),
        [flag, name, count] if flag == "--same" => (0..count.parse().expect("a count"))
            .map(|i| Place::Same(name.clone(), i))
            .collect(),
        _ => names.iter().cloned().map(Place::Named).collect(),
    };
    let names = &places;
    for (i, name) in places.iter().enumerate() {
        // SAFETY: fork in a single-threaded process; the child only makes plain calls.
        let pid = unsafe { fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: plain prctl; the child dies with its parent.
            unsafe { prctl(PR_SET_PDEATHSIG, SIGKILL as u64, 0, 0, 0) };
            child(name, sockets, &marks.join(i.to_string()));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::fs::read_dir(&marks).map(|d| d.count()).unwrap_or(0) < names.len() {
        assert!(Instant::now() < deadline, "holders not ready in time");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&marks);
    File::create(ready)
        .and_then(|mut f| f.write_all(b"ready\n"))
        .expect("write the ready file");
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { pause() };
    }
}

/// Where a holder process lives.
enum Place {
    Named(String),
    /// A new namespace, child of the named one, with this index.
    Fresh(String, usize),
    /// The named namespace, shared with the other holders: this index picks the ports.
    Same(String, usize),
}

fn child(place: &Place, sockets: usize, mark: &std::path::Path) -> ! {
    let name = match place {
        Place::Named(name) | Place::Fresh(name, _) | Place::Same(name, _) => name,
    };
    let ns = File::open(format!("/run/netns/{name}")).expect("open the namespace");
    // SAFETY: setns on a descriptor we own; single-threaded, so the whole process moves.
    assert_eq!(
        unsafe { setns(ns.as_raw_fd(), CLONE_NEWNET) },
        0,
        "setns {name}"
    );
    if let Place::Fresh(_, i) = place {
        // SAFETY: unshare of the network namespace only; the process is single-threaded.
        assert_eq!(unsafe { unshare(CLONE_NEWNET) }, 0, "unshare");
        let script = format!(
            "link set lo up\nlink add d0 type veth peer name d1\nlink set d0 addrgenmode none\n\
             link set d1 addrgenmode none\naddr add 10.204.{}.{}/32 dev d0\nlink set d0 up\nlink set d1 up\n",
            i / 200,
            i % 200 + 1
        );
        let mut ip = std::process::Command::new("ip")
            .args(["-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("start ip");
        ip.stdin
            .take()
            .expect("ip stdin")
            .write_all(script.as_bytes())
            .expect("write to ip");
        assert!(
            ip.wait().expect("wait for ip").success(),
            "ip -batch failed"
        );
    }
    let ip = first_address();
    let port = match place {
        Place::Same(_, i) => 7000 + 2 * u16::try_from(*i).expect("a port index"),
        _ => 7000,
    };
    let listener = TcpListener::bind(SocketAddr::new(ip, port)).expect("listen");
    let udp = UdpSocket::bind(SocketAddr::new(ip, port + 1)).expect("udp");
    let mut held = Vec::new();
    // listener + udp + pairs of (client, accepted)
    for _ in 0..sockets.saturating_sub(2) / 2 {
        held.push(TcpStream::connect(listener.local_addr().unwrap()).expect("connect"));
        held.push(listener.accept().expect("accept").0);
    }
    File::create(mark).expect("mark");
    let _keep = (listener, udp, held, ns);
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { pause() };
    }
}

/// The first non-loopback IPv4 address of this namespace (the script gives each one address),
/// from the `LOCAL` entries of its `fib_trie`.
fn first_address() -> IpAddr {
    let mut text = String::new();
    File::open("/proc/self/net/fib_trie")
        .and_then(|mut f| f.read_to_string(&mut text))
        .expect("fib_trie");
    let mut leaf = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(ip) = line.strip_prefix("|-- ") {
            leaf = ip.parse::<IpAddr>().ok();
        } else if line.starts_with("/32 host LOCAL") {
            if let Some(ip) = leaf.filter(|ip| !ip.is_loopback()) {
                return ip;
            }
        }
    }
    panic!("no address in this namespace");
}

fn measure(cmd: &[String]) {
    let start = Instant::now();
    let child = std::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", cmd[0]));
    let pid = child.id() as i32;
    let mut status = 0;
    let zero = || Timeval { sec: 0, usec: 0 };
    let mut ru = Rusage {
        utime: zero(),
        stime: zero(),
        maxrss: 0,
        rest: [0; 13],
    };
    // SAFETY: wait4 writes the status and a struct rusage of the kernel's layout.
    let r = unsafe { wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid, "wait4 failed");
    let wall = start.elapsed().as_secs_f64();
    let secs = |t: &Timeval| t.sec as f64 + t.usec as f64 / 1e6;
    let code = if status & 0x7f == 0 {
        (status >> 8) & 0xff
    } else {
        128 + (status & 0x7f)
    };
    println!(
        "{code} {wall:.6} {:.6} {:.6} {}",
        secs(&ru.utime),
        secs(&ru.stime),
        ru.maxrss
    );
}

/// This thread's CPU time in nanoseconds (the timespec has the layout of Timeval).
fn thread_cpu_ns() -> i64 {
    let mut ts = Timeval { sec: 0, usec: 0 };
    // SAFETY: clock_gettime writes one struct timespec (two i64 on x86_64 and aarch64).
    assert_eq!(
        unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) },
        0
    );
    ts.sec * 1_000_000_000 + ts.usec
}

/// Reads `path` as the agent reads a /proc file: page-or-more requests, stopping at a short
/// answer (the end) without the empty read that would confirm it. Returns the read calls.
fn read_like_agent(path: &str, buf: &mut [u8]) -> usize {
    let Ok(mut f) = File::open(path) else {
        return 0;
    };
    let mut calls = 0;
    loop {
        calls += 1;
        match f.read(buf) {
            Ok(n) if n >= 4096 - 512 => {}
            _ => return calls,
        }
    }
}

/// Lists /proc/<pid>/fd and reads each link as the agent does (readdir, readlinkat, no
/// allocation); returns the descriptors seen.
fn fd_walk(pid: &str) -> usize {
    let Ok(path) = std::ffi::CString::new(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    // SAFETY: a NUL-terminated path; the stream is closed below.
    let dir = unsafe { opendir(path.as_ptr()) };
    if dir.is_null() {
        return 0;
    }
    let mut link = [0u8; 64];
    let mut seen = 0;
    loop {
        // SAFETY: `dir` is an open stream; the entry is used before the next call.
        let entry = unsafe { readdir(dir) };
        if entry.is_null() {
            break;
        }
        // SAFETY: d_name is a NUL-terminated name inside the entry (offset 19 on Linux).
        let name = unsafe { (entry as *const u8).add(19) };
        // SAFETY: as above; readlinkat writes at most `link.len()` bytes.
        if unsafe { *name } != b'.'
            && unsafe { readlinkat(dirfd(dir), name.cast(), link.as_mut_ptr(), link.len()) } > 0
        {
            seen += 1;
        }
    }
    // SAFETY: `dir` is open and closed once.
    unsafe { closedir(dir) };
    seen
}

fn probe(runs: usize, pids: &[String]) {
    const FILES: [&str; 12] = [
        "ns/net",
        "net/sockstat",
        "net/sockstat6",
        "net/tcp",
        "net/tcp6",
        "net/udp",
        "net/udp6",
        "net/if_inet6",
        "net/fib_trie",
        "cgroup",
        "comm",
        "fd/*",
    ];
    let mut buf = vec![0u8; 64 * 1024];
    for what in FILES {
        let mut times = Vec::new();
        let mut calls = 0;
        for _ in 0..runs {
            for pid in pids {
                let start = thread_cpu_ns();
                calls = match what {
                    "ns/net" => {
                        usize::from(std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok())
                    }
                    "fd/*" => fd_walk(pid),
                    _ => read_like_agent(&format!("/proc/{pid}/{what}"), &mut buf),
                };
                times.push(thread_cpu_ns() - start);
            }
        }
        times.sort_unstable();
        let median = times.get(times.len() / 2).copied().unwrap_or(0);
        let unit = if what == "fd/*" {
            "descriptors"
        } else {
            "reads"
        };
        println!("{what} {calls} {unit} {:.1}", median as f64 / 1000.0);
    }
}

/// What [`floor`] reads of one table: whether `sockstat` says it can have sockets (the
/// agent's rule: time-wait sockets of either family keep both TCP tables).
fn counted(v4: &str, v6: &str, table: &str) -> bool {
    let count = |text: &str, line: &str, key: &str| -> u64 {
        let Some(rest) = text.lines().find_map(|l| l.strip_prefix(line)) else {
            return 1;
        };
        let mut words = rest.split_ascii_whitespace();
        while let Some(word) = words.next() {
            if word == key {
                return words.next().and_then(|n| n.parse().ok()).unwrap_or(1);
            }
        }
        1
    };
    let tw = count(v4, "TCP: ", "tw");
    match table {
        "tcp" => count(v4, "TCP: ", "inuse") + tw > 0,
        "tcp6" => count(v6, "TCP6: ", "inuse") + tw > 0,
        "udp" => count(v4, "UDP: ", "inuse") > 0,
        _ => count(v6, "UDP6: ", "inuse") > 0,
    }
}

fn floor(pid: &str) {
    let mut buf = vec![0u8; 64 * 1024];
    // One read, as the agent reads a short file (read_to_string would take several).
    let mut text = |name: &str| {
        let n = File::open(format!("/proc/{pid}/net/{name}"))
            .and_then(|mut f| f.read(&mut buf))
            .unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let _ = std::fs::read_link(format!("/proc/{pid}/ns/net"));
    let _ = std::fs::read_link(format!("/proc/{pid}/ns/net"));
    let (v4, v6) = (text("sockstat"), text("sockstat6"));
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        if counted(&v4, &v6, table) {
            read_like_agent(&format!("/proc/{pid}/net/{table}"), &mut buf);
        }
    }
    for file in ["net/if_inet6", "net/fib_trie", "cgroup", "comm"] {
        read_like_agent(&format!("/proc/{pid}/{file}"), &mut buf);
    }
    fd_walk(pid);
}
