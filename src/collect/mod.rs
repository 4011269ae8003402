//! Collection of the four tables, each from the first source that works.
//!
//! Sources: the kernel over netlink (`netlink`, `sockdiag`), `/proc` text (`procfs`), and the
//! external commands of the earlier agent (`commands`). Each source turns its raw input into
//! [`crate::model`] records; this module picks sources per table and applies the normalisation
//! every source shares.

pub mod cgroup;
pub mod commands;
pub mod namespaces;
pub mod netlink;
pub mod procfs;
pub mod sockdiag;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use std::net::IpAddr;

use crate::model::{Address, ConnState, Connection, Protocol, Snapshot};
pub use namespaces::Scope;

/// Why one source could not serve one table. Never fatal: the caller falls back or leaves the
/// table empty with a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError(pub String);

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A socket as a source lists it, before wildcard expansion. `inode` (0 when unknown) links it to
/// the `socket:[inode]` entries under `/proc/<pid>/fd`; `dual_stack` is true only for an IPv6
/// socket bound to `::` that is known to accept IPv4 too (not `IPV6_V6ONLY`; `ss` prints its
/// address as `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    pub connection: Connection,
    pub inode: u64,
    pub dual_stack: bool,
}

impl Socket {
    /// A socket as the kernel describes it (inet_diag or `/proc/net`): addresses, ports and the
    /// kernel's state number. A remote port of 0 (listener, unconnected UDP) becomes `None`.
    pub fn from_kernel(
        protocol: Protocol,
        local: (IpAddr, u16),
        remote: (IpAddr, u16),
        state: u8,
        inode: u64,
        dual_stack: bool,
    ) -> Socket {
        let state = match protocol {
            Protocol::Tcp => ConnState::from_tcp_code(state),
            Protocol::Udp => ConnState::for_udp(state),
        };
        Socket {
            connection: Connection {
                protocol,
                local_ip: local.0,
                local_port: local.1,
                remote_ip: Some(remote.0),
                remote_port: (remote.1 != 0).then_some(remote.1),
                state: Some(state),
                pid: None,
                process_name: None,
            },
            inode,
            dual_stack,
        }
    }
}

/// Which sources may serve the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Kernel first, then `/proc`, then the commands, per table.
    Auto,
    /// Kernel interfaces and `/proc` only.
    Native,
    /// The earlier agent's external commands only.
    Commands,
}

/// Which tables the policy lets us collect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tables {
    pub addresses: bool,
    pub neighbors: bool,
    pub routes: bool,
    pub connections: bool,
}

impl Default for Tables {
    fn default() -> Tables {
        Tables {
            addresses: true,
            neighbors: true,
            routes: true,
            connections: true,
        }
    }
}

/// Everything collection needs to know.
#[derive(Clone, Debug)]
pub struct Options {
    pub mode: Mode,
    pub proc_root: PathBuf,
    pub command_timeout: Duration,
    pub tables: Tables,
    /// Whether other network namespaces' sockets are reported too.
    pub namespaces: Scope,
}

impl Mode {
    /// The name used in flags, logs and report metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Native => "native",
            Mode::Commands => "commands",
        }
    }
}

type Source<'a, T> = (
    &'static str,
    Box<dyn Fn() -> Result<Vec<T>, SourceError> + 'a>,
);

/// Tries each source in turn; the first that works serves the table. When none works the
/// operator is told why, and the reason is returned: an unreadable table is not an empty one.
fn first_working<T>(table: &str, sources: Vec<Source<'_, T>>) -> Result<Vec<T>, String> {
    let mut reasons = Vec::new();
    for (name, source) in sources {
        match source() {
            Ok(records) => {
                debug!("{table}: {} records from {name}", records.len());
                return Ok(records);
            }
            Err(e) => {
                debug!("{table}: {name} failed: {e}");
                reasons.push(format!("{name}: {e}"));
            }
        }
    }
    let reason = reasons.join("; ");
    warn!("{table} could not be collected ({reason}); the server keeps its last records of it");
    Err(reason)
}

/// The table's records, or none with the reason noted in `failed[t]`.
fn served<T>(failed: &mut [Option<String>; 4], t: usize, result: Result<Vec<T>, String>) -> Vec<T> {
    result.unwrap_or_else(|why| {
        failed[t] = Some(why);
        Vec::new()
    })
}

/// The sources the mode allows, in the order they are tried: kernel first, commands last.
fn chain<'a, T>(
    opts: &Options,
    native: Vec<Source<'a, T>>,
    command: Source<'a, T>,
) -> Vec<Source<'a, T>> {
    match opts.mode {
        Mode::Auto => native.into_iter().chain([command]).collect(),
        Mode::Native => native,
        Mode::Commands => vec![command],
    }
}

