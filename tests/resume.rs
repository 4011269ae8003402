//! A check-in in many parts killed with SIGKILL: the next run resumes at the first part the
//! server did not accept, sends every record exactly once, and no state file is ever torn.
//! Each test builds its own network namespace (root) with the contract server inside it.

mod support;

use support::agent::assert_code;

use std::collections::BTreeSet;
use std::fs;
use std::net::TcpStream;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use miniserde::json::Value;
use support::agent::{Agent, Run, ENROLLMENT_KEY};
use support::json::{bool_at, get, u64_at};
use support::netns::Netns;
use support::{ContractServer, Endpoint, EnrollmentKey, Fault};

/// A namespace holding `pairs` loopback TCP connections, with the contract server inside.
struct Host {
    ns: Netns,
    srv: ContractServer,
    _held: Vec<TcpStream>,
}

impl Host {
    fn new(tag: &str, pairs: usize, max_report_bytes: u64) -> Host {
        let ns = Netns::new(tag);
        let srv = ns.enter(ContractServer::start);
        srv.add_enrollment_key(ENROLLMENT_KEY, EnrollmentKey::auto_approve());
        srv.set_policy(Some(&format!(
            r#"{{"checkin_interval_seconds":60,"jitter_seconds":0,"command_timeout_seconds":15,
            "enabled_commands":{{"ip_addr":true,"ip_neigh":true,"ip_route":true,"ss_tunap":true}},
            "max_report_bytes":{max_report_bytes},"is_active":true}}"#
        )));
        let held = ns.loopback_pairs(pairs);
        Host {
            ns,
            srv,
            _held: held,
        }
    }

    fn run(&self, agent: &Agent, args: &[&str]) -> Run {
        agent.run_in(&self.ns.name, args)
    }

    fn spawn(&self, agent: &Agent) -> Child {
        agent
            .command_in(&self.ns.name, &["--force", "--collector", "native"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the agent")
    }
}

fn kill(mut child: Child) {
    // `ip netns exec` execs the agent in place: this is the agent's own pid.
    let _ = child.kill();
    let _ = child.wait();
}

/// The connection records of every accepted check-in, as canonical JSON text.
fn sent_connections(srv: &ContractServer) -> Vec<String> {
    let mut out = Vec::new();
    for c in srv.checkins() {
        if let Some(Value::Array(items)) = get(&c.json, "connections") {
            out.extend(items.iter().map(support::json::to_string));
        }
    }
    out
}

fn saved_connections(agent: &Agent) -> BTreeSet<String> {
    match get(&agent.state(), "last_snapshot.connections") {
        Some(Value::Array(items)) => items.iter().map(support::json::to_string).collect(),
        _ => panic!("state.json has no connections"),
    }
}

#[test]
fn a_run_killed_after_part_k_resumes_at_part_k_plus_1_and_sends_every_record_once() {
    let host = Host::new("killk", 1500, 65_536);
    let agent = Agent::new("killk", &host.srv.url());
    assert_code(&host.run(&agent, &["--register-only"]), 0);
    // Parts 1-3 are answered at once; part 4 is held until the agent has been killed.
    let k = 3;
    host.srv
        .inject(Endpoint::CheckIn, Fault::Slow(Duration::ZERO), k);
    host.srv
        .inject(Endpoint::CheckIn, Fault::Slow(Duration::from_secs(300)), 1);
    let child = host.spawn(&agent);
    let end = Instant::now() + Duration::from_secs(60);
    while host.srv.requests_to(Endpoint::CheckIn).len() < k + 1 {
        assert!(Instant::now() < end, "part {} never arrived", k + 1);
        std::thread::sleep(Duration::from_millis(5));
    }
    kill(child);
    let first = host.srv.checkins();
    assert_eq!(first.len(), k);
    // Part k+1 was in flight: the next run treats it as unanswered (it may be stored), holds
    // back at least two minutes after it was sent and sends the rest in smaller parts
    // (tests/pacing.rs proves that). Here the send time is moved back, as if the hold had
    // passed, so that this test waits for nothing.
    let pacing = agent.pacing_record().expect("a saved pace");
    let p: Value = miniserde::json::from_str(&pacing).expect("the saved pace is JSON");
    let at = support::json::str_at(&p, "in_flight.at")
        .unwrap_or_else(|| panic!("part {} is recorded in flight: {pacing}", k + 1));
    agent.set_pacing_record(&pacing.replace(&format!("\"{at}\""), "\"2000-01-01T00:00:00Z\""));
    let parts = u64_at(&first[0].json, "metadata.parts").unwrap();
    assert!(parts > k as u64 + 2, "{parts} parts");
    let state = agent.state();
    assert_eq!(u64_at(&state, "sequence_number"), Some(k as u64));
    assert_eq!(bool_at(&state, "report_incomplete"), Some(true));

    assert_code(
        &host.run(
            &agent,
            &[
                "--force",
                "--collector",
                "native",
                "--request-timeout-seconds",
                "1",
            ],
        ),
        0,
    );
    let all = host.srv.checkins();
    assert!(all.len() > k + 1, "the rest went out in several parts");
    for (i, c) in all.iter().enumerate() {
        assert_eq!(u64_at(&c.json, "sequence_number"), Some(i as u64 + 1));
        assert_eq!(bool_at(&c.json, "full_snapshot"), Some(true));
    }
    assert_eq!(
        u64_at(&all[k].json, "metadata.part"),
        Some(1),
        "the resumed run starts a report of its own with what is left"
    );
    let sent = sent_connections(&host.srv);
    let unique: BTreeSet<String> = sent.iter().cloned().collect();
    assert_eq!(unique.len(), sent.len(), "no record sent twice");
    let loopback = unique
        .iter()
        .filter(|c| c.contains("\"established\"") && c.contains("127.0.0.1"))
        .count();
    assert_eq!(loopback, 3000, "every held connection reported");
    assert_eq!(
        saved_connections(&agent),
        unique,
        "the saved snapshot is what the server accepted"
    );
    assert_eq!(bool_at(&agent.state(), "report_incomplete"), Some(false));
}

/// Runs the agent in the host's namespace to its end (exit 0) and returns what it wrote: the
/// pages it dirtied on the state directory's filesystem, `ru_oublock` × 512, the figure
/// scripts/bench.sh reports.
// The child is reaped by wait4, which Child::wait cannot do: it gives no rusage.
#[allow(clippy::zombie_processes)]
fn written_by(host: &Host, agent: &Agent, args: &[&str]) -> u64 {
    let child = agent
        .command_in(&host.ns.name, args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the agent");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: wait4 on our own child, into a status and a rusage we own; the Child is not
    // waited on again.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::wait4(pid, &mut status, 0, &mut usage) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the agent failed: status {status}"
    );
    usage.ru_oublock as u64 * 512
}

/// Makes what the runs before wrote clean, and removes their connections to the server in
/// TIME_WAIT (on a host, 15 minutes apart, they are long gone), as scripts/bench.sh does.
fn settle(host: &Host) {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let killed = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &host.ns.name,
            "ss",
            "-K",
            "-tan",
            "state",
            "time-wait",
        ])
        .output()
        .expect("run ss");
    assert!(killed.status.success(), "ss -K: {killed:?}");
}

