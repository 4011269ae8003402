//! Runs the real agent binary in a private state directory, with a clean environment.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use miniserde::json::Value;

/// The enrollment key the tests register with.
pub const ENROLLMENT_KEY: &str = "gaek_integrationTestEnrollmentKey0001";

/// A contract server that knows [`ENROLLMENT_KEY`] and approves its agents at once or leaves
/// them waiting for an administrator.
pub fn server(auto_approve: bool) -> super::ContractServer {
    let srv = super::ContractServer::start();
    let key = if auto_approve {
        super::EnrollmentKey::auto_approve()
    } else {
        super::EnrollmentKey::default()
    };
    srv.add_enrollment_key(ENROLLMENT_KEY, key);
    srv
}

/// The agent binary cargo built for the integration tests (`option_env!`: the benchmark's
/// server, an example, compiles this module without one).
fn agent_binary() -> &'static str {
    match option_env!("CARGO_BIN_EXE_grapheon-agent") {
        Some(path) => path,
        None => panic!("the agent binary is built for integration tests only"),
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new, empty, unique directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        TempDir::new_in(&std::env::temp_dir(), tag)
    }

    /// A new, empty, unique directory under `base`.
    pub fn new_in(base: &Path, tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = base.join(format!(
            "grapheon-it-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        // Whatever the umask: the agent refuses a state directory inside one others can write.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One agent installation: a state directory and the server it talks to.
pub struct Agent {
    pub root: TempDir,
    pub state_dir: PathBuf,
    pub env: Vec<(String, String)>,
}

/// What one run did.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Asserts a run's exit code, showing what it printed when the code is another.
pub fn assert_code(run: &Run, code: i32) {
    assert_eq!(
        run.code, code,
        "exit code\n--- stdout\n{}\n--- stderr\n{}",
        run.stdout, run.stderr
    );
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Agent {
    /// An agent with an empty state directory, configured through the environment only (the
    /// host's /etc/grapheon-agent.env is never read: GRAPHEON_AGENT_CONFIG points to /dev/null).
    pub fn new(tag: &str, server_url: &str) -> Agent {
        Agent::new_in(&std::env::temp_dir(), tag, server_url)
    }

    /// [`Agent::new`] with the state directory under `base` (a filesystem of the test's choice:
    /// the system temp dir may be a tmpfs, which counts no writes).
    pub fn new_in(base: &Path, tag: &str, server_url: &str) -> Agent {
        let root = TempDir::new_in(base, tag);
        let state_dir = root.0.join("state");
        let env = vec![
            ("GRAPHEON_AGENT_CONFIG".to_string(), "/dev/null".to_string()),
            (
                "GRAPHEON_AGENT_SERVER_URL".to_string(),
                server_url.to_string(),
            ),
            (
                "GRAPHEON_AGENT_STATE_DIR".to_string(),
                state_dir.display().to_string(),
            ),
            (
                "GRAPHEON_AGENT_ENROLLMENT_KEY".to_string(),
                ENROLLMENT_KEY.to_string(),
            ),
            (
                "GRAPHEON_AGENT_REQUEST_TIMEOUT_SECONDS".to_string(),
                "20".to_string(),
            ),
            ("GRAPHEON_AGENT_LOG_LEVEL".to_string(), "debug".to_string()),
            // The machine's other namespaces (other tests' scenes) stay out of these reports;
            // tests/namespaces.rs sets `all` on a /proc of its own.
            ("GRAPHEON_AGENT_NAMESPACES".to_string(), "own".to_string()),
        ];
        let mut agent = Agent {
            root,
            state_dir,
            env,
        };
        // The whole suite can be run against one collector: GRAPHEON_TEST_COLLECTOR=commands.
        if let Ok(mode) = std::env::var("GRAPHEON_TEST_COLLECTOR") {
            agent.set_env("GRAPHEON_AGENT_COLLECTOR", &mode);
        }
        agent
    }

    /// Sets (or replaces) one environment variable of later runs.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// The command for one run, not yet started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(agent_binary());
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// The command for one run inside a network namespace (`ip netns exec`).
    pub fn command_in(&self, netns: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["netns", "exec", netns, agent_binary()])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the agent to completion inside a network namespace.
    pub fn run_in(&self, netns: &str, args: &[&str]) -> Run {
        self.command_in(netns, args)
            .output()
            .expect("run grapheon-agent in a namespace")
            .into()
    }

    /// Runs the agent to completion.
    pub fn run(&self, args: &[&str]) -> Run {
        self.command(args)
            .output()
            .expect("run grapheon-agent")
            .into()
    }

    /// Runs the agent with `input` on standard input.
    pub fn run_with_stdin(&self, args: &[&str], input: &str) -> Run {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn grapheon-agent");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child
            .wait_with_output()
            .expect("wait for grapheon-agent")
            .into()
    }

    /// A file of the state directory, if it exists.
    pub fn file(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.state_dir.join(name)).ok()
    }

    /// The agent's identity (after its first run).
    pub fn uuid(&self) -> String {
        self.file("agent_uuid")
            .expect("agent_uuid")
            .trim()
            .to_string()
    }

    /// The `checkin` member of `checkin.rec` (the small fields of the last check-in), read
    /// with the agent's own reader.
    pub fn checkin_record(&self) -> Option<String> {
        grapheon_agent::state::StateDir::existing(&self.state_dir).checkin_record()
    }

    /// The `pacing` member of `checkin.rec` (what the agent learned about the server's pace).
    pub fn pacing_record(&self) -> Option<String> {
        grapheon_agent::state::StateDir::existing(&self.state_dir)
            .pacing_record()
            .expect("the saved pace is not damaged")
    }

    /// Replaces the `pacing` member of `checkin.rec`, durably, as a run saving its pace does
    /// (call while no run holds the lock).
    pub fn set_pacing_record(&self, pacing: &str) {
        let dir = grapheon_agent::state::StateDir::create(&self.state_dir).expect("state dir");
        dir.save_pacing(
            pacing.to_string(),
            grapheon_agent::state::Durability::Synced,
        )
        .expect("the pace is written");
    }

    /// `state.json`, parsed, with the small fields of `checkin.rec` laid over it when they
    /// name this very `state.json` (inode, size, mtime), as the agent reads them.
    pub fn state(&self) -> Value {
        let mut state: Value =
            miniserde::json::from_str(&self.file("state.json").expect("state.json"))
                .expect("state.json is JSON");
        let Some(text) = self.checkin_record() else {
            return state;
        };
        let cursor: Value = miniserde::json::from_str(&text).expect("the record is JSON");
        let meta = fs::metadata(self.state_dir.join("state.json")).unwrap();
        let id = format!(
            "{}:{}:{}:{}.{:09}",
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec()
        );
        let (Value::Object(fields), Value::Object(into)) = (cursor, &mut state) else {
            panic!("state.json and the record's checkin member are objects");
        };
        if matches!(fields.get("state_file"), Some(Value::String(s)) if *s == id) {
            for (key, value) in fields {
                if !matches!(
                    key.as_str(),
                    "state_file" | "report_file" | "report_length" | "report_full"
                ) {
                    into.insert(key, value);
                }
            }
        }
        state
    }

    /// Permission bits of a path.
    pub fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }
}
