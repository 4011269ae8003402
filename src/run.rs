//! The lifecycle of one run, top to bottom: configuration, lock, registration, cadence, jitter,
//! collection, check-in parts, state.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use miniserde::json::Value;

use crate::cli;
use crate::client::{Answer, Client, Failure, VERSION};
use crate::collect;
use crate::config::{self, Action, Config};
use crate::error::{Error, Result};
use crate::json::{self, Object};
use crate::log;
use crate::model::Snapshot;
use crate::policy::Policy;
use crate::report::{self, gzip, Counts, Header};
use crate::state::{self, State, StateDir};
use crate::timefmt;

/// How long a run waits for another run (timer and manual) to release the lock.
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// How long the check-in phase of one run may take, all parts and retries included. With the
/// capped jitter it keeps a run inside the systemd unit's 15-minute start timeout.
const RUN_TIME: Duration = Duration::from_secs(300);
/// The longest jitter sleep, whatever the policy allows (up to an hour): a run must finish
/// inside the unit's start timeout, and a sleeping run holds the lock.
const MAX_JITTER_SECONDS: u32 = 420;

/// Runs the agent with the process arguments and environment; returns the exit code.
pub fn main() -> i32 {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let flags = match cli::parse(args) {
        Ok(f) => f,
        Err(e) => {
            error!("{e}");
            return e.exit_code();
        }
    };
    if flags.help {
        print!("{}", cli::HELP);
        return 0;
    }
    if flags.version {
        println!("{VERSION}");
        return 0;
    }
    // The level flag is applied before the env file is read, so its warnings obey it.
    if let Some(level) = flags.log_level.as_deref().and_then(log::Level::parse) {
        log::set_level(level);
    }
    let env = |key: &str| std::env::var(key).ok();
    let result = config::load(&flags, &config::Sources { env: &env }).and_then(|cfg| {
        log::set_level(cfg.log_level);
        execute(&cfg)
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            error!("{e}");
            e.exit_code()
        }
    }
}

/// Carries out the configured action.
pub fn execute(cfg: &Config) -> Result<()> {
    match cfg.action {
        Action::DryRun => dry_run(cfg),
        Action::Status => status(cfg),
        Action::SetApiKey => set_api_key(cfg),
        Action::Run | Action::RegisterOnly | Action::CheckInOnly => lifecycle(cfg),
    }
}

/// What this host reports about itself.
struct Host {
    hostname: String,
    release: String,
}

impl Host {
    fn detect(cfg: &Config) -> Host {
        // SAFETY: uname fills a zeroed struct we own; the fields are NUL-terminated.
        let mut u: libc::utsname = unsafe { std::mem::zeroed() };
        let ok = unsafe { libc::uname(&mut u) } == 0;
        let field = |f: &[libc::c_char]| -> String {
            let bytes: Vec<u8> = f
                .iter()
                .take_while(|c| **c != 0)
                .map(|c| *c as u8)
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        };
        let (node, release) = if ok {
            (field(&u.nodename), field(&u.release))
        } else {
            (String::new(), String::new())
        };
        let mut hostname = cfg.hostname.clone().unwrap_or(node);
        report::truncate_chars(&mut hostname, 255);
        Host { hostname, release }
    }
}

/// What registration and check-in work with during one run.
struct Session<'a> {
    cfg: &'a Config,
    client: Client,
    dir: StateDir,
    uuid: String,
    host: Host,
}

fn collect_options(cfg: &Config, policy: &Policy) -> collect::Options {
    collect::Options {
        mode: cfg.collector,
        proc_root: cfg.proc_root.clone(),
        command_timeout: policy.command_timeout(),
        tables: policy.tables,
    }
}

