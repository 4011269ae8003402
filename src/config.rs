//! The validated configuration of one run: flags, then environment, then env file, then
//! defaults. Every value is checked here, naming where it came from; the rest of the program
//! trusts [`Config`].

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::Flags;
use crate::collect::{Mode, Scope};
use crate::error::{Error, Result};
use crate::input;
use crate::log::Level;

/// The env file read when neither `--config` nor `GRAPHEON_AGENT_CONFIG` names one.
pub const DEFAULT_ENV_FILE: &str = "/etc/grapheon-agent.env";
/// The largest env file read.
pub const MAX_ENV_FILE_BYTES: u64 = 1 << 20;
/// The state directory of the earlier agent, kept.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/grapheon-agent";

/// What this run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Register when there is no key, then check in.
    Run,
    RegisterOnly,
    CheckInOnly,
    DryRun,
    Status,
    SetApiKey,
}

/// Everything a run needs, validated.
#[derive(Clone, Debug)]
pub struct Config {
    pub action: Action,
    /// The env file this run read (or would have read), for messages that tell where to set a
    /// value.
    pub env_file: PathBuf,
    pub force: bool,
    pub server_url: Option<String>,
    pub enrollment_key: Option<String>,
    pub state_dir: PathBuf,
    pub display_name: Option<String>,
    pub site_name: Option<String>,
    pub hostname: Option<String>,
    pub request_timeout: Duration,
    pub timer_interval_seconds: u64,
    pub api_key_header: String,
    pub ca_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
    pub log_level: Level,
    pub collector: Mode,
    pub proc_root: PathBuf,
    /// Whether other network namespaces are collected.
    pub namespaces: Scope,
    /// `None`: never force a full snapshot by age.
    pub full_snapshot_interval_seconds: Option<u64>,
}

/// Where settings come from, below the flags.
pub struct Sources<'a> {
    /// Reads one environment variable.
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

/// Parses env-file text: `KEY=VALUE` lines, `#` comments, optional `export `, optional single or
/// double quotes. Lines that are not assignments are reported by number only (values may be
/// secrets) and skipped.
pub fn parse_env_file(text: &str) -> (HashMap<String, String>, Vec<usize>) {
    let mut vars = HashMap::new();
    let mut bad = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line
            .strip_prefix("export ")
            .map(str::trim_start)
            .unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            bad.push(n + 1);
            continue;
        };
        let key = key.trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            bad.push(n + 1);
            continue;
        }
        let value = value.trim();
        let value = match value.as_bytes().first() {
            Some(q @ (b'"' | b'\'')) => match value[1..].find(*q as char) {
                Some(end) => value[1..1 + end].to_string(),
                None => {
                    bad.push(n + 1);
                    continue;
                }
            },
            _ => match value.find(" #") {
                Some(at) => value[..at].trim_end().to_string(),
                None => value.to_string(),
            },
        };
        vars.insert(key.to_string(), value);
    }
    (vars, bad)
}

struct Lookup<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    file: HashMap<String, String>,
}

impl Lookup<'_> {
    /// The value and where it came from, for error messages.
    fn get(&self, flag: &Option<String>, flag_name: &str, var: &str) -> Option<(String, String)> {
        if let Some(v) = flag {
            return Some((v.clone(), flag_name.to_string()));
        }
        if let Some(v) = (self.env)(var).filter(|v| !v.is_empty()) {
            return Some((v, format!("{var} in the environment")));
        }
        self.file
            .get(var)
            .filter(|v| !v.is_empty())
            .map(|v| (v.clone(), format!("{var} in the env file")))
    }

    fn switch(&self, flag: bool, var: &str) -> Result<bool> {
        if flag {
            return Ok(true);
        }
        match self.get(&None, "", var) {
            None => Ok(false),
            Some((v, from)) => match v.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(Error::Usage(format!(
                    "{from}: '{v}' is not a boolean (use true or false)"
                ))),
            },
        }
    }
}

fn number(value: Option<(String, String)>, min: u64, max: u64, default: u64) -> Result<u64> {
    let Some((text, from)) = value else {
        return Ok(default);
    };
    match text.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(_) => Err(Error::Usage(format!(
            "{from}: {text} is outside {min}..{max}"
        ))),
        Err(_) => Err(Error::Usage(format!(
            "{from}: '{text}' is not a whole number"
        ))),
    }
}

