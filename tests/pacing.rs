//! Never hurt the server: a part that got no answer is not sent again in the run, parts are
//! sized by the server's own time, retries wait as the server asks, and failed runs back off.
//! Tests with many sockets build their own network namespace (root) with the contract server
//! inside it; the others use the contract server on 127.0.0.1.

mod support;

use support::agent::assert_code;

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use grapheon_agent::timefmt;
use miniserde::json::Value;
use support::agent::{server, Agent, Run, ENROLLMENT_KEY};
use support::json::{get, is_null, str_at, u64_at};
use support::netns::Netns;
use support::{record_count, ContractServer, Endpoint, EnrollmentKey, Fault, RecordedRequest};

fn policy(max_report_bytes: u64, interval: u64) -> String {
    format!(
        r#"{{"checkin_interval_seconds":{interval},"jitter_seconds":0,"command_timeout_seconds":15,
        "enabled_commands":{{"ip_addr":true,"ip_neigh":true,"ip_route":true,"ss_tunap":true}},
        "max_report_bytes":{max_report_bytes},"is_active":true}}"#
    )
}

/// A namespace holding `pairs` loopback TCP connections, with the contract server on its
/// loopback and an auto-approving enrollment key.
struct Host {
    ns: Netns,
    srv: ContractServer,
    _held: Vec<TcpStream>,
}

impl Host {
    fn new(tag: &str, pairs: usize) -> Host {
        let ns = Netns::new(tag);
        let srv = ns.enter(ContractServer::start);
        srv.add_enrollment_key(ENROLLMENT_KEY, EnrollmentKey::auto_approve());
        let held = ns.loopback_pairs(pairs);
        Host {
            ns,
            srv,
            _held: held,
        }
    }

    fn agent(&self, tag: &str, timeout_seconds: u64) -> Agent {
        let mut agent = Agent::new(tag, &self.srv.url());
        agent.set_env(
            "GRAPHEON_AGENT_REQUEST_TIMEOUT_SECONDS",
            &timeout_seconds.to_string(),
        );
        agent.set_env("GRAPHEON_AGENT_COLLECTOR", "native");
        agent
    }

    fn run(&self, agent: &Agent, args: &[&str]) -> Run {
        agent.run_in(&self.ns.name, args)
    }
}

/// The decoded text of a recorded check-in request.
fn decoded_text(r: &RecordedRequest) -> String {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(&r.body[..])
        .read_to_string(&mut text)
        .expect("a gzip body");
    text
}

/// The decoded JSON body of a recorded check-in request.
fn decoded(r: &RecordedRequest) -> Value {
    miniserde::json::from_str(&decoded_text(r)).expect("a JSON body")
}

/// The established loopback connections of accepted check-ins, as `port>port` keys.
fn established(checkins: &[support::AcceptedCheckin]) -> Vec<String> {
    let mut keys = Vec::new();
    for c in checkins {
        let Some(Value::Array(conns)) = get(&c.json, "connections") else {
            continue;
        };
        for conn in conns {
            if str_at(conn, "state") == Some("established") {
                keys.push(format!(
                    "{}>{}",
                    u64_at(conn, "local_port").unwrap(),
                    u64_at(conn, "remote_port").unwrap()
                ));
            }
        }
    }
    keys
}

fn pacing(agent: &Agent) -> Value {
    miniserde::json::from_str(&agent.pacing_record().expect("a saved pace"))
        .expect("the saved pace is JSON")
}

/// Rewrites the time at `path` in the saved pace to `at`, as if the time between had passed:
/// holds last two minutes, which the tests do not wait out.
fn pass_time(agent: &Agent, path: &str, at: i64) {
    let text = agent.pacing_record().expect("a saved pace");
    let p: Value = miniserde::json::from_str(&text).expect("the saved pace is JSON");
    let saved = str_at(&p, path).unwrap_or_else(|| panic!("no {path} in {text}"));
    agent.set_pacing_record(&text.replace(
        &format!("\"{saved}\""),
        &format!("\"{}\"", timefmt::format_utc(at)),
    ));
}

