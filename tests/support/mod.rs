//! A fake of the real Graphēon server (backend 0.10.x) for integration tests.
//!
//! It enforces the contract of `shared/contract/README.md` the way the real server does, quirks
//! included (unspecified `local_ip` refused, explicit `identity` encoding refused, key returned
//! once, naive datetimes, ...), so that an agent which passes against it is accepted by the real
//! one. It speaks plain HTTP/1.1 over `std::net` on 127.0.0.1, one thread per connection, one
//! request per connection (`Connection: close`).
//!
//! ```ignore
//! let srv = ContractServer::start();
//! srv.add_enrollment_key("gaek_test", EnrollmentKey::default());
//! // run the agent with --server-url srv.url() ...
//! srv.approve(uuid);
//! assert_eq!(srv.checkins().len(), 1);
//! ```
//!
//! Admin operations are Rust methods, not HTTP. Faults can be injected for the next requests.
#![allow(dead_code)]

pub mod agent;
mod backend;
mod contract;
mod gzip;
mod http;
pub mod json;
pub mod netns;
mod time;

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use miniserde::json::Value;

use backend::{KeyRow, Reply, State};
use http::{Conn, ReadError};

/// Raw request bodies above this are refused with 413 before decoding, whatever the encoding.
pub const RAW_BODY_LIMIT: usize = 262_144;
/// `max_report_bytes` when the policy is null or does not say.
pub const DEFAULT_MAX_REPORT_BYTES: usize = 262_144;

/// The header that carries the agent API key unless [`ContractServer::set_api_key_header`] says
/// otherwise.
pub const API_KEY_HEADER: &str = "X-Agent-Api-Key";

/// The policy enrollment keys get by default: the one the samples were captured with (60 s
/// interval, no jitter, all commands, 256 KiB reports).
pub const DEFAULT_POLICY: &str = r#"{
  "name": "rig-policy-20261130015719",
  "description": "created by grapheon-rig",
  "checkin_interval_seconds": 60,
  "jitter_seconds": 0,
  "command_timeout_seconds": 15,
  "enabled_commands": {"ip_neigh": true, "ss_tunap": true, "ip_addr": true, "ip_route": true},
  "max_report_bytes": 262144,
  "is_active": true,
  "id": 1,
  "created_at": "2026-11-30T01:57:19.263789",
  "updated_at": "2026-11-30T01:57:19.263792",
  "agent_count": null
}"#;

/// Largest body the fake reads at all; anything above is answered 413 without reading it.
const MAX_READ_BODY: usize = 64 * 1024 * 1024;

/// How an enrollment key behaves.
#[derive(Clone, Debug)]
pub struct EnrollmentKey {
    /// Agents registering with it are active (and get their key) at once.
    pub auto_approve: bool,
    /// How many distinct agents may register with it; `None` for no limit.
    pub max_registrations: Option<u64>,
    /// Registration answers 403 `Enrollment key has expired`.
    pub expired: bool,
    /// The policy JSON its agents get, or `None` for `"policy": null`.
    pub policy: Option<String>,
}

impl Default for EnrollmentKey {
    /// Manual approval, no limit, not expired, [`DEFAULT_POLICY`].
    fn default() -> Self {
        EnrollmentKey {
            auto_approve: false,
            max_registrations: None,
            expired: false,
            policy: Some(DEFAULT_POLICY.to_string()),
        }
    }
}

impl EnrollmentKey {
    /// An auto-approving key with the default policy.
    pub fn auto_approve() -> Self {
        EnrollmentKey {
            auto_approve: true,
            ..EnrollmentKey::default()
        }
    }
}

/// An agent's enrollment state on the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentState {
    /// Registered, waiting for an admin.
    Pending,
    /// Approved: may receive its key and check in.
    Active,
    /// Refused by an admin.
    Rejected,
    /// Revoked by an admin after approval.
    Revoked,
}

impl AgentState {
    /// The server's spelling (`enrollment_state`).
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Pending => "pending",
            AgentState::Active => "active",
            AgentState::Rejected => "rejected",
            AgentState::Revoked => "revoked",
        }
    }
}

