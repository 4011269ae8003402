//! HTTP to the server: TLS over rustls, bounded in time and in what is read back, with retries
//! only for requests the server cannot have processed.
//!
//! A request whose body went out and got no answer (a timeout waiting for the answer, a reset
//! after sending, an answer cut off before its status) is in doubt: the server may have stored
//! it, or may still be storing it, and a second copy ingested next to the first corrupts it. Such
//! a request is never sent again here. What is retried: failures before the body was complete
//! (resolve, connect, TLS, a reset or stall while sending), and the statuses the server answers
//! without storing anything (408, 429, 500 — a rolled-back transaction —, 502, 503), after
//! their `Retry-After` when they send one. A 504 is in doubt: a gateway gave up waiting while
//! the server may still be ingesting.

use std::cell::Cell;
use std::io::{self, Cursor, Read};
use std::time::{Duration, Instant};

use miniserde::json::Value;
use ureq::tls::{PemItem, RootCerts, TlsConfig};
use ureq::{Agent, SendBody, Timeout};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::input;
use crate::json;
use crate::timefmt;

/// The agent's version, from the `VERSION` file.
pub const VERSION: &str = env!("GRAPHEON_AGENT_VERSION");

/// Response bodies larger than this are not read: a real answer is a few kilobytes.
const MAX_RESPONSE_BYTES: u64 = 1 << 20;
/// The largest CA file read.
const MAX_CA_FILE_BYTES: u64 = 4 << 20;
/// Attempts per request for failures that may pass.
const ATTEMPTS: u32 = 4;
/// A `Retry-After` longer than this is read as this (a week; a run waits for far less).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(7 * 86_400);

/// Why a request did not get a 2xx answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The request never reached the server whole (DNS, connection, TLS setup, a failure while
    /// the body was still being sent): it cannot have been processed and may be sent again.
    NotSent(String),
    /// The body went out and no answer came (timeout, reset, an answer cut off before its
    /// status): the server may have stored it, or may still be storing it. Never sent again in
    /// this run.
    InDoubt(String),
    /// The server's TLS certificate was not accepted. Retrying cannot help: the operator must
    /// trust its CA (`--ca-file`) or fix the certificate or `--server-url`.
    Tls(String),
    /// The HTTP client refused the URL itself: no retry or later run can help.
    BadUrl(String),
    /// The server answered with a non-2xx status.
    Status {
        status: u16,
        detail: String,
        errors: Vec<String>,
        /// The answer's `Retry-After`, as a wait from when it came.
        retry_after: Option<Duration>,
    },
}

impl Failure {
    /// A status with no `Retry-After`.
    pub fn status(status: u16, detail: &str) -> Failure {
        Failure::Status {
            status,
            detail: detail.to_string(),
            errors: Vec::new(),
            retry_after: None,
        }
    }

    /// True when the server cannot have stored the request, so sending it again is safe.
    fn retryable(&self) -> bool {
        match self {
            Failure::NotSent(_) => true,
            Failure::InDoubt(_) | Failure::Tls(_) | Failure::BadUrl(_) => false,
            Failure::Status { status, .. } => matches!(status, 408 | 429 | 500 | 502 | 503),
        }
    }

    /// True when the next run may succeed without an operator (exit code 1).
    pub fn transient(&self) -> bool {
        match self {
            Failure::NotSent(_) | Failure::InDoubt(_) => true,
            Failure::Tls(_) | Failure::BadUrl(_) => false,
            Failure::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
        }
    }

    /// How long the server asked to wait before the next attempt.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The operator-facing error for a failed `what` (e.g. "check-in").
    pub fn into_error(self, what: &str) -> Error {
        match self {
            Failure::NotSent(m) => {
                Error::Transient(format!("{what} failed: {m}; the next run retries"))
            }
            Failure::InDoubt(m) => Error::Transient(format!(
                "{what} failed: {m}; the server may have processed it, so it is not sent again in \
                 this run; the next run retries"
            )),
            Failure::Tls(m) => Error::Config(format!("{what} failed: {m}")),
            Failure::BadUrl(m) => Error::Config(format!(
                "{what} failed: the HTTP client cannot use the server URL ({m}): fix --server-url \
                 (GRAPHEON_AGENT_SERVER_URL)"
            )),
            Failure::Status {
                status,
                detail,
                errors,
                ..
            } => {
                let mut message = detail;
                if !errors.is_empty() {
                    message.push_str(": ");
                    message.push_str(&errors.join("; "));
                }
                let registering = what == "registration";
                let hint = match status {
                    401 if registering => " (the enrollment key was rejected: check GRAPHEON_AGENT_ENROLLMENT_KEY)",
                    401 => " (the API key was rejected: if an admin rotated it, install the new key with `grapheon-agent --set-api-key`)",
                    403 if registering => " (the enrollment key expired or reached its limit, or this agent was rejected or revoked: ask the server's administrator)",
                    403 => " (this agent is not approved, or was rejected or revoked, on the server)",
                    409 if registering => " (this agent's identity is bound to another enrollment key on the server: use that key, or remove agent_uuid to enroll anew)",
                    409 => " (this agent's identity does not match its API key on the server)",
                    300..=399 | 404 | 405 => " (check --server-url: it must be the server's base URL, with the scheme it answers on)",
                    _ => "",
                };
                if status >= 500 || status == 408 || status == 429 {
                    Error::Transient(format!("{what} failed: server answered HTTP {status}: {message}; the next run retries"))
                } else {
                    Error::Refused {
                        status,
                        message: format!("{what}: {message}{hint}"),
                    }
                }
            }
        }
    }
}

