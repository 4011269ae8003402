//! Records as JSON: compact encoding for reports and `state.json`, lenient decoding of the
//! snapshot cached by this agent or by the earlier Python agent.

use miniserde::json::Value;

use crate::json::{self, Object, Sink};
use crate::model::{
    parse_ip, Address, ConnState, Connection, Mac, Neighbor, Protocol, Route, Snapshot,
};

/// Appends one address record.
pub fn push_address<S: Sink + ?Sized>(out: &mut S, a: &Address) {
    let mut o = Object::new(out);
    o.str("interface", &a.interface)
        .ip("ip_address", a.ip_address)
        .opt_mac("mac_address", a.mac_address)
        .int("prefix_length", u64::from(a.prefix_length));
    o.end();
}

/// Appends one neighbour record.
pub fn push_neighbor<S: Sink + ?Sized>(out: &mut S, n: &Neighbor) {
    let mut o = Object::new(out);
    o.str("interface", &n.interface)
        .ip("ip_address", n.ip_address)
        .opt_mac("mac_address", n.mac_address)
        .opt_str("state", n.state.as_deref());
    o.end();
}

/// Appends one connection record.
pub fn push_connection<S: Sink + ?Sized>(out: &mut S, c: &Connection) {
    let mut o = Object::new(out);
    o.ip("local_ip", c.local_ip)
        .int("local_port", u64::from(c.local_port))
        .opt_int("pid", c.pid.map(u64::from))
        .opt_str("process_name", c.process_name.as_deref())
        .str("protocol", c.protocol.as_str())
        .opt_ip("remote_ip", c.remote_ip)
        .opt_int("remote_port", c.remote_port.map(u64::from))
        .opt_str("state", c.state.map(ConnState::as_str));
    o.end();
}

/// Appends one route record.
pub fn push_route<S: Sink + ?Sized>(out: &mut S, r: &Route) {
    let mut o = Object::new(out);
    o.str("destination", &r.destination)
        .opt_ip("gateway", r.gateway)
        .opt_str("interface", r.interface.as_deref())
        .opt_ip("source_ip", r.source_ip);
    o.end();
}

/// Appends `[item,item,…]`.
pub fn push_array<T>(out: &mut String, items: &[T], push: fn(&mut String, &T)) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push(out, item);
    }
    out.push(']');
}

/// The snapshot object `{"addresses":[…],"neighbors":[…],"connections":[…],"routes":[…]}`.
pub fn snapshot_json(s: &Snapshot) -> String {
    let mut out = String::with_capacity(64 + s.len() * 160);
    out.push_str("{\"addresses\":");
    push_array(&mut out, &s.addresses, push_address);
    out.push_str(",\"neighbors\":");
    push_array(&mut out, &s.neighbors, push_neighbor);
    out.push_str(",\"connections\":");
    push_array(&mut out, &s.connections, push_connection);
    out.push_str(",\"routes\":");
    push_array(&mut out, &s.routes, push_route);
    out.push('}');
    out
}

fn opt_string(v: &Value, key: &str) -> Option<Option<String>> {
    match json::get(v, key) {
        None | Some(Value::Null) => Some(None),
        Some(Value::String(s)) => Some(Some(s.clone())),
        Some(_) => None,
    }
}

fn opt_ip(v: &Value, key: &str) -> Option<Option<std::net::IpAddr>> {
    match opt_string(v, key)? {
        None => Some(None),
        Some(s) => parse_ip(&s).map(Some),
    }
}

fn opt_mac(v: &Value) -> Option<Mac> {
    json::get_str(v, "mac_address").and_then(Mac::parse)
}

fn opt_int<T: TryFrom<i64>>(v: &Value, key: &str) -> Option<Option<T>> {
    match json::get(v, key) {
        None | Some(Value::Null) => Some(None),
        Some(n) => T::try_from(json::as_i64(n)?).ok().map(Some),
    }
}

/// Reads one cached address; `None` when it is not a valid record.
pub fn address_from(v: &Value) -> Option<Address> {
    Some(Address {
        interface: json::get_str(v, "interface")?.to_string(),
        ip_address: parse_ip(json::get_str(v, "ip_address")?)?,
        prefix_length: u8::try_from(json::get_i64(v, "prefix_length")?)
            .ok()
            .filter(|p| *p <= 128)?,
        mac_address: opt_mac(v),
    })
}

/// Reads one cached neighbour.
pub fn neighbor_from(v: &Value) -> Option<Neighbor> {
    Some(Neighbor {
        interface: json::get_str(v, "interface")?.to_string(),
        ip_address: parse_ip(json::get_str(v, "ip_address")?)?,
        mac_address: opt_mac(v),
        state: opt_string(v, "state")?,
    })
}