fn lifecycle(cfg: &Config) -> Result<()> {
    let server = cfg.server_url.as_deref().ok_or_else(|| {
        Error::Config(format!(
            "no server URL: set GRAPHEON_AGENT_SERVER_URL in {} or pass --server-url",
            config::DEFAULT_ENV_FILE
        ))
    })?;
    let dir = StateDir::create(&cfg.state_dir)?;
    let Some(_lock) = dir.lock(LOCK_WAIT)? else {
        info!(
            "another run holds the lock in {}; nothing to do this time",
            dir.path().display()
        );
        return Ok(());
    };
    let uuid = dir.ensure_uuid()?;
    // The snapshot is read after collection (see `check_in`).
    let mut state = dir.load_state_deferred(true)?;
    let client = Client::new(cfg, server)?;
    let host = Host::detect(cfg);
    let run = Session {
        cfg,
        client,
        dir,
        uuid,
        host,
    };
    let mut key = run.dir.read_api_key()?;

    if key.is_none() && cfg.action == Action::CheckInOnly {
        return Err(Error::Config(format!(
            "no API key in {}: run without --check-in-only to register, or install a key with --set-api-key",
            run.dir.path().display()
        )));
    }
    if key.is_none() || cfg.action == Action::RegisterOnly {
        // Registration saves the state: whole, with its snapshot.
        run.dir.load_snapshot(&mut state)?;
        match register(&run, &mut state, key.is_some())? {
            Some(new_key) => key = Some(new_key),
            None if key.is_none() => return Ok(()), // pending approval
            None => {}
        }
        if cfg.action == Action::RegisterOnly {
            return Ok(());
        }
    }
    let Some(key) = key else { return Ok(()) };

    let scheduled = cfg.action == Action::Run && !cfg.force;
    if scheduled {
        if let Some(due) = next_due(&state, cfg) {
            if due > timefmt::now() {
                info!(
                    "last check-in is recent; next one due at {} (use --force to check in now)",
                    timefmt::format_utc(due)
                );
                return Ok(());
            }
        }
        let cap = MAX_JITTER_SECONDS
            .min(u32::try_from(cfg.timer_interval_seconds / 2).unwrap_or(u32::MAX));
        state.last_jitter_seconds = Some(sleep_jitter(state.policy().jitter_seconds.min(cap)));
    }
    check_in(&run, &mut state, &key)
}

/// When the cadence allows the next scheduled check-in; `None` means now. As the earlier agent:
/// the policy interval only holds back runs when it is longer than the timer's own interval.
fn next_due(state: &State, cfg: &Config) -> Option<i64> {
    let interval = u64::from(state.policy().checkin_interval_seconds);
    // A report cut short between parts is finished at the next run, not an interval later.
    if interval <= cfg.timer_interval_seconds || state.report_incomplete {
        return None;
    }
    state
        .last_successful_checkin_at
        .map(|last| last + interval as i64)
}

fn sleep_jitter(max: u32) -> u32 {
    if max == 0 {
        return 0;
    }
    let mut b = [0u8; 4];
    let seconds = if getrandom::fill(&mut b).is_ok() {
        u32::from_le_bytes(b) % (max + 1)
    } else {
        0
    };
    if seconds > 0 {
        info!("waiting {seconds} s of jitter before collecting");
        std::thread::sleep(Duration::from_secs(u64::from(seconds)));
    }
    seconds
}

