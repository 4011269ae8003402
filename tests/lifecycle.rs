//! The whole register → approve → check-in lifecycle, run with the real binary against the
//! contract test server.

mod support;

use support::agent::assert_code;

use std::fs;
use std::time::{Duration, Instant};

use support::agent::{server, Agent, TempDir, ENROLLMENT_KEY};
use support::json::{bool_at, get, len_at, str_at, u64_at};
use support::{Endpoint, Fault, API_KEY_HEADER};

/// Total records in a check-in body.
fn records(body: &miniserde::json::Value) -> u64 {
    ["addresses", "neighbors", "connections", "routes"]
        .iter()
        .map(|t| len_at(body, t).unwrap() as u64)
        .sum()
}

#[test]
fn pending_then_approved_then_full_snapshot_then_delta() {
    let srv = server(false);
    let agent = Agent::new("lifecycle", &srv.url());

    let run = agent.run(&[]);
    assert_code(&run, 0);
    assert!(run.stderr.contains("awaiting approval"), "{}", run.stderr);
    assert!(agent.file("api_key").is_none());
    assert_eq!(str_at(&agent.state(), "enrollment_state"), Some("pending"));
    assert!(u64_at(&agent.state(), "agent_id").is_some());
    assert_eq!(Agent::mode(&agent.state_dir), 0o700);
    for f in ["agent_uuid", "state.json"] {
        assert_eq!(Agent::mode(&agent.state_dir.join(f)), 0o600, "{f}");
    }

    // Still pending: the next run polls again and sends no check-in.
    assert_code(&agent.run(&[]), 0);
    assert_eq!(srv.registrations(), 2);
    assert!(srv.checkins().is_empty());

    srv.approve(&agent.uuid());
    let run = agent.run(&[]);
    assert_code(&run, 0);
    let key = agent
        .file("api_key")
        .expect("key stored")
        .trim()
        .to_string();
    assert_eq!(Agent::mode(&agent.state_dir.join("api_key")), 0o600);
    let checkins = srv.checkins();
    assert_eq!(
        checkins.len(),
        1,
        "the approved run checks in within the same run"
    );
    let first = &checkins[0];
    assert_eq!(first.header(API_KEY_HEADER), Some(key.as_str()));
    assert_eq!(first.header("Content-Encoding"), Some("gzip"));
    assert_eq!(
        first.header("User-Agent"),
        Some(concat!("grapheon-agent/", include_str!("../VERSION")).trim())
    );
    assert_eq!(bool_at(&first.json, "full_snapshot"), Some(true));
    assert_eq!(u64_at(&first.json, "sequence_number"), Some(1));
    assert_eq!(
        str_at(&first.json, "agent_uuid"),
        Some(agent.uuid().as_str())
    );
    assert!(str_at(&first.json, "observed_at").unwrap().ends_with('Z'));
    assert_eq!(u64_at(&agent.state(), "sequence_number"), Some(1));
    assert_eq!(str_at(&agent.state(), "enrollment_state"), Some("active"));
    assert!(!run.stderr.contains(&key), "the key must never be logged");

    // The key is issued once: the next run checks in with it and does not register.
    let run = agent.run(&["--force"]);
    assert_code(&run, 0);
    let checkins = srv.checkins();
    assert_eq!(checkins.len(), 2);
    let second = &checkins[1];
    assert_eq!(bool_at(&second.json, "full_snapshot"), Some(false));
    assert_eq!(u64_at(&second.json, "sequence_number"), Some(2));
    assert_eq!(srv.registrations(), 3);
    // The delta carries no record the first report already had.
    let sent_before = support::json::to_string(&first.json);
    for table in ["addresses", "neighbors", "connections", "routes"] {
        if let Some(miniserde::json::Value::Array(items)) = get(&second.json, table) {
            for item in items {
                assert!(
                    !sent_before.contains(&support::json::to_string(item)),
                    "{table} record re-sent"
                );
            }
        }
    }
    assert_eq!(u64_at(&agent.state(), "sequence_number"), Some(2));
    assert!(str_at(&agent.state(), "last_successful_checkin_at").is_some());
}

