//! `/proc` text: `/proc/net/{tcp,tcp6,udp,udp6}` sockets and socket owners from `/proc/<pid>/fd`.
//!
//! Every path hangs off one `proc_root` (as `ss`'s `PROC_ROOT` and node_exporter's
//! `--path.procfs`), so tests point it at the checked-in tree under `tests/fixtures/proc`.
//! [`parse_net_line`] and [`parse_net_table`] are pure; the readers stream files line by line.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::collect::{Socket, SourceError};
use crate::model::{ip_from_bytes, ProcessName, Protocol};

/// The socket tables under `<proc_root>/net`, their protocol and whether they are IPv6.
const TABLES: [(&CStr, Protocol, bool); 4] = [
    (c"tcp", Protocol::Tcp, false),
    (c"tcp6", Protocol::Tcp, true),
    (c"udp", Protocol::Udp, false),
    (c"udp6", Protocol::Udp, true),
];
/// Real lines of the files read here are under 200 bytes; a longer one is skipped whole.
pub const MAX_LINE: usize = 4096;
/// The most of one socket table that is read.
const MAX_TABLE_BYTES: u64 = 256 << 20;
/// `socket:[18446744073709551615]` is 29 bytes; a longer link target is no socket.
const LINK_BUFFER: usize = 64;

/// TCP and UDP sockets of IPv4 and IPv6 from `<proc_root>/net/{tcp,tcp6,udp,udp6}`, without
/// owners. A missing table (no IPv6) is skipped; `Err` only when none of the four is readable.
/// `dual_stack` is always false: `/proc` does not say whether a socket is `IPV6_V6ONLY`.
pub fn sockets(proc_root: &Path) -> Result<Vec<Socket>, SourceError> {
    let net = proc_root.join("net");
    match open_dir(&net) {
        Ok(dir) => sockets_in(dir.as_fd(), || net.clone(), &mut ProcReader::default()),
        Err(err) => Err(SourceError(format!(
            "cannot read {}/{{tcp,tcp6,udp,udp6}} ({err})",
            net.display()
        ))),
    }
}

/// [`sockets`] of the open `net` directory `net`, read through `reader`; messages name it as
/// `shown()` (built only for one).
pub fn sockets_in(
    net: BorrowedFd<'_>,
    shown: impl Fn() -> PathBuf,
    reader: &mut ProcReader,
) -> Result<Vec<Socket>, SourceError> {
    let mut out = Vec::new();
    let mut readable = 0;
    let mut failures = Vec::new();
    let in_use = InUse::read(net, reader);
    // One allocation of the right size; the bound keeps a counts file that lies cheap.
    out.reserve(in_use.sockets().min(1 << 16));
    for (name, protocol, v6) in TABLES {
        if !in_use.may_have(protocol, v6) {
            // Listing a TCP table walks the kernel's whole hash of established sockets
            // (shared by every namespace: 2.6 ms for 262,144 buckets) to find none.
            readable += 1;
            continue;
        }
        let start = out.len();
        let read = crate::input::open_regular_at(net, name)
            .and_then(|file| read_table(file, protocol, v6, MAX_TABLE_BYTES, reader, &mut out));
        let name = name.to_string_lossy();
        match read {
            Ok(()) => readable += 1,
            Err(err) => {
                out.truncate(start);
                debug!("skipping {}/{name}: {err}", shown().display());
                failures.push(format!("{name}: {err}"));
            }
        }
    }
    if readable == 0 {
        return Err(SourceError(format!(
            "cannot read {}/{{tcp,tcp6,udp,udp6}} ({})",
            shown().display(),
            failures.join("; ")
        )));
    }
    Ok(out)
}

/// Opens the directory `path` to read files relative to it.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    open_dir_at(libc::AT_FDCWD, &path)
}