/// A 2xx answer. `body` is `None` when it was not readable JSON: a check-in accepted with 200
/// counts as accepted whatever its body says.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Option<Value>,
    /// From sending the request (the attempt that was answered) to the answer's headers: the
    /// server's time for it.
    pub elapsed: Duration,
}

/// The server connection settings.
pub struct Client {
    agent: Agent,
    base: String,
    key_header: String,
    timeout: Duration,
    /// No retry starts after this (the run's overall deadline), when set.
    deadline: Cell<Option<Instant>>,
}

impl Client {
    /// Builds the client; a CA file that cannot be used is a configuration error.
    pub fn new(cfg: &Config, base: &str) -> Result<Client> {
        let mut tls =
            TlsConfig::builder().unversioned_rustls_crypto_provider(crate::tls::crypto_provider());
        if let Some(path) = &cfg.ca_file {
            // A CA bundle is a few hundred kilobytes (the whole web PKI is about 200 KB).
            let pem = input::read_regular(path, input::Links::Follow, MAX_CA_FILE_BYTES).map_err(
                |e| Error::Config(format!("cannot read CA file {}: {e}", path.display())),
            )?;
            let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(Error::Config(format!(
                    "CA file {} holds no PEM certificate",
                    path.display()
                )));
            }
            tls = tls.root_certs(RootCerts::new_with_certs(&certs));
        }
        if cfg.insecure_skip_verify {
            warn!("TLS certificate verification is OFF (--insecure-skip-verify): anyone on the path can read the API key");
            tls = tls.disable_verification(true);
        }
        // One timeout per phase, so that a timeout says whether the body went out: a global
        // one hides the phase. The global one (twice the timeout) only bounds a server that
        // trickles; a request it cuts off is judged by how much of the body had gone out.
        let t = Some(cfg.request_timeout);
        let agent: Agent = Agent::config_builder()
            .tls_config(tls.build())
            .timeout_resolve(t)
            .timeout_connect(t)
            .timeout_send_request(t)
            .timeout_send_body(t)
            .timeout_recv_response(t)
            .timeout_recv_body(t)
            .timeout_global(Some(cfg.request_timeout * 2))
            // A fresh connection per request: a pooled one the server closed while idle would
            // fail after the body was written and look like a request in doubt.
            .max_idle_connections(0)
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(format!("grapheon-agent/{VERSION}"))
            .build()
            .into();
        Ok(Client {
            agent,
            base: base.to_string(),
            key_header: cfg.api_key_header.clone(),
            timeout: cfg.request_timeout,
            deadline: Cell::new(None),
        })
    }

    /// Bounds every later request's retries by the run's overall deadline.
    pub fn set_deadline(&self, at: Instant) {
        self.deadline.set(Some(at));
    }

    /// `POST /api/agents/register` with a plain JSON body.
    pub fn register(&self, body: &str) -> std::result::Result<Answer, Failure> {
        self.with_retries("registration", || {
            self.post("/api/agents/register", body.as_bytes(), None)
        })
    }

    /// `POST /api/agents/check-in` with a gzip body and the API key header.
    pub fn check_in(&self, gzipped: &[u8], api_key: &str) -> std::result::Result<Answer, Failure> {
        self.with_retries("check-in", || {
            self.post("/api/agents/check-in", gzipped, Some(api_key))
        })
    }

    /// Retries what the server cannot have stored, after its `Retry-After` or with exponential
    /// backoff and jitter, while the overall deadline leaves room for another attempt.
    fn with_retries(
        &self,
        what: &str,
        mut attempt: impl FnMut() -> std::result::Result<Answer, Failure>,
    ) -> std::result::Result<Answer, Failure> {
        let mut deadline = Instant::now() + self.timeout * 3 + Duration::from_secs(15);
        if let Some(run) = self.deadline.get() {
            deadline = deadline.min(run);
        }
        let mut backoff = Duration::from_secs(1);
        for n in 1.. {
            let failure = match attempt() {
                Ok(answer) => return Ok(answer),
                Err(f) => f,
            };
            if !failure.retryable() || n >= ATTEMPTS {
                return Err(failure);
            }
            let wait = retry_wait(failure.retry_after(), backoff, unit_random());
            if Instant::now() + wait + self.timeout > deadline {
                if let Some(asked) = failure.retry_after() {
                    warn!(
                        "{what} attempt {n} failed ({}); the server asks to wait {} s, longer than this run may take",
                        describe(&failure),
                        asked.as_secs()
                    );
                }
                return Err(failure);
            }
            warn!(
                "{what} attempt {n} failed ({}); retrying in {} ms",
                describe(&failure),
                wait.as_millis()
            );
            std::thread::sleep(wait);
            backoff *= 2;
        }
        unreachable!("the loop returns")
    }

    fn post(
        &self,
        path: &str,
        body: &[u8],
        api_key: Option<&str>,
    ) -> std::result::Result<Answer, Failure> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
            // Declared here so that ureq sends the reader below with this length (not chunked).
            .header("Content-Length", body.len());
        if let Some(key) = api_key {
            req = req
                .header("Content-Encoding", "gzip")
                .header(self.key_header.as_str(), key);
        }
        // ureq does not say in which phase an I/O error happened; how much of the body it took
        // from the reader does. Until it took the last byte the server cannot have it all.
        let mut reader = Cursor::new(body);
        let started = Instant::now();
        let sent = req.send(SendBody::from_reader(&mut reader));
        let whole_body_taken = reader.position() >= body.len() as u64;
        // Name what was tried: "connection refused" alone does not say which server.
        let mut resp = sent.map_err(|e| match classify(e, whole_body_taken, self.timeout) {
            Failure::NotSent(m) => Failure::NotSent(format!("{url}: {m}")),
            Failure::InDoubt(m) => Failure::InDoubt(format!("{url}: {m}")),
            other => other,
        })?;
        let elapsed = started.elapsed();
        let status = resp.status().as_u16();
        // A gateway's timeout says only that the server had not answered it yet: the server may
        // still be storing the request, exactly like an answer that never came.
        if status == 504 {
            return Err(Failure::InDoubt(format!(
                "{url}: the gateway in front of the server gave up waiting for its answer (HTTP 504)"
            )));
        }
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, timefmt::now()));
        let location = resp
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .map(|l| {
                l.chars()
                    .filter(|c| !c.is_control())
                    .take(200)
                    .collect::<String>()
            });
        let mut bytes = Vec::new();
        let read = resp
            .body_mut()
            .as_reader()
            .take(MAX_RESPONSE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("reading the answer: {e}"));
        let oversized = bytes.len() as u64 > MAX_RESPONSE_BYTES;
        let parsed = match (&read, oversized) {
            (Ok(_), false) => parse_body(&bytes),
            _ => None,
        };
        if (200..300).contains(&status) {
            if parsed.is_none() {
                let why = match (read, oversized) {
                    (Err(e), _) => e,
                    (_, true) => "an answer over 1 MiB".into(),
                    _ => "an answer that is not JSON (or is nested too deeply)".into(),
                };
                warn!("server accepted (HTTP {status}) but sent {why}");
            }
            return Ok(Answer {
                status,
                body: parsed,
                elapsed,
            });
        }
        let (detail, errors) = match &parsed {
            _ if (300..400).contains(&status) => (
                format!(
                    "HTTP {status} redirect to {}",
                    location.as_deref().unwrap_or("nowhere")
                ),
                Vec::new(),
            ),
            Some(v) => details(v),
            // The status is known, whatever happened to the body after it.
            None if read.is_err() => (format!("HTTP {status} with an unreadable body"), Vec::new()),
            None => (format!("HTTP {status} with a non-JSON body"), Vec::new()),
        };
        Err(Failure::Status {
            status,
            detail,
            errors,
            retry_after,
        })
    }
}