/// Which requests a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /api/agents/register`.
    Register,
    /// `POST /api/agents/check-in`.
    CheckIn,
    /// Every request (as a rule target); any other path (as a request's endpoint).
    Any,
}

impl Endpoint {
    /// The endpoint a request path addresses.
    pub fn of(path: &str) -> Endpoint {
        match path {
            "/api/agents/register" => Endpoint::Register,
            "/api/agents/check-in" => Endpoint::CheckIn,
            _ => Endpoint::Any,
        }
    }
}

/// Misbehaviour to inject; the request is always read completely first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and `{"detail": detail}` without processing (e.g. 500, 503).
    Status {
        /// HTTP status code.
        status: u16,
        /// The `detail` text.
        detail: String,
    },
    /// Close the connection without a response (orderly FIN).
    Close,
    /// Abort the connection with a TCP RST (SO_LINGER 0, then close).
    Reset,
    /// Sleep this long, then process and answer normally.
    Slow(Duration),
    /// Answer 200 with a JSON body of this many bytes, streamed (e.g. 50 MB).
    HugeBody(usize),
    /// Answer 200 with a Content-Length larger than the bytes sent, then close.
    TruncatedBody,
    /// Answer with this status and an HTML body (a proxy error page).
    NotJson(u16),
    /// Process (and commit) the request normally, then sleep this long before answering, like
    /// the real server that commits even when the client has given up.
    AcceptThenDelay(Duration),
    /// Answer with this status, `{"detail": ...}` and a `Retry-After` header with this value
    /// (seconds or an HTTP-date), without processing.
    RetryAfter {
        /// HTTP status code (e.g. 429, 503).
        status: u16,
        /// The header's value, as sent.
        value: String,
    },
}

impl Fault {
    /// `Fault::Status` with a detail text.
    pub fn status(status: u16, detail: &str) -> Fault {
        Fault::Status {
            status,
            detail: detail.to_string(),
        }
    }
}

/// A request as the fake received it, with what it answered.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// `POST`, `GET`, ...
    pub method: String,
    /// The request target, query included.
    pub path: String,
    /// Header names (as sent) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body on the wire (de-chunked, not decoded).
    pub body: Vec<u8>,
    /// True when the body was sent with `Transfer-Encoding: chunked`.
    pub chunked: bool,
    /// Status answered; `None` while in progress or when no response was sent.
    pub status: Option<u16>,
    /// True once the server is done with the request (answered, closed or reset).
    pub completed: bool,
    /// When the whole request had been read.
    pub received_at: Instant,
    /// When the server was done with it (answered, closed or reset).
    pub completed_at: Option<Instant>,
    /// The fault applied to this request, if any.
    pub fault: Option<Fault>,
}

impl RecordedRequest {
    /// First value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        http::header(&self.headers, name)
    }

    /// The endpoint the request addressed.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::of(self.path.split('?').next().unwrap_or_default())
    }
}

/// A check-in the fake accepted (answered 200) and stored.
#[derive(Clone, Debug)]
pub struct AcceptedCheckin {
    /// The `agent_uuid` of the report.
    pub agent_uuid: String,
    /// Request headers.
    pub headers: Vec<(String, String)>,
    /// The body on the wire (gzip bytes when compressed).
    pub raw_body: Vec<u8>,
    /// The decoded body text.
    pub body: String,
    /// The decoded body, parsed.
    pub json: Value,
    /// The 200 response body that was sent.
    pub response: Value,
}

impl AcceptedCheckin {
    /// First value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        http::header(&self.headers, name)
    }
}

/// State shared between the test, the accept thread and the connection threads.
struct Shared {
    stop: AtomicBool,
    state: Mutex<State>,
    /// Clones of open connections, so that shutdown can unblock their threads.
    live: Mutex<HashMap<u64, TcpStream>>,
    /// How long ingesting one record of a check-in takes, in nanoseconds (0: no delay).
    ingest_nanos_per_record: AtomicU64,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Sleeps for `duration` or until the server stops, whichever comes first.
    fn pause(&self, duration: Duration) {
        let end = Instant::now() + duration;
        while !self.stop.load(Ordering::SeqCst) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            thread::sleep(left.min(Duration::from_millis(10)));
        }
    }
}

