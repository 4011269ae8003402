//! The check-in report: the delta against what the server already accepted, split into parts
//! that fit the server's limits, rendered as compact JSON (gzip in [`gzip`]).

pub mod gzip;
pub mod records;

use std::ops::Range;

use crate::json::{Length, Object, Sink};
use crate::model::Snapshot;
use crate::timefmt;

/// The server refuses a raw (compressed) body larger than this, whatever the policy says.
pub const RAW_LIMIT: usize = 262_144;

/// The tables' names in report order.
pub const TABLES: [&str; 4] = ["addresses", "neighbors", "connections", "routes"];

/// Record counts per table, in report order: addresses, neighbors, connections, routes.
pub type Counts = [usize; 4];

/// The fields of a check-in that do not depend on its records.
#[derive(Clone, Debug)]
pub struct Header {
    pub agent_uuid: String,
    pub observed_at: i64,
    pub hostname: String,
    pub agent_version: String,
    pub platform: String,
    pub platform_release: String,
    /// Which collector mode produced the records (for the server operator's curiosity).
    pub collector: &'static str,
    /// Records the server would have refused (no valid address), left out of the report.
    pub records_left_out: usize,
    /// Why each table no source could read failed (report order); such a table is reported
    /// under `metadata.failed_tables` and keeps its last records on the server.
    pub failed_tables: [Option<String>; 4],
    /// `metadata.namespaces` as JSON (other network namespaces); empty: no such key.
    pub namespaces: String,
}

/// One check-in's records: a slice of each table of the delta.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub ranges: [Range<usize>; 4],
}

/// Records of `current` that `base` does not have. Both snapshots must be normalised (sorted,
/// no duplicates).
pub fn difference(base: &Snapshot, current: &Snapshot) -> Snapshot {
    fn new<T: Ord + Clone>(base: &[T], current: &[T]) -> Vec<T> {
        let mut b = base.iter().peekable();
        let mut out = Vec::new();
        for item in current {
            while b.next_if(|x| *x < item).is_some() {}
            if b.next_if(|x| *x == item).is_none() {
                out.push(item.clone());
            }
        }
        out
    }
    Snapshot {
        addresses: new(&base.addresses, &current.addresses),
        neighbors: new(&base.neighbors, &current.neighbors),
        connections: new(&base.connections, &current.connections),
        routes: new(&base.routes, &current.routes),
    }
}

/// How many records of `base` are gone from `current`, by table (the server has no removal
/// field; the count goes into the report's metadata).
pub fn removed(base: &Snapshot, current: &Snapshot) -> Counts {
    fn gone<T: Ord>(base: &[T], current: &[T]) -> usize {
        base.iter()
            .filter(|x| current.binary_search(x).is_err())
            .count()
    }
    [
        gone(&base.addresses, &current.addresses),
        gone(&base.neighbors, &current.neighbors),
        gone(&base.connections, &current.connections),
        gone(&base.routes, &current.routes),
    ]
}

/// Splits `current` into the records `base` already has (`kept`) and the others (`new`),
/// moving them rather than copying. Both snapshots must be normalised; so are the results.
/// `kept` stays in `current`'s own buffer and only the new records move out: a delta run holds
/// the saved snapshot and the collected one, and a third table of the same size beside them
/// was the largest part of its peak memory.
pub fn partition(base: &Snapshot, current: Snapshot) -> (Snapshot, Snapshot) {
    fn split<T: Ord>(base: &[T], mut current: Vec<T>) -> (Vec<T>, Vec<T>) {
        let mut b = base.iter().peekable();
        let mut kept = 0;
        for i in 0..current.len() {
            let item = &current[i];
            while b.next_if(|x| *x < item).is_some() {}
            if b.next_if(|x| *x == item).is_some() {
                current.swap(kept, i);
                kept += 1;
            }
        }
        let mut new = current.split_off(kept);
        // The swaps keep the base's records in order but rotate the new ones among themselves
        // (few, in a delta; the sort is the one `normalize` already compiles).
        new.sort();
        // When most records are new, the room they left is given back.
        if current.len() < current.capacity() / 2 {
            current.shrink_to_fit();
        }
        (current, new)
    }
    let (addresses, new_addresses) = split(&base.addresses, current.addresses);
    let (neighbors, new_neighbors) = split(&base.neighbors, current.neighbors);
    let (connections, new_connections) = split(&base.connections, current.connections);
    let (routes, new_routes) = split(&base.routes, current.routes);
    (
        Snapshot {
            addresses,
            neighbors,
            connections,
            routes,
        },
        Snapshot {
            addresses: new_addresses,
            neighbors: new_neighbors,
            connections: new_connections,
            routes: new_routes,
        },
    )
}

