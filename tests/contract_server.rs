//! Tests of the fake Graphēon server (`tests/support`) against the captured contract samples:
//! if the fake drifts from the real server, the agent's integration tests prove nothing.
//!
//! A tiny raw HTTP client is used on purpose, so that these tests depend neither on the agent's
//! HTTP code nor on any HTTP crate.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;
use miniserde::json::Value;

use support::json as j;
use support::{AgentState, ContractServer, Endpoint, EnrollmentKey, Fault};

const UUID: &str = "804c722f-7186-47c7-89fd-03e36f90dee4";
const ENROLLMENT_KEY: &str = "gaek_EXAMPLEonlyEXAMPLEonlyEXAMPLEonly000000";
const REGISTER: &str = "/api/agents/register";
const CHECK_IN: &str = "/api/agents/check-in";

/// A sample body captured from the real server (copied into `tests/fixtures/contract/`).
fn sample(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/contract")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read sample {}: {e}", path.display()))
}

/// A response as read off the wire.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn parse(bytes: &[u8]) -> Reply {
        let split = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(bytes)));
        let head = String::from_utf8(bytes[..split].to_vec()).expect("UTF-8 head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.to_string(), v.trim().to_string()))
            .collect();
        Reply {
            status,
            headers,
            body: bytes[split + 4..].to_vec(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        j::parse(&self.text())
    }

    /// Status and canonical JSON body, for whole-output comparisons.
    fn canonical(&self) -> (u16, String) {
        (self.status, j::canonical(&self.text()))
    }
}

/// The exact status and body of a sample.
fn expected(status: u16, sample_name: &str) -> (u16, String) {
    (status, j::canonical(&sample(sample_name)))
}

fn request_bytes(path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    let chunked = headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"));
    if !chunked {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Sends raw request bytes and reads until the server closes.
fn exchange(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(raw)?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out)?;
    Ok(out)
}

fn post(srv: &ContractServer, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let raw = exchange(srv.addr(), &request_bytes(path, headers, body)).expect("exchange");
    Reply::parse(&raw)
}

fn register(srv: &ContractServer, body: &str) -> Reply {
    post(
        srv,
        REGISTER,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

fn check_in(srv: &ContractServer, key: &str, body: &[u8], encoding: Option<&str>) -> Reply {
    let mut headers = vec![
        ("Content-Type", "application/json"),
        ("X-Agent-Api-Key", key),
    ];
    if let Some(encoding) = encoding {
        headers.push(("Content-Encoding", encoding));
    }
    post(srv, CHECK_IN, &headers, body)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

fn zlib(bytes: &[u8]) -> Vec<u8> {
    let mut enc = ZlibEncoder::new(Vec::new(), Compression::default());
    enc.write_all(bytes).expect("zlib");
    enc.finish().expect("zlib")
}

/// A server with an auto-approving key and the sample agent registered; returns its API key.
fn enrolled() -> (ContractServer, String) {
    let srv = ContractServer::start();
    srv.add_enrollment_key(ENROLLMENT_KEY, EnrollmentKey::auto_approve());
    let reply = register(&srv, &sample("registration-request.json"));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let key = j::str_at(&reply.json(), "api_key")
        .expect("auto-approve returns the key")
        .to_string();
    (srv, key)
}

/// The full-snapshot sample with one change.
fn full_snapshot_with(path: &str, value: Value) -> Vec<u8> {
    let mut body = j::parse(&sample("checkin-request-full-snapshot.decoded.json"));
    j::set(&mut body, path, value);
    j::to_string(&body).into_bytes()
}

fn keys_of(value: &Value, path: &str) -> Vec<String> {
    match j::get(value, path) {
        Some(Value::Object(obj)) => obj.keys().cloned().collect(),
        other => panic!("{path} is not an object: {other:?}"),
    }
}

/// `2026-11-30T01:57:21.769788`: no offset, as the real server writes datetimes.
fn is_naive_datetime(text: &str) -> bool {
    let b = text.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    let base = b.len() >= 19
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    base && (b.len() == 19 || (b.len() == 26 && b[19] == b'.' && digits(20..26)))
}

#[test]
fn full_snapshot_and_delta_samples_are_accepted_with_the_real_summaries() {
    let (srv, key) = enrolled();
    let full = sample("checkin-request-full-snapshot.decoded.json");
    let reply = check_in(&srv, &key, &gzip(full.as_bytes()), Some("gzip"));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    let real = j::parse(&sample("checkin-response-200-accepted-full.json"));
    assert_eq!(keys_of(&body, ""), keys_of(&real, ""));
    assert_eq!(keys_of(&body, "checkin"), keys_of(&real, "checkin"));
    assert_eq!(keys_of(&body, "agent"), keys_of(&real, "agent"));
    assert_eq!(keys_of(&body, "policy"), keys_of(&real, "policy"));
    assert_eq!(
        j::to_string(j::get(&body, "summary").unwrap()),
        j::to_string(j::get(&real, "summary").unwrap())
    );
    assert_eq!(j::str_at(&body, "status"), Some("accepted"));
    assert_eq!(j::u64_at(&body, "checkin.sequence_number"), Some(1));
    assert_eq!(j::u64_at(&body, "checkin.records_created"), Some(26));
    assert_eq!(
        j::str_at(&body, "checkin.observed_at"),
        Some("2026-11-30T01:57:27")
    );
    assert!(is_naive_datetime(j::str_at(&body, "server_time").unwrap()));

    let delta = sample("checkin-request-delta.decoded.json");
    let reply = check_in(&srv, &key, &gzip(delta.as_bytes()), Some("gzip"));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let real = j::parse(&sample("checkin-response-200-accepted-delta.json"));
    assert_eq!(
        j::to_string(j::get(&reply.json(), "summary").unwrap()),
        j::to_string(j::get(&real, "summary").unwrap())
    );

    let checkins = srv.checkins();
    assert_eq!(checkins.len(), 2);
    assert_eq!(checkins[0].body, full);
    assert_eq!(checkins[0].agent_uuid, UUID);
    assert_eq!(checkins[0].header("content-encoding"), Some("gzip"));
    assert_eq!(checkins[1].body, delta);
}

#[test]
fn unspecified_connection_local_ip_is_refused_with_the_exact_body() {
    let (srv, key) = enrolled();
    let body = full_snapshot_with("connections.0.local_ip", j::string("0.0.0.0"));
    let reply = check_in(&srv, &key, &gzip(&body), Some("gzip"));
    assert_eq!(
        reply.canonical(),
        expected(422, "checkin-response-422-invalid-host-ip-0.0.0.0.json")
    );
    let body = full_snapshot_with("connections.5.local_ip", j::string("::"));
    let reply = check_in(&srv, &key, &gzip(&body), Some("gzip"));
    assert_eq!(
        reply.canonical(),
        expected(
            422,
            "checkin-response-422-invalid-host-ip-v6-unspecified.json"
        )
    );
    // An unspecified remote end is fine (the sample's listener has remote_ip 0.0.0.0).
    assert!(srv.checkins().is_empty());
}

#[test]
fn tunnel_link_address_as_mac_is_refused_at_check_in_and_registration() {
    let (srv, key) = enrolled();
    let body = full_snapshot_with("addresses.0.mac_address", j::string("192.0.2.8"));
    let reply = check_in(&srv, &key, &gzip(&body), Some("gzip"));
    assert_eq!(
        reply.canonical(),
        expected(422, "checkin-response-422-invalid-mac.json")
    );

    let mut registration = j::parse(&sample("registration-request.json"));
    j::set(
        &mut registration,
        "addresses.0.mac_address",
        j::string("192.0.2.8"),
    );
    let reply = register(&srv, &j::to_string(&registration));
    assert_eq!(
        reply.canonical(),
        expected(422, "registration-response-422-invalid-mac.json")
    );
}

#[test]
fn only_gzip_or_no_content_encoding_is_supported() {
    let (srv, key) = enrolled();
    let full = sample("checkin-request-full-snapshot.decoded.json");
    let reply = check_in(&srv, &key, full.as_bytes(), Some("identity"));
    assert_eq!(
        reply.canonical(),
        expected(415, "checkin-response-415-identity-header.json")
    );
    let reply = check_in(&srv, &key, &zlib(full.as_bytes()), Some("deflate"));
    assert_eq!(
        reply.canonical(),
        expected(415, "checkin-response-415-deflate.json")
    );
    let reply = check_in(&srv, &key, &gzip(full.as_bytes()), Some("GZip"));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = check_in(&srv, &key, full.as_bytes(), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(srv.checkins().len(), 2);
}

#[test]
fn broken_gzip_fails_like_pythons_gzip_decompress() {
    let (srv, key) = enrolled();
    let full = sample("checkin-request-full-snapshot.decoded.json");
    let good = gzip(full.as_bytes());

    let mut bad_crc = good.clone();
    let at = bad_crc.len() - 8;
    bad_crc[at] ^= 0xff;
    let reply = check_in(&srv, &key, &bad_crc, Some("gzip"));
    assert_eq!(
        reply.canonical(),
        expected(400, "checkin-response-400-invalid-gzip-crc.json")
    );

    let reply = check_in(&srv, &key, &zlib(full.as_bytes()), Some("gzip"));
    assert_eq!(reply.status, 400);
    assert_eq!(
        j::str_at(&reply.json(), "detail"),
        Some(r"Invalid gzip payload: Not a gzipped file (b'x\x9c')")
    );

    let mut trailing = good.clone();
    trailing.extend_from_slice(b"garbage");
    let reply = check_in(&srv, &key, &trailing, Some("gzip"));
    assert_eq!(reply.status, 400);
    assert_eq!(
        j::str_at(&reply.json(), "detail"),
        Some("Invalid gzip payload: Not a gzipped file (b'ga')")
    );

    // Starlette answers an uncaught EOFError with a plain-text 500.
    let reply = check_in(&srv, &key, &good[..good.len() - 12], Some("gzip"));
    assert_eq!(reply.status, 500);
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(reply.text(), "Internal Server Error");

    // Python skips NUL padding after a member and reads concatenated members.
    let mut padded = good.clone();
    padded.extend_from_slice(&[0, 0, 0, 0]);
    assert_eq!(check_in(&srv, &key, &padded, Some("gzip")).status, 200);
    assert!(srv.checkins().len() == 1);
}

#[test]
fn raw_body_over_the_server_limit_is_413_whatever_the_encoding() {
    let (srv, key) = enrolled();
    let oversize = vec![b' '; support::RAW_BODY_LIMIT + 1];
    for encoding in [Some("gzip"), None, Some("deflate")] {
        let reply = check_in(&srv, &key, &oversize, encoding);
        assert_eq!(
            reply.canonical(),
            expected(413, "checkin-response-413-compressed-limit.json"),
            "encoding {encoding:?}"
        );
    }
}

#[test]
fn decoded_body_over_the_policy_limit_is_413() {
    let (srv, key) = enrolled();
    let policy = support::DEFAULT_POLICY.replace("262144", "16384");
    srv.set_policy(Some(&policy));
    let padding = "x".repeat(20_000);
    let body = full_snapshot_with("metadata.runtime", j::string(&padding));
    assert!(gzip(&body).len() < 16_384);
    for (payload, encoding) in [(gzip(&body), Some("gzip")), (body.clone(), None)] {
        let reply = check_in(&srv, &key, &payload, encoding);
        assert_eq!(
            reply.canonical(),
            expected(413, "checkin-response-413-decoded-exceeds-policy.json")
        );
    }
    let full = sample("checkin-request-full-snapshot.decoded.json");
    let reply = check_in(&srv, &key, &gzip(full.as_bytes()), Some("gzip"));
    assert_eq!(reply.status, 200);
    assert_eq!(
        j::u64_at(&reply.json(), "policy.max_report_bytes"),
        Some(16_384)
    );

    srv.set_policy(None);
    let reply = check_in(&srv, &key, &gzip(full.as_bytes()), Some("gzip"));
    assert_eq!(reply.status, 200);
    assert!(j::is_null(&reply.json(), "policy"));
}

#[test]
fn registration_is_pending_until_approved_then_returns_the_key_exactly_once() {
    let srv = ContractServer::start();
    srv.add_enrollment_key(ENROLLMENT_KEY, EnrollmentKey::default());
    let request = sample("registration-request.json");
    let top = |name: &str| keys_of(&j::parse(&sample(name)), "");

    for _ in 0..2 {
        let reply = register(&srv, &request);
        assert_eq!(reply.status, 200);
        let body = reply.json();
        assert_eq!(
            keys_of(&body, ""),
            top("registration-response-200-pending.json")
        );
        assert_eq!(j::str_at(&body, "status"), Some("pending"));
        assert_eq!(j::bool_at(&body, "approval_required"), Some(true));
        assert!(j::is_null(&body, "api_key"));
        assert_eq!(j::str_at(&body, "agent.enrollment_state"), Some("pending"));
        assert_eq!(j::u64_at(&body, "agent.id"), Some(1));
        assert!(is_naive_datetime(j::str_at(&body, "server_time").unwrap()));
    }
    assert_eq!(srv.agent_state(UUID), Some(AgentState::Pending));

    srv.approve(UUID);
    let body = register(&srv, &request).json();
    assert_eq!(
        keys_of(&body, ""),
        top("registration-response-200-active-with-api-key.json")
    );
    assert_eq!(j::str_at(&body, "status"), Some("active"));
    assert_eq!(j::bool_at(&body, "approval_required"), Some(false));
    assert_eq!(
        j::str_at(&body, "message"),
        Some("Agent approved and API key issued")
    );
    let key = j::str_at(&body, "api_key").expect("key issued").to_string();
    assert!(key.starts_with("gpak_") && key.len() == 48, "{key}");

    for _ in 0..2 {
        let body = register(&srv, &request).json();
        assert_eq!(j::str_at(&body, "status"), Some("active"));
        assert_eq!(j::str_at(&body, "message"), Some("Agent already approved"));
        assert!(j::is_null(&body, "api_key"));
    }
    assert_eq!(srv.registrations(), 5);
    let full = sample("checkin-request-full-snapshot.decoded.json");
    assert_eq!(
        check_in(&srv, &key, &gzip(full.as_bytes()), Some("gzip")).status,
        200
    );
}

#[test]
fn rotation_invalidates_the_old_key_at_once() {
    let (srv, old) = enrolled();
    let new = srv.rotate_api_key(UUID);
    assert_ne!(new, old);
    let full = gzip(sample("checkin-request-full-snapshot.decoded.json").as_bytes());
    let reply = check_in(&srv, &old, &full, Some("gzip"));
    assert_eq!(
        reply.canonical(),
        expected(401, "checkin-response-401-invalid-api-key.json")
    );
    assert_eq!(check_in(&srv, &new, &full, Some("gzip")).status, 200);
    let body = register(&srv, &sample("registration-request.json")).json();
    assert_eq!(j::str_at(&body, "message"), Some("Agent already approved"));
    assert!(j::is_null(&body, "api_key"));
}

#[test]
fn chunked_request_body_is_accepted() {
    let (srv, key) = enrolled();
    let payload = gzip(sample("checkin-request-full-snapshot.decoded.json").as_bytes());
    let (a, rest) = payload.split_at(100);
    let (b, c) = rest.split_at(rest.len() / 2);
    let mut body = Vec::new();
    for (i, chunk) in [a, b, c].iter().enumerate() {
        let ext = if i == 1 { ";name=value" } else { "" };
        body.extend_from_slice(format!("{:x}{ext}\r\n", chunk.len()).as_bytes());
        body.extend_from_slice(chunk);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let headers = [
        ("X-Agent-Api-Key", key.as_str()),
        ("Content-Encoding", "gzip"),
        ("Transfer-Encoding", "chunked"),
    ];
    let reply = post(&srv, CHECK_IN, &headers, &body);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let last = srv.requests().pop().expect("recorded");
    assert!(last.chunked);
    assert_eq!(last.body, payload);
    assert_eq!(last.status, Some(200));
}

#[test]
fn registration_refusals_match_the_contract() {
    let srv = ContractServer::start();
    srv.add_enrollment_key(ENROLLMENT_KEY, EnrollmentKey::default());
    srv.add_enrollment_key(
        "gaek_expired",
        EnrollmentKey {
            expired: true,
            ..EnrollmentKey::default()
        },
    );
    srv.add_enrollment_key(
        "gaek_single",
        EnrollmentKey {
            max_registrations: Some(1),
            ..EnrollmentKey::default()
        },
    );
    let with = |key: &str, uuid: &str| {
        let mut body = j::parse(&sample("registration-request.json"));
        j::set(&mut body, "enrollment_key", j::string(key));
        j::set(&mut body, "agent_uuid", j::string(uuid));
        j::to_string(&body)
    };
    let detail = |reply: Reply| {
        (
            reply.status,
            j::str_at(&reply.json(), "detail").map(String::from),
        )
    };

    assert_eq!(
        register(&srv, &with("gaek_wrong", UUID)).canonical(),
        expected(401, "registration-response-401-invalid-enrollment-key.json")
    );
    assert_eq!(
        detail(register(&srv, &with("gaek_expired", UUID))),
        (403, Some("Enrollment key has expired".into()))
    );
    assert_eq!(register(&srv, &with("gaek_single", "uuid-1")).status, 200);
    assert_eq!(register(&srv, &with("gaek_single", "uuid-1")).status, 200);
    assert_eq!(
        detail(register(&srv, &with("gaek_single", "uuid-2"))),
        (
            403,
            Some("Enrollment key registration limit reached".into())
        )
    );
    assert_eq!(
        detail(register(&srv, &with(ENROLLMENT_KEY, "uuid-1"))),
        (
            409,
            Some("Agent UUID is already associated with a different enrollment key".into())
        )
    );
    assert_eq!(register(&srv, &with(ENROLLMENT_KEY, UUID)).status, 200);
    srv.reject(UUID);
    assert_eq!(
        register(&srv, &with(ENROLLMENT_KEY, UUID)).canonical(),
        expected(403, "registration-response-403-rejected.json")
    );

    let reply = register(&srv, r#"{"agent_uuid": "", "extra": 1}"#);
    let want = r#"{"detail":"Validation failed","errors":[
        {"field":"enrollment_key","message":"Field required","type":"missing"},
        {"field":"agent_uuid","message":"String should have at least 1 character","type":"string_too_short"}]}"#;
    assert_eq!(reply.canonical(), (422, j::canonical(want)));
}

#[test]
fn check_in_refusals_match_the_contract() {
    let (srv, key) = enrolled();
    let full = gzip(sample("checkin-request-full-snapshot.decoded.json").as_bytes());
    let detail = |reply: Reply| {
        (
            reply.status,
            j::str_at(&reply.json(), "detail").map(String::from),
        )
    };

    let no_key = post(&srv, CHECK_IN, &[("Content-Encoding", "gzip")], &full);
    assert_eq!(detail(no_key), (401, Some("Missing agent API key".into())));

    let other = full_snapshot_with("agent_uuid", j::string("someone-else"));
    assert_eq!(
        check_in(&srv, &key, &gzip(&other), Some("gzip")).status,
        409
    );

    let reply = check_in(&srv, &key, b"garbage", None);
    assert_eq!(
        reply.canonical(),
        expected(422, "checkin-response-422-invalid-json.json")
    );

    srv.set_api_key_header("X-Custom-Key");
    assert_eq!(check_in(&srv, &key, &full, Some("gzip")).status, 401);
    let headers = [("x-custom-key", key.as_str()), ("Content-Encoding", "gzip")];
    assert_eq!(post(&srv, CHECK_IN, &headers, &full).status, 200);
    srv.set_api_key_header(support::API_KEY_HEADER);

    srv.reject(UUID);
    assert_eq!(
        check_in(&srv, &key, &full, Some("gzip")).canonical(),
        expected(403, "checkin-response-403-agent-rejected.json")
    );
    assert_eq!(srv.checkins().len(), 1);
}

#[test]
fn field_validation_reports_every_error_like_pydantic() {
    let (srv, key) = enrolled();
    let mut body = j::parse(&sample("checkin-request-full-snapshot.decoded.json"));
    if let Value::Object(obj) = &mut body {
        obj.remove("observed_at");
    }
    j::set(&mut body, "addresses.1.prefix_length", j::uint(129));
    j::set(&mut body, "neighbors.0.ip_address", j::string("0.0.0.0"));
    j::set(&mut body, "routes.0.gateway", j::string("bogus"));
    j::set(&mut body, "connections.3.protocol", j::string("tcp6"));
    j::set(&mut body, "connections.4.local_port", j::uint(70_000));
    j::set(&mut body, "connections.5.state", j::string("ESTAB"));
    let reply = check_in(
        &srv,
        &key,
        &gzip(j::to_string(&body).as_bytes()),
        Some("gzip"),
    );
    let want = r#"{"detail":"Validation failed","errors":[
      {"field":"observed_at","message":"Field required","type":"missing"},
      {"field":"addresses.1.prefix_length","message":"Input should be less than or equal to 128","type":"less_than_equal"},
      {"field":"neighbors.0.ip_address","message":"Unspecified IP address '0.0.0.0' is not allowed","type":"value_error"},
      {"field":"routes.0.gateway","message":"Invalid IP address 'bogus'","type":"value_error"},
      {"field":"connections.3.protocol","message":"Input should be 'tcp', 'udp', 'sctp', 'ip' or 'icmp'","type":"enum"},
      {"field":"connections.4.local_port","message":"Input should be less than or equal to 65535","type":"less_than_equal"},
      {"field":"connections.5.state","message":"Input should be 'listen', 'established', 'time_wait', 'close_wait', 'fin_wait1', 'fin_wait2', 'syn_recv', 'syn_sent', 'closing', 'last_ack', 'closed' or 'unknown'","type":"enum"}]}"#;
    assert_eq!(reply.canonical(), (422, j::canonical(want)));

    let nulls = full_snapshot_with("connections.0.pid", Value::Null);
    assert_eq!(
        check_in(&srv, &key, &gzip(&nulls), Some("gzip")).status,
        200
    );
    let offset = full_snapshot_with("observed_at", j::string("2026-11-30T03:57:27.25+02:00"));
    let reply = check_in(&srv, &key, &gzip(&offset), Some("gzip"));
    assert_eq!(
        j::str_at(&reply.json(), "checkin.observed_at"),
        Some("2026-11-30T03:57:27.250000"),
        "the server drops the offset instead of converting"
    );
}

#[test]
fn injected_faults_apply_to_the_next_matching_requests_only() {
    let (srv, key) = enrolled();
    let full = gzip(sample("checkin-request-full-snapshot.decoded.json").as_bytes());
    let raw = request_bytes(
        CHECK_IN,
        &[("X-Agent-Api-Key", &key), ("Content-Encoding", "gzip")],
        &full,
    );

    srv.inject(
        Endpoint::CheckIn,
        Fault::status(503, "Service Unavailable"),
        2,
    );
    srv.inject(Endpoint::Register, Fault::status(500, "boom"), 1);
    for _ in 0..2 {
        let reply = Reply::parse(&exchange(srv.addr(), &raw).unwrap());
        assert_eq!(
            reply.canonical(),
            (503, j::canonical(r#"{"detail":"Service Unavailable"}"#))
        );
    }
    assert_eq!(
        Reply::parse(&exchange(srv.addr(), &raw).unwrap()).status,
        200
    );

    srv.inject(Endpoint::Any, Fault::NotJson(502), 1);
    let reply = Reply::parse(&exchange(srv.addr(), &raw).unwrap());
    assert_eq!(reply.status, 502);
    assert!(reply.text().starts_with("<html>"));

    srv.inject(Endpoint::Any, Fault::TruncatedBody, 1);
    let reply = Reply::parse(&exchange(srv.addr(), &raw).unwrap());
    let declared: usize = reply.header("content-length").unwrap().parse().unwrap();
    assert!(reply.body.len() < declared);

    srv.inject(Endpoint::Any, Fault::HugeBody(50 * 1024 * 1024), 1);
    let reply = Reply::parse(&exchange(srv.addr(), &raw).unwrap());
    assert_eq!(reply.body.len(), 50 * 1024 * 1024);

    srv.inject(Endpoint::Any, Fault::Close, 1);
    assert_eq!(exchange(srv.addr(), &raw).unwrap(), Vec::<u8>::new());

    srv.inject(Endpoint::Any, Fault::Reset, 1);
    let err = exchange(srv.addr(), &raw).expect_err("reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);

    // The register fault is still waiting for its request.
    let reply = register(&srv, &sample("registration-request.json"));
    assert_eq!(reply.status, 500);
    let statuses: Vec<Option<u16>> = srv.requests().iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [
            Some(200),
            Some(503),
            Some(503),
            Some(200),
            Some(502),
            Some(200),
            Some(200),
            None,
            None,
            Some(500)
        ]
    );
    assert_eq!(srv.checkins().len(), 1);
}

#[test]
fn a_slow_response_does_not_block_other_requests() {
    let (srv, key) = enrolled();
    srv.inject(Endpoint::CheckIn, Fault::Slow(Duration::from_secs(2)), 1);
    let full = gzip(sample("checkin-request-full-snapshot.decoded.json").as_bytes());
    let raw = request_bytes(
        CHECK_IN,
        &[("X-Agent-Api-Key", &key), ("Content-Encoding", "gzip")],
        &full,
    );
    let addr = srv.addr();
    let started = Instant::now();
    let slow = thread::spawn(move || Reply::parse(&exchange(addr, &raw).unwrap()).status);
    while srv.requests().len() < 2 {
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        register(&srv, &sample("registration-request.json")).status,
        200
    );
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(slow.join().unwrap(), 200);
    assert!(started.elapsed() >= Duration::from_secs(2));
}

#[test]
fn accept_then_delay_commits_before_the_client_gives_up() {
    let (srv, key) = enrolled();
    srv.inject(
        Endpoint::CheckIn,
        Fault::AcceptThenDelay(Duration::from_secs(30)),
        1,
    );
    let full = gzip(sample("checkin-request-full-snapshot.decoded.json").as_bytes());
    let raw = request_bytes(
        CHECK_IN,
        &[("X-Agent-Api-Key", &key), ("Content-Encoding", "gzip")],
        &full,
    );
    let mut stream = TcpStream::connect(srv.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    stream.write_all(&raw).unwrap();
    let err = stream.read(&mut [0u8; 64]).expect_err("no answer yet");
    assert!(matches!(
        err.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut
    ));
    let deadline = Instant::now() + Duration::from_secs(5);
    while srv.checkins().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(srv.checkins().len(), 1, "committed although not answered");
    assert_eq!(srv.requests()[1].status, Some(200));
    assert!(!srv.requests()[1].completed);
    let started = Instant::now();
    drop(srv);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drop must not wait"
    );
}

#[test]
fn dropping_the_server_stops_idle_and_slow_connections() {
    let srv = ContractServer::start();
    srv.inject(Endpoint::Any, Fault::Slow(Duration::from_secs(60)), 1);
    let addr = srv.addr();
    let idle = TcpStream::connect(addr).unwrap();
    let slow = thread::spawn(move || exchange(addr, &request_bytes(REGISTER, &[], b"{}")));
    while srv.requests().is_empty() {
        thread::sleep(Duration::from_millis(5));
    }
    let started = Instant::now();
    drop(srv);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(slow.join().unwrap().map(|b| b.len()).ok(), Some(0));
    drop(idle);
}

#[test]
fn unknown_paths_and_methods_are_refused() {
    let srv = ContractServer::start();
    let reply = post(&srv, "/api/agents/register/", &[], b"{}");
    assert_eq!(
        reply.canonical(),
        (404, j::canonical(r#"{"detail":"Not Found"}"#))
    );
    let raw = exchange(
        srv.addr(),
        b"GET /api/agents/check-in HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    assert_eq!(Reply::parse(&raw).status, 405);
    let raw = exchange(srv.addr(), b"nonsense\r\n\r\n").unwrap();
    assert_eq!(Reply::parse(&raw).status, 400);
    assert_eq!(srv.requests().len(), 2);
}

#[test]
fn pre_provisioned_agent_can_check_in_with_its_key() {
    let srv = ContractServer::start();
    srv.add_enrollment_key(ENROLLMENT_KEY, EnrollmentKey::default());
    let key = srv.add_active_agent(UUID, ENROLLMENT_KEY);
    let full = gzip(sample("checkin-request-full-snapshot.decoded.json").as_bytes());
    assert_eq!(check_in(&srv, &key, &full, Some("gzip")).status, 200);
    let body = register(&srv, &sample("registration-request.json")).json();
    assert_eq!(j::str_at(&body, "message"), Some("Agent already approved"));
    assert_eq!(
        srv.requests()[0].header("x-agent-api-key"),
        Some(key.as_str())
    );
}

#[test]
fn ureq_clients_are_understood_including_chunked_bodies() {
    let srv = ContractServer::start();
    srv.add_enrollment_key(ENROLLMENT_KEY, EnrollmentKey::auto_approve());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut resp = agent
        .post(format!("{}{REGISTER}", srv.url()))
        .header("Content-Type", "application/json")
        .send(sample("registration-request.json"))
        .expect("register");
    assert_eq!(resp.status().as_u16(), 200);
    let body = j::parse(&resp.body_mut().read_to_string().unwrap());
    let key = j::str_at(&body, "api_key").unwrap().to_string();

    let payload = gzip(sample("checkin-request-full-snapshot.decoded.json").as_bytes());
    for encoding in ["gzip", "identity"] {
        // A reader of unknown length makes ureq send the body chunked.
        let mut reader = std::io::Cursor::new(payload.clone());
        let mut resp = agent
            .post(format!("{}{CHECK_IN}", srv.url()))
            .header("X-Agent-Api-Key", &key)
            .header("Content-Encoding", encoding)
            .send(ureq::SendBody::from_reader(&mut reader))
            .expect("check-in");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap();
        assert_eq!(status, if encoding == "gzip" { 200 } else { 415 }, "{text}");
    }
    let requests = srv.requests_to(Endpoint::CheckIn);
    assert!(requests.iter().all(|r| r.chunked && r.body == payload));
    assert!(requests[0]
        .header("user-agent")
        .unwrap()
        .starts_with("ureq"));
    assert_eq!(srv.checkins().len(), 1);
}

#[test]
fn expect_continue_is_answered_before_the_body_is_sent() {
    let (srv, key) = enrolled();
    let payload = gzip(sample("checkin-request-full-snapshot.decoded.json").as_bytes());
    let head = format!(
        "POST {CHECK_IN} HTTP/1.1\r\nHost: x\r\nX-Agent-Api-Key: {key}\r\n\
         Content-Encoding: gzip\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        payload.len()
    );
    let mut stream = TcpStream::connect(srv.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(&payload).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert_eq!(Reply::parse(&rest).status, 200);
    srv.wait_for_requests(2, Duration::from_secs(5));
}