/// Registers (or polls the approval). Returns the API key when the server issued one now.
fn register(run: &Session<'_>, state: &mut State, have_key: bool) -> Result<Option<String>> {
    let Session {
        cfg,
        client,
        dir,
        uuid,
        host,
    } = run;
    let enrollment_key = cfg.enrollment_key.as_deref().ok_or_else(|| {
        Error::Config(format!(
            "this agent has no API key yet and no enrollment key: set GRAPHEON_AGENT_ENROLLMENT_KEY in {}",
            config::DEFAULT_ENV_FILE
        ))
    })?;
    let addresses = collect::addresses(&collect_options(cfg, &state.policy()));
    let mut meta = String::new();
    let mut m = Object::new(&mut meta);
    m.str("runtime", "rust-static")
        .str("timer_model", "systemd-oneshot")
        .str("collector", cfg.collector.as_str());
    m.end();
    let mut body = String::new();
    let mut o = Object::new(&mut body);
    o.str("enrollment_key", enrollment_key)
        .str("agent_uuid", uuid)
        .opt_str(
            "display_name",
            cfg.display_name.as_deref().map(limit).as_deref(),
        )
        .str("hostname", &host.hostname)
        .opt_str("site_name", cfg.site_name.as_deref().map(limit).as_deref())
        .str("agent_version", VERSION)
        .str("platform", std::env::consts::OS)
        .str("platform_release", &host.release)
        .raw("metadata", &meta)
        .raw("addresses", &report::addresses_json(&addresses));
    o.end();

    let answer = client
        .register(&body)
        .map_err(|f| f.into_error("registration"))?;
    let Some(v) = answer.body else {
        return Err(Error::Transient(
            "registration answer was not readable JSON; the next run retries".into(),
        ));
    };
    // The key first: the server shows it exactly once.
    let issued = match json::get(&v, "api_key") {
        Some(Value::String(k)) if !k.trim().is_empty() => {
            let k = k.trim();
            // Stored before it is judged: a key we cannot use is still the only copy.
            dir.write_api_key(k)?;
            if let Err(why) = state::check_api_key(k) {
                return Err(Error::Refused {
                    status: answer.status,
                    message: format!(
                        "the server issued an API key this agent cannot use ({why}); it is kept in {}",
                        dir.path().join("api_key").display()
                    ),
                });
            }
            info!("API key {} received and stored", log::redact(k));
            Some(k.to_string())
        }
        _ => None,
    };
    remember_agent(state, &v);
    dir.save_state(state)?;
    let status = json::get_str(&v, "status").unwrap_or("");
    match (status, &issued) {
        (_, Some(_)) => Ok(issued),
        ("pending", None) => {
            info!("registered as {uuid}; awaiting approval by an administrator on the server");
            Ok(None)
        }
        ("active", None) if have_key => {
            info!("registration refreshed; this agent is approved and already has its API key");
            Ok(None)
        }
        ("active", None) => Err(Error::Refused {
            status: answer.status,
            message: format!(
                "the server says this agent is approved but no longer shows its API key (it is shown once). \
                 An administrator must rotate the key (POST /api/agents/{}/rotate-api-key); then install it with \
                 `grapheon-agent --set-api-key` (it reads the key from standard input)",
                state.agent_id.map_or_else(|| "<id>".to_string(), |id| id.to_string())
            ),
        }),
        (other, None) => Err(Error::Refused {
            status: answer.status,
            message: format!("registration ended in state '{other}'"),
        }),
    }
}

/// The server refuses names longer than 255 characters.
fn limit(text: &str) -> String {
    let mut text = text.to_string();
    report::truncate_chars(&mut text, 255);
    text
}

/// Keeps what a response says about this agent and its policy.
fn remember_agent(state: &mut State, v: &Value) {
    if let Some(agent) = json::get(v, "agent") {
        if let Some(id) = json::get_i64(agent, "id") {
            state.agent_id = Some(id);
        }
        if let Some(s) = json::get_str(agent, "enrollment_state") {
            state.enrollment_state = Some(s.to_string());
        }
    }
    if let Some(policy) = json::get(v, "policy").and_then(Policy::from_value) {
        state.policy = Some(policy);
    }
}

/// What the next check-ins send: the records not yet accepted, and against what.
struct Plan {
    full: bool,
    removed: Counts,
    /// Records of the accepted snapshot that are still present.
    kept: Snapshot,
    /// Records to send.
    pending: Snapshot,
}

/// Takes `current` by value: a full snapshot sends it as it is, without a copy (at 100,000
/// connections a copy is tens of megabytes).
fn plan(state: &State, current: Snapshot, cfg: &Config, now: i64) -> Plan {
    let empty = Snapshot::default();
    let last = state.last_snapshot.as_ref();
    let stale = match (
        cfg.full_snapshot_interval_seconds,
        state.last_full_snapshot_at,
    ) {
        (Some(interval), Some(at)) => now - at >= interval as i64,
        // A snapshot migrated from the earlier agent has no full-snapshot time: its delta base
        // is kept, and the freshness clock starts with this agent's first check-in.
        _ => false,
    };
    let full = last.is_none() || state.full_snapshot_in_progress || stale;
    // An interrupted full snapshot continues from what was accepted; a new one starts empty.
    let base = if full && !state.full_snapshot_in_progress {
        &empty
    } else {
        last.unwrap_or(&empty)
    };
    let removed = report::removed(last.unwrap_or(&empty), &current);
    if base.is_empty() {
        return Plan {
            full,
            removed,
            kept: Snapshot::default(),
            pending: current,
        };
    }
    let (kept, pending) = report::partition(base, current);
    Plan {
        full,
        removed,
        kept,
        pending,
    }
}

