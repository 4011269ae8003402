//! Command-line flags, raw: every value is still text here; [`crate::config`] validates them
//! together with the environment and the env file.

use std::ffi::OsString;

use crate::error::{Error, Result};

/// Usage text printed by `--help`.
pub const HELP: &str = "\
grapheon-agent: the passive network agent of Graphēon

Reads this host's interface addresses, neighbour (ARP/NDP) table, routes and TCP/UDP sockets with
their owning processes, and reports them to a Graphēon server. One run does one check-in and exits;
a systemd timer (or cron) starts it. It never scans and only connects out to the server.

USAGE:
    grapheon-agent [OPTIONS]

ACTIONS (default: register if needed, then check in):
    --dry-run                 Collect and print the check-in body a run would send now (JSON, one line
                              per part) to stdout; no network, no state change, no root needed
    --status                  Print the local state: identity, enrollment, key present, last success,
                              sequence number, cached policy, when the next scheduled run is due,
                              the learned part size and server time, the backoff
    --set-api-key             Read an API key from standard input and store it (after an admin rotated it)
    --register-only           Register (or poll the approval) and stop
    --check-in-only           Check in with the stored API key; never register
    --force                   Check in now even if the policy interval has not passed or runs back off
                              after failures; no jitter sleep
    -h, --help                Print this help
    -V, --version             Print the version

OPTIONS (flag > environment variable > env file > default):
    --config FILE                         Env file [GRAPHEON_AGENT_CONFIG] (default /etc/grapheon-agent.env)
    --server-url URL                      http(s) base URL of the server [GRAPHEON_AGENT_SERVER_URL]
    --enrollment-key KEY                  Enrollment key [GRAPHEON_AGENT_ENROLLMENT_KEY]; prefer the env file,
                                          since command lines are visible to every user
    --state-dir DIR                       State directory [GRAPHEON_AGENT_STATE_DIR] (default /var/lib/grapheon-agent)
    --display-name NAME                   Name shown on the server [GRAPHEON_AGENT_DISPLAY_NAME]
    --site-name NAME                      Site of this host [GRAPHEON_AGENT_SITE_NAME]
    --hostname NAME                       Hostname to report [GRAPHEON_AGENT_HOSTNAME] (default: the kernel's)
    --request-timeout-seconds N           Timeout of each phase of an HTTP request (connect, send, the server's
                                          answer) [GRAPHEON_AGENT_REQUEST_TIMEOUT_SECONDS] (default 30)
    --timer-interval-seconds N            How often the timer starts the agent [GRAPHEON_AGENT_TIMER_INTERVAL_SECONDS] (default 900)
    --api-key-header NAME                 Header carrying the API key [GRAPHEON_AGENT_API_KEY_HEADER] (default X-Agent-Api-Key)
    --ca-file FILE                        PEM bundle to trust instead of the built-in web PKI roots [GRAPHEON_AGENT_CA_FILE]
    --insecure-skip-verify                Do not verify the server's certificate (testing only) [GRAPHEON_AGENT_INSECURE_SKIP_VERIFY]
    --log-level LEVEL                     error, warning, info or debug [GRAPHEON_AGENT_LOG_LEVEL] (default info)
    --collector MODE                      auto, native or commands [GRAPHEON_AGENT_COLLECTOR] (default auto)
    --proc-root DIR                       Root of every /proc read [GRAPHEON_AGENT_PROC_ROOT] (default /proc)
    --namespaces all|own                  Report the sockets of every network namespace (containers, pods) or
                                          only the agent's own [GRAPHEON_AGENT_NAMESPACES] (default all)
    --full-snapshot-interval-seconds N    Send a full snapshot again after N seconds; 0 never
                                          [GRAPHEON_AGENT_FULL_SNAPSHOT_INTERVAL_SECONDS] (default 86400)
Switches also read GRAPHEON_AGENT_<NAME> (e.g. GRAPHEON_AGENT_FORCE=true).

EXIT CODES:
    0  done: checked in, awaiting approval, skipped because the interval has not passed or runs back
       off after failures, or another run holds the lock
    1  a failure the next run may fix (network, no answer in time, server error 5xx/408/429, full
       disk); a part sent without an answer is not sent again in the same run
    2  usage or configuration error (fix the flags, the env file, the state directory, or trust the
       server's certificate with --ca-file)
    3  refused by the server; an operator must act (401 key rejected, 403 not approved or rejected,
       409 identity conflict, 422 report refused)

EXAMPLES:
    grapheon-agent --dry-run | head -c 2000
    grapheon-agent --server-url https://grapheon.example --state-dir /tmp/ga --register-only
    GRAPHEON_AGENT_SERVER_URL=https://grapheon.example grapheon-agent --force --log-level debug
    grapheon-agent --status
    printf '%s\\n' \"$NEW_KEY\" | grapheon-agent --set-api-key
";

/// The flags as given, values unchecked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Flags {
    pub help: bool,
    pub version: bool,
    pub dry_run: bool,
    pub status: bool,
    pub set_api_key: bool,
    pub register_only: bool,
    pub check_in_only: bool,
    pub force: bool,
    pub insecure_skip_verify: bool,
    pub config: Option<String>,
    pub server_url: Option<String>,
    pub enrollment_key: Option<String>,
    pub state_dir: Option<String>,
    pub display_name: Option<String>,
    pub site_name: Option<String>,
    pub hostname: Option<String>,
    pub request_timeout_seconds: Option<String>,
    pub timer_interval_seconds: Option<String>,
    pub api_key_header: Option<String>,
    pub ca_file: Option<String>,
    pub log_level: Option<String>,
    pub collector: Option<String>,
    pub proc_root: Option<String>,
    pub namespaces: Option<String>,
    pub full_snapshot_interval_seconds: Option<String>,
}

fn pico(e: pico_args::Error) -> Error {
    Error::Usage(e.to_string())
}

/// The flags that take a value.
const VALUE_FLAGS: [&str; 16] = [
    "--config",
    "--server-url",
    "--enrollment-key",
    "--state-dir",
    "--display-name",
    "--site-name",
    "--hostname",
    "--request-timeout-seconds",
    "--timer-interval-seconds",
    "--api-key-header",
    "--ca-file",
    "--log-level",
    "--collector",
    "--proc-root",
    "--namespaces",
    "--full-snapshot-interval-seconds",
];
/// The flags that take none, with their short forms.
const SWITCHES: [(&str, &str); 9] = [
    ("--help", "-h"),
    ("--version", "-V"),
    ("--dry-run", ""),
    ("--status", ""),
    ("--set-api-key", ""),
    ("--register-only", ""),
    ("--check-in-only", ""),
    ("--force", ""),
    ("--insecure-skip-verify", ""),
];

/// A flag given twice is a usage error naming it: which one would win is a guess either way,
/// and the parser would otherwise report the second as an unknown argument.
fn reject_repeats(args: &[OsString]) -> Result<()> {
    let mut seen: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].to_str().unwrap_or("");
        let (name, inline) = match arg.split_once('=') {
            Some((name, _)) => (name, true),
            None => (arg, false),
        };
        let flag = VALUE_FLAGS
            .iter()
            .find(|f| **f == name)
            .map(|f| (*f, !inline))
            .or_else(|| {
                SWITCHES
                    .iter()
                    .find(|(long, short)| !long.is_empty() && (*long == arg || *short == arg))
                    .map(|(long, _)| (*long, false))
            });
        if let Some((flag, takes_next)) = flag {
            if seen.contains(&flag) {
                return Err(Error::Usage(format!("{flag} is given more than once")));
            }
            seen.push(flag);
            if takes_next {
                i += 1;
            }
        }
        i += 1;
    }
    Ok(())
}