fn server_url(value: Option<(String, String)>) -> Result<Option<String>> {
    let Some((text, from)) = value else {
        return Ok(None);
    };
    let url = text.trim().trim_end_matches('/');
    // Messages show the URL without what may be a password in it.
    let shown = without_user_info(text.trim());
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    let Some(rest) = rest.filter(|_| !url.contains(char::is_whitespace)) else {
        return Err(Error::Usage(format!(
            "{from}: '{shown}' is not an http:// or https:// URL"
        )));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let unusable =
        |why: &str| Error::Usage(format!("{from}: '{shown}' is not a usable URL: {why}"));
    check_authority(authority).map_err(unusable)?;
    // What the HTTP client will parse: the endpoint as it is requested, so a character it
    // refuses (`<`, `"`, `{`) is a usage error now rather than a failure retried on
    // every run.
    ureq::http::Uri::try_from(format!("{url}/api/agents/check-in"))
        .map_err(|e| unusable(&format!("the HTTP client refuses it ({e})")))?;
    Ok(Some(url.to_string()))
}

/// `url` with any `user:password@` before the host replaced by `***@`.
fn without_user_info(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) if !scheme.is_empty() => format!("{scheme}://***{}", &rest[at..]),
        _ => url.to_string(),
    }
}

/// Checks the `host[:port]` of a URL, so a typo is a usage error now rather than a connection
/// failure retried as transient on every run.
fn check_authority(authority: &str) -> std::result::Result<(), &'static str> {
    if authority.is_empty() {
        return Err("it names no host");
    }
    if authority.contains('@') {
        return Err("user names or passwords in the URL are not supported");
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (ip, after) = bracketed
            .split_once(']')
            .ok_or("an IPv6 address in brackets lacks its closing ']'")?;
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("the address in brackets is not an IPv6 address");
        }
        match after {
            "" => (None, None),
            _ => (
                None,
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or("junk after the IPv6 address")?,
                ),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(authority), None),
        }
    };
    if let Some(host) = host {
        let valid = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
        if !valid {
            return Err("the host name has characters a host name cannot have");
        }
    }
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => {}
            _ => return Err("the port is not a number from 1 to 65535"),
        }
    }
    Ok(())
}

