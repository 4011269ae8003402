//! Other network namespaces on the checked-in tree `tests/fixtures/proc-ns`, without root.
//!
//! The tree is a host whose agent runs as pid 1 (`self`, `sshd`, namespace 4026531840, one
//! listener on 192.0.2.2:22) and holds:
//! - a Docker container (cgroup v2, systemd driver), namespace 4026532100, pids 100 and 101
//!   `nginx`: `0.0.0.0:80` next to `:::80` (so IPv6-only), an established 172.17.0.2:80, and
//!   two loopback-only sockets; its established socket is also held by pid 50 `proxy` of the
//!   host's namespace, which is lower and wins;
//! - a Kubernetes pod (cgroup v1, cgroupfs driver, hybrid host), namespace 4026532200, pids
//!   200 `pause` and 201 `redis-server`: a dual-stack `:::6379` and a connected UDP socket
//!   without owner;
//! - pid 300, a namespace whose tables cannot be read, and pid 400 without a namespace link.
//!
//! The directory is listed in whatever order the filesystem keeps, not by pid, so the tests
//! also prove that the lowest pid represents a namespace and owns a socket.
#![cfg(target_endian = "little")]

#[path = "equivalence/seccomp.rs"]
mod seccomp;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use grapheon_agent::collect::{expand_wildcards, namespaces, procfs};
use grapheon_agent::model::Snapshot;
use grapheon_agent::report::records::snapshot_json;
use miniserde::json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proc-ns")
}

const DOCKER_ID: &str = "3f1b1e8c0a5e4b0b9d7c6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b";
const PAUSE_ID: &str = "9a8b7c6d5e4f30211203f4e5d6c7b8a99a8b7c6d5e4f30211203f4e5d6c7b8a9";
const POD_UID: &str = "7c0c4a3e-5f0b-4e3a-9a6b-2d1c0e9f8b7a";

/// The other namespaces' connection records, in report order (TCP before UDP).
fn other_connections() -> Vec<String> {
    vec![
        r#"{"local_ip":"10.244.1.5","local_port":6379,"pid":201,"process_name":"redis-server","protocol":"tcp","remote_ip":"::","remote_port":null,"state":"listen"}"#.into(),
        r#"{"local_ip":"172.17.0.2","local_port":80,"pid":100,"process_name":"nginx","protocol":"tcp","remote_ip":"0.0.0.0","remote_port":null,"state":"listen"}"#.into(),
        r#"{"local_ip":"172.17.0.2","local_port":80,"pid":50,"process_name":"proxy","protocol":"tcp","remote_ip":"172.17.0.1","remote_port":51000,"state":"established"}"#.into(),
        r#"{"local_ip":"fd00:10:244:1::5","local_port":6379,"pid":201,"process_name":"redis-server","protocol":"tcp","remote_ip":"::","remote_port":null,"state":"listen"}"#.into(),
        r#"{"local_ip":"fe80::42:acff:fe11:2","local_port":80,"pid":100,"process_name":"nginx","protocol":"tcp","remote_ip":"::","remote_port":null,"state":"listen"}"#.into(),
        r#"{"local_ip":"10.244.1.5","local_port":5353,"pid":null,"process_name":null,"protocol":"udp","remote_ip":"10.96.0.10","remote_port":53,"state":"established"}"#.into(),
    ]
}

const OWN_LISTENER: &str = r#"{"local_ip":"192.0.2.2","local_port":22,"pid":1,"process_name":"sshd","protocol":"tcp","remote_ip":"0.0.0.0","remote_port":null,"state":"listen"}"#;

fn metadata() -> String {
    format!(
        concat!(
            r#"{{"collected":2,"over_cap":0,"listed":2,"list":["#,
            r#"{{"inode":4026532100,"pid":100,"process_name":"nginx","runtime":"docker","container_id":"{docker}","#,
            r#""pod_uid":null,"name":null,"addresses":["172.17.0.2","fe80::42:acff:fe11:2"],"sockets":5,"connections":3,"loopback_left_out":2}},"#,
            r#"{{"inode":4026532200,"pid":200,"process_name":"pause","runtime":"containerd","container_id":"{pause}","#,
            r#""pod_uid":"{pod}","name":null,"addresses":["10.244.1.5","fd00:10:244:1::5"],"sockets":2,"connections":3,"loopback_left_out":0}}"#,
            r#"]}}"#
        ),
        docker = DOCKER_ID,
        pause = PAUSE_ID,
        pod = POD_UID
    )
}

#[test]
fn fixture_namespaces_become_exactly_these_records_and_metadata() {
    let root = fixture();
    let own = namespaces::own_inode(&root);
    assert_eq!(own, Some(4026531840), "self/ns/net of the fixture");
    let sockets = procfs::sockets(&root).expect("the agent's own tables");
    let (sockets, found) = namespaces::walk(&root, sockets, own, namespaces::MAX_NAMESPACES);
    let found = found.expect("discovery ran");
    assert_eq!(
        (found.unreadable, found.failed()),
        (1, 1),
        "pids 400 and 300"
    );
    let (mut connections, left_out) = expand_wildcards(sockets, &[]);
    assert_eq!(left_out, 0);
    let mut list = namespaces::Namespaces::default();
    for ns in found.found {
        let (records, summary, unexpanded) = namespaces::report(ns);
        assert_eq!(unexpanded, 0);
        connections.extend(records);
        list.list.push(summary);
    }
    let mut snapshot = Snapshot {
        connections,
        ..Snapshot::default()
    };
    snapshot.normalize();
    let mut want = other_connections();
    want.insert(3, OWN_LISTENER.to_string());
    assert_eq!(
        snapshot_json(&snapshot),
        format!(
            r#"{{"addresses":[],"neighbors":[],"connections":[{}],"routes":[]}}"#,
            want.join(",")
        )
    );
    assert_eq!(list.metadata(30_000), metadata());
}

