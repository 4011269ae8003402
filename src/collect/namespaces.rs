//! Sockets of the network namespaces other than the agent's own (containers, pods, services
//! with a private network), read without entering them.
//!
//! Each namespace is found as the `net:[inode]` link of `/proc/<pid>/ns/net` during the one
//! `/proc` walk that also finds socket owners ([`procfs::walk`]); its first process (lowest
//! pid) represents it. Through that process the kernel shows the namespace's own tables:
//! `/proc/<pid>/net/{tcp,tcp6,udp,udp6}` (the `/proc/net` parser), `/proc/<pid>/net/if_inet6`
//! and `/proc/<pid>/net/fib_trie` (IPv4 `LOCAL` entries) for its addresses, all read relative
//! to one open `/proc/<pid>` and its `net` so that a reused pid cannot slip in. Nothing calls
//! `setns`, so this works under `RestrictNamespaces=yes` with `CAP_SYS_PTRACE` (to read other
//! users' `ns/net` links) and `CAP_DAC_READ_SEARCH`. `/proc/<pid>/cgroup` says whose it is
//! ([`cgroup`]).

use std::collections::HashMap;
use std::ffi::CStr;
use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use crate::collect::cgroup::{self, Attribution};
use crate::collect::procfs::{self, FastHash, Owners, ProcReader, MAX_LINE};
use crate::collect::{expand_into, Socket};
use crate::json::Object;
use crate::model::{ip_from_bytes, Connection, Protocol};

/// Whose sockets a run reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The agent's own namespace and every other one it can see.
    All,
    /// The agent's own namespace only (the report of earlier versions).
    Own,
}

impl Scope {
    /// The name used in flags and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::All => "all",
            Scope::Own => "own",
        }
    }
}

/// Most namespaces collected in one run. At 0.5 ms and a few dozen records each this bounds
/// a run's cost on hosts with thousands of them; the rest are counted and warned about.
pub const MAX_NAMESPACES: usize = 1000;
/// Processes whose cgroup is read to attribute a namespace whose first process had none, and
/// whose tables are tried when the first could not be read.
const ATTRIBUTION_TRIES: u8 = 4;
/// Addresses listed per namespace in the metadata.
const LISTED_ADDRESSES: usize = 16;
/// The most of `if_inet6` read: about 19,000 addresses.
const MAX_IF_INET6_BYTES: u64 = 1 << 20;
/// The most of a `cgroup` file read; a real one is a few hundred bytes.
const MAX_CGROUP_BYTES: usize = 64 * 1024;
/// `net:[18446744073709551615]` is 26 bytes.
const LINK_BUFFER: usize = 64;

/// One other namespace as collected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// The inode of the namespace (`net:[inode]`), stable while it exists.
    pub inode: u64,
    /// Its first process.
    pub pid: u32,
    pub process_name: Option<String>,
    pub attribution: Attribution,
    /// Its local addresses, loopback left out, sorted.
    pub addresses: Vec<IpAddr>,
    /// Its sockets, owners attached after the walk.
    pub sockets: Vec<Socket>,
    tries: u8,
}

/// What the walk found besides the agent's own namespace.
#[derive(Debug, Default)]
pub struct Discovery {
    own: u64,
    cap: usize,
    pub found: Vec<Namespace>,
    /// Namespace inode → index in `found`, or `None` for one over the cap.
    seen: HashMap<u64, Option<usize>, FastHash>,
    /// Processes whose `ns/net` link could not be read (permissions, exited).
    pub unreadable: usize,
    /// Namespaces given up on after [`ATTRIBUTION_TRIES`] failed reads.
    failed: usize,
    /// Failed reads of a namespace not collected yet.
    attempts: HashMap<u64, u8, FastHash>,
    /// The buffer every file of the other namespaces is read through.
    reader: ProcReader,
}

/// What one other namespace contributed to the report, for `metadata.namespaces`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub inode: u64,
    pub pid: u32,
    pub process_name: Option<String>,
    pub attribution: Attribution,
    pub addresses: Vec<IpAddr>,
    /// Sockets read from its tables.
    pub sockets: usize,
    /// Connection records it adds to the report (wildcards expanded).
    pub connections: usize,
    /// Sockets left out because both ends are its own loopback.
    pub loopback_left_out: usize,
}

/// The other namespaces of one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespaces {
    pub list: Vec<Summary>,
    /// Namespaces seen but not collected because of the cap ([`MAX_NAMESPACES`]).
    pub over_cap: usize,
}

