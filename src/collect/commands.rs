//! The earlier agent's sources: `ip -json addr|neigh|route show`, `ss -tunapH`, `netstat -tunap`.
//!
//! Everything here treats the tools as untrusted: a command may be missing, hang, flood its pipe,
//! or print text we do not expect (BusyBox `ip` has no `-json`; old `ss` prints other address
//! forms). [`run`] bounds time and size and never leaves a process behind; the parsers skip what
//! they cannot read (debug log) and never panic. Records are normalised as the native collectors
//! normalise them, so either source yields the same report.

use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use miniserde::json::{self, Object, Value};

use super::{Socket, SourceError};
use crate::model::{
    parse_ip, Address, ConnState, Connection, Mac, Neighbor, ProcessName, Protocol, Route,
};

/// Most stdout one command may print. Real tables are far smaller; more means a runaway tool.
pub const MAX_OUTPUT: usize = 64 << 20;

/// How much of the start and of the end of stderr is kept for the error message: usage text
/// says what the tool is at its start, most errors come last.
const STDERR_HEAD: usize = 1024;
const STDERR_TAIL: usize = 4096;
/// Characters of stderr quoted in an error message: this many from its start and its end.
const STDERR_SHOWN_HEAD: usize = 100;
const STDERR_SHOWN_TAIL: usize = 197;
/// Once the command has exited, how long a background process it left may keep our pipes open
/// before we stop reading.
const EXIT_GRACE: Duration = Duration::from_millis(200);
/// How long we wait for a SIGKILLed child to be reaped (only a process stuck in the kernel is slower).
const REAP_LIMIT: Duration = Duration::from_secs(2);
/// Where tools live when the agent runs with a short PATH (cron, some init systems).
const SYSTEM_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];
/// The longest name or process name the server accepts.
const MAX_NAME: usize = 255;

/// Runs `program` with `args` and returns its stdout (invalid UTF-8 replaced).
///
/// stdin is `/dev/null`, the locale is `C` (netstat translates its state names otherwise), and
/// the command runs in its own process group. When `timeout` expires, stdout exceeds
/// [`MAX_OUTPUT`], or the command exits while a background helper still holds its pipes, the
/// whole group is SIGKILLed and the child reaped, so nothing is left running and a child that
/// ignores SIGTERM or a grandchild that keeps the pipe open cannot make us hang. A missing
/// program, a non-zero exit (with the end of stderr), a timeout or a flood is an `Err`.
pub fn run(program: &str, args: &[&str], timeout: Duration) -> Result<String, SourceError> {
    run_limited(program, args, timeout, MAX_OUTPUT).map_err(|f| SourceError(f.message))
}

/// Why a command gave no usable output; `kind` decides whether trying another variant helps.
#[derive(Debug)]
struct Failure {
    kind: FailureKind,
    message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    /// Not installed or not executable: another variant of the same program will not help.
    Missing,
    /// Killed at the deadline: another variant would likely hang the same way.
    TimedOut,
    /// It ran and failed (bad option, error exit, flood): another variant may work.
    Failed,
}

impl Failure {
    fn new(kind: FailureKind, message: String) -> Failure {
        Failure { kind, message }
    }
}

/// How supervision ended.
enum Outcome {
    /// The child exited (pipes closed, or a leftover holder was cut off after [`EXIT_GRACE`]).
    Exited,
    TimedOut,
    TooLarge,
    /// poll(2) itself failed; nothing sensible can be read any more.
    PollFailed(io::Error),
}

fn run_limited(
    program: &str,
    args: &[&str],
    timeout: Duration,
    cap: usize,
) -> Result<String, Failure> {
    let shown = command_line(program, args);
    let not_installed = || {
        Failure::new(
            FailureKind::Missing,
            format!("{program} is not installed (not found in PATH or the system directories)"),
        )
    };
    let path = locate(program).ok_or_else(not_installed)?;
    let started = Instant::now();
    let mut command = Command::new(&path);
    command
        .arg0(program)
        .args(args)
        .env("LC_ALL", "C")
        .env("LANG", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // The enrollment key may be in our environment; the tools have no use for any of it.
    for (key, _) in std::env::vars_os() {
        if key.as_encoded_bytes().starts_with(b"GRAPHEON_AGENT_") {
            command.env_remove(key);
        }
    }
    // ETXTBSY: the program file is still open for writing somewhere (a package upgrade
    // replacing it, or a just-written script inherited by a concurrent fork). It passes.
    let mut spawned = command.spawn();
    for _ in 0..20 {
        match &spawned {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(Duration::from_millis(10));
                spawned = command.spawn();
            }
            _ => break,
        }
    }
    let mut child = spawned.map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => not_installed(),
        io::ErrorKind::PermissionDenied => Failure::new(
            FailureKind::Missing,
            format!("{program} cannot be executed: {e}"),
        ),
        _ => Failure::new(FailureKind::Failed, format!("cannot start {shown}: {e}")),
    })?;

    let mut stdout = Vec::new();
    let mut stderr = Stderr::default();
    // A deadline past any real run stands in for an absurd timeout instead of overflowing.
    let deadline = started
        .checked_add(timeout)
        .unwrap_or_else(|| started + Duration::from_secs(365 * 24 * 3600));
    let outcome = supervise(&mut child, deadline, cap, &mut stdout, &mut stderr);
    let status = finish(&mut child);

    match outcome {
        Outcome::TimedOut => Err(Failure::new(
            FailureKind::TimedOut,
            format!(
                "{shown} did not finish within {} and was killed",
                seconds(timeout)
            ),
        )),
        Outcome::TooLarge => Err(Failure::new(
            FailureKind::Failed,
            format!(
                "{shown} printed more than {} MiB; output ignored",
                cap >> 20
            ),
        )),
        Outcome::PollFailed(e) => Err(Failure::new(
            FailureKind::Failed,
            format!("{shown}: cannot read its output: {e}"),
        )),
        Outcome::Exited => match status {
            // Without a copy when it is valid UTF-8: the output may be tens of megabytes.
            Some(status) if status.success() => Ok(String::from_utf8(stdout)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())),
            Some(status) => {
                let tail = stderr.summary();
                let sep = if tail.is_empty() { "" } else { ": " };
                Err(Failure::new(
                    FailureKind::Failed,
                    format!("{shown} failed with {}{sep}{tail}", describe(status)),
                ))
            }
            None => Err(Failure::new(
                FailureKind::Failed,
                format!("{shown}: its exit status could not be collected"),
            )),
        },
    }
}

/// Reads both pipes until the child is done, the deadline passes or stdout exceeds `cap`.
fn supervise(
    child: &mut Child,
    deadline: Instant,
    cap: usize,
    stdout: &mut Vec<u8>,
    stderr: &mut Stderr,
) -> Outcome {
    let pid = child.id() as libc::pid_t;
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    for fd in [
        out_pipe.as_ref().map(|p| p.as_raw_fd()),
        err_pipe.as_ref().map(|p| p.as_raw_fd()),
    ]
    .into_iter()
    .flatten()
    {
        // Without O_NONBLOCK a read could block past the deadline.
        if let Err(e) = set_nonblocking(fd) {
            return Outcome::PollFailed(e);
        }
    }
    let mut exited_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if exited_at.is_none() && has_exited(pid) {
            exited_at = Some(now);
        }
        let open = out_pipe.is_some() || err_pipe.is_some();
        if let Some(at) = exited_at {
            if !open || now.duration_since(at) >= EXIT_GRACE {
                return Outcome::Exited;
            }
        }
        if now >= deadline {
            return Outcome::TimedOut;
        }
        // Pipe events wake us at once; the slice only bounds how late we notice an exit
        // that closes no pipe (a background helper holds them) or the deadline.
        let slice = if open {
            Duration::from_millis(50)
        } else {
            Duration::from_millis(5)
        };
        let wait = slice.min(deadline - now);
        let mut fds: Vec<libc::pollfd> = [
            out_pipe.as_ref().map(|p| p.as_raw_fd()),
            err_pipe.as_ref().map(|p| p.as_raw_fd()),
        ]
        .into_iter()
        .flatten()
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
        let millis = wait.as_millis().clamp(1, 1000) as libc::c_int;
        // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfd structs.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Outcome::PollFailed(e);
            }
            continue;
        }
        if let Some(pipe) = out_pipe.as_mut() {
            let eof = drain(pipe, &mut |bytes| stdout.extend_from_slice(bytes));
            if stdout.len() > cap {
                return Outcome::TooLarge;
            }
            if eof {
                out_pipe = None;
            }
        }
        if let Some(pipe) = err_pipe.as_mut() {
            let eof = drain(pipe, &mut |bytes| stderr.push(bytes));
            if eof {
                err_pipe = None;
            }
        }
    }
}

/// Hands what the pipe has to `sink` without blocking; true at end of file. Reads are bounded
/// per call so that a flooding child cannot keep us from checking the deadline.
fn drain(pipe: &mut impl Read, sink: &mut dyn FnMut(&[u8])) -> bool {
    let mut chunk = [0u8; 65536];
    for _ in 0..16 {
        match pipe.read(&mut chunk) {
            Ok(0) => return true,
            Ok(n) => sink(chunk.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                debug!("reading a command's output failed: {e}");
                return true;
            }
        }
    }
    false
}

/// The start and the end of a command's stderr, bounded however much it writes.
#[derive(Default)]
struct Stderr {
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Stderr {
    fn push(&mut self, mut bytes: &[u8]) {
        let room = STDERR_HEAD.saturating_sub(self.head.len()).min(bytes.len());
        let (to_head, rest) = bytes.split_at(room);
        self.head.extend_from_slice(to_head);
        bytes = rest;
        self.tail.extend_from_slice(bytes);
        if self.tail.len() > 2 * STDERR_TAIL {
            let cut = self.tail.len() - STDERR_TAIL;
            self.tail.drain(..cut);
        }
    }

    /// One line for an error message: all of it when short, else its start and its end.
    fn summary(&self) -> String {
        let mut bytes = self.head.clone();
        bytes.extend_from_slice(&self.tail);
        let text = String::from_utf8_lossy(&bytes);
        let flat: Vec<char> = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .collect();
        if flat.len() <= STDERR_SHOWN_HEAD + 3 + STDERR_SHOWN_TAIL {
            return flat.into_iter().collect();
        }
        let head = flat.iter().take(STDERR_SHOWN_HEAD);
        let tail = flat.iter().skip(flat.len() - STDERR_SHOWN_TAIL);
        head.chain([' ', '…', ' '].iter()).chain(tail).collect()
    }
}

/// Kills what is left of the command's process group and reaps the child. The child is still
/// unreaped here, so its pid (= the group id) cannot have been reused by another process.
fn finish(child: &mut Child) -> Option<ExitStatus> {
    let pid = child.id() as libc::pid_t;
    // SAFETY: plain syscalls on our own child's pid and process group; errors (ESRCH when the
    // group is already empty) are harmless.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if start.elapsed() < REAP_LIMIT => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Ok(None) => {
                warn!("process {pid} did not die after SIGKILL; leaving it behind");
                return None;
            }
            Err(e) => {
                debug!("cannot reap process {pid}: {e}");
                return None;
            }
        }
    }
}