#[test]
fn without_a_namespace_of_its_own_nothing_else_is_collected() {
    let root = fixture();
    let sockets = procfs::sockets(&root).unwrap();
    let (sockets, found) = namespaces::walk(&root, sockets, None, namespaces::MAX_NAMESPACES);
    assert!(found.is_none());
    let (connections, _) = expand_wildcards(sockets, &[]);
    let json: Vec<String> = connections
        .iter()
        .map(|c| {
            let mut s = Snapshot::default();
            s.connections.push(c.clone());
            let all = snapshot_json(&s);
            all[all.find("[{").unwrap() + 1..all.find("}]").unwrap() + 1].to_string()
        })
        .collect();
    assert_eq!(json, [OWN_LISTENER]);
}

/// The binary on the fixture tree, netlink refused so that every table comes from it.
fn dry_run(namespaces: &str) -> (Vec<String>, Option<String>) {
    let root = fixture();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_grapheon-agent"));
    cmd.args(["--dry-run", "--log-level", "debug", "--collector", "native"])
        .args(["--state-dir", "/nonexistent/grapheon-agent-fixture"])
        .args(["--proc-root", root.to_str().unwrap()])
        .args(["--namespaces", namespaces])
        .env_clear()
        .env("GRAPHEON_AGENT_CONFIG", "/dev/null")
        .stdin(Stdio::null());
    seccomp::refuse_netlink(&mut cmd, None);
    let out = cmd.output().expect("run grapheon-agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stderr}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Ok(Value::Object(body)) = miniserde::json::from_str::<Value>(stdout.trim()) else {
        panic!("not one JSON body: {stdout}");
    };
    let connections = match body.get("connections") {
        Some(Value::Array(c)) => c.iter().map(miniserde::json::to_string).collect(),
        _ => panic!("no connections"),
    };
    let meta = match body.get("metadata") {
        Some(Value::Object(m)) => m.get("namespaces").map(miniserde::json::to_string),
        _ => panic!("no metadata"),
    };
    (connections, meta)
}

/// Keys sorted, as miniserde renders objects.
fn canonical(json: &str) -> String {
    miniserde::json::to_string(&miniserde::json::from_str::<Value>(json).unwrap())
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn the_binary_reports_other_namespaces_and_own_gives_the_old_report() {
    let (connections, meta) = dry_run("all");
    let mut want = other_connections();
    want.insert(3, OWN_LISTENER.to_string());
    assert_eq!(connections, want);
    assert_eq!(meta.as_deref(), Some(canonical(&metadata()).as_str()));

    let (connections, meta) = dry_run("own");
    assert_eq!(connections, [OWN_LISTENER]);
    assert_eq!(meta, None, "no namespaces key at all");
}

#[test]
fn namespaces_beyond_the_cap_are_counted_not_collected() {
    let root = fixture();
    let sockets = procfs::sockets(&root).unwrap();
    let own = namespaces::own_inode(&root);
    let (_, found) = namespaces::walk(&root, sockets, own, 1);
    let found = found.unwrap();
    // Which one comes first depends on how the directory lists its entries.
    assert_eq!((found.found.len(), found.over_cap()), (1, 1));
    let collected = found.found[0].inode;
    assert!([4026532100, 4026532200].contains(&collected), "{collected}");
    let mut list = namespaces::Namespaces {
        over_cap: found.over_cap(),
        ..Default::default()
    };
    for ns in found.found {
        list.list.push(namespaces::report(ns).1);
    }
    let meta = list.metadata(30_000);
    assert!(
        meta.starts_with(&format!(
            r#"{{"collected":1,"over_cap":1,"listed":1,"list":[{{"inode":{collected},"#
        )),
        "{meta}"
    );
}

/// Copies a fixture tree, symlinks as symlinks.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if kind.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// The binary's whole dry-run body on `root`, its one changing field (`observed_at`) blanked.
fn whole_body(root: &Path, namespaces: &str) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_grapheon-agent"));
    cmd.args(["--dry-run", "--collector", "native"])
        .args(["--state-dir", "/nonexistent/grapheon-agent-fixture"])
        .args(["--proc-root", root.to_str().unwrap()])
        .args(["--namespaces", namespaces])
        .env_clear()
        .env("GRAPHEON_AGENT_CONFIG", "/dev/null")
        .stdin(Stdio::null());
    seccomp::refuse_netlink(&mut cmd, None);
    let out = cmd.output().expect("run grapheon-agent");
    assert!(
        out.status.success(),
        "{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let at = stdout.find(r#""observed_at":""#).expect("observed_at") + 15;
    let end = at + stdout[at..].find('"').unwrap();
    format!("{}{}", &stdout[..at], &stdout[end..])
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn on_a_host_with_one_namespace_the_default_gives_exactly_the_report_of_own() {
    // The fixture's host processes alone (the agent, pid 1, and pid 50), all in namespace
    // 4026531840: the containers are gone.
    let root = std::env::temp_dir().join(format!("grapheon-one-ns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for part in ["1", "50", "net"] {
        copy_tree(&fixture().join(part), &root.join(part));
    }
    std::os::unix::fs::symlink("1", root.join("self")).unwrap();
    let all = whole_body(&root, "all");
    let own = whole_body(&root, "own");
    std::fs::remove_dir_all(&root).unwrap();
    assert_eq!(all, own);
    assert!(
        all.contains(&format!(r#""connections":[{OWN_LISTENER}]"#)),
        "{all}"
    );
}