/// The answer's JSON, if it is JSON of a sane depth: the parser spends about a hundred bytes
/// of memory per level, so 1 MiB of `[` would cost more than the unit's memory limit.
fn parse_body(bytes: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(bytes).ok()?;
    input::check_json(text, input::REPLY_JSON).ok()?;
    miniserde::json::from_str::<Value>(text).ok()
}

fn describe(f: &Failure) -> String {
    match f {
        Failure::NotSent(m) | Failure::InDoubt(m) | Failure::Tls(m) | Failure::BadUrl(m) => {
            m.clone()
        }
        Failure::Status { status, detail, .. } => format!("HTTP {status}: {detail}"),
    }
}

/// Sorts a failed request by whether the server can have processed it. `whole_body_taken`:
/// ureq had taken the last byte of the body (it may be on the wire, or in the server's hands).
fn classify(e: ureq::Error, whole_body_taken: bool, timeout: Duration) -> Failure {
    if let Some(why) = rejected_certificate(&e) {
        return Failure::Tls(format!(
            "TLS: the server's certificate is not trusted ({why}): pass --ca-file with the PEM of \
             the CA that signed it, and check that --server-url names a host the certificate is \
             for (--insecure-skip-verify turns verification off, for testing only)"
        ));
    }
    if let ureq::Error::Http(_) | ureq::Error::BadUri(_) = e {
        return Failure::BadUrl(e.to_string());
    }
    let secs = timeout.as_secs();
    match e {
        // Each phase's timeout starts when the one before ended: a timeout before the answer's
        // phase means the last write of the body never completed.
        ureq::Error::Timeout(
            phase @ (Timeout::Resolve
            | Timeout::Connect
            | Timeout::SendRequest
            | Timeout::Await100
            | Timeout::SendBody),
        ) => Failure::NotSent(format!(
            "timed out after {secs} s {}",
            match phase {
                Timeout::Resolve => "resolving the server's name",
                Timeout::Connect => "connecting to the server",
                _ => "sending the request",
            }
        )),
        ureq::Error::HostNotFound => Failure::NotSent("server host not found (DNS)".into()),
        ureq::Error::ConnectionFailed => Failure::NotSent("cannot connect to the server".into()),
        ureq::Error::Timeout(Timeout::RecvResponse) => Failure::InDoubt(format!(
            "the request was sent and no answer came within {secs} s (timed out)"
        )),
        ureq::Error::Timeout(_) if whole_body_taken => Failure::InDoubt(format!(
            "the request was sent and the answer did not come in time (timed out after {} s in all)",
            secs * 2
        )),
        ureq::Error::Timeout(_) => Failure::NotSent(format!(
            "timed out after {} s in all while sending the request",
            secs * 2
        )),
        other if whole_body_taken => Failure::InDoubt(format!(
            "the request was sent and the connection failed before a complete answer ({other})"
        )),
        other => Failure::NotSent(format!(
            "the connection failed before the request was sent whole ({other})"
        )),
    }
}

