//! rtnetlink: interface addresses, neighbours and routes straight from the kernel.
//!
//! Two layers. The byte layer is pure: [`messages`] and [`attrs`] walk netlink framing, [`Dump`]
//! decides which replies belong to our dump and when it ends, and `parse_*` turn one message
//! payload into a record. They take arbitrary bytes (routers run old and patched kernels) and
//! never panic, index out of bounds or loop. The syscall layer, [`NetlinkSocket`], only moves
//! bytes between the kernel and the byte layer; `sockdiag` uses it too.
//!
//! Records follow `ip -json addr|neigh|route show` as the shared rules in `collect` describe.

use std::io;
use std::mem;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::collect::SourceError;
use crate::model::{ip_from_bytes, Address, Mac, Neighbor, Route};

// Netlink framing (linux/netlink.h).
const NLMSG_HDRLEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;
const RTA_HDRLEN: usize = 4;
/// Attribute type bits; the top two are the NESTED and NET_BYTEORDER flags.
const NLA_TYPE_MASK: u16 = 0x3fff;

// rtnetlink message types (linux/rtnetlink.h).
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;

const AF_UNSPEC: u8 = libc::AF_UNSPEC as u8;
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;

// Fixed headers before the attributes: ifinfomsg, ifaddrmsg, ndmsg, rtmsg.
const IFINFOMSG_LEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
const NDMSG_LEN: usize = 12;
const RTMSG_LEN: usize = 12;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFF_LOOPBACK: u32 = 0x8;
const ARPHRD_LOOPBACK: u16 = 772;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NTF_PROXY: u8 = 0x08;
const NTF_EXT_LEARNED: u8 = 0x10;
const NUD_NOARP: u16 = 0x40;
/// The states `ip neigh show` lists without `nud` arguments (ipneigh.c: `0xFF & ~NUD_NOARP`).
const NUD_SHOWN: u16 = 0xff & !NUD_NOARP;
/// NUD bits in the order `ip` prints them; the first one present names the state.
const NUD_NAMES: [(u16, &str); 8] = [
    (0x01, "incomplete"),
    (0x02, "reachable"),
    (0x04, "stale"),
    (0x08, "delay"),
    (0x10, "probe"),
    (0x20, "failed"),
    (0x40, "noarp"),
    (0x80, "permanent"),
];

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const RTA_MULTIPATH: u16 = 9;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u32 = 254;
const RTM_F_CLONED: u32 = 0x200;

/// A silent kernel must not hang the run (`SO_RCVTIMEO`).
const RECV_TIMEOUT_SECS: u8 = 5;
/// The kernel sizes dump datagrams after the reader's buffer, up to 32 KiB; one larger message
/// (a link with many VFs) makes us grow the buffer and start over.
const RECV_BUFFER: usize = 64 * 1024;
const MAX_RECV_BUFFER: usize = 4 << 20;
/// A dump past these is a broken kernel or a loop, not a host: 100,000 sockets are ~20 MB.
const MAX_MESSAGES: usize = 10_000_000;
const MAX_BYTES: usize = 1 << 30;
const MAX_DATAGRAMS: usize = 4_000_000;
/// `NLM_F_DUMP_INTR` means the table changed under the dump: try again, this many times in all.
const DUMP_ATTEMPTS: usize = 3;
const MAX_EINTR: usize = 100;

/// What one message parser says: a record, `None` when `ip` would not list it, or why the
/// message was malformed (logged at debug level and skipped).
pub type Parsed<T> = Result<Option<T>, &'static str>;

// ---------------------------------------------------------------------------------------------
// Byte layer: framing.

/// One netlink message of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub port: u32,
    pub payload: &'a [u8],
}

/// The messages of one datagram, in order. Iteration stops at the first header that is cut
/// short, claims less than a header or runs past the datagram; [`Messages::malformed`] tells.
#[derive(Clone, Debug)]
pub struct Messages<'a> {
    rest: &'a [u8],
    malformed: bool,
}

/// Walks the messages of one received datagram.
pub fn messages(datagram: &[u8]) -> Messages<'_> {
    Messages {
        rest: datagram,
        malformed: false,
    }
}

impl Messages<'_> {
    /// True when iteration stopped on bad framing rather than at the end of the datagram.
    pub fn malformed(&self) -> bool {
        self.malformed
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Message<'a>;

    fn next(&mut self) -> Option<Message<'a>> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = self.rest;
        let parsed = (|| {
            let len = usize::try_from(u32_at(rest, 0)?).ok()?;
            if len < NLMSG_HDRLEN {
                return None;
            }
            let message = Message {
                kind: u16_at(rest, 4)?,
                flags: u16_at(rest, 6)?,
                seq: u32_at(rest, 8)?,
                port: u32_at(rest, 12)?,
                payload: rest.get(NLMSG_HDRLEN..len)?,
            };
            Some((message, len))
        })();
        match parsed {
            Some((message, len)) => {
                self.rest = rest.get(align4(len)..).unwrap_or(&[]);
                Some(message)
            }
            None => {
                self.malformed = true;
                self.rest = &[];
                None
            }
        }
    }
}

/// The attributes (`rtattr`/`nlattr`) in `buf`, as (type without flag bits, payload). Stops at
/// the first attribute whose length is impossible; an attribute's padding may be missing at
/// the very end.
pub fn attrs(buf: &[u8]) -> Attrs<'_> {
    Attrs { rest: buf }
}

/// Iterator returned by [`attrs`].
#[derive(Clone, Debug)]
pub struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<(u16, &'a [u8])> {
        let rest = self.rest;
        let len = usize::from(u16_at(rest, 0)?);
        let kind = u16_at(rest, 2)? & NLA_TYPE_MASK;
        let Some(data) = rest.get(RTA_HDRLEN..len) else {
            self.rest = &[];
            return None;
        };
        self.rest = rest.get(align4(len)..).unwrap_or(&[]);
        Some((kind, data))
    }
}

/// The first attribute of each wanted type, as iproute2's `parse_rtattr` keeps the first;
/// other types are ignored.
fn pick<const N: usize>(buf: &[u8], wanted: [u16; N]) -> [Option<&[u8]>; N] {
    let mut found = [None; N];
    for (kind, data) in attrs(buf) {
        for (slot, want) in found.iter_mut().zip(wanted) {
            if kind == want && slot.is_none() {
                *slot = Some(data);
            }
        }
    }
    found
}

fn align4(len: usize) -> usize {
    len.saturating_add(3) & !3
}

pub(crate) fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes(bytes.try_into().ok()?))
}

pub(crate) fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

/// An address of `width` octets (4 or 16) from the front of an attribute. A longer attribute
/// is read as `ip` reads it (the first octets); a shorter one is no address.
fn ip_at(data: &[u8], width: usize) -> Option<IpAddr> {
    ip_from_bytes(data.get(..width)?)
}

