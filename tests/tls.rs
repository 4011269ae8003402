//! HTTPS end to end: the real binary against a TLS server on 127.0.0.1 whose certificate a
//! private test CA signed (`tests/fixtures/tls`, test-only keys, see its README).
//!
//! Proves which certificates the agent trusts (the built-in web PKI roots, or exactly the
//! `--ca-file` bundle), that an untrusted certificate is a configuration error (exit 2) that is
//! neither retried nor sent anything, that `--insecure-skip-verify` works and warns, and that
//! every protocol version, cipher suite and key exchange the agent offers completes a handshake.

mod support;

use support::agent::assert_code;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use grapheon_agent::client::VERSION;
use miniserde::json::Value;
use rustls::crypto::ring::{cipher_suite, default_provider, kx_group};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned, SupportedProtocolVersion};

use support::agent::{Agent, Run};
use support::json::str_at;

/// The key the server issues at registration.
const API_KEY: &str = "gpak_tlsTestOnlyApiKey000000000000000000";

/// How long a connection may stall before its thread gives up.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest request head or body the test server reads.
const MAX_REQUEST: u64 = 4 << 20;

/// A fixture file of `tests/fixtures/tls`.
fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// A request as the server read it, after a completed handshake.
#[derive(Clone, Debug)]
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    /// First value of a header, by case-insensitive name.
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// State shared by the test and the server threads.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// TCP connections accepted.
    connections: AtomicUsize,
    /// Requests read, in order.
    requests: Mutex<Vec<Request>>,
    /// Why handshakes failed (rustls' wording), in order.
    handshake_errors: Mutex<Vec<String>>,
    /// "<version> <cipher suite> <key exchange group>" of each completed handshake, in order.
    negotiated: Mutex<Vec<String>>,
}

/// A minimal HTTPS server for the two agent endpoints: one thread per connection, one request
/// per connection. Registration always answers `active` with [`API_KEY`], check-in `accepted`.
struct TlsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl TlsServer {
    /// Serves `server.pem` (signed by the test CA) on an ephemeral port of 127.0.0.1.
    fn start() -> TlsServer {
        // The provider ureq itself would pick: the tests build nothing the agent does not.
        TlsServer::start_with(default_provider(), rustls::DEFAULT_VERSIONS)
    }

