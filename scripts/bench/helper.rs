//! The benchmark's helper, compiled by scripts/bench.sh with plain `rustc` (std only).
//!
//!   helper hold <connections> <ready-file>
//!       Opens <connections> TCP connections over loopback and holds both ends until killed.
//!       Workers (child processes) hold at most PER_WORKER connections each, so that no
//!       process needs more descriptors than RLIMIT_NOFILE allows; each connects to its own
//!       listener address in 127.0.0.0/8, so ephemeral ports are never exhausted. Writes
//!       <ready-file> once every connection is established and accepted.
//!   helper floor
//!       The floor the agent's native collection is compared with: one NETLINK_SOCK_DIAG dump
//!       per family and protocol (TCP, UDP; IPv4, IPv6), one walk of /proc/*/fd for the
//!       `socket:[inode]` links and /proc/<pid>/comm of their owners, and one text line per
//!       socket with its owner on stdout. No parsing of addresses into types, no delta, no
//!       JSON: what any socket lister must do at least.
//!   helper measure <timeout-seconds> <command> [args...]
//!       Runs the command (stdout and stderr to /dev/null) and prints
//!       `<exit code> <wall s> <user+sys CPU s> <peak RSS KiB> <bytes written>`: CPU, peak RSS
//!       and bytes written to storage (ru_oublock × 512) from the rusage of wait4, to the microsecond (GNU time prints CPU to the hundredth of a second,
//!       too coarse for a run of a few milliseconds).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PER_WORKER: usize = 9_000;
const PORT: u16 = 5000;
const RLIMIT_NOFILE: i32 = 7;

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

#[repr(C)]
struct Rlimit {
    cur: u64,
    max: u64,
}

extern "C" {
    fn wait4(pid: i32, status: *mut i32, options: i32, rusage: *mut Rusage) -> i32;
    fn getrlimit(resource: i32, rlim: *mut Rlimit) -> i32;
    fn setrlimit(resource: i32, rlim: *const Rlimit) -> i32;
    fn kill(pid: i32, sig: i32) -> i32;
    fn socket(domain: i32, kind: i32, protocol: i32) -> i32;
    fn send(fd: i32, buf: *const u8, len: usize, flags: i32) -> isize;
    fn recv(fd: i32, buf: *mut u8, len: usize, flags: i32) -> isize;
    fn close(fd: i32) -> i32;
}

/// Dumps every TCP and UDP socket with its owner (see the module comment).
fn floor() {
    use std::collections::HashMap;
    use std::fmt::Write as _;
    // inode -> (pid, comm)
    let mut owners: HashMap<u64, (u32, String)> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            let mut comm: Option<String> = None;
            for fd in fds.flatten() {
                let Ok(link) = std::fs::read_link(fd.path()) else {
                    continue;
                };
                let link = link.to_string_lossy();
                let Some(inode) = link
                    .strip_prefix("socket:[")
                    .and_then(|l| l.strip_suffix(']'))
                    .and_then(|i| i.parse::<u64>().ok())
                else {
                    continue;
                };
                let name = comm.get_or_insert_with(|| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .map(|c| c.trim_end().to_string())
                        .unwrap_or_default()
                });
                owners.entry(inode).or_insert_with(|| (pid, name.clone()));
            }
        }
    }
    let mut out = String::with_capacity(1 << 20);
    let mut stdout = std::io::stdout().lock();
    for (family, protocol) in [(2u8, 6u8), (10, 6), (2, 17), (10, 17)] {
        // SAFETY: plain syscalls on a descriptor we own; buffers are ours and sized.
        let fd = unsafe { socket(16, 2 | 0o2000000, 4) }; // AF_NETLINK, SOCK_DGRAM|CLOEXEC, SOCK_DIAG
        assert!(fd >= 0, "netlink socket");
        let mut req = [0u8; 16 + 56];
        req[0..4].copy_from_slice(&(16u32 + 56).to_ne_bytes());
        req[4..6].copy_from_slice(&20u16.to_ne_bytes()); // SOCK_DIAG_BY_FAMILY
        req[6..8].copy_from_slice(&(0x1u16 | 0x300).to_ne_bytes()); // REQUEST | DUMP
        req[16] = family;
        req[17] = protocol;
        req[20..24].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
        assert_eq!(unsafe { send(fd, req.as_ptr(), req.len(), 0) }, req.len() as isize);
        let mut buf = vec![0u8; 1 << 16];
        'dump: loop {
            let n = unsafe { recv(fd, buf.as_mut_ptr(), buf.len(), 0) };
            assert!(n > 0, "netlink recv");
            let mut at = 0usize;
            while at + 16 <= n as usize {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
                if kind == 3 || kind == 2 || len < 16 {
                    break 'dump; // NLMSG_DONE, NLMSG_ERROR
                }
                let m = &buf[at + 16..at + len];
                let (state, sport, dport) = (m[1], u16::from_be_bytes([m[4], m[5]]), u16::from_be_bytes([m[6], m[7]]));
                let inode = u32::from_ne_bytes(m[68..72].try_into().unwrap()) as u64;
                let width = if family == 2 { 4 } else { 16 };
                let src = &m[8..8 + width];
                let dst = &m[24..24 + width];
                let (pid, comm) = owners.get(&inode).map_or((0, ""), |(p, c)| (*p, c.as_str()));
                let _ = writeln!(out, "{protocol} {src:?}:{sport} {dst:?}:{dport} {state} {inode} {pid} {comm}");
                at += (len + 3) & !3;
            }
            if out.len() > 1 << 19 {
                stdout.write_all(out.as_bytes()).expect("stdout");
                out.clear();
            }
        }
        unsafe { close(fd) };
    }
    stdout.write_all(out.as_bytes()).expect("stdout");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("hold") if args.len() == 3 => hold(args[1].parse().expect("count"), &args[2]),
        Some("worker") if args.len() == 3 => worker(
            args[1].parse().expect("index"),
            args[2].parse().expect("count"),
        ),
        Some("measure") if args.len() >= 3 => measure(args[1].parse().expect("timeout"), &args[2..]),
        Some("floor") => floor(),
        _ => {
            eprintln!("usage: helper hold <n> <ready-file> | helper measure <timeout> <cmd...>");
            std::process::exit(2);
        }
    }
}