#[test]
fn cadence_skips_scheduled_runs_until_the_policy_interval_passes() {
    let srv = server(true);
    srv.set_policy(Some(r#"{"checkin_interval_seconds":3600,"jitter_seconds":0,"command_timeout_seconds":15,
        "enabled_commands":{"ip_addr":true,"ip_neigh":true,"ip_route":true,"ss_tunap":true},"max_report_bytes":262144,"is_active":true}"#));
    let agent = Agent::new("cadence", &srv.url());
    assert_code(&agent.run(&[]), 0);
    assert_eq!(srv.checkins().len(), 1);
    let run = agent.run(&[]);
    assert_code(&run, 0);
    assert!(run.stderr.contains("next one due at"), "{}", run.stderr);
    assert_eq!(
        srv.checkins().len(),
        1,
        "a scheduled run inside the interval sends nothing"
    );
    assert_code(&agent.run(&["--force"]), 0);
    assert_code(&agent.run(&["--check-in-only"]), 0);
    assert_eq!(srv.checkins().len(), 3);
    // A timer that is not faster than the policy interval never skips.
    let mut slow_timer = agent;
    slow_timer.set_env("GRAPHEON_AGENT_TIMER_INTERVAL_SECONDS", "3600");
    assert_code(&slow_timer.run(&[]), 0);
    assert_eq!(srv.checkins().len(), 4);
}

#[test]
fn rotated_key_exits_3_until_the_new_key_is_installed() {
    let srv = server(true);
    let agent = Agent::new("rotate", &srv.url());
    assert_code(&agent.run(&["--force"]), 0);
    let new_key = srv.rotate_api_key(&agent.uuid());

    let run = agent.run(&["--force"]);
    assert_code(&run, 3);
    assert!(
        run.stderr.contains("401") && run.stderr.contains("--set-api-key"),
        "{}",
        run.stderr
    );
    assert_eq!(
        u64_at(&agent.state(), "sequence_number"),
        Some(1),
        "nothing advanced"
    );

    let bad = agent.run_with_stdin(&["--set-api-key"], "not a key\n");
    assert_code(&bad, 2);
    let set = agent.run_with_stdin(&["--set-api-key"], &format!("{new_key}\n"));
    assert_code(&set, 0);
    assert!(
        !set.stderr.contains(&new_key),
        "the key must never be logged: {}",
        set.stderr
    );
    assert_eq!(agent.file("api_key").unwrap().trim(), new_key);
    assert_eq!(Agent::mode(&agent.state_dir.join("api_key")), 0o600);

    assert_code(&agent.run(&["--force"]), 0);
    let last = srv.checkins().pop().unwrap();
    assert_eq!(last.header(API_KEY_HEADER), Some(new_key.as_str()));
    assert_eq!(u64_at(&last.json, "sequence_number"), Some(2));
}

#[test]
fn lost_key_after_approval_tells_the_operator_to_rotate_it() {
    let srv = server(true);
    let agent = Agent::new("lostkey", &srv.url());
    assert_code(&agent.run(&["--force"]), 0);
    fs::remove_file(agent.state_dir.join("api_key")).unwrap();
    let run = agent.run(&["--force"]);
    assert_code(&run, 3);
    assert!(
        run.stderr.contains("rotate") && run.stderr.contains("--set-api-key"),
        "{}",
        run.stderr
    );
}

#[test]
fn rejected_agent_exits_3() {
    let srv = server(false);
    let agent = Agent::new("rejected", &srv.url());
    assert_code(&agent.run(&[]), 0);
    srv.reject(&agent.uuid());
    let run = agent.run(&[]);
    assert_code(&run, 3);
    assert!(
        run.stderr.contains("403") && run.stderr.contains("rejected"),
        "{}",
        run.stderr
    );
}

#[test]
fn earlier_agent_state_directory_keeps_identity_sequence_and_delta_base() {
    let srv = server(false);
    let agent = Agent::new("migrate", &srv.url());
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/state/python-agent"
    );
    fs::create_dir_all(&agent.state_dir).unwrap();
    for f in ["agent_uuid", "state.json"] {
        fs::copy(format!("{fixture}/{f}"), agent.state_dir.join(f)).unwrap();
    }
    let uuid = agent.uuid();
    // The server knows this agent and its key, as it knew the earlier agent.
    let key = srv.add_active_agent(&uuid, ENROLLMENT_KEY);
    fs::write(agent.state_dir.join("api_key"), format!("{key}\n")).unwrap();

    let run = agent.run(&["--force"]);
    assert_code(&run, 0);
    assert_eq!(srv.registrations(), 0, "no re-enrolment");
    let checkin = srv.checkins().pop().unwrap();
    assert_eq!(str_at(&checkin.json, "agent_uuid"), Some(uuid.as_str()));
    assert_eq!(
        u64_at(&checkin.json, "sequence_number"),
        Some(3),
        "continues after the earlier agent's 2"
    );
    assert_eq!(
        bool_at(&checkin.json, "full_snapshot"),
        Some(false),
        "the earlier snapshot is the delta base"
    );
    assert_eq!(agent.uuid(), uuid);
    assert_eq!(u64_at(&agent.state(), "sequence_number"), Some(3));
}

