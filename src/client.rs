//! HTTP to the server: TLS over rustls, bounded in time and in what is read back, with retries
//! for failures that may pass (connection errors, timeouts, 5xx).

use std::cell::Cell;
use std::io::{self, Read};
use std::time::{Duration, Instant};

use miniserde::json::Value;
use ureq::tls::{PemItem, RootCerts, TlsConfig};
use ureq::Agent;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::json;

/// The agent's version, from the `VERSION` file.
pub const VERSION: &str = env!("GRAPHEON_AGENT_VERSION");

/// Response bodies larger than this are not read: a real answer is a few kilobytes.
const MAX_RESPONSE_BYTES: u64 = 1 << 20;
/// Attempts per request for failures that may pass.
const ATTEMPTS: u32 = 4;

/// Why a request did not get a 2xx answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No HTTP answer: DNS, connection, TLS, timeout, a truncated or oversized response.
    Transport(String),
    /// The server's TLS certificate was not accepted. Retrying cannot help: the operator must
    /// trust its CA (`--ca-file`) or fix the certificate or `--server-url`.
    Tls(String),
    /// The server answered with a non-2xx status.
    Status {
        status: u16,
        detail: String,
        errors: Vec<String>,
    },
}

impl Failure {
    fn retryable(&self) -> bool {
        match self {
            Failure::Transport(_) => true,
            Failure::Tls(_) => false,
            Failure::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
        }
    }

    /// The operator-facing error for a failed `what` (e.g. "check-in").
    pub fn into_error(self, what: &str) -> Error {
        match self {
            Failure::Transport(m) => {
                Error::Transient(format!("{what} failed: {m}; the next run retries"))
            }
            Failure::Tls(m) => Error::Config(format!("{what} failed: {m}")),
            Failure::Status {
                status,
                detail,
                errors,
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
            let pem = std::fs::read(path).map_err(|e| {
                Error::Config(format!("cannot read CA file {}: {e}", path.display()))
            })?;
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
        let agent: Agent = Agent::config_builder()
            .tls_config(tls.build())
            .timeout_global(Some(cfg.request_timeout))
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

    /// Retries what may pass, with exponential backoff and jitter, until the overall deadline.
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
            let wait = jittered(backoff);
            if !failure.retryable()
                || n >= ATTEMPTS
                || Instant::now() + wait + self.timeout > deadline
            {
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
            .header("Accept", "application/json");
        if let Some(key) = api_key {
            req = req
                .header("Content-Encoding", "gzip")
                .header(self.key_header.as_str(), key);
        }
        let mut resp = req.send(body).map_err(transport)?;
        let status = resp.status().as_u16();
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
            (Ok(_), false) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| miniserde::json::from_str::<Value>(t).ok()),
            _ => None,
        };
        if (200..300).contains(&status) {
            if parsed.is_none() {
                let why = match (read, oversized) {
                    (Err(e), _) => e,
                    (_, true) => "an answer over 1 MiB".into(),
                    _ => "an answer that is not JSON".into(),
                };
                warn!("server accepted (HTTP {status}) but sent {why}");
            }
            return Ok(Answer {
                status,
                body: parsed,
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
            None if read.is_err() => {
                return Err(Failure::Transport(format!(
                    "HTTP {status} with an unreadable body"
                )))
            }
            None => (format!("HTTP {status} with a non-JSON body"), Vec::new()),
        };
        Err(Failure::Status {
            status,
            detail,
            errors,
        })
    }
}

fn describe(f: &Failure) -> String {
    match f {
        Failure::Transport(m) | Failure::Tls(m) => m.clone(),
        Failure::Status { status, detail, .. } => format!("HTTP {status}: {detail}"),
    }
}

fn transport(e: ureq::Error) -> Failure {
    if let Some(why) = rejected_certificate(&e) {
        return Failure::Tls(format!(
            "TLS: the server's certificate is not trusted ({why}): pass --ca-file with the PEM of \
             the CA that signed it, and check that --server-url names a host the certificate is \
             for (--insecure-skip-verify turns verification off, for testing only)"
        ));
    }
    Failure::Transport(match e {
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        ureq::Error::HostNotFound => "server host not found (DNS)".into(),
        ureq::Error::ConnectionFailed => "cannot connect to the server".into(),
        other => other.to_string(),
    })
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

/// `base` ± 50 %, from the OS random source (a fleet must not retry in lockstep).
fn jittered(base: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = if getrandom::fill(&mut b).is_ok() {
        u16::from_le_bytes(b)
    } else {
        32_768
    };
    base / 2 + base.mul_f64(f64::from(r) / 65_535.0)
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
        let f = |status| Failure::Status {
            status,
            detail: "x".into(),
            errors: vec![],
        };
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
        let f = |status| Failure::Status {
            status,
            detail: "x".into(),
            errors: vec![],
        };
        assert_eq!(f(401).into_error("check-in").exit_code(), 3);
        assert_eq!(f(403).into_error("check-in").exit_code(), 3);
        assert_eq!(f(409).into_error("check-in").exit_code(), 3);
        assert_eq!(f(422).into_error("check-in").exit_code(), 3);
        assert_eq!(f(500).into_error("check-in").exit_code(), 1);
        assert_eq!(f(503).into_error("check-in").exit_code(), 1);
        assert_eq!(
            Failure::Transport("reset".into())
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
    fn an_untrusted_certificate_is_a_configuration_error_naming_ca_file() {
        // As ureq 3 reports a handshake that rustls failed on the certificate.
        let handshake = |e: rustls::Error| {
            transport(ureq::Error::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                e,
            )))
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
            transport(ureq::Error::Rustls(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired
            ))),
            Failure::Tls(_)
        ));

        // Other TLS failures may pass (a proxy, a server restarting): still transient.
        let alert = handshake(rustls::Error::AlertReceived(
            rustls::AlertDescription::HandshakeFailure,
        ));
        assert_eq!(
            alert,
            Failure::Transport("io: received fatal alert: HandshakeFailure".into())
        );
        assert!(alert.retryable());
    }

    #[test]
    fn jitter_stays_within_half_either_side() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(2));
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(3),
                "{d:?}"
            );
        }
    }
}
