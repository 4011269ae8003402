//! The real binary on a hostile or unlucky host: a full disk at registration, tools that fail
//! or flood, files that are FIFOs or devices, a clock that jumped ahead, stdout that fails,
//! stderr that is the journal.

mod support;

use support::agent::assert_code;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::agent::{server, Agent, Run, TempDir, ENROLLMENT_KEY};
use support::json::{get, len_at, str_at, u64_at};
use support::{ContractServer, Endpoint, Fault};

/// Waits for `child` at most `limit`; kills it when it is still running (a blocked read).
fn wait_bounded(mut child: Child, limit: Duration) -> Run {
    let start = Instant::now();
    while start.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap().into();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    let run: Run = child.wait_with_output().unwrap().into();
    panic!(
        "the agent still ran after {limit:?} (blocked?)\n--- stderr\n{}",
        run.stderr
    );
}

fn run_bounded(mut cmd: Command) -> Run {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn grapheon-agent");
    wait_bounded(child, Duration::from_secs(20))
}

/// A tmpfs of `kib` KiB mounted on a new directory, unmounted on drop.
struct SmallDisk {
    _root: TempDir,
    mount: PathBuf,
}

impl SmallDisk {
    fn new(tag: &str, kib: u32) -> SmallDisk {
        support::netns::require_root();
        let root = TempDir::new(tag);
        let mount = root.0.join("disk");
        fs::create_dir(&mount).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k,mode=0755"),
                "tmpfs",
            ])
            .arg(&mount)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs failed");
        SmallDisk { _root: root, mount }
    }

    /// Fills the disk: a file that grows until the kernel says ENOSPC.
    fn fill(&self) {
        let mut f = fs::File::create(self.mount.join("filler")).unwrap();
        let block = [0x5au8; 4096];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        // Nothing is left, not even one block for a new file.
        let probe = fs::write(self.mount.join("probe"), [1u8; 4096]);
        assert!(probe.is_err(), "the disk should be full");
        let _ = fs::remove_file(self.mount.join("probe"));
    }

    fn free(&self) {
        fs::remove_file(self.mount.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

/// An agent whose state directory lies on `disk`, with its identity already created (as a
/// pending registration would have left it).
fn agent_on(disk: &SmallDisk, srv: &ContractServer) -> Agent {
    let mut agent = Agent::new("fulldisk", &srv.url());
    let state = disk.mount.join("state");
    agent.set_env("GRAPHEON_AGENT_STATE_DIR", &state.display().to_string());
    agent.state_dir = state.clone();
    fs::create_dir(&state).unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(
        state.join("agent_uuid"),
        "5b0d7a52-2a6e-4c0e-9d55-0d7f3f8e1a01\n",
    )
    .unwrap();
    agent
}

#[test]
fn a_full_disk_stops_the_run_before_registering_and_the_next_run_gets_its_key() {
    let srv = server(true);
    let disk = SmallDisk::new("nospace", 256);
    let agent = agent_on(&disk, &srv);
    disk.fill();

    let run = agent.run(&["--register-only"]);
    assert_code(&run, 1);
    assert!(
        run.stderr
            .contains("nothing was sent to the server: no room for the API key"),
        "{}",
        run.stderr
    );
    assert_eq!(srv.registrations(), 0, "no key was issued into a full disk");

    disk.free();
    let run = agent.run(&["--force"]);
    assert_code(&run, 0);
    assert!(agent.file("api_key").unwrap().starts_with("gpak_"));
    assert_eq!(srv.checkins().len(), 1);
}

#[test]
fn a_key_issued_while_the_disk_fills_up_is_kept() {
    let srv = server(true);
    let disk = SmallDisk::new("fillsup", 256);
    let agent = agent_on(&disk, &srv);
    // The disk fills up while the server takes its time to answer.
    srv.inject(Endpoint::Register, Fault::Slow(Duration::from_secs(2)), 1);
    let child = agent
        .command(&["--register-only"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while srv.requests_to(Endpoint::Register).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "no registration");
        std::thread::sleep(Duration::from_millis(10));
    }
    disk.fill();
    let run = wait_bounded(child, Duration::from_secs(30));
    // The key is stored; only the state could not be saved after it.
    assert_code(&run, 1);
    assert!(agent.file("api_key").unwrap().starts_with("gpak_"));

    disk.free();
    let run = agent.run(&["--force"]);
    assert_code(&run, 0);
    assert_eq!(srv.registrations(), 1, "the key was never lost");
    assert_eq!(srv.checkins().len(), 1);
}

/// A directory of stand-in tools for `--collector commands`: `ip` answers from the checked-in
/// captures, unless `broken-<table>` exists in the directory; `ss` prints nothing.
fn stand_in_tools(dir: &Path) {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/commands");
    let ip = format!(
        "#!/bin/sh\n\
         env > \"{dir}/ip.env\"\n\
         if [ -e \"{dir}/broken-$2\" ]; then echo 'BusyBox v1.36.1 multi-call binary. Usage: ip [OPTIONS]' >&2; exit 1; fi\n\
         case $2 in\n\
         addr) exec cat {fixtures}/ns-ip-addr.json ;;\n\
         neigh) exec cat {fixtures}/ns-ip-neigh.json ;;\n\
         route) exec cat {fixtures}/ns-ip-route.json ;;\n\
         esac\n\
         exit 1\n",
        dir = dir.display()
    );
    for (name, text) in [("ip", ip.as_str()), ("ss", "#!/bin/sh\nexit 0\n")] {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[test]
fn a_table_no_source_could_read_is_flagged_and_keeps_its_records() {
    let srv = server(true);
    let mut agent = Agent::new("failedtable", &srv.url());
    let tools = agent.root.0.join("bin");
    fs::create_dir(&tools).unwrap();
    stand_in_tools(&tools);
    agent.set_env("PATH", &format!("{}:/usr/bin:/bin", tools.display()));
    agent.set_env("GRAPHEON_AGENT_COLLECTOR", "commands");

    assert_code(&agent.run(&["--force"]), 0);
    let routes = len_at(&srv.checkins()[0].json, "routes").unwrap();
    assert!(routes > 0, "the capture has routes");

    fs::write(tools.join("broken-route"), "").unwrap();
    let run = agent.run(&["--force"]);
    assert_code(&run, 0);
    let second = srv.checkins()[1].json.clone();
    assert_eq!(
        str_at(&second, "metadata.failed_tables.routes"),
        Some(
            "ip -json route show: ip -json route show failed with exit status 1: BusyBox v1.36.1 \
             multi-call binary. Usage: ip [OPTIONS]"
        ),
        "{}",
        run.stderr
    );
    assert_eq!(
        u64_at(&second, "metadata.removed_since_last_report.routes"),
        Some(0)
    );
    assert_eq!(len_at(&second, "routes"), Some(0));
    assert_eq!(
        len_at(&agent.state(), "last_snapshot.routes"),
        Some(routes),
        "the base keeps the routes"
    );

    // Readable again: nothing is new, so nothing is resent.
    fs::remove_file(tools.join("broken-route")).unwrap();
    assert_code(&agent.run(&["--force"]), 0);
    let third = &srv.checkins()[2].json;
    assert_eq!(len_at(third, "routes"), Some(0));
    assert!(get(third, "metadata.failed_tables").is_none());
}

/// Replaces the stand-in `ss` with one printing a listener on every IPv4 address and one
/// established connection.
fn ss_with_a_wildcard_listener(tools: &Path) {
    let ss = "#!/bin/sh\n\
              echo 'tcp LISTEN 0 128 0.0.0.0:22 0.0.0.0:* users:((\"sshd\",pid=1,fd=3))'\n\
              echo 'tcp ESTAB 0 0 198.51.100.1:22 198.51.100.2:50000 users:((\"sshd\",pid=2,fd=4))'\n";
    fs::write(tools.join("ss"), ss).unwrap();
}

#[test]
fn wildcard_listeners_are_kept_when_the_addresses_cannot_be_read() {
    let srv = server(true);
    let mut agent = Agent::new("wildcards", &srv.url());
    let tools = agent.root.0.join("bin");
    fs::create_dir(&tools).unwrap();
    stand_in_tools(&tools);
    ss_with_a_wildcard_listener(&tools);
    agent.set_env("PATH", &format!("{}:/usr/bin:/bin", tools.display()));
    agent.set_env("GRAPHEON_AGENT_COLLECTOR", "commands");
    fs::write(tools.join("broken-addr"), "").unwrap();

    // No addresses now and none accepted before: the listener has nothing to be reported
    // under and is left out (counted); the other connections still go.
    let run = run_bounded(agent.command(&["--dry-run"]));
    assert_code(&run, 0);
    let body = support::json::parse(run.stdout.lines().next().unwrap());
    assert_eq!(
        (
            get(&body, "metadata.failed_tables.connections").is_some(),
            u64_at(&body, "metadata.records_left_out"),
            len_at(&body, "connections"),
        ),
        (false, Some(1), Some(1)),
        "{}",
        run.stderr
    );

    fs::remove_file(tools.join("broken-addr")).unwrap();
    assert_code(&agent.run(&["--force"]), 0);
    let first = len_at(&srv.checkins()[0].json, "connections").unwrap();
    assert!(
        first > 2,
        "the listener is expanded over the addresses: {first}"
    );

    // Addresses failing now: the listener is expanded over the addresses last accepted, so
    // nothing counts as removed and nothing is resent as new.
    fs::write(tools.join("broken-addr"), "").unwrap();
    let run = agent.run(&["--force"]);
    assert_code(&run, 0);
    let second = &srv.checkins()[1].json;
    assert_eq!(
        (
            get(second, "metadata.failed_tables.connections").is_some(),
            u64_at(second, "metadata.records_left_out"),
            u64_at(second, "metadata.removed_since_last_report.connections"),
            len_at(second, "connections"),
            len_at(&agent.state(), "last_snapshot.connections"),
        ),
        (false, Some(0), Some(0), Some(0), Some(first)),
        "{}",
        run.stderr
    );
}

#[test]
fn a_tool_flooding_nested_json_fails_its_table_and_sees_no_secret() {
    let root = TempDir::new("flood");
    let tools = root.0.join("bin");
    fs::create_dir(&tools).unwrap();
    stand_in_tools(&tools);
    // 60 MB of `[` for the addresses, under the 64 MiB output cap; for the neighbours, 2 MiB of
    // 63-deep chains side by side, which pass a depth limit but took 150 MB to parse.
    let chain = format!("{}{}", "[".repeat(63), "]".repeat(63));
    let ip = fs::read_to_string(tools.join("ip"))
        .unwrap()
        .replace(
            "addr) exec cat",
            "addr) head -c 62914560 /dev/zero | tr '\\0' '[' ; exit 0 ; cat",
        )
        .replace(
            "neigh) exec cat",
            &format!(
                "neigh) printf '['; yes '{chain}' | head -n 16384 | paste -sd, -; printf ']'; \
                 exit 0; cat"
            ),
        );
    fs::write(tools.join("ip"), ip).unwrap();
    let mut agent = Agent::new("flood", "https://grapheon.invalid");
    agent.set_env("PATH", &format!("{}:/usr/bin:/bin", tools.display()));
    agent.set_env("GRAPHEON_AGENT_COLLECTOR", "commands");
    agent.set_env("GRAPHEON_AGENT_API_KEY_HEADER", "X-Secret-Header-Name");
    let run = run_bounded(agent.command(&["--dry-run"]));
    assert_code(&run, 0);
    let body = support::json::parse(run.stdout.lines().next().unwrap());
    assert_eq!(
        str_at(&body, "metadata.failed_tables.addresses"),
        Some(
            "ip -json addr show: ip -json addr show printed unusable output: JSON nested deeper \
             than 64 levels"
        )
    );
    assert_eq!(
        str_at(&body, "metadata.failed_tables.neighbors"),
        Some(
            "ip -json neigh show: ip -json neigh show printed unusable output: JSON with too \
             many values (parsing it would take more than 32768 KiB)"
        )
    );
    assert!(len_at(&body, "routes").unwrap() > 0);
    let env = fs::read_to_string(tools.join("ip.env")).unwrap();
    assert!(!env.contains(ENROLLMENT_KEY), "{env}");
    assert!(!env.contains("GRAPHEON_AGENT_"), "{env}");
}

#[test]
fn fifos_and_devices_named_as_files_fail_at_once() {
    let root = TempDir::new("fifo");
    let fifo = root.0.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let agent = Agent::new("fifo", "https://grapheon.invalid");

    let run = run_bounded(agent.command(&["--config", fifo.to_str().unwrap(), "--dry-run"]));
    assert_code(&run, 2);
    assert!(
        run.stderr.contains(&format!(
            "cannot read env file {}: not a regular file (it is a FIFO)",
            fifo.display()
        )),
        "{}",
        run.stderr
    );

    let run = run_bounded(agent.command(&["--ca-file", "/dev/zero", "--force"]));
    assert_code(&run, 2);
    assert!(
        run.stderr.contains(
            "cannot read CA file /dev/zero: not a regular file (it is a character device)"
        ),
        "{}",
        run.stderr
    );

    // A proc tree whose comm file is a FIFO, for a process that owns a real socket (so the
    // owner lookup reads it): skipped, not waited on. (The socket tables as FIFOs are tested
    // in procfs: sock_diag answers first here.)
    let proc_root = root.0.join("proc");
    fs::create_dir_all(proc_root.join("net")).unwrap();
    fs::create_dir_all(proc_root.join("1/fd")).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let inode = {
        use std::os::unix::io::AsRawFd;
        fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd()))
            .unwrap()
            .ino()
    };
    std::os::unix::fs::symlink(format!("socket:[{inode}]"), proc_root.join("1/fd/3")).unwrap();
    for path in ["net/tcp", "net/tcp6", "net/udp", "net/udp6", "1/comm"] {
        let c = std::ffi::CString::new(proc_root.join(path).to_str().unwrap()).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }
    let run = run_bounded(agent.command(&[
        "--collector",
        "native",
        "--proc-root",
        proc_root.to_str().unwrap(),
        "--dry-run",
    ]));
    assert_code(&run, 0);
    let port = listener.local_addr().unwrap().port();
    assert!(
        run.stderr.contains(&format!(
            "cannot read {}: not a regular file (it is a FIFO)",
            proc_root.join("1/comm").display()
        )),
        "the owner of port {port} was looked up: {}",
        run.stderr
    );
}

#[test]
fn a_clock_that_jumped_ahead_does_not_silence_the_agent() {
    let srv = server(true);
    let mut agent = Agent::new("clock", &srv.url());
    // The cadence applies (policy interval 3,600 s > timer 1 s) and there is no jitter.
    agent.set_env("GRAPHEON_AGENT_TIMER_INTERVAL_SECONDS", "1");
    assert_code(&agent.run(&[]), 0);
    assert_eq!(srv.checkins().len(), 1);
    let run = agent.run(&[]);
    assert_code(&run, 0);
    assert!(
        run.stderr.contains("last check-in is recent"),
        "{}",
        run.stderr
    );
    assert_eq!(srv.checkins().len(), 1);

    let path = agent.state_dir.join("state.json");
    let text = fs::read_to_string(&path).unwrap();
    let at = str_at(&agent.state(), "last_successful_checkin_at")
        .unwrap()
        .to_string();
    let future = format!("2099{}", &at[4..]);
    fs::write(&path, text.replace(&at, &future)).unwrap();
    let run = agent.run(&[]);
    assert_code(&run, 0);
    assert!(
        run.stderr.contains("is in the future (now 20")
            && run.stderr.contains("treating it as due now"),
        "{}",
        run.stderr
    );
    assert_eq!(srv.checkins().len(), 2);
}

#[test]
fn stdout_failures_are_messages_not_panics() {
    let agent = Agent::new("stdout", "https://grapheon.invalid");
    // A reader that is gone before the help is written.
    let mut child = agent
        .command(&["--help"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let run: Run = child.wait_with_output().unwrap().into();
    assert_code(&run, 0);
    assert_eq!(run.stderr, "");

    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let run: Run = agent
        .command(&["--status"])
        .stdout(full)
        .output()
        .unwrap()
        .into();
    assert_code(&run, 1);
    assert_eq!(
        run.stderr,
        "grapheon-agent error: cannot write to standard output: No space left on device (os error 28)\n"
    );
}

#[test]
fn the_agent_cannot_be_dumped_or_traced() {
    support::netns::require_root();
    // As an ordinary user, so that /proc shows the process as root's once it is not dumpable.
    let agent = Agent::new("dump", "https://grapheon.invalid");
    let mut child = agent
        .command(&["--set-api-key"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .uid(65534)
        .gid(65534)
        .spawn()
        .unwrap();
    let status = PathBuf::from(format!("/proc/{}/status", child.id()));
    let limits = PathBuf::from(format!("/proc/{}/limits", child.id()));
    let start = Instant::now();
    // Waiting on stdin: the binary has started (its exec image is the agent's) once the
    // process name changes.
    while !fs::read_to_string(&status)
        .unwrap_or_default()
        .contains("grapheon-agent")
        && start.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let owner = fs::metadata(&status).unwrap().uid();
    let core = fs::read_to_string(&limits)
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap()
        .split_whitespace()
        .skip(4)
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    drop(child.stdin.take());
    child.wait().unwrap();
    assert_eq!((owner, core.as_str()), (0, "0 0"));
}

#[test]
fn log_lines_carry_journal_priorities_only_when_stderr_is_the_journal() {
    let root = TempDir::new("journal");
    let log = root.0.join("stderr");
    let agent = Agent::new("journal", "https://grapheon.invalid");
    let file = fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let status = agent
        .command(&["--bogus"])
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(file)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        "<3>grapheon-agent error: unknown argument '--bogus' (see --help)\n"
    );

    // Inherited, but stderr is another file now: plain lines.
    let run: Run = agent
        .command(&["--bogus"])
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .output()
        .unwrap()
        .into();
    assert_eq!(
        run.stderr,
        "grapheon-agent error: unknown argument '--bogus' (see --help)\n"
    );
}

#[test]
fn misleading_messages_are_fixed() {
    let srv = server(true);
    let mut agent = Agent::new("messages", "http://[::1");
    let run = agent.run(&["--force"]);
    assert_code(&run, 2);
    assert_eq!(
        run.stderr,
        "grapheon-agent error: GRAPHEON_AGENT_SERVER_URL in the environment: 'http://[::1' is \
         not a usable URL: an IPv6 address in brackets lacks its closing ']' (see --help)\n"
    );

    // What the HTTP client refuses is refused now, not retried on every run.
    agent.set_env("GRAPHEON_AGENT_SERVER_URL", "http://127.0.0.1:9/a<b>");
    let run = agent.run(&["--register-only"]);
    assert_code(&run, 2);
    assert_eq!(
        run.stderr,
        "grapheon-agent error: GRAPHEON_AGENT_SERVER_URL in the environment: \
         'http://127.0.0.1:9/a<b>' is not a usable URL: the HTTP client refuses it (invalid uri \
         character) (see --help)\n"
    );
    // A password in the URL is never shown.
    agent.set_env(
        "GRAPHEON_AGENT_SERVER_URL",
        "https://user:secret@127.0.0.1:9",
    );
    let run = agent.run(&["--register-only"]);
    assert_code(&run, 2);
    assert_eq!(
        run.stderr,
        "grapheon-agent error: GRAPHEON_AGENT_SERVER_URL in the environment: \
         'https://***@127.0.0.1:9' is not a usable URL: user names or passwords in the URL are \
         not supported (see --help)\n"
    );

    // Nothing listens on the port of a server that was just stopped.
    let gone = ContractServer::start();
    let url = gone.url();
    drop(gone);
    agent.set_env("GRAPHEON_AGENT_SERVER_URL", &url);
    let run = agent.run(&["--register-only"]);
    assert_code(&run, 1);
    assert!(
        run.stderr
            .contains(&format!("registration failed: {url}/api/agents/register: ")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(&format!(
            "{url} is plain http://: the enrollment and API keys cross the network unencrypted"
        )),
        "{}",
        run.stderr
    );

    // No enrollment key: the message names the env file actually read.
    let env_file = agent.root.0.join("agent.env");
    fs::write(
        &env_file,
        format!("GRAPHEON_AGENT_SERVER_URL={}\n", srv.url()),
    )
    .unwrap();
    fs::set_permissions(&env_file, fs::Permissions::from_mode(0o644)).unwrap();
    // Another user's file could point the agent at their server.
    std::os::unix::fs::chown(&env_file, Some(65534), None).unwrap();
    agent
        .env
        .retain(|(k, _)| k != "GRAPHEON_AGENT_ENROLLMENT_KEY" && k != "GRAPHEON_AGENT_SERVER_URL");
    agent.set_env("GRAPHEON_AGENT_CONFIG", env_file.to_str().unwrap());
    let run = agent.run(&["--register-only"]);
    assert_code(&run, 2);
    assert!(
        run.stderr.contains(&format!(
            "env file {} is accessible to every user (mode 0644) and may hold the enrollment key",
            env_file.display()
        )),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(&format!(
            "env file {} belongs to user 65534, who can point the agent at another server and so \
             receive its keys: chown 0 {}",
            env_file.display(),
            env_file.display()
        )),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(&format!(
            "no enrollment key: set GRAPHEON_AGENT_ENROLLMENT_KEY in {}",
            env_file.display()
        )),
        "{}",
        run.stderr
    );

    let run = agent.run(&["--state-dir", "/a", "--state-dir=/b"]);
    assert_code(&run, 2);
    assert_eq!(
        run.stderr,
        "grapheon-agent error: --state-dir is given more than once (see --help)\n"
    );
}
