//! Sockets of other network namespaces, on a scene of real ones (root; CI runs as root).
//!
//! The agent runs in namespace `host` and looks at a pid namespace of the test's own (its
//! `/proc` is `--proc-root`), so the machine's other processes and namespaces stay out of
//! the report and every record can be asserted. Around `host`:
//! - `c1`, a "Docker container" (its process in `docker-<id>.scope`): listeners on
//!   `0.0.0.0:8080` and a dual-stack `[::]:8443`, a loopback listener with a connection to
//!   itself; linked to `host` by a veth and to `c2` by another;
//! - `c2`, a "Kubernetes pod" (`kubepods/.../pod<uid>/<id>`, cgroup v1 where the machine
//!   has a v1 hierarchy, v2 otherwise): connections to both of c1's listeners, a UDP socket;
//! - `c3`, a "systemd service" with no address but loopback: a wildcard listener that has no
//!   address to be reported under, and a loopback listener.
//!
//! Every address is inside these namespaces (10.201.0.0/16, fd00:201::/32); nothing leaves.

#[path = "equivalence/holder.rs"]
#[allow(dead_code)] // Holder::start serves the equivalence tests
mod holder;
#[path = "equivalence/namespace.rs"]
mod namespace;
mod support;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use holder::{Holder, Spec};
use miniserde::json::Value;
use namespace::{ip_command, require_root, Namespace};
use support::agent::{Agent, ENROLLMENT_KEY};
use support::json::{get, str_at};
use support::{ContractServer, EnrollmentKey};

/// Not a test: the entry point of the socket-holding child processes (see
/// `equivalence/holder.rs`). Under a plain `cargo test` it returns at once.
#[test]
fn socket_holder_child_process() {
    holder::child_main();
}

const DOCKER_ID: &str = "5d2c8b1e9f3a4c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d";
const POD_CONTAINER_ID: &str = "e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f70";
const POD_UID: &str = "4f7d2c1a-9b3e-4d5f-8a6b-0c1d2e3f4a5b";

/// The cgroup hierarchies of this machine: the v2 mount and a v1 one, where they exist.
struct Hierarchies {
    v2: Option<PathBuf>,
    v1: Option<PathBuf>,
}

impl Hierarchies {
    fn detect() -> Hierarchies {
        let mounts = std::fs::read_to_string("/proc/self/mounts").expect("/proc/self/mounts");
        let mut found = Hierarchies { v2: None, v1: None };
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [_, dir, kind, options, ..] = f.as_slice() else {
                continue;
            };
            match *kind {
                "cgroup2" if found.v2.is_none() => found.v2 = Some(PathBuf::from(dir)),
                "cgroup" if found.v1.is_none() && options.split(',').any(|o| o == "pids") => {
                    found.v1 = Some(PathBuf::from(dir))
                }
                _ => {}
            }
        }
        assert!(
            found.v2.is_some() || found.v1.is_some(),
            "no cgroup hierarchy mounted: {mounts}"
        );
        found
    }
}

/// Cgroup directories made for the scene, removed (deepest first) on drop.
struct Cgroups(Vec<PathBuf>);