/// Opens the directory `path` relative to the open directory `dir_fd`.
pub fn open_dir_at(dir_fd: libc::c_int, path: &CStr) -> io::Result<OwnedFd> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // SAFETY: `path` is NUL-terminated; the result is checked.
    let fd = unsafe { libc::openat(dir_fd, path.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Streams one table of at most `cap` bytes into `out` through `reader`'s buffer, so that
/// 100,000 sockets cost no text copy.
fn read_table(
    file: File,
    protocol: Protocol,
    v6: bool,
    cap: u64,
    reader: &mut ProcReader,
    out: &mut Vec<Socket>,
) -> io::Result<()> {
    // A regular file only (a FIFO would block, /dev/zero never end), and bounded: a real table
    // of a million sockets is about 150 MB.
    reader.lines(file, cap, |line| {
        let Some(line) = line else {
            debug!("skipped a socket table line longer than {MAX_LINE} bytes");
            return;
        };
        // The kernel writes ASCII; anything else must at least be text, as it always had to.
        if !line.is_ascii() && std::str::from_utf8(line).is_err() {
            debug!("skipped a socket table line that is not text");
            return;
        }
        match parse_net_bytes(line, protocol, v6) {
            Some(socket) => out.push(socket),
            None if is_header(line) => {}
            None => debug!(
                "skipped malformed socket table line {:?}",
                String::from_utf8_lossy(line.trim_ascii())
            ),
        }
    })
}

/// The size of the one buffer a run reads `/proc` files through: the kernel answers a
/// `read` of a table with at most a page, and a file on disk (a fixture) takes fewer calls.
const READ_BUFFER: usize = 64 * 1024;

/// Reads `/proc` files through one buffer kept for a whole run. A buffer per file cost more
/// than the file did: under musl each 64 KiB one was mapped, zeroed page by page and
/// unmapped again, about 40 page faults and two system calls per namespace.
///
/// A socket table is read without the last, empty `read` ([`End::Short`]): each `read` of
/// one restarts the kernel's walk of its socket hash (UDP from its first bucket), and the
/// empty one that would only confirm the end costs as much as the table itself.
#[derive(Debug, Default)]
pub struct ProcReader {
    buf: Vec<u8>,
    /// `read` calls made, for the tests that count them.
    reads: usize,
}

/// An answer this much shorter than a page (4 KiB or more) cannot have been cut by a full
/// page when every record of the file is under 512 bytes.
const SHORT_READ: usize = 4096 - 512;

/// How a reader knows that a `/proc` file has ended. The kernel fills at most a page per
/// `read`, and stops before a record (what the file's `show` prints in one go) that does not
/// fit the rest of the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// A short answer is the end: every record is one line under 512 bytes (the socket
    /// tables, `if_inet6`), or the file is one record (`sockstat`, `cgroup`, `comm`).
    Short,
    /// Only an empty answer is the end: a record can be many lines and longer than what is
    /// left of a page, so an answer can be short with more to come (`fib_trie` prints a
    /// whole leaf, every route of a prefix, as one record).
    Empty,
}

impl ProcReader {
    fn buffer(&mut self) -> &mut Vec<u8> {
        if self.buf.is_empty() {
            self.buf = vec![0; READ_BUFFER];
        }
        &mut self.buf
    }

    /// One `read` of `file` into `buf[from..to]`: the bytes read and whether that was the
    /// end. Only a request of at least a page tells by a short answer, and only when `ends`
    /// says a short answer can tell.
    fn read_into(
        &mut self,
        file: &mut impl Read,
        from: usize,
        to: usize,
        ends: End,
    ) -> io::Result<(usize, bool)> {
        self.reads += 1;
        let buf = self.buffer();
        let n = loop {
            match file.read(&mut buf[from..to]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                read => break read?,
            }
        };
        let short = ends == End::Short && n < SHORT_READ && to - from >= 4096;
        Ok((n, n == 0 || short))
    }

    /// The first `limit` bytes of `file` (all of it when shorter); `limit` is at most the
    /// buffer's size. A small file takes one `read`.
    pub fn head(&mut self, mut file: impl Read, limit: usize) -> io::Result<&[u8]> {
        let limit = limit.min(READ_BUFFER);
        let mut filled = 0;
        while filled < limit {
            // Ask for the whole buffer: a request under a page could not tell the end.
            let (n, end) = self.read_into(&mut file, filled, READ_BUFFER, End::Short)?;
            filled += n;
            if end {
                break;
            }
        }
        Ok(&self.buf[..filled.min(limit)])
    }

    /// Streams `file` to `each` line by line, without the newline: `None` for a line longer
    /// than [`MAX_LINE`] (skipped whole, never held). More than `cap` bytes is an error
    /// (`InvalidData`); one byte past the cap tells a file of exactly `cap` bytes from a
    /// larger one. A file of one-line records: see [`End::Short`].
    pub fn lines(
        &mut self,
        file: impl Read,
        cap: u64,
        each: impl FnMut(Option<&[u8]>),
    ) -> io::Result<()> {
        self.lines_to(End::Short, file, cap, each)
    }

    /// [`ProcReader::lines`] of a file that has ended only when `ends` says so.
    pub fn lines_to(
        &mut self,
        ends: End,
        mut file: impl Read,
        cap: u64,
        mut each: impl FnMut(Option<&[u8]>),
    ) -> io::Result<()> {
        let (mut start, mut end) = (0, 0);
        let mut total = 0u64;
        let mut skipping = false;
        let mut done = false;
        loop {
            let buf = self.buffer();
            while let Some(i) = buf[start..end].iter().position(|b| *b == b'\n') {
                let line = &buf[start..start + i];
                if skipping {
                    skipping = false;
                } else {
                    each((line.len() <= MAX_LINE).then_some(line));
                }
                start += i + 1;
            }
            if end - start > MAX_LINE {
                if !skipping {
                    each(None);
                    skipping = true;
                }
                start = end;
            }
            if done {
                if end > start && !skipping {
                    each(Some(&buf[start..end]));
                }
                return Ok(());
            }
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
            let room = u64::try_from(READ_BUFFER - end).unwrap_or(u64::MAX);
            let want = usize::try_from(room.min(cap.saturating_add(1) - total)).unwrap_or(0);
            let (n, last) = self.read_into(&mut file, end, end + want, ends)?;
            total += n as u64;
            if total > cap {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("larger than {cap} bytes"),
                ));
            }
            end += n;
            done = last;
        }
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
    fn read(net: BorrowedFd<'_>, reader: &mut ProcReader) -> InUse {
        let mut text = |name: &CStr| {
            let file = crate::input::open_regular_at(net, name).ok()?;
            // A real one is a few hundred bytes: one past the bound says this is none.
            let bytes = reader.head(file, 4097).ok()?;
            (bytes.len() <= 4096)
                .then(|| std::str::from_utf8(bytes).ok().map(str::to_owned))
                .flatten()
        };
        match (text(c"sockstat"), text(c"sockstat6")) {
            (Some(v4), Some(v6)) => InUse::parse(&v4, &v6).unwrap_or_default(),
            _ => InUse::default(),
        }
    }

    /// The sockets the tables can list at most (when known): what to make room for.
    fn sockets(&self) -> usize {
        let all = [self.tcp, self.tcp6, self.time_wait, self.udp, self.udp6];
        let n = all.iter().fold(0u64, |sum, n| sum.saturating_add(*n));
        usize::try_from(n).unwrap_or(usize::MAX)
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

fn is_header(line: &[u8]) -> bool {
    line.trim_ascii_start().starts_with(b"sl ")
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
    parse_net_bytes(line.as_bytes(), protocol, v6)
}

/// [`parse_net_line`] of a line as read, text or not. The bytes are parsed as they are: a
/// table holds tens of thousands of lines, and splitting each as `str` cost more than the
/// rest of reading it.
fn parse_net_bytes(line: &[u8], protocol: Protocol, v6: bool) -> Option<Socket> {
    let mut fields = Fields(line);
    if !fields.next()?.ends_with(b":") {
        return None;
    }
    let (local_ip, local_port) = parse_endpoint(fields.next()?, v6)?;
    let (remote_ip, remote_port) = parse_endpoint(fields.next()?, v6)?;
    let state = u8::try_from(hex(fields.next()?)?).ok()?;
    // tx_queue:rx_queue, tr:tm->when, retrnsmt, uid, timeout, then the inode.
    let inode = fields.nth(5)?;
    if inode.is_empty() {
        return None;
    }
    let inode = inode.iter().try_fold(0u64, |n, d| {
        let digit = d.is_ascii_digit().then(|| u64::from(d - b'0'))?;
        n.checked_mul(10)?.checked_add(digit)
    })?;
    Some(Socket::from_kernel(
        protocol,
        (local_ip, local_port),
        (remote_ip, remote_port),
        state,
        inode,
        false,
    ))
}

/// The fields of a line split at ASCII whitespace, as `str::split_ascii_whitespace`.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = self.0.trim_ascii_start();
        if rest.is_empty() {
            self.0 = rest;
            return None;
        }
        let end = rest
            .iter()
            .position(u8::is_ascii_whitespace)
            .unwrap_or(rest.len());
        self.0 = &rest[end..];
        Some(&rest[..end])
    }
}

