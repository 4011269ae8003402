//! The request schemas of the real server (pydantic v2 models) and its ingestion rules.
//!
//! Error types and messages follow pydantic's where the samples show them (`value_error` with the
//! server's MAC message, `json_invalid`); elsewhere they are pydantic's usual wording. Where the
//! real schema is unknown the fake is STRICTER (no lax coercions: `"5"` is not an int, `5.0` is
//! not an int, a timestamp number is not a datetime), so an agent accepted here is accepted there.

use std::collections::BTreeSet;
use std::net::IpAddr;

use miniserde::json::{Number, Object, Value};

use super::time;

/// One entry of a 422 `Validation failed` body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted location without the `body` prefix, e.g. `connections.3.protocol`.
    pub field: String,
    /// Human-readable message.
    pub message: String,
    /// pydantic error type, e.g. `value_error`, `missing`, `string_too_long`.
    pub kind: String,
}

impl FieldError {
    /// Builds an error entry.
    pub fn new(field: &str, message: impl Into<String>, kind: &str) -> FieldError {
        FieldError {
            field: field.to_string(),
            message: message.into(),
            kind: kind.to_string(),
        }
    }
}

/// The message of `json_invalid` for text that is not a JSON document. pydantic reports jiter's
/// position; this reproduces it for the common cases (empty body, a non-JSON first character) and
/// says something generic otherwise.
pub fn invalid_json_message(text: &[u8]) -> String {
    let first = text.iter().position(|b| !b" \t\r\n".contains(b));
    let Some(at) = first else {
        return "Invalid JSON: EOF while parsing a value at line 1 column 0".into();
    };
    let line = 1 + text[..at].iter().filter(|b| **b == b'\n').count();
    let column = at
        - text[..at]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |p| p + 1)
        + 1;
    if std::str::from_utf8(text).is_err() {
        return "Invalid JSON: invalid unicode code point".into();
    }
    if !b"{[\"-0123456789tfn".contains(&text[at]) {
        return format!("Invalid JSON: expected value at line {line} column {column}");
    }
    "Invalid JSON: malformed or truncated document".into()
}

/// Whether a field may be absent or `null`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Must be present and not null.
    Required,
    /// May be absent (default) but not null.
    NotNull,
    /// May be absent or null.
    Nullable,
}

/// Collects every error of one document, in field order, like pydantic.
struct Checker {
    errors: Vec<FieldError>,
}

fn path(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}")
}

impl Checker {
    fn push(&mut self, field: String, message: impl Into<String>, kind: &str) {
        self.errors.push(FieldError {
            field,
            message: message.into(),
            kind: kind.to_string(),
        });
    }