/// The warning for a server URL that would carry a key in clear text, if it does, and at which
/// level: a warning, except for a loopback host (a proxy or tunnel on the same machine), where
/// the keys never leave the host and a warning on every run would only teach operators to
/// ignore warnings.
pub fn plain_http_warning(server_url: &str) -> Option<(Level, String)> {
    let rest = server_url.strip_prefix("http://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let level = if loopback { Level::Debug } else { Level::Warn };
    Some((
        level,
        format!(
            "{server_url} is plain http://: the enrollment and API keys cross the network \
             unencrypted; use https:// unless the path to the server is trusted"
        ),
    ))
}

/// Builds the configuration. The env file is read unless the action needs none of it... it
/// always may hold settings, so it is read whenever it exists; an unreadable default file only
/// stops actions that need the server (a dry run as an ordinary user must still work).
pub fn load(flags: &Flags, sources: &Sources<'_>) -> Result<Config> {
    // The action decides how strictly the env file is read; the file and the environment can
    // still turn a plain run into register-only or check-in-only below.
    let mut action = action(flags)?;
    let explicit = flags
        .config
        .clone()
        .map(|f| (f, "--config".to_string()))
        .or_else(|| {
            (sources.env)("GRAPHEON_AGENT_CONFIG")
                .filter(|v| !v.is_empty())
                .map(|f| (f, "GRAPHEON_AGENT_CONFIG".into()))
        });
    let (path, named) = match &explicit {
        Some((p, _)) => (PathBuf::from(p), true),
        None => (PathBuf::from(DEFAULT_ENV_FILE), false),
    };
    let file = match read_env_file(&path) {
        Ok(Some(text)) => {
            let (vars, bad) = parse_env_file(&text);
            for line in bad {
                warn!("{}: line {line} is not KEY=VALUE; ignored", path.display());
            }
            vars
        }
        Ok(None) if named => {
            return Err(Error::Config(format!(
                "env file {} does not exist",
                path.display()
            )));
        }
        Ok(None) => HashMap::new(),
        Err(e) if !named && matches!(action, Action::DryRun | Action::Status) => {
            debug!(
                "env file {} not read ({e}); using flags and environment only",
                path.display()
            );
            HashMap::new()
        }
        Err(e) => {
            return Err(Error::Config(format!(
                "cannot read env file {}: {e}",
                path.display()
            )))
        }
    };
    let l = Lookup {
        env: sources.env,
        file,
    };
    if action == Action::Run {
        // The earlier agent read these switches from the environment too; flags win.
        let register_only = l.switch(false, "GRAPHEON_AGENT_REGISTER_ONLY")?;
        let check_in_only = l.switch(false, "GRAPHEON_AGENT_CHECK_IN_ONLY")?;
        action = self::action(&Flags {
            register_only,
            check_in_only,
            ..Flags::default()
        })?;
    }
    let text =
        |flag: &Option<String>, name: &str, var: &str| l.get(flag, name, var).map(|(v, _)| v);

    let log_level = match l.get(&flags.log_level, "--log-level", "GRAPHEON_AGENT_LOG_LEVEL") {
        None => Level::Info,
        Some((v, from)) => Level::parse(&v).ok_or_else(|| {
            Error::Usage(format!(
                "{from}: '{v}' is not one of error, warning, info, debug"
            ))
        })?,
    };
    let collector = match l.get(&flags.collector, "--collector", "GRAPHEON_AGENT_COLLECTOR") {
        None => Mode::Auto,
        Some((v, from)) => match v.trim().to_ascii_lowercase().as_str() {
            "auto" => Mode::Auto,
            "native" => Mode::Native,
            "commands" => Mode::Commands,
            _ => {
                return Err(Error::Usage(format!(
                    "{from}: '{v}' is not one of auto, native, commands"
                )))
            }
        },
    };
    let namespaces = match l.get(
        &flags.namespaces,
        "--namespaces",
        "GRAPHEON_AGENT_NAMESPACES",
    ) {
        None => Scope::All,
        Some((v, from)) => match v.trim().to_ascii_lowercase().as_str() {
            "all" => Scope::All,
            "own" => Scope::Own,
            _ => {
                return Err(Error::Usage(format!(
                    "{from}: '{v}' is not one of all, own"
                )))
            }
        },
    };
    let api_key_header = text(
        &flags.api_key_header,
        "--api-key-header",
        "GRAPHEON_AGENT_API_KEY_HEADER",
    )
    .unwrap_or_else(|| "X-Agent-Api-Key".to_string());
    if !api_key_header
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::Usage(format!(
            "--api-key-header: '{api_key_header}' is not a valid header name"
        )));
    }
    let full = number(
        l.get(
            &flags.full_snapshot_interval_seconds,
            "--full-snapshot-interval-seconds",
            "GRAPHEON_AGENT_FULL_SNAPSHOT_INTERVAL_SECONDS",
        ),
        0,
        365 * 86_400,
        86_400,
    )?;
    Ok(Config {
        action,
        env_file: path,
        force: l.switch(flags.force, "GRAPHEON_AGENT_FORCE")?,
        server_url: server_url(l.get(
            &flags.server_url,
            "--server-url",
            "GRAPHEON_AGENT_SERVER_URL",
        ))?,
        enrollment_key: text(
            &flags.enrollment_key,
            "--enrollment-key",
            "GRAPHEON_AGENT_ENROLLMENT_KEY",
        ),
        state_dir: PathBuf::from(
            text(&flags.state_dir, "--state-dir", "GRAPHEON_AGENT_STATE_DIR")
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
        ),
        display_name: text(
            &flags.display_name,
            "--display-name",
            "GRAPHEON_AGENT_DISPLAY_NAME",
        ),
        site_name: text(&flags.site_name, "--site-name", "GRAPHEON_AGENT_SITE_NAME"),
        hostname: text(&flags.hostname, "--hostname", "GRAPHEON_AGENT_HOSTNAME"),
        request_timeout: Duration::from_secs(number(
            l.get(
                &flags.request_timeout_seconds,
                "--request-timeout-seconds",
                "GRAPHEON_AGENT_REQUEST_TIMEOUT_SECONDS",
            ),
            1,
            3_600,
            30,
        )?),
        timer_interval_seconds: number(
            l.get(
                &flags.timer_interval_seconds,
                "--timer-interval-seconds",
                "GRAPHEON_AGENT_TIMER_INTERVAL_SECONDS",
            ),
            1,
            86_400 * 7,
            900,
        )?,
        api_key_header,
        ca_file: text(&flags.ca_file, "--ca-file", "GRAPHEON_AGENT_CA_FILE").map(PathBuf::from),
        insecure_skip_verify: l.switch(
            flags.insecure_skip_verify,
            "GRAPHEON_AGENT_INSECURE_SKIP_VERIFY",
        )?,
        log_level,
        collector,
        proc_root: PathBuf::from(
            text(&flags.proc_root, "--proc-root", "GRAPHEON_AGENT_PROC_ROOT")
                .unwrap_or_else(|| "/proc".into()),
        ),
        namespaces,
        full_snapshot_interval_seconds: (full > 0).then_some(full),
    })
}