/// True once the child has exited, without reaping it (WNOWAIT keeps its pid reserved).
fn has_exited(pid: libc::pid_t) -> bool {
    // SAFETY: an all-zero siginfo_t is a valid value; waitid writes into it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, exclusively borrowed siginfo_t.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: si_pid is the field waitid fills for a child state change (0 when none).
    rc == 0 && unsafe { info.si_pid() } != 0
}

fn set_nonblocking(fd: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl on a pipe descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Finds the executable: a path is taken as is, a bare name is looked up in PATH and then in
/// the usual system directories (`ip` lives in `/sbin` or `/usr/sbin`, which a cron PATH lacks).
fn locate(program: &str) -> Option<PathBuf> {
    if program.is_empty() {
        return None;
    }
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(SYSTEM_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => status.to_string(),
    }
}

fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        // Integer digits: `{:.3}` of an f64 would link float formatting for this one message.
        format!("{}.{:03} s", d.as_secs(), d.subsec_millis())
    }
}

// ---------------------------------------------------------------------------------------------
// ip -json

/// Interface addresses from `ip -json addr show` (loopback interfaces left out).
pub fn addresses(timeout: Duration) -> Result<Vec<Address>, SourceError> {
    addresses_with("ip", timeout)
}

/// Neighbour (ARP/NDP) entries from `ip -json neigh show`.
pub fn neighbors(timeout: Duration) -> Result<Vec<Neighbor>, SourceError> {
    neighbors_with("ip", timeout)
}

/// IPv4 main-table routes from `ip -json route show`.
pub fn routes(timeout: Duration) -> Result<Vec<Route>, SourceError> {
    routes_with("ip", timeout)
}

fn addresses_with(ip: &str, timeout: Duration) -> Result<Vec<Address>, SourceError> {
    parse_ip_addr(&run(ip, &["-json", "addr", "show"], timeout)?)
}

fn neighbors_with(ip: &str, timeout: Duration) -> Result<Vec<Neighbor>, SourceError> {
    parse_ip_neigh(&run(ip, &["-json", "neigh", "show"], timeout)?)
}

fn routes_with(ip: &str, timeout: Duration) -> Result<Vec<Route>, SourceError> {
    parse_ip_route(&run(ip, &["-json", "route", "show"], timeout)?)
}

/// Parses `ip -json addr show`: one [`Address`] per address of every non-loopback link.
///
/// `Err` when the text is not a JSON array (BusyBox `ip` prints usage or plain text, a killed
/// `ip` leaves truncated JSON); entries of the wrong shape are skipped one by one.
pub fn parse_ip_addr(json: &str) -> Result<Vec<Address>, SourceError> {
    let mut out = Vec::new();
    for link in json_array(json, "ip -json addr show")? {
        let Value::Object(link) = link else {
            debug!("ip addr: skipping a link that is not an object");
            continue;
        };
        let Some(interface) = name_field(&link, "ifname") else {
            debug!("ip addr: skipping a link without a usable ifname");
            continue;
        };
        let loopback = strings(&link, "flags").any(|f| f == "LOOPBACK")
            || str_field(&link, "link_type") == Some("loopback");
        if loopback {
            continue;
        }
        // Only a six-octet link address is a MAC: tunnels print an IP address, InfiniBand
        // twenty octets, and some links (tun, none) have no address at all.
        let mac_address = str_field(&link, "address").and_then(Mac::parse);
        let Some(Value::Array(infos)) = link.get("addr_info") else {
            continue;
        };
        for info in infos {
            let Value::Object(info) = info else {
                debug!("ip addr: {interface}: skipping an addr_info that is not an object");
                continue;
            };
            // `local` is IFA_LOCAL (ip substitutes IFA_ADDRESS when it is missing); on a
            // point-to-point link `address` is the peer, so it is only a fallback.
            let ip_address = str_field(info, "local")
                .or_else(|| str_field(info, "address"))
                .and_then(parse_ip);
            let prefix_length = u64_field(info, "prefixlen")
                .and_then(|p| u8::try_from(p).ok())
                .filter(|p| *p <= 128);
            match (ip_address, prefix_length) {
                (Some(ip_address), Some(prefix_length)) => out.push(Address {
                    interface: interface.clone(),
                    ip_address,
                    prefix_length,
                    mac_address,
                }),
                _ => debug!("ip addr: {interface}: skipping an address without local/prefixlen"),
            }
        }
    }
    Ok(out)
}

/// The NUD state names `ip neigh` prints, in its order.
const NUD_STATES: [&str; 9] = [
    "incomplete",
    "reachable",
    "stale",
    "delay",
    "probe",
    "failed",
    "noarp",
    "permanent",
    "none",
];

/// Parses `ip -json neigh show`. `state` is the first NUD state ip lists, lowercased; ip omits
/// the key for state 0, which is `none`. Entries without a parseable `dst` or a `dev` are skipped.
pub fn parse_ip_neigh(json: &str) -> Result<Vec<Neighbor>, SourceError> {
    let mut out = Vec::new();
    for entry in json_array(json, "ip -json neigh show")? {
        let Value::Object(entry) = entry else {
            debug!("ip neigh: skipping an entry that is not an object");
            continue;
        };
        let Some(ip_address) = str_field(&entry, "dst").and_then(parse_ip) else {
            debug!("ip neigh: skipping an entry without a usable dst");
            continue;
        };
        let Some(interface) = name_field(&entry, "dev") else {
            debug!("ip neigh: {ip_address}: skipping an entry without dev");
            continue;
        };
        let state = match entry.get("state") {
            None => Some("none".to_string()),
            Some(_) => strings(&entry, "state").next().and_then(|s| {
                let lower = s.to_ascii_lowercase();
                NUD_STATES.contains(&lower.as_str()).then_some(lower)
            }),
        };
        out.push(Neighbor {
            interface,
            ip_address,
            mac_address: str_field(&entry, "lladdr").and_then(Mac::parse),
            state,
        });
    }
    Ok(out)
}

/// Parses `ip -json route show`: IPv4 main-table routes of every type. `destination` is
/// `default` for a zero-length prefix, `a.b.c.d` for a /32 and `a.b.c.d/len` otherwise; a
/// multipath route has neither gateway nor interface. An IPv4 route via an IPv6 next hop
/// (`via`, not RTA_GATEWAY) has no gateway, as in the native collector.
pub fn parse_ip_route(json: &str) -> Result<Vec<Route>, SourceError> {
    let mut out = Vec::new();
    for entry in json_array(json, "ip -json route show")? {
        let Value::Object(entry) = entry else {
            debug!("ip route: skipping an entry that is not an object");
            continue;
        };
        // ip names the table only when it is not main (or with -d, then as "main").
        if let Some(table) = entry.get("table") {
            let main = match table {
                Value::String(t) => t == "main" || t == "254",
                Value::Number(_) => number_u64(table) == Some(254),
                _ => false,
            };
            if !main {
                continue;
            }
        }
        let Some(destination) = str_field(&entry, "dst").and_then(ipv4_destination) else {
            debug!("ip route: skipping an entry without an IPv4 dst");
            continue;
        };
        let multipath = entry.contains_key("nexthops");
        let gateway = str_field(&entry, "gateway")
            .filter(|_| !multipath)
            .and_then(parse_ip);
        let interface = name_field(&entry, "dev").filter(|_| !multipath);
        let source_ip = str_field(&entry, "prefsrc").and_then(parse_ip);
        if gateway.is_some_and(|g| g.is_ipv6()) || source_ip.is_some_and(|s| s.is_ipv6()) {
            debug!("ip route: {destination}: skipping an IPv6 route");
            continue;
        }
        out.push(Route {
            destination,
            gateway,
            interface,
            source_ip,
        });
    }
    Ok(out)
}

/// `default`, `a.b.c.d` or `a.b.c.d/len` as ip prints an IPv4 destination; anything else
/// (IPv6, garbage) is `None`.
fn ipv4_destination(text: &str) -> Option<String> {
    if text == "default" {
        return Some(text.to_string());
    }
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => (addr, len.parse::<u8>().ok().filter(|l| *l <= 32)?),
        None => (text, 32),
    };
    let addr: Ipv4Addr = addr.parse().ok()?;
    Some(match len {
        0 => "default".to_string(),
        32 => addr.to_string(),
        _ => format!("{addr}/{len}"),
    })
}

/// The top-level JSON array of an `ip -json` command, or why the text is not one.
fn json_array(text: &str, what: &str) -> Result<Vec<Value>, SourceError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SourceError(format!(
            "{what} printed nothing (expected a JSON array)"
        )));
    }
    // The parser needs about a hundred bytes per level: a runaway tool printing megabytes of
    // `[` would take the host's memory before any record could be read.
    crate::input::check_json(trimmed, crate::input::COMMAND_JSON)
        .map_err(|why| SourceError(format!("{what} printed unusable output: {why}")))?;
    match json::from_str::<Value>(trimmed) {
        Ok(Value::Array(items)) => Ok(items.into_iter().collect()),
        Ok(_) => Err(SourceError(format!(
            "{what} did not print a JSON array (is this BusyBox ip, without -json?)"
        ))),
        Err(_) => {
            let start: String = trimmed.chars().take(60).collect();
            Err(SourceError(format!(
                "{what} printed no valid JSON (is this BusyBox ip, without -json?): {start:?}"
            )))
        }
    }
}

fn str_field<'a>(object: &'a Object, key: &str) -> Option<&'a str> {
    match object.get(key) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

/// A string field usable as an interface name: non-empty, not absurdly long.
fn name_field(object: &Object, key: &str) -> Option<String> {
    str_field(object, key)
        .filter(|s| !s.is_empty() && s.len() <= MAX_NAME)
        .map(str::to_string)
}

fn u64_field(object: &Object, key: &str) -> Option<u64> {
    object.get(key).and_then(number_u64)
}

fn number_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Number(json::Number::U64(n)) => Some(*n),
        Value::Number(json::Number::I64(n)) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// The strings of an array field; anything else in it is ignored.
fn strings<'a>(object: &'a Object, key: &str) -> impl Iterator<Item = &'a str> {
    let items: &[Value] = match object.get(key) {
        Some(Value::Array(items)) => items,
        _ => &[],
    };
    items.iter().filter_map(|v| match v {
        Value::String(s) => Some(s.as_str()),
        _ => None,
    })
}

// ---------------------------------------------------------------------------------------------
// ss / netstat

/// netstat invocations, best first: `-W` keeps net-tools from cutting long IPv6 addresses; the
/// later ones serve netstat builds without `-W` or `-p` (Debian's BusyBox has neither).
const NETSTAT_VARIANTS: [&[&str]; 3] = [&["-tunapW"], &["-tunap"], &["-tuna"]];