#[test]
fn corrupt_state_is_moved_aside_and_a_full_snapshot_follows() {
    let srv = server(true);
    let agent = Agent::new("corrupt", &srv.url());
    assert_code(&agent.run(&["--force"]), 0);
    let uuid = agent.uuid();
    fs::write(
        agent.state_dir.join("state.json"),
        "{\"sequence_number\": 7, \"last_snap",
    )
    .unwrap();
    let run = agent.run(&["--force"]);
    assert_code(&run, 0);
    assert!(run.stderr.contains("corrupt"), "{}", run.stderr);
    let aside = fs::read_dir(&agent.state_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        })
        .count();
    assert_eq!(aside, 1);
    let last = srv.checkins().pop().unwrap();
    assert_eq!(bool_at(&last.json, "full_snapshot"), Some(true));
    assert_eq!(agent.uuid(), uuid, "identity kept");
    assert_eq!(srv.registrations(), 1, "key kept: no registration");
}

#[test]
fn server_errors_exit_1_change_nothing_and_the_next_run_resends() {
    let srv = server(true);
    let agent = Agent::new("fail500", &srv.url());
    assert_code(&agent.run(&["--register-only"]), 0);
    assert!(agent.file("api_key").is_some());
    let state_before = agent.file("state.json").unwrap();

    // Every attempt of the run fails (the agent makes four).
    srv.inject(
        Endpoint::CheckIn,
        Fault::status(500, "Internal Server Error"),
        4,
    );
    let run = agent.run(&["--force"]);
    assert_code(&run, 1);
    assert!(run.stderr.contains("500"), "{}", run.stderr);
    assert_eq!(
        agent.file("state.json").unwrap(),
        state_before,
        "state unchanged"
    );
    assert!(srv.checkins().is_empty());
    assert_eq!(
        srv.requests_to(Endpoint::CheckIn).len(),
        4,
        "retried a few times, then gave up"
    );

    let run = agent.run(&["--force"]);
    assert_code(&run, 0);
    let accepted = srv.checkins();
    assert_eq!(accepted.len(), 1);
    assert_eq!(
        bool_at(&accepted[0].json, "full_snapshot"),
        Some(true),
        "the failed full snapshot is re-sent"
    );
    assert_eq!(u64_at(&accepted[0].json, "sequence_number"), Some(1));
}