/// The union of two normalised snapshots with no record in common (what was kept and what
/// was sent), normalised, moving the records.
pub fn union(a: Snapshot, b: Snapshot) -> Snapshot {
    fn join<T: Ord>(mut a: Vec<T>, mut b: Vec<T>) -> Vec<T> {
        a.append(&mut b);
        // Two sorted runs: the standard sort merges them in one pass.
        a.sort();
        a.dedup();
        a
    }
    Snapshot {
        addresses: join(a.addresses, b.addresses),
        neighbors: join(a.neighbors, b.neighbors),
        connections: join(a.connections, b.connections),
        routes: join(a.routes, b.routes),
    }
}

/// Records of `base` that are still in `current`.
pub fn intersection(base: &Snapshot, current: &Snapshot) -> Snapshot {
    fn keep<T: Ord + Clone>(base: &[T], current: &[T]) -> Vec<T> {
        base.iter()
            .filter(|x| current.binary_search(x).is_ok())
            .cloned()
            .collect()
    }
    Snapshot {
        addresses: keep(&base.addresses, &current.addresses),
        neighbors: keep(&base.neighbors, &current.neighbors),
        connections: keep(&base.connections, &current.connections),
        routes: keep(&base.routes, &current.routes),
    }
}

/// The largest decoded body a part may have: the policy's limit and the raw limit (gzip never
/// grows JSON by more than a few bytes), with a tenth kept as headroom.
pub fn part_budget(max_report_bytes: u32) -> usize {
    (max_report_bytes as usize).min(RAW_LIMIT) / 10 * 9
}

/// Splits `delta` into parts whose rendered body stays within `budget` bytes. Parts follow the
/// report order (addresses, neighbours, connections, routes), each a contiguous run of records.
/// There is always at least one part, so an empty delta still checks in (the server then knows
/// the agent is alive).
pub fn split(header: &Header, delta: &Snapshot, removed: &Counts, budget: usize) -> Vec<Part> {
    split_from(header, delta, &Lengths::of(delta), removed, budget, 0)
}

/// The rendered length of every record of a delta, with its comma, in report order. Measured
/// once per report: a check-in cuts the rest of its parts again each time the server's pace
/// moves the part size, and measuring a record costs as much as rendering it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lengths(Vec<u32>);

impl Lengths {
    /// Measures every record of `delta`.
    pub fn of(delta: &Snapshot) -> Lengths {
        let mut lengths = Vec::with_capacity(delta.len());
        for t in 0..4 {
            for i in 0..table_len(delta, t) {
                let mut length = Length::default();
                push_record(&mut length, delta, t, i);
                lengths.push(u32::try_from(length.0 + 1).unwrap_or(u32::MAX));
            }
        }
        Lengths(lengths)
    }
}

/// [`split`] for the records from position `from` of the report order on (the rest of a
/// report whose parts turned out too large or too small for the server's pace), with the
/// records' `lengths` measured once ([`Lengths::of`] the same `delta`).
pub fn split_from(
    header: &Header,
    delta: &Snapshot,
    lengths: &Lengths,
    removed: &Counts,
    budget: usize,
    from: usize,
) -> Vec<Part> {
    // The part-independent overhead, with the widest numbers a part can carry.
    let widest = (u32::MAX as usize, u32::MAX as usize);
    let mut overhead = String::new();
    let _ = render_into(
        &mut overhead,
        header,
        u64::MAX,
        true,
        widest,
        removed,
        &Snapshot::default(),
        &Part::of(delta, 0..0),
    );
    let room = budget.saturating_sub(overhead.len()).max(1);
    let mut cuts = vec![from];
    let mut used = 0;
    let rest = lengths.0.get(from..).unwrap_or_default();
    for (position, len) in (from..).zip(rest.iter().map(|l| *l as usize)) {
        if used > 0 && used + len > room {
            cuts.push(position);
            used = 0;
        }
        used += len;
    }
    cuts.push(lengths.0.len().max(from));
    cuts.windows(2)
        .map(|w| Part::of(delta, w[0]..w[1]))
        .collect()
}

