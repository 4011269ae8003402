//! The fake server's "database" and its two agent endpoints, as the real backend behaves.

use std::collections::hash_map::RandomState;
use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use miniserde::json::{self as mjson, Number, Object, Value};

use super::contract::{self, FieldError};
use super::gzip::{self, GzipError};
use super::http::Request;
use super::json::{object, opt_string, string, strings, uint};
use super::time::now_naive;
use super::{AcceptedCheckin, AgentState, EnrollmentKey, Fault, RecordedRequest};
use super::{DEFAULT_MAX_REPORT_BYTES, RAW_BODY_LIMIT};

/// An HTTP answer to write back.
#[derive(Clone, Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Content-Type header value.
    pub content_type: &'static str,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Reply {
    /// A JSON reply.
    pub fn json(status: u16, value: &Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: mjson::to_string(value).into_bytes(),
        }
    }

    /// The FastAPI error shape `{"detail": "..."}`.
    pub fn detail(status: u16, message: &str) -> Reply {
        Reply::json(status, &object([("detail", string(message))]))
    }

    /// Starlette's answer to an uncaught exception: plain text, not JSON.
    pub fn internal_error() -> Reply {
        Reply {
            status: 500,
            content_type: "text/plain; charset=utf-8",
            body: b"Internal Server Error".to_vec(),
        }
    }

    /// The server's 422 shape `{"detail":"Validation failed","errors":[...]}`.
    pub fn validation_failed(errors: &[FieldError]) -> Reply {
        let mut list = mjson::Array::new();
        for e in errors {
            list.push(object([
                ("field", string(&e.field)),
                ("message", string(&e.message)),
                ("type", string(&e.kind)),
            ]));
        }
        Reply::json(
            422,
            &object([
                ("detail", string("Validation failed")),
                ("errors", Value::Array(list)),
            ]),
        )
    }
}

/// An enrollment key row.
pub struct KeyRow {
    pub id: u64,
    pub raw: String,
    pub config: EnrollmentKey,
    /// The key's default policy, parsed; agents read it live (an edit reaches them at once).
    pub policy: Value,
    pub registration_count: u64,
    pub created_at: String,
    pub last_used_at: Option<String>,
}

/// An agent row.
pub struct AgentRow {
    pub id: u64,
    pub uuid: String,
    pub key_id: u64,
    pub state: AgentState,
    /// The currently valid raw API key, once issued.
    pub api_key: Option<String>,
    /// display_name, hostname, site_name, agent_version, platform, platform_release.
    pub profile: Object,
    pub created_at: String,
    pub updated_at: String,
    pub approved_at: Option<String>,
    pub rejected_at: Option<String>,
    pub api_key_issued_at: Option<String>,
    pub last_registration_at: Option<String>,
    pub last_seen_at: Option<String>,
    pub last_ip_addresses: Vec<String>,
    pub last_mac_addresses: Vec<String>,
    pub last_registration_summary: Value,
    pub last_checkin_summary: Value,
}

const PROFILE_FIELDS: [&str; 6] = [
    "display_name",
    "hostname",
    "site_name",
    "agent_version",
    "platform",
    "platform_release",
];

/// Everything the fake server knows and has seen.
pub struct State {
    pub api_key_header: String,
    pub keys: Vec<KeyRow>,
    pub agents: Vec<AgentRow>,
    /// Every host IP stored so far (decides `hosts_created`).
    pub known_hosts: BTreeSet<String>,
    /// Pending fault rules: (endpoint, fault, remaining count).
    pub faults: Vec<(super::Endpoint, Fault, usize)>,
    pub requests: Vec<RecordedRequest>,
    pub checkins: Vec<AcceptedCheckin>,
    pub registrations_ok: usize,
    pub next_checkin_id: u64,
}

impl State {
    /// An empty server with the default API key header.
    pub fn new() -> State {
        State {
            api_key_header: super::API_KEY_HEADER.to_string(),
            keys: Vec::new(),
            agents: Vec::new(),
            known_hosts: BTreeSet::new(),
            faults: Vec::new(),
            requests: Vec::new(),
            checkins: Vec::new(),
            registrations_ok: 0,
            next_checkin_id: 1,
        }
    }

    /// Takes one use of the first fault rule that matches the endpoint.
    pub fn take_fault(&mut self, endpoint: super::Endpoint) -> Option<Fault> {
        let at = self
            .faults
            .iter()
            .position(|(e, _, left)| *left > 0 && (*e == super::Endpoint::Any || *e == endpoint))?;
        let rule = &mut self.faults[at];
        rule.2 -= 1;
        let fault = rule.1.clone();
        if rule.2 == 0 {
            self.faults.remove(at);
        }
        Some(fault)
    }

