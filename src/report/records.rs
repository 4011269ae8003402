//! Records as JSON: compact encoding for reports and `state.json`, lenient decoding of the
//! snapshot cached by this agent or by the earlier Python agent.

use crate::json::read::{Reader, Scalar, Step};
use crate::json::{Object, Sink};
use crate::model::{
    parse_ip, Address, ConnState, Connection, Mac, Names, Neighbor, Protocol, Route, Snapshot,
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

/// Longer cached strings are not real record fields (the server allows 255 characters).
const MAX_FIELD: usize = 4096;

/// The field names a cached record may carry; any other member is skipped.
const FIELDS: [&str; 15] = [
    "interface",
    "ip_address",
    "mac_address",
    "prefix_length",
    "state",
    "local_ip",
    "local_port",
    "remote_ip",
    "remote_port",
    "protocol",
    "pid",
    "process_name",
    "destination",
    "gateway",
    "source_ip",
];

/// Where `key` is in [`FIELDS`]. A `match` on the names, not a search of the array: it runs
/// for every member of every saved record.
fn field(key: &str) -> Option<usize> {
    Some(match key {
        "interface" => 0,
        "ip_address" => 1,
        "mac_address" => 2,
        "prefix_length" => 3,
        "state" => 4,
        "local_ip" => 5,
        "local_port" => 6,
        "remote_ip" => 7,
        "remote_port" => 8,
        "protocol" => 9,
        "pid" => 10,
        "process_name" => 11,
        "destination" => 12,
        "gateway" => 13,
        "source_ip" => 14,
        _ => return None,
    })
}

/// The known members of one cached record object, as read.
#[derive(Default)]
struct Fields([Option<Scalar>; FIELDS.len()]);

impl Fields {
    fn get(&self, key: &str) -> Option<&Scalar> {
        self.0[field(key)?].as_ref()
    }

    fn str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    fn int(&self, key: &str) -> Option<i64> {
        match self.get(key)? {
            Scalar::Number(n) => n.as_i64(),
            _ => None,
        }
    }

    /// `Some(None)` for a missing or null member, `None` for a wrong type.
    fn opt_string(&self, key: &str) -> Option<Option<String>> {
        match self.get(key) {
            None | Some(Scalar::Null) => Some(None),
            Some(Scalar::String(s)) => Some(Some(s.clone())),
            Some(_) => None,
        }
    }

    fn opt_ip(&self, key: &str) -> Option<Option<std::net::IpAddr>> {
        match self.get(key) {
            None | Some(Scalar::Null) => Some(None),
            Some(Scalar::String(s)) => parse_ip(s).map(Some),
            Some(_) => None,
        }
    }

    fn mac(&self) -> Option<Mac> {
        self.str("mac_address").and_then(Mac::parse)
    }

    fn opt_int<T: TryFrom<i64>>(&self, key: &str) -> Option<Option<T>> {
        match self.get(key) {
            None | Some(Scalar::Null) => Some(None),
            Some(_) => T::try_from(self.int(key)?).ok().map(Some),
        }
    }

    fn address(&self) -> Option<Address> {
        Some(Address {
            interface: self.str("interface")?.to_string(),
            ip_address: parse_ip(self.str("ip_address")?)?,
            prefix_length: u8::try_from(self.int("prefix_length")?)
                .ok()
                .filter(|p| *p <= 128)?,
            mac_address: self.mac(),
        })
    }

    fn neighbor(&self) -> Option<Neighbor> {
        Some(Neighbor {
            interface: self.str("interface")?.to_string(),
            ip_address: parse_ip(self.str("ip_address")?)?,
            mac_address: self.mac(),
            state: self.opt_string("state")?,
        })
    }

    /// The process name comes from `names`: a saved snapshot repeats a few names over
    /// thousands of records, and each record holds one shared copy.
    fn connection(&self, names: &mut Names) -> Option<Connection> {
        let process_name = match self.get("process_name") {
            None | Some(Scalar::Null) => None,
            Some(Scalar::String(s)) => Some(names.get(s)),
            Some(_) => return None,
        };
        Some(Connection {
            protocol: Protocol::parse(self.str("protocol")?)?,
            local_ip: parse_ip(self.str("local_ip")?)?,
            local_port: u16::try_from(self.int("local_port")?).ok()?,
            remote_ip: self.opt_ip("remote_ip")?,
            remote_port: self.opt_int("remote_port")?,
            state: match self.get("state") {
                None | Some(Scalar::Null) => None,
                Some(Scalar::String(s)) => Some(ConnState::parse(s)),
                Some(_) => return None,
            },
            pid: self.opt_int("pid")?,
            process_name,
        })
    }

    fn route(&self) -> Option<Route> {
        Some(Route {
            destination: self
                .str("destination")
                .filter(|d| !d.is_empty())?
                .to_string(),
            gateway: self.opt_ip("gateway")?,
            interface: self.opt_string("interface")?,
            source_ip: self.opt_ip("source_ip")?,
        })
    }
}

fn read_fields(r: &mut Reader<'_>, key: &mut String) -> Step<Fields> {
    let mut fields = Fields::default();
    r.begin_object()?;
    let mut first = true;
    while r.next_key(&mut first, key, 32)? {
        match field(key) {
            Some(at) => fields.0[at] = Some(r.scalar(MAX_FIELD)?),
            None => r.skip()?,
        }
    }
    Ok(fields)
}

/// What reading a cached snapshot found besides its records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Records that did not parse (they are simply reported again as new).
    pub dropped: usize,
    /// Which tables' arrays were begun, in report order: a file cut short (a report in
    /// progress) has only its first tables.
    pub begun: [bool; 4],
}

