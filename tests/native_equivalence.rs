//! The native collector (netlink, sock_diag, /proc) and the command collector (`ip -json`,
//! `ss`) report the same records, proved on a scene built in private network namespaces (see
//! `equivalence/world.rs`), and the native one needs no program at all. Runs as root (CI does);
//! as another user these tests fail with a message rather than pass without checking anything.

mod equivalence;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use equivalence::dry_run::{
    assert_same_tables, dry_run, dry_run_with, n, opt, record, s, DryRun, Records, TABLES,
};
use equivalence::holder::{self, Holder, Spec};
use equivalence::namespace::{require_root, Namespace};
use equivalence::world::{World, HOST_MAC, HOST_V4, HOST_V6, PEER_MAC};

/// Not a test: the entry point of the socket-holding child processes, which re-execute this
/// binary with `--exact socket_holder_child_process` (see `equivalence/holder.rs`). Under a
/// plain `cargo test` it returns at once.
#[test]
fn socket_holder_child_process() {
    holder::child_main();
}

fn path() -> String {
    std::env::var("PATH").unwrap_or_default()
}

fn address(ip: &str, prefix: u64) -> String {
    record(&[
        ("interface", s("eq0")),
        ("ip_address", s(ip)),
        ("mac_address", s(HOST_MAC)),
        ("prefix_length", n(prefix)),
    ])
}

fn neighbor(ip: &str, mac: &str, state: &str) -> String {
    record(&[
        ("interface", s("eq0")),
        ("ip_address", s(ip)),
        ("mac_address", s(mac)),
        ("state", s(state)),
    ])
}

fn route(destination: &str, gateway: Option<&str>, dev: Option<&str>, src: Option<&str>) -> String {
    record(&[
        ("destination", s(destination)),
        ("gateway", opt(gateway)),
        ("interface", opt(dev)),
        ("source_ip", opt(src)),
    ])
}

/// A process holding sockets.
#[derive(Clone, Copy)]
struct Owner {
    pid: u32,
    name: &'static str,
}

fn owner(h: &Holder, name: &'static str) -> Owner {
    Owner {
        pid: h.pid(name),
        name,
    }
}

fn connection(
    protocol: &str,
    local: &str,
    local_port: u16,
    remote: &str,
    remote_port: Option<u16>,
    state: &str,
    owner: Owner,
) -> String {
    record(&[
        ("local_ip", s(local)),
        ("local_port", n(local_port.into())),
        ("pid", n(owner.pid.into())),
        ("process_name", s(owner.name)),
        ("protocol", s(protocol)),
        ("remote_ip", s(remote)),
        (
            "remote_port",
            remote_port.map_or(miniserde::json::Value::Null, |p| n(p.into())),
        ),
        ("state", s(state)),
    ])
}

/// An address as the agent reports it: IPv4-mapped IPv6 as IPv4, without a zone.
fn reported(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or_else(|| v6.to_string(), |v4| v4.to_string()),
        v4 => v4.to_string(),
    }
}

/// A socket bound to one port: protocol, port, the addresses it is reported under, the remote
/// address it shows, its state and its owner.
type Listener<'a> = (&'a str, u16, &'a [&'a str], &'a str, &'a str, Owner);