    /// Like [`TlsServer::start`], accepting only what `provider` and `versions` allow.
    fn start_with(
        provider: CryptoProvider,
        versions: &[&'static SupportedProtocolVersion],
    ) -> TlsServer {
        let certs = CertificateDer::pem_file_iter(fixture("server.pem"))
            .expect("server.pem")
            .collect::<Result<Vec<_>, _>>()
            .expect("server.pem certificates");
        let key = PrivateKeyDer::from_pem_file(fixture("server.key")).expect("server.key");
        let config = ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server certificate and key");
        let config = Arc::new(config);

        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("listener address");
        // Polling accept lets the thread notice the stop flag without a wake-up connection.
        listener.set_nonblocking(true).expect("non-blocking");
        let shared = Arc::new(Shared::default());
        let for_thread = Arc::clone(&shared);
        let acceptor = thread::spawn(move || {
            let mut workers = Vec::new();
            while !for_thread.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        for_thread.connections.fetch_add(1, Ordering::SeqCst);
                        let (shared, config) = (Arc::clone(&for_thread), Arc::clone(&config));
                        workers.push(thread::spawn(move || serve(&shared, config, stream)));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
            for w in workers {
                let _ = w.join();
            }
        });
        TlsServer {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `https://127.0.0.1:<port>`: the certificate's IP SAN.
    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// TCP connections accepted so far.
    fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Requests read so far.
    fn requests(&self) -> Vec<Request> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What each completed handshake so far agreed on.
    fn negotiated(&self) -> Vec<String> {
        self.shared
            .negotiated
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Handshake failures so far, as rustls words them on the server side.
    fn handshake_errors(&self) -> Vec<String> {
        self.shared
            .handshake_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// One connection: handshake, one request, one answer, close_notify.
fn serve(shared: &Shared, config: Arc<ServerConfig>, tcp: TcpStream) {
    let _ = tcp.set_nonblocking(false);
    let _ = tcp.set_read_timeout(Some(IO_TIMEOUT));
    let _ = tcp.set_write_timeout(Some(IO_TIMEOUT));
    let conn = ServerConnection::new(config).expect("server connection");
    let mut tls = StreamOwned::new(conn, tcp);
    // A client that refuses our certificate ends the handshake here.
    if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
        shared
            .handshake_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(e.to_string());
        return;
    }
    let agreed = format!(
        "{:?} {:?} {:?}",
        tls.conn.protocol_version(),
        tls.conn.negotiated_cipher_suite().map(|s| s.suite()),
        tls.conn.negotiated_key_exchange_group().map(|g| g.name()),
    );
    shared
        .negotiated
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(agreed);
    let Some(request) = read_request(&mut tls) else {
        return;
    };
    let body = match (request.method.as_str(), request.path.as_str()) {
        ("POST", "/api/agents/register") => {
            let uuid = std::str::from_utf8(&request.body)
                .ok()
                .and_then(|t| miniserde::json::from_str::<Value>(t).ok())
                .and_then(|v| str_at(&v, "agent_uuid").map(str::to_string))
                .unwrap_or_default();
            Some(registration_answer(&uuid))
        }
        ("POST", "/api/agents/check-in") => Some(CHECKIN_ANSWER.to_string()),
        _ => None,
    };
    shared
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(request);
    let (status, body) = match body {
        Some(b) => ("200 OK", b),
        None => ("404 Not Found", r#"{"detail":"Not Found"}"#.to_string()),
    };
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tls.write_all(answer.as_bytes());
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

/// Reads a request head and its `Content-Length` body; `None` when the peer goes away or sends
/// something else.
fn read_request(tls: &mut StreamOwned<ServerConnection, TcpStream>) -> Option<Request> {
    let mut reader = BufReader::new(tls.take(MAX_REQUEST));
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let mut request = Request {
        method,
        path,
        headers,
        body: Vec::new(),
    };
    let length: u64 = request.header("content-length")?.parse().ok()?;
    reader.take(length).read_to_end(&mut request.body).ok()?;
    (request.body.len() as u64 == length).then_some(request)
}

/// The policy of the captured samples (60 s interval, no jitter, every table).
const POLICY: &str = r#"{"name":"rig-policy-20261130015719","description":"created by grapheon-rig","checkin_interval_seconds":60,"jitter_seconds":0,"command_timeout_seconds":15,"enabled_commands":{"ip_neigh":true,"ss_tunap":true,"ip_addr":true,"ip_route":true},"max_report_bytes":262144,"is_active":true,"id":1,"created_at":"2026-11-30T01:57:19.263789","updated_at":"2026-11-30T01:57:19.263792","agent_count":null}"#;

/// The shape of `registration-response-200-active-with-api-key.json`, trimmed to what the agent
/// reads, for this agent.
fn registration_answer(uuid: &str) -> String {
    format!(
        r#"{{"status":"active","approval_required":false,"message":"Agent approved and API key issued","api_key":"{API_KEY}","server_time":"2026-11-30T01:57:26.842540","agent":{{"agent_uuid":"{uuid}","enrollment_state":"active","approval_required":false,"is_active":true,"id":1,"api_key_prefix":"gpak_tlsTestOnlyApi","policy":{POLICY}}},"policy":{POLICY}}}"#
    )
}

/// The shape of `checkin-response-200-accepted-full.json`, trimmed.
const CHECKIN_ANSWER: &str = r#"{"status":"accepted","server_time":"2026-11-30T01:57:27.228401","agent":{"enrollment_state":"active","id":1},"checkin":{"id":1,"agent_id":1,"sequence_number":1,"full_snapshot":true,"content_encoding":"gzip","status":"accepted","error_message":null,"records_created":26},"summary":{"hosts_created":7,"arp_entries_created":3,"connections_created":16,"neighbor_count":3,"connection_count":16,"route_count":2,"raw_import_id":1}}"#;

/// The whole lifecycle went through: key stored, registration then a gzip check-in of this
/// agent carrying the key, every request with the agent's User-Agent.
fn assert_registered_and_checked_in(srv: &TlsServer, agent: &Agent, run: &Run) {
    assert_code(run, 0);
    assert_eq!(
        agent.file("api_key").as_deref().map(str::trim),
        Some(API_KEY)
    );
    let requests = srv.requests();
    let endpoints: Vec<_> = requests
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str()))
        .collect();
    assert_eq!(
        endpoints,
        [
            ("POST", "/api/agents/register"),
            ("POST", "/api/agents/check-in")
        ]
    );
    let user_agent = format!("grapheon-agent/{VERSION}");
    for r in &requests {
        assert_eq!(r.header("user-agent"), Some(user_agent.as_str()), "{r:?}");
    }
    let check_in = &requests[1];
    assert_eq!(check_in.header("x-agent-api-key"), Some(API_KEY));
    assert_eq!(check_in.header("content-encoding"), Some("gzip"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(check_in.body.as_slice())
        .read_to_string(&mut text)
        .expect("check-in body is gzip text");
    let report: Value = miniserde::json::from_str(&text).expect("check-in body is JSON");
    assert_eq!(str_at(&report, "agent_uuid"), Some(agent.uuid().as_str()));
    assert!(
        srv.handshake_errors().is_empty(),
        "{:?}",
        srv.handshake_errors()
    );
}

/// An untrusted certificate: exit 2 at once (one connection, no retry), nothing sent or stored,
/// and stderr says what to do.
fn assert_refused_certificate(srv: &TlsServer, agent: &Agent, run: &Run) {
    assert_code(run, 2);
    assert_eq!(agent.file("api_key"), None);
    assert_eq!(srv.requests().len(), 0, "{:?}", srv.requests());
    assert_eq!(
        srv.connections(),
        1,
        "an untrusted certificate is not retried"
    );
    // The server thread notes the failed handshake (an alert, or just the close: ureq drops the
    // connection without flushing rustls' alert) after the agent has gone: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.handshake_errors().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        srv.handshake_errors().len(),
        1,
        "the handshake must not complete: {:?}",
        srv.handshake_errors()
    );
    let expected = "grapheon-agent error: registration failed: TLS: the server's certificate is \
        not trusted (invalid peer certificate: UnknownIssuer): pass --ca-file with the PEM of \
        the CA that signed it, and check that --server-url names a host the certificate is for \
        (--insecure-skip-verify turns verification off, for testing only)";
    assert!(
        run.stderr.lines().any(|l| l == expected),
        "stderr lacks\n{expected}\n--- stderr\n{}",
        run.stderr
    );
    assert!(!run.stderr.contains("retrying"), "{}", run.stderr);
}

#[test]
fn the_web_pki_roots_do_not_trust_a_private_ca_exit_2_nothing_sent() {
    let srv = TlsServer::start();
    let agent = Agent::new("tls-noca", &srv.url());
    let run = agent.run(&["--register-only"]);
    assert_refused_certificate(&srv, &agent, &run);
}

#[test]
fn ca_file_with_the_signing_ca_registers_stores_the_key_and_checks_in() {
    let srv = TlsServer::start();
    let agent = Agent::new("tls-ca", &srv.url());
    let ca = fixture("ca.pem");
    let run = agent.run(&["--force", "--ca-file", ca.to_str().unwrap()]);
    assert_registered_and_checked_in(&srv, &agent, &run);
    assert!(
        !run.stderr.contains("verification is OFF"),
        "{}",
        run.stderr
    );
}

#[test]
fn ca_file_with_an_unrelated_ca_is_refused_like_no_ca_file() {
    let srv = TlsServer::start();
    let agent = Agent::new("tls-otherca", &srv.url());
    let other = fixture("other-ca.pem");
    let run = agent.run(&["--register-only", "--ca-file", other.to_str().unwrap()]);
    assert_refused_certificate(&srv, &agent, &run);
}

#[test]
fn insecure_skip_verify_flag_connects_and_warns() {
    let srv = TlsServer::start();
    let agent = Agent::new("tls-insecure", &srv.url());
    let run = agent.run(&["--force", "--insecure-skip-verify"]);
    assert_registered_and_checked_in(&srv, &agent, &run);
    assert!(
        run.stderr.contains(
            "grapheon-agent warning: TLS certificate verification is OFF (--insecure-skip-verify)"
        ),
        "{}",
        run.stderr
    );
}

#[test]
fn insecure_skip_verify_from_the_environment_connects_and_warns() {
    let srv = TlsServer::start();
    let mut agent = Agent::new("tls-insecure-env", &srv.url());
    agent.set_env("GRAPHEON_AGENT_INSECURE_SKIP_VERIFY", "true");
    let run = agent.run(&["--force"]);
    assert_registered_and_checked_in(&srv, &agent, &run);
    assert!(
        run.stderr.contains(
            "grapheon-agent warning: TLS certificate verification is OFF (--insecure-skip-verify)"
        ),
        "{}",
        run.stderr
    );
}

#[test]
fn user_agent_over_tls_is_the_agent_version_of_the_binary() {
    let srv = TlsServer::start();
    let agent = Agent::new("tls-ua", &srv.url());
    let version = agent.run(&["--version"]);
    assert_code(&version, 0);
    assert_eq!(version.stdout.trim(), VERSION);
    let ca = fixture("ca.pem");
    let run = agent.run(&["--register-only", "--ca-file", ca.to_str().unwrap()]);
    assert_code(&run, 0);
    let agents: Vec<_> = srv
        .requests()
        .iter()
        .map(|r| r.header("user-agent").map(str::to_string))
        .collect();
    assert_eq!(agents, [Some(format!("grapheon-agent/{VERSION}"))]);
}

/// The server's certificate is ECDSA P-256, so TLS 1.2 runs the ECDHE-ECDSA suites; TLS 1.3
/// suites do not depend on the key.
#[test]
fn every_offered_version_suite_and_key_exchange_completes_a_handshake() {
    let suites = [
        (
            &rustls::version::TLS13,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
        ),
        (
            &rustls::version::TLS13,
            cipher_suite::TLS13_AES_128_GCM_SHA256,
        ),
        (
            &rustls::version::TLS12,
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ),
        (
            &rustls::version::TLS12,
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
    ];
    let groups = [kx_group::SECP256R1, kx_group::SECP384R1];
    let ca = fixture("ca.pem");
    let mut expected = Vec::new();
    let mut agreed = Vec::new();
    for (version, suite) in suites {
        for group in groups {
            let provider = CryptoProvider {
                cipher_suites: vec![suite],
                kx_groups: vec![group],
                ..default_provider()
            };
            let srv = TlsServer::start_with(provider, &[version]);
            let agent = Agent::new("tls-suites", &srv.url());
            let run = agent.run(&["--register-only", "--ca-file", ca.to_str().unwrap()]);
            assert_code(&run, 0);
            expected.push(format!(
                "Some({:?}) Some({:?}) Some({:?})",
                version.version,
                suite.suite(),
                group.name()
            ));
            agreed.extend(srv.negotiated());
        }
    }
    assert_eq!(agreed, expected);
}