    /// The present, non-null value of a field; records `missing` or the type error for null.
    fn lookup<'a>(
        &mut self,
        obj: &'a Object,
        prefix: &str,
        name: &str,
        need: Need,
        type_error: (&str, &str),
    ) -> Option<&'a Value> {
        match obj.get(name) {
            None if need == Need::Required => {
                self.push(path(prefix, name), "Field required", "missing");
                None
            }
            None => None,
            Some(Value::Null) if need == Need::Nullable => None,
            Some(Value::Null) => {
                self.push(path(prefix, name), type_error.1, type_error.0);
                None
            }
            Some(v) => Some(v),
        }
    }

    fn string<'a>(
        &mut self,
        obj: &'a Object,
        prefix: &str,
        name: &str,
        need: Need,
        min: usize,
        max: usize,
    ) -> Option<&'a str> {
        const TYPE: (&str, &str) = ("string_type", "Input should be a valid string");
        let value = self.lookup(obj, prefix, name, need, TYPE)?;
        let Value::String(text) = value else {
            self.push(path(prefix, name), TYPE.1, TYPE.0);
            return None;
        };
        // Python counts code points, not bytes.
        let len = text.chars().count();
        if len < min {
            let unit = if min == 1 { "character" } else { "characters" };
            self.push(
                path(prefix, name),
                format!("String should have at least {min} {unit}"),
                "string_too_short",
            );
            return None;
        }
        if len > max {
            let unit = if max == 1 { "character" } else { "characters" };
            self.push(
                path(prefix, name),
                format!("String should have at most {max} {unit}"),
                "string_too_long",
            );
            return None;
        }
        Some(text)
    }

    fn int(
        &mut self,
        obj: &Object,
        prefix: &str,
        name: &str,
        need: Need,
        range: (Option<i128>, Option<i128>),
    ) -> Option<i128> {
        const TYPE: (&str, &str) = ("int_type", "Input should be a valid integer");
        let value = self.lookup(obj, prefix, name, need, TYPE)?;
        let n = match value {
            Value::Number(Number::U64(n)) => i128::from(*n),
            Value::Number(Number::I64(n)) => i128::from(*n),
            _ => {
                self.push(path(prefix, name), TYPE.1, TYPE.0);
                return None;
            }
        };
        if let Some(min) = range.0.filter(|min| n < *min) {
            self.push(
                path(prefix, name),
                format!("Input should be greater than or equal to {min}"),
                "greater_than_equal",
            );
            return None;
        }
        if let Some(max) = range.1.filter(|max| n > *max) {
            self.push(
                path(prefix, name),
                format!("Input should be less than or equal to {max}"),
                "less_than_equal",
            );
            return None;
        }
        Some(n)
    }

    fn boolean(&mut self, obj: &Object, prefix: &str, name: &str, need: Need) {
        const TYPE: (&str, &str) = ("bool_type", "Input should be a valid boolean");
        if let Some(value) = self.lookup(obj, prefix, name, need, TYPE) {
            if !matches!(value, Value::Bool(_)) {
                self.push(path(prefix, name), TYPE.1, TYPE.0);
            }
        }
    }

    fn dict(&mut self, obj: &Object, prefix: &str, name: &str, need: Need) {
        const TYPE: (&str, &str) = ("dict_type", "Input should be a valid dictionary");
        if let Some(value) = self.lookup(obj, prefix, name, need, TYPE) {
            if !matches!(value, Value::Object(_)) {
                self.push(path(prefix, name), TYPE.1, TYPE.0);
            }
        }
    }

    /// A list of records, each checked by `check` with its own prefix (`addresses.0.`).
    fn records(
        &mut self,
        obj: &Object,
        name: &str,
        model: &str,
        check: fn(&mut Checker, &Object, &str),
    ) {
        const TYPE: (&str, &str) = ("list_type", "Input should be a valid list");
        let Some(value) = self.lookup(obj, "", name, Need::NotNull, TYPE) else {
            return;
        };
        let Value::Array(items) = value else {
            self.push(name.to_string(), TYPE.1, TYPE.0);
            return;
        };
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::Object(record) => check(self, record, &format!("{name}.{i}.")),
                _ => self.push(
                    format!("{name}.{i}"),
                    format!("Input should be a valid dictionary or instance of {model}"),
                    "model_type",
                ),
            }
        }
    }

    /// An IP address in text form; unspecified ones (`0.0.0.0`, `::`) only where allowed.
    fn ip(&mut self, obj: &Object, prefix: &str, name: &str, need: Need, unspecified_ok: bool) {
        let Some(text) = self.string(obj, prefix, name, need, 0, usize::MAX) else {
            return;
        };
        match text.parse::<IpAddr>() {
            Err(_) => self.push(
                path(prefix, name),
                format!("Invalid IP address '{text}'"),
                "value_error",
            ),
            Ok(ip) if ip.is_unspecified() && !unspecified_ok => self.push(
                path(prefix, name),
                format!("Unspecified IP address '{text}' is not allowed"),
                "value_error",
            ),
            Ok(_) => {}
        }
    }

    /// `^([0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}$` or null, with the server's own message.
    fn mac(&mut self, obj: &Object, prefix: &str, name: &str) {
        let Some(text) = self.string(obj, prefix, name, Need::Nullable, 0, usize::MAX) else {
            return;
        };
        if !is_mac(text) {
            self.push(
                path(prefix, name),
                format!(
                    "Invalid MAC address '{text}'. Expected format XX:XX:XX:XX:XX:XX or \
                     XX-XX-XX-XX-XX-XX (6 pairs of hex digits)"
                ),
                "value_error",
            );
        }
    }

    fn choice(&mut self, obj: &Object, prefix: &str, name: &str, need: Need, options: &[&str]) {
        let Some(text) = self.string(obj, prefix, name, need, 0, usize::MAX) else {
            return;
        };
        if !options.contains(&text) {
            let quoted: Vec<String> = options.iter().map(|o| format!("'{o}'")).collect();
            let (last, init) = quoted.split_last().expect("options are never empty");
            self.push(
                path(prefix, name),
                format!("Input should be {} or {last}", init.join(", ")),
                "enum",
            );
        }
    }

    fn datetime(&mut self, obj: &Object, prefix: &str, name: &str, need: Need) {
        const TYPE: (&str, &str) = ("datetime_type", "Input should be a valid datetime");
        let Some(value) = self.lookup(obj, prefix, name, need, TYPE) else {
            return;
        };
        let Value::String(text) = value else {
            self.push(path(prefix, name), TYPE.1, TYPE.0);
            return;
        };
        if let Err(reason) = time::parse_datetime(text) {
            self.push(
                path(prefix, name),
                format!("Input should be a valid datetime, {reason}"),
                "datetime_parsing",
            );
        }
    }
}

