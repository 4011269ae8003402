//! The records the agent reports, as typed values.
//!
//! Every collector (external commands, netlink, `/proc`) turns its raw input into these types at
//! the edge, so the rest of the program never re-checks an address, a MAC or a state. Field names
//! and normalisation follow the server contract and the earlier agent.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

/// A six-octet link-layer address: the only shape the server accepts as `mac_address`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Parses `aa:bb:cc:dd:ee:ff` or `aa-bb-cc-dd-ee-ff` (any case); anything else is `None`.
    pub fn parse(text: &str) -> Option<Mac> {
        let bytes = text.as_bytes();
        if bytes.len() != 17 {
            return None;
        }
        let mut out = [0u8; 6];
        for (i, octet) in out.iter_mut().enumerate() {
            let at = i * 3;
            if i > 0 && !matches!(bytes[at - 1], b':' | b'-') {
                return None;
            }
            let hi = hex_value(bytes[at])?;
            let lo = hex_value(bytes[at + 1])?;
            *octet = hi << 4 | lo;
        }
        Some(Mac(out))
    }

    /// A raw link-layer address: only six octets make a MAC. Tunnels carry four bytes, InfiniBand
    /// twenty, some virtual links none; all of those become `None` (the server refuses them).
    pub fn from_bytes(bytes: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(bytes).ok().map(Mac)
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Parses an address as tools print it: brackets (`[::1]`) and a zone suffix (`fe80::1%eth0`) are
/// removed, and an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) becomes the IPv4 address, which
/// the server would otherwise store as a second host for the same machine.
pub fn parse_ip(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let text = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    let text = text.split('%').next().unwrap_or(text);
    text.parse::<IpAddr>().ok().map(canonical_ip)
}

/// Maps IPv4-mapped IPv6 addresses to IPv4; every other address is returned unchanged.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// An address from raw kernel bytes (4 or 16 octets, network order), canonicalised.
pub fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        16 => {
            let octets: [u8; 16] = bytes.try_into().ok()?;
            Some(canonical_ip(IpAddr::V6(Ipv6Addr::from(octets))))
        }
        _ => None,
    }
}

/// Transport protocol of a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The contract's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// Accepts `tcp`, `udp`, `tcp6`, `udp6` (as `ss` and `netstat` print them).
    pub fn parse(text: &str) -> Option<Protocol> {
        // The contract's spelling, as every saved record has it, needs no lowercase copy.
        match text {
            "tcp" => return Some(Protocol::Tcp),
            "udp" => return Some(Protocol::Udp),
            _ => {}
        }
        match text.trim().to_ascii_lowercase().as_str() {
            "tcp" | "tcp6" => Some(Protocol::Tcp),
            "udp" | "udp6" => Some(Protocol::Udp),
            _ => None,
        }
    }
}

/// Socket state in the contract's vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConnState {
    Listen,
    Established,
    TimeWait,
    CloseWait,
    FinWait1,
    FinWait2,
    SynRecv,
    SynSent,
    Closing,
    LastAck,
    Closed,
    Unknown,
}

impl ConnState {
    const ALL: [ConnState; 12] = [
        ConnState::Established,
        ConnState::Listen,
        ConnState::TimeWait,
        ConnState::CloseWait,
        ConnState::FinWait1,
        ConnState::FinWait2,
        ConnState::SynRecv,
        ConnState::SynSent,
        ConnState::Closing,
        ConnState::LastAck,
        ConnState::Closed,
        ConnState::Unknown,
    ];