/// Year, month and day of days since 1970-01-01.
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` for epoch seconds.
fn http_date(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let (y, m, d) = civil(days);
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(m - 1) as usize];
    format!(
        "{weekday}, {d:02} {month} {y} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[test]
fn a_part_without_an_answer_is_not_sent_again_in_the_run_and_the_next_run_sends_it_smaller() {
    let host = Host::new("indoubt", 300);
    let agent = host.agent("indoubt", 2);
    assert_code(&host.run(&agent, &["--register-only"]), 0);
    // 8 ms per record: the first 64 KiB part (about 380 records) takes the server 3 s, more
    // than the agent's 2 s timeout. The server stores it all the same.
    let per_record = Duration::from_millis(8);
    host.srv.set_ingest_time(per_record);

    let run = host.run(&agent, &["--force"]);
    assert_code(&run, 1);
    assert!(
        run.stderr.contains("not sent again in this run"),
        "{}",
        run.stderr
    );
    let first = host.srv.requests_to(Endpoint::CheckIn);
    assert_eq!(first.len(), 1, "the unanswered part was sent once");
    host.srv.wait_for_requests(2, Duration::from_secs(10));
    assert_eq!(host.srv.checkins().len(), 1, "the server stored it anyway");
    assert_eq!(u64_at(&agent.state(), "sequence_number"), Some(0));
    let p = pacing(&agent);
    assert_eq!(u64_at(&p, "failures"), Some(1));
    assert!(!is_null(&p, "unanswered"), "{p:?}");
    assert!(is_null(&p, "in_flight"));
    let first_records = record_count(&decoded(&first[0]));
    // However short the timeout, the hold lasts two minutes: a loaded server takes one over a
    // part. The test shortens what is left of it to a few seconds, as if they had passed.
    let sent_at = timefmt::parse(str_at(&p, "unanswered.at").unwrap()).unwrap();
    let hold = timefmt::parse(str_at(&p, "hold_until").unwrap()).unwrap();
    assert_eq!(hold - sent_at, 121, "{p:?}");
    let until = timefmt::now() + 6;
    pass_time(&agent, "hold_until", until);

    // The next run (forced: it does not wait for the backoff) waits out the hold, then sends
    // smaller parts, each within the timeout.
    let started = Instant::now();
    let run = host.run(&agent, &["--force"]);
    assert_code(&run, 0);
    assert!(run.stderr.contains("waiting"), "{}", run.stderr);
    let all = host.srv.requests_to(Endpoint::CheckIn);
    let second = &all[1..];
    assert!(second.len() > 2, "{} parts", second.len());
    assert!(
        timefmt::now() >= until && started.elapsed() >= Duration::from_secs(4),
        "nothing was sent before the hold ended"
    );
    for r in second {
        let records = record_count(&decoded(r));
        assert!(records < first_records / 2, "{records} of {first_records}");
        assert!(
            per_record * (records as u32) < Duration::from_secs(2),
            "{records} records take the server longer than the timeout"
        );
        assert_eq!(r.status, Some(200));
    }
    assert_eq!(host.srv.most_copies_of_one_body(Endpoint::CheckIn), 1);
    let delivered: BTreeSet<String> = established(&host.srv.checkins()).into_iter().collect();
    assert_eq!(delivered.len(), 600, "every connection reached the server");
    let p = pacing(&agent);
    assert_eq!(u64_at(&p, "failures"), Some(0));
    assert!(is_null(&p, "unanswered") && is_null(&p, "hold_until"));
    assert!(started.elapsed() < Duration::from_secs(40));
}

#[test]
fn resets_and_closes_after_the_body_are_not_sent_again_in_the_run() {
    let srv = server(true);
    let mut agent = Agent::new("inflight", &srv.url());
    agent.set_env("GRAPHEON_AGENT_REQUEST_TIMEOUT_SECONDS", "1");
    assert_code(&agent.run(&["--register-only"]), 0);
    for (n, fault) in [
        Fault::Reset,
        Fault::Close,
        Fault::AcceptThenDelay(Duration::from_secs(3)),
    ]
    .into_iter()
    .enumerate()
    {
        srv.inject(Endpoint::CheckIn, fault.clone(), 1);
        let run = agent.run(&["--force"]);
        assert_code(&run, 1);
        assert_eq!(
            srv.requests_to(Endpoint::CheckIn).len(),
            n + 1,
            "{fault:?} is not retried"
        );
        assert!(run.stderr.contains("not sent again"), "{}", run.stderr);
        pass_time(&agent, "hold_until", timefmt::now());
    }
    // The server stored the last one before answering late; the next run sends it again
    // (in as many parts as this host's sockets need), numbered from 1 as nothing advanced.
    let run = agent.run(&["--force"]);
    assert_code(&run, 0);
    let stored = srv.checkins();
    assert_eq!(u64_at(&stored[0].json, "sequence_number"), Some(1));
    assert_eq!(u64_at(&stored[1].json, "sequence_number"), Some(1));
    assert_eq!(
        u64_at(&agent.state(), "sequence_number"),
        Some(stored.len() as u64 - 1)
    );
    assert_eq!(u64_at(&pacing(&agent), "failures"), Some(0));
}

#[test]
fn a_slow_server_is_worked_through_in_parts_that_each_finish_in_time() {
    let host = Host::new("slowpace", 800);
    let agent = host.agent("slowpace", 2);
    assert_code(&host.run(&agent, &["--register-only"]), 0);
    // 3 ms per record: a 256 KiB part (about 1,500 records) would take 4.5 s, over twice the
    // timeout; the agent aims at a third of it.
    let per_record = Duration::from_millis(3);
    host.srv.set_ingest_time(per_record);
    let run = host.run(&agent, &["--force"]);
    assert_code(&run, 0);
    let requests = host.srv.requests_to(Endpoint::CheckIn);
    assert!(requests.len() >= 4, "{} parts", requests.len());
    for (i, r) in requests.iter().enumerate() {
        assert_eq!(r.status, Some(200), "part {i}");
        let server_time = per_record * record_count(&decoded(r)) as u32;
        assert!(
            server_time < Duration::from_secs(2),
            "part {i}: {server_time:?}"
        );
        if i > 0 {
            // Sized to the measured pace: about a third of the timeout, with room for jitter.
            assert!(
                server_time <= Duration::from_millis(1_000),
                "part {i}: {server_time:?}"
            );
        }
    }
    assert_eq!(host.srv.most_copies_of_one_body(Endpoint::CheckIn), 1);
    let delivered: BTreeSet<String> = established(&host.srv.checkins()).into_iter().collect();
    assert_eq!(delivered.len(), 1_600);
    let learned = u64_at(&pacing(&agent), "part_bytes").unwrap();
    assert!(learned < 64 * 1024, "{learned}");

    let status = host.run(&agent, &["--status"]);
    assert_code(&status, 0);
    for needle in ["part size", "server time per part", "ms per KiB", "backoff"] {
        assert!(
            status.stdout.contains(needle),
            "{needle}: {}",
            status.stdout
        );
    }
}

#[test]
fn a_fast_server_with_a_large_policy_gets_few_large_parts() {
    let host = Host::new("fastpace", 2_500);
    host.srv.set_policy(Some(&policy(10_485_760, 60)));
    let mut agent = host.agent("fastpace", 20);
    assert_code(&host.run(&agent, &["--register-only"]), 0);
    // The first report learns the pace: parts grow by half after each fast answer.
    assert_code(&host.run(&agent, &["--force"]), 0);
    let learning = host.srv.requests_to(Endpoint::CheckIn).len();
    assert!(learning >= 3, "{learning} parts");

    // The next full snapshot starts from what was learned.
    agent.set_env("GRAPHEON_AGENT_FULL_SNAPSHOT_INTERVAL_SECONDS", "1");
    std::thread::sleep(Duration::from_millis(1_100));
    assert_code(&host.run(&agent, &["--force"]), 0);
    let requests = host.srv.requests_to(Endpoint::CheckIn);
    let full = &requests[learning..];
    assert!(full.len() <= 2, "{} parts", full.len());
    let first = decoded(&full[0]);
    assert_eq!(support::json::bool_at(&first, "full_snapshot"), Some(true));
    let decoded_len = decoded_text(&full[0]).len();
    assert!(decoded_len > 256 * 1024, "{decoded_len} bytes");
    for r in full {
        assert!(r.body.len() <= support::RAW_BODY_LIMIT);
        assert_eq!(r.status, Some(200));
    }
    let delivered: BTreeSet<String> = established(&host.srv.checkins()[learning..])
        .into_iter()
        .collect();
    assert_eq!(delivered.len(), 5_000);
}

#[test]
fn statuses_that_store_nothing_are_retried_in_the_run_after_their_retry_after() {
    let srv = server(true);
    let agent = Agent::new("retryafter", &srv.url());
    assert_code(&agent.run(&["--register-only"]), 0);

    // Without Retry-After: the agent's own short backoff.
    for fault in [
        Fault::status(500, "database is locked"),
        Fault::status(503, "Service Unavailable"),
        Fault::status(429, "Too Many Requests"),
    ] {
        srv.inject(Endpoint::CheckIn, fault, 1);
    }
    let run = agent.run(&["--force"]);
    assert_code(&run, 0);
    assert_eq!(srv.requests_to(Endpoint::CheckIn).len(), 4);
    assert_eq!(run.stderr.matches("retrying").count(), 3, "{}", run.stderr);

    // With Retry-After, in seconds and as an HTTP-date: the agent waits at least that long.
    // Policy with an hour's interval: it caps the backoff below.
    srv.set_policy(Some(&policy(262_144, 3_600)));
    let date = http_date(timefmt::now() + 6);
    for (status, value) in [(429, "2"), (408, "1"), (503, date.as_str())] {
        srv.inject(
            Endpoint::CheckIn,
            Fault::RetryAfter {
                status,
                value: value.to_string(),
            },
            1,
        );
    }
    let run = agent.run(&["--force"]);
    assert_code(&run, 0);
    let requests = srv.requests_to(Endpoint::CheckIn);
    let run2 = &requests[4..];
    assert_eq!(run2.len(), 4);
    let gap = |i: usize| run2[i + 1].received_at - run2[i].completed_at.unwrap();
    assert!(gap(0) >= Duration::from_secs(2), "{:?}", gap(0));
    assert!(gap(0) < Duration::from_secs(4), "{:?}", gap(0));
    assert!(gap(1) >= Duration::from_secs(1), "{:?}", gap(1));
    // The date has whole seconds: it was about 2.5 s ahead when it was answered.
    assert!(gap(2) >= Duration::from_millis(1_500), "{:?}", gap(2));
    assert_eq!(srv.checkins().len(), 2);

    // A Retry-After beyond what a run may take ends the run; the backoff keeps to it.
    srv.inject(
        Endpoint::CheckIn,
        Fault::RetryAfter {
            status: 503,
            value: "1800".into(),
        },
        1,
    );
    let run = agent.run(&["--force"]);
    assert_code(&run, 1);
    assert_eq!(srv.requests_to(Endpoint::CheckIn).len(), 9);
    assert!(run.stderr.contains("asks to wait 1800 s"), "{}", run.stderr);
    let until = timefmt::parse(str_at(&pacing(&agent), "backoff_until").unwrap()).unwrap();
    assert!(until >= timefmt::now() + 1_790, "{until}");
}

#[test]
fn backoff_grows_across_failed_runs_is_skipped_by_force_and_resets_after_success() {
    let srv = ContractServer::start();
    srv.add_enrollment_key(
        ENROLLMENT_KEY,
        EnrollmentKey {
            auto_approve: true,
            policy: Some(policy(262_144, 3_600)),
            ..EnrollmentKey::default()
        },
    );
    let mut agent = Agent::new("backoff", &srv.url());
    // Backoff starts at half the timer interval: 100 s, then 200 s, 400 s (each jittered
    // down to half at most), never above the policy's hour.
    agent.set_env("GRAPHEON_AGENT_TIMER_INTERVAL_SECONDS", "200");
    assert_code(&agent.run(&["--register-only"]), 0);
    let mut requests = 0;
    for (failures, low, high) in [(1, 50, 100), (2, 100, 200), (3, 200, 400)] {
        // 507 is a server failure that is not retried within the run.
        srv.inject(
            Endpoint::CheckIn,
            Fault::status(507, "Insufficient Storage"),
            1,
        );
        let started = timefmt::now();
        let run = agent.run(&["--force"]);
        assert_code(&run, 1);
        requests += 1;
        let p = pacing(&agent);
        assert_eq!(u64_at(&p, "failures"), Some(failures));
        let wait = timefmt::parse(str_at(&p, "backoff_until").unwrap()).unwrap() - started;
        assert!(
            (low..=high + 2).contains(&wait),
            "failure {failures}: {wait} s"
        );

        // A scheduled run keeps away from the server until then.
        let run = agent.run(&[]);
        assert_code(&run, 0);
        assert!(run.stderr.contains("backing off"), "{}", run.stderr);
        assert_eq!(srv.requests_to(Endpoint::CheckIn).len(), requests);
    }
    let status = agent.run(&["--status"]);
    assert!(
        status.stdout.contains("after 3 failed run(s)"),
        "{}",
        status.stdout
    );

    // A forced run ignores the backoff; its success ends it.
    assert_code(&agent.run(&["--force"]), 0);
    let p = pacing(&agent);
    assert_eq!(u64_at(&p, "failures"), Some(0));
    assert!(is_null(&p, "backoff_until"));
}

#[test]
fn a_damaged_saved_pace_means_defaults_and_a_warning() {
    let srv = server(true);
    let agent = Agent::new("badpace", &srv.url());
    assert_code(&agent.run(&["--register-only"]), 0);
    // 0.2.0's pacing.json, damaged, is read once (no record holds a pace yet).
    std::fs::write(agent.state_dir.join("pacing.json"), "{\"part_bytes\": [").unwrap();
    let run = agent.run(&["--force"]);
    assert_code(&run, 0);
    let warning = format!(
        "the pace saved in {} is damaged; starting again from small check-in parts and no backoff",
        agent.state_dir.join("pacing.json").display()
    );
    assert!(run.stderr.contains(&warning), "{}", run.stderr);
    let p = pacing(&agent);
    assert_eq!(u64_at(&p, "failures"), Some(0));
    assert!(
        u64_at(&p, "part_bytes").is_some(),
        "rewritten with what was learned"
    );
    assert_eq!(agent.file("pacing.json"), None, "folded into checkin.rec");

    // Both slots of the record damaged: the same defaults, and the fields of state.json. A
    // check-in that changed nothing first leaves the record's sequence ahead of state.json's.
    assert_code(&agent.run(&["--force"]), 0);
    let state_json: miniserde::json::Value =
        miniserde::json::from_str(&agent.file("state.json").unwrap()).unwrap();
    let saved_sequence = u64_at(&state_json, "sequence_number").unwrap();
    std::fs::write(agent.state_dir.join("checkin.rec"), vec![0x5a; 8192]).unwrap();
    let run = agent.run(&["--force"]);
    assert_code(&run, 0);
    let last: miniserde::json::Value =
        miniserde::json::from_str(&srv.checkins().last().unwrap().body).unwrap();
    assert_eq!(
        u64_at(&last, "sequence_number"),
        Some(saved_sequence + 1),
        "the sequence number came from state.json"
    );
    assert!(
        run.stderr.contains(&format!(
            "{} is damaged (neither of its slots holds a whole record)",
            agent.state_dir.join("checkin.rec").display()
        )),
        "{}",
        run.stderr
    );
    assert!(u64_at(&pacing(&agent), "part_bytes").is_some());
}

#[test]
fn a_run_killed_while_waiting_for_an_answer_leaves_the_part_in_doubt_for_the_next_run() {
    let srv = server(true);
    let mut agent = Agent::new("killed", &srv.url());
    assert_code(&agent.run(&["--register-only"]), 0);
    srv.inject(
        Endpoint::CheckIn,
        Fault::AcceptThenDelay(Duration::from_secs(30)),
        1,
    );
    let mut child = agent
        .command(&["--force"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while srv.requests_to(Endpoint::CheckIn).is_empty() {
        assert!(Instant::now() < end, "the part never arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !is_null(&pacing(&agent), "in_flight"),
        "recorded before sending"
    );
    // The hold runs two minutes from the part in flight: all but 4 s of it have passed.
    pass_time(&agent, "in_flight.at", timefmt::now() - 117);

    agent.set_env("GRAPHEON_AGENT_REQUEST_TIMEOUT_SECONDS", "1");
    let run = agent.run(&["--force"]);
    assert_code(&run, 0);
    assert!(
        run.stderr
            .contains("the last run stopped while a check-in part"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("waiting"), "{}", run.stderr);
    let requests = srv.requests_to(Endpoint::CheckIn);
    assert!(requests.len() >= 2);
    assert!(
        requests[1].received_at >= requests[0].received_at + Duration::from_secs(3),
        "held back after the part in doubt"
    );
    let p = pacing(&agent);
    assert!(is_null(&p, "in_flight") && is_null(&p, "unanswered"));
    assert_eq!(u64_at(&p, "failures"), Some(0));
}