/// True for exactly six hex pairs separated by `:` or `-` (the server's regex, which allows
/// mixing the two separators).
pub fn is_mac(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 17
        && b.iter().enumerate().all(|(i, c)| {
            if i % 3 == 2 {
                matches!(c, b':' | b'-')
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

fn check_address(c: &mut Checker, rec: &Object, prefix: &str) {
    c.ip(rec, prefix, "ip_address", Need::Required, false);
    c.string(rec, prefix, "interface", Need::Nullable, 0, 255);
    c.int(
        rec,
        prefix,
        "prefix_length",
        Need::Nullable,
        (Some(0), Some(128)),
    );
    c.mac(rec, prefix, "mac_address");
}

fn check_neighbor(c: &mut Checker, rec: &Object, prefix: &str) {
    c.ip(rec, prefix, "ip_address", Need::Required, false);
    c.mac(rec, prefix, "mac_address");
    c.string(rec, prefix, "interface", Need::Nullable, 0, 255);
    c.string(rec, prefix, "state", Need::Nullable, 0, 50);
    c.string(rec, prefix, "hostname", Need::Nullable, 0, 255);
}

fn check_route(c: &mut Checker, rec: &Object, prefix: &str) {
    c.string(rec, prefix, "destination", Need::Required, 1, 255);
    c.ip(rec, prefix, "gateway", Need::Nullable, true);
    c.string(rec, prefix, "interface", Need::Nullable, 0, 255);
    c.ip(rec, prefix, "source_ip", Need::Nullable, true);
}

/// Connection protocols the schema accepts.
pub const PROTOCOLS: &[&str] = &["tcp", "udp", "sctp", "ip", "icmp"];
/// Connection states the schema accepts.
pub const STATES: &[&str] = &[
    "listen",
    "established",
    "time_wait",
    "close_wait",
    "fin_wait1",
    "fin_wait2",
    "syn_recv",
    "syn_sent",
    "closing",
    "last_ack",
    "closed",
    "unknown",
];

fn check_connection(c: &mut Checker, rec: &Object, prefix: &str) {
    // `local_ip` is only a string to the schema; ingestion refuses bad or unspecified ones
    // afterwards with its own plain 422 (see `invalid_host_ip`).
    c.string(rec, prefix, "local_ip", Need::Required, 1, 255);
    c.int(
        rec,
        prefix,
        "local_port",
        Need::Required,
        (Some(0), Some(65_535)),
    );
    c.ip(rec, prefix, "remote_ip", Need::Nullable, true);
    c.int(
        rec,
        prefix,
        "remote_port",
        Need::Nullable,
        (Some(0), Some(65_535)),
    );
    c.choice(rec, prefix, "protocol", Need::Required, PROTOCOLS);
    c.choice(rec, prefix, "state", Need::Nullable, STATES);
    c.int(rec, prefix, "pid", Need::Nullable, (None, None));
    c.string(rec, prefix, "process_name", Need::Nullable, 0, 255);
}

/// Validates a registration body (already known to be a JSON object).
pub fn validate_registration(body: &Object) -> Vec<FieldError> {
    let mut c = Checker { errors: Vec::new() };
    c.string(body, "", "enrollment_key", Need::Required, 1, 512);
    c.string(body, "", "agent_uuid", Need::Required, 1, 128);
    for name in ["display_name", "hostname", "site_name"] {
        c.string(body, "", name, Need::Nullable, 0, 255);
    }
    c.string(body, "", "agent_version", Need::Nullable, 0, 100);
    c.string(body, "", "platform", Need::Nullable, 0, 255);
    c.string(body, "", "platform_release", Need::Nullable, 0, 255);
    c.dict(body, "", "metadata", Need::NotNull);
    c.records(body, "addresses", "AgentAddressObservation", check_address);
    c.errors
}

/// Validates a check-in body (already known to be a JSON object).
pub fn validate_checkin(body: &Object) -> Vec<FieldError> {
    let mut c = Checker { errors: Vec::new() };
    c.string(body, "", "agent_uuid", Need::Required, 1, 128);
    c.datetime(body, "", "observed_at", Need::Required);
    c.int(body, "", "sequence_number", Need::Nullable, (Some(0), None));
    c.boolean(body, "", "full_snapshot", Need::NotNull);
    c.string(body, "", "hostname", Need::Nullable, 0, 255);
    c.string(body, "", "fqdn", Need::Nullable, 0, 255);
    c.string(body, "", "agent_version", Need::Nullable, 0, 100);
    c.string(body, "", "platform", Need::Nullable, 0, 255);
    c.string(body, "", "platform_release", Need::Nullable, 0, 255);
    c.dict(body, "", "metadata", Need::NotNull);
    c.records(body, "addresses", "AgentAddressObservation", check_address);
    c.records(
        body,
        "neighbors",
        "AgentNeighborObservation",
        check_neighbor,
    );
    c.records(body, "routes", "AgentRouteObservation", check_route);
    c.records(
        body,
        "connections",
        "AgentConnectionObservation",
        check_connection,
    );
    c.errors
}

/// The records of a validated list field (empty when absent).
pub fn records<'a>(body: &'a Object, name: &str) -> impl Iterator<Item = &'a Object> {
    let items = match body.get(name) {
        Some(Value::Array(items)) => Some(items.iter()),
        _ => None,
    };
    items.into_iter().flatten().filter_map(|v| match v {
        Value::Object(o) => Some(o),
        _ => None,
    })
}

/// The string in a field, if it is one.
pub fn text<'a>(obj: &'a Object, name: &str) -> Option<&'a str> {
    match obj.get(name) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

/// Ingestion stores every connection's `local_ip` as a host and refuses an unspecified (or
/// unparsable) one with a plain `{"detail": "Invalid host IP '<ip>'"}`: the first offender, as
/// sent.
pub fn invalid_host_ip(body: &Object) -> Option<String> {
    records(body, "connections").find_map(|conn| {
        let local = text(conn, "local_ip").unwrap_or_default();
        match local.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() => None,
            _ => Some(local.to_string()),
        }
    })
}

