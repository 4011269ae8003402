//! `/proc` text: `/proc/net/{tcp,tcp6,udp,udp6}` sockets and socket owners from `/proc/<pid>/fd`.
//!
//! Every path hangs off one `proc_root` (as `ss`'s `PROC_ROOT` and node_exporter's
//! `--path.procfs`), so tests point it at the checked-in tree under `tests/fixtures/proc`.
//! [`parse_net_line`] and [`parse_net_table`] are pure; the readers stream files line by line.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::NonNull;

use crate::collect::{Socket, SourceError};
use crate::model::{ip_from_bytes, ProcessName, Protocol};

/// The socket tables under `<proc_root>/net`, their protocol and whether they are IPv6.
const TABLES: [(&str, Protocol, bool); 4] = [
    ("tcp", Protocol::Tcp, false),
    ("tcp6", Protocol::Tcp, true),
    ("udp", Protocol::Udp, false),
    ("udp6", Protocol::Udp, true),
];
/// Real lines are under 200 bytes; a longer one is cut and its pieces skipped as garbage.
const MAX_LINE: u64 = 4096;
/// The most of one socket table that is read.
const MAX_TABLE_BYTES: u64 = 256 << 20;
/// `socket:[18446744073709551615]` is 29 bytes; a longer link target is no socket.
const LINK_BUFFER: usize = 64;

/// TCP and UDP sockets of IPv4 and IPv6 from `<proc_root>/net/{tcp,tcp6,udp,udp6}`, without
/// owners. A missing table (no IPv6) is skipped; `Err` only when none of the four is readable.
/// `dual_stack` is always false: `/proc` does not say whether a socket is `IPV6_V6ONLY`.
pub fn sockets(proc_root: &Path) -> Result<Vec<Socket>, SourceError> {
    let mut out = Vec::new();
    let mut line = Vec::with_capacity(256);
    let mut readable = 0;
    let mut failures = Vec::new();
    let in_use = InUse::read(&proc_root.join("net"));
    for (name, protocol, v6) in TABLES {
        if !in_use.may_have(protocol, v6) {
            // Listing a TCP table walks the kernel's whole hash of established sockets
            // (shared by every namespace: 2.6 ms for 262,144 buckets) to find none.
            readable += 1;
            continue;
        }
        let path = proc_root.join("net").join(name);
        let start = out.len();
        match read_table(&path, protocol, v6, MAX_TABLE_BYTES, &mut line, &mut out) {
            Ok(()) => readable += 1,
            Err(err) => {
                out.truncate(start);
                debug!("skipping {}: {err}", path.display());
                failures.push(format!("{name}: {err}"));
            }
        }
    }
    if readable == 0 {
        return Err(SourceError(format!(
            "cannot read {}/net/{{tcp,tcp6,udp,udp6}} ({})",
            proc_root.display(),
            failures.join("; ")
        )));
    }
    Ok(out)
}

/// Streams one table of at most `cap` bytes into `out`, reusing `line` so that 100,000
/// sockets cost no text copy.
fn read_table(
    path: &Path,
    protocol: Protocol,
    v6: bool,
    cap: u64,
    line: &mut Vec<u8>,
    out: &mut Vec<Socket>,
) -> io::Result<()> {
    // A regular file only (a FIFO would block, /dev/zero never end), and bounded: a real table
    // of a million sockets is about 150 MB. One byte past the cap tells a table of exactly
    // `cap` bytes from a larger one.
    let file = SeqFile::open(path)?;
    let mut reader = BufReader::with_capacity(64 * 1024, file.take(cap + 1));
    loop {
        line.clear();
        if (&mut reader).take(MAX_LINE).read_until(b'\n', line)? == 0 {
            if reader.get_ref().limit() == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("larger than {cap} bytes"),
                ));
            }
            return Ok(());
        }
        let Ok(text) = std::str::from_utf8(line) else {
            debug!("{}: skipped a line that is not text", path.display());
            continue;
        };
        match parse_net_line(text, protocol, v6) {
            Some(socket) => out.push(socket),
            None if is_header(text) => {}
            None => debug!(
                "{}: skipped malformed line {:?}",
                path.display(),
                text.trim()
            ),
        }
    }
}