/// TCP and UDP sockets from `ss -tunapH`, or from `netstat` when ss is missing, fails, or prints
/// nothing we can read. `inode` is 0; pid and process name are what the tool printed.
pub fn sockets(timeout: Duration) -> Result<Vec<Socket>, SourceError> {
    sockets_with("ss", "netstat", timeout)
}

fn sockets_with(ss: &str, netstat: &str, timeout: Duration) -> Result<Vec<Socket>, SourceError> {
    let ss_error = match run_limited(ss, &["-tunapH"], timeout, MAX_OUTPUT) {
        Ok(text) => match understood(parse_ss_report(&text), "ss -tunapH") {
            Ok(sockets) => return Ok(sockets),
            Err(message) => message,
        },
        Err(failure) => failure.message,
    };
    debug!("{ss_error}; trying netstat");
    let mut errors = vec![ss_error];
    for args in NETSTAT_VARIANTS {
        match run_limited(netstat, args, timeout, MAX_OUTPUT) {
            Ok(text) => {
                let what = command_line(netstat, args);
                match understood(parse_netstat_report(&text), &what) {
                    Ok(sockets) => return Ok(sockets),
                    Err(message) => {
                        errors.push(message);
                        break;
                    }
                }
            }
            Err(failure) => {
                errors.push(failure.message);
                if failure.kind != FailureKind::Failed {
                    break;
                }
            }
        }
    }
    Err(SourceError(errors.join("; ")))
}

/// What a socket listing yielded: the sockets, and how many lines were neither a socket nor a
/// known header or note.
struct Report {
    sockets: Vec<Socket>,
    unreadable: usize,
}

/// Output with content but not one readable socket line is not this tool's format (or not a
/// version we know): an error, so that the caller tries another source. Output with no content,
/// or only headers, is a host without sockets.
fn understood(report: Report, what: &str) -> Result<Vec<Socket>, String> {
    if report.sockets.is_empty() && report.unreadable > 0 {
        Err(format!(
            "{what}: none of its {} lines could be read",
            report.unreadable
        ))
    } else {
        Ok(report.sockets)
    }
}

/// Parses `ss -tunapH` output. Unreadable lines are skipped (debug log).
///
/// Address forms: `0.0.0.0:68`, `0.0.0.0%eth0:68` (bound to a device), `[::1]:80`,
/// `[fe80::1]%eth0:22` (zone dropped), `[::ffff:127.0.0.1]:80` (becomes IPv4), and `*:22`, the
/// IPv6 wildcard of a dual-stack socket (`::`, `dual_stack`). ss before iproute2 4.17 printed
/// `*` for IPv4 `0.0.0.0` and IPv6 without brackets; when the output has unbracketed IPv6, `*`
/// is read the old way.
pub fn parse_ss(text: &str) -> Vec<Socket> {
    parse_ss_report(text).sockets
}

fn parse_ss_report(text: &str) -> Report {
    let legacy = text.lines().any(ss_line_is_legacy);
    let mut report = Report {
        sockets: Vec::new(),
        unreadable: 0,
    };
    for line in text.lines() {
        let first = line.split_whitespace().next();
        match first {
            None | Some("Netid") | Some("State") => continue,
            Some(_) => {}
        }
        match parse_ss_line(line, legacy) {
            Some(socket) => report.sockets.push(socket),
            None => {
                debug!("ss: skipping unreadable line {:?}", short(line));
                report.unreadable += 1;
            }
        }
    }
    report
}

/// True when a line shows an IPv6 address without brackets, as ss before 4.17 printed them.
fn ss_line_is_legacy(line: &str) -> bool {
    take_fields(line, 6).is_some_and(|(fields, _)| {
        fields.get(4..6).unwrap_or_default().iter().any(|endpoint| {
            endpoint
                .rsplit_once(':')
                .is_some_and(|(host, _)| host.contains(':') && !host.starts_with('['))
        })
    })
}

fn parse_ss_line(line: &str, legacy: bool) -> Option<Socket> {
    let (fields, rest) = take_fields(line, 6)?;
    let [netid, state, recv_q, send_q, local, peer] = <[&str; 6]>::try_from(fields).ok()?;
    let protocol = Protocol::parse(netid)?;
    recv_q.parse::<u64>().ok()?;
    send_q.parse::<u64>().ok()?;
    let (local_host, local_port) = local.rsplit_once(':')?;
    let (peer_host, peer_port) = peer.rsplit_once(':')?;
    let wildcard = if legacy {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    };
    let star_ip = |host: &str| {
        if host == "*" {
            Some(wildcard)
        } else {
            host_ip(host)
        }
    };
    let local_ip = star_ip(local_host)?;
    let remote_ip = star_ip(peer_host)?;
    let local_port = parse_port(local_port)?;
    let remote_port = parse_port(peer_port)?;
    let state = match protocol {
        // ss prints TCP_CLOSE as UNCONN; the kernel's number says closed.
        Protocol::Tcp if state.eq_ignore_ascii_case("UNCONN") => ConnState::Closed,
        Protocol::Tcp => ConnState::parse(state),
        Protocol::Udp => udp_state(state),
    };
    let owner = match parse_users(rest) {
        Some((pid, name)) => (Some(pid), name),
        None => (None, None),
    };
    let dual_stack = local_host == "*" && !legacy;
    Some(listed(
        protocol,
        (local_ip, local_port),
        (remote_ip, remote_port),
        state,
        owner,
        dual_stack,
    ))
}

/// A socket as a tool lists it: a peer port of 0 is none (ss prints `*`), the peer address is
/// kept even when unspecified, and the inode is unknown.
fn listed(
    protocol: Protocol,
    (local_ip, local_port): (IpAddr, u16),
    (remote_ip, remote_port): (IpAddr, u16),
    state: ConnState,
    (pid, process_name): (Option<u32>, Option<String>),
    dual_stack: bool,
) -> Socket {
    Socket {
        connection: Connection {
            protocol,
            local_ip,
            local_port,
            remote_ip: Some(remote_ip),
            remote_port: (remote_port != 0).then_some(remote_port),
            state: Some(state),
            pid,
            process_name: process_name.map(ProcessName::from),
        },
        inode: 0,
        dual_stack,
    }
}

/// The owner with the lowest pid from `users:(("name",pid=1,fd=3),("other",pid=2,fd=4))`.
///
/// ss prints names unescaped (they may hold spaces, commas, quotes and `(`; ss itself cuts a
/// name at the first `)`), so an entry ends at the first `",pid=<digits>` followed by `,` or
/// `)`. Later fields (`fd=`, `tid=`, `proc_ctx=`) are skipped. Malformed entries end the list.
fn parse_users(text: &str) -> Option<(u32, Option<String>)> {
    const OPEN: &str = "users:(";
    let start = text.find(OPEN)?;
    let mut rest = text.get(start + OPEN.len()..)?;
    let mut best: Option<(u32, Option<String>)> = None;
    while let Some(entry) = rest.strip_prefix("(\"") {
        let mut found = None;
        for (at, _) in entry.match_indices("\",pid=") {
            let after = entry.get(at + 6..)?;
            let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            let next = after.get(digits..)?;
            if digits > 0 && (next.starts_with(',') || next.starts_with(')')) {
                found = Some((at, after.get(..digits)?, next));
                break;
            }
        }
        let Some((name_end, pid_text, next)) = found else {
            break;
        };
        let Ok(pid) = pid_text.parse::<u32>() else {
            break;
        };
        let name = process_name(entry.get(..name_end)?);
        if best.as_ref().is_none_or(|(lowest, _)| pid < *lowest) {
            best = Some((pid, name));
        }
        let Some(close) = next.find(')') else {
            break;
        };
        rest = next.get(close + 1..)?;
        match rest.strip_prefix(',') {
            Some(more) => rest = more,
            None => break,
        }
    }
    best
}

/// Parses `netstat -tunap` output, net-tools or BusyBox. Header lines and notes are skipped,
/// other unreadable lines too (debug log).
///
/// Columns: `Proto Recv-Q Send-Q Local-Address Foreign-Address [State] [PID/Program name]`;
/// UDP lines often have no state, `-` is an unknown owner, and the program name (argv[0] as
/// netstat shows it, cut to 20 characters with its pid) may contain spaces. netstat cannot tell
/// a dual-stack `::` listener from an IPv6-only one, so `dual_stack` is always false here.
pub fn parse_netstat(text: &str) -> Vec<Socket> {
    parse_netstat_report(text).sockets
}

fn parse_netstat_report(text: &str) -> Report {
    let mut report = Report {
        sockets: Vec::new(),
        unreadable: 0,
    };
    for line in text.lines() {
        let trimmed = line.trim_start();
        // Notes such as net-tools' "(Not all processes could be identified, ...\n will not
        // be shown ...)" start with `(` or a blank; socket lines start with the protocol.
        if trimmed.len() != line.len()
            || trimmed.is_empty()
            || trimmed.starts_with("Active ")
            || trimmed.starts_with("Proto ")
            || trimmed.starts_with('(')
        {
            continue;
        }
        match parse_netstat_line(line) {
            Some(socket) => report.sockets.push(socket),
            None => {
                debug!("netstat: skipping unreadable line {:?}", short(line));
                report.unreadable += 1;
            }
        }
    }
    report
}