impl Cgroups {
    /// Creates `<root>/ga-test-<pid>-<tag>/<path>` and returns the leaf.
    fn make(&mut self, root: &Path, tag: &str, path: &str) -> String {
        let top = root.join(format!("ga-test-{}-{tag}", std::process::id()));
        let mut dir = top.clone();
        self.0.push(top);
        for part in path.split('/') {
            dir = dir.join(part);
            self.0.push(dir.clone());
        }
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        dir.display().to_string()
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        // The processes are gone once their pid namespace is; the kernel needs a moment.
        for dir in self.0.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A pid namespace with its own `/proc`, started inside `host` so that its init adds no
/// namespace; every process in it dies with it.
struct PidNamespace {
    unshare: Child,
    init: u32,
}

impl PidNamespace {
    fn start(host: &Namespace) -> PidNamespace {
        let mut unshare = host
            .exec("unshare")
            .args(["--pid", "--fork", "--mount-proc", "sleep", "3600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start unshare (util-linux)");
        let children = format!("/proc/{0}/task/{0}/children", unshare.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        let init = loop {
            let text = std::fs::read_to_string(&children).unwrap_or_default();
            if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
                break pid;
            }
            if Instant::now() > deadline {
                let _ = unshare.kill();
                panic!("unshare started no init");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        PidNamespace { unshare, init }
    }

    /// What the agent is given as `--proc-root`: the `/proc` of this pid namespace.
    fn proc_root(&self) -> String {
        format!("/proc/{}/root/proc", self.init)
    }

    /// A command that runs the test binary as a holder inside this pid namespace and `net`.
    fn holder(&self, net: &Namespace) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.init))
            .arg("--pid")
            .arg(format!("--net=/run/netns/{}", net.name))
            .arg("--")
            .arg(std::env::current_exe().expect("test binary path"));
        cmd
    }
}

impl Drop for PidNamespace {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; `init` is our descendant (unshare's child).
        unsafe { libc::kill(self.init as libc::pid_t, libc::SIGKILL) };
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

/// The inode of a named network namespace, as `/proc/<pid>/ns/net` links name it.
fn inode(ns: &Namespace) -> u64 {
    std::fs::metadata(format!("/run/netns/{}", ns.name))
        .expect("stat the namespace")
        .ino()
}

/// The whole scene. Fields drop in order: holders with their pid namespace, then cgroups,
/// then the network namespaces.
struct Scene {
    web: Holder,
    client: Holder,
    svc: Holder,
    pids: PidNamespace,
    _cgroups: Cgroups,
    host: Namespace,
    c1: Namespace,
    c2: Namespace,
    c3: Namespace,
}

impl Scene {
    fn new(tag: &str) -> Scene {
        require_root();
        assert!(ip_command().is_some());
        let (host, c1, c2, c3) = (
            Namespace::new(),
            Namespace::new(),
            Namespace::new(),
            Namespace::new(),
        );
        // addrgenmode none: no automatic link-local addresses, so no router solicitations or
        // DAD and exactly the addresses listed here.
        let link = |a: &Namespace, an: &str, b: &Namespace, bn: &str| {
            a.ip(&format!("link add {an} type veth peer name {bn}"));
            a.ip(&format!("link set {bn} netns {}", b.name));
            a.ip(&format!("link set {an} addrgenmode none"));
            b.ip(&format!("link set {bn} addrgenmode none"));
        };
        link(&host, "vh1", &c1, "eth0");
        link(&host, "vh2", &c2, "eth0");
        link(&c1, "x12", &c2, "x21");
        host.ip_batch(
            "link set vh1 address 02:00:00:20:01:01\nlink set vh2 address 02:00:00:20:02:01\n\
             addr add 10.201.1.1/24 dev vh1\naddr add 10.201.2.1/24 dev vh2\n\
             link set vh1 up\nlink set vh2 up\n",
        );
        c1.ip_batch(
            "addr add 10.201.1.2/24 dev eth0\naddr add 10.201.12.1/24 dev x12\n\
             addr add fd00:201:12::1/64 dev x12 nodad\nlink set eth0 up\nlink set x12 up\n",
        );
        c2.ip_batch(
            "addr add 10.201.2.2/24 dev eth0\naddr add 10.201.12.2/24 dev x21\n\
             addr add fd00:201:12::2/64 dev x21 nodad\nlink set eth0 up\nlink set x21 up\n",
        );
        // Many routes, and many of one prefix (metrics), sorting before the addresses: the
        // kernel gives each fib_trie leaf, all its routes, as one record and answers a read
        // short before one that does not fit, so the addresses' LOCAL entries after it are only
        // read by reading to the end. No traffic takes these routes.
        let mut routes: String = (0..50)
            .map(|i| format!("route add 10.199.{i}.0/24 dev eth0\n"))
            .collect();
        routes.extend((1..=200).map(|m| format!("route add 10.200.0.0/16 dev eth0 metric {m}\n")));
        c2.ip_batch(&routes);

        let found = Hierarchies::detect();
        let mut cgroups = Cgroups(Vec::new());
        let docker = match (&found.v2, &found.v1) {
            (Some(v2), _) => cgroups.make(v2, tag, &format!("docker-{DOCKER_ID}.scope")),
            (None, Some(v1)) => cgroups.make(v1, tag, &format!("docker/{DOCKER_ID}")),
            _ => unreachable!(),
        };
        let pod = match (&found.v1, &found.v2) {
            (Some(v1), _) => cgroups.make(
                v1,
                tag,
                &format!("kubepods/besteffort/pod{POD_UID}/{POD_CONTAINER_ID}"),
            ),
            (None, Some(v2)) => {
                let uid = POD_UID.replace('-', "_");
                cgroups.make(
                    v2,
                    tag,
                    &format!(
                        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/cri-containerd-{POD_CONTAINER_ID}.scope"
                    ),
                )
            }
            _ => unreachable!(),
        };
        let service = match (&found.v2, &found.v1) {
            (Some(root), _) | (None, Some(root)) => {
                cgroups.make(root, tag, "system.slice/ga\\x2disolated.service")
            }
            _ => unreachable!(),
        };

        let pids = PidNamespace::start(&host);
        let web = Holder::spawn(
            pids.holder(&c1),
            &Spec {
                name: "web",
                listen: vec!["0.0.0.0:8080", "[::]:8443", "127.0.0.1:9000"],
                connect: vec!["127.0.0.1:9000"],
                cgroup: Some(docker),
                ..Spec::default()
            },
            false,
        );
        let mut web = web;
        web.wait_for("accepted", 1);
        let client = Holder::spawn(
            pids.holder(&c2),
            &Spec {
                name: "client",
                connect: vec!["10.201.12.1:8080", "[fd00:201:12::1]:8443"],
                udp: vec!["10.201.2.2:5353"],
                cgroup: Some(pod),
                ..Spec::default()
            },
            false,
        );
        web.wait_for("accepted", 3);
        let svc = Holder::spawn(
            pids.holder(&c3),
            &Spec {
                name: "svc",
                listen: vec!["0.0.0.0:9100", "127.0.0.1:9101"],
                cgroup: Some(service),
                ..Spec::default()
            },
            false,
        );
        Scene {
            web,
            client,
            svc,
            pids,
            _cgroups: cgroups,
            host,
            c1,
            c2,
            c3,
        }
    }

    /// The agent's `--dry-run` in `host`, looking at the scene's pid namespace.
    fn dry_run(&self, namespaces: &str) -> Value {
        let out = self
            .host
            .exec(env!("CARGO_BIN_EXE_grapheon-agent"))
            .args(["--dry-run", "--collector", "native", "--log-level", "debug"])
            .args(["--state-dir", "/nonexistent/grapheon-agent-namespaces"])
            .args(["--proc-root", &self.pids.proc_root()])
            .args(["--namespaces", namespaces])
            .env_clear()
            .env("GRAPHEON_AGENT_CONFIG", "/dev/null")
            .stdin(Stdio::null())
            .output()
            .expect("run grapheon-agent");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.lines().count(), 1, "one body: {stdout}");
        miniserde::json::from_str(stdout.trim()).expect("a JSON body")
    }

    fn pid(holder: &Holder, name: &str) -> u32 {
        holder.pid(name)
    }

    /// The (local, peer) of each connection a holder opened, as text.
    fn opened(holder: &Holder) -> Vec<(String, u16, String, u16)> {
        holder
            .connections()
            .into_iter()
            .map(|(l, p)| (l.ip().to_string(), l.port(), p.ip().to_string(), p.port()))
            .collect()
    }
}

fn records(body: &Value, table: &str) -> Vec<String> {
    match get(body, table) {
        Some(Value::Array(items)) => items.iter().map(support::json::to_string).collect(),
        _ => panic!("{table} is not an array"),
    }
}

/// One connection record as the agent renders it (keys sorted).
#[allow(clippy::too_many_arguments)]
fn connection(
    protocol: &str,
    local: (&str, u16),
    remote: (&str, Option<u16>),
    state: &str,
    owner: Option<(u32, &str)>,
) -> String {
    let (pid, name) = match owner {
        Some((pid, name)) => (pid.to_string(), format!("\"{name}\"")),
        None => ("null".into(), "null".into()),
    };
    let port = remote.1.map_or("null".into(), |p| p.to_string());
    format!(
        r#"{{"local_ip":"{}","local_port":{},"pid":{pid},"process_name":{name},"protocol":"{protocol}","remote_ip":"{}","remote_port":{port},"state":"{state}"}}"#,
        local.0, local.1, remote.0
    )
}

/// Sorted as the report sorts: protocol, then local address and port, then remote.
fn sorted(mut v: Vec<String>) -> Vec<String> {
    // The report's order is the records' typed order; re-deriving it from the text would
    // need the same types, so the expected list is sorted by parsing the fields it orders by.
    v.sort_by_key(|r| {
        let value: Value = miniserde::json::from_str(r).unwrap();
        let ip = |k: &str| {
            str_at(&value, k)
                .and_then(|s| s.parse::<std::net::IpAddr>().ok())
                .expect("ip")
        };
        let num = |k: &str| support::json::u64_at(&value, k);
        (
            str_at(&value, "protocol").unwrap().to_string(),
            ip("local_ip"),
            num("local_port"),
            ip("remote_ip"),
            num("remote_port"),
        )
    });
    v
}

fn expected_connections(scene: &Scene) -> Vec<String> {
    let web = Some((Scene::pid(&scene.web, "web"), "web"));
    let client = Some((Scene::pid(&scene.client, "client"), "client"));
    let out = Scene::opened(&scene.client);
    assert_eq!(out.len(), 2, "{out:?}");
    let (v4, v6) = (&out[0], &out[1]);
    let mut want = vec![
        // c1: 0.0.0.0:8080 under each IPv4 address of c1; [::]:8443 alone is dual-stack.
        connection(
            "tcp",
            ("10.201.1.2", 8080),
            ("0.0.0.0", None),
            "listen",
            web,
        ),
        connection(
            "tcp",
            ("10.201.12.1", 8080),
            ("0.0.0.0", None),
            "listen",
            web,
        ),
        connection("tcp", ("10.201.1.2", 8443), ("::", None), "listen", web),
        connection("tcp", ("10.201.12.1", 8443), ("::", None), "listen", web),
        connection("tcp", ("fd00:201:12::1", 8443), ("::", None), "listen", web),
        // c1's ends of c2's connections, accepted by web.
        connection(
            "tcp",
            ("10.201.12.1", 8080),
            (&v4.0, Some(v4.1)),
            "established",
            web,
        ),
        connection(
            "tcp",
            ("fd00:201:12::1", 8443),
            (&v6.0, Some(v6.1)),
            "established",
            web,
        ),
        // c2's ends.
        connection(
            "tcp",
            (&v4.0, v4.1),
            ("10.201.12.1", Some(8080)),
            "established",
            client,
        ),
        connection(
            "tcp",
            (&v6.0, v6.1),
            ("fd00:201:12::1", Some(8443)),
            "established",
            client,
        ),
        connection(
            "udp",
            ("10.201.2.2", 5353),
            ("0.0.0.0", None),
            "unknown",
            client,
        ),
    ];
    want = sorted(want);
    want
}

fn expected_metadata(scene: &Scene) -> String {
    let docker =
        format!(r#""runtime":"docker","container_id":"{DOCKER_ID}","pod_uid":null,"name":null"#);
    let pod = format!(
        r#""runtime":"containerd","container_id":"{POD_CONTAINER_ID}","pod_uid":"{POD_UID}","name":null"#
    );
    let service =
        r#""runtime":"systemd","container_id":null,"pod_uid":null,"name":"ga-isolated.service""#;
    let item = |ns: &Namespace, pid: u32, name: &str, who: &str, addresses: &str, counts: &str| {
        format!(
            r#"{{"inode":{},"pid":{pid},"process_name":"{name}",{who},"addresses":[{addresses}],{counts}}}"#,
            inode(ns)
        )
    };
    format!(
        r#"{{"collected":3,"over_cap":0,"listed":3,"list":[{},{},{}]}}"#,
        item(
            &scene.c1,
            Scene::pid(&scene.web, "web"),
            "web",
            &docker,
            r#""10.201.1.2","10.201.12.1","fd00:201:12::1""#,
            r#""sockets":7,"connections":7,"loopback_left_out":3"#
        ),
        item(
            &scene.c2,
            Scene::pid(&scene.client, "client"),
            "client",
            &pod,
            r#""10.201.2.2","10.201.12.2","fd00:201:12::2""#,
            r#""sockets":3,"connections":3,"loopback_left_out":0"#
        ),
        item(
            &scene.c3,
            Scene::pid(&scene.svc, "svc"),
            "svc",
            service,
            "",
            r#""sockets":2,"connections":0,"loopback_left_out":1"#
        ),
    )
}

/// Keys sorted, as miniserde renders objects.
fn canonical(json: &str) -> String {
    miniserde::json::to_string(&miniserde::json::from_str::<Value>(json).unwrap())
}

fn metadata_of(body: &Value) -> Value {
    match get(body, "metadata") {
        Some(m @ Value::Object(_)) => m.clone(),
        _ => panic!("no metadata"),
    }
}

#[test]
fn other_namespaces_are_reported_with_owners_expansion_and_attribution() {
    let scene = Scene::new("dry");
    let all = scene.dry_run("all");
    assert_eq!(records(&all, "connections"), expected_connections(&scene));
    let meta = metadata_of(&all);
    assert_eq!(
        get(&meta, "namespaces").map(support::json::to_string),
        Some(canonical(&expected_metadata(&scene)))
    );
    // c3's 0.0.0.0:9100 has no address to be reported under.
    assert_eq!(support::json::u64_at(&meta, "records_left_out"), Some(1));
    // Container addresses are not this host's: only host's own interfaces are listed.
    assert_eq!(
        records(&all, "addresses"),
        [
            r#"{"interface":"vh1","ip_address":"10.201.1.1","mac_address":"02:00:00:20:01:01","prefix_length":24}"#,
            r#"{"interface":"vh2","ip_address":"10.201.2.1","mac_address":"02:00:00:20:02:01","prefix_length":24}"#,
        ]
    );

    // `own` is the report of a single-namespace host: the same body without the other
    // namespaces' connections, metadata.namespaces and their left-out record.
    let own = scene.dry_run("own");
    assert_eq!(records(&own, "connections"), Vec::<String>::new());
    let mut expected = all.clone();
    let mut own_body = own.clone();
    for body in [&mut expected, &mut own_body] {
        let Value::Object(o) = body else { panic!() };
        o.remove("observed_at");
        o.insert("connections".into(), Value::Array(Default::default()));
        if let Some(Value::Object(m)) = o.get_mut("metadata") {
            m.remove("namespaces");
            m.remove("records_left_out");
        }
    }
    assert_eq!(
        support::json::to_string(&own_body),
        support::json::to_string(&expected)
    );
    assert_eq!(
        support::json::u64_at(&metadata_of(&own), "records_left_out"),
        Some(0)
    );
}

/// Runs `f` on a thread inside `ns` (sockets it opens stay there).
fn inside<T: Send>(ns: &Namespace, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a namespace fd we own; it changes only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread inside the namespace")
    })
}

/// The body's connections that are not on the host namespace's loopback (the agent's own
/// HTTP connections to the server are there).
fn scene_connections(body: &Value) -> Vec<String> {
    records(body, "connections")
        .into_iter()
        .filter(|c| !c.contains(r#""local_ip":"127.0.0.1""#))
        .collect()
}

#[test]
fn other_namespaces_are_accepted_by_the_server_and_sent_as_a_delta() {
    let mut scene = Scene::new("server");
    let srv = inside(&scene.host, ContractServer::start);
    srv.add_enrollment_key(ENROLLMENT_KEY, EnrollmentKey::auto_approve());
    let mut agent = Agent::new("namespaces", &srv.url());
    agent.set_env("GRAPHEON_AGENT_NAMESPACES", "all");
    agent.set_env("GRAPHEON_AGENT_PROC_ROOT", &scene.pids.proc_root());
    agent.set_env("GRAPHEON_AGENT_COLLECTOR", "native");

    let run = agent.run_in(&scene.host.name, &["--force"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(srv.requests().iter().all(|r| r.status == Some(200)));
    let first = srv.checkins().pop().expect("a check-in").json;
    assert_eq!(scene_connections(&first), expected_connections(&scene));
    assert_eq!(
        get(&metadata_of(&first), "namespaces").map(support::json::to_string),
        Some(canonical(&expected_metadata(&scene)))
    );

    // One more connection from the pod to the container: the next report is a delta with
    // exactly its two ends.
    let again = Holder::spawn(
        scene.pids.holder(&scene.c2),
        &Spec {
            name: "again",
            connect: vec!["10.201.12.1:8080"],
            ..Spec::default()
        },
        false,
    );
    scene.web.wait_for("accepted", 4);
    let (local, _) = again.connections()[0];
    let pid = again.pid("again");
    let run = agent.run_in(&scene.host.name, &["--force"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let second = srv.checkins().pop().expect("a second check-in").json;
    assert_eq!(
        support::json::bool_at(&second, "full_snapshot"),
        Some(false)
    );
    let web = Some((scene.web.pid("web"), "web"));
    let port = local.port();
    assert_eq!(
        scene_connections(&second),
        sorted(vec![
            connection(
                "tcp",
                ("10.201.12.1", 8080),
                ("10.201.12.2", Some(port)),
                "established",
                web
            ),
            connection(
                "tcp",
                ("10.201.12.2", port),
                ("10.201.12.1", Some(8080)),
                "established",
                Some((pid, "again"))
            ),
        ])
    );
    assert!(srv.requests().iter().all(|r| r.status == Some(200)));
    drop(again);
}