#[test]
fn a_check_in_that_changes_nothing_dirties_one_page_and_the_inode_at_most() {
    let host = Host::new("quiet", 200, 262_144);
    // Under the target dir, on the disk the build is on: a tmpfs (often /tmp) counts no
    // writes, and the test below would pass whatever the agent wrote.
    let agent = Agent::new_in(
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "quiet",
        &host.srv.url(),
    );
    assert_code(&host.run(&agent, &["--register-only"]), 0);
    settle(&host);
    assert_code(&host.run(&agent, &["--force", "--collector", "native"]), 0);
    let state = fs::read(agent.state_dir.join("state.json")).unwrap();
    for round in 0..2 {
        settle(&host);
        let written = written_by(&host, &agent, &["--force", "--collector", "native"]);
        let last = host.srv.checkins().pop().unwrap();
        assert_eq!(
            get(&last.json, "connections")
                .map(support::json::to_string)
                .as_deref(),
            Some("[]"),
            "round {round}: the check-in changed nothing"
        );
        assert_eq!(fs::read(agent.state_dir.join("state.json")).unwrap(), state);
        // One page of checkin.rec; on a filesystem without a journal also the block of its
        // inode, whose modification time the write sets. 0.2.0 wrote 12 KiB with a journal,
        // 36 to 44 KiB without.
        // At least the page: the outcome of the check-in is recorded, and measured.
        assert!(
            (4096..=8192).contains(&written),
            "round {round}: {written} bytes written"
        );
    }
    assert_eq!(leftovers(&agent.state_dir), Vec::<String>::new());
}