/// A `/proc` table read without the last, empty `read`: the kernel fills at most one page
/// per call and stops early only at the end of the table, so a short answer is the end.
/// Each `read` of a TCP table restarts the kernel's walk of its socket hash; the empty one
/// that would only confirm the end costs as much as the table itself.
struct SeqFile {
    file: File,
    done: bool,
}

/// A read this much shorter than a page (4 KiB or more) cannot have been cut by a full page:
/// every table line is under 200 bytes.
const SHORT_READ: usize = 4096 - 512;

impl SeqFile {
    fn open(path: &Path) -> io::Result<SeqFile> {
        Ok(SeqFile {
            file: crate::input::open_regular(path, crate::input::Links::Follow)?,
            done: false,
        })
    }
}

impl Read for SeqFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.file.read(buf)?;
        // Only a request of at least a page tells: a smaller buffer is short by itself.
        self.done = n < SHORT_READ && buf.len() >= 4096;
        Ok(n)
    }
}

/// Which socket tables of a namespace can have entries, from `net/sockstat` and
/// `net/sockstat6` (per-namespace counts; a few microseconds to read). Unknown when they
/// cannot be read (an older kernel, a fixture tree): then every table is read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct InUse {
    known: bool,
    tcp: u64,
    tcp6: u64,
    time_wait: u64,
    udp: u64,
    udp6: u64,
}

impl InUse {
    fn read(net: &Path) -> InUse {
        let text = |name: &str| {
            crate::input::read_regular(&net.join(name), crate::input::Links::Follow, 4096)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
        };
        match (text("sockstat"), text("sockstat6")) {
            (Some(v4), Some(v6)) => InUse::parse(&v4, &v6).unwrap_or_default(),
            _ => InUse::default(),
        }
    }

    /// Parses `TCP: inuse 4 orphan 0 tw 175 ...`, `UDP: inuse 0 ...`, `TCP6: inuse 0`, ...;
    /// `None` unless every count is there.
    fn parse(v4: &str, v6: &str) -> Option<InUse> {
        fn field(text: &str, line: &str, key: &str) -> Option<u64> {
            let rest = text.lines().find_map(|l| l.strip_prefix(line))?;
            let mut words = rest.split_ascii_whitespace();
            while let Some(word) = words.next() {
                if word == key {
                    return words.next()?.parse().ok();
                }
            }
            None
        }
        Some(InUse {
            known: true,
            tcp: field(v4, "TCP: ", "inuse")?,
            time_wait: field(v4, "TCP: ", "tw")?,
            udp: field(v4, "UDP: ", "inuse")?,
            tcp6: field(v6, "TCP6: ", "inuse")?,
            udp6: field(v6, "UDP6: ", "inuse")?,
        })
    }

    /// False only when the counts say the table is empty. Time-wait sockets of both
    /// families share one count; request sockets need a listener, which counts.
    fn may_have(&self, protocol: Protocol, v6: bool) -> bool {
        if !self.known {
            return true;
        }
        match (protocol, v6) {
            (Protocol::Tcp, false) => self.tcp + self.time_wait > 0,
            (Protocol::Tcp, true) => self.tcp6 + self.time_wait > 0,
            (Protocol::Udp, false) => self.udp > 0,
            (Protocol::Udp, true) => self.udp6 > 0,
        }
    }
}

fn is_header(line: &str) -> bool {
    line.trim_start().starts_with("sl ")
}

/// Parses the text of one `/proc/net/{tcp,tcp6,udp,udp6}` file; the header and malformed lines
/// are skipped.
pub fn parse_net_table(text: &str, protocol: Protocol, v6: bool) -> Vec<Socket> {
    text.lines()
        .filter_map(|line| parse_net_line(line, protocol, v6))
        .collect()
}