/// The interface addresses alone (for the registration); empty when no source works.
pub fn addresses(opts: &Options) -> Vec<Address> {
    addresses_or_why(opts).unwrap_or_default()
}

fn addresses_or_why(opts: &Options) -> Result<Vec<Address>, String> {
    let t = opts.command_timeout;
    let sources = chain(
        opts,
        vec![("netlink", Box::new(netlink::addresses))],
        (
            "ip -json addr show",
            Box::new(move || commands::addresses(t)),
        ),
    );
    let mut list = first_working("addresses", sources)?;
    finish_addresses(&mut list);
    list.sort();
    list.dedup();
    Ok(list)
}

/// What one collection produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub snapshot: Snapshot,
    /// Records left out because the server would refuse them (no valid address to report).
    pub left_out: usize,
    /// Why each table that no source could read failed, in report order (addresses,
    /// neighbors, connections, routes); `None` for a table that was read or is off by policy.
    /// Such a table is empty in `snapshot`, but is not known to be empty.
    pub failed: [Option<String>; 4],
    /// The other network namespaces whose sockets are in `snapshot`.
    pub namespaces: namespaces::Namespaces,
}

/// Collects every table the policy enables and applies the shared normalisation. `known`
/// gives the addresses the server last accepted, asked only when no source can read the
/// addresses now (reading them means reading the saved snapshot): wildcard listeners are then
/// expanded over those rather than left out (left out, they would count as removed and come
/// back as new).
pub fn collect(opts: &Options, known: &mut dyn FnMut() -> Vec<Address>) -> Collected {
    let t = opts.command_timeout;
    let proc_root = opts.proc_root.as_path();
    let on = opts.tables;
    let mut failed: [Option<String>; 4] = Default::default();
    // Wildcard listeners are expanded over the addresses, so they are read even when the
    // policy does not report them.
    let mut addresses_failed = false;
    let addresses = if on.addresses || on.connections {
        addresses_or_why(opts).unwrap_or_else(|why| {
            if on.addresses {
                failed[0] = Some(why);
            }
            addresses_failed = true;
            Vec::new()
        })
    } else {
        Vec::new()
    };
    let neighbors = if on.neighbors {
        let sources = chain(
            opts,
            vec![("netlink", Box::new(netlink::neighbors))],
            (
                "ip -json neigh show",
                Box::new(move || commands::neighbors(t)),
            ),
        );
        served(&mut failed, 1, first_working("neighbors", sources))
    } else {
        Vec::new()
    };
    let routes = if on.routes {
        let sources = chain(
            opts,
            vec![("netlink", Box::new(netlink::routes))],
            ("ip -json route show", Box::new(move || commands::routes(t))),
        );
        served(&mut failed, 3, first_working("routes", sources))
    } else {
        Vec::new()
    };
    // Owners are attached after the one /proc walk below, whichever source served.
    let sockets = if on.connections {
        let sources = chain(
            opts,
            vec![
                ("sock_diag", Box::new(sockdiag::sockets)),
                ("/proc/net", Box::new(move || procfs::sockets(proc_root))),
            ],
            (
                "ss -tunapH / netstat -tunap",
                Box::new(move || commands::sockets(t)),
            ),
        );
        served(&mut failed, 2, first_working("connections", sources))
    } else {
        Vec::new()
    };
    // With no addresses accepted either (a first run), such listeners are left out and
    // counted in `left_out`: freezing the whole table instead would hold back every other
    // connection for as long as the addresses fail.
    let accepted = if addresses_failed {
        known()
    } else {
        Vec::new()
    };
    let over = if accepted.is_empty() {
        &addresses
    } else {
        debug!(
            "listeners on every address expanded over the {} addresses last accepted",
            accepted.len()
        );
        &accepted
    };
    let (sockets, others) = owned_sockets(opts, sockets);
    let (mut connections, mut unexpanded) = expand_wildcards(sockets, over);
    let mut namespaces = namespaces::Namespaces {
        over_cap: others.as_ref().map_or(0, namespaces::Discovery::over_cap),
        ..Default::default()
    };
    let found = others.map(|d| d.found).unwrap_or_default();
    // Room for every namespace's records at once: the list grows once, not per namespace.
    connections.reserve(found.iter().map(|ns| ns.sockets.len()).sum());
    for ns in found {
        let (summary, left) = namespaces::report_into(ns, &mut connections);
        unexpanded += left;
        namespaces.list.push(summary);
    }
    let mut snapshot = Snapshot {
        connections,
        addresses: if on.addresses { addresses } else { Vec::new() },
        neighbors,
        routes,
    };
    let left_out = unexpanded + finish(&mut snapshot);
    if left_out > 0 {
        debug!("{left_out} records left out: no address the server would accept");
    }
    Collected {
        snapshot,
        left_out,
        failed,
        namespaces,
    }
}