/// Reads a snapshot object (`{"addresses":[…],…}`) into `into`, record by record, without
/// building a JSON tree. Records that are not valid are dropped and counted. Stops at the first
/// fault, keeping what was read before it (the caller decides whether a cut-off file counts).
/// The tables are left unsorted.
pub fn read_snapshot(r: &mut Reader<'_>, into: &mut Snapshot, tally: &mut Tally) -> Step<()> {
    let mut key = String::new();
    let mut table_key = String::new();
    let mut names = Names::default();
    r.begin_object()?;
    let mut first = true;
    while r.next_key(&mut first, &mut table_key, 32)? {
        let t = match table_key.as_str() {
            "addresses" => 0,
            "neighbors" => 1,
            "connections" => 2,
            "routes" => 3,
            _ => {
                r.skip()?;
                continue;
            }
        };
        if !r.at_array()? {
            r.skip()?;
            continue;
        }
        r.begin_array()?;
        tally.begun[t] = true;
        let mut first_item = true;
        while r.next_item(&mut first_item)? {
            if !r.at_object()? {
                r.skip()?;
                tally.dropped += 1;
                continue;
            }
            let fields = read_fields(r, &mut key)?;
            let kept = match t {
                0 => fields.address().map(|a| into.addresses.push(a)),
                1 => fields.neighbor().map(|n| into.neighbors.push(n)),
                2 => fields
                    .connection(&mut names)
                    .map(|c| into.connections.push(c)),
                _ => fields.route().map(|x| into.routes.push(x)),
            };
            if kept.is_none() {
                tally.dropped += 1;
            }
        }
    }
    Ok(())
}

/// Reads a whole snapshot from JSON text (tests and small inputs); `None` when it is not JSON.
pub fn snapshot_from_text(text: &str) -> Option<(Snapshot, usize)> {
    let mut r = Reader::new(text.as_bytes());
    let mut s = Snapshot::default();
    let mut tally = Tally::default();
    read_snapshot(&mut r, &mut s, &mut tally).ok()?;
    r.end().ok()?;
    s.normalize();
    Some((s, tally.dropped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ProcessName;

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
    fn every_field_name_has_its_own_place() {
        let places: Vec<Option<usize>> = FIELDS.iter().map(|f| field(f)).collect();
        assert_eq!(places, (0..FIELDS.len()).map(Some).collect::<Vec<_>>());
        assert_eq!(field("remote_ipx"), None);
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
        assert_eq!(snapshot_from_text(&text), Some((sample(), 0)));
    }

    #[test]
    fn saved_records_of_one_process_share_one_name() {
        let mut s = sample();
        let first = s.connections[0].clone();
        s.connections = (8000..8004)
            .map(|port| Connection {
                local_port: port,
                pid: Some(if port < 8003 { 11918 } else { 4242 }),
                process_name: Some(if port < 8003 { "nginx" } else { "sshd" }.into()),
                ..first.clone()
            })
            .collect();
        let (read, dropped) = snapshot_from_text(&snapshot_json(&s)).unwrap();
        assert_eq!((&read, dropped), (&s, 0));
        let names: Vec<&ProcessName> = read
            .connections
            .iter()
            .map(|c| c.process_name.as_ref().unwrap())
            .collect();
        let shared = |a: usize, b: usize| std::sync::Arc::ptr_eq(names[a], names[b]);
        assert_eq!(
            (shared(0, 1), shared(0, 2), shared(0, 3)),
            (true, true, false)
        );
    }

    #[test]
    fn earlier_agent_snapshot_is_read_and_bad_records_dropped() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/state/python-agent/state.json"
        ))
        .unwrap();
        let at = text.find("\"last_snapshot\"").unwrap();
        let object = &text[at + "\"last_snapshot\":".len()..];
        let mut r = Reader::new(object.as_bytes());
        let mut s = Snapshot::default();
        let mut tally = Tally::default();
        read_snapshot(&mut r, &mut s, &mut tally).unwrap();
        s.normalize();
        let dropped = tally.dropped;
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