/// Parses one socket line: `sl: local rem st tx:rx tr:when retrnsmt uid timeout inode ...`.
/// Addresses are hex words in host byte order (the kernel prints each `__be32` as a host
/// `u32`), ports hex in host order, the state a hex TCP state number.
pub fn parse_net_line(line: &str, protocol: Protocol, v6: bool) -> Option<Socket> {
    let mut fields = line.split_ascii_whitespace();
    if !fields.next()?.ends_with(':') {
        return None;
    }
    let (local_ip, local_port) = parse_endpoint(fields.next()?, v6)?;
    let (remote_ip, remote_port) = parse_endpoint(fields.next()?, v6)?;
    let state = u8::from_str_radix(hex(fields.next()?)?, 16).ok()?;
    // tx_queue:rx_queue, tr:tm->when, retrnsmt, uid, timeout, then the inode.
    let inode = fields.nth(5)?;
    if !inode.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let inode = inode.parse::<u64>().ok()?;
    Some(Socket::from_kernel(
        protocol,
        (local_ip, local_port),
        (remote_ip, remote_port),
        state,
        inode,
        false,
    ))
}

/// Non-empty ASCII hex digits only (`from_str_radix` alone would accept a sign).
fn hex(text: &str) -> Option<&str> {
    (!text.is_empty() && text.bytes().all(|b| b.is_ascii_hexdigit())).then_some(text)
}