    /// The contract's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Listen => "listen",
            ConnState::Established => "established",
            ConnState::TimeWait => "time_wait",
            ConnState::CloseWait => "close_wait",
            ConnState::FinWait1 => "fin_wait1",
            ConnState::FinWait2 => "fin_wait2",
            ConnState::SynRecv => "syn_recv",
            ConnState::SynSent => "syn_sent",
            ConnState::Closing => "closing",
            ConnState::LastAck => "last_ack",
            ConnState::Closed => "closed",
            ConnState::Unknown => "unknown",
        }
    }

    /// Maps a state as `ss`, `netstat` or the contract print it (`ESTAB`, `estab`, `FIN-WAIT-1`,
    /// `FIN_WAIT1`, `UNCONN`, `established`, ...). Names it does not know become `Unknown`.
    pub fn parse(text: &str) -> ConnState {
        // The contract's own spellings (every saved record) are taken as they are, without
        // the normalised copy the tools' spellings need.
        if let Some(state) = ConnState::ALL.into_iter().find(|s| s.as_str() == text) {
            return state;
        }
        let norm: String = text
            .trim()
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .map(|c| c.to_ascii_lowercase())
            .collect();
        match norm.as_str() {
            "listen" => ConnState::Listen,
            "estab" | "established" => ConnState::Established,
            "timewait" => ConnState::TimeWait,
            "closewait" => ConnState::CloseWait,
            "finwait1" => ConnState::FinWait1,
            "finwait2" => ConnState::FinWait2,
            "synrecv" => ConnState::SynRecv,
            "synsent" => ConnState::SynSent,
            "closing" => ConnState::Closing,
            "lastack" => ConnState::LastAck,
            "close" | "closed" => ConnState::Closed,
            _ => ConnState::Unknown,
        }
    }

    /// The kernel's TCP state numbers (`include/net/tcp_states.h`), as in `/proc/net/tcp` and
    /// inet_diag. UDP sockets report 7 (`TCP_CLOSE`) when unconnected, which `ss` calls `UNCONN`:
    /// callers map UDP separately (see `for_udp`).
    pub fn from_tcp_code(code: u8) -> ConnState {
        match code {
            1 => ConnState::Established,
            2 => ConnState::SynSent,
            3 => ConnState::SynRecv,
            4 => ConnState::FinWait1,
            5 => ConnState::FinWait2,
            6 => ConnState::TimeWait,
            7 => ConnState::Closed,
            8 => ConnState::CloseWait,
            9 => ConnState::LastAck,
            10 => ConnState::Listen,
            11 => ConnState::Closing,
            _ => ConnState::Unknown,
        }
    }

    /// A UDP socket's state from the kernel's number: `ss` prints `ESTAB` for a connected UDP
    /// socket and `UNCONN` (→ `unknown`) for every other.
    pub fn for_udp(code: u8) -> ConnState {
        match code {
            1 => ConnState::Established,
            _ => ConnState::Unknown,
        }
    }
}

/// An interface address (loopback interfaces are never reported).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address {
    pub interface: String,
    pub ip_address: IpAddr,
    pub prefix_length: u8,
    pub mac_address: Option<Mac>,
}

/// A neighbour (ARP/NDP) entry. `state` is the lowercase kernel NUD name (`reachable`, `stale`,
/// `failed`, `permanent`, ...).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neighbor {
    pub interface: String,
    pub ip_address: IpAddr,
    pub mac_address: Option<Mac>,
    pub state: Option<String>,
}

/// A route of the main table. `destination` is `default` or `prefix/len` as `ip route` prints it
/// (a host route is printed without `/32`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub destination: String,
    pub gateway: Option<IpAddr>,
    pub interface: Option<String>,
    pub source_ip: Option<IpAddr>,
}

/// A process name, shared: every socket of one process (and every saved record of one name)
/// points at one allocation. At 200,000 sockets a `String` each was 24 bytes in the record and
/// a heap block beside it, for a few distinct names.
pub type ProcessName = Arc<str>;

/// Hands out one shared [`ProcessName`] per distinct name, for a reader that sees the same
/// names over and over (a saved snapshot: thousands of records, a few names).
#[derive(Debug, Default)]
pub struct Names(std::collections::BTreeSet<ProcessName>);

impl Names {
    /// The shared name equal to `name`, made on first sight.
    pub fn get(&mut self, name: &str) -> ProcessName {
        // A tree, not a sorted vector: a state file is untrusted, and one of 100,000 distinct
        // names would make a vector's inserts move gigabytes.
        if let Some(known) = self.0.get(name) {
            return known.clone();
        }
        let new = ProcessName::from(name);
        self.0.insert(new.clone());
        new
    }