/// Owners for `sockets` (the agent's own namespace) and, when `own` names the agent's
/// namespace, the other namespaces (at most `cap`, the first found) with their sockets and
/// owners: one walk over `<proc_root>/<pid>`.
pub fn walk(
    proc_root: &Path,
    mut sockets: Vec<Socket>,
    own: Option<u64>,
    cap: usize,
) -> (Vec<Socket>, Option<Discovery>) {
    let mut owners = Owners::new(&sockets, own.is_some());
    let mut discovery = own.map(|own| Discovery::new(own, cap));
    procfs::walk(proc_root, &mut owners, |root_fd, pid, owners| {
        if let Some(d) = &mut discovery {
            d.visit(proc_root, root_fd, pid, owners);
        }
    });
    owners.attach(&mut sockets);
    if let Some(d) = &mut discovery {
        for ns in &mut d.found {
            owners.attach(&mut ns.sockets);
        }
        // Report order does not depend on the order the directory was listed in.
        d.found.sort_by_key(|ns| ns.pid);
    }
    (sockets, discovery)
}

/// The inode of the agent's own network namespace: from the proc root when it shows this
/// process (`self`), else from the mounted `/proc`.
pub fn own_inode(proc_root: &Path) -> Option<u64> {
    [
        proc_root.join("self/ns/net"),
        Path::new("/proc/self/ns/net").into(),
    ]
    .iter()
    .find_map(|p| std::fs::read_link(p).ok())
    .and_then(|target| namespace_inode(target.as_os_str().as_encoded_bytes()))
}