/// A mutex guard even after a panicking thread poisoned the lock (a failed assertion in one
/// connection must not hide the state from the test).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running fake server; stops (and joins its threads) when dropped.
pub struct ContractServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl ContractServer {
    /// Starts a server on 127.0.0.1 with an ephemeral port, no keys and no agents.
    pub fn start() -> ContractServer {
        ContractServer::start_on("127.0.0.1:0")
    }

    /// Starts a server listening on `addr` (the benchmark puts it in a namespace of its own).
    pub fn start_on(addr: &str) -> ContractServer {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let addr = listener.local_addr().expect("listener address");
        // Polling accept lets the thread notice the stop flag without a wake-up connection.
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            state: Mutex::new(State::new()),
            live: Mutex::new(HashMap::new()),
            ingest_nanos_per_record: AtomicU64::new(0),
            workers: Mutex::new(Vec::new()),
        });
        let for_thread = Arc::clone(&shared);
        let acceptor = thread::Builder::new()
            .name("fake-server-accept".into())
            .spawn(move || accept_loop(&listener, &for_thread))
            .expect("spawn accept thread");
        ContractServer {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The base URL, e.g. `http://127.0.0.1:40123` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Creates an enrollment key with this raw value (e.g. `gaek_test`).
    pub fn add_enrollment_key(&self, raw: &str, key: EnrollmentKey) {
        let policy = parse_policy(key.policy.as_deref());
        let mut state = self.shared.state();
        assert!(
            state.keys.iter().all(|k| k.raw != raw),
            "fake server: enrollment key {raw} exists already"
        );
        let id = state.keys.len() as u64 + 1;
        state.keys.push(KeyRow {
            id,
            raw: raw.to_string(),
            config: key,
            policy,
            registration_count: 0,
            created_at: time::now_naive(),
            last_used_at: None,
        });
    }

    /// Admin approval: the agent's next registration call returns its API key (once).
    pub fn approve(&self, uuid: &str) {
        let mut state = self.shared.state();
        let at = state.agent_index(uuid);
        let agent = &mut state.agents[at];
        agent.state = AgentState::Active;
        agent.approved_at = Some(time::now_naive());
        agent.rejected_at = None;
    }

    /// Admin rejection: registration answers 403, check-in 403 `(rejected)`.
    pub fn reject(&self, uuid: &str) {
        let mut state = self.shared.state();
        let at = state.agent_index(uuid);
        let agent = &mut state.agents[at];
        agent.state = AgentState::Rejected;
        agent.rejected_at = Some(time::now_naive());
    }

    /// Admin revocation: registration answers 403, check-in 403 `(revoked)`.
    pub fn revoke(&self, uuid: &str) {
        let mut state = self.shared.state();
        let at = state.agent_index(uuid);
        state.agents[at].state = AgentState::Revoked;
    }

    /// Admin key rotation: returns the new raw key; the old one is invalid at once, and
    /// registration keeps answering `Agent already approved` without a key.
    pub fn rotate_api_key(&self, uuid: &str) -> String {
        let mut state = self.shared.state();
        let at = state.agent_index(uuid);
        state.issue_key(at)
    }

    /// Creates an already approved agent under an existing enrollment key and returns its raw
    /// API key, as if it had registered, been approved and fetched its key.
    pub fn add_active_agent(&self, uuid: &str, enrollment_key: &str) -> String {
        let mut state = self.shared.state();
        assert!(
            state.agents.iter().all(|a| a.uuid != uuid),
            "fake server: agent {uuid} exists already"
        );
        let key_at = state.key_index(enrollment_key);
        let at = state.new_agent(uuid, key_at, AgentState::Active);
        state.issue_key(at)
    }

    /// The enrollment state of an agent, `None` if it never registered.
    pub fn agent_state(&self, uuid: &str) -> Option<AgentState> {
        let state = self.shared.state();
        state
            .agents
            .iter()
            .find(|a| a.uuid == uuid)
            .map(|a| a.state)
    }

    /// Sets the policy (JSON text, or `None` for `"policy": null`) of every enrollment key and
    /// so of every agent, at once.
    pub fn set_policy(&self, policy: Option<&str>) {
        let parsed = parse_policy(policy);
        for key in &mut self.shared.state().keys {
            key.policy = parsed.clone();
        }
    }

    /// Sets the policy of one enrollment key (and its agents).
    pub fn set_key_policy(&self, enrollment_key: &str, policy: Option<&str>) {
        let parsed = parse_policy(policy);
        let mut state = self.shared.state();
        let at = state.key_index(enrollment_key);
        state.keys[at].policy = parsed;
    }

    /// Changes the header the server reads the API key from (default [`API_KEY_HEADER`]).
    pub fn set_api_key_header(&self, name: &str) {
        self.shared.state().api_key_header = name.to_string();
    }

    /// Applies `fault` to the next `times` requests to `endpoint` (`Any`: every request). Rules
    /// are used in the order they were added.
    pub fn inject(&self, endpoint: Endpoint, fault: Fault, times: usize) {
        if times > 0 {
            self.shared.state().faults.push((endpoint, fault, times));
        }
    }

    /// Makes every later check-in take `per_record` for each record it carries before it is
    /// stored and answered, like the real server whose ingest time grows with the report. The
    /// server stores it even when the client gave up waiting.
    pub fn set_ingest_time(&self, per_record: Duration) {
        let nanos = u64::try_from(per_record.as_nanos()).unwrap_or(u64::MAX);
        self.shared
            .ingest_nanos_per_record
            .store(nanos, Ordering::SeqCst);
    }

    /// Check-ins accepted so far, in order.
    pub fn checkins(&self) -> Vec<AcceptedCheckin> {
        self.shared.state().checkins.clone()
    }

    /// Every request received so far (complete request heads), in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.state().requests.clone()
    }

    /// Requests received so far for one endpoint.
    pub fn requests_to(&self, endpoint: Endpoint) -> Vec<RecordedRequest> {
        let state = self.shared.state();
        let matching = state.requests.iter().filter(|r| r.endpoint() == endpoint);
        matching.cloned().collect()
    }

    /// The most times one identical body was received at `endpoint` (a part sent again in the
    /// same run is byte-identical; another run's parts differ in `observed_at`).
    pub fn most_copies_of_one_body(&self, endpoint: Endpoint) -> usize {
        let mut counts: HashMap<Vec<u8>, usize> = HashMap::new();
        for r in self.requests_to(endpoint) {
            *counts.entry(r.body).or_default() += 1;
        }
        counts.into_values().max().unwrap_or(0)
    }

    /// Registration calls answered 200 so far.
    pub fn registrations(&self) -> usize {
        self.shared.state().registrations_ok
    }

    /// Waits until the server is done with `count` requests (answered, or closed by a fault),
    /// e.g. for a fault that finishes after the client gave up; panics after `timeout`.
    pub fn wait_for_requests(&self, count: usize, timeout: Duration) {
        let end = Instant::now() + timeout;
        loop {
            let done = {
                let state = self.shared.state();
                state.requests.iter().filter(|r| r.completed).count()
            };
            if done >= count {
                return;
            }
            assert!(
                Instant::now() < end,
                "fake server: {done} of {count} requests completed after {timeout:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ContractServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        // No new connections now: unblock every open one, then wait for their threads.
        for stream in lock(&self.shared.live).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let workers = std::mem::take(&mut *lock(&self.shared.workers));
        for worker in workers {
            let _ = worker.join();
        }
    }
}

fn parse_policy(policy: Option<&str>) -> Value {
    match policy {
        None => Value::Null,
        Some(text) => match miniserde::json::from_str::<Value>(text) {
            Ok(value @ Value::Object(_)) => value,
            _ => panic!("fake server: policy is not a JSON object: {text}"),
        },
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut next_id = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(_) => {
                thread::sleep(Duration::from_millis(2));
                continue;
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.live).insert(id, clone);
        }
        let for_thread = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name(format!("fake-server-conn-{id}"))
            .spawn(move || {
                serve(&for_thread, &stream, peer);
                // Drop the clone before the stream so that closing really closes (and a
                // SO_LINGER 0 socket really resets).
                lock(&for_thread.live).remove(&id);
                drop(stream);
            });
        let mut workers = lock(&shared.workers);
        workers.retain(|w| !w.is_finished());
        match spawned {
            Ok(handle) => workers.push(handle),
            Err(_) => {
                lock(&shared.live).remove(&id);
            }
        }
    }
}