/// `0100007F:0016` or `<32 hex digits>:0016`, canonicalised (IPv4-mapped becomes IPv4).
fn parse_endpoint(text: &str, v6: bool) -> Option<(IpAddr, u16)> {
    let (addr, port) = text.split_once(':')?;
    if port.len() > 4 {
        return None;
    }
    let port = u16::from_str_radix(hex(port)?, 16).ok()?;
    let addr = hex(addr)?;
    let ip = if v6 {
        if addr.len() != 32 {
            return None;
        }
        let mut octets = [0u8; 16];
        for (i, chunk) in octets.chunks_exact_mut(4).enumerate() {
            let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        ip_from_bytes(&octets)?
    } else {
        if addr.len() != 8 {
            return None;
        }
        let word = u32::from_str_radix(addr, 16).ok()?;
        IpAddr::V4(Ipv4Addr::from(word.to_ne_bytes()))
    };
    Some((ip, port))
}

/// A hasher for the owner map's keys (socket inodes, pids): one multiply folded on itself.
/// std's default SipHash costs several times more per `u64` and its protection against
/// chosen keys is not needed for numbers the kernel hands out.
#[derive(Default, Clone, Copy)]
pub struct InodeHasher(u64);

impl Hasher for InodeHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        const K: u64 = 0x9e37_79b9_7f4a_7c15;
        let p = u128::from(self.0 ^ n) * u128::from(K);
        // Folding the high half in spreads every input bit over the bits the table uses.
        self.0 = (p as u64) ^ ((p >> 64) as u64);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Builds [`InodeHasher`]s for the maps of the `/proc` walk.
pub type FastHash = BuildHasherDefault<InodeHasher>;

/// No owner found yet.
const NOBODY: u32 = u32::MAX;

/// The owners of the sockets a run reports: socket inode → lowest pid holding it, and the
/// process names of those pids.
#[derive(Debug, Default)]
pub struct Owners {
    wanted: HashMap<u64, u32, FastHash>,
    names: HashMap<u32, Option<ProcessName>, FastHash>,
    /// Socket descriptors not wanted when their process was scanned: a namespace found later
    /// in the walk may want them (a process holding a socket of another namespace).
    stray: Option<Vec<(u64, u32)>>,
    /// Whether descriptors are still added to `stray`: not once no socket can become wanted
    /// any more, nor past [`MAX_STRAYS`].
    collecting: bool,
}

/// Most unmatched socket descriptors kept during one walk (16 bytes each): every unix
/// socket of the host is one, and only the few of a namespace found later matter.
pub const MAX_STRAYS: usize = 1 << 18;

impl Owners {
    /// Owners wanted for `sockets`. `late` keeps unwanted descriptors for sockets that
    /// become wanted during the walk ([`Owners::want`]).
    pub fn new(sockets: &[Socket], late: bool) -> Owners {
        let mut owners = Owners {
            stray: late.then(Vec::new),
            collecting: late,
            ..Owners::default()
        };
        owners.want(sockets);
        owners
    }

    /// Adds the inodes of `sockets` (0, time-wait and request sockets, has no owner).
    pub fn want(&mut self, sockets: &[Socket]) {
        self.wanted.reserve(sockets.len());
        for s in sockets.iter().filter(|s| s.inode != 0) {
            self.wanted.entry(s.inode).or_insert(NOBODY);
        }
    }

    /// No socket becomes wanted from now on ([`Owners::want`] is not called again): unmatched
    /// descriptors are no longer kept. Those kept so far still get their chance.
    pub fn no_more_wanted(&mut self) {
        self.collecting = false;
    }

    /// Unmatched descriptors kept for sockets wanted later in the walk.
    pub fn strays(&self) -> usize {
        self.stray.as_ref().map_or(0, Vec::len)
    }

    /// True when no socket wants an owner and none can be added later.
    fn is_idle(&self) -> bool {
        self.wanted.is_empty() && self.stray.is_none()
    }

    /// Fills `pid` and `process_name` of the sockets whose owner was found.
    pub fn attach(&self, sockets: &mut [Socket]) {
        if self.wanted.is_empty() {
            return;
        }
        for socket in sockets {
            match self.wanted.get(&socket.inode) {
                Some(&pid) if pid != NOBODY => {
                    socket.connection.pid = Some(pid);
                    socket.connection.process_name = self.names.get(&pid).cloned().flatten();
                }
                _ => {}
            }
        }
    }

    /// Gives the strays their chance now that every namespace is known, and names their pids.
    fn settle(&mut self, proc_root: &Path) {
        let Some(stray) = self.stray.take() else {
            return;
        };
        for (inode, pid) in stray {
            if let Some(owner) = self.wanted.get_mut(&inode) {
                if pid < *owner {
                    *owner = pid;
                    self.names
                        .entry(pid)
                        .or_insert_with(|| read_comm(proc_root, pid).map(ProcessName::from));
                }
            }
        }
    }
}

/// Fills `pid` and `process_name` of the sockets whose inode some process holds: scans
/// `<proc_root>/<pid>/fd/*` for `socket:[inode]` links and reads `<proc_root>/<pid>/comm`.
/// When several processes hold a socket the lowest pid wins. Processes that vanish or deny
/// access are skipped; this never fails.
pub fn attach_owners(proc_root: &Path, mut sockets: Vec<Socket>) -> Vec<Socket> {
    let mut owners = Owners::new(&sockets, false);
    walk(proc_root, &mut owners, |_, _, _| {});
    owners.attach(&mut sockets);
    sockets
}

/// The one walk over `<proc_root>/<pid>`: `visit(root_fd, pid, owners)` runs first for each
/// process (namespace discovery reads there and adds wanted sockets), then the process's
/// `socket:[inode]` descriptors are matched against the wanted inodes. Processes that vanish
/// or deny access are skipped; this never fails.
pub fn walk(
    proc_root: &Path,
    owners: &mut Owners,
    mut visit: impl FnMut(libc::c_int, u32, &mut Owners),
) {
    if owners.is_idle() {
        return;
    }
    let mut root = match Dir::open(proc_root) {
        Ok(dir) => dir,
        Err(err) => {
            debug!(
                "cannot list {}: {err}; sockets keep no owner",
                proc_root.display()
            );
            return;
        }
    };
    let root_fd = root.fd();
    let mut path = Vec::with_capacity(32);
    let mut link = [0u8; LINK_BUFFER];
    loop {
        let pid = {
            let Some(entry) = root.next_name() else { break };
            let Some(pid) = parse_pid(entry.to_bytes()) else {
                continue;
            };
            path.clear();
            path.extend_from_slice(entry.to_bytes());
            path.extend_from_slice(b"/fd\0");
            pid
        };
        visit(root_fd, pid, owners);
        let Ok(fd_path) = CStr::from_bytes_with_nul(&path) else {
            continue;
        };
        // A process that exited since the listing, or one we may not look into.
        let mut fds = match Dir::open_at(root_fd, fd_path) {
            Ok(dir) => dir,
            Err(err) => {
                debug!("skipping {}/{pid}/fd: {err}", proc_root.display());
                continue;
            }
        };
        let fds_fd = fds.fd();
        let mut holds = false;
        while let Some(entry) = fds.next_name() {
            // SAFETY: `entry` is a NUL-terminated name inside `fds`, `link` a live buffer of
            // the given length; readlinkat writes at most that many bytes.
            let len = unsafe {
                libc::readlinkat(fds_fd, entry.as_ptr(), link.as_mut_ptr().cast(), link.len())
            };
            let Ok(len) = usize::try_from(len) else {
                continue;
            };
            let Some(inode) = link.get(..len).and_then(socket_inode) else {
                continue;
            };
            match owners.wanted.get_mut(&inode) {
                Some(owner) => {
                    if pid < *owner {
                        *owner = pid;
                        holds = true;
                    }
                }
                None => {
                    if let Some(stray) = owners.stray.as_mut().filter(|_| owners.collecting) {
                        if stray.len() < MAX_STRAYS {
                            stray.push((inode, pid));
                        } else {
                            owners.collecting = false;
                            debug!(
                                "more than {MAX_STRAYS} socket descriptors match no socket; those \
                                 of namespaces found later in the /proc walk may keep no owner"
                            );
                        }
                    }
                }
            }
        }
        if holds && !owners.names.contains_key(&pid) {
            // Read now, while the process most likely still exists.
            let name = read_comm(proc_root, pid).map(ProcessName::from);
            owners.names.insert(pid, name);
        }
    }
    owners.settle(proc_root);
}

/// A `/proc` entry name that is a process id.
fn parse_pid(name: &[u8]) -> Option<u32> {
    if name.is_empty() || !name.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(name).ok()?.parse().ok()
}

/// The inode of a `socket:[N]` link target.
fn socket_inode(target: &[u8]) -> Option<u64> {
    let digits = target.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        let digit = d.is_ascii_digit().then(|| u64::from(d - b'0'))?;
        n.checked_mul(10)?.checked_add(digit)
    })
}

