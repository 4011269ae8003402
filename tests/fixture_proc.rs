//! The `/proc` source on the checked-in tree `tests/fixtures/proc`, without root.
//!
//! The tree holds `net/{tcp,tcp6,udp,udp6}` (little-endian hex, as on x86 and ARM hosts) and
//! five processes: 99 `dhclient` (inodes 1005, 1006), 100 `sshd` (1003, 1001, a pipe, /dev/null),
//! 200 `nginx` (1001, 1004, an eventpoll), 300 `idle` (no fd directory), 1000 `chronyd` (1007,
//! 1006, and 4242 which no table lists). Inode 1002 and time-wait's 0 have no owner; 1001 and
//! 1006 have two, and the lower pid must win (99 before 1000, though "1000" sorts first as text).
//!
//! The agent reads sockets over sock_diag whenever the kernel answers, so `/proc/net` serves
//! only when netlink is refused (a seccomp profile, a sandbox). The binary test below refuses
//! it the same way, with a seccomp filter on the agent alone, and then the whole report comes
//! from the fixture tree.
#![cfg(target_endian = "little")]

#[path = "equivalence/seccomp.rs"]
mod seccomp;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use grapheon_agent::collect::{expand_wildcards, procfs};
use grapheon_agent::model::{Address, Mac, Snapshot};
use grapheon_agent::report::records::snapshot_json;
use miniserde::json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proc")
}

/// What the fixture's sockets are reported as, owners attached and wildcards expanded over
/// eth0's 192.0.2.2 and fd00::2, in report order.
const FIXTURE_CONNECTIONS: [&str; 9] = [
    r#"{"local_ip":"10.0.0.1","local_port":443,"pid":200,"process_name":"nginx","protocol":"tcp","remote_ip":"10.0.0.2","remote_port":51000,"state":"established"}"#,
    r#"{"local_ip":"127.0.0.1","local_port":8080,"pid":100,"process_name":"sshd","protocol":"tcp","remote_ip":"0.0.0.0","remote_port":null,"state":"listen"}"#,
    r#"{"local_ip":"192.0.2.2","local_port":33048,"pid":null,"process_name":null,"protocol":"tcp","remote_ip":"203.0.113.80","remote_port":80,"state":"established"}"#,
    r#"{"local_ip":"192.0.2.2","local_port":33050,"pid":null,"process_name":null,"protocol":"tcp","remote_ip":"203.0.113.80","remote_port":80,"state":"time_wait"}"#,
    r#"{"local_ip":"fd00::2","local_port":22,"pid":100,"process_name":"sshd","protocol":"tcp","remote_ip":"::","remote_port":null,"state":"listen"}"#,
    r#"{"local_ip":"fe80::1","local_port":9000,"pid":null,"process_name":null,"protocol":"tcp","remote_ip":"::","remote_port":null,"state":"listen"}"#,
    r#"{"local_ip":"192.0.2.2","local_port":68,"pid":99,"process_name":"dhclient","protocol":"udp","remote_ip":"0.0.0.0","remote_port":null,"state":"unknown"}"#,
    r#"{"local_ip":"192.0.2.2","local_port":5353,"pid":99,"process_name":"dhclient","protocol":"udp","remote_ip":"192.0.2.1","remote_port":53,"state":"established"}"#,
    r#"{"local_ip":"::1","local_port":323,"pid":1000,"process_name":"chronyd","protocol":"udp","remote_ip":"::","remote_port":null,"state":"unknown"}"#,
];

#[test]
fn fixture_tree_becomes_exactly_these_records() {
    let root = fixture();
    let sockets = procfs::sockets(&root).expect("the fixture tables are readable");
    let addresses = vec![
        Address {
            interface: "eth0".into(),
            ip_address: "192.0.2.2".parse().unwrap(),
            prefix_length: 24,
            mac_address: Mac::parse("02:00:00:00:00:02"),
        },
        Address {
            interface: "eth0".into(),
            ip_address: "fd00::2".parse().unwrap(),
            prefix_length: 64,
            mac_address: Mac::parse("02:00:00:00:00:02"),
        },
    ];
    // /proc cannot tell a dual-stack `::` listener, so :::22 is reported under IPv6 only.
    let (connections, left_out) =
        expand_wildcards(procfs::attach_owners(&root, sockets), &addresses);
    assert_eq!(left_out, 0);
    let mut snapshot = Snapshot {
        addresses,
        connections,
        ..Snapshot::default()
    };
    snapshot.normalize();
    let expected = format!(
        "{{\"addresses\":[{},{}],\"neighbors\":[],\"connections\":[{}],\"routes\":[]}}",
        r#"{"interface":"eth0","ip_address":"192.0.2.2","mac_address":"02:00:00:00:00:02","prefix_length":24}"#,
        r#"{"interface":"eth0","ip_address":"fd00::2","mac_address":"02:00:00:00:00:02","prefix_length":64}"#,
        FIXTURE_CONNECTIONS.join(",")
    );
    assert_eq!(snapshot_json(&snapshot), expected);
}