fn action(flags: &Flags) -> Result<Action> {
    let chosen: Vec<(&str, Action)> = [
        (flags.dry_run, "--dry-run", Action::DryRun),
        (flags.status, "--status", Action::Status),
        (flags.set_api_key, "--set-api-key", Action::SetApiKey),
        (flags.register_only, "--register-only", Action::RegisterOnly),
        (flags.check_in_only, "--check-in-only", Action::CheckInOnly),
    ]
    .into_iter()
    .filter(|(on, _, _)| *on)
    .map(|(_, name, a)| (name, a))
    .collect();
    match chosen.as_slice() {
        [] => Ok(Action::Run),
        [(_, a)] => Ok(*a),
        [(a, _), (b, _), ..] => Err(Error::Usage(format!("{a} and {b} cannot be used together"))),
    }
}

/// Reads the env file; `Ok(None)` when it does not exist. It must be a regular file of at most
/// [`MAX_ENV_FILE_BYTES`] (an env file is a few lines): a larger one is an error, not cut.
/// `/dev/null` (no settings) is accepted as empty.
fn read_env_file(path: &std::path::Path) -> std::io::Result<Option<String>> {
    if path == std::path::Path::new("/dev/null") {
        return Ok(Some(String::new()));
    }
    let file = match input::open_regular(path, input::Links::Follow) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let mode = meta.mode();
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        warn!(
            "env file {} belongs to user {}, who can point the agent at another server and so \
             receive its keys: chown {me} {}",
            path.display(),
            meta.uid(),
            path.display()
        );
    }
    if mode & 0o007 != 0 {
        warn!(
            "env file {} is accessible to every user (mode {:04o}) and may hold the enrollment \
             key: chmod 600 {}",
            path.display(),
            mode & 0o7777,
            path.display()
        );
    }
    let bytes = input::read_capped(file, MAX_ENV_FILE_BYTES)?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(flags: Flags, env: &[(&str, &str)], file: Option<&str>) -> Result<Config> {
        let dir = std::env::temp_dir().join(format!(
            "ga-config-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.env");
        let mut flags = flags;
        match file {
            Some(text) => {
                std::fs::write(&path, text).unwrap();
                flags
                    .config
                    .get_or_insert(path.to_string_lossy().into_owned());
            }
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |k: &str| env.get(k).cloned();
        load(&flags, &Sources { env: &lookup })
    }

    #[test]
    fn env_file_syntax() {
        let (vars, bad) = parse_env_file(
            "# comment\n\nGRAPHEON_AGENT_SERVER_URL=https://a.example\nexport B='quoted # not comment'\n\
             C=\"dq\"\nD=plain # trailing\nnot an assignment\nE=\"unterminated\n F = spaced \n",
        );
        assert_eq!(
            vars.get("GRAPHEON_AGENT_SERVER_URL").map(String::as_str),
            Some("https://a.example")
        );
        assert_eq!(
            vars.get("B").map(String::as_str),
            Some("quoted # not comment")
        );
        assert_eq!(vars.get("C").map(String::as_str), Some("dq"));
        assert_eq!(vars.get("D").map(String::as_str), Some("plain"));
        assert_eq!(vars.get("F").map(String::as_str), Some("spaced"));
        assert_eq!(vars.len(), 5);
        assert_eq!(bad, vec![7, 8]);
    }

    #[test]
    fn precedence_is_flag_then_environment_then_file_then_default() {
        let file =
            "GRAPHEON_AGENT_SERVER_URL=https://file.example\nGRAPHEON_AGENT_STATE_DIR=/from/file\n\
                    GRAPHEON_AGENT_HOSTNAME=file-host\n";
        let env = [
            ("GRAPHEON_AGENT_SERVER_URL", "https://env.example"),
            ("GRAPHEON_AGENT_STATE_DIR", "/from/env"),
        ];
        let flags = Flags {
            server_url: Some("http://flag.example/".into()),
            ..Flags::default()
        };
        let c = load_with(flags, &env, Some(file)).unwrap();
        assert_eq!(c.server_url.as_deref(), Some("http://flag.example"));
        assert_eq!(c.state_dir, PathBuf::from("/from/env"));
        assert_eq!(c.hostname.as_deref(), Some("file-host"));
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert_eq!(c.timer_interval_seconds, 900);
        assert_eq!(c.api_key_header, "X-Agent-Api-Key");
        assert_eq!(c.collector, Mode::Auto);
        assert_eq!(c.namespaces, Scope::All);
        assert_eq!(c.full_snapshot_interval_seconds, Some(86_400));
        assert_eq!(c.action, Action::Run);
    }

    #[test]
    fn bad_values_are_usage_errors_naming_their_source() {
        type Case = (Flags, &'static [(&'static str, &'static str)], &'static str);
        let cases: [Case; 8] = [
            (
                Flags {
                    request_timeout_seconds: Some("abc".into()),
                    ..Flags::default()
                },
                &[],
                "--request-timeout-seconds",
            ),
            (
                Flags {
                    server_url: Some("ftp://x".into()),
                    ..Flags::default()
                },
                &[],
                "--server-url",
            ),
            (
                Flags::default(),
                &[("GRAPHEON_AGENT_SERVER_URL", "localhost:8000")],
                "GRAPHEON_AGENT_SERVER_URL",
            ),
            (
                Flags::default(),
                &[("GRAPHEON_AGENT_INSECURE_SKIP_VERIFY", "maybe")],
                "GRAPHEON_AGENT_INSECURE_SKIP_VERIFY",
            ),
            (
                Flags {
                    collector: Some("magic".into()),
                    ..Flags::default()
                },
                &[],
                "--collector",
            ),
            (
                Flags {
                    namespaces: Some("some".into()),
                    ..Flags::default()
                },
                &[],
                "--namespaces",
            ),
            (
                Flags::default(),
                &[("GRAPHEON_AGENT_NAMESPACES", "host")],
                "GRAPHEON_AGENT_NAMESPACES",
            ),
            (
                Flags {
                    register_only: true,
                    check_in_only: true,
                    ..Flags::default()
                },
                &[],
                "--register-only and --check-in-only",
            ),
        ];
        for (flags, env, needle) in cases {
            let err = load_with(flags, env, None).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{err}");
            assert!(
                err.to_string().contains(needle),
                "{err} should name {needle}"
            );
        }
    }

    #[test]
    fn switches_and_zero_interval_from_the_environment() {
        let env = [
            ("GRAPHEON_AGENT_INSECURE_SKIP_VERIFY", "true"),
            ("GRAPHEON_AGENT_FORCE", "1"),
            ("GRAPHEON_AGENT_FULL_SNAPSHOT_INTERVAL_SECONDS", "0"),
        ];
        let c = load_with(Flags::default(), &env, None).unwrap();
        assert!(c.insecure_skip_verify && c.force);
        assert_eq!(c.full_snapshot_interval_seconds, None);
    }

    #[test]
    fn register_and_check_in_only_switches_come_from_the_environment_too() {
        let c = load_with(
            Flags::default(),
            &[("GRAPHEON_AGENT_CHECK_IN_ONLY", "true")],
            None,
        )
        .unwrap();
        assert_eq!(c.action, Action::CheckInOnly);
        let c = load_with(
            Flags::default(),
            &[],
            Some("GRAPHEON_AGENT_REGISTER_ONLY=yes\n"),
        )
        .unwrap();
        assert_eq!(c.action, Action::RegisterOnly);
        // An explicit action flag wins over the switches of the environment.
        let flags = Flags {
            dry_run: true,
            ..Flags::default()
        };
        let c = load_with(flags, &[("GRAPHEON_AGENT_REGISTER_ONLY", "true")], None).unwrap();
        assert_eq!(c.action, Action::DryRun);
        let both = [
            ("GRAPHEON_AGENT_REGISTER_ONLY", "1"),
            ("GRAPHEON_AGENT_CHECK_IN_ONLY", "1"),
        ];
        assert_eq!(
            load_with(Flags::default(), &both, None)
                .unwrap_err()
                .exit_code(),
            2
        );
    }

    #[test]
    fn malformed_server_urls_are_usage_errors() {
        let bad = [
            "http://[::1",
            "http://[::1]x",
            "http://[zz]:80",
            "https://host:99999",
            "https://host:",
            "https://user:secret@host",
            "http://127.0.0.1:9/a<b>",
            "https://ho st",
            "https://",
            "https:///path",
        ];
        let results: Vec<(i32, String)> = bad
            .iter()
            .map(|u| {
                let err = server_url(Some((u.to_string(), "--server-url".into()))).unwrap_err();
                (err.exit_code(), err.to_string())
            })
            .collect();
        assert_eq!(
            results,
            [
                "--server-url: 'http://[::1' is not a usable URL: an IPv6 address in brackets lacks its closing ']' (see --help)",
                "--server-url: 'http://[::1]x' is not a usable URL: junk after the IPv6 address (see --help)",
                "--server-url: 'http://[zz]:80' is not a usable URL: the address in brackets is not an IPv6 address (see --help)",
                "--server-url: 'https://host:99999' is not a usable URL: the port is not a number from 1 to 65535 (see --help)",
                "--server-url: 'https://host:' is not a usable URL: the port is not a number from 1 to 65535 (see --help)",
                "--server-url: 'https://***@host' is not a usable URL: user names or passwords in the URL are not supported (see --help)",
                "--server-url: 'http://127.0.0.1:9/a<b>' is not a usable URL: the HTTP client refuses it (invalid uri character) (see --help)",
                "--server-url: 'https://ho st' is not an http:// or https:// URL (see --help)",
                "--server-url: 'https://' is not an http:// or https:// URL (see --help)",
                "--server-url: 'https:///path' is not a usable URL: it names no host (see --help)",
            ]
            .map(|m| (2, m.to_string()))
        );
        for good in [
            "https://grapheon.example.net",
            "http://127.0.0.1:8000/",
            "https://[::1]:8443/base",
            "https://[fe80::1]",
            "https://host_name.example:443/a?b#c",
        ] {
            assert!(
                server_url(Some((good.to_string(), "--server-url".into()))).is_ok(),
                "{good}"
            );
        }
    }

    #[test]
    fn plain_http_is_warned_about_and_https_is_not() {
        let warning = |url: &str| {
            format!(
                "{url} is plain http://: the enrollment and API keys cross the network \
                 unencrypted; use https:// unless the path to the server is trusted"
            )
        };
        let levels: Vec<_> = [
            "http://grapheon.example",
            "http://10.0.0.1:8000/base",
            "http://127.0.0.1:8000",
            "http://[::1]:8000",
            "http://LOCALHOST/x",
        ]
        .iter()
        .map(|u| plain_http_warning(u))
        .collect();
        assert_eq!(
            levels,
            [
                Some((Level::Warn, warning("http://grapheon.example"))),
                Some((Level::Warn, warning("http://10.0.0.1:8000/base"))),
                Some((Level::Debug, warning("http://127.0.0.1:8000"))),
                Some((Level::Debug, warning("http://[::1]:8000"))),
                Some((Level::Debug, warning("http://LOCALHOST/x"))),
            ]
        );
        assert_eq!(plain_http_warning("https://grapheon.example"), None);
    }

    #[test]
    fn an_env_file_over_the_cap_or_not_a_file_is_an_error_not_cut() {
        let big = format!(
            "GRAPHEON_AGENT_HOSTNAME=h\n{}",
            "#".repeat(MAX_ENV_FILE_BYTES as usize)
        );
        let err = load_with(Flags::default(), &[], Some(&big)).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().ends_with(": larger than 1048576 bytes"),
            "{err}"
        );
        let flags = Flags {
            config: Some("/dev/zero".into()),
            ..Flags::default()
        };
        let err = load_with(flags, &[], None).unwrap_err();
        assert_eq!(
            (err.exit_code(), err.to_string()),
            (
                2,
                "cannot read env file /dev/zero: not a regular file (it is a character device)"
                    .to_string()
            )
        );
    }

    #[test]
    fn the_env_file_read_is_the_one_messages_name() {
        let c = load_with(Flags::default(), &[], Some("GRAPHEON_AGENT_HOSTNAME=h\n")).unwrap();
        assert!(
            c.env_file.ends_with("agent.env"),
            "{}",
            c.env_file.display()
        );
        let env = |key: &str| (key == "GRAPHEON_AGENT_CONFIG").then(|| "/dev/null".to_string());
        let c = load(&Flags::default(), &Sources { env: &env }).unwrap();
        assert_eq!(c.env_file, PathBuf::from("/dev/null"));
    }

    #[test]
    fn a_named_env_file_that_is_missing_is_an_error() {
        let flags = Flags {
            config: Some("/nonexistent/grapheon.env".into()),
            ..Flags::default()
        };
        assert!(matches!(load_with(flags, &[], None), Err(Error::Config(_))));
    }
}