/// `<proc_root>/<pid>/comm`, trimmed; `None` when unreadable or empty.
pub fn read_comm(proc_root: &Path, pid: u32) -> Option<String> {
    read_comm_in(&proc_root.join(pid.to_string()))
}

/// `<dir>/comm`, `dir` being one process's `/proc` directory, trimmed; `None` when
/// unreadable or empty.
pub fn read_comm_in(dir: &Path) -> Option<String> {
    let path = dir.join("comm");
    let mut bytes = Vec::with_capacity(32);
    // comm is at most 16 bytes; the bound keeps a strange file from costing memory.
    crate::input::open_regular(&path, crate::input::Links::Follow)
        .and_then(|f| f.take(256).read_to_end(&mut bytes))
        .map_err(|err| debug!("cannot read {}: {err}", path.display()))
        .ok()?;
    let name = String::from_utf8_lossy(&bytes).trim().to_string();
    (!name.is_empty()).then_some(name)
}

/// A directory stream read with `readdir`, so listing `/proc/<pid>/fd` allocates nothing per
/// entry (`std::fs::read_dir` allocates each name).
struct Dir(NonNull<libc::DIR>);

impl Dir {
    fn open(path: &Path) -> io::Result<Dir> {
        let path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        Dir::open_at(libc::AT_FDCWD, &path)
    }