impl Part {
    /// The part covering records `global` of the report order (all tables one after another).
    fn of(delta: &Snapshot, global: Range<usize>) -> Part {
        let mut offset = 0;
        let ranges = [0, 1, 2, 3].map(|t| {
            let len = table_len(delta, t);
            let local = |g: usize| g.saturating_sub(offset).min(len);
            let r = local(global.start)..local(global.end);
            offset += len;
            r
        });
        Part { ranges }
    }

    /// Number of records in the part.
    pub fn len(&self) -> usize {
        self.ranges.iter().map(Range::len).sum()
    }

    /// True for the part of an empty delta.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the part starts in the report order (all tables one after another).
    pub fn start(&self) -> usize {
        // Tables before the part contribute their whole length, the first one its offset.
        self.ranges.iter().map(|r| r.start).sum()
    }
}

/// Number of records in table `t` (report order) of `s`.
pub fn table_len(s: &Snapshot, t: usize) -> usize {
    match t {
        0 => s.addresses.len(),
        1 => s.neighbors.len(),
        2 => s.connections.len(),
        _ => s.routes.len(),
    }
}

/// Appends record `i` of table `t` (report order) of `s`.
pub fn push_record<S: Sink + ?Sized>(out: &mut S, s: &Snapshot, t: usize, i: usize) {
    match t {
        0 => records::push_address(out, &s.addresses[i]),
        1 => records::push_neighbor(out, &s.neighbors[i]),
        2 => records::push_connection(out, &s.connections[i]),
        _ => records::push_route(out, &s.routes[i]),
    }
}

/// Renders one check-in body. `which` is (this part, number of parts), both from 1.
pub fn render(
    header: &Header,
    sequence_number: u64,
    full_snapshot: bool,
    which: (usize, usize),
    removed: &Counts,
    delta: &Snapshot,
    part: &Part,
) -> String {
    let mut out = String::new();
    let _ = render_into(
        &mut out,
        header,
        sequence_number,
        full_snapshot,
        which,
        removed,
        delta,
        part,
    );
    out
}

/// [`render`] into `out` (cleared first), so one buffer serves every part of a report.
/// Returns where each table's records are in `out` (`rec,rec,…`, without the brackets), so
/// the state file can take them as rendered.
#[allow(clippy::too_many_arguments)]
pub fn render_into(
    out: &mut String,
    header: &Header,
    sequence_number: u64,
    full_snapshot: bool,
    which: (usize, usize),
    removed: &Counts,
    delta: &Snapshot,
    part: &Part,
) -> [Range<usize>; 4] {
    let mut at = [0..0, 0..0, 0..0, 0..0];
    out.clear();
    out.reserve(part.len() * 170 + 1024);
    let mut o = Object::new(out);
    o.str("agent_uuid", &header.agent_uuid)
        .str("observed_at", &timefmt::format_utc(header.observed_at))
        .num("sequence_number", sequence_number)
        .num("full_snapshot", full_snapshot)
        .str("hostname", &header.hostname)
        .str("agent_version", &header.agent_version)
        .str("platform", &header.platform)
        .str("platform_release", &header.platform_release)
        .raw("metadata", &metadata(header, which, removed));
    for (t, key) in ["addresses", "neighbors", "connections", "routes"]
        .iter()
        .enumerate()
    {
        o.raw(key, "");
        let out = o.out();
        out.push('[');
        let start = out.len();
        for (n, i) in part.ranges[t].clone().enumerate() {
            if n > 0 {
                out.push(',');
            }
            push_record(out, delta, t, i);
        }
        at[t] = start..out.len();
        out.push(']');
    }
    o.end();
    at
}

/// The report's `metadata` object.
fn metadata(header: &Header, which: (usize, usize), removed: &Counts) -> String {
    let mut meta = String::new();
    let mut m = Object::new(&mut meta);
    let mut gone = String::new();
    let mut g = Object::new(&mut gone);
    g.num("addresses", removed[0])
        .num("neighbors", removed[1])
        .num("connections", removed[2])
        .num("routes", removed[3]);
    g.end();
    m.str("runtime", "rust-static")
        .str("delta_mode", "set-diff")
        .str("collector", header.collector)
        .num("part", which.0)
        .num("parts", which.1)
        .raw("removed_since_last_report", &gone)
        .num("records_left_out", header.records_left_out);
    if header.failed_tables.iter().any(Option::is_some) {
        let mut failed = String::new();
        let mut f = Object::new(&mut failed);
        for (t, key) in TABLES.iter().enumerate() {
            if let Some(why) = &header.failed_tables[t] {
                f.str(key, why);
            }
        }
        f.end();
        m.raw("failed_tables", &failed);
    }
    if !header.namespaces.is_empty() {
        m.raw("namespaces", &header.namespaces);
    }
    m.end();
    meta
}