/// Files a run may leave in the state directory.
const EXPECTED: [&str; 5] = [
    "agent.lock",
    "agent_uuid",
    "api_key",
    "checkin.rec",
    "state.json",
];

fn check_readable(dir: &Path, trial: usize) {
    let text = fs::read_to_string(dir.join("state.json"))
        .unwrap_or_else(|e| panic!("trial {trial}: state.json: {e}"));
    assert!(
        miniserde::json::from_str::<Value>(&text).is_ok(),
        "trial {trial}: state.json is torn"
    );
    // The record: its newest whole slot holds the agent's JSON.
    if let Ok(file) = fs::File::open(dir.join("checkin.rec")) {
        let slots = grapheon_agent::slots::Slots::read(&file).unwrap();
        let (_, _, payload) = slots
            .newest
            .unwrap_or_else(|| panic!("trial {trial}: no whole slot in checkin.rec"));
        let text = String::from_utf8(payload).unwrap();
        assert!(
            miniserde::json::from_str::<Value>(&text).is_ok(),
            "trial {trial}: the record is not JSON: {text:?}"
        );
    }
}

fn leftovers(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !EXPECTED.contains(&n.as_str()))
        .collect();
    v.sort();
    v
}

/// A small xorshift generator: the trials differ from run to run, and the seed is printed.
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[test]
fn kill_9_at_random_moments_of_a_50_part_check_in_never_tears_state() {
    // 16 KiB parts (the smallest policy limit): about 80 records each, 2,300 pairs ≈ 56 parts.
    let host = Host::new("kill9", 2300, 16_384);
    let agent = Agent::new("kill9", &host.srv.url());
    assert_code(&host.run(&agent, &["--register-only"]), 0);
    let dir = agent.state_dir.clone();
    let registered = fs::read(dir.join("state.json")).unwrap();
    let start = Instant::now();
    assert_code(&host.run(&agent, &["--force", "--collector", "native"]), 0);
    let whole = start.elapsed();
    let parts = host.srv.checkins().len();
    assert!(parts >= 50, "{parts} parts");

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill -9 trials: seed {seed}, an uninterrupted run takes {whole:?}");
    let mut random = Random(seed);
    let trials = 50;
    let (mut between_parts, mut fresh) = (0, true);
    for trial in 0..trials {
        if fresh {
            // Start a full report afresh: the state of an agent just registered.
            let _ = fs::remove_file(dir.join("checkin.rec"));
            fs::write(dir.join("state.json"), &registered).unwrap();
        }
        // A kill while a part is in flight makes the next run hold back for four request
        // timeouts (tests/pacing.rs proves that); here every trial starts without that hold,
        // so that the trials probe the state files, not the wait.
        if dir.join("checkin.rec").exists() {
            agent.set_pacing_record("{}");
        }
        let before = host.srv.checkins().len();
        let mut child = host.spawn(&agent);
        let at = Instant::now() + Duration::from_micros(random.below(whole.as_micros() as u64 + 1));
        // A resumed run may finish before its moment comes: then there is nothing to kill.
        while Instant::now() < at && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        kill(child);
        check_readable(&dir, trial);
        assert_code(&host.run(&agent, &["--status"]), 0);
        if host.srv.checkins().len() > before {
            between_parts += 1;
        }
        // Every other trial, the next run is one that only loads and saves the state (it
        // registers again): it must leave no file of the killed run behind. Otherwise the
        // next trial's run resumes the report from its file.
        if trial % 2 == 0 {
            assert_code(&host.run(&agent, &["--register-only"]), 0);
            check_readable(&dir, trial);
            assert_eq!(
                leftovers(&dir),
                Vec::<String>::new(),
                "trial {trial}: files left"
            );
        }
        fresh = bool_at(&agent.state(), "report_incomplete") != Some(true);
    }
    // The last report is finished by a run that completes; the saved snapshot is then whole.
    agent.set_pacing_record("{}");
    assert_code(&host.run(&agent, &["--force", "--collector", "native"]), 0);
    assert_eq!(leftovers(&dir), Vec::<String>::new(), "files left");
    let loopback = saved_connections(&agent)
        .iter()
        .filter(|c| c.contains("\"established\"") && c.contains("127.0.0.1"))
        .count();
    assert_eq!(loopback, 4600, "every held connection saved");
    eprintln!("{between_parts} of {trials} kills landed after at least one accepted part");
    assert!(
        between_parts >= trials / 4,
        "too few kills landed between parts: {between_parts}"
    );
}
