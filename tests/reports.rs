//! Reports the server accepts from any host: wildcard listeners, odd link addresses, reports
//! larger than the limits, interruptions, faults. Each test builds its own network namespace
//! (root) with the contract server inside it, so every byte stays on the namespace's loopback.

mod support;

use support::agent::assert_code;

use std::collections::BTreeSet;
use std::fs;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use miniserde::json::Value;
use support::agent::{Agent, Run, ENROLLMENT_KEY};
use support::json::{bool_at, get, str_at, u64_at};
use support::netns::{raise_fd_limit, Netns};
use support::{ContractServer, Endpoint, EnrollmentKey, Fault};

/// A namespace with a veth pair (both ends inside) carrying IPv4 and IPv6 addresses, and a
/// contract server on its loopback with an auto-approving enrollment key.
struct Host {
    ns: Netns,
    srv: ContractServer,
}

impl Host {
    fn new(tag: &str) -> Host {
        let ns = Netns::new(tag);
        ns.ip("link add va type veth peer name vb");
        ns.ip("addr add 192.0.2.10/24 dev va");
        ns.ip("addr add fd00:db8::10/64 dev va nodad");
        ns.ip("addr add 198.51.100.10/24 dev vb");
        ns.ip("link set va up");
        ns.ip("link set vb up");
        let srv = ns.enter(ContractServer::start);
        srv.add_enrollment_key(ENROLLMENT_KEY, EnrollmentKey::auto_approve());
        Host { ns, srv }
    }

    fn agent(&self, tag: &str) -> Agent {
        Agent::new(tag, &self.srv.url())
    }

    fn run(&self, agent: &Agent, args: &[&str]) -> Run {
        agent.run_in(&self.ns.name, args)
    }

    /// Opens `pairs` loopback TCP connections inside the namespace (2 × pairs sockets).
    fn connections(&self, pairs: usize) -> Vec<TcpStream> {
        raise_fd_limit();
        self.ns.enter(|| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut held = Vec::with_capacity(pairs * 2);
            for _ in 0..pairs {
                held.push(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
                held.push(listener.accept().unwrap().0);
            }
            held.push(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
            held.pop();
            // Keep the listener open too: it is a record of its own.
            std::mem::forget(listener);
            held
        })
    }
}

fn records<'a>(body: &'a Value, table: &str) -> &'a [Value] {
    match get(body, table) {
        Some(Value::Array(items)) => items,
        _ => panic!("{table} is not an array"),
    }
}

fn connection_keys(body: &Value) -> Vec<String> {
    records(body, "connections")
        .iter()
        .map(support::json::to_string)
        .collect()
}

#[test]
fn wildcard_listeners_are_reported_under_each_local_address_and_accepted() {
    let host = Host::new("wild");
    let held = host.ns.enter(|| {
        (
            TcpListener::bind("0.0.0.0:2222").unwrap(),
            TcpListener::bind("[::]:2223").unwrap(), // dual-stack: bindv6only is 0 by default
            UdpSocket::bind("0.0.0.0:68").unwrap(),
        )
    });
    for collector in ["native", "commands"] {
        let mut agent = host.agent(&format!("wild-{collector}"));
        agent.set_env("GRAPHEON_AGENT_COLLECTOR", collector);
        let run = host.run(&agent, &["--force"]);
        assert_code(&run, 0);
        assert!(
            host.srv.requests().iter().all(|r| r.status == Some(200)),
            "accepted the first time"
        );
        let checkin = host.srv.checkins().pop().unwrap();
        let body = &checkin.json;
        let ours: Vec<(String, String, u64, Option<u64>)> = records(body, "connections")
            .iter()
            .filter(|c| matches!(u64_at(c, "local_port"), Some(2222 | 2223 | 68)))
            .map(|c| {
                (
                    str_at(c, "protocol").unwrap().to_string(),
                    str_at(c, "local_ip").unwrap().to_string(),
                    u64_at(c, "local_port").unwrap(),
                    u64_at(c, "pid"),
                )
            })
            .collect();
        let v4 = ["192.0.2.10", "198.51.100.10"];
        let v6: Vec<String> = records(body, "addresses")
            .iter()
            .filter_map(|a| str_at(a, "ip_address"))
            .filter(|ip| ip.contains(':'))
            .map(str::to_string)
            .collect();
        assert!(v6.contains(&"fd00:db8::10".to_string()), "{v6:?}");
        let mut expected = BTreeSet::new();
        for ip in v4 {
            expected.insert(("tcp".to_string(), ip.to_string(), 2222));
            expected.insert(("tcp".to_string(), ip.to_string(), 2223));
            expected.insert(("udp".to_string(), ip.to_string(), 68));
        }
        for ip in &v6 {
            expected.insert(("tcp".to_string(), ip.clone(), 2223));
        }
        let got: BTreeSet<_> = ours
            .iter()
            .map(|(p, ip, port, _)| (p.clone(), ip.clone(), *port))
            .collect();
        assert_eq!(got, expected, "{collector}");
        let pid = u64::from(std::process::id());
        assert!(
            ours.iter().all(|o| o.3 == Some(pid)),
            "owned by this test process: {ours:?}"
        );
        for c in records(body, "connections") {
            let ip = str_at(c, "local_ip").unwrap();
            assert!(
                ip != "0.0.0.0" && ip != "::",
                "unspecified local_ip sent: {}",
                support::json::to_string(c)
            );
        }
    }
    drop(held);
}