fn family_width(family: u8) -> Option<usize> {
    match family {
        AF_INET => Some(4),
        AF_INET6 => Some(16),
        _ => None,
    }
}

/// Text up to the first NUL of a string attribute.
fn c_text(data: &[u8]) -> String {
    let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(data.get(..end).unwrap_or(&[])).into_owned()
}

fn errno_error(what: &str, code: i32) -> SourceError {
    let err = io::Error::from_raw_os_error(code.wrapping_neg());
    SourceError(format!("{what}: the kernel answered: {err}"))
}

// ---------------------------------------------------------------------------------------------
// Byte layer: one dump.

/// How a dump stands after a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// More datagrams follow.
    More,
    /// `NLMSG_DONE` arrived.
    Done,
}

/// The receiving side of one dump: which replies are ours (sequence number and port), when it
/// ends, whether the kernel flagged it inconsistent, and the limits that stop a runaway.
#[derive(Clone, Debug)]
pub struct Dump {
    seq: u32,
    port: u32,
    datagrams: usize,
    messages: usize,
    bytes: usize,
    interrupted: bool,
    max_datagrams: usize,
}

impl Dump {
    /// A dump whose replies carry `seq` and are addressed to netlink port `port`.
    pub fn new(seq: u32, port: u32) -> Dump {
        Dump {
            seq,
            port,
            datagrams: 0,
            messages: 0,
            bytes: 0,
            interrupted: false,
            max_datagrams: MAX_DATAGRAMS,
        }
    }

    /// True when the kernel flagged a message `NLM_F_DUMP_INTR` (the table changed mid-dump).
    pub fn interrupted(&self) -> bool {
        self.interrupted
    }

    /// Takes one datagram: data messages of ours go to `on_msg(type, payload)`, foreign ones
    /// are ignored, `NLMSG_ERROR` and a failed `NLMSG_DONE` become errors.
    pub fn feed(
        &mut self,
        datagram: &[u8],
        on_msg: &mut dyn FnMut(u16, &[u8]),
    ) -> Result<Step, SourceError> {
        self.datagrams += 1;
        self.bytes = self.bytes.saturating_add(datagram.len());
        if self.datagrams > self.max_datagrams || self.bytes > MAX_BYTES {
            return Err(SourceError(format!(
                "netlink dump still running after {} datagrams and {} bytes; giving up",
                self.datagrams, self.bytes
            )));
        }
        let mut walk = messages(datagram);
        for message in &mut walk {
            if message.seq != self.seq || message.port != self.port {
                continue;
            }
            self.messages += 1;
            if self.messages > MAX_MESSAGES {
                return Err(SourceError(format!(
                    "netlink dump still running after {MAX_MESSAGES} messages; giving up"
                )));
            }
            if message.flags & NLM_F_DUMP_INTR != 0 {
                self.interrupted = true;
            }
            match message.kind {
                NLMSG_NOOP => {}
                NLMSG_DONE => {
                    // Since Linux 2.6 DONE carries the dump's status; older ones may send none.
                    return match u32_at(message.payload, 0).map(|c| c as i32) {
                        Some(code) if code < 0 => Err(errno_error("netlink dump", code)),
                        _ => Ok(Step::Done),
                    };
                }
                NLMSG_ERROR => {
                    return match u32_at(message.payload, 0).map(|c| c as i32) {
                        // An acknowledgement; a dump only gets one if asked, but it ends it.
                        Some(0) => Ok(Step::Done),
                        Some(code) => Err(errno_error("netlink dump", code)),
                        None => Err(SourceError(
                            "netlink dump: malformed NLMSG_ERROR reply".to_string(),
                        )),
                    };
                }
                NLMSG_OVERRUN => {
                    return Err(SourceError("netlink dump: kernel reported overrun".into()))
                }
                kind => on_msg(kind, message.payload),
            }
        }
        if walk.malformed() {
            debug!("netlink: skipped the malformed tail of a reply datagram");
        }
        Ok(Step::More)
    }
}

// ---------------------------------------------------------------------------------------------
// Byte layer: records.

/// An interface as `RTM_NEWLINK` describes it: enough to name an index and give its MAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFF_LOOPBACK` flag or `ARPHRD_LOOPBACK` type: its addresses are never reported.
    pub loopback: bool,
    /// `IFLA_ADDRESS` when it is exactly six octets (not a tunnel's four, InfiniBand's twenty).
    pub mac: Option<Mac>,
}

/// Parses one `RTM_NEWLINK` payload (`ifinfomsg` and attributes).
pub fn parse_link(payload: &[u8]) -> Parsed<Link> {
    let header = payload.get(..IFINFOMSG_LEN).ok_or("short ifinfomsg")?;
    let link_type = u16_at(header, 2).ok_or("short ifinfomsg")?;
    let index = u32_at(header, 4).ok_or("short ifinfomsg")?;
    let flags = u32_at(header, 8).ok_or("short ifinfomsg")?;
    let [name, address] = pick(
        payload.get(IFINFOMSG_LEN..).unwrap_or(&[]),
        [IFLA_IFNAME, IFLA_ADDRESS],
    );
    let name = c_text(name.ok_or("link without IFLA_IFNAME")?);
    Ok(Some(Link {
        index,
        name,
        loopback: flags & IFF_LOOPBACK != 0 || link_type == ARPHRD_LOOPBACK,
        mac: address.and_then(Mac::from_bytes),
    }))
}

/// Interfaces by index, to name the index of an address, a neighbour or a route.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Links(Vec<Link>);

impl Links {
    /// Indexes `links`; of two links with one index the first is kept.
    pub fn new(mut links: Vec<Link>) -> Links {
        links.sort_by_key(|l| l.index);
        links.dedup_by_key(|l| l.index);
        Links(links)
    }

    /// The link with this index.
    pub fn get(&self, index: u32) -> Option<&Link> {
        let at = self.0.binary_search_by_key(&index, |l| l.index).ok()?;
        self.0.get(at)
    }

    /// The name `ip` prints for an index: the link's name, or `if<N>` for a link that is gone.
    pub fn name(&self, index: u32) -> String {
        match self.get(index) {
            Some(link) => link.name.clone(),
            None => format!("if{index}"),
        }
    }
}