    /// Index of an agent by uuid; panics (a test bug) when there is none.
    pub fn agent_index(&self, uuid: &str) -> usize {
        self.agents
            .iter()
            .position(|a| a.uuid == uuid)
            .unwrap_or_else(|| panic!("fake server: no agent with uuid {uuid}"))
    }

    /// Index of an enrollment key by its raw value; panics (a test bug) when there is none.
    pub fn key_index(&self, raw: &str) -> usize {
        self.keys
            .iter()
            .position(|k| k.raw == raw)
            .unwrap_or_else(|| panic!("fake server: no enrollment key {raw}"))
    }

    fn key_of(&self, agent: &AgentRow) -> &KeyRow {
        self.keys
            .iter()
            .find(|k| k.id == agent.key_id)
            .expect("agents always reference an existing key")
    }

    /// Stores a new agent under the key at `key_at` (counting a registration); returns its index.
    pub fn new_agent(&mut self, uuid: &str, key_at: usize, state: AgentState) -> usize {
        let now = now_naive();
        let key = &mut self.keys[key_at];
        key.registration_count += 1;
        key.last_used_at = Some(now.clone());
        let mut profile = Object::new();
        for name in PROFILE_FIELDS {
            profile.insert(name.to_string(), Value::Null);
        }
        self.agents.push(AgentRow {
            id: self.agents.len() as u64 + 1,
            uuid: uuid.to_string(),
            key_id: key.id,
            state,
            api_key: None,
            profile,
            created_at: now.clone(),
            updated_at: now.clone(),
            approved_at: (state == AgentState::Active).then(|| now.clone()),
            rejected_at: None,
            api_key_issued_at: None,
            last_registration_at: None,
            last_seen_at: None,
            last_ip_addresses: Vec::new(),
            last_mac_addresses: Vec::new(),
            last_registration_summary: Value::Null,
            last_checkin_summary: Value::Null,
        });
        self.agents.len() - 1
    }

    /// Issues a new raw API key to an agent, invalidating any previous one at once.
    pub fn issue_key(&mut self, at: usize) -> String {
        let key = format!("gpak_{}", random_token(43));
        let agent = &mut self.agents[at];
        agent.api_key = Some(key.clone());
        agent.api_key_issued_at = Some(now_naive());
        agent.updated_at = now_naive();
        key
    }

    /// Routes a complete request to its endpoint.
    pub fn handle(&mut self, request: &Request, peer: SocketAddr) -> Reply {
        let endpoint = super::Endpoint::of(request.path());
        match endpoint {
            super::Endpoint::Any => Reply::detail(404, "Not Found"),
            _ if request.method != "POST" => Reply::detail(405, "Method Not Allowed"),
            super::Endpoint::Register => self.register(request),
            super::Endpoint::CheckIn => self.check_in(request, peer),
        }
    }

