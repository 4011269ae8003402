//! Runs the agent's `--dry-run` inside a namespace and turns its output into comparable sets.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use miniserde::json::{Number, Object, Value};

use super::namespace::Namespace;

/// The four tables, in report order.
pub const TABLES: [&str; 4] = ["addresses", "neighbors", "connections", "routes"];
const TIMEOUT: Duration = Duration::from_secs(60);

/// One table's records, each rendered as canonical JSON (keys sorted, as miniserde's objects
/// are), so that records compare as whole values.
pub type Records = BTreeSet<String>;

/// What one `--dry-run` printed.
pub struct DryRun {
    /// Each body without its tables, `observed_at` and `metadata.collector` (the only fields
    /// that may differ between two collectors run one after the other).
    pub headers: Vec<String>,
    /// Every body's records, table by table (a report in several parts is joined).
    pub tables: BTreeMap<&'static str, Records>,
    pub collectors: Vec<String>,
    pub stderr: String,
}

impl DryRun {
    /// The records of one table.
    pub fn table(&self, name: &str) -> &Records {
        &self.tables[name]
    }
}

/// Runs `grapheon-agent --dry-run --collector <collector> --log-level debug` inside `ns`
/// with only `PATH` (as given) and the variables that keep the host's configuration out.
pub fn dry_run(ns: &Namespace, collector: &str, path: &str) -> DryRun {
    dry_run_with(ns, collector, path, |_| {})
}

/// [`dry_run`], with the command adjusted by `prepare` before it starts.
pub fn dry_run_with(
    ns: &Namespace,
    collector: &str,
    path: &str,
    prepare: impl FnOnce(&mut Command),
) -> DryRun {
    let mut cmd = ns.exec(env!("CARGO_BIN_EXE_grapheon-agent"));
    cmd.args([
        "--dry-run",
        "--collector",
        collector,
        "--log-level",
        "debug",
        "--state-dir",
        "/nonexistent/grapheon-agent-equivalence",
    ])
    .env_clear()
    .env("PATH", path)
    .env("GRAPHEON_AGENT_CONFIG", "/dev/null")
    // Only the scene's namespace: the machine's others change between two runs.
    .env("GRAPHEON_AGENT_NAMESPACES", "own")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    prepare(&mut cmd);
    let mut child = cmd.spawn().expect("start grapheon-agent");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for grapheon-agent") {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("grapheon-agent --collector {collector} ran over {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out.join().expect("stdout reader");
    let stderr = err.join().expect("stderr reader");
    assert!(
        status.success(),
        "grapheon-agent --collector {collector}: {status}\n{stderr}"
    );
    parse(&stdout, stderr)
}

fn parse(stdout: &str, stderr: String) -> DryRun {
    let mut run = DryRun {
        headers: Vec::new(),
        tables: TABLES.iter().map(|t| (*t, Records::new())).collect(),
        collectors: Vec::new(),
        stderr,
    };
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(Value::Object(mut body)) = miniserde::json::from_str::<Value>(line) else {
            panic!("not a JSON object: {line}");
        };
        for table in TABLES {
            let Some(Value::Array(records)) = body.remove(table) else {
                panic!("no {table} array in {line}");
            };
            let set = run.tables.get_mut(table).expect("known table");
            for record in records {
                assert!(set.insert(canonical(&record)), "duplicate {table} record");
            }
        }
        body.remove("observed_at");
        if let Some(Value::Object(meta)) = body.get_mut("metadata") {
            match meta.remove("collector") {
                Some(Value::String(c)) => run.collectors.push(c),
                other => panic!("metadata.collector is {other:?}"),
            }
        }
        run.headers
            .push(miniserde::json::to_string(&Value::Object(body)));
    }
    assert!(!run.headers.is_empty(), "no body printed");
    run
}

/// A value as compact JSON with sorted keys.
pub fn canonical(v: &Value) -> String {
    miniserde::json::to_string(v)
}

/// A JSON string value.
pub fn s(text: &str) -> Value {
    Value::String(text.to_string())
}

/// A JSON number value.
pub fn n(number: u64) -> Value {
    Value::Number(Number::U64(number))
}

/// A JSON string value or `null`.
pub fn opt(text: Option<&str>) -> Value {
    text.map_or(Value::Null, s)
}

/// One record, rendered as [`canonical`] renders a parsed one.
pub fn record(fields: &[(&str, Value)]) -> String {
    let mut o = Object::new();
    for (k, v) in fields {
        o.insert(k.to_string(), v.clone());
    }
    canonical(&Value::Object(o))
}

/// Fails with the records each side has and the other lacks, table by table.
pub fn assert_same_tables(
    left_name: &str,
    left: &BTreeMap<&'static str, Records>,
    right_name: &str,
    right: &BTreeMap<&'static str, Records>,
) {
    let mut report = String::new();
    for table in TABLES {
        let (l, r) = (&left[table], &right[table]);
        let only_l: Vec<_> = l.difference(r).collect();
        let only_r: Vec<_> = r.difference(l).collect();
        if !only_l.is_empty() || !only_r.is_empty() {
            report.push_str(&format!("\n{table}:"));
            for x in only_l {
                report.push_str(&format!("\n  only in {left_name}: {x}"));
            }
            for x in only_r {
                report.push_str(&format!("\n  only in {right_name}: {x}"));
            }
        }
    }
    assert!(
        report.is_empty(),
        "{left_name} and {right_name} differ:{report}"
    );
}