#[test]
fn link_addresses_that_are_not_macs_are_sent_as_null() {
    let host = Host::new("tun");
    // A real tun device has no link address at all.
    host.ns.ip("tuntap add dev tun7 mode tun");
    host.ns.ip("addr add 203.0.113.7/32 dev tun7");
    host.ns.ip("link set tun7 up");
    let agent = host.agent("tun-native");
    assert_code(&host.run(&agent, &["--force"]), 0);
    let body = host.srv.checkins().pop().unwrap().json;
    let tun: Vec<&Value> = records(&body, "addresses")
        .iter()
        .filter(|a| str_at(a, "interface") == Some("tun7"))
        .collect();
    assert_eq!(tun.len(), 1);
    assert!(support::json::is_null(tun[0], "mac_address"));

    // A tunnel's 4-byte link address (this kernel cannot make sit/gre links): a stand-in `ip`
    // prints what iproute2 prints for one, in front of the real tools on PATH.
    let mut agent = host.agent("tun-commands");
    let bin = agent.root.0.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("ip");
    fs::write(
        &fake,
        r#"#!/bin/sh
case "$*" in
  "-json addr show") echo '[{"ifindex":5,"ifname":"sit1","flags":["POINTOPOINT","NOARP","UP"],"link_type":"sit","address":"192.0.2.8","link_pointtopoint":true,"broadcast":"0.0.0.0","addr_info":[{"family":"inet","local":"10.9.9.1","prefixlen":30}]},{"ifindex":6,"ifname":"ib0","link_type":"infiniband","address":"80:00:02:08:fe:80:00:00:00:00:00:00:00:02:c9:03:00:0a:0b:0c","addr_info":[{"family":"inet","local":"10.8.8.1","prefixlen":24}]}]' ;;
  *) exec /usr/sbin/ip "$@" 2>/dev/null || exec /sbin/ip "$@" ;;
esac
"#,
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    agent.set_env(
        "PATH",
        &format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        ),
    );
    agent.set_env("GRAPHEON_AGENT_COLLECTOR", "commands");
    let run = host.run(&agent, &["--force"]);
    assert_code(&run, 0);
    let registration = host.srv.requests_to(Endpoint::Register).pop().unwrap();
    let reg = support::json::parse(&String::from_utf8_lossy(&registration.body));
    let body = host.srv.checkins().pop().unwrap().json;
    for doc in [&reg, &body] {
        let addrs = records(doc, "addresses");
        let macs: Vec<(String, bool)> = addrs
            .iter()
            .map(|a| {
                (
                    str_at(a, "interface").unwrap().to_string(),
                    support::json::is_null(a, "mac_address"),
                )
            })
            .collect();
        assert_eq!(
            macs,
            [("ib0".to_string(), true), ("sit1".to_string(), true)]
        );
    }
}