/// Without its own namespace's inode the agent cannot tell other namespaces from its own;
/// where that is expected (a sandbox hiding `ns/`), `--namespaces own` says so once and for all.
const OWN_NAMESPACE_UNREADABLE: &str = "cannot read this process's network namespace \
    (/proc/self/ns/net), so other namespaces cannot be told apart; only this namespace's sockets \
    are reported. If that is what you want, pass --namespaces own (GRAPHEON_AGENT_NAMESPACES=own) \
    and this warning goes away";

/// Owners for the agent's own sockets and, with [`Scope::All`], the other network
/// namespaces with their sockets and owners, all from one walk over `/proc`.
fn owned_sockets(
    opts: &Options,
    sockets: Vec<Socket>,
) -> (Vec<Socket>, Option<namespaces::Discovery>) {
    let proc_root = opts.proc_root.as_path();
    let own = match (opts.namespaces, opts.tables.connections) {
        (Scope::All, true) => namespaces::own_inode(proc_root),
        _ => None,
    };
    if opts.namespaces == Scope::All && opts.tables.connections && own.is_none() {
        warn!("{OWN_NAMESPACE_UNREADABLE}");
    }
    let (sockets, discovery) =
        namespaces::walk(proc_root, sockets, own, namespaces::MAX_NAMESPACES);
    if let Some(d) = &discovery {
        let over_cap = d.over_cap();
        if over_cap > 0 {
            warn!(
                "{over_cap} network namespaces left out: at most {} are collected per run",
                namespaces::MAX_NAMESPACES
            );
        }
        debug!(
            "other network namespaces: {} collected, {} with unreadable socket tables, {} processes whose namespace could not be read",
            d.found.len(),
            d.failed(),
            d.unreadable
        );
    }
    (sockets, discovery)
}

/// Reports a socket bound to every address once per local address of its family (IPv4 for
/// `0.0.0.0`; IPv6, and IPv4 too when dual-stack, for `::`): the server stores every
/// `local_ip` as a host and refuses the whole check-in for an unspecified one.
pub fn expand_wildcards(sockets: Vec<Socket>, addresses: &[Address]) -> (Vec<Connection>, usize) {
    let ips: Vec<IpAddr> = addresses.iter().map(|a| a.ip_address).collect();
    expand(sockets, &ips)
}

/// [`expand_wildcards`] over bare addresses.
pub(crate) fn expand(sockets: Vec<Socket>, addresses: &[IpAddr]) -> (Vec<Connection>, usize) {
    let mut out = Vec::with_capacity(sockets.len());
    let left_out = expand_into(sockets, addresses, &mut out);
    (out, left_out)
}

/// [`expand`] appending to `out`; returns the sockets left out.
pub(crate) fn expand_into(
    sockets: Vec<Socket>,
    addresses: &[IpAddr],
    out: &mut Vec<Connection>,
) -> usize {
    let mut left_out = 0;
    for socket in sockets {
        let c = socket.connection;
        if !c.local_ip.is_unspecified() {
            out.push(c);
            continue;
        }
        let v6 = c.local_ip.is_ipv6();
        let mut any = false;
        for ip in addresses {
            let wanted = if ip.is_ipv6() {
                v6
            } else {
                !v6 || socket.dual_stack
            };
            if wanted {
                any = true;
                out.push(Connection {
                    local_ip: *ip,
                    ..c.clone()
                });
            }
        }
        if !any {
            left_out += 1;
            debug!(
                "{} socket on {}:{} left out: no local address of its family to report it under",
                c.protocol.as_str(),
                c.local_ip,
                c.local_port
            );
        }
    }
    left_out
}

/// The server's length limits (in characters) for the strings we send.
const NAME_LIMIT: usize = 255;
const STATE_LIMIT: usize = 50;

fn finish_addresses(list: &mut Vec<Address>) {
    list.retain(|a| !a.ip_address.is_unspecified());
    for a in list.iter_mut() {
        crate::report::truncate_chars(&mut a.interface, NAME_LIMIT);
    }
}