    /// How many distinct names were handed out.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True before the first name.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A TCP or UDP socket with its owning process when known. A port of 0 on the remote side (a
/// listener, an unconnected UDP socket) is `None`, as `ss` prints `*`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Connection {
    pub protocol: Protocol,
    pub local_ip: IpAddr,
    pub local_port: u16,
    pub remote_ip: Option<IpAddr>,
    pub remote_port: Option<u16>,
    pub state: Option<ConnState>,
    pub pid: Option<u32>,
    pub process_name: Option<ProcessName>,
}

/// Everything one collection saw, each table sorted and free of duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub addresses: Vec<Address>,
    pub neighbors: Vec<Neighbor>,
    pub connections: Vec<Connection>,
    pub routes: Vec<Route>,
}

impl Snapshot {
    /// Sorts every table and removes duplicates, so that reports and deltas are deterministic.
    pub fn normalize(&mut self) {
        fn tidy<T: Ord>(v: &mut Vec<T>) {
            v.sort();
            v.dedup();
        }
        tidy(&mut self.addresses);
        tidy(&mut self.neighbors);
        tidy(&mut self.connections);
        tidy(&mut self.routes);
    }

    /// Number of records in all tables.
    pub fn len(&self) -> usize {
        self.addresses.len() + self.neighbors.len() + self.connections.len() + self.routes.len()
    }

    /// True when no table has a record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_accepts_only_six_octets_in_either_separator() {
        assert_eq!(
            Mac::parse("AE:ed:e2:ee:b9:cb").map(|m| m.to_string()),
            Some("ae:ed:e2:ee:b9:cb".to_string())
        );
        assert_eq!(
            Mac::parse("ae-ed-e2-ee-b9-cb"),
            Mac::parse("ae:ed:e2:ee:b9:cb")
        );
        assert_eq!(Mac::parse("192.0.2.8"), None);
        assert_eq!(Mac::parse("00:00:00:00"), None);
        assert_eq!(Mac::parse("ae:ed:e2:ee:b9:cb:00"), None);
        assert_eq!(Mac::parse("ae:ed:e2:ee:b9:cg"), None);
        assert_eq!(Mac::parse("aeX:d:e2:ee:b9:cb"), None);
        assert_eq!(Mac::from_bytes(&[192, 0, 2, 8]), None);
        assert_eq!(Mac::from_bytes(&[]), None);
        assert_eq!(
            Mac::from_bytes(&[1, 2, 3, 4, 5, 6]),
            Some(Mac([1, 2, 3, 4, 5, 6]))
        );
    }

    #[test]
    fn names_hand_out_one_shared_copy_per_distinct_name() {
        let mut names = Names::default();
        let a = names.get("nginx");
        let b = names.get("nginx");
        let c = names.get("sshd");
        assert_eq!((&*a, &*b, &*c), ("nginx", "nginx", "sshd"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(names.len(), 2);
    }

    #[test]
    fn ip_text_loses_brackets_zone_and_v4_mapping() {
        assert_eq!(parse_ip("[::1]"), Some("::1".parse().unwrap()));
        assert_eq!(parse_ip("fe80::1%eth0"), Some("fe80::1".parse().unwrap()));
        assert_eq!(parse_ip("[fe80::1%eth0]"), Some("fe80::1".parse().unwrap()));
        assert_eq!(
            parse_ip("::ffff:10.0.0.1"),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(parse_ip("*"), None);
        assert_eq!(parse_ip(""), None);
    }

    #[test]
    fn states_map_from_every_tool_spelling() {
        assert_eq!(ConnState::parse("ESTAB"), ConnState::Established);
        assert_eq!(ConnState::parse("FIN-WAIT-1"), ConnState::FinWait1);
        assert_eq!(ConnState::parse("FIN_WAIT2"), ConnState::FinWait2);
        assert_eq!(ConnState::parse("UNCONN"), ConnState::Unknown);
        assert_eq!(ConnState::parse("SYN-RECV"), ConnState::SynRecv);
        assert_eq!(ConnState::parse("weird"), ConnState::Unknown);
        assert_eq!(ConnState::from_tcp_code(10), ConnState::Listen);
        assert_eq!(ConnState::for_udp(7), ConnState::Unknown);
        assert_eq!(ConnState::TimeWait.as_str(), "time_wait");
    }
}