fn parse_netstat_line(line: &str) -> Option<Socket> {
    let (fields, rest) = take_fields(line, 5)?;
    let [proto, recv_q, send_q, local, foreign] = <[&str; 5]>::try_from(fields).ok()?;
    let protocol = Protocol::parse(proto)?;
    recv_q.parse::<u64>().ok()?;
    send_q.parse::<u64>().ok()?;
    // Old BusyBox printed `*` for the wildcard address.
    let wildcard = if proto.ends_with('6') {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let endpoint = |text: &str| -> Option<(IpAddr, u16)> {
        let (host, port) = text.rsplit_once(':')?;
        let ip = if host == "*" {
            wildcard
        } else {
            host_ip(host)?
        };
        Some((ip, parse_port(port)?))
    };
    let (local_ip, local_port) = endpoint(local)?;
    let (remote_ip, remote_port) = endpoint(foreign)?;
    // A state is a word (LISTEN, FIN_WAIT1); the owner column starts with a pid or is `-`.
    let (state, owner) = match rest.split_whitespace().next() {
        Some(word) if word.starts_with(|c: char| c.is_ascii_alphabetic()) => {
            (word, rest.get(word.len()..).unwrap_or_default().trim())
        }
        _ => ("", rest),
    };
    let state = match protocol {
        Protocol::Tcp => ConnState::parse(state),
        Protocol::Udp => udp_state(state),
    };
    Some(listed(
        protocol,
        (local_ip, local_port),
        (remote_ip, remote_port),
        state,
        netstat_owner(owner),
        false,
    ))
}

/// `1234/sshd: /usr/sbin` → (1234, "sshd: /usr/sbin"); `-` or anything without a pid → none.
fn netstat_owner(text: &str) -> (Option<u32>, Option<String>) {
    let Some((pid, name)) = text.split_once('/') else {
        return (None, None);
    };
    match pid.trim().parse::<u32>() {
        Ok(pid) => (Some(pid), process_name(name)),
        Err(_) => (None, None),
    }
}

/// A process name as the tools print it: trimmed like `/proc/<pid>/comm`, empty is none, and
/// cut to the server's limit.
fn process_name(text: &str) -> Option<String> {
    let name = text.trim();
    (!name.is_empty()).then(|| name.chars().take(MAX_NAME).collect())
}

/// UDP has no states of its own: a connected socket is established, every other one unknown.
fn udp_state(text: &str) -> ConnState {
    match ConnState::parse(text) {
        ConnState::Established => ConnState::Established,
        _ => ConnState::Unknown,
    }
}

/// An address as ss or netstat print it: brackets and a zone (`%eth0`, inside or after the
/// brackets) removed, IPv4-mapped IPv6 made IPv4.
fn host_ip(host: &str) -> Option<IpAddr> {
    let bare = match host.strip_prefix('[') {
        Some(inner) => {
            let (addr, after) = inner.split_once(']')?;
            if !(after.is_empty() || after.starts_with('%')) {
                return None;
            }
            addr
        }
        None => host.split('%').next().unwrap_or(host),
    };
    parse_ip(bare)
}

/// A port as the tools print it; `*` is port 0.
fn parse_port(text: &str) -> Option<u16> {
    if text == "*" {
        Some(0)
    } else {
        text.parse().ok()
    }
}

/// The first `n` whitespace-separated fields and the rest of the line (trimmed), or `None`
/// when the line has fewer fields.
fn take_fields(line: &str, n: usize) -> Option<(Vec<&str>, &str)> {
    let mut fields = Vec::with_capacity(n);
    let mut rest = line;
    for _ in 0..n {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        if end == 0 {
            return None;
        }
        let (field, tail) = rest.split_at(end);
        fields.push(field);
        rest = tail;
    }
    Some((fields, rest.trim()))
}

/// The start of a line, for a log message.
fn short(line: &str) -> String {
    line.chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!("../../tests/fixtures/commands/", $name))
        };
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn addr(
        interface: &str,
        address: &str,
        prefix_length: u8,
        mac_address: Option<&str>,
    ) -> Address {
        Address {
            interface: interface.to_string(),
            ip_address: ip(address),
            prefix_length,
            mac_address: mac_address.and_then(Mac::parse),
        }
    }

    fn neigh(
        interface: &str,
        address: &str,
        lladdr: Option<&str>,
        state: Option<&str>,
    ) -> Neighbor {
        Neighbor {
            interface: interface.to_string(),
            ip_address: ip(address),
            mac_address: lladdr.and_then(Mac::parse),
            state: state.map(str::to_string),
        }
    }

    fn route(dst: &str, gateway: Option<&str>, dev: Option<&str>, src: Option<&str>) -> Route {
        Route {
            destination: dst.to_string(),
            gateway: gateway.map(ip),
            interface: dev.map(str::to_string),
            source_ip: src.map(ip),
        }
    }

    /// A socket as a command source reports it: inode 0, not dual-stack (see [`dual`]).
    fn sock(
        protocol: Protocol,
        local: (&str, u16),
        remote: (&str, u16),
        state: ConnState,
        owner: Option<(u32, &str)>,
    ) -> Socket {
        Socket {
            connection: Connection {
                protocol,
                local_ip: ip(local.0),
                local_port: local.1,
                remote_ip: Some(ip(remote.0)),
                remote_port: (remote.1 != 0).then_some(remote.1),
                state: Some(state),
                pid: owner.map(|o| o.0),
                process_name: owner.map(|o| o.1.into()),
            },
            inode: 0,
            dual_stack: false,
        }
    }

    fn dual(mut socket: Socket) -> Socket {
        socket.dual_stack = true;
        socket
    }

    use ConnState::*;
    use Protocol::{Tcp, Udp};

    // ---- ip addr -------------------------------------------------------------------------

    #[test]
    fn ip_addr_from_namespace_capture_skips_loopback_and_macless_links() {
        let mac0 = Some("02:00:5e:00:53:01");
        assert_eq!(
            parse_ip_addr(fixture!("ns-ip-addr.json")).unwrap(),
            vec![
                addr("veth0", "198.51.100.1", 24, mac0),
                addr("veth0", "2001:db8:1::1", 64, mac0),
                addr("veth0", "fe80::5eff:fe00:5301", 64, mac0),
                addr("veth0", "fe80::1", 64, mac0),
                // tun has no link address; on a point-to-point link `address` is the peer.
                addr("tun0", "198.51.100.65", 32, None),
            ]
        );
    }

    #[test]
    fn ip_addr_from_host_capture() {
        let mac0 = Some("02:fc:00:00:00:01");
        assert_eq!(
            parse_ip_addr(fixture!("host-ip-addr.json")).unwrap(),
            vec![
                addr("eth0", "192.0.2.2", 24, mac0),
                addr("eth0", "fd00::2", 64, mac0),
                addr("eth0", "fe80::fc:ff:fe00:1", 64, mac0),
            ]
        );
    }

    #[test]
    fn ip_addr_keeps_only_six_octet_link_addresses_as_mac() {
        let json = r#"[
          {"ifname":"sit1","flags":["POINTOPOINT","NOARP","UP"],"link_type":"sit",
           "address":"192.0.2.8","link_pointtoaddr":true,
           "addr_info":[{"family":"inet6","local":"2001:db8:8::1","prefixlen":64}]},
          {"ifname":"ib0","link_type":"infiniband",
           "address":"80:00:02:08:fe:80:00:00:00:00:00:00:00:02:c9:03:00:0a:6b:43",
           "addr_info":[{"family":"inet","local":"192.0.2.40","prefixlen":24}]},
          {"ifname":"wg0","link_type":"none",
           "addr_info":[{"family":"inet","local":"192.0.2.50","prefixlen":32}]},
          {"ifname":"ip6tnl1","link_type":"tunnel6","address":"2001:db8::1",
           "addr_info":[{"family":"inet6","local":"2001:db8:9::1","prefixlen":64}]},
          {"ifname":"eth1","link_type":"ether","address":"AA:BB:CC:DD:EE:FF",
           "addr_info":[{"family":"inet","local":"192.0.2.60","prefixlen":25}]}
        ]"#;
        assert_eq!(
            parse_ip_addr(json).unwrap(),
            vec![
                addr("sit1", "2001:db8:8::1", 64, None),
                addr("ib0", "192.0.2.40", 24, None),
                addr("wg0", "192.0.2.50", 32, None),
                addr("ip6tnl1", "2001:db8:9::1", 64, None),
                addr("eth1", "192.0.2.60", 25, Some("aa:bb:cc:dd:ee:ff")),
            ]
        );
    }

    #[test]
    fn ip_addr_skips_bad_entries_and_canonicalises() {
        let json = r#"[
          5, "x", null, {},
          {"ifname":"lo2","flags":["LOOPBACK","UP"],"addr_info":[{"local":"10.9.9.9","prefixlen":8}]},
          {"ifname":"lo3","link_type":"loopback","addr_info":[{"local":"10.9.9.8","prefixlen":8}]},
          {"ifname":"","addr_info":[{"local":"192.0.2.1","prefixlen":24}]},
          {"ifname":7,"addr_info":[{"local":"192.0.2.1","prefixlen":24}]},
          {"ifname":"eth0","flags":"LOOPBACK","unknown":{"deep":[1,2,{"x":null}]},
           "address":12,"addr_info":[
             {"local":"::ffff:192.0.2.70","prefixlen":120},
             {"address":"192.0.2.71","prefixlen":24},
             {"local":"fe80::1%eth0","prefixlen":64},
             {"local":"192.0.2.72","prefixlen":"24"},
             {"local":"192.0.2.73","prefixlen":-1},
             {"local":"192.0.2.74","prefixlen":129},
             {"local":"192.0.2.75","prefixlen":24.5},
             {"local":"not an ip","prefixlen":24},
             {"local":["192.0.2.76"],"prefixlen":24},
             {"prefixlen":24},
             "192.0.2.77/24"
           ]},
          {"ifname":"eth1","addr_info":{"local":"192.0.2.80","prefixlen":24}}
        ]"#;
        assert_eq!(
            parse_ip_addr(json).unwrap(),
            vec![
                addr("eth0", "192.0.2.70", 120, None),
                addr("eth0", "192.0.2.71", 24, None),
                addr("eth0", "fe80::1", 64, None),
            ]
        );
    }

    #[test]
    fn ip_json_that_is_not_a_json_array_is_an_error() {
        for text in [
            "",
            "  \n",
            fixture!("busybox-ip-json-usage.txt"),
            "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue\n    inet 127.0.0.1/8 scope host lo\n",
            r#"[{"ifname":"eth0","addr_info":[{"local":"192.0.2.1","prefixlen":24}]"#,
            r#"{"ifname":"eth0"}"#,
            "[] []",
        ] {
            assert!(parse_ip_addr(text).is_err(), "{text:?}");
            assert!(parse_ip_neigh(text).is_err(), "{text:?}");
            assert!(parse_ip_route(text).is_err(), "{text:?}");
        }
        assert_eq!(
            parse_ip_addr("").unwrap_err(),
            SourceError("ip -json addr show printed nothing (expected a JSON array)".into())
        );
        assert_eq!(parse_ip_addr("[]\n"), Ok(vec![]));
        assert_eq!(parse_ip_neigh(" [ ] "), Ok(vec![]));
        assert_eq!(parse_ip_route("[]"), Ok(vec![]));
    }

    // ---- ip neigh ------------------------------------------------------------------------

    #[test]
    fn ip_neigh_from_namespace_capture() {
        assert_eq!(
            parse_ip_neigh(fixture!("ns-ip-neigh.json")).unwrap(),
            vec![
                neigh(
                    "veth0",
                    "198.51.100.2",
                    Some("02:00:5e:00:53:02"),
                    Some("reachable")
                ),
                neigh("veth0", "198.51.100.9", None, Some("failed")),
                neigh(
                    "veth0",
                    "198.51.100.7",
                    Some("02:00:5e:00:53:07"),
                    Some("permanent")
                ),
                neigh(
                    "veth0",
                    "2001:db8:1::2",
                    Some("02:00:5e:00:53:02"),
                    Some("reachable")
                ),
                neigh("veth0", "2001:db8:1::9", None, Some("failed")),
                neigh(
                    "veth0",
                    "2001:db8:1::7",
                    Some("02:00:5e:00:53:17"),
                    Some("stale")
                ),
            ]
        );
        assert_eq!(
            parse_ip_neigh(fixture!("host-ip-neigh.json")).unwrap(),
            vec![
                neigh(
                    "eth0",
                    "192.0.2.1",
                    Some("02:fc:00:00:00:05"),
                    Some("stale")
                ),
                neigh("eth0", "fd00::1", None, Some("failed")),
            ]
        );
    }

    #[test]
    fn ip_neigh_states_link_addresses_and_bad_entries() {
        let json = r#"[
          {"dst":"192.0.2.1","dev":"gre1","lladdr":"198.51.100.1","state":["PERMANENT"]},
          {"dst":"192.0.2.2","dev":"ib0","lladdr":"80:00:02:08:fe:80:00:00:00:00:00:00:00:02:c9:03:00:0a:6b:43","state":["REACHABLE"]},
          {"dst":"192.0.2.3","dev":"eth0","lladdr":"02:00:00:00:00:03","extern_learn":null},
          {"dst":"192.0.2.4","dev":"eth0","lladdr":"02:00:00:00:00:04","state":["DELAY","PROBE"]},
          {"dst":"192.0.2.5","dev":"eth0","state":["INCOMPLETE"],"router":null,"proxy":null},
          {"dst":"192.0.2.6","dev":"eth0","state":["BOGUS"]},
          {"dst":"192.0.2.7","dev":"eth0","state":[1,"NOARP"]},
          {"dst":"192.0.2.8","dev":"eth0","state":"STALE"},
          {"dst":"::ffff:192.0.2.9","dev":"eth0","state":["STALE"],"lladdr":7},
          {"dst":"fe80::1","dev":"eth0","lladdr":"02:00:00:00:00:0a","state":["STALE"],"router":null},
          {"dev":"eth0","state":["STALE"]},
          {"dst":"192.0.2.12","state":["STALE"]},
          {"dst":"192.0.2.13/24","dev":"eth0"},
          {"dst":"192.0.2.14","dev":["eth0"]},
          [], 0
        ]"#;
        assert_eq!(
            parse_ip_neigh(json).unwrap(),
            vec![
                neigh("gre1", "192.0.2.1", None, Some("permanent")),
                neigh("ib0", "192.0.2.2", None, Some("reachable")),
                neigh("eth0", "192.0.2.3", Some("02:00:00:00:00:03"), Some("none")),
                neigh(
                    "eth0",
                    "192.0.2.4",
                    Some("02:00:00:00:00:04"),
                    Some("delay")
                ),
                neigh("eth0", "192.0.2.5", None, Some("incomplete")),
                neigh("eth0", "192.0.2.6", None, None),
                neigh("eth0", "192.0.2.7", None, Some("noarp")),
                neigh("eth0", "192.0.2.8", None, None),
                neigh("eth0", "192.0.2.9", None, Some("stale")),
                neigh("eth0", "fe80::1", Some("02:00:00:00:00:0a"), Some("stale")),
            ]
        );
    }

    // ---- ip route ------------------------------------------------------------------------

    #[test]
    fn ip_route_from_namespace_capture_keeps_every_main_table_type() {
        let gw = Some("198.51.100.2");
        assert_eq!(
            parse_ip_route(fixture!("ns-ip-route.json")).unwrap(),
            vec![
                route("default", gw, Some("veth0"), None),
                route("198.18.0.1", gw, Some("veth0"), None),
                route("198.18.1.0/24", None, None, None),
                route("198.18.2.0/24", None, None, None),
                route("198.18.3.0/24", None, Some("veth0"), Some("198.51.100.1")),
                route("198.18.4.0/24", None, None, None),
                route("198.18.5.0/24", None, Some("tun0"), None),
                route("198.51.100.0/24", None, Some("veth0"), Some("198.51.100.1")),
                route("198.51.100.66", None, Some("tun0"), Some("198.51.100.65")),
                route("203.0.113.0/24", None, None, None),
            ]
        );
        assert_eq!(
            parse_ip_route(fixture!("host-ip-route.json")).unwrap(),
            vec![
                route("default", Some("192.0.2.1"), Some("eth0"), None),
                route("192.0.2.0/24", None, Some("eth0"), Some("192.0.2.2")),
            ]
        );
    }

    #[test]
    fn ip_route_normalises_destinations_and_skips_other_tables_and_ipv6() {
        let json = r#"[
          {"dst":"0.0.0.0/0","gateway":"192.0.2.1","dev":"eth0","table":"main"},
          {"dst":"192.0.2.9/32","dev":"eth0","table":"254"},
          {"dst":"192.0.2.0/24","dev":"eth0","table":254},
          {"dst":"192.0.2.10","dev":"eth0","table":"local"},
          {"dst":"192.0.2.11","dev":"eth0","table":"100"},
          {"dst":"192.0.2.12","dev":"eth0","table":null},
          {"dst":"2001:db8::/64","dev":"eth0"},
          {"dst":"default","gateway":"fe80::1","dev":"eth0"},
          {"dst":"default","dev":"eth0","prefsrc":"2001:db8::1"},
          {"dst":"198.18.0.0/16","via":{"family":"inet6","host":"fe80::1"},"dev":"eth0"},
          {"dst":"198.18.1.0/24","gateway":"::ffff:192.0.2.1","dev":"eth0"},
          {"dst":"198.18.2.0/24","gateway":"192.0.2.1","dev":"eth0","nexthops":[]},
          {"dst":"198.18.3.0/33"}, {"dst":"198.18.3.0/x"}, {"dst":"0/8"}, {"dst":"198.18.3"},
          {"dst":5}, {"gateway":"192.0.2.1"}, "default", null,
          {"dst":"198.18.4.0/24","gateway":7,"dev":[],"prefsrc":"nope"}
        ]"#;
        assert_eq!(
            parse_ip_route(json).unwrap(),
            vec![
                route("default", Some("192.0.2.1"), Some("eth0"), None),
                route("192.0.2.9", None, Some("eth0"), None),
                route("192.0.2.0/24", None, Some("eth0"), None),
                route("198.18.0.0/16", None, Some("eth0"), None),
                route("198.18.1.0/24", Some("192.0.2.1"), Some("eth0"), None),
                route("198.18.2.0/24", None, None, None),
                route("198.18.4.0/24", None, None, None),
            ]
        );
    }

    // ---- ss ------------------------------------------------------------------------------

    #[test]
    fn ss_from_namespace_capture() {
        let main = Some((9437, "srv main"));
        assert_eq!(
            parse_ss(fixture!("ns-ss.txt")),
            vec![
                sock(
                    Udp,
                    ("127.0.0.1", 6000),
                    ("0.0.0.0", 0),
                    Unknown,
                    Some((9440, "pa"))
                ),
                sock(
                    Udp,
                    ("198.51.100.1", 43655),
                    ("198.51.100.2", 53),
                    Established,
                    main
                ),
                sock(Udp, ("0.0.0.0", 68), ("0.0.0.0", 0), Unknown, main),
                dual(sock(Udp, ("::", 5353), ("::", 0), Unknown, main)),
                sock(Tcp, ("0.0.0.0", 8080), ("0.0.0.0", 0), Listen, main),
                sock(
                    Tcp,
                    ("198.51.100.1", 33774),
                    ("198.51.100.2", 9000),
                    Established,
                    main
                ),
                sock(
                    Tcp,
                    ("127.0.0.1", 55928),
                    ("127.0.0.1", 8081),
                    Established,
                    main
                ),
                sock(
                    Tcp,
                    ("127.0.0.1", 8080),
                    ("127.0.0.1", 51292),
                    Established,
                    main
                ),
                sock(
                    Tcp,
                    ("127.0.0.1", 51292),
                    ("127.0.0.1", 8080),
                    Established,
                    main
                ),
                sock(
                    Tcp,
                    ("198.51.100.1", 51036),
                    ("198.51.100.1", 8080),
                    FinWait2,
                    None
                ),
                sock(
                    Tcp,
                    ("198.51.100.1", 8080),
                    ("198.51.100.1", 51036),
                    CloseWait,
                    main
                ),
                sock(Tcp, ("fe80::1", 22), ("::", 0), Listen, main),
                sock(Tcp, ("::", 8082), ("::", 0), Listen, main),
                dual(sock(Tcp, ("::", 8081), ("::", 0), Listen, main)),
                sock(
                    Tcp,
                    ("2001:db8:1::1", 34428),
                    ("2001:db8:1::2", 9000),
                    Established,
                    main
                ),
                sock(
                    Tcp,
                    ("127.0.0.1", 8081),
                    ("127.0.0.1", 55928),
                    Established,
                    main
                ),
            ]
        );
        assert_eq!(
            parse_ss(fixture!("host-ss.txt")),
            vec![sock(Tcp, ("0.0.0.0", 2024), ("0.0.0.0", 0), Listen, None)]
        );
    }

    #[test]
    fn ss_owner_is_the_lowest_pid_and_names_keep_spaces_commas_and_quotes() {
        let text = concat!(
            "tcp LISTEN 0 128 0.0.0.0:22 0.0.0.0:* users:((\"sshd\",pid=900,fd=3),(\"sshd\",pid=12,fd=3),(\"x\",pid=500,fd=9))\n",
            r#"tcp LISTEN 0 128 0.0.0.0:23 0.0.0.0:* users:(("my "odd", name(",pid=44,fd=3))"#,
            "\n",
            r#"tcp LISTEN 0 128 0.0.0.0:24 0.0.0.0:* users:(("a",pid=1",pid=45,fd=3))"#,
            "\n",
            r#"tcp LISTEN 0 128 0.0.0.0:25 0.0.0.0:* users:(("a",pid=1,fd=2),("b",pid=46,fd=3))"#,
            "\n",
            "tcp LISTEN 0 128 0.0.0.0:26 0.0.0.0:* users:((\"nginx\",pid=30,tid=31,fd=6),(\"nginx\",pid=29,tid=29,fd=6))\n",
            "tcp LISTEN 0 128 0.0.0.0:27 0.0.0.0:* users:((\"ctx\",pid=50,proc_ctx=system_u:system_r:sshd_t:s0,fd=3))\n",
            "tcp LISTEN 0 128 0.0.0.0:28 0.0.0.0:* users:((\"  pad  \",pid=51,fd=3))\n",
            "tcp LISTEN 0 128 0.0.0.0:29 0.0.0.0:* users:((\"\",pid=52,fd=3))\n",
            "tcp LISTEN 0 128 0.0.0.0:30 0.0.0.0:* users:((\"ok\",pid=53,fd=3),(\"broken\n",
            "tcp LISTEN 0 128 0.0.0.0:31 0.0.0.0:* users:((\"nopid\",fd=3))\n",
            "tcp LISTEN 0 128 0.0.0.0:32 0.0.0.0:* users:((\"big\",pid=99999999999,fd=3))\n",
            "tcp LISTEN 0 128 0.0.0.0:33 0.0.0.0:* users:\n",
        );
        let owner = |port: u16, pid: Option<u32>, name: Option<&str>| {
            let mut s = sock(Tcp, ("0.0.0.0", port), ("0.0.0.0", 0), Listen, None);
            s.connection.pid = pid;
            s.connection.process_name = name.map(Into::into);
            s
        };
        assert_eq!(
            parse_ss(text),
            vec![
                owner(22, Some(12), Some("sshd")),
                owner(23, Some(44), Some(r#"my "odd", name("#)),
                owner(24, Some(45), Some(r#"a",pid=1"#)),
                owner(25, Some(1), Some("a")),
                owner(26, Some(29), Some("nginx")),
                owner(27, Some(50), Some("ctx")),
                owner(28, Some(51), Some("pad")),
                owner(29, Some(52), None),
                owner(30, Some(53), Some("ok")),
                owner(31, None, None),
                owner(32, None, None),
                owner(33, None, None),
            ]
        );
    }

    #[test]
    fn ss_address_forms_zones_wildcards_and_states() {
        let text = concat!(
            "Netid State Recv-Q Send-Q Local Address:Port Peer Address:Port Process\n",
            "udp UNCONN 0 0 0.0.0.0%eth0:68 0.0.0.0:*\n",
            "udp UNCONN 0 0 [fe80::1]%eth0:546 [::]:*\n",
            "udp ESTAB 0 0 [fe80::2%eth0]:547 [fe80::3]%eth0:547\n",
            "tcp ESTAB 0 0 [::ffff:127.0.0.1]:80 [::ffff:127.0.0.1]:5555\n",
            "tcp LISTEN 0 4096 *:80 *:*\n",
            "tcp LISTEN 0 4096 [::1]%lo:631 [::]:*\n",
            "tcp UNCONN 0 0 192.0.2.1:99 0.0.0.0:*\n",
            "tcp SYN-SENT 0 1 192.0.2.1:40000 192.0.2.9:443\n",
            "tcp SYN-RECV 0 0 192.0.2.1:443 192.0.2.9:40001\n",
            "tcp TIME-WAIT 0 0 192.0.2.1:40002 192.0.2.9:443\n",
            "tcp LAST-ACK 1 1 192.0.2.1:40003 192.0.2.9:443\n",
            "tcp CLOSING 0 1 192.0.2.1:40004 192.0.2.9:443\n",
            "tcp FIN-WAIT-1 0 1 192.0.2.1:40005 192.0.2.9:443\n",
            "tcp WEIRD 0 0 192.0.2.1:40006 192.0.2.9:443\n",
            "mptcp LISTEN 0 4096 0.0.0.0:7 0.0.0.0:*\n",
            "tcp LISTEN x 0 0.0.0.0:8 0.0.0.0:*\n",
            "tcp LISTEN 0 0 0.0.0.0:http 0.0.0.0:*\n",
            "tcp LISTEN 0 0 0.0.0.0:70000 0.0.0.0:*\n",
            "tcp LISTEN 0 0 [::1]x:9 [::]:*\n",
            "tcp LISTEN 0 0 localhost:9 0.0.0.0:*\n",
            "tcp LISTEN 0 0\n",
            "\n",
        );
        assert_eq!(
            parse_ss(text),
            vec![
                sock(Udp, ("0.0.0.0", 68), ("0.0.0.0", 0), Unknown, None),
                sock(Udp, ("fe80::1", 546), ("::", 0), Unknown, None),
                sock(Udp, ("fe80::2", 547), ("fe80::3", 547), Established, None),
                sock(
                    Tcp,
                    ("127.0.0.1", 80),
                    ("127.0.0.1", 5555),
                    Established,
                    None
                ),
                dual(sock(Tcp, ("::", 80), ("::", 0), Listen, None)),
                sock(Tcp, ("::1", 631), ("::", 0), Listen, None),
                sock(Tcp, ("192.0.2.1", 99), ("0.0.0.0", 0), Closed, None),
                sock(Tcp, ("192.0.2.1", 40000), ("192.0.2.9", 443), SynSent, None),
                sock(Tcp, ("192.0.2.1", 443), ("192.0.2.9", 40001), SynRecv, None),
                sock(
                    Tcp,
                    ("192.0.2.1", 40002),
                    ("192.0.2.9", 443),
                    TimeWait,
                    None
                ),
                sock(Tcp, ("192.0.2.1", 40003), ("192.0.2.9", 443), LastAck, None),
                sock(Tcp, ("192.0.2.1", 40004), ("192.0.2.9", 443), Closing, None),
                sock(
                    Tcp,
                    ("192.0.2.1", 40005),
                    ("192.0.2.9", 443),
                    FinWait1,
                    None
                ),
                sock(Tcp, ("192.0.2.1", 40006), ("192.0.2.9", 443), Unknown, None),
            ]
        );
        let report = parse_ss_report(text);
        assert_eq!(report.unreadable, 7);
    }

    #[test]
    fn old_ss_star_means_ipv4_wildcard_when_ipv6_is_unbracketed() {
        let text = concat!(
            "tcp LISTEN 0 128 *:22 *:* users:((\"sshd\",pid=1,fd=3))\n",
            "tcp LISTEN 0 128 :::22 :::* users:((\"sshd\",pid=1,fd=4))\n",
            "tcp ESTAB 0 0 ::ffff:192.0.2.1:22 ::ffff:192.0.2.9:5000\n",
        );
        let sshd = Some((1, "sshd"));
        assert_eq!(
            parse_ss(text),
            vec![
                sock(Tcp, ("0.0.0.0", 22), ("0.0.0.0", 0), Listen, sshd),
                sock(Tcp, ("::", 22), ("::", 0), Listen, sshd),
                sock(
                    Tcp,
                    ("192.0.2.1", 22),
                    ("192.0.2.9", 5000),
                    Established,
                    None
                ),
            ]
        );
    }

    // ---- netstat -------------------------------------------------------------------------

    /// The sockets of the namespace capture as net-tools netstat shows them (argv[0] names).
    fn ns_netstat_expected() -> Vec<Socket> {
        let py = Some((9437, "python3"));
        vec![
            sock(Tcp, ("0.0.0.0", 8080), ("0.0.0.0", 0), Listen, py),
            sock(
                Tcp,
                ("198.51.100.1", 33774),
                ("198.51.100.2", 9000),
                Established,
                py,
            ),
            sock(
                Tcp,
                ("127.0.0.1", 55928),
                ("127.0.0.1", 8081),
                Established,
                py,
            ),
            sock(
                Tcp,
                ("127.0.0.1", 8080),
                ("127.0.0.1", 51292),
                Established,
                py,
            ),
            sock(
                Tcp,
                ("127.0.0.1", 51292),
                ("127.0.0.1", 8080),
                Established,
                py,
            ),
            sock(
                Tcp,
                ("198.51.100.1", 51036),
                ("198.51.100.1", 8080),
                FinWait2,
                None,
            ),
            sock(
                Tcp,
                ("198.51.100.1", 8080),
                ("198.51.100.1", 51036),
                CloseWait,
                py,
            ),
            sock(Tcp, ("fe80::1", 22), ("::", 0), Listen, py),
            sock(Tcp, ("::", 8082), ("::", 0), Listen, py),
            sock(Tcp, ("::", 8081), ("::", 0), Listen, py),
            sock(
                Tcp,
                ("2001:db8:1::1", 34428),
                ("2001:db8:1::2", 9000),
                Established,
                py,
            ),
            sock(
                Tcp,
                ("127.0.0.1", 8081),
                ("127.0.0.1", 55928),
                Established,
                py,
            ),
            sock(
                Udp,
                ("127.0.0.1", 6000),
                ("0.0.0.0", 0),
                Unknown,
                Some((9440, "python3")),
            ),
            sock(
                Udp,
                ("198.51.100.1", 43655),
                ("198.51.100.2", 53),
                Established,
                py,
            ),
            sock(Udp, ("0.0.0.0", 68), ("0.0.0.0", 0), Unknown, py),
            sock(Udp, ("::", 5353), ("::", 0), Unknown, py),
        ]
    }

    #[test]
    fn net_tools_netstat_from_namespace_capture() {
        let expected = ns_netstat_expected();
        assert_eq!(parse_netstat(fixture!("ns-netstat-wide.txt")), expected);
        assert_eq!(parse_netstat(fixture!("ns-netstat.txt")), expected);
        assert_eq!(
            parse_netstat(fixture!("host-netstat.txt")),
            vec![sock(Tcp, ("0.0.0.0", 2024), ("0.0.0.0", 0), Listen, None)]
        );
    }

    #[test]
    fn busybox_netstat_without_owners_from_namespace_capture() {
        // Same sockets, same order; BusyBox prints no tcp6 and keeps ::ffff: (made IPv4 here).
        let expected: Vec<Socket> = ns_netstat_expected()
            .into_iter()
            .map(|mut s| {
                s.connection.pid = None;
                s.connection.process_name = None;
                s
            })
            .collect();
        assert_eq!(parse_netstat(fixture!("ns-busybox-netstat.txt")), expected);
    }

    #[test]
    fn busybox_netstat_with_owners() {
        assert_eq!(
            parse_netstat(fixture!("busybox-netstat-pids.txt")),
            vec![
                sock(
                    Tcp,
                    ("0.0.0.0", 22),
                    ("0.0.0.0", 0),
                    Listen,
                    Some((412, "sshd"))
                ),
                sock(
                    Tcp,
                    ("192.0.2.5", 22),
                    ("192.0.2.9", 50522),
                    Established,
                    Some((1503, "sshd: root@pts"))
                ),
                sock(Tcp, ("::", 22), ("::", 0), Listen, Some((412, "sshd"))),
                sock(
                    Tcp,
                    ("192.0.2.5", 8080),
                    ("192.0.2.9", 41000),
                    TimeWait,
                    None
                ),
                sock(
                    Tcp,
                    ("0.0.0.0", 23),
                    ("0.0.0.0", 0),
                    Listen,
                    Some((77, "telnetd"))
                ),
                sock(
                    Udp,
                    ("0.0.0.0", 68),
                    ("0.0.0.0", 0),
                    Unknown,
                    Some((377, "udhcpc"))
                ),
                sock(
                    Udp,
                    ("192.0.2.5", 40000),
                    ("192.0.2.1", 53),
                    Established,
                    Some((900, "dnsmasq"))
                ),
                sock(Udp, ("::", 546), ("::", 0), Unknown, None),
            ]
        );
    }

    #[test]
    fn netstat_notes_kernel_threads_and_odd_lines() {
        let text = concat!(
            "(Not all processes could be identified, non-owned process info\n",
            " will not be shown, you would have to be root to see it all.)\n",
            "Active Internet connections (servers and established)\n",
            "Proto Recv-Q Send-Q Local Address           Foreign Address         State       PID/Program name\n",
            "tcp        0      0 192.0.2.1:1            192.0.2.2:2             CLOSE       1234/\n",
            "udp6       0      0 fe80::1%eth0:546        :::*                    UNKNOWN     77/dhcp client\n",
            "udp        0      0 192.0.2.1:5             0.0.0.0:*\n",
            "tcp6       0      0 :::7                    :::*                    LISTEN\n",
            "raw        0      0 0.0.0.0:1               0.0.0.0:*               7\n",
            "udpl       0      0 0.0.0.0:9               0.0.0.0:*\n",
            "tcp        0      0 0.0.0.0:ssh             0.0.0.0:*               LISTEN      -\n",
            "tcp        0      0 2001:db8:1234:5678:9a:22 :::*                   LISTEN      -\n",
            "tcp        0      0 0.0.0.0:1\n",
            "Active UNIX domain sockets (servers and established)\n",
        );
        let mut kernel = sock(Tcp, ("192.0.2.1", 1), ("192.0.2.2", 2), Closed, None);
        kernel.connection.pid = Some(1234);
        assert_eq!(
            parse_netstat(text),
            vec![
                kernel,
                sock(
                    Udp,
                    ("fe80::1", 546),
                    ("::", 0),
                    Unknown,
                    Some((77, "dhcp client"))
                ),
                sock(Udp, ("192.0.2.1", 5), ("0.0.0.0", 0), Unknown, None),
                sock(Tcp, ("::", 7), ("::", 0), Listen, None),
            ]
        );
        assert_eq!(parse_netstat_report(text).unreadable, 5);
    }

    #[test]
    fn listings_with_content_but_no_readable_line_are_not_understood() {
        assert_eq!(understood(parse_ss_report(""), "ss").unwrap(), vec![]);
        assert_eq!(
            understood(parse_ss_report("Usage: ss [ OPTIONS ]\n"), "ss").unwrap_err(),
            "ss: none of its 1 lines could be read"
        );
        let headers = "Active Internet connections (servers and established)\nProto Recv-Q Send-Q Local Address Foreign Address State\n";
        assert_eq!(
            understood(parse_netstat_report(headers), "netstat").unwrap(),
            vec![]
        );
        assert!(understood(parse_netstat_report("garbage\n"), "netstat").is_err());
        // One readable line is enough: the rest is skipped.
        let mixed = "garbage\ntcp LISTEN 0 1 0.0.0.0:1 0.0.0.0:*\n";
        assert_eq!(understood(parse_ss_report(mixed), "ss").unwrap().len(), 1);
    }

    // ---- robustness ----------------------------------------------------------------------

    /// xorshift64*: a tiny deterministic generator, so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Bytes that matter to these formats, so mutations hit parser decisions, not just noise.
    const INTERESTING: &[u8] = b"[]{}\":,*%()/.0123456789:abcdef -\n\t\\users:pid=fd=ESTAB\xff\xc3";

    fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
        let mut data = seed.to_vec();
        for _ in 0..=rng.below(8) {
            let at = rng.below(data.len() + 1);
            match rng.below(6) {
                0 => data.truncate(at),
                1 if at < data.len() => data[at] = rng.next() as u8,
                2 => data.insert(at, INTERESTING[rng.below(INTERESTING.len())]),
                3 if at < data.len() => {
                    data.remove(at);
                }
                4 => {
                    let len = rng.below(64);
                    let from = rng.below(data.len() + 1);
                    let chunk: Vec<u8> = data.iter().skip(from).take(len).copied().collect();
                    let at = at.min(data.len());
                    data.splice(at..at, chunk);
                }
                _ => {
                    let len = rng.below(32);
                    for _ in 0..len {
                        data.push(rng.next() as u8);
                    }
                }
            }
        }
        data
    }

    fn feed_all(text: &str) {
        let _ = parse_ip_addr(text);
        let _ = parse_ip_neigh(text);
        let _ = parse_ip_route(text);
        let _ = parse_ss(text);
        let _ = parse_netstat(text);
    }

    #[test]
    fn parsers_survive_random_and_mutated_input() {
        let seeds: [&str; 10] = [
            fixture!("ns-ip-addr.json"),
            fixture!("ns-ip-neigh.json"),
            fixture!("ns-ip-route.json"),
            fixture!("ns-ss.txt"),
            fixture!("ns-netstat.txt"),
            fixture!("busybox-netstat-pids.txt"),
            fixture!("host-ip-addr.json"),
            "tcp LISTEN 0 1 [fe80::1]%eth0:22 *:* users:((\"a\",pid=1,fd=2))",
            "[{\"dst\":\"default\",\"nexthops\":[{}]}]",
            "",
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..3000 {
            let data = if round % 5 == 0 {
                (0..rng.below(512)).map(|_| rng.next() as u8).collect()
            } else {
                let seed = seeds[round % seeds.len()].as_bytes();
                mutate(&mut rng, seed)
            };
            feed_all(&String::from_utf8_lossy(&data));
        }
        // Deep nesting and huge numbers must not overflow the stack or wrap.
        feed_all(&"[".repeat(100_000));
        feed_all(&format!(
            "{}1{}",
            "[{\"a\":".repeat(20_000),
            "}]".repeat(20_000)
        ));
        feed_all(r#"[{"ifname":"x","addr_info":[{"local":"192.0.2.1","prefixlen":1e400}]}]"#);
        feed_all(
            r#"[{"ifname":"x","addr_info":[{"local":"192.0.2.1","prefixlen":18446744073709551616}]}]"#,
        );
        feed_all(&format!("tcp LISTEN 0 0 {}:1 *:*", ":".repeat(100_000)));
        feed_all(&format!(
            "tcp LISTEN 0 0 0.0.0.0:1 *:* users:({})",
            "((\"".repeat(50_000)
        ));
    }

    // ---- run -----------------------------------------------------------------------------

    #[test]
    fn run_returns_stdout_and_replaces_invalid_utf8() {
        let t = Duration::from_secs(10);
        assert_eq!(
            run("sh", &["-c", "printf 'a b\\n'"], t),
            Ok("a b\n".to_string())
        );
        assert_eq!(
            run("sh", &["-c", "printf '\\377ok'"], t),
            Ok("\u{fffd}ok".to_string())
        );
        // The child gets /dev/null as stdin and the C locale.
        assert_eq!(
            run("sh", &["-c", "cat; echo \"$LC_ALL\""], t),
            Ok("C\n".to_string())
        );
    }

    #[test]
    fn run_reports_a_missing_program() {
        let t = Duration::from_secs(5);
        assert_eq!(
            run("grapheon-no-such-tool", &["-x"], t),
            Err(SourceError(
                "grapheon-no-such-tool is not installed (not found in PATH or the system directories)"
                    .into()
            ))
        );
        let failure = run_limited("/nonexistent/ss", &[], t, MAX_OUTPUT).unwrap_err();
        assert_eq!(failure.kind, FailureKind::Missing);
        assert_eq!(
            failure.message,
            "/nonexistent/ss is not installed (not found in PATH or the system directories)"
        );
        assert_eq!(
            run_limited("/", &[], t, MAX_OUTPUT).unwrap_err().kind,
            FailureKind::Missing
        );
    }

    #[test]
    fn run_reports_exit_status_and_the_end_of_stderr() {
        let t = Duration::from_secs(10);
        assert_eq!(
            run("sh", &["-c", "echo out; echo 'bad  thing\n here' >&2; exit 3"], t),
            Err(SourceError(
                "sh -c echo out; echo 'bad  thing\n here' >&2; exit 3 failed with exit status 3: bad thing here"
                    .into()
            ))
        );
        assert_eq!(
            run("false", &[], t),
            Err(SourceError("false failed with exit status 1".into()))
        );
        let script = "i=0; while [ $i -lt 3000 ]; do echo line$i >&2; i=$((i+1)); done; exit 2";
        let message = run("sh", &["-c", script], t).unwrap_err().0;
        let quoted = message.split_once("exit status 2: ").unwrap().1;
        assert_eq!(quoted.chars().count(), 300, "{quoted}");
        assert!(quoted.starts_with("line0 line1 line2 "), "{quoted}");
        assert!(quoted.contains(" … "), "{quoted}");
        assert!(quoted.ends_with("line2997 line2998 line2999"), "{quoted}");
        assert_eq!(
            run("sh", &["-c", "kill -9 $$"], t),
            Err(SourceError("sh -c kill -9 $$ failed with signal 9".into()))
        );
    }

    #[test]
    fn run_kills_a_child_that_ignores_sigterm_at_the_deadline() {
        let timeout = Duration::from_millis(400);
        let start = Instant::now();
        let result = run(
            "sh",
            &["-c", "trap '' TERM; echo started; sleep 30"],
            timeout,
        );
        let elapsed = start.elapsed();
        assert_eq!(
            result,
            Err(SourceError(
                "sh -c trap '' TERM; echo started; sleep 30 did not finish within 0.400 s and was killed"
                    .into()
            ))
        );
        assert!(elapsed >= timeout, "{elapsed:?}");
        assert!(
            elapsed < timeout + Duration::from_millis(1500),
            "{elapsed:?}"
        );
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("grapheon-cmd-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn process_is_running(pid: i32) -> bool {
        // A killed process may linger as a zombie until its new parent reaps it.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !matches!(
                stat.rsplit_once(") ").map(|(_, s)| s.as_bytes()[0]),
                Some(b'Z' | b'X')
            ),
            Err(_) => false,
        }
    }

    fn wait_until_gone(pid: i32) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if !process_is_running(pid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Runs `sh -c <script>` where `$PIDFILE` names a file the script writes a background
    /// pid to; returns the result, how long `run` took and that pid.
    fn run_with_background(
        tag: &str,
        script: &str,
        timeout: Duration,
    ) -> (Result<String, SourceError>, Duration, i32) {
        let dir = scratch_dir(tag);
        let pid_file = dir.join("pid");
        let script = script.replace("$PIDFILE", &pid_file.display().to_string());
        let start = Instant::now();
        let result = run("sh", &["-c", &script], timeout);
        let elapsed = start.elapsed();
        let pid = std::fs::read_to_string(&pid_file)
            .expect("the script wrote the pid")
            .trim()
            .parse()
            .expect("a pid");
        let _ = std::fs::remove_dir_all(&dir);
        (result, elapsed, pid)
    }

    #[test]
    fn run_kills_grandchildren_at_the_deadline() {
        let script = "sleep 30 & echo $! > $PIDFILE; wait";
        let (result, elapsed, pid) = run_with_background("group", script, Duration::from_secs(1));
        assert!(result.is_err());
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
        assert!(wait_until_gone(pid), "grandchild {pid} still running");
    }

    #[test]
    fn run_does_not_hang_on_a_grandchild_outside_the_group_holding_the_pipe() {
        // setsid puts the sleeper in its own session, out of reach of the group kill; it keeps
        // stdout open, so waiting for end of file would hang.
        let script = "setsid sleep 20 & echo $! > $PIDFILE; sleep 30";
        let (result, elapsed, pid) = run_with_background("escaped", script, Duration::from_secs(1));
        // SAFETY: kill(2) on the sleeper this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(result.is_err());
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    }

    #[test]
    fn run_returns_soon_after_exit_when_a_background_helper_keeps_the_pipe() {
        let script = "sleep 30 & echo $! > $PIDFILE; echo done";
        let (result, elapsed, pid) = run_with_background("helper", script, Duration::from_secs(10));
        assert_eq!(result, Ok("done\n".to_string()));
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        assert!(wait_until_gone(pid), "helper {pid} still running");
    }

    #[test]
    fn run_reads_large_output_and_refuses_a_flood() {
        let t = Duration::from_secs(20);
        let out = run("head", &["-c", "5000000", "/dev/zero"], t).unwrap();
        assert_eq!(out.len(), 5_000_000);
        assert!(out.bytes().all(|b| b == 0));
        let start = Instant::now();
        assert_eq!(
            run("sh", &["-c", "exec cat /dev/zero"], t),
            Err(SourceError(
                "sh -c exec cat /dev/zero printed more than 64 MiB; output ignored".into()
            ))
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(
            run_limited("head", &["-c", "2097153", "/dev/zero"], t, 2 << 20)
                .unwrap_err()
                .message,
            "head -c 2097153 /dev/zero printed more than 2 MiB; output ignored"
        );
        assert_eq!(
            run_limited("head", &["-c", "2097152", "/dev/zero"], t, 2 << 20)
                .unwrap()
                .len(),
            2 << 20
        );
    }

    // ---- sources end to end --------------------------------------------------------------

    /// Writes an executable shell script `name` into `dir`.
    fn script(dir: &Path, name: &str, body: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    fn fixture_path(name: &str) -> String {
        format!(
            "{}/tests/fixtures/commands/{name}",
            env!("CARGO_MANIFEST_DIR")
        )
    }

    #[test]
    fn sockets_come_from_ss_when_it_works() {
        let dir = scratch_dir("ss-ok");
        let ss = script(
            &dir,
            "ss",
            &format!(
                "[ \"$1\" = -tunapH ] && exec cat {}",
                fixture_path("host-ss.txt")
            ),
        );
        let netstat = script(&dir, "netstat", "exit 99");
        assert_eq!(
            sockets_with(&ss, &netstat, Duration::from_secs(10)),
            Ok(vec![sock(
                Tcp,
                ("0.0.0.0", 2024),
                ("0.0.0.0", 0),
                Listen,
                None
            )])
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sockets_fall_back_to_netstat_variants_in_order() {
        let dir = scratch_dir("fallback");
        let netstat = script(
            &dir,
            "netstat",
            &format!(
                "case \"$1\" in -tunapW) echo \"netstat: invalid option -- 'W'\" >&2; exit 1;; \
                 -tunap) exec cat {};; esac; exit 7",
                fixture_path("busybox-netstat-pids.txt")
            ),
        );
        let expected = parse_netstat(fixture!("busybox-netstat-pids.txt"));
        assert_eq!(expected.len(), 8);
        let t = Duration::from_secs(10);
        // ss missing, failing, or printing something else: all fall back.
        let failing = script(
            &dir,
            "ss-fails",
            "echo 'ss: invalid option -- H' >&2; exit 1",
        );
        let garbage = script(&dir, "ss-garbage", "echo 'Usage: ss [ OPTIONS ]'");
        for ss in ["/nonexistent/ss", failing.as_str(), garbage.as_str()] {
            assert_eq!(sockets_with(ss, &netstat, t), Ok(expected.clone()), "{ss}");
        }
        // Debian's BusyBox: only the last variant, without owners, works.
        let no_p = script(
            &dir,
            "netstat-no-p",
            &format!(
                "[ \"$1\" = -tuna ] && exec cat {}; echo \"netstat: invalid option\" >&2; exit 1",
                fixture_path("ns-busybox-netstat.txt")
            ),
        );
        assert_eq!(
            sockets_with("/nonexistent/ss", &no_p, t),
            Ok(parse_netstat(fixture!("ns-busybox-netstat.txt")))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sockets_error_names_every_attempt() {
        let dir = scratch_dir("nothing");
        let netstat = script(&dir, "netstat", "echo \"bad $1\" >&2; exit 1");
        assert_eq!(
            sockets_with("/nonexistent/ss", &netstat, Duration::from_secs(10)),
            Err(SourceError(format!(
                "/nonexistent/ss is not installed (not found in PATH or the system directories); \
                 {netstat} -tunapW failed with exit status 1: bad -tunapW; \
                 {netstat} -tunap failed with exit status 1: bad -tunap; \
                 {netstat} -tuna failed with exit status 1: bad -tuna"
            )))
        );
        assert_eq!(
            sockets_with("/nonexistent/ss", "/nonexistent/netstat", Duration::from_secs(10)),
            Err(SourceError(
                "/nonexistent/ss is not installed (not found in PATH or the system directories); \
                 /nonexistent/netstat is not installed (not found in PATH or the system directories)"
                    .into()
            ))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn busybox_ip_without_json_is_an_error() {
        let dir = scratch_dir("busybox-ip");
        let usage = fixture_path("busybox-ip-json-usage.txt");
        let ip = script(&dir, "ip", &format!("cat {usage} >&2; exit 1"));
        let t = Duration::from_secs(10);
        let err = addresses_with(&ip, t).unwrap_err().0;
        assert!(
            err.starts_with(&format!(
                "{ip} -json addr show failed with exit status 1: BusyBox v1.35.0 (Debian"
            )),
            "{err}"
        );
        assert!(
            err.ends_with("ip rule [list] | add|del SELECTOR ACTION"),
            "{err}"
        );
        // Some builds print their plain table and succeed.
        let plain = script(&dir, "ip-plain", "echo '1: lo: <LOOPBACK,UP> mtu 65536'");
        assert_eq!(
            routes_with(&plain, t),
            Err(SourceError(
                "ip -json route show printed no valid JSON (is this BusyBox ip, without -json?): \"1: lo: <LOOPBACK,UP> mtu 65536\""
                    .into()
            ))
        );
        assert!(neighbors_with(&plain, t).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A network namespace made for one test and deleted when dropped.
    struct Netns(String);

    impl Netns {
        fn create(tag: &str) -> Option<Netns> {
            let name = format!("grapheon-t{}-{tag}", std::process::id());
            let t = Duration::from_secs(10);
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 || run("ip", &["netns", "add", &name], t).is_err() {
                eprintln!("skipping: needs root and iproute2 to make a network namespace");
                return None;
            }
            Some(Netns(name))
        }

        fn ip(&self, args: &str) {
            let mut all = vec!["-n", self.0.as_str()];
            all.extend(args.split_whitespace());
            run("ip", &all, Duration::from_secs(10)).unwrap_or_else(|e| panic!("ip {args}: {e}"));
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = run("ip", &["netns", "del", &self.0], Duration::from_secs(10));
        }
    }

    #[test]
    fn live_ip_json_in_a_private_namespace() {
        let Some(ns) = Netns::create("ip") else {
            return;
        };
        ns.ip("link add veth0 type veth peer name veth1");
        ns.ip("link set veth0 address 02:00:5e:00:53:a1 addrgenmode none");
        ns.ip("link set veth1 address 02:00:5e:00:53:a2 addrgenmode none");
        ns.ip("addr add 198.51.100.1/24 dev veth0");
        ns.ip("addr add 2001:db8:1::1/64 dev veth0 nodad");
        ns.ip("link set veth0 up");
        ns.ip("link set veth1 up");
        ns.ip("link set lo up");
        ns.ip("neigh add 198.51.100.7 lladdr 02:00:5e:00:53:07 dev veth0 nud permanent");
        ns.ip("neigh add 2001:db8:1::7 lladdr 02:00:5e:00:53:17 dev veth0 nud reachable");
        ns.ip("route add default via 198.51.100.254");
        ns.ip("route add blackhole 203.0.113.0/24");
        ns.ip("route add 198.18.0.1/32 via 198.51.100.254");
        let t = Duration::from_secs(10);
        let show = |what: &str| {
            run("ip", &["-n", &ns.0, "-json", what, "show"], t).unwrap_or_else(|e| panic!("{e}"))
        };
        let mac = Some("02:00:5e:00:53:a1");
        assert_eq!(
            parse_ip_addr(&show("addr")).unwrap(),
            vec![
                addr("veth0", "198.51.100.1", 24, mac),
                addr("veth0", "2001:db8:1::1", 64, mac),
            ]
        );
        let mut neighbours = parse_ip_neigh(&show("neigh")).unwrap();
        neighbours.sort();
        assert_eq!(
            neighbours,
            vec![
                neigh(
                    "veth0",
                    "198.51.100.7",
                    Some("02:00:5e:00:53:07"),
                    Some("permanent")
                ),
                neigh(
                    "veth0",
                    "2001:db8:1::7",
                    Some("02:00:5e:00:53:17"),
                    Some("reachable")
                ),
            ]
        );
        assert_eq!(
            parse_ip_route(&show("route")).unwrap(),
            vec![
                route("default", Some("198.51.100.254"), Some("veth0"), None),
                route("198.18.0.1", Some("198.51.100.254"), Some("veth0"), None),
                route("198.51.100.0/24", None, Some("veth0"), Some("198.51.100.1")),
                route("203.0.113.0/24", None, None, None),
            ]
        );
    }

    #[test]
    fn live_ss_in_a_private_namespace() {
        if !Path::new("/usr/bin/python3").exists() {
            eprintln!("skipping: needs /usr/bin/python3 to open sockets");
            return;
        }
        let Some(ns) = Netns::create("ss") else {
            return;
        };
        ns.ip("link set lo up");
        let program = "import socket, sys, time\n\
            a = socket.socket(); a.bind(('127.0.0.1', 8080)); a.listen(1)\n\
            b = socket.socket(socket.AF_INET6); b.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n\
            b.bind(('::', 8081)); b.listen(1)\n\
            c = socket.socket(); c.connect(('127.0.0.1', 8081)); d, _ = b.accept()\n\
            print('ready', flush=True); sys.stdin.read()";
        let mut holder = Command::new("ip")
            .args(["netns", "exec", &ns.0, "/usr/bin/python3", "-c", program])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python3");
        let mut ready = [0u8; 6];
        let read = holder.stdout.as_mut().unwrap().read_exact(&mut ready);
        let listing = run(
            "ip",
            &["netns", "exec", &ns.0, "ss", "-tunapH"],
            Duration::from_secs(10),
        );
        drop(holder.stdin.take());
        let _ = holder.kill();
        let _ = holder.wait();
        read.expect("python3 ready");
        let pid = holder.id();
        let py = Some((pid, "python3"));
        let mut sockets = parse_ss(&listing.unwrap());
        sockets.sort_by_key(|s| (s.connection.local_port, s.connection.remote_port));
        assert_eq!(
            sockets,
            vec![
                sock(Tcp, ("127.0.0.1", 8080), ("0.0.0.0", 0), Listen, py),
                dual(sock(Tcp, ("::", 8081), ("::", 0), Listen, py)),
                sock(
                    Tcp,
                    ("127.0.0.1", 8081),
                    ("127.0.0.1", random_port(&sockets)),
                    Established,
                    py
                ),
                sock(
                    Tcp,
                    ("127.0.0.1", random_port(&sockets)),
                    ("127.0.0.1", 8081),
                    Established,
                    py
                ),
            ]
        );
    }

    /// The client's ephemeral port in the live listing (the one local port that is not ours).
    fn random_port(sockets: &[Socket]) -> u16 {
        sockets
            .iter()
            .map(|s| s.connection.local_port)
            .find(|p| *p != 8080 && *p != 8081)
            .unwrap_or(0)
    }
}