/// Parses one `RTM_NEWADDR` payload. Addresses of loopback or unknown links, and of families
/// other than IPv4/IPv6, are not listed (`ip addr show` prints addresses under their link).
pub fn parse_address(payload: &[u8], links: &Links) -> Parsed<Address> {
    let header = payload.get(..IFADDRMSG_LEN).ok_or("short ifaddrmsg")?;
    let (family, prefix_length) = match header {
        [family, prefix, ..] => (*family, *prefix),
        _ => return Err("short ifaddrmsg"),
    };
    let index = u32_at(header, 4).ok_or("short ifaddrmsg")?;
    let Some(width) = family_width(family) else {
        return Ok(None);
    };
    let Some(link) = links.get(index) else {
        return Ok(None);
    };
    if link.loopback {
        return Ok(None);
    }
    if usize::from(prefix_length) > width * 8 {
        return Err("prefix length longer than the address");
    }
    let [local, address] = pick(
        payload.get(IFADDRMSG_LEN..).unwrap_or(&[]),
        [IFA_LOCAL, IFA_ADDRESS],
    );
    let raw = local
        .or(address)
        .ok_or("address without IFA_LOCAL/IFA_ADDRESS")?;
    let ip_address = ip_at(raw, width).ok_or("address attribute too short")?;
    Ok(Some(Address {
        interface: link.name.clone(),
        ip_address,
        prefix_length,
        mac_address: link.mac,
    }))
}

/// Parses one `RTM_NEWNEIGH` payload. Entries `ip neigh show` hides (state NOARP or NONE,
/// unless proxy or externally learned) and non-IP families are not listed.
pub fn parse_neighbor(payload: &[u8], links: &Links) -> Parsed<Neighbor> {
    let header = payload.get(..NDMSG_LEN).ok_or("short ndmsg")?;
    let family = *header.first().ok_or("short ndmsg")?;
    let index = u32_at(header, 4).ok_or("short ndmsg")?;
    let state = u16_at(header, 8).ok_or("short ndmsg")?;
    let flags = *header.get(10).ok_or("short ndmsg")?;
    let Some(width) = family_width(family) else {
        return Ok(None);
    };
    if state & NUD_SHOWN == 0 && flags & (NTF_PROXY | NTF_EXT_LEARNED) == 0 {
        return Ok(None);
    }
    if index == 0 {
        return Err("neighbour without interface");
    }
    let [dst, lladdr] = pick(
        payload.get(NDMSG_LEN..).unwrap_or(&[]),
        [NDA_DST, NDA_LLADDR],
    );
    let ip_address =
        ip_at(dst.ok_or("neighbour without NDA_DST")?, width).ok_or("NDA_DST too short")?;
    Ok(Some(Neighbor {
        interface: links.name(index),
        ip_address,
        mac_address: lladdr.and_then(Mac::from_bytes),
        state: nud_name(state).map(str::to_string),
    }))
}

/// The lowercase name of the first NUD state `ip` prints; `None` when it prints none (0).
fn nud_name(state: u16) -> Option<&'static str> {
    NUD_NAMES
        .iter()
        .find(|(bit, _)| state & bit != 0)
        .map(|(_, name)| *name)
}

/// Parses one `RTM_NEWROUTE` payload. Only IPv4 routes of the main table that are not cached
/// clones are listed, as `ip route show` lists them.
pub fn parse_route(payload: &[u8], links: &Links) -> Parsed<Route> {
    let header = payload.get(..RTMSG_LEN).ok_or("short rtmsg")?;
    let (family, dst_len, table) = match header {
        [family, dst_len, _src_len, _tos, table, ..] => (*family, *dst_len, *table),
        _ => return Err("short rtmsg"),
    };
    let flags = u32_at(header, 8).ok_or("short rtmsg")?;
    if family != AF_INET || flags & RTM_F_CLONED != 0 {
        return Ok(None);
    }
    let [dst, oif, gateway, prefsrc, multipath, table_attr] = pick(
        payload.get(RTMSG_LEN..).unwrap_or(&[]),
        [
            RTA_DST,
            RTA_OIF,
            RTA_GATEWAY,
            RTA_PREFSRC,
            RTA_MULTIPATH,
            RTA_TABLE,
        ],
    );
    // RTA_TABLE carries tables above 255; rtm_table then says RT_TABLE_COMPAT.
    let table = match table_attr {
        Some(data) => u32_at(data, 0).ok_or("RTA_TABLE too short")?,
        None => u32::from(table),
    };
    if table != RT_TABLE_MAIN {
        return Ok(None);
    }
    if dst_len > 32 {
        return Err("IPv4 route longer than /32");
    }
    // As iproute2 prints `dst`: a host route without its /32, no RTA_DST as `default`.
    let destination = match dst {
        Some(data) => {
            let ip = ip_at(data, 4).ok_or("RTA_DST too short")?;
            if dst_len == 32 {
                ip.to_string()
            } else {
                format!("{ip}/{dst_len}")
            }
        }
        None if dst_len != 0 => format!("0/{dst_len}"),
        None => "default".to_string(),
    };
    let source_ip = match prefsrc {
        Some(data) => Some(ip_at(data, 4).ok_or("RTA_PREFSRC too short")?),
        None => None,
    };
    // A multipath route has its gateways and devices in the nexthops, not at the top level.
    let (gateway, interface) = if multipath.is_some() {
        (None, None)
    } else {
        let gateway = match gateway {
            Some(data) => Some(ip_at(data, 4).ok_or("RTA_GATEWAY too short")?),
            None => None,
        };
        let interface = match oif {
            Some(data) => Some(links.name(u32_at(data, 0).ok_or("RTA_OIF too short")?)),
            None => None,
        };
        (gateway, interface)
    };
    Ok(Some(Route {
        destination,
        gateway,
        interface,
        source_ip,
    }))
}

// ---------------------------------------------------------------------------------------------
// Syscall layer.

/// How one dump attempt ended.
enum Outcome {
    Complete,
    /// The kernel flagged the dump inconsistent: run it again.
    Interrupted,
    /// A datagram of this many bytes did not fit the buffer and was cut.
    Truncated(usize),
}

/// A netlink socket (close-on-exec, receive timeout) that runs dumps.
pub(crate) struct NetlinkSocket {
    fd: OwnedFd,
    protocol: libc::c_int,
    port: u32,
    seq: u32,
    buf: Vec<u8>,
}

impl NetlinkSocket {
    /// Opens and binds a socket of the netlink `protocol` (`NETLINK_ROUTE`, `NETLINK_SOCK_DIAG`).
    pub(crate) fn open(protocol: libc::c_int) -> Result<NetlinkSocket, SourceError> {
        let (fd, port) = open_bound(protocol)
            .map_err(|e| SourceError(format!("cannot open netlink socket: {e}")))?;
        Ok(NetlinkSocket {
            fd,
            protocol,
            port,
            seq: 0,
            buf: vec![0; RECV_BUFFER],
        })
    }