#[test]
fn a_large_snapshot_goes_out_in_accepted_parts_whose_union_is_complete() {
    let host = Host::new("parts");
    let held = host.connections(1500); // 3,000 connection records, ~500 kB of JSON
    let agent = host.agent("parts");
    let run = host.run(&agent, &["--force", "--collector", "native"]);
    assert_code(&run, 0);
    let checkins = host.srv.checkins();
    assert!(checkins.len() >= 3, "{} parts", checkins.len());
    let statuses: Vec<Option<u16>> = host.srv.requests().iter().map(|r| r.status).collect();
    assert!(
        statuses.iter().all(|s| *s == Some(200)),
        "every request accepted the first time: {statuses:?}"
    );
    let mut union = Vec::new();
    for (i, c) in checkins.iter().enumerate() {
        assert!(
            c.raw_body.len() <= 262_144 && c.body.len() <= 262_144,
            "part {i} within both limits"
        );
        assert_eq!(u64_at(&c.json, "sequence_number"), Some(i as u64 + 1));
        assert_eq!(bool_at(&c.json, "full_snapshot"), Some(true));
        assert_eq!(u64_at(&c.json, "metadata.part"), Some(i as u64 + 1));
        // The count known when the part was cut: later parts grow as the server answers fast.
        let parts = u64_at(&c.json, "metadata.parts").unwrap();
        assert!(parts > i as u64, "part {} of {parts}", i + 1);
        if i + 1 == checkins.len() {
            assert_eq!(
                parts,
                checkins.len() as u64,
                "the last part knows the total"
            );
        }
        union.extend(connection_keys(&c.json));
    }
    let unique: BTreeSet<_> = union.iter().cloned().collect();
    assert_eq!(unique.len(), union.len(), "no record sent twice");
    let established = union
        .iter()
        .filter(|c| c.contains("\"established\"") && c.contains("127.0.0.1"))
        .count();
    assert_eq!(established, 3000, "every loopback connection reported once");
    let state = agent.state();
    assert_eq!(
        u64_at(&state, "sequence_number"),
        Some(checkins.len() as u64)
    );
    assert_eq!(bool_at(&state, "full_snapshot_in_progress"), Some(false));
    assert_eq!(
        support::json::len_at(&state, "last_snapshot.connections"),
        Some(union.len())
    );
    drop(held);
}

#[test]
fn a_run_interrupted_between_parts_resumes_without_duplicates() {
    let host = Host::new("resume");
    let held = host.connections(1500);
    let mut agent = host.agent("resume");
    // Parts 1-3 go through; every attempt at part 4 fails, so the run gives up (exit 1).
    host.srv
        .inject(Endpoint::CheckIn, Fault::Slow(Duration::ZERO), 3);
    host.srv.inject(
        Endpoint::CheckIn,
        Fault::status(503, "Service Unavailable"),
        4,
    );
    host.srv.set_policy(Some(&policy(65_536)));
    // Half the timer interval is the first backoff: one second, which the test waits out.
    agent.set_env("GRAPHEON_AGENT_TIMER_INTERVAL_SECONDS", "2");
    assert_code(&host.run(&agent, &["--register-only"]), 0);
    let run = host.run(&agent, &["--force", "--collector", "native"]);
    assert_code(&run, 1);
    let first = host.srv.checkins();
    assert_eq!(first.len(), 3);
    assert_eq!(u64_at(&agent.state(), "sequence_number"), Some(3));
    assert_eq!(
        bool_at(&agent.state(), "full_snapshot_in_progress"),
        Some(true)
    );

    // The policy now asks for an hour between check-ins, but an unfinished report does not wait.
    host.srv.set_policy(Some(&policy_interval(65_536, 3_600)));
    std::thread::sleep(Duration::from_millis(1_100));
    let run = host.run(&agent, &["--collector", "native"]);
    assert_code(&run, 0);
    let all = host.srv.checkins();
    assert!(all.len() > 4, "the rest went out in several parts");
    let mut union = Vec::new();
    for (i, c) in all.iter().enumerate() {
        assert_eq!(u64_at(&c.json, "sequence_number"), Some(i as u64 + 1));
        assert_eq!(
            bool_at(&c.json, "full_snapshot"),
            Some(true),
            "the resumed parts still say full"
        );
        union.extend(connection_keys(&c.json));
    }
    let unique: BTreeSet<_> = union.iter().cloned().collect();
    assert_eq!(unique.len(), union.len(), "nothing accepted was sent again");
    let established = union
        .iter()
        .filter(|c| c.contains("\"established\"") && c.contains("127.0.0.1"))
        .count();
    assert_eq!(established, 3000);
    assert_eq!(
        bool_at(&agent.state(), "full_snapshot_in_progress"),
        Some(false)
    );
    drop(held);
}

fn policy(max_report_bytes: u64) -> String {
    policy_interval(max_report_bytes, 60)
}

fn policy_interval(max_report_bytes: u64, interval: u64) -> String {
    format!(
        r#"{{"checkin_interval_seconds":{interval},"jitter_seconds":0,"command_timeout_seconds":15,
        "enabled_commands":{{"ip_addr":true,"ip_neigh":true,"ip_route":true,"ss_tunap":true}},
        "max_report_bytes":{max_report_bytes},"is_active":true}}"#
    )
}