/// Every record the agent must report for the scene, no more.
fn expected(world: &World) -> BTreeMap<&'static str, Records> {
    let addresses = [
        address("192.0.2.1", 24),
        address("198.51.100.1", 24),
        address("fd00:6761::1", 64),
        address("fe80::1", 64),
    ];
    // Learned by the client's connections to the peer; 192.0.2.98 (NOARP) is hidden as `ip
    // neigh show` hides it, and loopback has no neighbours.
    let neighbors = [
        neighbor("192.0.2.2", PEER_MAC, "reachable"),
        neighbor("fd00:6761::2", PEER_MAC, "reachable"),
        neighbor("192.0.2.97", "02:00:00:00:00:97", "stale"),
        neighbor("192.0.2.99", "02:00:00:00:00:99", "permanent"),
        neighbor("fd00:6761::99", "02:00:00:00:00:99", "permanent"),
    ];
    // IPv4 main table only: no IPv6 default, nothing from table 100 or the local table.
    let eq0 = Some("eq0");
    let gw = Some("192.0.2.2");
    let routes = [
        route("default", gw, eq0, None),
        route("192.0.2.0/24", None, eq0, Some("192.0.2.1")),
        route("198.51.100.0/24", None, eq0, Some("198.51.100.1")),
        route("203.0.113.7", gw, eq0, None),
        route("203.0.113.16/28", gw, eq0, Some("192.0.2.1")),
        route("203.0.113.32/27", None, None, None),
        route("203.0.113.64/26", None, None, None),
        route("203.0.113.128/25", None, None, None),
        route("203.0.113.192/26", None, None, None),
    ];

    let server = owner(&world.server, "ga-eq-server");
    let sharer = owner(&world.server, "ga-eq-sharer");
    let client = owner(&world.client, "ga-eq-client");
    // Both hold the listener on 7001: the lower pid is reported, by both collectors.
    let first = if sharer.pid < server.pid {
        sharer
    } else {
        server
    };
    let all: Vec<&str> = HOST_V4.iter().chain(&HOST_V6).copied().collect();
    let listeners: [Listener; 11] = [
        ("tcp", 7001, &HOST_V4, "0.0.0.0", "listen", first),
        ("tcp", 7002, &all, "::", "listen", server),
        ("tcp", 7003, &HOST_V6, "::", "listen", server),
        ("tcp", 7004, &["192.0.2.1"], "0.0.0.0", "listen", server),
        ("tcp", 7005, &["fd00:6761::1"], "::", "listen", server),
        ("tcp", 7006, &["127.0.0.1"], "0.0.0.0", "listen", server),
        ("tcp", 7007, &["::1"], "::", "listen", server),
        ("tcp", 7008, &["fe80::1"], "::", "listen", server),
        ("udp", 68, &HOST_V4, "0.0.0.0", "unknown", server),
        ("udp", 5353, &all, "::", "unknown", server),
        ("udp", 5354, &HOST_V6, "::", "unknown", server),
    ];
    let mut connections = Vec::new();
    for (protocol, port, locals, remote, state, who) in listeners {
        for local in locals {
            connections.push(connection(protocol, local, port, remote, None, state, who));
        }
    }
    connections.push(connection(
        "udp",
        "192.0.2.1",
        5300,
        "192.0.2.2",
        Some(53),
        "established",
        server,
    ));
    connections.push(connection(
        "udp",
        "fd00:6761::1",
        5301,
        "fd00:6761::2",
        Some(53),
        "established",
        server,
    ));
    let client_connections = world.client.connections();
    assert_eq!(client_connections.len(), equivalence::world::CONNECT.len());
    for (local, peer) in client_connections {
        let (l, p) = (reported(local), reported(peer));
        let est = "established";
        connections.push(connection(
            "tcp",
            &l,
            local.port(),
            &p,
            Some(peer.port()),
            est,
            client,
        ));
        // The server's end, unless the peer namespace holds it.
        if (7001..=7008).contains(&peer.port()) {
            connections.push(connection(
                "tcp",
                &p,
                peer.port(),
                &l,
                Some(local.port()),
                est,
                server,
            ));
        }
    }

    let set = |v: &[String]| v.iter().cloned().collect::<Records>();
    BTreeMap::from([
        ("addresses", set(&addresses)),
        ("neighbors", set(&neighbors)),
        ("connections", set(&connections)),
        ("routes", set(&routes)),
    ])
}

/// The debug line `<table>: <n> records from <source>` of each table, as (table, source).
fn sources(run: &DryRun) -> BTreeSet<(String, String)> {
    run.stderr
        .lines()
        .filter_map(|l| l.strip_prefix("grapheon-agent debug: "))
        .filter_map(|l| {
            let (table, rest) = l.split_once(": ")?;
            let (_, source) = rest.split_once(" records from ")?;
            Some((table.to_string(), source.to_string()))
        })
        .collect()
}

fn source_set(pairs: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    pairs
        .iter()
        .map(|(t, s)| (t.to_string(), s.to_string()))
        .collect()
}

fn assert_no_warnings(run: &DryRun) {
    let bad: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains(" warning: ") || l.contains(" error: ") || l.contains(" failed: "))
        .collect();
    assert!(bad.is_empty(), "unexpected log lines: {bad:#?}");
}

#[test]
fn native_and_command_collectors_report_the_same_records() {
    require_root();
    let world = World::build();
    let native = dry_run(&world.host, "native", &path());
    let commands = dry_run(&world.host, "commands", &path());
    let native_again = dry_run(&world.host, "native", &path());

    // The scene did not change while the collectors ran; otherwise a difference below could
    // be the scene's, not the collectors'.
    assert_same_tables(
        "native",
        &native.tables,
        "native, run again",
        &native_again.tables,
    );
    assert_same_tables("native", &native.tables, "commands", &commands.tables);
    assert_eq!(
        native.headers, commands.headers,
        "bodies beside the records"
    );
    assert_eq!(native.collectors, ["native"]);
    assert_eq!(commands.collectors, ["commands"]);
    // Neither run can pass by being empty: both are exactly the scene.
    assert_same_tables("expected", &expected(&world), "native", &native.tables);

    assert_eq!(
        sources(&native),
        source_set(&[
            ("addresses", "netlink"),
            ("neighbors", "netlink"),
            ("routes", "netlink"),
            ("connections", "sock_diag"),
        ])
    );
    assert_eq!(
        sources(&commands),
        source_set(&[
            ("addresses", "ip -json addr show"),
            ("neighbors", "ip -json neigh show"),
            ("routes", "ip -json route show"),
            ("connections", "ss -tunapH / netstat -tunap"),
        ])
    );
    assert_no_warnings(&native);
    assert_no_warnings(&commands);
}