    /// Runs the dump `kind` with request body `body` and hands every data message's type and
    /// payload to `parse`, which appends records to `out`. Runs it again (dropping what the
    /// attempt appended) when the kernel flags it inconsistent or a message did not fit.
    pub(crate) fn dump_into<T>(
        &mut self,
        kind: u16,
        body: &[u8],
        out: &mut Vec<T>,
        mut parse: impl FnMut(u16, &[u8], &mut Vec<T>),
    ) -> Result<(), SourceError> {
        let start = out.len();
        for attempt in 1..=DUMP_ATTEMPTS {
            out.truncate(start);
            let outcome = self.dump_once(kind, body, &mut |k, p| parse(k, p, out))?;
            match outcome {
                Outcome::Complete => return Ok(()),
                Outcome::Interrupted => {
                    debug!("netlink dump {kind} changed while read (attempt {attempt}); again")
                }
                Outcome::Truncated(needed) => {
                    if needed > MAX_RECV_BUFFER {
                        return Err(SourceError(format!(
                            "netlink dump {kind}: a {needed}-byte message is too large"
                        )));
                    }
                    debug!("netlink dump {kind}: {needed}-byte message, growing the buffer");
                    self.buf = vec![0; needed.next_power_of_two()];
                    // The rest of the cut dump is still queued on this socket: start afresh.
                    let (fd, port) = open_bound(self.protocol)
                        .map_err(|e| SourceError(format!("cannot open netlink socket: {e}")))?;
                    self.fd = fd;
                    self.port = port;
                }
            }
        }
        Err(SourceError(format!(
            "netlink dump {kind} was inconsistent {DUMP_ATTEMPTS} times; giving up"
        )))
    }

    fn dump_once(
        &mut self,
        kind: u16,
        body: &[u8],
        on_msg: &mut dyn FnMut(u16, &[u8]),
    ) -> Result<Outcome, SourceError> {
        self.seq = self.seq.wrapping_add(1);
        self.send(&dump_request(kind, self.seq, body))?;
        let mut dump = Dump::new(self.seq, self.port);
        loop {
            let len = self.recv()?;
            let Some(datagram) = self.buf.get(..len) else {
                return Ok(Outcome::Truncated(len));
            };
            if dump.feed(datagram, on_msg)? == Step::Done {
                return Ok(if dump.interrupted() {
                    Outcome::Interrupted
                } else {
                    Outcome::Complete
                });
            }
        }
    }

    fn send(&self, request: &[u8]) -> Result<(), SourceError> {
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value (pid 0 is the kernel).
        let mut kernel: libc::sockaddr_nl = unsafe { mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        for _ in 0..MAX_EINTR {
            // SAFETY: the pointers and lengths describe live buffers owned by this frame.
            let sent = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    request.as_ptr().cast(),
                    request.len(),
                    0,
                    (&kernel as *const libc::sockaddr_nl).cast(),
                    mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if sent >= 0 {
                return if sent as usize == request.len() {
                    Ok(())
                } else {
                    Err(SourceError("netlink request sent short".into()))
                };
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(SourceError(format!("netlink request failed: {err}")));
            }
        }
        Err(SourceError("netlink request kept being interrupted".into()))
    }

    /// Receives one datagram into the buffer and returns its full length, which is larger than
    /// the buffer when the datagram was cut (`MSG_TRUNC`).
    fn recv(&mut self) -> Result<usize, SourceError> {
        for _ in 0..MAX_EINTR {
            // SAFETY: the buffer pointer and length describe `self.buf`, which outlives the call.
            let got = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if got >= 0 {
                return Ok(got as usize);
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    return Err(SourceError(format!(
                        "netlink: no answer from the kernel within {RECV_TIMEOUT_SECS} s"
                    )))
                }
                _ => return Err(SourceError(format!("netlink receive failed: {err}"))),
            }
        }
        Err(SourceError("netlink receive kept being interrupted".into()))
    }
}

/// A dump request: header with `NLM_F_REQUEST | NLM_F_DUMP`, then the family header `body`.
fn dump_request(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + body.len();
    let mut request = Vec::with_capacity(len);
    request.extend_from_slice(&(len as u32).to_ne_bytes());
    request.extend_from_slice(&kind.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&seq.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    request.extend_from_slice(body);
    request
}

/// A bound netlink socket and the port id the kernel gave it.
fn open_bound(protocol: libc::c_int) -> io::Result<(OwnedFd, u32)> {
    // SAFETY: plain syscall; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let timeout = libc::timeval {
        tv_sec: RECV_TIMEOUT_SECS.into(),
        tv_usec: 0,
    };
    // SAFETY: the option value points at a live timeval of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_nl is plain data; all-zero asks the kernel to pick our port id.
    let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    let mut addr_len = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: `addr` is a live sockaddr_nl and `addr_len` its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            addr_len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; getsockname writes at most `addr_len` bytes into `addr`.
    let rc = unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut addr as *mut libc::sockaddr_nl).cast(),
            &mut addr_len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((fd, addr.nl_pid))
}

/// Appends a parsed record, or logs why a message was skipped.
pub(crate) fn keep<T>(parsed: Parsed<T>, what: &str, out: &mut Vec<T>) {
    match parsed {
        Ok(Some(record)) => out.push(record),
        Ok(None) => {}
        Err(why) => debug!("netlink: skipped a {what} message: {why}"),
    }
}

fn dump_links(socket: &mut NetlinkSocket) -> Result<Links, SourceError> {
    let mut links = Vec::new();
    socket.dump_into(
        RTM_GETLINK,
        &[0; IFINFOMSG_LEN],
        &mut links,
        |kind, p, out| {
            if kind == RTM_NEWLINK {
                keep(parse_link(p), "RTM_NEWLINK", out);
            }
        },
    )?;
    Ok(Links::new(links))
}

/// Interface addresses of every non-loopback interface, IPv4 and IPv6, as `ip addr show`
/// lists them (an `RTM_GETLINK` dump for names and MACs, then an `RTM_GETADDR` dump).
pub fn addresses() -> Result<Vec<Address>, SourceError> {
    let mut socket = NetlinkSocket::open(libc::NETLINK_ROUTE)?;
    let links = dump_links(&mut socket)?;
    let mut out = Vec::new();
    let body = [AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0];
    socket.dump_into(RTM_GETADDR, &body, &mut out, |kind, p, out| {
        if kind == RTM_NEWADDR {
            keep(parse_address(p, &links), "RTM_NEWADDR", out);
        }
    })?;
    Ok(out)
}

/// IPv4 and IPv6 neighbours as `ip neigh show` lists them (`RTM_GETNEIGH`, `AF_UNSPEC`).
pub fn neighbors() -> Result<Vec<Neighbor>, SourceError> {
    let mut socket = NetlinkSocket::open(libc::NETLINK_ROUTE)?;
    let links = dump_links(&mut socket)?;
    let mut out = Vec::new();
    socket.dump_into(
        RTM_GETNEIGH,
        &[AF_UNSPEC; NDMSG_LEN],
        &mut out,
        |kind, p, out| {
            if kind == RTM_NEWNEIGH {
                keep(parse_neighbor(p, &links), "RTM_NEWNEIGH", out);
            }
        },
    )?;
    Ok(out)
}