#[test]
fn a_part_refused_as_too_large_is_split_again() {
    let host = Host::new("413");
    let held = host.connections(300);
    let agent = host.agent("413");
    assert_code(&host.run(&agent, &["--register-only"]), 0);
    // The agent cached the default limit; the server now enforces the smallest one.
    host.srv.set_policy(Some(&policy(16_384)));
    let run = host.run(&agent, &["--force", "--collector", "native"]);
    assert_code(&run, 0);
    assert!(run.stderr.contains("too large"), "{}", run.stderr);
    let refused = host
        .srv
        .requests_to(Endpoint::CheckIn)
        .iter()
        .filter(|r| r.status == Some(413))
        .count();
    assert!(refused >= 1);
    let checkins = host.srv.checkins();
    let mut union = Vec::new();
    for c in &checkins {
        assert!(c.body.len() <= 16_384);
        union.extend(connection_keys(&c.json));
    }
    let established = union
        .iter()
        .filter(|c| c.contains("\"established\""))
        .count();
    assert_eq!(established, 600);
    assert_eq!(
        u64_at(&agent.state(), "policy.max_report_bytes"),
        Some(16_384),
        "the new policy is cached"
    );
    drop(held);
}

#[test]
fn errors_that_store_nothing_are_retried_and_then_succeed() {
    let host = Host::new("retry");
    let agent = host.agent("retry");
    assert_code(&host.run(&agent, &["--register-only"]), 0);
    host.srv.inject(
        Endpoint::CheckIn,
        Fault::status(503, "Service Unavailable"),
        1,
    );
    host.srv.inject(
        Endpoint::CheckIn,
        Fault::status(500, "database is locked"),
        1,
    );
    host.srv.inject(Endpoint::CheckIn, Fault::NotJson(502), 1);
    let run = host.run(&agent, &["--force"]);
    assert_code(&run, 0);
    assert_eq!(host.srv.requests_to(Endpoint::CheckIn).len(), 4);
    assert_eq!(host.srv.checkins().len(), 1);
    assert_eq!(run.stderr.matches("retrying").count(), 3, "{}", run.stderr);
}

#[test]
fn a_server_that_never_answers_gets_the_part_once_and_nothing_changes() {
    let host = Host::new("slow");
    let mut agent = host.agent("slow");
    assert_code(&host.run(&agent, &["--register-only"]), 0);
    let before = agent.file("state.json").unwrap();
    agent.set_env("GRAPHEON_AGENT_REQUEST_TIMEOUT_SECONDS", "2");
    host.srv
        .inject(Endpoint::CheckIn, Fault::Slow(Duration::from_secs(60)), 10);
    let started = Instant::now();
    let run = host.run(&agent, &["--force"]);
    let took = started.elapsed();
    assert_code(&run, 1);
    assert!(
        took < Duration::from_secs(2 + 5),
        "one timeout, no resend: {took:?}"
    );
    assert!(run.stderr.contains("timed out"), "{}", run.stderr);
    assert_eq!(
        host.srv.requests_to(Endpoint::CheckIn).len(),
        1,
        "a part without an answer is not sent again in the run"
    );
    assert_eq!(agent.file("state.json").unwrap(), before);
}

#[test]
fn huge_truncated_and_late_answers_neither_hang_nor_lose_state() {
    let host = Host::new("bodies");
    let mut agent = host.agent("bodies");
    agent.set_env("GRAPHEON_AGENT_REQUEST_TIMEOUT_SECONDS", "3");
    assert_code(&host.run(&agent, &["--register-only"]), 0);

    // A 200 is an acceptance whatever its body: 50 MB or cut short, the state advances.
    host.srv
        .inject(Endpoint::CheckIn, Fault::HugeBody(50_000_000), 1);
    let started = Instant::now();
    let run = host.run(&agent, &["--force"]);
    assert_code(&run, 0);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(u64_at(&agent.state(), "sequence_number"), Some(1));
    host.srv.inject(Endpoint::CheckIn, Fault::TruncatedBody, 1);
    assert_code(&host.run(&agent, &["--force"]), 0);
    assert_eq!(u64_at(&agent.state(), "sequence_number"), Some(2));

    // The server commits, then answers after our timeout: the part is in doubt, not sent again
    // in this run, and the state does not advance (the next run sends it again).
    host.srv.inject(
        Endpoint::CheckIn,
        Fault::AcceptThenDelay(Duration::from_secs(8)),
        1,
    );
    let before = host.srv.requests_to(Endpoint::CheckIn).len();
    let run = host.run(&agent, &["--force"]);
    assert_code(&run, 1);
    assert_eq!(host.srv.requests_to(Endpoint::CheckIn).len(), before + 1);
    assert_eq!(u64_at(&agent.state(), "sequence_number"), Some(2));

    // A registration answer that is not JSON is a transient failure, not a crash.
    let fresh = host.agent("bodies-reg");
    host.srv
        .inject(Endpoint::Register, Fault::HugeBody(5_000_000), 4);
    let run = host.run(&fresh, &["--register-only"]);
    assert_code(&run, 1);
    assert!(fresh.file("api_key").is_none());
}