/// The addresses and MACs a (validated) check-in or registration mentions, as the server lists
/// them in its summaries: canonical text, sorted, unspecified addresses left out.
#[derive(Debug, Default)]
pub struct Seen {
    /// IPs from addresses, neighbours, and connection endpoints.
    pub ips: BTreeSet<String>,
    /// Lower-case MACs from addresses and neighbours.
    pub macs: BTreeSet<String>,
}

/// Collects [`Seen`] from a validated body.
pub fn seen(body: &Object) -> Seen {
    let mut seen = Seen::default();
    let mut add_ip = |text: Option<&str>| {
        if let Some(ip) = text.and_then(|t| t.parse::<IpAddr>().ok()) {
            if !ip.is_unspecified() {
                seen.ips.insert(ip.to_string());
            }
        }
    };
    for list in ["addresses", "neighbors"] {
        for rec in records(body, list) {
            add_ip(text(rec, "ip_address"));
        }
    }
    for conn in records(body, "connections") {
        add_ip(text(conn, "local_ip"));
        add_ip(text(conn, "remote_ip"));
    }
    for list in ["addresses", "neighbors"] {
        for rec in records(body, list) {
            if let Some(mac) = text(rec, "mac_address") {
                seen.macs.insert(mac.to_ascii_lowercase().replace('-', ":"));
            }
        }
    }
    seen
}