/// IPv4 routes of the main table as `ip route show` lists them (`RTM_GETROUTE`, `AF_INET`).
pub fn routes() -> Result<Vec<Route>, SourceError> {
    let mut socket = NetlinkSocket::open(libc::NETLINK_ROUTE)?;
    let links = dump_links(&mut socket)?;
    let mut out = Vec::new();
    let mut body = [0u8; RTMSG_LEN];
    body[0] = AF_INET;
    socket.dump_into(RTM_GETROUTE, &body, &mut out, |kind, p, out| {
        if kind == RTM_NEWROUTE {
            keep(parse_route(p, &links), "RTM_NEWROUTE", out);
        }
    })?;
    Ok(out)
}

/// A tiny deterministic PRNG and buffer mutations for the robustness tests of every parser.
#[cfg(test)]
pub(crate) mod fuzz {
    /// xorshift64: deterministic, dependency-free, good enough to shake parsers.
    pub(crate) struct XorShift(pub u64);

    impl XorShift {
        pub(crate) fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        /// A number in `0..n` (`n` > 0).
        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    /// A damaged copy of `valid`: cut short, bits flipped, a length-sized field overwritten
    /// with an edge value, a piece duplicated, or several of those.
    pub(crate) fn mutate(rng: &mut XorShift, valid: &[u8]) -> Vec<u8> {
        let mut buf = valid.to_vec();
        for _ in 0..=rng.below(3) {
            match rng.below(5) {
                0 => {
                    let keep = rng.below(buf.len() + 1);
                    buf.truncate(keep);
                }
                1 => {
                    for _ in 0..=rng.below(8) {
                        if !buf.is_empty() {
                            let at = rng.below(buf.len());
                            buf[at] ^= 1 << rng.below(8);
                        }
                    }
                }
                2 | 3 => {
                    // Length fields sit on 2- and 4-byte boundaries.
                    if buf.len() >= 4 {
                        let at = rng.below(buf.len() / 2) * 2;
                        let edges: [u32; 10] = [0, 1, 3, 4, 8, 15, 16, 0xffff, 0xffff_ffff, 0];
                        let value = match rng.below(3) {
                            0 => edges[rng.below(edges.len())],
                            1 => (buf.len() as u32)
                                .wrapping_add(rng.below(9) as u32)
                                .wrapping_sub(4),
                            _ => rng.next() as u32,
                        };
                        let bytes = value.to_ne_bytes();
                        let width = if rng.below(2) == 0 { 2 } else { 4 };
                        for (i, b) in bytes.iter().take(width).enumerate() {
                            if let Some(slot) = buf.get_mut(at + i) {
                                *slot = *b;
                            }
                        }
                    }
                }
                _ => {
                    if !buf.is_empty() {
                        let from = rng.below(buf.len());
                        let to = from + rng.below(buf.len() - from + 1);
                        let piece = buf[from..to].to_vec();
                        let at = rng.below(buf.len() + 1);
                        buf.splice(at..at, piece);
                    }
                }
            }
        }
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::fuzz::{mutate, XorShift};
    use super::*;

    const SEQ: u32 = 7;
    const PORT: u32 = 4242;

    fn pad(buf: &mut Vec<u8>) {
        while buf.len() % 4 != 0 {
            buf.push(0);
        }
    }

    fn rtattr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((RTA_HDRLEN + data.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(data);
        pad(&mut out);
        out
    }

    fn nlmsg(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&(flags | 2).to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&PORT.to_ne_bytes());
        out.extend_from_slice(payload);
        pad(&mut out);
        out
    }

    fn done(seq: u32) -> Vec<u8> {
        nlmsg(NLMSG_DONE, 0, seq, &0u32.to_ne_bytes())
    }

    fn link(index: u32, flags: u32, link_type: u16, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![AF_UNSPEC, 0];
        p.extend_from_slice(&link_type.to_ne_bytes());
        p.extend_from_slice(&index.to_ne_bytes());
        p.extend_from_slice(&flags.to_ne_bytes());
        p.extend_from_slice(&0u32.to_ne_bytes());
        attrs.iter().for_each(|a| p.extend_from_slice(a));
        p
    }

    fn addr(family: u8, prefix: u8, index: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![family, prefix, 0, 0];
        p.extend_from_slice(&index.to_ne_bytes());
        attrs.iter().for_each(|a| p.extend_from_slice(a));
        p
    }

    fn neigh(family: u8, index: u32, state: u16, flags: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![family, 0, 0, 0];
        p.extend_from_slice(&index.to_ne_bytes());
        p.extend_from_slice(&state.to_ne_bytes());
        p.extend_from_slice(&[flags, 1]);
        attrs.iter().for_each(|a| p.extend_from_slice(a));
        p
    }

    fn route(dst_len: u8, table: u8, kind: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![AF_INET, dst_len, 0, 0, table, 4, 0, kind];
        p.extend_from_slice(&0u32.to_ne_bytes());
        attrs.iter().for_each(|a| p.extend_from_slice(a));
        p
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn mac(text: &str) -> Option<Mac> {
        Some(Mac::parse(text).unwrap())
    }

    fn name(text: &str) -> Vec<u8> {
        rtattr(IFLA_IFNAME, format!("{text}\0").as_bytes())
    }

    /// Links of a small router: loopback, an Ethernet port, a GRE tunnel with a four-byte
    /// link address, a link with no address at all, a tunnel with an empty one.
    fn sample_links() -> Vec<Vec<u8>> {
        vec![
            link(
                1,
                IFF_LOOPBACK | 1,
                ARPHRD_LOOPBACK,
                &[name("lo"), rtattr(IFLA_ADDRESS, &[0; 6])],
            ),
            link(
                2,
                0x1003,
                1,
                &[rtattr(IFLA_ADDRESS, &[2, 0xfc, 0, 0, 0, 1]), name("eth0")],
            ),
            link(
                3,
                0x91,
                778,
                &[name("gre1"), rtattr(IFLA_ADDRESS, &[192, 0, 2, 8])],
            ),
            link(
                4,
                0x91,
                65534,
                &[name("wg0"), rtattr(999, b"unknown attribute")],
            ),
            link(5, 0x80, 776, &[rtattr(IFLA_ADDRESS, &[]), name("sit0")]),
        ]
    }

    /// Runs messages through `Dump` as one dump would arrive, in two datagrams.
    fn run_dump<T>(
        payloads: &[Vec<u8>],
        kind: u16,
        mut parse: impl FnMut(&[u8]) -> Parsed<T>,
    ) -> Vec<T> {
        let mut first = Vec::new();
        let mut second = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            let target = if i < payloads.len() / 2 {
                &mut first
            } else {
                &mut second
            };
            target.extend(nlmsg(kind, 0, SEQ, p));
        }
        second.extend(done(SEQ));
        let mut out = Vec::new();
        let mut dump = Dump::new(SEQ, PORT);
        let mut on_msg = |k: u16, p: &[u8]| {
            assert_eq!(k, kind);
            keep(parse(p), "test", &mut out);
        };
        assert_eq!(dump.feed(&first, &mut on_msg).unwrap(), Step::More);
        assert_eq!(dump.feed(&second, &mut on_msg).unwrap(), Step::Done);
        assert!(!dump.interrupted());
        out
    }

    fn sample_link_table() -> Links {
        Links::new(run_dump(&sample_links(), RTM_NEWLINK, parse_link))
    }

    #[test]
    fn links_keep_six_octet_macs_only() {
        let links = sample_link_table();
        let expected = vec![
            Link {
                index: 1,
                name: "lo".into(),
                loopback: true,
                mac: Some(Mac([0; 6])),
            },
            Link {
                index: 2,
                name: "eth0".into(),
                loopback: false,
                mac: mac("02:fc:00:00:00:01"),
            },
            Link {
                index: 3,
                name: "gre1".into(),
                loopback: false,
                mac: None,
            },
            Link {
                index: 4,
                name: "wg0".into(),
                loopback: false,
                mac: None,
            },
            Link {
                index: 5,
                name: "sit0".into(),
                loopback: false,
                mac: None,
            },
        ];
        assert_eq!(links, Links(expected));
        assert_eq!(links.name(9), "if9");
    }

    #[test]
    fn addresses_follow_ip_addr_show() {
        let links = sample_link_table();
        let payloads = vec![
            addr(AF_INET, 8, 1, &[rtattr(IFA_LOCAL, &[127, 0, 0, 1])]),
            // Point-to-point: IFA_LOCAL is ours, IFA_ADDRESS the peer.
            addr(
                AF_INET,
                24,
                2,
                &[
                    rtattr(IFA_ADDRESS, &[192, 0, 2, 99]),
                    rtattr(IFA_LOCAL, &[192, 0, 2, 2]),
                ],
            ),
            addr(
                AF_INET6,
                64,
                2,
                &[rtattr(IFA_ADDRESS, &ip6("fe80::fc:ff:fe00:1"))],
            ),
            addr(
                AF_INET6,
                64,
                2,
                &[rtattr(IFA_ADDRESS, &ip6("::ffff:10.1.2.3"))],
            ),
            addr(
                AF_INET,
                30,
                3,
                &[
                    rtattr(IFA_LOCAL, &[10, 9, 9, 1]),
                    rtattr(IFA_ADDRESS, &[10, 9, 9, 2]),
                ],
            ),
            addr(AF_INET, 32, 4, &[rtattr(IFA_LOCAL, &[10, 8, 0, 1, 0, 0])]),
            addr(AF_INET, 24, 77, &[rtattr(IFA_LOCAL, &[10, 7, 0, 1])]),
            addr(AF_INET, 24, 2, &[rtattr(IFA_LOCAL, &[10, 7])]),
            addr(AF_INET, 40, 2, &[rtattr(IFA_LOCAL, &[10, 7, 0, 1])]),
            addr(AF_INET, 24, 2, &[]),
            addr(17, 24, 2, &[rtattr(IFA_LOCAL, &[1; 6])]),
        ];
        let got = run_dump(&payloads, RTM_NEWADDR, |p| parse_address(p, &links));
        let eth = mac("02:fc:00:00:00:01");
        let a = |i: &str, ip_text: &str, p: u8, m: Option<Mac>| Address {
            interface: i.into(),
            ip_address: ip(ip_text),
            prefix_length: p,
            mac_address: m,
        };
        assert_eq!(
            got,
            vec![
                a("eth0", "192.0.2.2", 24, eth),
                a("eth0", "fe80::fc:ff:fe00:1", 64, eth),
                a("eth0", "10.1.2.3", 64, eth),
                a("gre1", "10.9.9.1", 30, None),
                a("wg0", "10.8.0.1", 32, None),
            ]
        );
    }

    fn ip6(text: &str) -> [u8; 16] {
        text.parse::<std::net::Ipv6Addr>().unwrap().octets()
    }

    #[test]
    fn neighbours_follow_ip_neigh_show() {
        let links = sample_link_table();
        let lladdr = rtattr(NDA_LLADDR, &[2, 0xfc, 0, 0, 0, 5]);
        let payloads = vec![
            neigh(
                AF_INET,
                2,
                0x04,
                0,
                &[rtattr(NDA_DST, &[192, 0, 2, 1]), lladdr.clone()],
            ),
            neigh(AF_INET6, 2, 0x20, 0, &[rtattr(NDA_DST, &ip6("fd00::1"))]),
            // NOARP (multicast, broadcast) and NONE entries are hidden, as `ip` hides them.
            neigh(
                AF_INET,
                2,
                NUD_NOARP,
                0,
                &[rtattr(NDA_DST, &[224, 0, 0, 1]), lladdr.clone()],
            ),
            neigh(AF_INET6, 2, 0, 0, &[rtattr(NDA_DST, &ip6("ff02::1"))]),
            // ... unless externally learned.
            neigh(
                AF_INET,
                9,
                0,
                NTF_EXT_LEARNED,
                &[rtattr(NDA_DST, &[192, 0, 2, 7])],
            ),
            neigh(
                AF_INET,
                3,
                0x80 | 0x02,
                NTF_PROXY,
                &[
                    rtattr(NDA_DST, &[10, 9, 9, 2]),
                    rtattr(NDA_LLADDR, &[10, 9, 9, 2]),
                ],
            ),
            neigh(AF_INET, 2, 0x02, 0, std::slice::from_ref(&lladdr)),
            neigh(AF_INET, 0, 0x02, 0, &[rtattr(NDA_DST, &[192, 0, 2, 3])]),
            neigh(7, 2, 0x02, 0, &[rtattr(NDA_DST, &[192, 0, 2, 3])]),
        ];
        let got = run_dump(&payloads, RTM_NEWNEIGH, |p| parse_neighbor(p, &links));
        let n = |i: &str, ip_text: &str, m: Option<Mac>, s: Option<&str>| Neighbor {
            interface: i.into(),
            ip_address: ip(ip_text),
            mac_address: m,
            state: s.map(String::from),
        };
        assert_eq!(
            got,
            vec![
                n("eth0", "192.0.2.1", mac("02:fc:00:00:00:05"), Some("stale")),
                n("eth0", "fd00::1", None, Some("failed")),
                n("if9", "192.0.2.7", None, None),
                n("gre1", "10.9.9.2", None, Some("reachable")),
            ]
        );
    }

    #[test]
    fn routes_follow_ip_route_show() {
        let links = sample_link_table();
        let oif = |i: u32| rtattr(RTA_OIF, &i.to_ne_bytes());
        let mut nexthops = Vec::new();
        for (gw, dev) in [([192, 0, 2, 1], 2u32), ([10, 9, 9, 2], 3)] {
            let gateway = rtattr(RTA_GATEWAY, &gw);
            nexthops.extend(((8 + gateway.len()) as u16).to_ne_bytes());
            nexthops.extend([0, 0]);
            nexthops.extend(dev.to_ne_bytes());
            nexthops.extend(gateway);
        }
        let main = RT_TABLE_MAIN as u8;
        let payloads = vec![
            route(
                0,
                main,
                1,
                &[
                    rtattr(RTA_TABLE, &254u32.to_ne_bytes()),
                    rtattr(RTA_GATEWAY, &[192, 0, 2, 1]),
                    oif(2),
                ],
            ),
            route(
                24,
                main,
                1,
                &[
                    rtattr(RTA_DST, &[192, 0, 2, 0]),
                    oif(2),
                    rtattr(RTA_PREFSRC, &[192, 0, 2, 2]),
                ],
            ),
            route(32, main, 1, &[rtattr(RTA_DST, &[10, 9, 9, 2]), oif(3)]),
            route(8, main, 6, &[rtattr(RTA_DST, &[10, 0, 0, 0])]),
            route(
                24,
                main,
                1,
                &[
                    rtattr(RTA_DST, &[198, 51, 100, 0]),
                    rtattr(RTA_MULTIPATH, &nexthops),
                ],
            ),
            route(24, main, 1, &[rtattr(RTA_DST, &[203, 0, 113, 0]), oif(55)]),
            // Other tables (local, a VRF's in RTA_TABLE) and clones are not in `ip route show`.
            route(32, 255, 2, &[rtattr(RTA_DST, &[127, 0, 0, 1]), oif(1)]),
            route(
                0,
                252,
                1,
                &[rtattr(RTA_TABLE, &1000u32.to_ne_bytes()), oif(2)],
            ),
            route(33, main, 1, &[rtattr(RTA_DST, &[10, 0, 0, 0])]),
            route(24, main, 1, &[rtattr(RTA_DST, &[10, 0])]),
        ];
        let mut cloned = route(32, main, 1, &[rtattr(RTA_DST, &[192, 0, 2, 50]), oif(2)]);
        cloned[8..12].copy_from_slice(&RTM_F_CLONED.to_ne_bytes());
        let mut v6 = route(0, main, 1, &[oif(2)]);
        v6[0] = AF_INET6;
        let mut all = payloads;
        all.push(cloned);
        all.push(v6);
        let got = run_dump(&all, RTM_NEWROUTE, |p| parse_route(p, &links));
        let r = |d: &str, g: Option<&str>, i: Option<&str>, s: Option<&str>| Route {
            destination: d.into(),
            gateway: g.map(ip),
            interface: i.map(String::from),
            source_ip: s.map(ip),
        };
        assert_eq!(
            got,
            vec![
                r("default", Some("192.0.2.1"), Some("eth0"), None),
                r("192.0.2.0/24", None, Some("eth0"), Some("192.0.2.2")),
                r("10.9.9.2", None, Some("gre1"), None),
                r("10.0.0.0/8", None, None, None),
                r("198.51.100.0/24", None, None, None),
                r("203.0.113.0/24", None, Some("if55"), None),
            ]
        );
    }

    #[test]
    fn dump_ignores_foreign_messages_and_reports_errors() {
        let mut seen = Vec::new();
        let mut dump = Dump::new(SEQ, PORT);
        let mut datagram = nlmsg(RTM_NEWLINK, 0, SEQ + 1, b"old dump");
        datagram.extend(nlmsg(RTM_NEWLINK, 0, SEQ, b"ours"));
        let mut foreign_port = nlmsg(RTM_NEWLINK, 0, SEQ, b"other port");
        foreign_port[12..16].copy_from_slice(&1u32.to_ne_bytes());
        datagram.extend(foreign_port);
        datagram.extend(nlmsg(NLMSG_NOOP, 0, SEQ, b""));
        let step = dump
            .feed(&datagram, &mut |k, p| seen.push((k, p.to_vec())))
            .unwrap();
        assert_eq!(step, Step::More);
        assert_eq!(seen, vec![(RTM_NEWLINK, b"ours".to_vec())]);

        let mut error = (-libc::EBUSY).to_ne_bytes().to_vec();
        error.extend([0; 16]);
        let err = Dump::new(SEQ, PORT)
            .feed(&nlmsg(NLMSG_ERROR, 0, SEQ, &error), &mut |_, _| {})
            .unwrap_err();
        assert!(err.0.contains("busy"), "{err}");
        let failed_done = nlmsg(NLMSG_DONE, 0, SEQ, &(-libc::EINVAL).to_ne_bytes());
        assert!(Dump::new(SEQ, PORT)
            .feed(&failed_done, &mut |_, _| {})
            .is_err());
        let bare_done = nlmsg(NLMSG_DONE, 0, SEQ, &[]);
        assert_eq!(
            Dump::new(SEQ, PORT)
                .feed(&bare_done, &mut |_, _| {})
                .unwrap(),
            Step::Done
        );
    }

    #[test]
    fn dump_flags_interrupted_dumps() {
        let mut dump = Dump::new(SEQ, PORT);
        let mut datagram = nlmsg(RTM_NEWLINK, NLM_F_DUMP_INTR, SEQ, b"x");
        datagram.extend(done(SEQ));
        assert_eq!(dump.feed(&datagram, &mut |_, _| {}).unwrap(), Step::Done);
        assert!(dump.interrupted());
    }

    #[test]
    fn framing_stops_at_impossible_lengths() {
        let good = nlmsg(RTM_NEWLINK, 0, SEQ, b"abcd");
        for bad_len in [0u32, 15, 1000, u32::MAX] {
            let mut datagram = good.clone();
            let mut bad = good.clone();
            bad[0..4].copy_from_slice(&bad_len.to_ne_bytes());
            datagram.extend(bad);
            let mut walk = messages(&datagram);
            assert_eq!(walk.by_ref().count(), 1, "len {bad_len}");
            assert!(walk.malformed());
        }
        let cut = &good[..good.len() - 1];
        assert_eq!(messages(cut).count(), 0);
        let attr_bytes = [rtattr(1, b"ok"), vec![3, 0, 2, 0, 9, 9]].concat();
        assert_eq!(
            attrs(&attr_bytes).collect::<Vec<_>>(),
            vec![(1, &b"ok"[..])]
        );
        // The last attribute may lack its padding; a zero length ends the walk.
        assert_eq!(
            attrs(&[5, 0, 1, 0, 7]).collect::<Vec<_>>(),
            vec![(1, &[7u8][..])]
        );
        assert_eq!(attrs(&[0, 0, 1, 0, 7, 0, 0, 0]).count(), 0);
    }

    /// Every parser on one payload, as the fuzz tests feed them.
    fn parse_everything(payload: &[u8], links: &Links) {
        let _ = parse_link(payload);
        let _ = parse_address(payload, links);
        let _ = parse_neighbor(payload, links);
        let _ = parse_route(payload, links);
        let _ = crate::collect::sockdiag::parse_inet_diag(payload, crate::model::Protocol::Tcp);
    }

    fn valid_datagrams() -> Vec<Vec<u8>> {
        let links = sample_links();
        let mut all: Vec<Vec<u8>> = links
            .iter()
            .map(|p| nlmsg(RTM_NEWLINK, 0, SEQ, p))
            .collect();
        all.push(nlmsg(
            RTM_NEWADDR,
            0,
            SEQ,
            &addr(AF_INET6, 64, 2, &[rtattr(IFA_ADDRESS, &ip6("fd00::2"))]),
        ));
        all.push(nlmsg(
            RTM_NEWNEIGH,
            0,
            SEQ,
            &neigh(
                AF_INET,
                2,
                4,
                0,
                &[rtattr(NDA_DST, &[1, 2, 3, 4]), rtattr(NDA_LLADDR, &[1; 6])],
            ),
        ));
        all.push(nlmsg(
            RTM_NEWROUTE,
            0,
            SEQ,
            &route(
                24,
                254,
                1,
                &[
                    rtattr(RTA_DST, &[10, 0, 0, 0]),
                    rtattr(RTA_OIF, &2u32.to_ne_bytes()),
                    rtattr(
                        RTA_MULTIPATH,
                        &[12, 0, 0, 0, 2, 0, 0, 0, 8, 0, 5, 0, 1, 2, 3, 4],
                    ),
                ],
            ),
        ));
        all.push(done(SEQ));
        all.push(all.concat());
        all
    }

    #[test]
    fn random_bytes_never_panic_or_hang() {
        let links = sample_link_table();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for round in 0..20_000 {
            let len = rng.below(if round % 10 == 0 { 4096 } else { 96 });
            let buf = rng.bytes(len);
            parse_everything(&buf, &links);
            assert!(attrs(&buf).count() <= buf.len() / 4 + 1);
            assert!(messages(&buf).count() <= buf.len() / NLMSG_HDRLEN + 1);
            let mut dump = Dump::new(u32_at(&buf, 8).unwrap_or(0), u32_at(&buf, 12).unwrap_or(0));
            let _ = dump.feed(&buf, &mut |_, p| parse_everything(p, &links));
        }
    }

    #[test]
    fn mutated_messages_never_panic_or_hang() {
        let links = sample_link_table();
        let valid = valid_datagrams();
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        for _ in 0..30_000 {
            let original = &valid[rng.below(valid.len())];
            let buf = mutate(&mut rng, original);
            let mut dump = Dump::new(SEQ, PORT);
            let _ = dump.feed(&buf, &mut |_, p| parse_everything(p, &links));
            for message in messages(&buf) {
                parse_everything(message.payload, &links);
                for (_, data) in attrs(message.payload) {
                    parse_everything(data, &links);
                }
            }
        }
    }

    #[test]
    fn dump_gives_up_on_endless_replies() {
        let mut dump = Dump::new(SEQ, PORT);
        dump.max_datagrams = 1000;
        let datagram = nlmsg(RTM_NEWLINK, 0, SEQ, b"x");
        let mut rounds = 0;
        while dump.feed(&datagram, &mut |_, _| {}).is_ok() {
            rounds += 1;
        }
        assert_eq!(rounds, 1000);
    }

    #[test]
    fn live_kernel_tables_are_readable() {
        let addresses = addresses().expect("addresses");
        assert!(
            addresses.iter().all(|a| a.interface != "lo"),
            "{addresses:?}"
        );
        routes().expect("routes");
        neighbors().expect("neighbours");
    }

    /// What `ip -json` prints on this host, when `ip` is installed.
    fn ip_json(args: &[&str]) -> Option<miniserde::json::Value> {
        let out = std::process::Command::new("ip").args(args).output().ok()?;
        if !out.status.success() {
            return None;
        }
        miniserde::json::from_str(std::str::from_utf8(&out.stdout).ok()?).ok()
    }

    fn field<'a>(obj: &'a miniserde::json::Object, key: &str) -> Option<&'a str> {
        match obj.get(key)? {
            miniserde::json::Value::String(s) => Some(s),
            _ => None,
        }
    }