/// The addresses as a JSON array, for the registration body.
pub fn addresses_json(addresses: &[crate::model::Address]) -> String {
    let mut out = String::new();
    records::push_array(&mut out, addresses, records::push_address);
    out
}

/// Truncates `text` to at most `max` characters (the server counts characters, not bytes).
pub fn truncate_chars(text: &mut String, max: usize) {
    if let Some((at, _)) = text.char_indices().nth(max) {
        text.truncate(at);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{ConnState, Connection, Protocol};
    use miniserde::json::Value;

    fn conn(port: u16) -> Connection {
        Connection {
            protocol: Protocol::Tcp,
            local_ip: "127.0.0.1".parse().unwrap(),
            local_port: port,
            remote_ip: Some("127.0.0.1".parse().unwrap()),
            remote_port: Some(8000),
            state: Some(ConnState::Established),
            pid: None,
            process_name: None,
        }
    }

    fn snap(ports: impl IntoIterator<Item = u16>) -> Snapshot {
        let mut s = Snapshot {
            connections: ports.into_iter().map(conn).collect(),
            ..Snapshot::default()
        };
        s.normalize();
        s
    }

    /// A report header of fixed values, for tests here and in `state`.
    pub(crate) fn header() -> Header {
        Header {
            agent_uuid: "804c722f-7186-47c7-89fd-03e36f90dee4".into(),
            observed_at: 1_795_744_647,
            hostname: "vm".into(),
            agent_version: "0.1.0".into(),
            platform: "linux".into(),
            platform_release: "6.1.0".into(),
            collector: "native",
            records_left_out: 0,
            failed_tables: Default::default(),
            namespaces: String::new(),
        }
    }

    #[test]
    fn delta_is_the_set_difference_and_counts_removals() {
        assert_eq!(
            difference(&snap([1, 2, 3]), &snap([2, 3, 4, 5])),
            snap([4, 5])
        );
        assert_eq!(removed(&snap([1, 2, 3]), &snap([2, 3, 4, 5])), [0, 0, 1, 0]);
        assert_eq!(
            intersection(&snap([1, 2, 3]), &snap([2, 3, 4, 5])),
            snap([2, 3])
        );
    }

    #[test]
    fn partition_moves_records_into_kept_and_new_and_union_restores_them() {
        let base = snap([1, 2, 3]);
        let current = snap([2, 3, 4, 5, 6]);
        let (kept, new) = partition(&base, current.clone());
        assert_eq!((kept.clone(), new.clone()), (snap([2, 3]), snap([4, 5, 6])));
        assert_eq!(union(kept, new), current);
    }

    #[test]
    fn kept_records_stay_in_the_collected_buffer() {
        let current = snap(1..=1000);
        let buffer = current.connections.as_ptr();
        let (kept, new) = partition(&snap((1..=1000).filter(|p| p % 10 != 0)), current);
        assert_eq!(kept, snap((1..=1000).filter(|p| p % 10 != 0)));
        assert_eq!(new, snap((10..=1000).step_by(10)));
        assert_eq!(kept.connections.as_ptr(), buffer);
    }

    #[test]
    fn a_delta_of_mostly_new_records_keeps_them_in_order_and_gives_back_the_room() {
        let (kept, new) = partition(&snap([0, 500, 999, 5000]), snap(1..=1000));
        assert_eq!(kept, snap([500, 999]));
        assert_eq!(new, snap((1..=1000).filter(|p| *p != 500 && *p != 999)));
        assert!(kept.connections.capacity() < 500);
    }

    #[test]
    fn the_rest_of_a_report_is_split_from_where_it_stopped() {
        let delta = snap(1..=3000);
        let budget = part_budget(262_144);
        let all = split(&header(), &delta, &[0; 4], budget);
        let from = all[1].start();
        let lengths = Lengths::of(&delta);
        let rest = split_from(&header(), &delta, &lengths, &[0; 4], budget, from);
        assert_eq!(rest, all[1..]);
        let halves = split_from(&header(), &delta, &lengths, &[0; 4], budget / 2, from);
        assert_eq!(halves.first().map(Part::start), Some(from));
        assert_eq!(halves.last().map(|p| p.ranges[2].end), Some(3000));
        assert!(halves.len() > rest.len());
    }

    #[test]
    fn lengths_are_the_records_as_rendered_with_their_commas() {
        let mut delta = snap([1, 80, 443, 50442]);
        delta.routes = vec![crate::model::Route {
            destination: "default".into(),
            gateway: None,
            interface: Some("eth0".into()),
            source_ip: None,
        }];
        let mut body = String::new();
        let all = Part::of(&delta, 0..delta.len());
        let at = render_into(&mut body, &header(), 1, true, (1, 1), &[0; 4], &delta, &all);
        let rendered: Vec<usize> = at.iter().map(|r| r.len()).collect();
        let Lengths(lengths) = Lengths::of(&delta);
        // Each table's records are `rec,rec,rec`: its lengths less the last comma.
        assert_eq!(lengths.len(), 5);
        assert_eq!(
            rendered,
            vec![
                0,
                0,
                lengths[..4].iter().sum::<u32>() as usize - 1,
                lengths[4] as usize - 1
            ]
        );
    }

    #[test]
    fn parts_stay_within_the_budget_and_cover_every_record_once() {
        let delta = snap(1..=3000);
        let budget = part_budget(262_144);
        let parts = split(&header(), &delta, &[0; 4], budget);
        assert!(parts.len() > 1, "3000 connections need several parts");
        let mut seen = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let body = render(
                &header(),
                10 + i as u64,
                true,
                (i + 1, parts.len()),
                &[0; 4],
                &delta,
                part,
            );
            assert!(body.len() <= budget, "part {i}: {} > {budget}", body.len());
            let v: Value = miniserde::json::from_str(&body).unwrap();
            for c in crate::json::get_array(&v, "connections").unwrap() {
                seen.push(crate::json::get_i64(c, "local_port").unwrap() as u16);
            }
            assert_eq!(part.ranges[2].end, seen.len());
        }
        assert_eq!(seen, (1..=3000).collect::<Vec<u16>>());
    }

    #[test]
    fn an_empty_delta_is_one_empty_part() {
        let parts = split(&header(), &Snapshot::default(), &[0; 4], 16_000);
        assert_eq!(parts.len(), 1);
        assert!(parts[0].is_empty());
    }

    #[test]
    fn body_has_the_contract_fields_and_part_metadata() {
        let delta = snap([50442]);
        let part = Part::of(&delta, 0..1);
        let body = render(&header(), 2, false, (1, 1), &[0, 0, 3, 0], &delta, &part);
        assert_eq!(
            body,
            concat!(
                r#"{"agent_uuid":"804c722f-7186-47c7-89fd-03e36f90dee4","observed_at":"2026-11-27T01:57:27Z","#,
                r#""sequence_number":2,"full_snapshot":false,"hostname":"vm","agent_version":"0.1.0","#,
                r#""platform":"linux","platform_release":"6.1.0","metadata":{"runtime":"rust-static","#,
                r#""delta_mode":"set-diff","collector":"native","part":1,"parts":1,"#,
                r#""removed_since_last_report":{"addresses":0,"neighbors":0,"connections":3,"routes":0},"records_left_out":0},"#,
                r#""addresses":[],"neighbors":[],"connections":[{"local_ip":"127.0.0.1","local_port":50442,"#,
                r#""pid":null,"process_name":null,"protocol":"tcp","remote_ip":"127.0.0.1","remote_port":8000,"#,
                r#""state":"established"}],"routes":[]}"#
            )
        );
    }

    #[test]
    fn budget_keeps_headroom_under_both_limits() {
        assert_eq!(part_budget(262_144), 235_926);
        assert_eq!(part_budget(10_485_760), 235_926);
        assert_eq!(part_budget(16_384), 14_742);
    }

    #[test]
    fn truncation_respects_character_boundaries() {
        let mut s = "é".repeat(300);
        truncate_chars(&mut s, 255);
        assert_eq!(s.chars().count(), 255);
        let mut short = String::from("eth0");
        truncate_chars(&mut short, 255);
        assert_eq!(short, "eth0");
    }
}