fn header(cfg: &Config, uuid: &str, host: &Host, now: i64, left_out: usize) -> Header {
    Header {
        agent_uuid: uuid.to_string(),
        observed_at: now,
        hostname: host.hostname.clone(),
        agent_version: VERSION.to_string(),
        platform: std::env::consts::OS.to_string(),
        platform_release: host.release.clone(),
        collector: cfg.collector.as_str(),
        records_left_out: left_out,
    }
}

fn check_in(run: &Session<'_>, state: &mut State, key: &str) -> Result<()> {
    let Session {
        cfg,
        client,
        dir,
        uuid,
        host,
    } = run;
    let policy = state.policy();
    let deadline = Instant::now() + RUN_TIME;
    client.set_deadline(deadline);
    let collect::Collected {
        snapshot: current,
        left_out,
    } = collect::collect(&collect_options(cfg, &policy));
    dir.load_snapshot(state)?;
    let now = timefmt::now();
    let Plan {
        full,
        removed,
        kept,
        pending,
    } = plan(state, current, cfg, now);
    let header = header(cfg, uuid, host, now, left_out);
    // When nothing changed, state.json already holds the snapshot: only the small fields are
    // saved. Otherwise the next state.json grows part by part as the server accepts them.
    let unchanged = !full && pending.is_empty() && removed == [0; 4] && state.snapshot_saved();
    let mut progress = if unchanged {
        None
    } else {
        Some(dir.begin_report(state, full)?)
    };
    let mut budget = report::part_budget(policy.max_report_bytes);
    let mut parts = report::split(&header, &pending, &removed, budget);
    let (mut next, mut done, mut sent) = (0, 0, 0);
    let mut body = String::new();
    while next < parts.len() {
        let part = &parts[next];
        let total = done + parts.len() - next;
        let last = next + 1 == parts.len();
        if Instant::now() >= deadline {
            return Err(Error::Transient(format!(
                "the run's time is up after {done} of {total} parts; the next run sends the rest"
            )));
        }
        let seq = state.sequence_number + 1;
        let at = report::render_into(
            &mut body,
            &header,
            seq,
            full,
            (done + 1, total),
            &removed,
            &pending,
            part,
        );
        let gz = gzip::compress(body.as_bytes());
        if let Some(p) = progress.as_mut() {
            p.stage(&kept, part, at.map(|r| &body[r]), last)?;
        }
        let result = if gz.len() > report::RAW_LIMIT {
            Err(Failure::Status {
                status: 413,
                detail: "larger than the server's raw limit".into(),
                errors: vec![],
            })
        } else {
            client.check_in(&gz, key)
        };
        match result {
            Ok(answer) => {
                done += 1;
                next += 1;
                sent += part.len();
                accepted(state, &answer, seq, full, last, now);
                debug!(
                    "part {done}/{total} accepted: {} records, {} bytes gzip",
                    part.len(),
                    gz.len()
                );
                match progress.as_mut() {
                    None => dir.save_state(state)?,
                    Some(p) if !last => p.commit(state)?,
                    Some(_) => {}
                }
            }
            Err(Failure::Status {
                status: 413,
                detail,
                ..
            }) if budget > 4_096 => {
                budget /= 2;
                warn!(
                    "server refused part {} as too large ({detail}); splitting the rest into parts of {budget} bytes",
                    done + 1
                );
                if let Some(p) = progress.as_mut() {
                    p.unstage()?;
                }
                parts = report::split_from(&header, &pending, &removed, budget, part.start());
                next = 0;
            }
            Err(f) => {
                if let Failure::Status {
                    status: 422,
                    errors,
                    ..
                } = &f
                {
                    for line in offending_records(errors, &pending, part) {
                        debug!("refused record: {line}");
                    }
                }
                return Err(f.into_error("check-in"));
            }
        }
    }
    if let Some(p) = progress {
        p.finish(state, report::union(kept, pending))?;
    }
    info!(
        "check-in accepted: {} records sent ({}), sequence number {}",
        sent,
        if full { "full snapshot" } else { "delta" },
        state.sequence_number
    );
    Ok(())
}