    fn objects(value: &miniserde::json::Value) -> Vec<&miniserde::json::Object> {
        match value {
            miniserde::json::Value::Array(items) => items
                .iter()
                .filter_map(|v| match v {
                    miniserde::json::Value::Object(o) => Some(o),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn live_addresses_and_routes_match_ip_json() {
        use miniserde::json::Value;
        let Some(addr_json) = ip_json(&["-json", "addr", "show"]) else {
            return;
        };
        let mut expected = Vec::new();
        for link in objects(&addr_json) {
            let loopback = field(link, "link_type") == Some("loopback")
                || matches!(link.get("flags"), Some(Value::Array(f))
                    if f.iter().any(|v| matches!(v, Value::String(s) if s == "LOOPBACK")));
            if loopback {
                continue;
            }
            let mac_address = field(link, "address").and_then(Mac::parse);
            let Some(info) = link.get("addr_info") else {
                continue;
            };
            for a in objects(info) {
                let prefix = match a.get("prefixlen") {
                    Some(Value::Number(n)) => n.to_string().parse().unwrap(),
                    _ => panic!("prefixlen"),
                };
                expected.push(Address {
                    interface: field(link, "ifname").unwrap().to_string(),
                    ip_address: crate::model::parse_ip(field(a, "local").unwrap()).unwrap(),
                    prefix_length: prefix,
                    mac_address,
                });
            }
        }
        let mut got = addresses().unwrap();
        got.sort();
        expected.sort();
        assert_eq!(got, expected);

        let route_json = ip_json(&["-json", "route", "show"]).unwrap();
        let mut expected: Vec<Route> = objects(&route_json)
            .into_iter()
            .map(|r| Route {
                destination: field(r, "dst").unwrap().to_string(),
                gateway: field(r, "gateway").and_then(crate::model::parse_ip),
                interface: field(r, "dev").map(String::from),
                source_ip: field(r, "prefsrc").and_then(crate::model::parse_ip),
            })
            .collect();
        let mut got = routes().unwrap();
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
    }
}