/// Serves one request on one connection.
fn serve(shared: &Shared, stream: &TcpStream, peer: SocketAddr) {
    let mut conn = Conn::new(stream, &shared.stop);
    let mut request = match conn.read_head() {
        Ok(request) => request,
        Err(ReadError::Malformed(_)) => {
            respond(
                shared,
                stream,
                &Reply::detail(400, "Invalid HTTP request received."),
            );
            return;
        }
        Err(_) => return,
    };
    let expects_continue = request
        .header("expect")
        .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"));
    if expects_continue && conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
        return;
    }
    let early = match conn.read_body(&mut request, MAX_READ_BODY) {
        Ok(()) => None,
        Err(ReadError::TooLarge) => {
            Some(Reply::detail(413, "Compressed report exceeds server limit"))
        }
        Err(ReadError::Malformed(_)) => Some(Reply::detail(400, "Invalid HTTP request received.")),
        Err(_) => return,
    };
    let endpoint = Endpoint::of(request.path());
    let (index, fault) = {
        let mut state = shared.state();
        let fault = if early.is_none() {
            state.take_fault(endpoint)
        } else {
            None
        };
        state.requests.push(RecordedRequest {
            method: request.method.clone(),
            path: request.target.clone(),
            headers: request.headers.clone(),
            body: request.body.clone(),
            chunked: request.chunked,
            status: None,
            completed: false,
            received_at: Instant::now(),
            completed_at: None,
            fault: fault.clone(),
        });
        (state.requests.len() - 1, fault)
    };
    match early {
        Some(reply) => {
            shared.state().requests[index].status = Some(reply.status);
            respond(shared, stream, &reply);
        }
        None => answer(shared, stream, &request, peer, index, fault),
    }
    let mut state = shared.state();
    state.requests[index].completed = true;
    state.requests[index].completed_at = Some(Instant::now());
}