/// The value of non-empty ASCII hex digits; `None` for anything else or past `u64`.
fn hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        let digit = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return None,
        };
        n.checked_mul(16)?.checked_add(u64::from(digit))
    })
}

/// `0100007F:0016` or `<32 hex digits>:0016`, canonicalised (IPv4-mapped becomes IPv4).
fn parse_endpoint(text: &[u8], v6: bool) -> Option<(IpAddr, u16)> {
    let colon = text.iter().position(|b| *b == b':')?;
    let (addr, port) = (&text[..colon], &text[colon + 1..]);
    if port.len() > 4 {
        return None;
    }
    let port = u16::try_from(hex(port)?).ok()?;
    let word = |digits: &[u8]| u32::try_from(hex(digits)?).ok();
    let ip = if v6 {
        if addr.len() != 32 {
            return None;
        }
        let mut octets = [0u8; 16];
        for (chunk, digits) in octets.chunks_exact_mut(4).zip(addr.chunks_exact(8)) {
            chunk.copy_from_slice(&word(digits)?.to_ne_bytes());
        }
        ip_from_bytes(&octets)?
    } else {
        if addr.len() != 8 {
            return None;
        }
        IpAddr::V4(Ipv4Addr::from(word(addr)?.to_ne_bytes()))
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

    /// The name of `pid`, read already (a namespace's first process, read with its tables),
    /// so that the walk does not read it again when the process holds a wanted socket.
    pub fn know_name(&mut self, pid: u32, name: Option<String>) {
        self.names
            .entry(pid)
            .or_insert_with(|| name.map(ProcessName::from));
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
    mut visit: impl FnMut(BorrowedFd<'_>, u32, &mut Owners),
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
    let (mut root_buf, mut fd_buf) = (vec![0u8; LISTING_BUFFER], vec![0u8; LISTING_BUFFER]);
    let mut path = Vec::with_capacity(32);
    let mut link = [0u8; LINK_BUFFER];
    loop {
        let pid = {
            let Some(entry) = root.next_name(&mut root_buf) else {
                break;
            };
            let Some(pid) = parse_pid(entry.to_bytes()) else {
                continue;
            };
            path.clear();
            path.extend_from_slice(entry.to_bytes());
            path.extend_from_slice(b"/fd\0");
            pid
        };
        visit(root.fd.as_fd(), pid, owners);
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
        while let Some(entry) = fds.next_name(&mut fd_buf) {
            // SAFETY: `entry` is a NUL-terminated name inside `fd_buf`, `link` a live buffer
            // of the given length; readlinkat writes at most that many bytes.
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
fn read_comm_in(dir: &Path) -> Option<String> {
    let path = dir.join("comm");
    let mut bytes = Vec::with_capacity(32);
    // comm is at most 16 bytes; the bound keeps a strange file from costing memory.
    crate::input::open_regular(&path, crate::input::Links::Follow)
        .and_then(|f| f.take(256).read_to_end(&mut bytes))
        .map_err(|err| debug!("cannot read {}: {err}", path.display()))
        .ok()?;
    comm_name(&bytes)
}

/// `comm` of the open process directory `dir`, read through `reader`, trimmed; `Ok(None)`
/// when empty.
pub fn read_comm_at(dir: BorrowedFd<'_>, reader: &mut ProcReader) -> io::Result<Option<String>> {
    let file = crate::input::open_regular_at(dir, c"comm")?;
    Ok(comm_name(reader.head(file, 256)?))
}

fn comm_name(bytes: &[u8]) -> Option<String> {
    let name = String::from_utf8_lossy(bytes).trim().to_string();
    (!name.is_empty()).then_some(name)
}

/// A directory listed with `getdents64` into a buffer the caller keeps for the whole walk, so
/// listing `/proc/<pid>/fd` allocates nothing, per entry or per directory (`readdir` would
/// allocate its stream and add an `fstat` and two `fcntl` calls per directory).
struct Dir {
    fd: OwnedFd,
    /// The unread entries are `buf[at..len]` of the buffer passed to [`Dir::next_name`].
    at: usize,
    len: usize,
    done: bool,
}

/// Bytes of `getdents64` entries asked for per call: about 1,300 `/proc/<pid>/fd` entries.
const LISTING_BUFFER: usize = 32 * 1024;
/// `d_name` starts after `d_ino` (8), `d_off` (8), `d_reclen` (2) and `d_type` (1).
const DIRENT_NAME: usize = 19;

impl Dir {
    fn open(path: &Path) -> io::Result<Dir> {
        let path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        Dir::open_at(libc::AT_FDCWD, &path)
    }

    /// Opens `path` relative to the directory `dir_fd`.
    fn open_at(dir_fd: libc::c_int, path: &CStr) -> io::Result<Dir> {
        Ok(Dir {
            fd: open_dir_at(dir_fd, path)?,
            at: 0,
            len: 0,
            done: false,
        })
    }

    /// The descriptor of the directory, for `*at` calls relative to it.
    fn fd(&self) -> libc::c_int {
        self.fd.as_raw_fd()
    }

    /// The next entry name other than `.` and `..`, listed into `buf` (the same buffer at
    /// every call on one directory); `None` at the end or on an error (a process that
    /// exited mid-listing), which both end the listing.
    fn next_name<'b>(&mut self, buf: &'b mut [u8]) -> Option<&'b CStr> {
        let name = loop {
            if self.at >= self.len {
                if self.done {
                    return None;
                }
                // SAFETY: getdents64 writes at most `buf.len()` bytes of entries into `buf`.
                let n = unsafe {
                    libc::syscall(
                        libc::SYS_getdents64,
                        self.fd.as_raw_fd(),
                        buf.as_mut_ptr(),
                        buf.len(),
                    )
                };
                match usize::try_from(n) {
                    Ok(n) if n > 0 => (self.at, self.len) = (0, n.min(buf.len())),
                    _ => {
                        self.done = true;
                        return None;
                    }
                }
            }
            let entry = &buf[self.at..self.len];
            let reclen = entry
                .get(16..18)
                .map_or(0, |b| usize::from(u16::from_ne_bytes([b[0], b[1]])));
            if reclen <= DIRENT_NAME || reclen > entry.len() {
                // Not what the kernel writes: end the listing rather than guess.
                self.done = true;
                self.len = 0;
                return None;
            }
            let start = self.at + DIRENT_NAME;
            self.at += reclen;
            let Some(nul) = entry[DIRENT_NAME..reclen].iter().position(|b| *b == 0) else {
                continue;
            };
            let name = &entry[DIRENT_NAME..DIRENT_NAME + nul];
            if name != b"." && name != b".." {
                break start..start + nul + 1;
            }
        };
        CStr::from_bytes_with_nul(&buf[name]).ok()
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

    #[cfg(target_endian = "little")]
    #[test]
    fn a_name_read_with_its_namespace_is_not_read_again_by_the_walk() {
        // Discovery read pid 100's comm with its namespace's tables ("sshd" on disk): the
        // walk that finds 100 holding sockets uses that name instead of reading comm again.
        let root = fixture();
        let mut sockets = sockets(&root).unwrap();
        let mut owners = Owners::new(&sockets, false);
        owners.know_name(100, Some("read-before".to_string()));
        walk(&root, &mut owners, |_, _, _| {});
        owners.attach(&mut sockets);
        let all = fixture_sockets();
        assert_eq!(
            sockets,
            vec![
                owned(all[0].clone(), 100, "read-before"),
                all[1].clone(),
                all[2].clone(),
                owned(all[3].clone(), 100, "read-before"),
                owned(all[4].clone(), 200, "nginx"),
                all[5].clone(),
                owned(all[6].clone(), 99, "dhclient"),
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
            mkfifo(&root.join("net").join(name.to_str().unwrap()));
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
        let (mut reader, mut out) = (ProcReader::default(), Vec::new());
        let open = || File::open(&path).unwrap();
        let read = read_table(open(), Protocol::Tcp, false, cap, &mut reader, &mut out);
        assert_eq!((read.map_err(|e| e.to_string()), out.len()), (Ok(()), 1));
        out.clear();
        let err = read_table(open(), Protocol::Tcp, false, cap - 1, &mut reader, &mut out);
        assert_eq!(
            err.map_err(|e| e.to_string()),
            Err(format!("larger than {} bytes", cap - 1))
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A file answered as the kernel answers a `/proc` table: whole lines, at most a page
    /// per `read`, counting the calls.
    struct Pages {
        text: Vec<u8>,
        at: usize,
        calls: usize,
    }

    impl Read for Pages {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.calls += 1;
            let rest = &self.text[self.at..];
            let mut n = rest.len().min(buf.len()).min(4096);
            if n < rest.len() {
                n = rest[..n]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(n, |i| i + 1);
            }
            buf[..n].copy_from_slice(&rest[..n]);
            self.at += n;
            Ok(n)
        }
    }

    fn pages(text: &str) -> Pages {
        Pages {
            text: text.as_bytes().to_vec(),
            at: 0,
            calls: 0,
        }
    }

    #[test]
    fn proc_files_are_read_without_the_empty_read_that_confirms_their_end() {
        let line = "  12: 0200CC0A:1B58 0200CC0A:9430 01 00000000:00000000 00:00000000 00000000     0        0 10852300 1 0000000000000000 20 4 30 10 -1\n";
        let mut reader = ProcReader::default();
        let mut calls_and_lines = |text: String| {
            let mut source = pages(&text);
            let mut lines = 0;
            reader
                .lines(&mut source, MAX_TABLE_BYTES, |l| {
                    assert_eq!(l.map(|l| l.len()), Some(line.len() - 1));
                    lines += 1;
                })
                .unwrap();
            (source.calls, lines)
        };
        // 49 sockets, as in a container: a full page, then a short one that is the end.
        assert_eq!(calls_and_lines(line.repeat(49)), (2, 49));
        // Exactly full pages cannot tell the end: one more read answers nothing.
        let per_page = 4096 / line.len();
        assert_eq!(
            calls_and_lines(line.repeat(per_page * 2)),
            (3, per_page * 2)
        );
        // A short file (sockstat, comm, cgroup) takes one read.
        let mut sockstat =
            pages("TCP: inuse 49 orphan 0 tw 0 alloc 99 mem 37\nUDP: inuse 1 mem 0\n");
        let head = reader.head(&mut sockstat, 4097).unwrap().to_vec();
        assert_eq!((sockstat.calls, head), (1, sockstat.text.clone()));
    }

    /// Answers `read` with the given sizes in turn (the kernel stopping before records that do
    /// not fit a page), then with the rest.
    struct Chunks {
        text: Vec<u8>,
        sizes: Vec<usize>,
        at: usize,
    }

    impl Read for Chunks {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let size = if self.sizes.is_empty() {
                usize::MAX
            } else {
                self.sizes.remove(0)
            };
            let n = size.min(buf.len()).min(self.text.len() - self.at);
            buf[..n].copy_from_slice(&self.text[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn a_file_of_records_of_many_lines_is_read_to_its_empty_read() {
        // fib_trie as the kernel gave it with 20 routes of one prefix: answers of 3,526,
        // 4,071 and 1,426 bytes, then the empty one (the first answer is short because the
        // next leaf, one record of many lines, did not fit the rest of the page).
        let text: String = (0..600)
            .map(|i| format!("   |-- 10.{}.{}.0\n", i / 200, i % 200))
            .collect();
        let sizes = vec![3526, 4071, 1426, text.len() - 3526 - 4071 - 1426, 0];
        let read = |ends: End| {
            let mut source = Chunks {
                text: text.clone().into_bytes(),
                sizes: sizes.clone(),
                at: 0,
            };
            let mut got = String::new();
            ProcReader::default()
                .lines_to(ends, &mut source, u64::MAX, |l| {
                    got.push_str(std::str::from_utf8(l.unwrap()).unwrap());
                    got.push('\n');
                })
                .unwrap();
            got
        };
        assert_eq!(read(End::Empty), text);
        // Read as a socket table, the first short answer would have been the end.
        let cut = read(End::Short);
        assert!(
            cut.len() <= 3527 && text.starts_with(&cut[..cut.len() - 20]),
            "{cut}"
        );
    }

    #[test]
    fn a_line_longer_than_the_limit_is_skipped_whole() {
        let text = format!("first\n{}\nlast", "x".repeat(3 * MAX_LINE));
        let mut got = Vec::new();
        ProcReader::default()
            .lines(text.as_bytes(), u64::MAX - 1, |l| {
                got.push(l.map(|l| String::from_utf8_lossy(l).into_owned()))
            })
            .unwrap();
        assert_eq!(
            got,
            [Some("first".to_string()), None, Some("last".to_string())]
        );
    }

    #[test]
    fn a_directory_larger_than_one_listing_buffer_is_listed_whole() {
        let root = temp_root("listing");
        let dir = root.join("fd");
        std::fs::create_dir_all(&dir).unwrap();
        // About 2,000 entries of 32 bytes: two buffers' worth and a part.
        let mut want: Vec<String> = (0..2_000).map(|i| format!("{i}")).collect();
        for name in &want {
            std::os::unix::fs::symlink(format!("socket:[{name}]"), dir.join(name)).unwrap();
        }
        let mut listing = Dir::open(&dir).unwrap();
        let mut buf = vec![0u8; LISTING_BUFFER];
        let mut got = Vec::new();
        while let Some(name) = listing.next_name(&mut buf) {
            got.push(name.to_str().unwrap().to_string());
        }
        got.sort();
        want.sort();
        assert_eq!(got, want);
        std::fs::remove_dir_all(&root).unwrap();
    }

    // The str-based parser the byte parser replaced, kept to prove they agree.
    fn reference_line(line: &str, protocol: Protocol, v6: bool) -> Option<Socket> {
        let mut fields = line.split_ascii_whitespace();
        if !fields.next()?.ends_with(':') {
            return None;
        }
        let (local_ip, local_port) = reference_endpoint(fields.next()?, v6)?;
        let (remote_ip, remote_port) = reference_endpoint(fields.next()?, v6)?;
        let state = u8::from_str_radix(reference_hex(fields.next()?)?, 16).ok()?;
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
    fn reference_hex(text: &str) -> Option<&str> {
        (!text.is_empty() && text.bytes().all(|b| b.is_ascii_hexdigit())).then_some(text)
    }

    /// `0100007F:0016` or `<32 hex digits>:0016`, canonicalised (IPv4-mapped becomes IPv4).
    fn reference_endpoint(text: &str, v6: bool) -> Option<(IpAddr, u16)> {
        let (addr, port) = text.split_once(':')?;
        if port.len() > 4 {
            return None;
        }
        let port = u16::from_str_radix(reference_hex(port)?, 16).ok()?;
        let addr = reference_hex(addr)?;
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

    #[test]
    fn lines_parse_as_the_str_parser_parsed_them() {
        let valid = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0\n\
   1: 0000000000000000FFFF00000100000A:01BB 0000000000000000FFFF00000200000A:C738 01 00000000:00000000 00:00000000 00000000     0        0 1004 1\n";
        let mut rng = XorShift(0x007a_b1e5_eed5);
        let mut parsed = 0;
        for _ in 0..20_000 {
            let bytes = mutate(&mut rng, valid.as_bytes());
            let text = String::from_utf8_lossy(&bytes);
            for line in text.lines() {
                for (protocol, v6) in [(Protocol::Tcp, false), (Protocol::Udp, true)] {
                    let want = reference_line(line, protocol, v6);
                    parsed += usize::from(want.is_some());
                    assert_eq!(parse_net_line(line, protocol, v6), want, "{line:?}");
                }
            }
        }
        // The mutations leave many lines whole: the comparison covers sockets, not only junk.
        assert!(parsed > 1_000, "{parsed}");
    }
}