/// Raises the soft descriptor limit to the hard one and returns it.
fn raise_nofile() -> u64 {
    let mut r = Rlimit { cur: 0, max: 0 };
    // SAFETY: getrlimit/setrlimit write/read a struct of the kernel's layout (two u64 on
    // 64-bit Linux).
    unsafe {
        if getrlimit(RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        r.cur = r.max;
        setrlimit(RLIMIT_NOFILE, &r);
    }
    r.cur
}

fn hold(total: usize, ready_file: &str) {
    let limit = raise_nofile() as usize;
    // Two descriptors per connection, plus a few for the listener and stdio.
    let per_worker = PER_WORKER.min(limit.saturating_sub(64) / 2).max(1);
    let mut workers = Vec::new();
    let mut left = total;
    let mut index = 0;
    while left > 0 {
        let count = left.min(per_worker);
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .args(["worker", &index.to_string(), &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a worker");
        let out = child.stdout.take().expect("worker stdout");
        workers.push((child, BufReader::new(out)));
        left -= count;
        index += 1;
    }
    for (_, out) in &mut workers {
        let mut line = String::new();
        out.read_line(&mut line).expect("worker ready line");
        assert_eq!(line.trim(), "ready", "a worker failed");
    }
    std::fs::write(ready_file, format!("{total} {}\n", workers.len())).expect("ready file");
    // Workers exit when their stdin (held here) closes, that is when this process is killed.
    loop {
        std::thread::park();
    }
}

fn worker(index: usize, count: usize) {
    raise_nofile();
    let addr = format!("127.0.{}.{}:{PORT}", 1 + index / 250, 1 + index % 250);
    let listener = TcpListener::bind(&addr).expect("listen");
    let accepter = std::thread::spawn(move || {
        let mut held = Vec::with_capacity(count);
        while held.len() < count {
            held.push(listener.accept().expect("accept").0);
        }
        (listener, held)
    });
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        clients.push(TcpStream::connect(&addr).expect("connect"));
    }
    let server_side = accepter.join().expect("accepter");
    println!("ready");
    std::io::stdout().flush().expect("flush");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop((clients, server_side));
}

fn measure(timeout: u64, cmd: &[String]) {
    let start = Instant::now();
    let child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", cmd[0]));
    let pid = child.id() as i32;
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(timeout);
            while Instant::now() < deadline {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !done.load(Ordering::Relaxed) {
                // SAFETY: kill has no memory preconditions; pid is our unreaped child.
                unsafe { kill(pid, 9) };
            }
        })
    };
    let mut status = 0;
    let mut ru = Rusage {
        utime: Timeval { sec: 0, usec: 0 },
        stime: Timeval { sec: 0, usec: 0 },
        maxrss: 0,
        rest: [0; 13],
    };
    // SAFETY: wait4 writes the status and a struct rusage of the kernel's layout.
    let r = unsafe { wait4(pid, &mut status, 0, &mut ru) };
    let wall = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    assert_eq!(r, pid, "wait4 failed");
    let cpu = (ru.utime.sec + ru.stime.sec) as f64 + (ru.utime.usec + ru.stime.usec) as f64 / 1e6;
    // Exit code, or 128 + signal as shells report it.
    let code = if status & 0x7f == 0 {
        (status >> 8) & 0xff
    } else {
        128 + (status & 0x7f)
    };
    // ru_oublock: blocks of 512 bytes the process caused to be written to storage (its
    // /proc/<pid>/io write_bytes), children included.
    println!("{code} {wall:.6} {cpu:.6} {} {}", ru.maxrss, ru.rest[7] * 512);
}