/// Answers a complete, recorded request, applying its fault if any.
fn answer(
    shared: &Shared,
    stream: &TcpStream,
    request: &http::Request,
    peer: SocketAddr,
    index: usize,
    fault: Option<Fault>,
) {
    let set_status = |status: u16| shared.state().requests[index].status = Some(status);
    let handle = || {
        ingest_delay(shared, request);
        let reply = shared.state().handle(request, peer);
        set_status(reply.status);
        reply
    };
    match fault {
        None => respond(shared, stream, &handle()),
        Some(Fault::Slow(delay)) => {
            shared.pause(delay);
            respond(shared, stream, &handle());
        }
        Some(Fault::AcceptThenDelay(delay)) => {
            let reply = handle();
            shared.pause(delay);
            respond(shared, stream, &reply);
        }
        Some(Fault::Status { status, detail }) => {
            set_status(status);
            respond(shared, stream, &Reply::detail(status, &detail));
        }
        Some(Fault::RetryAfter { status, value }) => {
            set_status(status);
            let reply = Reply::detail(status, http::reason(status));
            let head = http::head(status, reply.content_type, reply.body.len());
            // The header goes before the blank line that ends the head.
            let head = head.replacen("\r\n\r\n", &format!("\r\nretry-after: {value}\r\n\r\n"), 1);
            let mut bytes = head.into_bytes();
            bytes.extend_from_slice(&reply.body);
            if http::write_all(stream, &shared.stop, &bytes).is_ok() {
                let _ = stream.shutdown(Shutdown::Write);
            }
        }
        Some(Fault::Close) => {
            let _ = stream.shutdown(Shutdown::Both);
        }
        Some(Fault::Reset) => set_linger_zero(stream),
        Some(Fault::NotJson(status)) => {
            set_status(status);
            let html = format!(
                "<html><head><title>{status} {reason}</title></head>\
                 <body><h1>{status} {reason}</h1></body></html>\n",
                reason = http::reason(status)
            );
            respond(
                shared,
                stream,
                &Reply {
                    status,
                    content_type: "text/html",
                    body: html.into_bytes(),
                },
            );
        }
        Some(Fault::HugeBody(size)) => {
            set_status(200);
            send_huge(shared, stream, size);
        }
        Some(Fault::TruncatedBody) => {
            set_status(200);
            let body = br#"{"status":"accepted","server_time":"2026-11-30T01:57:27.228401","#;
            let head = http::head(200, "application/json", body.len() + 200);
            let _ = http::write_all(stream, &shared.stop, head.as_bytes());
            let _ = http::write_all(stream, &shared.stop, body);
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// Sleeps for the configured ingest time of a check-in: its records times the time per record.
fn ingest_delay(shared: &Shared, request: &http::Request) {
    let per_record = shared.ingest_nanos_per_record.load(Ordering::SeqCst);
    if per_record == 0 || Endpoint::of(request.path()) != Endpoint::CheckIn {
        return;
    }
    let decoded = if request
        .header("content-encoding")
        .is_some_and(|e| e.trim().eq_ignore_ascii_case("gzip"))
    {
        gzip::decompress(&request.body, MAX_READ_BODY).unwrap_or_default()
    } else {
        request.body.clone()
    };
    let records = std::str::from_utf8(&decoded)
        .ok()
        .and_then(|text| miniserde::json::from_str::<Value>(text).ok())
        .map_or(0, |v| record_count(&v));
    shared.pause(Duration::from_nanos(
        per_record.saturating_mul(records as u64),
    ));
}

/// Records of a check-in body: addresses, neighbours, connections and routes together.
pub fn record_count(body: &Value) -> usize {
    ["addresses", "neighbors", "connections", "routes"]
        .iter()
        .map(|table| match json::get(body, table) {
            Some(Value::Array(items)) => items.len(),
            _ => 0,
        })
        .sum()
}

/// Writes a complete response and closes our side.
fn respond(shared: &Shared, stream: &TcpStream, reply: &Reply) {
    let mut bytes = http::head(reply.status, reply.content_type, reply.body.len()).into_bytes();
    bytes.extend_from_slice(&reply.body);
    if http::write_all(stream, &shared.stop, &bytes).is_ok() {
        let _ = stream.shutdown(Shutdown::Write);
    }
}

/// Streams a valid JSON document of exactly `size` bytes (at least 16), without holding it in
/// memory: `{"detail":"xxxx…"}`.
fn send_huge(shared: &Shared, stream: &TcpStream, size: usize) {
    let size = size.max(16);
    let (open, close) = (&br#"{"detail":""#[..], &br#""}"#[..]);
    let head = http::head(200, "application/json", size);
    let filler = vec![b'x'; 64 * 1024];
    let mut left = size - open.len() - close.len();
    let mut ok = http::write_all(stream, &shared.stop, head.as_bytes()).is_ok()
        && http::write_all(stream, &shared.stop, open).is_ok();
    while ok && left > 0 {
        let n = left.min(filler.len());
        ok = http::write_all(stream, &shared.stop, &filler[..n]).is_ok();
        left -= n;
    }
    if ok {
        let _ = http::write_all(stream, &shared.stop, close);
        let _ = stream.shutdown(Shutdown::Write);
    }
}

/// Makes the coming close send a TCP RST instead of a FIN.
fn set_linger_zero(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a correctly sized, initialised `linger`.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast::<libc::c_void>(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        // Without linger the best we can do is an abrupt close.
        let _ = stream.shutdown(Shutdown::Both);
    }
}