#[test]
fn full_snapshots_are_resent_after_the_interval_and_removals_are_counted() {
    let host = Host::new("fresh");
    let udp = host.ns.enter(|| {
        (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect::<Vec<_>>()
    });
    let agent = host.agent("fresh");
    assert_code(
        &host.run(
            &agent,
            &["--force", "--full-snapshot-interval-seconds", "0"],
        ),
        0,
    );
    drop(udp);
    assert_code(
        &host.run(
            &agent,
            &["--force", "--full-snapshot-interval-seconds", "0"],
        ),
        0,
    );
    let second = host.srv.checkins().pop().unwrap().json;
    assert_eq!(bool_at(&second, "full_snapshot"), Some(false));
    assert_eq!(
        u64_at(&second, "metadata.removed_since_last_report.connections"),
        Some(3)
    );
    std::thread::sleep(Duration::from_millis(1100));
    assert_code(
        &host.run(
            &agent,
            &["--force", "--full-snapshot-interval-seconds", "1"],
        ),
        0,
    );
    let third = host.srv.checkins().pop().unwrap().json;
    assert_eq!(
        bool_at(&third, "full_snapshot"),
        Some(true),
        "older than the interval: full again"
    );
    assert!(
        !records(&third, "addresses").is_empty(),
        "a full snapshot repeats known records"
    );
}

#[test]
fn the_last_good_policy_is_kept_when_an_answer_carries_none() {
    let host = Host::new("policy");
    host.srv.set_policy(Some(&policy(100_000)));
    let agent = host.agent("policy");
    assert_code(&host.run(&agent, &["--force"]), 0);
    assert_eq!(
        u64_at(&agent.state(), "policy.max_report_bytes"),
        Some(100_000)
    );
    host.srv.set_policy(None);
    assert_code(&host.run(&agent, &["--force"]), 0);
    assert_eq!(
        u64_at(&agent.state(), "policy.max_report_bytes"),
        Some(100_000)
    );
    assert_eq!(u64_at(&agent.state(), "sequence_number"), Some(2));
}

#[test]
fn a_413_on_a_delta_keeps_gone_records_out_of_the_base() {
    let host = Host::new("413delta");
    let udp = host.ns.enter(|| {
        (0..5)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect::<Vec<_>>()
    });
    let ports: Vec<u16> = udp.iter().map(|s| s.local_addr().unwrap().port()).collect();
    let agent = host.agent("413delta");
    assert_code(&host.run(&agent, &["--force", "--collector", "native"]), 0);

    // The sockets go away; the next delta is refused once as too large, then re-split.
    drop(udp);
    host.srv.inject(
        Endpoint::CheckIn,
        Fault::status(413, "Decoded report exceeds policy size limit"),
        1,
    );
    assert_code(&host.run(&agent, &["--force", "--collector", "native"]), 0);
    let kept = support::json::to_string(get(&agent.state(), "last_snapshot.connections").unwrap());
    for port in &ports {
        assert!(
            !kept.contains(&format!("\"local_port\":{port},")),
            "gone socket {port} still in the base"
        );
    }

    // They come back: the next delta reports them again.
    let again = host.ns.enter(|| {
        ports
            .iter()
            .map(|p| UdpSocket::bind(("127.0.0.1", *p)).unwrap())
            .collect::<Vec<_>>()
    });
    assert_code(&host.run(&agent, &["--force", "--collector", "native"]), 0);
    let last = host.srv.checkins().pop().unwrap().json;
    assert_eq!(bool_at(&last, "full_snapshot"), Some(false));
    let sent = connection_keys(&last).join("\n");
    for port in &ports {
        assert!(
            sent.contains(&format!("\"local_port\":{port},")),
            "socket {port} is back but was not reported"
        );
    }
    drop(again);
}