    fn register(&mut self, request: &Request) -> Reply {
        // FastAPI parses the body as JSON only for a JSON content type (or none); anything else
        // reaches the model as raw bytes and fails validation.
        let json_type = request.header("content-type").is_none_or(|ct| {
            let mime = ct.split(';').next().unwrap_or_default().trim();
            mime.eq_ignore_ascii_case("application/json")
                || (mime.len() > 5 && mime.to_ascii_lowercase().ends_with("+json"))
        });
        if request.body.is_empty() {
            return Reply::validation_failed(&[FieldError::new(
                "body",
                "Field required",
                "missing",
            )]);
        }
        if !json_type {
            return Reply::validation_failed(&[not_an_object("body")]);
        }
        let body = match parse_object(&request.body) {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let errors = contract::validate_registration(&body);
        if !errors.is_empty() {
            return Reply::validation_failed(&errors);
        }
        let raw_key = contract::text(&body, "enrollment_key").unwrap_or_default();
        let uuid = contract::text(&body, "agent_uuid").unwrap_or_default();
        let Some(key_at) = self.keys.iter().position(|k| k.raw == raw_key) else {
            return Reply::detail(401, "Invalid enrollment key");
        };
        if self.keys[key_at].config.expired {
            return Reply::detail(403, "Enrollment key has expired");
        }
        let key_id = self.keys[key_at].id;
        let at = match self.agents.iter().position(|a| a.uuid == uuid) {
            Some(at) => {
                let agent = &self.agents[at];
                if agent.key_id != key_id {
                    return Reply::detail(
                        409,
                        "Agent UUID is already associated with a different enrollment key",
                    );
                }
                match agent.state {
                    AgentState::Rejected => {
                        return Reply::detail(403, "Agent registration is rejected")
                    }
                    AgentState::Revoked => {
                        return Reply::detail(403, "Agent registration is revoked")
                    }
                    AgentState::Pending | AgentState::Active => {}
                }
                self.keys[key_at].last_used_at = Some(now_naive());
                at
            }
            None => {
                let key = &self.keys[key_at];
                if key
                    .config
                    .max_registrations
                    .is_some_and(|max| key.registration_count >= max)
                {
                    return Reply::detail(403, "Enrollment key registration limit reached");
                }
                let state = if key.config.auto_approve {
                    AgentState::Active
                } else {
                    AgentState::Pending
                };
                self.new_agent(uuid, key_at, state)
            }
        };
        self.record_registration(at, &body);
        let (status, approval_required, message, api_key) = match self.agents[at].state {
            AgentState::Active if self.agents[at].api_key.is_none() => (
                "active",
                false,
                "Agent approved and API key issued",
                Some(self.issue_key(at)),
            ),
            AgentState::Active => ("active", false, "Agent already approved", None),
            _ => (
                "pending",
                true,
                "Agent registered and is awaiting admin approval",
                None,
            ),
        };
        self.registrations_ok += 1;
        let agent = &self.agents[at];
        Reply::json(
            200,
            &object([
                ("status", string(status)),
                ("approval_required", Value::Bool(approval_required)),
                ("message", string(message)),
                ("api_key", opt_string(api_key.as_deref())),
                ("server_time", string(&now_naive())),
                ("agent", self.agent_json(agent)),
                ("policy", self.key_of(agent).policy.clone()),
            ]),
        )
    }

    fn record_registration(&mut self, at: usize, body: &Object) {
        let seen = contract::seen(body);
        let now = now_naive();
        let agent = &mut self.agents[at];
        for name in PROFILE_FIELDS {
            let value = body.get(name).cloned().unwrap_or(Value::Null);
            agent.profile.insert(name.to_string(), value);
        }
        agent.last_ip_addresses = seen.ips.iter().cloned().collect();
        agent.last_mac_addresses = seen.macs.iter().cloned().collect();
        agent.last_registration_summary = object([
            (
                "address_count",
                uint(contract::records(body, "addresses").count() as u64),
            ),
            ("ip_addresses", strings(&seen.ips)),
            ("mac_addresses", strings(&seen.macs)),
            (
                "metadata",
                body.get("metadata")
                    .cloned()
                    .unwrap_or(Value::Object(Object::new())),
            ),
        ]);
        agent.last_registration_at = Some(now.clone());
        agent.updated_at = now;
    }

    fn check_in(&mut self, request: &Request, peer: SocketAddr) -> Reply {
        let presented = request
            .header(&self.api_key_header)
            .map(str::trim)
            .filter(|k| !k.is_empty());
        let Some(presented) = presented else {
            return Reply::detail(401, "Missing agent API key");
        };
        let Some(at) = self
            .agents
            .iter()
            .position(|a| a.api_key.as_deref() == Some(presented))
        else {
            return Reply::detail(401, "Invalid agent API key");
        };
        let state = self.agents[at].state;
        if state != AgentState::Active {
            return Reply::detail(
                403,
                &format!("Agent is not approved for check-in ({})", state.as_str()),
            );
        }
        if request.body.len() > RAW_BODY_LIMIT {
            return Reply::detail(413, "Compressed report exceeds server limit");
        }
        let limit = max_report_bytes(&self.key_of(&self.agents[at]).policy);
        let encoding = request
            .header("content-encoding")
            .map(|e| e.trim().to_ascii_lowercase())
            .filter(|e| !e.is_empty());
        let decoded = match encoding.as_deref() {
            None => request.body.clone(),
            Some("gzip") => match gzip::decompress(&request.body, limit) {
                Ok(decoded) => decoded,
                Err(GzipError::Bad(why)) => {
                    return Reply::detail(400, &format!("Invalid gzip payload: {why}"))
                }
                Err(GzipError::Truncated) => return Reply::internal_error(),
                Err(GzipError::TooLarge) => {
                    return Reply::detail(413, "Decoded report exceeds policy size limit")
                }
            },
            Some(other) => {
                return Reply::detail(415, &format!("Unsupported content encoding '{other}'"))
            }
        };
        if decoded.len() > limit {
            return Reply::detail(413, "Decoded report exceeds policy size limit");
        }
        let body = match parse_object(&decoded) {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let errors = contract::validate_checkin(&body);
        if !errors.is_empty() {
            return Reply::validation_failed(&errors);
        }
        let uuid = contract::text(&body, "agent_uuid").unwrap_or_default();
        if uuid != self.agents[at].uuid {
            return Reply::detail(409, "Agent UUID does not match the API key");
        }
        if let Some(bad) = contract::invalid_host_ip(&body) {
            return Reply::detail(422, &format!("Invalid host IP '{bad}'"));
        }
        let response = self.commit_checkin(at, &body, encoding.as_deref(), peer);
        let text = String::from_utf8(decoded).expect("parse_object checked UTF-8");
        self.checkins.push(AcceptedCheckin {
            agent_uuid: uuid.to_string(),
            headers: request.headers.clone(),
            raw_body: request.body.clone(),
            json: Value::Object(body),
            body: text,
            response: response.clone(),
        });
        Reply::json(200, &response)
    }

    /// Stores an accepted check-in and builds the 200 body.
    fn commit_checkin(
        &mut self,
        at: usize,
        body: &Object,
        encoding: Option<&str>,
        peer: SocketAddr,
    ) -> Value {
        let seen = contract::seen(body);
        let hosts_created = seen
            .ips
            .iter()
            .filter(|ip| self.known_hosts.insert((*ip).clone()))
            .count() as u64;
        let neighbors = contract::records(body, "neighbors").count() as u64;
        let connections = contract::records(body, "connections").count() as u64;
        let routes = contract::records(body, "routes").count() as u64;
        let id = self.next_checkin_id;
        self.next_checkin_id += 1;
        let summary = object([
            ("hosts_created", uint(hosts_created)),
            ("arp_entries_created", uint(neighbors)),
            ("connections_created", uint(connections)),
            ("ip_addresses_seen", strings(&seen.ips)),
            ("mac_addresses_seen", strings(&seen.macs)),
            ("neighbor_count", uint(neighbors)),
            ("connection_count", uint(connections)),
            ("route_count", uint(routes)),
            ("raw_import_id", uint(id)),
        ]);
        let now = now_naive();
        let observed_at = contract::text(body, "observed_at")
            .and_then(|t| super::time::parse_datetime(t).ok())
            .unwrap_or_default();
        let agent = &mut self.agents[at];
        for name in ["hostname", "agent_version", "platform", "platform_release"] {
            if let Some(v @ Value::String(_)) = body.get(name) {
                agent.profile.insert(name.to_string(), v.clone());
            }
        }
        agent.last_seen_at = Some(now.clone());
        agent.updated_at = now.clone();
        agent.last_ip_addresses = seen.ips.iter().cloned().collect();
        agent.last_mac_addresses = seen.macs.iter().cloned().collect();
        agent.last_checkin_summary = summary.clone();
        let prefix: String = agent
            .api_key
            .as_deref()
            .unwrap_or_default()
            .chars()
            .take(20)
            .collect();
        let checkin = object([
            ("id", uint(id)),
            ("agent_id", uint(agent.id)),
            ("raw_import_id", uint(id)),
            ("observed_at", string(&observed_at)),
            ("received_at", string(&now)),
            (
                "sequence_number",
                body.get("sequence_number").cloned().unwrap_or(Value::Null),
            ),
            (
                "full_snapshot",
                body.get("full_snapshot")
                    .cloned()
                    .unwrap_or(Value::Bool(false)),
            ),
            ("content_encoding", opt_string(encoding)),
            ("source_ip", string(&peer.ip().to_string())),
            ("auth_method", string("api_key")),
            ("api_key_prefix", string(&prefix)),
            ("summary", summary.clone()),
            ("status", string("accepted")),
            ("error_message", Value::Null),
            (
                "records_created",
                uint(hosts_created + neighbors + connections),
            ),
        ]);
        let agent = &self.agents[at];
        object([
            ("status", string("accepted")),
            ("server_time", string(&now_naive())),
            ("agent", self.agent_json(agent)),
            ("policy", self.key_of(agent).policy.clone()),
            ("checkin", checkin),
            ("summary", summary),
        ])
    }

    /// The `agent` object of responses (the fields the samples show).
    fn agent_json(&self, agent: &AgentRow) -> Value {
        let key = self.key_of(agent);
        let mut out = agent.profile.clone();
        let prefix = agent
            .api_key
            .as_deref()
            .map(|k| k.chars().take(20).collect::<String>());
        let policy_id = match &key.policy {
            Value::Null => Value::Null,
            _ => uint(key.id),
        };
        let key_json = object([
            ("id", uint(key.id)),
            ("name", string(&format!("fake-key-{}", key.id))),
            ("description", Value::Null),
            ("default_policy_id", policy_id.clone()),
            ("default_policy", key.policy.clone()),
            ("auto_approve", Value::Bool(key.config.auto_approve)),
            ("is_active", Value::Bool(true)),
            ("expires_at", Value::Null),
            (
                "max_registrations",
                key.config.max_registrations.map_or(Value::Null, uint),
            ),
            (
                "key_prefix",
                string(&key.raw.chars().take(20).collect::<String>()),
            ),
            ("registration_count", uint(key.registration_count)),
            ("created_at", string(&key.created_at)),
            ("updated_at", string(&key.created_at)),
            ("last_used_at", opt_string(key.last_used_at.as_deref())),
        ]);
        let fields = [
            ("agent_uuid", string(&agent.uuid)),
            ("enrollment_key_id", uint(key.id)),
            ("policy_id", policy_id),
            ("enrollment_state", string(agent.state.as_str())),
            (
                "approval_required",
                Value::Bool(agent.state == AgentState::Pending),
            ),
            ("is_active", Value::Bool(true)),
            ("id", uint(agent.id)),
            ("api_key_prefix", opt_string(prefix.as_deref())),
            ("approved_at", opt_string(agent.approved_at.as_deref())),
            ("rejected_at", opt_string(agent.rejected_at.as_deref())),
            (
                "api_key_issued_at",
                opt_string(agent.api_key_issued_at.as_deref()),
            ),
            (
                "last_registration_at",
                opt_string(agent.last_registration_at.as_deref()),
            ),
            ("last_ip_addresses", strings(&agent.last_ip_addresses)),
            ("last_mac_addresses", strings(&agent.last_mac_addresses)),
            (
                "last_registration_summary",
                agent.last_registration_summary.clone(),
            ),
            ("last_checkin_summary", agent.last_checkin_summary.clone()),
            ("created_at", string(&agent.created_at)),
            ("updated_at", string(&agent.updated_at)),
            ("last_seen_at", opt_string(agent.last_seen_at.as_deref())),
            ("policy", key.policy.clone()),
            ("enrollment_key", key_json),
        ];
        for (name, value) in fields {
            out.insert(name.to_string(), value);
        }
        Value::Object(out)
    }
}

/// `max_report_bytes` of a policy, or the default when the policy is null or silent.
pub fn max_report_bytes(policy: &Value) -> usize {
    match super::json::get(policy, "max_report_bytes") {
        Some(Value::Number(Number::U64(n))) => usize::try_from(*n).unwrap_or(usize::MAX),
        _ => DEFAULT_MAX_REPORT_BYTES,
    }
}

fn not_an_object(field: &str) -> FieldError {
    FieldError::new(
        field,
        "Input should be a valid dictionary or object to extract fields from",
        "model_attributes_type",
    )
}

/// Parses a body that must be a JSON object; otherwise the 422 the server gives (pydantic's
/// `model_validate_json`: `json_invalid` with field `unknown`, or `model_type`).
fn parse_object(bytes: &[u8]) -> Result<Object, Reply> {
    let invalid = || {
        Reply::validation_failed(&[FieldError::new(
            "unknown",
            contract::invalid_json_message(bytes),
            "json_invalid",
        )])
    };
    let text = std::str::from_utf8(bytes).map_err(|_| invalid())?;
    match mjson::from_str::<Value>(text) {
        Ok(Value::Object(body)) => Ok(body),
        Ok(_) => Err(Reply::validation_failed(&[FieldError::new(
            "unknown",
            "Input should be an object",
            "model_type",
        )])),
        Err(_) => Err(invalid()),
    }
}

/// `len` URL-safe characters (the alphabet of Python's `secrets.token_urlsafe`), unpredictable
/// enough that tests cannot depend on them.
pub fn random_token(len: usize) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut out = String::with_capacity(len + 10);
    let mut round = 0u64;
    while out.len() < len {
        // Each RandomState is freshly keyed, so consecutive tokens differ.
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u128(nanos);
        hasher.write_u64(round);
        let mut bits = hasher.finish();
        for _ in 0..10 {
            out.push(char::from(ALPHABET[(bits & 63) as usize]));
            bits >>= 6;
        }
        round += 1;
    }
    out.truncate(len);
    out
}