/// Reads one cached connection.
pub fn connection_from(v: &Value) -> Option<Connection> {
    Some(Connection {
        protocol: Protocol::parse(json::get_str(v, "protocol")?)?,
        local_ip: parse_ip(json::get_str(v, "local_ip")?)?,
        local_port: u16::try_from(json::get_i64(v, "local_port")?).ok()?,
        remote_ip: opt_ip(v, "remote_ip")?,
        remote_port: opt_int(v, "remote_port")?,
        state: opt_string(v, "state")?.map(|s| ConnState::parse(&s)),
        pid: opt_int(v, "pid")?,
        process_name: opt_string(v, "process_name")?,
    })
}

/// Reads one cached route.
pub fn route_from(v: &Value) -> Option<Route> {
    Some(Route {
        destination: json::get_str(v, "destination")
            .filter(|d| !d.is_empty())?
            .to_string(),
        gateway: opt_ip(v, "gateway")?,
        interface: opt_string(v, "interface")?,
        source_ip: opt_ip(v, "source_ip")?,
    })
}

/// Reads a cached snapshot; records that do not parse are dropped and counted, so they are
/// simply reported again as new.
pub fn snapshot_from(v: &Value) -> (Snapshot, usize) {
    let mut dropped = 0;
    fn table<T>(
        v: &Value,
        key: &str,
        read: fn(&Value) -> Option<T>,
        dropped: &mut usize,
    ) -> Vec<T> {
        let items = json::get_array(v, key).unwrap_or(&[]);
        let out: Vec<T> = items.iter().filter_map(read).collect();
        *dropped += items.len() - out.len();
        out
    }
    let mut s = Snapshot {
        addresses: table(v, "addresses", address_from, &mut dropped),
        neighbors: table(v, "neighbors", neighbor_from, &mut dropped),
        connections: table(v, "connections", connection_from, &mut dropped),
        routes: table(v, "routes", route_from, &mut dropped),
    };
    s.normalize();
    (s, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut s = Snapshot {
            addresses: vec![Address {
                interface: "veth-a".into(),
                ip_address: "10.99.10.1".parse().unwrap(),
                prefix_length: 24,
                mac_address: Mac::parse("ae:ed:e2:ee:b9:cb"),
            }],
            neighbors: vec![Neighbor {
                interface: "veth-a".into(),
                ip_address: "fd99:10::2".parse().unwrap(),
                mac_address: None,
                state: Some("failed".into()),
            }],
            connections: vec![Connection {
                protocol: Protocol::Tcp,
                local_ip: "127.0.0.1".parse().unwrap(),
                local_port: 8000,
                remote_ip: Some("0.0.0.0".parse().unwrap()),
                remote_port: None,
                state: Some(ConnState::Listen),
                pid: Some(11918),
                process_name: Some("python \"x\"".into()),
            }],
            routes: vec![Route {
                destination: "default".into(),
                gateway: Some("10.99.10.2".parse().unwrap()),
                interface: Some("veth-a".into()),
                source_ip: None,
            }],
        };
        s.normalize();
        s
    }

    #[test]
    fn records_encode_with_the_contract_field_names() {
        assert_eq!(
            snapshot_json(&sample()),
            concat!(
                r#"{"addresses":[{"interface":"veth-a","ip_address":"10.99.10.1","mac_address":"ae:ed:e2:ee:b9:cb","prefix_length":24}],"#,
                r#""neighbors":[{"interface":"veth-a","ip_address":"fd99:10::2","mac_address":null,"state":"failed"}],"#,
                r#""connections":[{"local_ip":"127.0.0.1","local_port":8000,"pid":11918,"process_name":"python \"x\"","protocol":"tcp","remote_ip":"0.0.0.0","remote_port":null,"state":"listen"}],"#,
                r#""routes":[{"destination":"default","gateway":"10.99.10.2","interface":"veth-a","source_ip":null}]}"#
            )
        );
    }

    #[test]
    fn snapshot_round_trips_through_json() {
        let text = snapshot_json(&sample());
        let (back, dropped) = snapshot_from(&miniserde::json::from_str(&text).unwrap());
        assert_eq!((back, dropped), (sample(), 0));
    }

    #[test]
    fn earlier_agent_snapshot_is_read_and_bad_records_dropped() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/state/python-agent/state.json"
        ))
        .unwrap();
        let v: Value = miniserde::json::from_str(&text).unwrap();
        let (s, dropped) = snapshot_from(json::get(&v, "last_snapshot").unwrap());
        // One connection has port 70000 and one neighbour has no ip_address: both dropped.
        assert_eq!(dropped, 2);
        assert_eq!(
            (
                s.addresses.len(),
                s.neighbors.len(),
                s.connections.len(),
                s.routes.len()
            ),
            (3, 2, 3, 2)
        );
        assert_eq!(s.connections[0].state, Some(ConnState::Listen));
        assert_eq!(s.connections[0].local_ip.to_string(), "0.0.0.0");
    }
}