#[test]
fn empty_path_still_reports_all_four_tables_from_the_kernel() {
    require_root();
    let world = World::build();
    let run = dry_run(&world.host, "auto", "");
    for table in TABLES {
        assert!(!run.table(table).is_empty(), "{table} is empty");
    }
    assert_same_tables("expected", &expected(&world), "auto", &run.tables);
    assert_eq!(run.collectors, ["auto"]);
    // Every table came from the kernel on the first try: no command was even attempted.
    assert_eq!(
        sources(&run),
        source_set(&[
            ("addresses", "netlink"),
            ("neighbors", "netlink"),
            ("routes", "netlink"),
            ("connections", "sock_diag"),
        ])
    );
    assert_no_warnings(&run);
}

/// With sock_diag refused (as some sandboxes do), sockets come from `/proc/net/*` with the same
/// records, but for one thing `/proc` cannot say: whether a socket bound to `::` also takes
/// IPv4 (not `IPV6_V6ONLY`). Such a socket is then reported under the IPv6 addresses only; the
/// test removes exactly those IPv4 expansions of the two dual-stack sockets from the scene and
/// nothing else, so every other difference still fails.
#[cfg(all(
    target_endian = "little",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
#[test]
fn proc_net_fallback_reports_the_scene_but_cannot_see_dual_stack() {
    use equivalence::seccomp::refuse_netlink;
    /// The netlink protocol of inet_diag, which `ss` and the agent's sock_diag use.
    const NETLINK_SOCK_DIAG: u32 = 4;
    require_root();
    let world = World::build();
    let run = dry_run_with(&world.host, "native", &path(), |cmd| {
        refuse_netlink(cmd, Some(NETLINK_SOCK_DIAG))
    });
    let mut expected = expected(&world);
    let server = owner(&world.server, "ga-eq-server");
    let connections = expected.get_mut("connections").unwrap();
    for ip in HOST_V4 {
        for dual_stack in [
            connection("tcp", ip, 7002, "::", None, "listen", server),
            connection("udp", ip, 5353, "::", None, "unknown", server),
        ] {
            assert!(connections.remove(&dual_stack), "{dual_stack} expected");
        }
    }
    assert_same_tables("expected", &expected, "/proc/net", &run.tables);
    assert_eq!(
        sources(&run),
        source_set(&[
            ("addresses", "netlink"),
            ("neighbors", "netlink"),
            ("routes", "netlink"),
            ("connections", "/proc/net"),
        ])
    );
    assert!(
        run.stderr
            .contains("connections: sock_diag failed: cannot open netlink socket"),
        "{}",
        run.stderr
    );
}

/// Enough records that every netlink dump spans several datagrams and the report several
/// parts: a continuation or part boundary that loses or repeats a record shows here.
#[test]
fn large_tables_are_the_same_from_both_collectors() {
    const PER_LISTENER: usize = 800;
    const NEIGHBORS: usize = 600;
    const ROUTES: usize = 1200;
    require_root();
    let ns = Namespace::new();
    ns.ip("link add eq0 address 02:00:00:00:00:01 type veth peer name eq1");
    let mut batch = String::from(
        "addr add 192.0.2.1/24 dev eq0\n\
         addr add fd00:6761::1/64 dev eq0 nodad\n\
         link set eq0 addrgenmode none\n\
         link set eq1 addrgenmode none\n\
         link set eq0 up\n\
         link set eq1 up\n",
    );
    for i in 0..NEIGHBORS / 2 {
        let (hi, lo) = (i / 256, i % 256);
        batch.push_str(&format!(
            "neigh add 198.51.{}.{lo} lladdr 02:00:00:00:{hi:02x}:{lo:02x} dev eq0 nud permanent\n\
             neigh add fd00:6761::1:{i:x} lladdr 02:00:00:01:{hi:02x}:{lo:02x} dev eq0 nud permanent\n",
            100 + hi,
        ));
    }
    for i in 0..ROUTES {
        batch.push_str(&format!(
            "route add 198.18.{}.{}/30 via 192.0.2.2\n",
            i / 64,
            (i % 64) * 4
        ));
    }
    ns.ip_batch(&batch);
    let mut many = Holder::start(
        &ns,
        &Spec {
            name: "ga-eq-many",
            listen: vec!["127.0.0.1:7300", "[::1]:7301"],
            connect: vec!["127.0.0.1:7300", "[::1]:7301"],
            repeat: PER_LISTENER,
            ..Spec::default()
        },
    );
    many.wait_for("accepted", 2 * PER_LISTENER);

    let native = dry_run(&ns, "native", &path());
    let commands = dry_run(&ns, "commands", &path());
    assert_same_tables("native", &native.tables, "commands", &commands.tables);
    assert_eq!(
        native.headers, commands.headers,
        "bodies beside the records"
    );
    assert!(
        native.headers.len() > 1,
        "expected a report in several parts, got {}",
        native.headers.len()
    );
    let count = |t: &str| native.table(t).len();
    assert_eq!(count("addresses"), 2);
    assert_eq!(count("neighbors"), NEIGHBORS);
    // Two listeners and both ends of every connection.
    assert_eq!(count("connections"), 2 + 2 * 2 * PER_LISTENER);
    // Ours plus the connected route of 192.0.2.0/24.
    assert_eq!(count("routes"), ROUTES + 1);
    assert_no_warnings(&native);
    assert_no_warnings(&commands);
    drop(many);
}