/// The records a 422's field errors point at (`connections.3.local_ip` is the fourth connection
/// of the part), as JSON, so an operator can see at debug level what the server refused.
fn offending_records(errors: &[String], pending: &Snapshot, part: &report::Part) -> Vec<String> {
    let mut out = Vec::new();
    for error in errors {
        let mut path = error.split(':').next().unwrap_or("").split('.');
        let (Some(table), Some(index)) = (
            path.next(),
            path.next().and_then(|i| i.parse::<usize>().ok()),
        ) else {
            continue;
        };
        let t = match table {
            "addresses" => 0,
            "neighbors" => 1,
            "connections" => 2,
            "routes" => 3,
            _ => continue,
        };
        let Some(at) = part.ranges[t]
            .start
            .checked_add(index)
            .filter(|at| *at < part.ranges[t].end)
        else {
            continue;
        };
        let mut json = String::new();
        match t {
            0 => report::records::push_address(&mut json, &pending.addresses[at]),
            1 => report::records::push_neighbor(&mut json, &pending.neighbors[at]),
            2 => report::records::push_connection(&mut json, &pending.connections[at]),
            _ => report::records::push_route(&mut json, &pending.routes[at]),
        }
        out.push(format!("{error} <- {json}"));
    }
    out
}

/// Takes in what an accepted part changes besides the snapshot (which the report file keeps).
fn accepted(state: &mut State, answer: &Answer, seq: u64, full: bool, last_part: bool, now: i64) {
    state.sequence_number = seq;
    state.last_successful_checkin_at = Some(now);
    state.report_incomplete = !last_part;
    state.full_snapshot_in_progress = full && !last_part;
    // A completed full snapshot restarts the freshness clock; so does the first check-in of a
    // snapshot migrated from the earlier agent, which never recorded one.
    if (full && last_part) || state.last_full_snapshot_at.is_none() {
        state.last_full_snapshot_at = Some(now);
    }
    if let Some(v) = &answer.body {
        remember_agent(state, v);
        if let Some(summary) = json::get(v, "summary").and_then(state::summary_scalars) {
            state.last_checkin_summary = Some(summary);
        }
    }
}

/// Prints the body (or bodies, one per line) a check-in would send now; writes nothing.
fn dry_run(cfg: &Config) -> Result<()> {
    let dir = StateDir::existing(&cfg.state_dir);
    let state = dir.load_state(false).unwrap_or_else(|e| {
        debug!("state not read ({e}); showing a first, full report");
        State::default()
    });
    let uuid = match dir.read_uuid() {
        Ok(Some(u)) => u,
        _ => "00000000-0000-0000-0000-000000000000".to_string(),
    };
    let host = Host::detect(cfg);
    let collect::Collected {
        snapshot: current,
        left_out,
    } = collect::collect(&collect_options(cfg, &state.policy()));
    let now = timefmt::now();
    let p = plan(&state, current, cfg, now);
    let header = header(cfg, &uuid, &host, now, left_out);
    let parts = report::split(
        &header,
        &p.pending,
        &p.removed,
        report::part_budget(state.policy().max_report_bytes),
    );
    let mut out = std::io::stdout().lock();
    for (i, part) in parts.iter().enumerate() {
        let body = report::render(
            &header,
            state.sequence_number + 1 + i as u64,
            p.full,
            (i + 1, parts.len()),
            &p.removed,
            &p.pending,
            part,
        );
        match writeln!(out, "{body}") {
            Ok(()) => {}
            // `--dry-run | head` closing the pipe early is not a failure.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => {
                return Err(Error::Transient(format!(
                    "cannot write to standard output: {e}"
                )))
            }
        }
    }
    Ok(())
}