/// The agent, configured by its flags alone (the host's env file is never read).
fn agent(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_grapheon-agent"));
    cmd.args(["--dry-run", "--log-level", "debug"])
        .args(["--state-dir", "/nonexistent/grapheon-agent-fixture"])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GRAPHEON_AGENT_CONFIG", "/dev/null")
        // The machine's other namespaces would add sockets of whatever else runs here.
        .env("GRAPHEON_AGENT_NAMESPACES", "own")
        .stdin(Stdio::null());
    cmd
}

/// One body's tables, each record as compact JSON (keys sorted), and its collector.
fn body(out: &Output) -> (Vec<Vec<String>>, String) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one body: {stdout}");
    let Ok(Value::Object(body)) = miniserde::json::from_str::<Value>(lines[0]) else {
        panic!("not a JSON object: {stdout}");
    };
    let tables = ["addresses", "neighbors", "connections", "routes"]
        .iter()
        .map(|t| match body.get(*t) {
            Some(Value::Array(records)) => records.iter().map(miniserde::json::to_string).collect(),
            _ => panic!("no {t} array"),
        })
        .collect();
    let collector = match body.get("metadata") {
        Some(Value::Object(m)) => m.get("collector").map(miniserde::json::to_string),
        _ => None,
    };
    (tables, collector.unwrap_or_default())
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn netlink_refused_the_binary_reads_the_fixture_proc_tree() {
    let root = fixture();
    let mut cmd = agent(&[
        "--collector",
        "native",
        "--proc-root",
        root.to_str().unwrap(),
    ]);
    seccomp::refuse_netlink(&mut cmd, None);
    let out = cmd.output().expect("run grapheon-agent");
    let (tables, collector) = body(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // No address, so the two wildcard sockets (0.0.0.0:68, :::22) have nothing to be reported
    // under and are left out; every other fixture socket is there, with its owner, in order.
    let connections: Vec<String> = FIXTURE_CONNECTIONS
        .iter()
        .filter(|c| !c.contains(r#""local_port":68,"#) && !c.contains(r#""local_port":22,"#))
        .map(|c| c.to_string())
        .collect();
    assert_eq!(tables, [vec![], vec![], connections, vec![]], "{stderr}");
    assert_eq!(collector, "\"native\"");
    let logged = |text: &str| {
        assert!(
            stderr.lines().any(|l| l.contains(text)),
            "no log line with {text:?}:\n{stderr}"
        )
    };
    logged("connections: sock_diag failed: ");
    logged("connections: 9 records from /proc/net");
    logged("addresses could not be collected (netlink: ");
    logged("routes could not be collected (netlink: ");
    logged("neighbors could not be collected (netlink: ");
}

#[test]
fn owners_are_looked_up_under_the_proc_root() {
    // A socket of this test process: the agent sees it over sock_diag either way.
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen on loopback");
    let port = listener.local_addr().unwrap().port();
    let mine = |tables: &[Vec<String>]| -> Vec<String> {
        let key = format!(r#""local_ip":"127.0.0.1","local_port":{port},"#);
        tables[2]
            .iter()
            .filter(|c| c.starts_with(&format!("{{{key}")))
            .cloned()
            .collect()
    };
    let pid = std::process::id();
    let listen = |owner: &str| {
        format!(
            r#"{{"local_ip":"127.0.0.1","local_port":{port},{owner},"protocol":"tcp","remote_ip":"0.0.0.0","remote_port":null,"state":"listen"}}"#
        )
    };

    let (host, _) = body(&agent(&["--collector", "native"]).output().unwrap());
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    let owner = format!(r#""pid":{pid},"process_name":"{}""#, comm.trim());
    assert_eq!(mine(&host), [listen(&owner)]);

    let root = fixture();
    let args = [
        "--collector",
        "native",
        "--proc-root",
        root.to_str().unwrap(),
    ];
    let (fixture, _) = body(&agent(&args).output().unwrap());
    assert_eq!(
        mine(&fixture),
        [listen(r#""pid":null,"process_name":null"#)]
    );
    // Whatever else the host has, its owners can only be the fixture's processes.
    let fixture_owners = [
        r#""pid":null,"process_name":null,"#,
        r#""pid":99,"process_name":"dhclient","#,
        r#""pid":100,"process_name":"sshd","#,
        r#""pid":200,"process_name":"nginx","#,
        r#""pid":1000,"process_name":"chronyd","#,
    ];
    for c in &fixture[2] {
        assert!(
            fixture_owners.iter().any(|o| c.contains(o)),
            "owner not from the fixture tree: {c}"
        );
    }
    drop(listener);
}