/// Parses the arguments (without the program name).
pub fn parse(args: Vec<OsString>) -> Result<Flags> {
    reject_repeats(&args)?;
    let mut a = pico_args::Arguments::from_vec(args);
    let mut value = |name: &'static str| -> Result<Option<String>> {
        a.opt_value_from_fn(name, |s: &str| -> std::result::Result<String, String> {
            if s.is_empty() {
                Err("an empty value".into())
            } else {
                Ok(s.to_string())
            }
        })
        .map_err(pico)
    };
    let mut f = Flags {
        config: value("--config")?,
        server_url: value("--server-url")?,
        enrollment_key: value("--enrollment-key")?,
        state_dir: value("--state-dir")?,
        display_name: value("--display-name")?,
        site_name: value("--site-name")?,
        hostname: value("--hostname")?,
        request_timeout_seconds: value("--request-timeout-seconds")?,
        timer_interval_seconds: value("--timer-interval-seconds")?,
        api_key_header: value("--api-key-header")?,
        ca_file: value("--ca-file")?,
        log_level: value("--log-level")?,
        collector: value("--collector")?,
        proc_root: value("--proc-root")?,
        namespaces: value("--namespaces")?,
        full_snapshot_interval_seconds: value("--full-snapshot-interval-seconds")?,
        ..Flags::default()
    };
    f.help = a.contains(["-h", "--help"]);
    f.version = a.contains(["-V", "--version"]);
    f.dry_run = a.contains("--dry-run");
    f.status = a.contains("--status");
    f.set_api_key = a.contains("--set-api-key");
    f.register_only = a.contains("--register-only");
    f.check_in_only = a.contains("--check-in-only");
    f.force = a.contains("--force");
    f.insecure_skip_verify = a.contains("--insecure-skip-verify");
    let rest = a.finish();
    if let Some(first) = rest.first() {
        return Err(Error::Usage(format!(
            "unknown argument '{}'",
            first.to_string_lossy()
        )));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_flag_is_known_to_the_repeat_check() {
        // The flags --help documents (up to the examples), as the check's lists must hold them.
        let documented: std::collections::BTreeSet<&str> = HELP[..HELP.find("EXAMPLES:").unwrap()]
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .collect();
        let listed: std::collections::BTreeSet<&str> = VALUE_FLAGS
            .iter()
            .copied()
            .chain(SWITCHES.iter().map(|(long, _)| *long))
            .collect();
        assert_eq!(documented, listed);
        // And each is what parse takes: a value flag with its value, a switch alone.
        let mut outcomes = Vec::new();
        for flag in VALUE_FLAGS {
            outcomes.push((flag, args(&[flag, "x"]).is_ok()));
            outcomes.push((flag, args(&[flag, "x", flag, "y"]).is_err()));
        }
        for (long, short) in SWITCHES {
            outcomes.push((long, args(&[long]).is_ok()));
            outcomes.push((long, args(&[long, long]).is_err()));
            if !short.is_empty() {
                outcomes.push((short, args(&[short, long]).is_err()));
            }
        }
        let failing: Vec<_> = outcomes.iter().filter(|(_, ok)| !ok).collect();
        assert_eq!(failing, Vec::<&(&str, bool)>::new());
    }

    fn args(list: &[&str]) -> Result<Flags> {
        parse(list.iter().map(OsString::from).collect())
    }

    #[test]
    fn values_take_both_spellings() {
        let f = args(&[
            "--server-url=https://a.example",
            "--state-dir",
            "/tmp/x",
            "--force",
        ])
        .unwrap();
        assert_eq!(
            f,
            Flags {
                server_url: Some("https://a.example".into()),
                state_dir: Some("/tmp/x".into()),
                force: true,
                ..Flags::default()
            }
        );
    }

    #[test]
    fn unknown_flags_and_missing_values_are_usage_errors() {
        for bad in [
            &["--bogus"][..],
            &["--server-url"],
            &["--state-dir="],
            &["positional"],
        ] {
            let err = args(bad).unwrap_err();
            assert!(matches!(err, Error::Usage(_)), "{bad:?}: {err}");
            assert_eq!(err.exit_code(), 2);
        }
        let err = args(&["--bogus"]).unwrap_err().to_string();
        assert!(err.contains("--bogus"), "{err}");
    }

    #[test]
    fn a_repeated_flag_is_named_as_repeated() {
        let cases: [&[&str]; 5] = [
            &["--server-url", "https://a", "--server-url=https://b"],
            &["--force", "--dry-run", "--force"],
            &["-h", "--help"],
            &["--state-dir=/a", "--state-dir", "/b"],
            &["--hostname", "--force", "--hostname", "x"],
        ];
        let messages: Vec<String> = cases
            .iter()
            .map(|c| args(c).unwrap_err().to_string())
            .collect();
        assert_eq!(
            messages,
            [
                "--server-url is given more than once (see --help)",
                "--force is given more than once (see --help)",
                "--help is given more than once (see --help)",
                "--state-dir is given more than once (see --help)",
                "--hostname is given more than once (see --help)",
            ]
        );
        // A value that looks like a flag is still a value.
        assert_eq!(
            args(&["--display-name", "--force", "--force"])
                .unwrap()
                .display_name
                .as_deref(),
            Some("--force")
        );
    }

    #[test]
    fn help_lists_every_flag() {
        for flag in [
            "--config",
            "--state-dir",
            "--server-url",
            "--enrollment-key",
            "--display-name",
            "--site-name",
            "--hostname",
            "--request-timeout-seconds",
            "--timer-interval-seconds",
            "--api-key-header",
            "--ca-file",
            "--insecure-skip-verify",
            "--register-only",
            "--check-in-only",
            "--force",
            "--log-level",
            "--dry-run",
            "--status",
            "--set-api-key",
            "--collector",
            "--proc-root",
            "--namespaces",
            "--full-snapshot-interval-seconds",
            "--version",
            "--help",
        ] {
            assert!(HELP.contains(flag), "{flag}");
        }
    }
}