/// Prints the local state for an operator.
fn status(cfg: &Config) -> Result<()> {
    let dir = StateDir::existing(&cfg.state_dir);
    let uuid = dir.read_uuid()?;
    let key = dir.read_api_key()?;
    let state = dir.load_state(false)?;
    let policy = state.policy();
    let when = |t: Option<i64>| t.map_or_else(|| "never".to_string(), timefmt::format_utc);
    let next = match (&key, next_due(&state, cfg)) {
        (None, _) => "at the next timer run (registration)".to_string(),
        (Some(_), None) => "at the next timer run".to_string(),
        (Some(_), Some(due)) if due <= timefmt::now() => "at the next timer run".to_string(),
        (Some(_), Some(due)) => format!(
            "{} or the first timer run after it",
            timefmt::format_utc(due)
        ),
    };
    let mut out = String::new();
    let mut line = |k: &str, v: &str| out.push_str(&format!("{k:<28}{v}\n"));
    line("version", VERSION);
    line("state directory", &cfg.state_dir.display().to_string());
    line("agent uuid", uuid.as_deref().unwrap_or("none yet"));
    line(
        "agent id",
        &state
            .agent_id
            .map_or_else(|| "unknown".into(), |i| i.to_string()),
    );
    line(
        "enrollment state",
        state
            .enrollment_state
            .as_deref()
            .unwrap_or("not registered"),
    );
    line(
        "api key",
        &key.as_deref().map_or_else(
            || "absent".into(),
            |k| format!("present ({})", log::redact(k)),
        ),
    );
    line(
        "last successful check-in",
        &when(state.last_successful_checkin_at),
    );
    line("last full snapshot", &when(state.last_full_snapshot_at));
    line("sequence number", &state.sequence_number.to_string());
    line(
        "records in last snapshot",
        &state
            .last_snapshot
            .as_ref()
            .map_or_else(|| "none".into(), |s| s.len().to_string()),
    );
    line(
        "policy",
        &format!(
            "{}{}",
            policy.to_json(),
            if state.policy.is_none() {
                " (defaults: none received yet)"
            } else {
                ""
            }
        ),
    );
    line("next check-in", &next);
    print!("{out}");
    Ok(())
}

/// Stores an API key read from standard input (never from the command line, which every user
/// can see).
fn set_api_key(cfg: &Config) -> Result<()> {
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprint!("API key (input is echoed; end with Enter): ");
    }
    let mut input = String::new();
    std::io::BufRead::read_line(&mut std::io::stdin().lock().take(4096), &mut input)
        .map_err(|e| Error::Usage(format!("cannot read the API key from standard input: {e}")))?;
    let key = state::check_api_key(input.trim())
        .map_err(|why| Error::Usage(format!("--set-api-key: {why}")))?;
    if !key.starts_with("gpak_") {
        warn!("the key does not start with gpak_ as the server's keys do; storing it anyway");
    }
    let dir = StateDir::create(&cfg.state_dir)?;
    let Some(_lock) = dir.lock(LOCK_WAIT)? else {
        return Err(Error::Transient(
            "another run holds the lock; try again in a moment".into(),
        ));
    };
    dir.write_api_key(key)?;
    info!(
        "API key {} stored in {}",
        log::redact(key),
        dir.path().join("api_key").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Address, Route};

    #[test]
    fn field_errors_point_at_the_records_of_the_refused_part() {
        let pending = Snapshot {
            addresses: vec![Address {
                interface: "sit1".into(),
                ip_address: "10.9.9.1".parse().unwrap(),
                prefix_length: 30,
                mac_address: None,
            }],
            routes: (0..3)
                .map(|i| Route {
                    destination: format!("10.{i}.0.0/16"),
                    gateway: None,
                    interface: None,
                    source_ip: None,
                })
                .collect(),
            ..Snapshot::default()
        };
        // The part holds routes 1 and 2 only: the server's index 1 is the snapshot's route 2.
        let part = report::Part {
            ranges: [1..1, 0..0, 0..0, 1..3],
        };
        let errors = vec![
            "routes.1.gateway: bad".to_string(),
            "routes.5.gateway: out of the part".to_string(),
            "unknown: Invalid JSON".to_string(),
        ];
        assert_eq!(
            offending_records(&errors, &pending, &part),
            [
                r#"routes.1.gateway: bad <- {"destination":"10.2.0.0/16","gateway":null,"interface":null,"source_ip":null}"#
            ]
        );
    }
}