/// The inode of a `net:[N]` link target.
pub fn namespace_inode(target: &[u8]) -> Option<u64> {
    let digits = target.strip_prefix(b"net:[")?.strip_suffix(b"]")?;
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

impl Discovery {
    /// Discovery relative to the agent's own namespace `own`, collecting at most `cap`.
    pub fn new(own: u64, cap: usize) -> Discovery {
        Discovery {
            own,
            cap,
            ..Discovery::default()
        }
    }

    /// Called by the walk for each process before its descriptors are scanned: a namespace
    /// seen for the first time is read now, while its process surely exists, and its sockets
    /// become wanted owners.
    pub fn visit(&mut self, proc_root: &Path, root: BorrowedFd<'_>, pid: u32, owners: &mut Owners) {
        let root_fd = root.as_raw_fd();
        let Some(inode) = read_namespace(root_fd, pid) else {
            self.unreadable += 1;
            return;
        };
        if inode == self.own {
            return;
        }
        match self.seen.get(&inode) {
            Some(Some(i)) => {
                let ns = &mut self.found[*i];
                // /proc lists pids in order; another root (a copy, a fixture) may not: the
                // lowest pid represents the namespace either way.
                if pid < ns.pid {
                    ns.pid = pid;
                    ns.process_name = procfs::read_comm(proc_root, pid);
                    let lower = read_attribution(proc_root, root, pid, &mut self.reader);
                    if lower.runtime.is_some() || lower.pod_uid.is_some() {
                        ns.attribution = lower;
                    }
                }
                // The first process had no telling cgroup (a helper joined first): ask a few more.
                if ns.attribution.runtime.is_none() && ns.tries < ATTRIBUTION_TRIES {
                    ns.tries += 1;
                    let other = read_attribution(proc_root, root, pid, &mut self.reader);
                    if other.runtime.is_some() || other.pod_uid.is_some() {
                        ns.attribution = other;
                    }
                }
                return;
            }
            Some(None) => return,
            None => {}
        }
        if self.found.len() >= self.cap {
            owners.no_more_wanted();
            self.seen.insert(inode, None);
            return;
        }
        let read = ProcessDir::open(root_fd, pid, inode)
            .and_then(|dir| dir.read(proc_root, inode, pid, &mut self.reader));
        let ns = match read {
            Ok(ns) => ns,
            Err(e) => {
                // The process may have exited while being read: the namespace's next
                // processes get a few more chances.
                debug!("network namespace {inode} of pid {pid}: {e}");
                let tries = self.attempts.entry(inode).or_insert(0);
                *tries += 1;
                if *tries >= ATTRIBUTION_TRIES {
                    self.failed += 1;
                    self.seen.insert(inode, None);
                }
                return;
            }
        };
        owners.want(&ns.sockets);
        // Read with its tables, through the directory that cannot be another process's.
        owners.know_name(pid, ns.process_name.clone());
        self.seen.insert(inode, Some(self.found.len()));
        self.found.push(ns);
        if self.found.len() >= self.cap {
            // No namespace found from now on can add sockets: descriptors that match none
            // need not be kept for later.
            owners.no_more_wanted();
        }
    }

    /// Namespaces seen but not collected because of the cap.
    pub fn over_cap(&self) -> usize {
        self.seen.values().filter(|v| v.is_none()).count() - self.failed
    }

    /// Namespaces whose tables could not be read, whether or not their last chance came.
    pub fn failed(&self) -> usize {
        self.attempts
            .keys()
            .filter(|inode| !matches!(self.seen.get(inode), Some(Some(_))))
            .count()
    }
}

/// `readlinkat(<root>/<pid>/ns/net)`, relative to the open proc root.
fn read_namespace(root_fd: libc::c_int, pid: u32) -> Option<u64> {
    namespace_at(root_fd, &format!("{pid}/ns/net\0"))
}

/// The namespace inode of the link `path` (NUL-terminated) relative to `dir_fd`.
fn namespace_at(dir_fd: libc::c_int, path: &str) -> Option<u64> {
    let path = CStr::from_bytes_with_nul(path.as_bytes()).ok()?;
    let mut link = [0u8; LINK_BUFFER];
    // SAFETY: `path` is NUL-terminated, `link` a live buffer of the given length.
    let len =
        unsafe { libc::readlinkat(dir_fd, path.as_ptr(), link.as_mut_ptr().cast(), link.len()) };
    let len = usize::try_from(len).ok()?;
    namespace_inode(link.get(..len)?)
}

/// One process's `/proc/<pid>` and its `net`, held open while its namespace is read. Paths by
/// pid would read whichever process has the pid by then: when the first one exits and the
/// pid is reused by a host process, the host's sockets would be reported as the namespace's.
/// An open `/proc/<pid>` keeps showing the process it was opened for (and nothing once that
/// one is gone), so everything is read relative to it. Its `net` shows the namespace the
/// process is in at each open, not the one it was in when `net` was opened: a process that
/// moves (`setns`, `unshare`) while being read would show another namespace's files, so the
/// namespace is checked again after the reads.
struct ProcessDir {
    dir: OwnedFd,
    net: OwnedFd,
}

impl ProcessDir {
    /// Opens `<root>/<pid>` and its `net` and checks that the process is still in namespace
    /// `inode`.
    fn open(root_fd: libc::c_int, pid: u32, inode: u64) -> Result<ProcessDir, String> {
        let name = format!("{pid}\0");
        let name = CStr::from_bytes_with_nul(name.as_bytes()).map_err(|e| e.to_string())?;
        let dir = procfs::open_dir_at(root_fd, name)
            .map_err(|e| format!("cannot open its /proc directory: {e}"))?;
        let net = procfs::open_dir_at(dir.as_raw_fd(), c"net")
            .map_err(|e| format!("cannot open its /proc net directory: {e}"))?;
        // Checked here and again after the reads ([`ProcessDir::read`]).
        match namespace_at(dir.as_raw_fd(), "ns/net\0") {
            Some(now) if now == inode => Ok(ProcessDir { dir, net }),
            _ => Err("the process exited or left the namespace while being read".into()),
        }
    }

    /// The namespace as seen through this process: its tables, addresses, name and owner;
    /// `proc_root` and `pid` only name the files in messages.
    fn read(
        &self,
        proc_root: &Path,
        inode: u64,
        pid: u32,
        reader: &mut ProcReader,
    ) -> Result<Namespace, String> {
        let shown = || proc_root.join(pid.to_string());
        let net = self.net.as_fd();
        let sockets =
            procfs::sockets_in(net, || shown().join("net"), reader).map_err(|e| e.to_string())?;
        let mut addresses = read_if_inet6(net, reader)
            .map_err(|e| debug!("cannot read {}/net/if_inet6: {e}", shown().display()))
            .unwrap_or_default();
        match read_fib_trie(net, reader) {
            Ok(v4) => addresses.extend(v4),
            Err(e) => debug!("cannot read {}/net/fib_trie: {e}", shown().display()),
        }
        addresses.sort();
        addresses.dedup();
        let process_name = procfs::read_comm_at(self.dir.as_fd(), reader)
            .map_err(|e| debug!("cannot read {}/comm: {e}", shown().display()))
            .ok()
            .flatten();
        let attribution = attribution_at(self.dir.as_fd(), c"cgroup", reader)
            .map_err(|e| debug!("cannot read {}/cgroup: {e}", shown().display()))
            .unwrap_or_default();
        // Still in the namespace after the reads: what they showed was its own (a process
        // that left and came back in between is not told apart, and reads the same tables).
        if namespace_at(self.dir.as_raw_fd(), "ns/net\0") != Some(inode) {
            return Err("the process exited or left the namespace while being read".into());
        }
        Ok(Namespace {
            inode,
            pid,
            process_name,
            attribution,
            addresses,
            sockets,
            tries: 0,
        })
    }
}

/// The attribution of process `pid` from `<root>/<pid>/cgroup`; none when unreadable.
fn read_attribution(
    proc_root: &Path,
    root: BorrowedFd<'_>,
    pid: u32,
    reader: &mut ProcReader,
) -> Attribution {
    let name = format!("{pid}/cgroup\0");
    let Ok(name) = CStr::from_bytes_with_nul(name.as_bytes()) else {
        return Attribution::default();
    };
    attribution_at(root, name, reader)
        .map_err(|e| debug!("cannot read {}/{pid}/cgroup: {e}", proc_root.display()))
        .unwrap_or_default()
}

/// The attribution from the cgroup file `name` relative to the directory `dir`.
fn attribution_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    reader: &mut ProcReader,
) -> std::io::Result<Attribution> {
    let file = crate::input::open_regular_at(dir, name)?;
    // The bound keeps a strange file cheap.
    let text = std::str::from_utf8(reader.head(file, MAX_CGROUP_BYTES)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(cgroup::attribute(text))
}

/// The IPv6 addresses of `/proc/<pid>/net/if_inet6` (`<32 hex> <ifindex> <prefix> <scope>
/// <flags> <name>`), without those of `lo` and loopback.
pub fn parse_if_inet6(text: &str) -> Vec<IpAddr> {
    text.lines().filter_map(if_inet6_address).collect()
}

/// The address of one `if_inet6` line, unless it is `lo`'s, loopback or malformed.
fn if_inet6_address(line: &str) -> Option<IpAddr> {
    let mut fields = line.split_ascii_whitespace();
    let hex = fields.next()?;
    let name = fields.nth(4)?;
    if fields.next().is_some() || hex.len() != 32 || name == "lo" {
        return None;
    }
    let mut octets = [0u8; 16];
    for (i, octet) in octets.iter_mut().enumerate() {
        *octet = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    ip_from_bytes(&octets).filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

/// The addresses of `net/if_inet6` in the open `net` directory; those in its first
/// [`MAX_IF_INET6_BYTES`] when it is larger.
fn read_if_inet6(net: BorrowedFd<'_>, reader: &mut ProcReader) -> std::io::Result<Vec<IpAddr>> {
    let file = crate::input::open_regular_at(net, c"if_inet6")?;
    let mut out = Vec::new();
    let read = reader.lines(file, MAX_IF_INET6_BYTES, |line| {
        if let Some(ip) = line
            .and_then(|l| std::str::from_utf8(l).ok())
            .and_then(if_inet6_address)
        {
            out.push(ip);
        }
    });
    match read {
        // No IPv6 in that namespace (disabled) is ordinary; a huge file keeps what was read.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            debug!("if_inet6: {e}; the addresses before are kept");
            Ok(out)
        }
        Err(e) => Err(e),
        Ok(()) => Ok(out),
    }
}

/// The IPv4 addresses of a `fib_trie` listing: each leaf `|-- <ip>` followed by a
/// `/32 host LOCAL` entry is an address of the namespace (loopback left out).
#[derive(Debug, Default)]
struct LocalEntries {
    leaf: Option<Ipv4Addr>,
    found: Vec<IpAddr>,
}

impl LocalEntries {
    /// One line of the listing; `None` for a line no kernel writes (too long), which ends
    /// the leaf it was in.
    fn line(&mut self, line: Option<&[u8]>) {
        let Some(line) = line.and_then(|l| std::str::from_utf8(l).ok()) else {
            self.leaf = None;
            return;
        };
        let line = line.trim();
        if let Some(ip) = line.strip_prefix("|-- ") {
            self.leaf = ip.parse().ok();
        } else if line.starts_with('/') {
            let mut fields = line.split_ascii_whitespace();
            let local = fields.next() == Some("/32") && fields.nth(1).is_some_and(|t| t == "LOCAL");
            if let Some(ip) = self
                .leaf
                .filter(|ip| local && !ip.is_loopback() && !ip.is_unspecified())
            {
                self.found.push(IpAddr::V4(ip));
            }
        } else {
            self.leaf = None;
        }
    }

    fn addresses(mut self) -> Vec<IpAddr> {
        self.found.sort();
        self.found.dedup();
        self.found
    }
}

/// The `LOCAL` addresses of a whole `fib_trie` text.
pub fn parse_fib_trie(text: &[u8]) -> Vec<IpAddr> {
    let mut entries = LocalEntries::default();
    for line in text.split(|b| *b == b'\n') {
        entries.line((line.len() <= MAX_LINE).then_some(line));
    }
    entries.addresses()
}

/// The `LOCAL` addresses of `fib_trie` in the open `net` directory. The file is read whole
/// however large: with policy routing the `Local` table, which holds the addresses, comes
/// after a router's full `Main` table.
fn read_fib_trie(net: BorrowedFd<'_>, reader: &mut ProcReader) -> std::io::Result<Vec<IpAddr>> {
    let file = crate::input::open_regular_at(net, c"fib_trie")?;
    let mut entries = LocalEntries::default();
    reader.lines_to(procfs::End::Empty, file, u64::MAX - 1, |line| {
        entries.line(line)
    })?;
    Ok(entries.addresses())
}

/// True for a socket only its own namespace can use: local loopback, and a remote that is
/// loopback too or none at all (a listener, an unconnected socket). Every container has its
/// own 127.0.0.1; on the server these would all be one host and map nothing.
fn loopback_only(c: &Connection) -> bool {
    c.local_ip.is_loopback()
        && c.remote_ip
            .is_none_or(|r| r.is_loopback() || r.is_unspecified())
}

/// The connection records of one other namespace and what it contributed: loopback-only
/// sockets left out, wildcard listeners expanded over the namespace's own addresses.
///
/// `/proc` does not say whether a `::` socket is `IPV6_V6ONLY`. It is taken as dual-stack
/// (the kernel's default, `bindv6only=0`) unless the namespace also has a `0.0.0.0` socket of
/// the same protocol and port, which could not have been bound next to a dual-stack one.
pub fn report(ns: Namespace) -> (Vec<Connection>, Summary, usize) {
    let mut connections = Vec::new();
    let (summary, unexpanded) = report_into(ns, &mut connections);
    (connections, summary, unexpanded)
}

/// [`report`] appending the records to `out`, which a run shares between its namespaces:
/// a list per namespace, freed right after, cost a page mapped and unmapped each.
pub fn report_into(ns: Namespace, out: &mut Vec<Connection>) -> (Summary, usize) {
    let mut v4_wildcards: Vec<(Protocol, u16)> = ns
        .sockets
        .iter()
        .filter(|s| s.connection.local_ip == IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        .map(|s| (s.connection.protocol, s.connection.local_port))
        .collect();
    v4_wildcards.sort_unstable();
    v4_wildcards.dedup();
    let total = ns.sockets.len();
    let mut loopback = 0;
    let sockets: Vec<Socket> = ns
        .sockets
        .into_iter()
        .filter(|s| {
            let keep = !loopback_only(&s.connection);
            loopback += usize::from(!keep);
            keep
        })
        .map(|mut s| {
            let c = &s.connection;
            if c.local_ip.is_ipv6() && c.local_ip.is_unspecified() {
                s.dual_stack = v4_wildcards
                    .binary_search(&(c.protocol, c.local_port))
                    .is_err();
            }
            s
        })
        .collect();
    let before = out.len();
    let unexpanded = expand_into(sockets, &ns.addresses, out);
    let summary = Summary {
        inode: ns.inode,
        pid: ns.pid,
        process_name: ns.process_name,
        attribution: ns.attribution,
        addresses: ns.addresses,
        sockets: total,
        connections: out.len() - before,
        loopback_left_out: loopback,
    };
    (summary, unexpanded)
}

impl Namespaces {
    /// True when the run saw no other namespace: the report is then exactly that of a
    /// single-namespace host.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty() && self.over_cap == 0
    }

    /// `metadata.namespaces` for parts of `part_bytes`: at most an eighth of a part, so the
    /// records keep the room. Called again whenever the part size shrinks within a run (a 413,
    /// the raw limit, a slower server), or the metadata would outgrow the smaller parts.
    pub fn metadata_for_part(&self, part_bytes: usize) -> String {
        self.metadata(part_bytes / 8)
    }

    /// `metadata.namespaces` as JSON, at most about `limit` bytes: the counts, then as many
    /// namespaces as fit (in pid order). Empty when there is nothing to say.
    pub fn metadata(&self, limit: usize) -> String {
        if self.is_empty() {
            return String::new();
        }
        let mut items = String::from("[");
        let mut listed = 0;
        // Room for the counts around the list.
        let room = limit.saturating_sub(128);
        for s in &self.list {
            // Written in place and taken back when too large: a string per entry, freed
            // right after, cost a page mapped and unmapped each.
            let before = items.len();
            let comma = usize::from(listed > 0);
            if comma > 0 {
                items.push(',');
            }
            summary_json(s, &mut items);
            // Room for the entry, a comma and the closing bracket, as if it stood alone. One
            // large entry (a long container name) must not hide the smaller ones after it.
            if items.len() - comma + 2 > room {
                items.truncate(before);
                continue;
            }
            listed += 1;
        }
        items.push(']');
        let mut out = String::new();
        let mut o = Object::new(&mut out);
        o.num("collected", self.list.len())
            .num("over_cap", self.over_cap)
            .num("listed", listed)
            .raw("list", &items);
        o.end();
        out
    }
}

/// Appends the JSON of `s` to `out`.
fn summary_json(s: &Summary, out: &mut String) {
    let mut addresses = String::from("[");
    for (i, ip) in s.addresses.iter().take(LISTED_ADDRESSES).enumerate() {
        if i > 0 {
            addresses.push(',');
        }
        // An address is digits, dots, colons and hex letters: nothing to escape.
        let _ = write!(addresses, "\"{ip}\"");
    }
    addresses.push(']');
    let a = &s.attribution;
    let mut o = Object::new(out);
    o.num("inode", s.inode)
        .num("pid", s.pid)
        .opt_str("process_name", s.process_name.as_deref())
        .opt_str("runtime", a.runtime.map(cgroup::Runtime::as_str))
        .opt_str("container_id", a.container_id.as_deref())
        .opt_str("pod_uid", a.pod_uid.as_deref())
        .opt_str("name", a.name.as_deref())
        .raw("addresses", &addresses)
        .num("sockets", s.sockets)
        .num("connections", s.connections)
        .num("loopback_left_out", s.loopback_left_out);
    o.end();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ConnState;
    use std::os::fd::FromRawFd;
    use std::path::PathBuf;

    const FIB_TRIE: &str = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.88.0.0/16 2 0 2
        |-- 10.88.0.0
           /16 link UNICAST
        |-- 10.88.0.7
           /32 host LOCAL
        |-- 10.88.255.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     |-- 192.0.2.9
        /24 link UNICAST
        /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.88.0.7
        /32 host LOCAL
";

    const IF_INET6: &str = "00000000000000000000000000000001 01 80 10 80       lo
fe800000000000000c4a13fffe6a7b01 02 40 20 80     eth0
fd000db8000000000000000000000007 02 40 00 80     eth0
fd000db80000000000000000000000 02 40 00 80     eth0
20010db8000000000000000000000009 03 40 00 80
";

    #[test]
    fn fib_trie_local_entries_are_the_ipv4_addresses() {
        assert_eq!(
            parse_fib_trie(FIB_TRIE.as_bytes()),
            ["10.88.0.7", "192.0.2.9"].map(|a| a.parse::<IpAddr>().unwrap())
        );
        assert_eq!(
            parse_fib_trie(&b"garbage\n/32 host LOCAL\n|-- x\n"[..]),
            Vec::<IpAddr>::new()
        );
    }

    #[test]
    fn fib_trie_addresses_after_a_router_sized_main_table_are_found() {
        // A full table before the Local one: 17 MiB of routes, then the namespace's address.
        let route = "     |-- 198.51.100.0\n        /24 universe UNICAST\n";
        let mut trie = String::from("Main:\n  +-- 0.0.0.0/0 3 0 5\n");
        while trie.len() < 17 << 20 {
            trie.push_str(route);
        }
        // A line no kernel writes is skipped whole, and the next leaf still counts.
        trie.push_str(&"x".repeat(1 << 20));
        trie.push_str("\n     |-- 10.88.0.7\n        /32 host LOCAL\n");
        trie.push_str(
            "Local:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 203.0.113.5\n        /32 host LOCAL\n",
        );
        let scratch = Scratch::new("fib");
        std::fs::write(scratch.0.join("fib_trie"), trie).unwrap();
        let dir = procfs::open_dir(&scratch.0).unwrap();
        assert_eq!(
            read_fib_trie(dir.as_fd(), &mut ProcReader::default()).unwrap(),
            ["10.88.0.7", "203.0.113.5"].map(|a| a.parse::<IpAddr>().unwrap())
        );
    }

    /// A scratch directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("grapheon-ns-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Copies a fixture tree, symlinks as symlinks.
    fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let (src, dst) = (entry.path(), to.join(entry.file_name()));
            let kind = entry.file_type().unwrap();
            if kind.is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
            } else if kind.is_dir() {
                copy_tree(&src, &dst);
            } else {
                std::fs::copy(&src, &dst).unwrap();
            }
        }
    }

    #[test]
    fn a_pid_reused_by_a_host_process_is_not_read_as_the_namespace() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proc-ns");
        let scratch = Scratch::new("reuse");
        let root = &scratch.0;
        copy_tree(&fixture.join("100"), &root.join("42"));
        let c_root = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; the descriptor is closed by OwnedFd.
        let root_fd = unsafe {
            OwnedFd::from_raw_fd(libc::open(
                c_root.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            ))
        };
        let dir = ProcessDir::open(root_fd.as_raw_fd(), 42, 4026532100).unwrap();
        // The container's process exits and a host process gets pid 42.
        std::fs::rename(root.join("42"), root.join("42.gone")).unwrap();
        copy_tree(&fixture.join("1"), &root.join("42"));
        copy_tree(&fixture.join("net"), &root.join("42/net"));
        let ns = dir
            .read(root, 4026532100, 42, &mut ProcReader::default())
            .unwrap();
        let locals: Vec<String> = ns
            .sockets
            .iter()
            .map(|s| format!("{}:{}", s.connection.local_ip, s.connection.local_port))
            .collect();
        assert_eq!(
            (ns.process_name.as_deref(), ns.addresses.len(), locals.len()),
            (Some("nginx"), 2, 5),
            "{locals:?}"
        );
        assert!(!locals.contains(&"192.0.2.2:22".to_string()), "{locals:?}");
        // Opened after the reuse, the pid is in the host's namespace: not read at all.
        assert_eq!(
            ProcessDir::open(root_fd.as_raw_fd(), 42, 4026532100).err(),
            Some("the process exited or left the namespace while being read".to_string())
        );
    }

    #[test]
    fn if_inet6_lists_addresses_without_loopback_or_bad_lines() {
        assert_eq!(
            parse_if_inet6(IF_INET6),
            ["fe80::c4a:13ff:fe6a:7b01", "fd00:db8::7"].map(|a| a.parse::<IpAddr>().unwrap())
        );
    }

    #[test]
    fn random_and_mutated_namespace_files_never_panic() {
        use crate::collect::netlink::fuzz::{mutate, XorShift};
        let cgroup = "12:pids:/kubepods/besteffort/pod7c0c4a3e-5f0b-4e3a-9a6b-2d1c0e9f8b7a/3f1b1e8c0a5e4b0b9d7c6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b\n0::/system.slice/docker-3f1b1e8c0a5e4b0b9d7c6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b.scope\n0::/machine.slice/systemd-nspawn@a\\x2db.service\n";
        let mut rng = XorShift(0x005e_ed0f_4a11);
        for round in 0..20_000 {
            let seed = [FIB_TRIE, IF_INET6, cgroup][round % 3];
            let bytes = mutate(&mut rng, seed.as_bytes());
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse_fib_trie(text.as_bytes());
            let _ = parse_if_inet6(&text);
            let _ = cgroup::attribute(&text);
            let _ = namespace_inode(&bytes);
        }
    }

    #[test]
    fn namespace_links_are_recognised_exactly() {
        assert_eq!(namespace_inode(b"net:[4026531840]"), Some(4026531840));
        assert_eq!(namespace_inode(b"net:[]"), None);
        assert_eq!(namespace_inode(b"mnt:[4026531840]"), None);
        assert_eq!(namespace_inode(b"net:[99999999999999999999]"), None);
        assert_eq!(namespace_inode(b"net:[12x]"), None);
    }

    fn socket(local: &str, port: u16, remote: Option<&str>, protocol: Protocol) -> Socket {
        Socket {
            connection: Connection {
                protocol,
                local_ip: local.parse().unwrap(),
                local_port: port,
                remote_ip: remote.map(|r| r.parse().unwrap()),
                remote_port: remote.map(|_| 40000),
                state: Some(if remote.is_some() {
                    ConnState::Established
                } else {
                    ConnState::Listen
                }),
                pid: Some(42),
                process_name: Some("app".into()),
            },
            inode: 1,
            dual_stack: false,
        }
    }

    #[test]
    fn other_namespace_drops_loopback_and_expands_over_its_own_addresses() {
        use Protocol::{Tcp, Udp};
        let ns = Namespace {
            inode: 4026532300,
            pid: 42,
            process_name: Some("app".into()),
            attribution: Attribution::default(),
            addresses: vec!["10.88.0.7".parse().unwrap(), "fd00:db8::7".parse().unwrap()],
            sockets: vec![
                socket("0.0.0.0", 80, None, Tcp),
                socket("::", 80, None, Tcp), // next to 0.0.0.0:80: IPv6 only
                socket("::", 443, None, Tcp), // alone: dual-stack
                socket("127.0.0.1", 5432, None, Tcp),
                socket("127.0.0.1", 5432, Some("127.0.0.1"), Tcp),
                socket("::1", 53, None, Udp),
                socket("10.88.0.7", 80, Some("10.88.0.1"), Tcp),
            ],
            tries: 0,
        };
        let (connections, summary, unexpanded) = report(ns);
        let got: Vec<(String, u16, Option<String>)> = connections
            .iter()
            .map(|c| {
                (
                    c.local_ip.to_string(),
                    c.local_port,
                    c.remote_ip.map(|r| r.to_string()),
                )
            })
            .collect();
        let want = [
            ("10.88.0.7", 80, None),
            ("fd00:db8::7", 80, None),
            ("10.88.0.7", 443, None),
            ("fd00:db8::7", 443, None),
            ("10.88.0.7", 80, Some("10.88.0.1")),
        ]
        .map(|(l, p, r)| (l.to_string(), p, r.map(String::from)));
        // Listeners keep the kernel's remote; the helper above has none, so compare locals.
        assert_eq!(got, want);
        assert_eq!(unexpanded, 0);
        assert_eq!(
            (
                summary.sockets,
                summary.connections,
                summary.loopback_left_out
            ),
            (7, 5, 3)
        );
    }

    #[test]
    fn metadata_lists_what_fits_and_counts_the_rest() {
        let summary = |pid| {
            Summary {
            inode: 4026532000 + u64::from(pid),
            pid,
            process_name: Some("nginx".into()),
            attribution: cgroup::from_path(
                "/system.slice/docker-3f1b1e8c0a5e4b0b9d7c6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b.scope",
            ),
            addresses: vec!["172.17.0.2".parse().unwrap()],
            sockets: 3,
            connections: 2,
            loopback_left_out: 1,
        }
        };
        let all = Namespaces {
            list: (1..=40).map(summary).collect(),
            over_cap: 2,
        };
        let one = Namespaces {
            list: vec![summary(7)],
            over_cap: 0,
        };
        assert_eq!(
            one.metadata(10_000),
            concat!(
                r#"{"collected":1,"over_cap":0,"listed":1,"list":[{"inode":4026532007,"pid":7,"process_name":"nginx","#,
                r#""runtime":"docker","container_id":"3f1b1e8c0a5e4b0b9d7c6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b","#,
                r#""pod_uid":null,"name":null,"addresses":["172.17.0.2"],"sockets":3,"connections":2,"loopback_left_out":1}]}"#
            )
        );
        let bounded = all.metadata(2_000);
        assert!(bounded.len() <= 2_000, "{}", bounded.len());
        assert!(
            bounded.starts_with(
                r#"{"collected":40,"over_cap":2,"listed":7,"list":[{"inode":4026532001,"#
            ),
            "{bounded}"
        );
        assert_eq!(Namespaces::default().metadata(10_000), "");

        // Parts halved by 413s get metadata of an eighth of their own size each time.
        let sizes: Vec<usize> = [65_536, 32_768, 16_384, 8_192]
            .iter()
            .map(|part| all.metadata_for_part(*part).len())
            .collect();
        assert!(
            sizes
                .iter()
                .zip([8_192, 4_096, 2_048, 1_024])
                .all(|(got, room)| *got <= room),
            "{sizes:?}"
        );
        assert!(sizes.windows(2).all(|w| w[1] < w[0]), "{sizes:?}");

        // One entry too large for the room does not hide the smaller ones after it.
        let mut big = summary(1);
        big.attribution.name = Some("n".repeat(3_000));
        let mixed = Namespaces {
            list: vec![big, summary(2), summary(3)],
            over_cap: 0,
        };
        let listed = mixed.metadata(1_000);
        assert!(listed.len() <= 1_000, "{}", listed.len());
        assert!(
            listed.starts_with(
                r#"{"collected":3,"over_cap":0,"listed":2,"list":[{"inode":4026532002,"#
            ),
            "{listed}"
        );
    }
}