#[test]
fn server_down_exits_1_without_touching_state() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let agent = Agent::new("down", &format!("http://127.0.0.1:{port}"));
    let started = Instant::now();
    let run = agent.run(&["--force"]);
    assert_code(&run, 1);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "bounded by the retry deadline"
    );
    assert!(agent.file("api_key").is_none());
    assert!(agent.file("state.json").is_none());
}

#[test]
fn concurrent_runs_never_both_write() {
    let srv = server(true);
    let agent = Agent::new("concurrent", &srv.url());
    assert_code(&agent.run(&["--register-only"]), 0);
    // The first run's check-in is slow, so the second one meets the lock.
    srv.inject(Endpoint::CheckIn, Fault::Slow(Duration::from_secs(3)), 1);
    let first = agent
        .command(&["--force"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    srv.wait_for_requests(2, Duration::from_secs(10));
    let second = agent.run(&["--force"]);
    let first: support::agent::Run = first.wait_with_output().unwrap().into();
    assert_code(&first, 0);
    assert_code(&second, 0);
    let seqs: Vec<u64> = srv
        .checkins()
        .iter()
        .map(|c| u64_at(&c.json, "sequence_number").unwrap())
        .collect();
    assert_eq!(
        seqs,
        [1, 2],
        "the second run waited for the first and continued from its state"
    );
    assert_eq!(u64_at(&agent.state(), "sequence_number"), Some(2));
}

#[test]
fn a_run_that_cannot_get_the_lock_exits_0_and_writes_nothing() {
    let srv = server(true);
    let mut agent = Agent::new("locked", &srv.url());
    agent.set_env("GRAPHEON_AGENT_REQUEST_TIMEOUT_SECONDS", "30");
    assert_code(&agent.run(&["--register-only"]), 0);
    srv.inject(Endpoint::CheckIn, Fault::Slow(Duration::from_secs(13)), 1);
    let first = agent
        .command(&["--force"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the first run's check-in is in flight (it holds the lock until answered).
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.requests_to(Endpoint::CheckIn).is_empty() {
        assert!(Instant::now() < deadline, "the first run never checked in");
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = agent.run(&["--force"]);
    assert_code(&second, 0);
    assert!(
        second.stderr.contains("another run holds the lock"),
        "{}",
        second.stderr
    );
    let first: support::agent::Run = first.wait_with_output().unwrap().into();
    assert_code(&first, 0);
    assert_eq!(srv.checkins().len(), 1);
}

#[test]
fn dry_run_needs_no_server_no_root_and_changes_nothing() {
    let root = TempDir::new("dryrun");
    let mut agent = Agent::new("dryrun", "http://127.0.0.1:9");
    agent
        .env
        .retain(|(k, _)| k != "GRAPHEON_AGENT_SERVER_URL" && k != "GRAPHEON_AGENT_ENROLLMENT_KEY");
    agent.set_env(
        "GRAPHEON_AGENT_STATE_DIR",
        &root.0.join("absent").display().to_string(),
    );
    let run = agent.run(&["--dry-run"]);
    assert_code(&run, 0);
    assert!(
        !root.0.join("absent").exists(),
        "no state directory created"
    );
    let body = support::json::parse(run.stdout.lines().next().expect("one body per line"));
    assert_eq!(bool_at(&body, "full_snapshot"), Some(true));
    assert_eq!(u64_at(&body, "sequence_number"), Some(1));
    assert_eq!(str_at(&body, "platform"), Some("linux"));
    assert!(records(&body) < 1_000_000);
    assert!(
        !run.stderr.contains('{'),
        "logs stay on stderr, the body on stdout"
    );
}

#[test]
fn dry_run_shows_the_delta_against_the_saved_state() {
    let srv = server(true);
    let agent = Agent::new("drydelta", &srv.url());
    assert_code(&agent.run(&["--force"]), 0);
    let before = agent.file("state.json").unwrap();
    let run = agent.run(&["--dry-run"]);
    assert_code(&run, 0);
    let body = support::json::parse(run.stdout.lines().next().unwrap());
    assert_eq!(bool_at(&body, "full_snapshot"), Some(false));
    assert_eq!(u64_at(&body, "sequence_number"), Some(2));
    assert_eq!(str_at(&body, "agent_uuid"), Some(agent.uuid().as_str()));
    assert_eq!(agent.file("state.json").unwrap(), before);
    assert_eq!(srv.checkins().len(), 1, "a dry run sends nothing");
}

#[test]
fn usage_and_configuration_errors_exit_2_naming_the_cause() {
    let agent = Agent::new("usage", "http://127.0.0.1:9");
    for (args, needle) in [
        (&["--bogus"][..], "--bogus"),
        (
            &["--register-only", "--check-in-only"],
            "cannot be used together",
        ),
        (
            &["--request-timeout-seconds", "abc"],
            "--request-timeout-seconds",
        ),
        (&["--server-url=ftp://x"], "--server-url"),
        (&["--check-in-only"], "no API key"),
    ] {
        let run = agent.run(args);
        assert_code(&run, 2);
        assert!(run.stderr.contains(needle), "{args:?}: {}", run.stderr);
    }
    let mut no_url = Agent::new("nourl", "http://127.0.0.1:9");
    no_url.env.retain(|(k, _)| k != "GRAPHEON_AGENT_SERVER_URL");
    let run = no_url.run(&[]);
    assert_code(&run, 2);
    assert!(
        run.stderr.contains("GRAPHEON_AGENT_SERVER_URL"),
        "{}",
        run.stderr
    );
}

#[test]
fn help_and_version() {
    let agent = Agent::new("help", "http://127.0.0.1:9");
    let help = agent.run(&["--help"]);
    assert_code(&help, 0);
    assert!(
        help.stdout.starts_with("grapheon-agent")
            && help.stdout.contains("USAGE")
            && help.stdout.contains("EXAMPLES")
    );
    assert!(help.stdout.contains("EXIT CODES"));
    let version = agent.run(&["--version"]);
    assert_code(&version, 0);
    assert_eq!(version.stdout, include_str!("../VERSION"));
}

#[test]
fn env_file_settings_apply_and_the_environment_wins() {
    let srv = server(true);
    let mut agent = Agent::new("envfile", &srv.url());
    let file = agent.root.0.join("agent.env");
    fs::write(
        &file,
        format!(
            "# written by the installer\nGRAPHEON_AGENT_SERVER_URL=\"{}\"\nGRAPHEON_AGENT_HOSTNAME=from-file\nGRAPHEON_AGENT_ENROLLMENT_KEY='{ENROLLMENT_KEY}'\n",
            srv.url()
        ),
    )
    .unwrap();
    agent
        .env
        .retain(|(k, _)| k != "GRAPHEON_AGENT_SERVER_URL" && k != "GRAPHEON_AGENT_ENROLLMENT_KEY");
    agent.set_env("GRAPHEON_AGENT_CONFIG", &file.display().to_string());
    assert_code(&agent.run(&["--force"]), 0);
    assert_eq!(
        str_at(&srv.checkins()[0].json, "hostname"),
        Some("from-file")
    );
    agent.set_env("GRAPHEON_AGENT_HOSTNAME", "from-env");
    assert_code(&agent.run(&["--force"]), 0);
    assert_eq!(
        str_at(&srv.checkins()[1].json, "hostname"),
        Some("from-env")
    );
    assert_code(&agent.run(&["--force", "--hostname", "from-flag"]), 0);
    assert_eq!(
        str_at(&srv.checkins()[2].json, "hostname"),
        Some("from-flag")
    );
}

#[test]
fn status_reports_the_local_state_without_the_key() {
    let srv = server(true);
    let agent = Agent::new("status", &srv.url());
    assert_code(&agent.run(&["--force"]), 0);
    let run = agent.run(&["--status"]);
    assert_code(&run, 0);
    let key = agent.file("api_key").unwrap().trim().to_string();
    assert!(!run.stdout.contains(&key));
    for needle in [
        agent.uuid().as_str(),
        "enrollment state",
        "active",
        "present",
        "sequence number",
        "1",
        "checkin_interval_seconds",
        "next check-in",
    ] {
        assert!(run.stdout.contains(needle), "{needle}: {}", run.stdout);
    }
}

#[test]
fn unusable_ca_file_is_a_configuration_error() {
    let srv = server(true);
    let mut agent = Agent::new("cafile", &srv.url());
    let ca = agent.root.0.join("ca.pem");
    fs::write(&ca, "not a certificate\n").unwrap();
    agent.set_env("GRAPHEON_AGENT_CA_FILE", &ca.display().to_string());
    let run = agent.run(&["--force"]);
    assert_code(&run, 2);
    assert!(run.stderr.contains("no PEM certificate"), "{}", run.stderr);
}

fn policy_with(jitter: u32, enabled: &str) -> String {
    format!(
        r#"{{"checkin_interval_seconds":60,"jitter_seconds":{jitter},"command_timeout_seconds":15,
        "enabled_commands":{enabled},"max_report_bytes":262144,"is_active":true}}"#
    )
}

#[test]
fn jitter_sleeps_only_on_scheduled_runs() {
    let srv = server(true);
    srv.set_policy(Some(&policy_with(
        3600,
        r#"{"ip_addr":true,"ip_neigh":true,"ip_route":true,"ss_tunap":true}"#,
    )));
    let agent = Agent::new("jitter", &srv.url());
    let started = Instant::now();
    assert_code(&agent.run(&["--register-only"]), 0);
    assert_code(&agent.run(&["--force"]), 0);
    assert_code(&agent.run(&["--check-in-only"]), 0);
    assert_code(&agent.run(&["--dry-run"]), 0);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "none of these slept"
    );
    assert_eq!(srv.checkins().len(), 2);

    // A scheduled run sleeps a random part of the policy's jitter before collecting. A draw of
    // 0 s (1 in 421) says nothing and checks in at once; the next scheduled run draws again.
    let mut attempts = 0;
    let (text, still_running, before) = loop {
        attempts += 1;
        let before = srv.checkins().len();
        let mut child = agent
            .command(&[])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });
        std::thread::sleep(Duration::from_secs(2));
        let still_running = child.try_wait().unwrap().is_none();
        child.kill().unwrap();
        child.wait().unwrap();
        let text = reader.join().unwrap();
        if text.contains("waiting ") || attempts == 3 {
            break (text, still_running, before);
        }
    };
    let waited: u64 = text
        .split("waiting ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no jitter line: {text}"));
    assert!(waited <= 3600);
    // (A draw under 3 s of 3,600 may legitimately have finished sleeping already.)
    assert!(
        still_running || waited < 3,
        "the scheduled run was sleeping"
    );
    if waited >= 3 {
        assert_eq!(srv.checkins().len(), before, "nothing sent while sleeping");
    }
}

#[test]
fn tables_switched_off_by_the_policy_are_not_collected() {
    let srv = server(true);
    srv.set_policy(Some(&policy_with(
        0,
        r#"{"ip_addr":true,"ip_neigh":false,"ip_route":false,"ss_tunap":false}"#,
    )));
    let agent = Agent::new("tables", &srv.url());
    assert_code(&agent.run(&["--force"]), 0);
    let body = &srv.checkins()[0].json;
    assert!(
        len_at(body, "addresses").unwrap() > 0,
        "this host has at least one non-loopback address"
    );
    for off in ["neighbors", "routes", "connections"] {
        assert_eq!(len_at(body, off), Some(0), "{off}");
    }
}