/// `Retry-After` (RFC 9110 10.2.3): seconds, or an HTTP-date read against `now`. Junk is
/// ignored: the usual backoff applies.
fn parse_retry_after(value: &str, now: i64) -> Option<Duration> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(
            value
                .parse::<u64>()
                .unwrap_or(u64::MAX)
                .min(MAX_RETRY_AFTER.as_secs()),
        )
    } else {
        let at = timefmt::parse_http_date(value)?;
        Duration::from_secs(u64::try_from(at.saturating_sub(now)).unwrap_or(0))
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// rustls' reason when it refused the server's certificate, `None` for any other failure.
///
/// ureq surfaces a failed handshake as `Error::Io` of kind `InvalidData` wrapping the
/// `rustls::Error` (rustls' `complete_io`), and other rustls failures as `Error::Rustls`. The
/// agent does not depend on rustls itself, so a certificate error is recognised by rustls'
/// wording of `Error::InvalidCertificate`, which a unit test pins to the locked rustls.
fn rejected_certificate(e: &ureq::Error) -> Option<String> {
    let text = match e {
        ureq::Error::Io(io) if io.kind() == io::ErrorKind::InvalidData => io.get_ref()?.to_string(),
        ureq::Error::Rustls(r) => r.to_string(),
        _ => return None,
    };
    text.starts_with("invalid peer certificate: ")
        .then_some(text)
}

/// The server's `detail` and a 422's field errors, shortened for a log line.
fn details(v: &Value) -> (String, Vec<String>) {
    let clip = |s: &str| -> String { s.chars().filter(|c| !c.is_control()).take(300).collect() };
    let detail = match json::get(v, "detail") {
        Some(Value::String(s)) => clip(s),
        Some(other) => clip(&miniserde::json::to_string(other)),
        None => "no detail given".into(),
    };
    let errors = json::get_array(v, "errors")
        .unwrap_or(&[])
        .iter()
        .take(20)
        .map(|e| {
            let field = json::get_str(e, "field").unwrap_or("?");
            let message = json::get_str(e, "message").unwrap_or("invalid");
            clip(&format!("{field}: {message}"))
        })
        .collect();
    (detail, errors)
}

/// A random number in `[0, 1]` from the OS random source (0.5 without one).
fn unit_random() -> f64 {
    let mut b = [0u8; 2];
    let r = if getrandom::fill(&mut b).is_ok() {
        u16::from_le_bytes(b)
    } else {
        32_768
    };
    f64::from(r) / 65_535.0
}

/// `base` ± 50 % for `random` in `[0, 1]` (a fleet must not retry in lockstep).
fn jittered_by(base: Duration, random: f64) -> Duration {
    base / 2 + base.mul_f64(random.clamp(0.0, 1.0))
}

/// How long to wait before the next attempt: the server's `Retry-After` a little later than
/// asked (a fleet told the same time spreads out), never less than the jittered backoff, so
/// that `Retry-After: 0` or a date in the past does not turn into retries without a pause.
fn retry_wait(asked: Option<Duration>, backoff: Duration, random: f64) -> Duration {
    let own = jittered_by(backoff, random);
    match asked {
        Some(asked) => (asked + asked.mul_f64(0.1 * random.clamp(0.0, 1.0))).max(own),
        None => own,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_errors_and_detail_are_extracted() {
        let v: Value = miniserde::json::from_str(
            r#"{"detail":"Validation failed","errors":[{"field":"addresses.0.mac_address","message":"Invalid MAC address '192.0.2.8'","type":"value_error"}]}"#,
        )
        .unwrap();
        assert_eq!(
            details(&v),
            (
                "Validation failed".to_string(),
                vec!["addresses.0.mac_address: Invalid MAC address '192.0.2.8'".to_string()]
            )
        );
    }

    #[test]
    fn hints_depend_on_the_call_that_failed() {
        let f = |status| Failure::status(status, "x");
        assert!(f(401)
            .into_error("registration")
            .to_string()
            .contains("GRAPHEON_AGENT_ENROLLMENT_KEY"));
        assert!(f(401)
            .into_error("check-in")
            .to_string()
            .contains("--set-api-key"));
        assert!(f(403)
            .into_error("registration")
            .to_string()
            .contains("enrollment key expired"));
        assert!(f(301)
            .into_error("check-in")
            .to_string()
            .contains("--server-url"));
        assert_eq!(f(301).into_error("check-in").exit_code(), 3);
    }

    #[test]
    fn statuses_map_to_exit_codes() {
        let f = |status| Failure::status(status, "x");
        assert_eq!(f(401).into_error("check-in").exit_code(), 3);
        assert_eq!(f(403).into_error("check-in").exit_code(), 3);
        assert_eq!(f(409).into_error("check-in").exit_code(), 3);
        assert_eq!(f(422).into_error("check-in").exit_code(), 3);
        assert_eq!(f(500).into_error("check-in").exit_code(), 1);
        assert_eq!(f(503).into_error("check-in").exit_code(), 1);
        assert_eq!(
            Failure::NotSent("reset".into())
                .into_error("check-in")
                .exit_code(),
            1
        );
        assert!(f(401)
            .into_error("check-in")
            .to_string()
            .contains("--set-api-key"));
        assert!(f(500).retryable() && !f(422).retryable() && !f(413).retryable());
    }

    #[test]
    fn a_url_the_http_client_refuses_is_a_configuration_error_not_retried() {
        let transport = |e| classify(e, false, Duration::from_secs(1));
        let bad_uri = transport(ureq::Error::BadUri("x is missing host".into()));
        let http = transport(ureq::Error::Http(
            ureq::http::Uri::try_from("http://h/a<b>")
                .unwrap_err()
                .into(),
        ));
        assert!(!bad_uri.retryable() && !http.retryable());
        let shown = |f: Failure| {
            let e = f.into_error("registration");
            (e.exit_code(), e.to_string())
        };
        assert_eq!(
            [shown(bad_uri), shown(http)],
            [
                (
                    2,
                    "registration failed: the HTTP client cannot use the server URL (bad uri: x \
                     is missing host): fix --server-url (GRAPHEON_AGENT_SERVER_URL)"
                        .to_string()
                ),
                (
                    2,
                    "registration failed: the HTTP client cannot use the server URL (http: \
                     invalid uri character): fix --server-url (GRAPHEON_AGENT_SERVER_URL)"
                        .to_string()
                )
            ]
        );
    }

    #[test]
    fn an_untrusted_certificate_is_a_configuration_error_naming_ca_file() {
        // As ureq 3 reports a handshake that rustls failed on the certificate.
        let handshake = |e: rustls::Error| {
            classify(
                ureq::Error::Io(io::Error::new(io::ErrorKind::InvalidData, e)),
                false,
                Duration::from_secs(30),
            )
        };
        let untrusted = handshake(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert_eq!(
            untrusted,
            Failure::Tls(
                "TLS: the server's certificate is not trusted (invalid peer certificate: \
                 UnknownIssuer): pass --ca-file with the PEM of the CA that signed it, and check \
                 that --server-url names a host the certificate is for (--insecure-skip-verify \
                 turns verification off, for testing only)"
                    .into()
            )
        );
        assert!(!untrusted.retryable());
        let error = untrusted.into_error("registration");
        assert_eq!(error.exit_code(), 2);
        assert!(error
            .to_string()
            .starts_with("registration failed: TLS: the server's certificate is not trusted"));
        assert!(matches!(
            classify(
                ureq::Error::Rustls(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired
                )),
                false,
                Duration::from_secs(30)
            ),
            Failure::Tls(_)
        ));

        // Other TLS failures may pass (a proxy, a server restarting): still transient.
        let alert = handshake(rustls::Error::AlertReceived(
            rustls::AlertDescription::HandshakeFailure,
        ));
        assert_eq!(
            alert,
            Failure::NotSent(
                "the connection failed before the request was sent whole (io: received fatal \
                 alert: HandshakeFailure)"
                    .into()
            )
        );
        assert!(alert.retryable());
    }

    #[test]
    fn deeply_nested_answers_are_not_parsed() {
        let mut nested = br#"{"status":"accepted","summary":"#.to_vec();
        nested.extend(std::iter::repeat_n(b'[', 1 << 20));
        assert!(parse_body(&nested).is_none());
        let fine = br#"{"status":"accepted","summary":{"hosts_created":[[1]]}}"#;
        assert_eq!(
            parse_body(fine).map(|v| miniserde::json::to_string(&v)),
            Some(String::from_utf8(fine.to_vec()).unwrap())
        );
    }

    #[test]
    fn a_retry_after_of_zero_or_in_the_past_still_waits_the_backoff() {
        let second = Duration::from_secs(1);
        let waits: Vec<Duration> = [
            (Some(Duration::ZERO), 0.0),
            (Some(Duration::ZERO), 1.0),
            (
                parse_retry_after("Thu, 01 Jan 2026 00:00:00 GMT", 1_795_744_647),
                0.0,
            ),
            (Some(Duration::from_secs(10)), 0.0),
            (Some(Duration::from_secs(10)), 1.0),
            (None, 0.5),
        ]
        .into_iter()
        .map(|(asked, random)| retry_wait(asked, second * 2, random))
        .collect();
        assert_eq!(
            waits,
            [
                second,
                second * 3,
                second,
                second * 10,
                second * 11,
                second * 2
            ]
        );
    }

    #[test]
    fn jitter_stays_within_half_either_side() {
        // The ends and the middle of the draw, then real draws.
        let base = Duration::from_secs(2);
        assert_eq!(
            [0.0, 0.5, 1.0, -1.0, 2.0].map(|r| jittered_by(base, r)),
            [1, 2, 3, 1, 3].map(Duration::from_secs)
        );
        for _ in 0..100 {
            let d = jittered_by(Duration::from_secs(2), unit_random());
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(3),
                "{d:?}"
            );
        }
    }

    // Real sockets on loopback: how a failure is sorted must match what the server saw.
    mod loopback {
        use super::super::*;
        use std::io::Write;
        use std::net::{TcpListener, TcpStream};
        use std::os::fd::AsRawFd;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;

        /// A server on 127.0.0.1 that hands each connection, with its number, to `serve`.
        /// Returns the base URL and the count of connections accepted.
        fn server(
            serve: impl Fn(usize, TcpStream) + Send + Sync + 'static,
        ) -> (String, Arc<AtomicUsize>) {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let count = Arc::new(AtomicUsize::new(0));
            let counted = Arc::clone(&count);
            let serve = Arc::new(serve);
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let n = counted.fetch_add(1, Ordering::SeqCst);
                    let serve = Arc::clone(&serve);
                    std::thread::spawn(move || serve(n, stream));
                }
            });
            (url, count)
        }

        fn client(url: &str, timeout: Duration) -> Client {
            let flags = crate::cli::Flags {
                config: Some("/dev/null".into()),
                ..crate::cli::Flags::default()
            };
            let mut cfg =
                crate::config::load(&flags, &crate::config::Sources { env: &|_| None }).unwrap();
            cfg.request_timeout = timeout;
            Client::new(&cfg, url).unwrap()
        }

        /// Reads the request head; returns its Content-Length.
        fn read_head(stream: &mut TcpStream) -> usize {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if stream.read(&mut byte).unwrap_or(0) == 0 {
                    return 0;
                }
                head.push(byte[0]);
            }
            let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
            text.lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        }

        fn read_request(stream: &mut TcpStream) {
            let len = read_head(stream);
            let mut body = vec![0u8; len];
            stream.read_exact(&mut body).unwrap();
        }

        /// Closes with a TCP RST instead of a FIN.
        fn reset(stream: TcpStream) {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: a valid socket and a correctly sized, initialised `linger`.
            unsafe {
                libc::setsockopt(
                    stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
            drop(stream);
        }

        fn answer(stream: &mut TcpStream, head: &str, body: &str) {
            let _ = write!(
                stream,
                "{head}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }

        /// Larger than any loopback socket buffer: the upload cannot finish while the server
        /// does not read.
        fn big_body() -> Vec<u8> {
            vec![b' '; 32 << 20]
        }

        fn kind(result: std::result::Result<Answer, Failure>) -> String {
            match result {
                Ok(a) => format!("answer {}", a.status),
                Err(Failure::NotSent(_)) => "not sent".into(),
                Err(Failure::InDoubt(_)) => "in doubt".into(),
                Err(Failure::Tls(_)) => "tls".into(),
                Err(Failure::BadUrl(_)) => "bad url".into(),
                Err(Failure::Status { status, .. }) => format!("status {status}"),
            }
        }

        #[test]
        fn a_refused_connection_is_not_sent() {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let c = client(&format!("http://127.0.0.1:{port}"), Duration::from_secs(1));
            assert_eq!(kind(c.post("/x", b"{}", None)), "not sent");
        }

        #[test]
        fn a_reset_while_the_body_is_still_going_out_is_not_sent() {
            let (url, _) = server(|_, mut s| {
                read_head(&mut s);
                reset(s);
            });
            let c = client(&url, Duration::from_secs(2));
            assert_eq!(kind(c.post("/x", &big_body(), None)), "not sent");
        }

        #[test]
        fn a_server_that_stops_reading_the_body_is_not_sent() {
            let (url, _) = server(|_, mut s| {
                read_head(&mut s);
                std::thread::sleep(Duration::from_secs(3));
            });
            let c = client(&url, Duration::from_secs(1));
            let failure = c.post("/x", &big_body(), None).unwrap_err();
            assert_eq!(
                failure,
                Failure::NotSent(format!("{url}/x: timed out after 1 s sending the request"))
            );
        }

        #[test]
        fn no_answer_after_the_whole_body_is_in_doubt() {
            let (url, _) = server(|_, mut s| {
                read_request(&mut s);
                std::thread::sleep(Duration::from_secs(3));
            });
            let c = client(&url, Duration::from_secs(1));
            assert_eq!(
                c.post("/x", b"{\"a\":1}", None).unwrap_err(),
                Failure::InDoubt(format!(
                    "{url}/x: the request was sent and no answer came within 1 s (timed out)"
                ))
            );
        }

        #[test]
        fn a_reset_or_a_cut_off_answer_after_the_whole_body_is_in_doubt() {
            let (url, _) = server(|n, mut s| {
                read_request(&mut s);
                if n == 0 {
                    reset(s);
                } else {
                    let _ = s.write_all(b"HTTP/1.1 2");
                }
            });
            let c = client(&url, Duration::from_secs(2));
            assert_eq!(kind(c.post("/x", b"{}", None)), "in doubt");
            assert_eq!(kind(c.post("/x", b"{}", None)), "in doubt");
        }

        #[test]
        fn a_request_in_doubt_is_never_sent_again() {
            let (url, count) = server(|_, mut s| {
                read_request(&mut s);
                reset(s);
            });
            let c = client(&url, Duration::from_secs(2));
            assert_eq!(kind(c.check_in(b"{}", "gpak_0123456789abcdef")), "in doubt");
            assert_eq!(count.load(Ordering::SeqCst), 1);
        }

        #[test]
        fn retry_after_is_honoured_and_the_answer_carries_the_server_time() {
            let (url, count) = server(|n, mut s| {
                read_request(&mut s);
                if n == 0 {
                    answer(
                        &mut s,
                        "HTTP/1.1 503 Service Unavailable\r\nretry-after: 1",
                        r#"{"detail":"busy"}"#,
                    );
                } else {
                    std::thread::sleep(Duration::from_millis(300));
                    answer(&mut s, "HTTP/1.1 200 OK", "{}");
                }
            });
            let c = client(&url, Duration::from_secs(2));
            let started = Instant::now();
            let answer = c.check_in(b"{}", "gpak_0123456789abcdef").unwrap();
            let took = started.elapsed();
            assert_eq!(count.load(Ordering::SeqCst), 2);
            assert!(took >= Duration::from_millis(1_300), "{took:?}");
            assert!(took < Duration::from_millis(2_000), "{took:?}");
            assert!(
                answer.elapsed >= Duration::from_millis(300),
                "{:?}",
                answer.elapsed
            );
            assert!(
                answer.elapsed < Duration::from_millis(1_000),
                "{:?}",
                answer.elapsed
            );
        }

        #[test]
        fn a_gateway_timeout_is_in_doubt_and_not_sent_again() {
            let (url, count) = server(|_, mut s| {
                read_request(&mut s);
                answer(
                    &mut s,
                    "HTTP/1.1 504 Gateway Timeout",
                    r#"{"detail":"upstream timed out"}"#,
                );
            });
            let c = client(&url, Duration::from_secs(2));
            assert_eq!(kind(c.check_in(b"{}", "gpak_0123456789abcdef")), "in doubt");
            assert_eq!(count.load(Ordering::SeqCst), 1, "sent once, not retried");
        }

        #[test]
        fn a_status_answer_keeps_its_retry_after() {
            let (url, _) = server(|_, mut s| {
                read_request(&mut s);
                answer(
                    &mut s,
                    "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7",
                    r#"{"detail":"slow down"}"#,
                );
            });
            let c = client(&url, Duration::from_secs(2));
            assert_eq!(
                c.post("/x", b"{}", None).unwrap_err(),
                Failure::Status {
                    status: 429,
                    detail: "slow down".into(),
                    errors: vec![],
                    retry_after: Some(Duration::from_secs(7)),
                }
            );
        }
    }

    #[test]
    fn failures_are_sorted_by_whether_the_server_can_have_the_request() {
        let t = Duration::from_secs(5);
        let sorted = |e: ureq::Error, taken: bool| match classify(e, taken, t) {
            Failure::NotSent(_) => "not sent",
            Failure::InDoubt(_) => "in doubt",
            _ => "other",
        };
        for phase in [
            Timeout::Resolve,
            Timeout::Connect,
            Timeout::SendRequest,
            Timeout::SendBody,
        ] {
            // Even with the whole body taken: its last write did not complete.
            assert_eq!(
                sorted(ureq::Error::Timeout(phase), true),
                "not sent",
                "{phase:?}"
            );
        }
        assert_eq!(
            sorted(ureq::Error::Timeout(Timeout::RecvResponse), true),
            "in doubt"
        );
        assert_eq!(
            sorted(ureq::Error::Timeout(Timeout::Global), false),
            "not sent"
        );
        assert_eq!(
            sorted(ureq::Error::Timeout(Timeout::Global), true),
            "in doubt"
        );
        assert_eq!(sorted(ureq::Error::HostNotFound, false), "not sent");
        assert_eq!(sorted(ureq::Error::ConnectionFailed, false), "not sent");
        let reset = || ureq::Error::Io(io::Error::from(io::ErrorKind::ConnectionReset));
        assert_eq!(sorted(reset(), false), "not sent");
        assert_eq!(sorted(reset(), true), "in doubt");
    }

    #[test]
    fn only_statuses_the_server_did_not_store_are_retried() {
        let retried: Vec<u16> = (400..=599)
            .filter(|s| Failure::status(*s, "x").retryable())
            .collect();
        assert_eq!(retried, [408, 429, 500, 502, 503]);
        assert!(Failure::NotSent("x".into()).retryable());
        assert!(!Failure::InDoubt("x".into()).retryable());
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = 1_795_744_647; // 2026-11-27T01:57:27Z
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Fri, 27 Nov 2026 01:58:00 GMT", now),
            Some(Duration::from_secs(33))
        );
        assert_eq!(
            parse_retry_after("Fri, 27 Nov 2026 01:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(MAX_RETRY_AFTER)
        );
        for junk in ["", "-5", "1.5", "soon", "Fri, 27 Nov 2026"] {
            assert_eq!(parse_retry_after(junk, now), None, "{junk}");
        }
    }
}