    /// Opens `path` relative to the directory `dir_fd`.
    fn open_at(dir_fd: libc::c_int, path: &CStr) -> io::Result<Dir> {
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
        // SAFETY: `path` is NUL-terminated; the result is checked.
        let fd = unsafe { libc::openat(dir_fd, path.as_ptr(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is an open directory descriptor that fdopendir takes over on success.
        match NonNull::new(unsafe { libc::fdopendir(fd) }) {
            Some(dir) => Ok(Dir(dir)),
            None => {
                let err = io::Error::last_os_error();
                // SAFETY: fdopendir failed, so `fd` is still ours to close.
                unsafe { libc::close(fd) };
                Err(err)
            }
        }
    }

    /// The descriptor of the stream, for `*at` calls relative to it.
    fn fd(&self) -> libc::c_int {
        // SAFETY: `self.0` is an open stream until drop.
        unsafe { libc::dirfd(self.0.as_ptr()) }
    }

    /// The next entry name other than `.` and `..`; `None` at the end or on an error (a
    /// process that exited mid-listing), which both end the listing.
    fn next_name(&mut self) -> Option<&CStr> {
        loop {
            // SAFETY: `self.0` is an open stream; the entry stays valid until the next call
            // on this stream, which the `&mut self` borrow of the result prevents.
            let entry = unsafe { libc::readdir(self.0.as_ptr()) };
            if entry.is_null() {
                return None;
            }
            // SAFETY: `d_name` is a NUL-terminated name inside the entry.
            let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
            if name.to_bytes() != b"." && name.to_bytes() != b".." {
                return Some(name);
            }
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        // SAFETY: `self.0` is open and closed exactly once, here.
        unsafe { libc::closedir(self.0.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::netlink::fuzz::{mutate, XorShift};
    use crate::model::{ConnState, Connection};
    use std::path::PathBuf;

    fn socket(
        protocol: Protocol,
        local: (&str, u16),
        remote: (&str, Option<u16>),
        state: ConnState,
        inode: u64,
    ) -> Socket {
        Socket {
            connection: Connection {
                protocol,
                local_ip: local.0.parse().unwrap(),
                local_port: local.1,
                remote_ip: Some(remote.0.parse().unwrap()),
                remote_port: remote.1,
                state: Some(state),
                pid: None,
                process_name: None,
            },
            inode,
            dual_stack: false,
        }
    }

    fn owned(mut s: Socket, pid: u32, name: &str) -> Socket {
        s.connection.pid = Some(pid);
        s.connection.process_name = Some(name.into());
        s
    }

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proc")
    }

    /// What the fixture tables hold, in file order (the hex is little-endian, as on x86 and
    /// ARM hosts).
    fn fixture_sockets() -> Vec<Socket> {
        use ConnState::*;
        use Protocol::{Tcp, Udp};
        vec![
            socket(Tcp, ("127.0.0.1", 8080), ("0.0.0.0", None), Listen, 1001),
            socket(
                Tcp,
                ("192.0.2.2", 33048),
                ("203.0.113.80", Some(80)),
                Established,
                1002,
            ),
            socket(
                Tcp,
                ("192.0.2.2", 33050),
                ("203.0.113.80", Some(80)),
                TimeWait,
                0,
            ),
            socket(Tcp, ("::", 22), ("::", None), Listen, 1003),
            socket(
                Tcp,
                ("10.0.0.1", 443),
                ("10.0.0.2", Some(51000)),
                Established,
                1004,
            ),
            socket(Tcp, ("fe80::1", 9000), ("::", None), Listen, 1008),
            socket(Udp, ("0.0.0.0", 68), ("0.0.0.0", None), Unknown, 1005),
            socket(
                Udp,
                ("192.0.2.2", 5353),
                ("192.0.2.1", Some(53)),
                Established,
                1006,
            ),
            socket(Udp, ("::1", 323), ("::", None), Unknown, 1007),
        ]
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn real_format_lines_parse_in_host_byte_order() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0\n\
   1: 020200C0:8118 507100CB:0050 01 00000000:00000000 02:000A7B2C 00000000  1000        0 1002 2 0000000000000000 20 4 30 10 -1\n\
   2: 020200C0:811A 507100CB:0050 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000\n\
   3: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 notanumber 1\n\
   4: 0100007F:0016 00000000:0000 0A\n";
        let udp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  511: 00000000000000000000000001000000:0143 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000   998        0 1007 2 0000000000000000 0\n";
        let tcp6 = "   0: 0000000000000000FFFF00000100000A:01BB 0000000000000000FFFF00000200000A:C738 01 00000000:00000000 00:00000000 00000000     0        0 1004 1 0000000000000000 20 4 1 10 -1\n\
   1: 000080FE000000000000000001000000:2328 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1008 1 0000000000000000 100 0 0 10 0\n\
   2: 000080FE0000000000000000010000:2328 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1009 1\n";
        let all = fixture_sockets();
        assert_eq!(
            parse_net_table(tcp, Protocol::Tcp, false),
            all[0..3].to_vec()
        );
        assert_eq!(
            parse_net_table(tcp6, Protocol::Tcp, true),
            vec![all[4].clone(), all[5].clone()]
        );
        assert_eq!(
            parse_net_table(udp6, Protocol::Udp, true),
            vec![all[8].clone()]
        );
        // The same line read as the wrong family is not a socket.
        assert_eq!(parse_net_table(tcp, Protocol::Tcp, true), vec![]);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn fixture_tree_gives_sockets_and_lowest_pid_owners() {
        let root = fixture();
        let sockets = sockets(&root).unwrap();
        assert_eq!(sockets, fixture_sockets());
        let all = fixture_sockets();
        assert_eq!(
            attach_owners(&root, sockets),
            vec![
                // 1001 is shared by pids 100 and 200: the lower wins.
                owned(all[0].clone(), 100, "sshd"),
                all[1].clone(),
                all[2].clone(),
                owned(all[3].clone(), 100, "sshd"),
                owned(all[4].clone(), 200, "nginx"),
                all[5].clone(),
                owned(all[6].clone(), 99, "dhclient"),
                // Held by 1000 and 99: numerically lower, though "1000" sorts first as text.
                owned(all[7].clone(), 99, "dhclient"),
                owned(all[8].clone(), 1000, "chronyd"),
            ]
        );
    }

    #[test]
    fn unmatched_descriptors_are_not_kept_once_nothing_more_can_be_wanted() {
        // Kept while a namespace found later may want them: every fixture socket is unmatched.
        let mut kept = Vec::new();
        let mut owners = Owners::new(&[], true);
        walk(&fixture(), &mut owners, |_, _, owners| {
            kept.push(owners.strays())
        });
        assert_eq!(kept.len(), 5, "one visit per process");
        assert!(kept.iter().any(|n| *n > 0), "{kept:?}");
        // Discovery reached its cap at the first process: nothing is kept from then on.
        let mut kept = Vec::new();
        let mut owners = Owners::new(&[], true);
        walk(&fixture(), &mut owners, |_, _, owners| {
            owners.no_more_wanted();
            kept.push(owners.strays());
        });
        assert_eq!(kept, [0; 5]);
    }

    #[test]
    fn missing_tables_are_skipped_and_none_is_an_error() {
        let empty = std::env::temp_dir().join(format!("grapheon-procfs-{}", std::process::id()));
        std::fs::create_dir_all(empty.join("net")).unwrap();
        std::fs::write(empty.join("net/udp"), "  sl  local_address\n").unwrap();
        assert_eq!(sockets(&empty), Ok(vec![]));
        std::fs::remove_file(empty.join("net/udp")).unwrap();
        let err = sockets(&empty).unwrap_err();
        assert!(err.0.contains("cannot read"), "{err}");
        // No inodes wanted, no process tree: nothing changes and nothing fails.
        let one = parse_net_table(
            "0: 0100007F:0016 00000000:0000 0A 0:0 0:0 0 0 0 77",
            Protocol::Tcp,
            false,
        );
        assert_eq!(attach_owners(&empty.join("nowhere"), one.clone()), one);
        std::fs::remove_dir_all(&empty).unwrap();
    }

    #[test]
    fn sockstat_counts_say_which_tables_can_be_skipped() {
        let v4 = "sockets: used 25\nTCP: inuse 0 orphan 0 tw 0 alloc 4205 mem 42\nUDP: inuse 2 mem 0\nUDPLITE: inuse 0\n";
        let v6 = "TCP6: inuse 3\nUDP6: inuse 0\nUDPLITE6: inuse 0\n";
        let u = InUse::parse(v4, v6).unwrap();
        let may = |p, v6| u.may_have(p, v6);
        assert_eq!(
            [
                may(Protocol::Tcp, false),
                may(Protocol::Tcp, true),
                may(Protocol::Udp, false),
                may(Protocol::Udp, true)
            ],
            [false, true, true, false]
        );
        // Time-wait sockets of either family keep both TCP tables.
        let tw = InUse::parse(&v4.replace("tw 0", "tw 1"), v6).unwrap();
        assert!(tw.may_have(Protocol::Tcp, false));
        // Anything missing: every table is read.
        assert_eq!(InUse::parse(v4, "TCP6: inuse 3\n"), None);
        assert!(InUse::default().may_have(Protocol::Udp, true));
    }

    #[test]
    fn socket_links_are_recognised_exactly() {
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        assert_eq!(socket_inode(b"socket:[]"), None);
        assert_eq!(socket_inode(b"socket:[12a]"), None);
        assert_eq!(socket_inode(b"socket:[99999999999999999999]"), None);
        assert_eq!(socket_inode(b"pipe:[12345]"), None);
        assert_eq!(socket_inode(b"/dev/null"), None);
        assert_eq!(parse_pid(b"123"), Some(123));
        assert_eq!(parse_pid(b"self"), None);
        assert_eq!(parse_pid(b""), None);
    }

    #[test]
    fn random_and_mutated_lines_never_panic() {
        let valid = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0\n\
   1: 0000000000000000FFFF00000100000A:01BB 0000000000000000FFFF00000200000A:C738 01 00000000:00000000 00:00000000 00000000     0        0 1004 1\n";
        let mut rng = XorShift(0x0123_4567_89ab_cdef);
        for round in 0..20_000 {
            let bytes = if round % 2 == 0 {
                mutate(&mut rng, valid.as_bytes())
            } else {
                // Random text drawn from the characters of real lines.
                let alphabet = b"0123456789ABCDEFabcdef: \n-+x";
                (0..rng.below(300))
                    .map(|_| alphabet[rng.below(alphabet.len())])
                    .collect()
            };
            let text = String::from_utf8_lossy(&bytes);
            for v6 in [false, true] {
                let _ = parse_net_table(&text, Protocol::Tcp, v6);
                let _ = parse_net_table(&text, Protocol::Udp, v6);
            }
            let _ = socket_inode(&bytes);
        }
    }

    fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    fn temp_root(tag: &str) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("grapheon-procfs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("net")).unwrap();
        root
    }

    #[test]
    fn fifo_tables_and_comm_are_refused_without_waiting() {
        let root = temp_root("fifo");
        for (name, _, _) in TABLES {
            mkfifo(&root.join("net").join(name));
        }
        std::fs::create_dir_all(root.join("1")).unwrap();
        mkfifo(&root.join("1/comm"));
        let started = std::time::Instant::now();
        let err = sockets(&root).unwrap_err();
        let comm = read_comm(&root, 1);
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        let fifo = "not a regular file (it is a FIFO)";
        assert_eq!(
            (err.0, comm),
            (
                format!(
                    "cannot read {}/net/{{tcp,tcp6,udp,udp6}} (tcp: {fifo}; tcp6: {fifo}; udp: \
                     {fifo}; udp6: {fifo})",
                    root.display()
                ),
                None
            )
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_table_of_exactly_the_cap_is_read_and_one_byte_more_is_refused() {
        let root = temp_root("cap");
        let path = root.join("net/tcp");
        let line = "0: 0100007F:0016 00000000:0000 0A 0:0 0:0 0 0 0 77\n";
        std::fs::write(&path, line).unwrap();
        let cap = line.len() as u64;
        let (mut buf, mut out) = (Vec::new(), Vec::new());
        let read = read_table(&path, Protocol::Tcp, false, cap, &mut buf, &mut out);
        assert_eq!((read.map_err(|e| e.to_string()), out.len()), (Ok(()), 1));
        out.clear();
        let err = read_table(&path, Protocol::Tcp, false, cap - 1, &mut buf, &mut out);
        assert_eq!(
            err.map_err(|e| e.to_string()),
            Err(format!("larger than {} bytes", cap - 1))
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