/// The server refuses a whole check-in for one bad record: records whose address cannot be
/// valid are dropped (and counted in a log line), strings are shortened to the server's limits.
/// Returns how many records were left out.
fn finish(s: &mut Snapshot) -> usize {
    use crate::report::truncate_chars;
    let before = s.addresses.len() + s.neighbors.len() + s.connections.len();
    finish_addresses(&mut s.addresses);
    s.neighbors.retain(|n| !n.ip_address.is_unspecified());
    s.connections.retain(|c| !c.local_ip.is_unspecified());
    let dropped = before - s.addresses.len() - s.neighbors.len() - s.connections.len();
    for n in &mut s.neighbors {
        truncate_chars(&mut n.interface, NAME_LIMIT);
        if let Some(state) = &mut n.state {
            truncate_chars(state, STATE_LIMIT);
        }
    }
    for c in &mut s.connections {
        // Shared with the process's other sockets: a long one is replaced, not cut in place.
        if let Some(name) = c
            .process_name
            .as_mut()
            .filter(|n| n.chars().nth(NAME_LIMIT).is_some())
        {
            let mut cut = name.to_string();
            truncate_chars(&mut cut, NAME_LIMIT);
            *name = cut.into();
        }
    }
    for r in &mut s.routes {
        truncate_chars(&mut r.destination, NAME_LIMIT);
        if let Some(i) = &mut r.interface {
            truncate_chars(i, NAME_LIMIT);
        }
    }
    s.normalize();
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Neighbor;

    #[test]
    fn an_unreadable_own_namespace_points_at_namespaces_own() {
        assert_eq!(
            OWN_NAMESPACE_UNREADABLE,
            "cannot read this process's network namespace (/proc/self/ns/net), so other \
             namespaces cannot be told apart; only this namespace's sockets are reported. If \
             that is what you want, pass --namespaces own (GRAPHEON_AGENT_NAMESPACES=own) and \
             this warning goes away"
        );
    }

    fn addr(ip: &str) -> Address {
        Address {
            interface: "eth0".into(),
            ip_address: ip.parse().unwrap(),
            prefix_length: 24,
            mac_address: None,
        }
    }

    fn listener(ip: &str, port: u16, dual_stack: bool) -> Socket {
        Socket {
            connection: Connection {
                protocol: Protocol::Tcp,
                local_ip: ip.parse().unwrap(),
                local_port: port,
                remote_ip: Some(ip.parse().unwrap()),
                remote_port: None,
                state: Some(ConnState::Listen),
                pid: Some(7),
                process_name: Some("sshd".into()),
            },
            inode: 1,
            dual_stack,
        }
    }

    fn local_ips(c: &[Connection]) -> Vec<(String, u16)> {
        c.iter()
            .map(|c| (c.local_ip.to_string(), c.local_port))
            .collect()
    }

    #[test]
    fn wildcard_listener_is_expanded_to_local_addresses() {
        let addresses = [
            addr("10.0.0.5"),
            addr("192.168.7.2"),
            addr("fd00::5"),
            addr("fe80::1"),
        ];
        let sockets = vec![
            listener("0.0.0.0", 22, false),
            listener("::", 80, false),
            listener("::", 443, true),
            listener("127.0.0.1", 631, false),
        ];
        let (out, left_out) = expand_wildcards(sockets, &addresses);
        assert_eq!(left_out, 0);
        assert_eq!(
            local_ips(&out),
            [
                ("10.0.0.5", 22),
                ("192.168.7.2", 22),
                ("fd00::5", 80),
                ("fe80::1", 80),
                ("10.0.0.5", 443),
                ("192.168.7.2", 443),
                ("fd00::5", 443),
                ("fe80::1", 443),
                ("127.0.0.1", 631),
            ]
            .map(|(a, p)| (a.to_string(), p))
        );
        // The remote side stays as the kernel reported it (unspecified is fine there).
        assert_eq!(out[0].remote_ip, Some("0.0.0.0".parse().unwrap()));
        assert_eq!(out[0].pid, Some(7));
    }

    #[test]
    fn wildcard_without_an_address_of_its_family_is_left_out() {
        let (out, left_out) = expand_wildcards(
            vec![listener("::", 22, false), listener("0.0.0.0", 68, false)],
            &[addr("fd00::5")],
        );
        assert_eq!(local_ips(&out), [("fd00::5".to_string(), 22)]);
        assert_eq!(left_out, 1, "the IPv4 listener is counted");
    }

    #[test]
    fn long_strings_are_cut_and_unspecified_records_dropped() {
        let mut s = Snapshot {
            addresses: vec![
                Address {
                    interface: "x".repeat(300),
                    ..addr("10.0.0.1")
                },
                addr("0.0.0.0"),
            ],
            neighbors: vec![Neighbor {
                interface: "eth0".into(),
                ip_address: "::".parse().unwrap(),
                mac_address: None,
                state: Some("stale".into()),
            }],
            connections: vec![Connection {
                process_name: Some("p".repeat(400).into()),
                ..listener("10.0.0.1", 1, false).connection
            }],
            routes: vec![],
        };
        assert_eq!(
            finish(&mut s),
            2,
            "the 0.0.0.0 address and the :: neighbour"
        );
        assert_eq!(s.addresses.len(), 1);
        assert_eq!(s.addresses[0].interface.len(), 255);
        assert!(s.neighbors.is_empty());
        assert_eq!(
            s.connections[0].process_name.as_deref().map(str::len),
            Some(255)
        );
    }
}
