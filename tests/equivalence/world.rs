//! The scene the collectors are compared on: a namespace `host` (the one the agent looks at)
//! joined by a veth pair to a namespace `peer`, with addresses, neighbours, routes and sockets
//! owned by known processes.
//!
//! The scene is quiet once built: no process sends anything, nothing closes (so no TIME_WAIT),
//! the neighbour entries the agent sees are either static (permanent, or stale without use) or
//! learned ones whose reachable time is an hour, and IPv6 addresses are added `nodad` on links
//! without automatic link-local addresses (no DAD, no router solicitations). Both collectors
//! therefore see exactly the same kernel state and nothing needs to be compared loosely.

use super::holder::{Holder, Spec};
use super::namespace::Namespace;

pub const HOST_MAC: &str = "02:00:00:00:00:01";
pub const PEER_MAC: &str = "02:00:00:00:00:02";
/// The host's addresses on `eq0`, by family (what wildcard listeners expand to).
pub const HOST_V4: [&str; 2] = ["192.0.2.1", "198.51.100.1"];
pub const HOST_V6: [&str; 2] = ["fd00:6761::1", "fe80::1"];

/// Server sockets: TCP listeners of every binding shape, then UDP sockets.
pub const LISTEN: [&str; 8] = [
    "0.0.0.0:7001",
    "[::]:7002",
    "[::]:7003/v6only",
    "192.0.2.1:7004",
    "[fd00:6761::1]:7005",
    "127.0.0.1:7006",
    "[::1]:7007",
    "[fe80::1%eq0]:7008",
];
pub const UDP: [&str; 5] = [
    "0.0.0.0:68",
    "[::]:5353",
    "[::]:5354/v6only",
    "192.0.2.1:5300>192.0.2.2:53",
    "[fd00:6761::1]:5301>[fd00:6761::2]:53",
];
/// The client's connections: one to each local listener shape (IPv4 to a dual-stack listener
/// gives an IPv4-mapped server socket), then two over the veth to the peer.
pub const CONNECT: [&str; 12] = [
    "192.0.2.1:7001",
    "198.51.100.1:7001",
    "[fd00:6761::1]:7002",
    "192.0.2.1:7002",
    "[fd00:6761::1]:7003",
    "192.0.2.1:7004",
    "[fd00:6761::1]:7005",
    "127.0.0.1:7006",
    "[::1]:7007",
    "[fe80::1%eq0]:7008",
    "192.0.2.2:7100",
    "[fd00:6761::2]:7100",
];
const LOCAL_CONNECTIONS: usize = 10;

/// Every kernel object the tests compare, torn down on drop (holders first, then namespaces).
pub struct World {
    pub server: Holder,
    pub client: Holder,
    /// The peer's listener, held only to be killed on drop.
    _remote: Holder,
    pub host: Namespace,
    /// Held only to be deleted on drop.
    _peer: Namespace,
}

impl World {
    /// Builds the two namespaces, their link, addresses, neighbours and routes, starts the
    /// socket holders and waits until every connection is accepted.
    pub fn build() -> World {
        let host = Namespace::new();
        let peer = Namespace::new();
        host.ip(&format!(
            "link add eq0 address {HOST_MAC} type veth peer name eq1 address {PEER_MAC} netns {}",
            peer.name
        ));
        host.ip("link set eq0 addrgenmode none");
        peer.ip("link set eq1 addrgenmode none");
        // Learned entries stay `reachable` for an hour instead of ~30 s.
        host.ip("ntable change name arp_cache dev eq0 base_reachable 3600000");
        host.ip("ntable change name ndisc_cache dev eq0 base_reachable 3600000");
        host.ip_batch(
            "addr add 192.0.2.1/24 dev eq0\n\
             addr add 198.51.100.1/24 dev eq0\n\
             addr add fd00:6761::1/64 dev eq0 nodad\n\
             addr add fe80::1/64 dev eq0 nodad\n\
             link set eq0 up\n",
        );
        peer.ip_batch(
            "addr add 192.0.2.2/24 dev eq1\n\
             addr add fd00:6761::2/64 dev eq1 nodad\n\
             link set eq1 up\n",
        );
        host.ip_batch(
            "neigh add 192.0.2.99 lladdr 02:00:00:00:00:99 dev eq0 nud permanent\n\
             neigh add fd00:6761::99 lladdr 02:00:00:00:00:99 dev eq0 nud permanent\n\
             neigh add 192.0.2.97 lladdr 02:00:00:00:00:97 dev eq0 nud stale\n\
             neigh add 192.0.2.98 lladdr 02:00:00:00:00:98 dev eq0 nud noarp\n\
             route add default via 192.0.2.2\n\
             route add 203.0.113.7/32 via 192.0.2.2\n\
             route add 203.0.113.16/28 via 192.0.2.2 src 192.0.2.1\n\
             route add 203.0.113.32/27 nexthop via 192.0.2.2 nexthop via 192.0.2.3\n\
             route add blackhole 203.0.113.128/25\n\
             route add unreachable 203.0.113.64/26\n\
             route add prohibit 203.0.113.192/26\n\
             route add 203.0.113.200 via 192.0.2.2 table 100\n\
             route add ::/0 via fd00:6761::2\n",
        );

        let mut remote = Holder::start(
            &peer,
            &Spec {
                name: "ga-eq-peer",
                listen: vec!["192.0.2.2:7100", "[fd00:6761::2]:7100"],
                ..Spec::default()
            },
        );
        let mut server = Holder::start(
            &host,
            &Spec {
                name: "ga-eq-server",
                listen: LISTEN.to_vec(),
                udp: UDP.to_vec(),
                sharer: Some("ga-eq-sharer"),
                ..Spec::default()
            },
        );
        // The connections to the peer resolve its IPv4 and IPv6 neighbour entries for real.
        let client = Holder::start(
            &host,
            &Spec {
                name: "ga-eq-client",
                connect: CONNECT.to_vec(),
                ..Spec::default()
            },
        );
        server.wait_for("accepted", LOCAL_CONNECTIONS);
        remote.wait_for("accepted", CONNECT.len() - LOCAL_CONNECTIONS);
        World {
            server,
            client,
            _remote: remote,
            host,
            _peer: peer,
        }
    }
}
