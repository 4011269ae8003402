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
use crate::pacing::{self, Pacing};
use crate::policy::Policy;
use crate::report::gzip::Gzip;
use crate::report::{self, Counts, Header};
use crate::state::{self, Durability, State, StateDir};
use crate::timefmt;

/// How long a run waits for another run (timer and manual) to release the lock.
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// How long the check-in phase of one run may take, all parts and retries included. With the
/// capped jitter it keeps a run inside the systemd unit's 15-minute start timeout.
const RUN_TIME: Duration = Duration::from_secs(300);
/// The longest jitter sleep, whatever the policy allows (up to an hour): a run must finish
/// inside the unit's start timeout, and a sleeping run holds the lock.
const MAX_JITTER_SECONDS: u32 = 420;
/// The longest a run waits for the server to finish with a part that got no answer; a longer
/// hold ends the run (the next one sends).
const MAX_HOLD_WAIT_SECONDS: i64 = 420;

/// Runs the agent with the process arguments and environment; returns the exit code.
pub fn main() -> i32 {
    forbid_core_dumps();
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let flags = match cli::parse(args) {
        Ok(f) => f,
        Err(e) => {
            error!("{e}");
            return e.exit_code();
        }
    };
    if flags.help || flags.version {
        let text = if flags.help {
            cli::HELP.to_string()
        } else {
            format!("{VERSION}\n")
        };
        return match write_stdout(&text) {
            Ok(()) => 0,
            Err(e) => {
                error!("{e}");
                e.exit_code()
            }
        };
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

/// A core dump of the agent would hold the API key (and the enrollment key) in a file anyone
/// with access to the crash directory can read: the process is made non-dumpable (which also
/// keeps other users' debuggers out) and its core size limit is zero.
pub fn forbid_core_dumps() {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls take plain values (and a pointer to a struct we own); failure leaves
    // the process as it was, which is no reason not to run.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        libc::setrlimit(libc::RLIMIT_CORE, &none);
    }
}

/// Writes `text` to standard output. A reader that went away (`--help | head -1`) is not an
/// error; any other failure (`--status > /dev/full`) is, without a panic.
fn write_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::Transient(format!(
            "cannot write to standard output: {e}"
        ))),
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

/// What bounds a check-in part: the server's limits and the request timeout.
fn limits(cfg: &Config, policy: &Policy) -> pacing::Limits {
    pacing::Limits {
        max_decoded: u64::from(policy.max_report_bytes),
        max_raw: report::RAW_LIMIT as u64,
        timeout: cfg.request_timeout,
    }
}

/// Scheduled runs back off from half the timer interval, doubling up to the policy interval.
fn backoff(cfg: &Config, policy: &Policy) -> pacing::Backoff {
    pacing::Backoff {
        base_seconds: (cfg.timer_interval_seconds / 2).max(1),
        cap_seconds: u64::from(policy.checkin_interval_seconds),
    }
}

fn collect_options(cfg: &Config, policy: &Policy) -> collect::Options {
    collect::Options {
        mode: cfg.collector,
        proc_root: cfg.proc_root.clone(),
        command_timeout: policy.command_timeout(),
        tables: policy.tables,
        namespaces: cfg.namespaces,
    }
}

/// The addresses the server last accepted, for wildcard listeners when none can be read now.
fn known_addresses(state: &State) -> &[crate::model::Address] {
    state
        .last_snapshot
        .as_ref()
        .map_or(&[], |s| s.addresses.as_slice())
}

fn lifecycle(cfg: &Config) -> Result<()> {
    let server = cfg.server_url.as_deref().ok_or_else(|| {
        Error::Config(format!(
            "no server URL: set GRAPHEON_AGENT_SERVER_URL in {} or pass --server-url",
            cfg.env_file.display()
        ))
    })?;
    if let Some((level, warning)) = config::plain_http_warning(server) {
        log::write(level, format_args!("{warning}"));
    }
    let dir = StateDir::create(&cfg.state_dir)?;
    let Some(_lock) = dir.lock(LOCK_WAIT)? else {
        info!(
            "another run holds the lock in {}; nothing to do this time",
            dir.path().display()
        );
        return Ok(());
    };
    dir.tidy()?;
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

    let mut pace = pacing::load(&run.dir);
    let policy = state.policy();
    if let Some(sent) = pace.recover(&limits(cfg, &policy)) {
        pace.failed(
            timefmt::now(),
            &backoff(cfg, &policy),
            None,
            pacing::random(),
        );
        warn!(
            "the last run stopped while a check-in part ({} bytes, sent at {}) awaited its answer; \
             the server may have stored it, so it is resent in smaller parts",
            sent.bytes,
            timefmt::format_utc(sent.at)
        );
        pacing::save(&run.dir, &pace, Durability::Synced)?;
    }
    let scheduled = cfg.action == Action::Run && !cfg.force;
    if scheduled {
        if let Some(until) = pace.backoff(timefmt::now()) {
            info!(
                "backing off after {} failed check-in(s): the next attempt is after {} (--force checks in now)",
                pace.failures,
                timefmt::format_utc(until)
            );
            return Ok(());
        }
        if let Some(due) = next_due(&state, cfg, timefmt::now()) {
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
    wait_for_hold(&pace)?;
    let result = check_in(&run, &mut state, &key, &mut pace);
    // Nothing is written when the check-in's last write already holds this pace.
    if let Err(e) = pacing::save(&run.dir, &pace, Durability::Synced) {
        warn!("{e}; what this run learned about the server's pace is lost");
    }
    result
}

/// Waits while a part that got no answer may still be being stored by the server: sending
/// anything next to it is what corrupts the server. Forced runs wait too.
fn wait_for_hold(pace: &Pacing) -> Result<()> {
    let now = timefmt::now();
    let (Some(until), Some(sent)) = (pace.hold(now), pace.unanswered) else {
        return Ok(());
    };
    let sent_at = timefmt::format_utc(sent.at);
    if until - now > MAX_HOLD_WAIT_SECONDS {
        return Err(Error::Transient(format!(
            "a check-in part sent at {sent_at} got no answer and the server may still be storing it; \
             nothing is sent before {}, when the next run sends it in smaller parts",
            timefmt::format_utc(until)
        )));
    }
    info!(
        "waiting {} s: a check-in part sent at {sent_at} got no answer and the server may still be storing it",
        until - now
    );
    std::thread::sleep(Duration::from_secs((until - now) as u64));
    Ok(())
}

/// When the cadence allows the next scheduled check-in; `None` means now. As the earlier agent:
/// the policy interval only holds back runs when it is longer than the timer's own interval.
fn next_due(state: &State, cfg: &Config, now: i64) -> Option<i64> {
    let interval = u64::from(state.policy().checkin_interval_seconds);
    // A report cut short between parts is finished at the next run, not an interval later.
    if interval <= cfg.timer_interval_seconds || state.report_incomplete {
        return None;
    }
    let last = in_the_past(state.last_successful_checkin_at?, "last check-in", now)?;
    Some(last + interval as i64)
}

/// A saved time, or `None` (due now) when it lies in the future: the clock was wrong when it was
/// saved (a board without a battery-backed RTC) or has been set back since. Trusting it would
/// hold the agent back until the clock catches up, possibly for years.
fn in_the_past(saved: i64, what: &str, now: i64) -> Option<i64> {
    if saved <= now {
        return Some(saved);
    }
    warn!(
        "the {what} time saved in state.json ({}) is in the future (now {}): the clock was \
         wrong then or has been set back; treating it as due now",
        timefmt::format_utc(saved),
        timefmt::format_utc(now)
    );
    None
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
            cfg.env_file.display()
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

    // Room for the key first: once issued, the server never shows it again.
    let slot = if have_key {
        None
    } else {
        Some(dir.reserve_api_key()?)
    };
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
            match slot {
                Some(slot) => slot.store(k)?,
                None => dir.write_api_key(k)?,
            }
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
    if status.is_empty() && issued.is_none() {
        return Err(Error::Transient(format!(
            "registration: the server answered HTTP {} without a registration status (is \
             --server-url the Graphēon server?); the next run retries",
            answer.status
        )));
    }
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
            // Bounded here, where the server's text comes in: it is kept in one page of
            // checkin.rec beside the report's progress.
            let mut end = s.len().min(state::MAX_ENROLLMENT_STATE);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            state.enrollment_state = Some(s[..end].to_string());
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
/// connections a copy is tens of megabytes). `failed` marks the tables no source could read
/// (report order): each stands as last accepted, so it sends nothing and counts no removals.
fn plan(
    state: &State,
    mut current: Snapshot,
    failed: &[Option<String>; 4],
    cfg: &Config,
    now: i64,
) -> Plan {
    let empty = Snapshot::default();
    let last = state.last_snapshot.as_ref();
    let unread: Vec<usize> = (0..4).filter(|t| failed[*t].is_some()).collect();
    for &t in &unread {
        carry_over(&mut current, last.unwrap_or(&empty), t);
    }
    let mut plan = plan_read(state, current, cfg, now);
    // A new full snapshot has an empty base: the carried-over records would go out again as if
    // just observed. They stay in the base instead, unsent.
    for &t in &unread {
        let (kept, pending) = (&mut plan.kept, &mut plan.pending);
        match t {
            0 => kept.addresses.append(&mut pending.addresses),
            1 => kept.neighbors.append(&mut pending.neighbors),
            2 => kept.connections.append(&mut pending.connections),
            _ => kept.routes.append(&mut pending.routes),
        }
    }
    plan
}

/// Replaces table `t` (report order) of `current` with that of `last`.
fn carry_over(current: &mut Snapshot, last: &Snapshot, t: usize) {
    match t {
        0 => current.addresses.clone_from(&last.addresses),
        1 => current.neighbors.clone_from(&last.neighbors),
        2 => current.connections.clone_from(&last.connections),
        _ => current.routes.clone_from(&last.routes),
    }
}

fn plan_read(state: &State, current: Snapshot, cfg: &Config, now: i64) -> Plan {
    let empty = Snapshot::default();
    let last = state.last_snapshot.as_ref();
    let stale = match (
        cfg.full_snapshot_interval_seconds,
        state.last_full_snapshot_at,
    ) {
        (Some(interval), Some(at)) => match in_the_past(at, "last full snapshot", now) {
            Some(at) => now - at >= interval as i64,
            None => true,
        },
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

/// `metadata.namespaces`, in at most an eighth of `budget` (the run's first part size), so the
/// metadata repeated in every part never crowds out the records.
fn header(
    cfg: &Config,
    uuid: &str,
    host: &Host,
    now: i64,
    left_out: usize,
    failed: [Option<String>; 4],
) -> Header {
    Header {
        agent_uuid: uuid.to_string(),
        observed_at: now,
        hostname: host.hostname.clone(),
        agent_version: VERSION.to_string(),
        platform: std::env::consts::OS.to_string(),
        platform_release: host.release.clone(),
        collector: cfg.collector.as_str(),
        records_left_out: left_out,
        failed_tables: failed,
        namespaces: String::new(),
    }
}

/// Whether a part may start at `now`: the first always does (or nothing would ever go out),
/// a later one only if its request, which can take twice the request timeout, ends by the
/// run's deadline. A request cut off by the unit's start timeout would leave its part in
/// doubt for the next runs.
fn part_fits(now: Instant, deadline: Instant, request_timeout: Duration, done: usize) -> bool {
    now < deadline && (done == 0 || now + request_timeout * 2 <= deadline)
}

fn check_in(run: &Session<'_>, state: &mut State, key: &str, pace: &mut Pacing) -> Result<()> {
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
    // The saved snapshot is read after collecting, so a run never holds the collection's
    // buffers and the saved records at once; only a failed address table needs it earlier.
    let mut known = || match dir.load_snapshot(state) {
        Ok(()) => known_addresses(state).to_vec(),
        Err(e) => {
            warn!("{e}");
            Vec::new()
        }
    };
    let collect::Collected {
        snapshot: current,
        left_out,
        failed,
        namespaces,
    } = collect::collect(&collect_options(cfg, &policy), &mut known);
    dir.load_snapshot(state)?;
    let now = timefmt::now();
    let Plan {
        full,
        removed,
        kept,
        pending,
    } = plan(state, current, &failed, cfg, now);
    let limits = limits(cfg, &policy);
    let mut budget = pace.budget(&limits);
    let mut header = header(cfg, uuid, host, now, left_out, failed);
    header.namespaces = namespaces.metadata_for_part(budget);
    // When nothing changed, state.json already holds the snapshot: only the small fields are
    // saved. Otherwise the next state.json grows part by part as the server accepts them.
    let unchanged = !full && pending.is_empty() && removed == [0; 4] && state.snapshot_saved();
    let mut progress = if unchanged {
        None
    } else {
        Some(dir.begin_report(state, full)?)
    };
    // Measured once: the rest is cut again whenever the server's pace moves the part size.
    let lengths = report::Lengths::of(&pending);
    let mut parts = report::split_from(&header, &pending, &lengths, &removed, budget, 0);
    let (mut next, mut done, mut sent) = (0, 0, 0);
    let mut body = String::new();
    let mut gzip = Gzip::new();
    while next < parts.len() {
        let part = &parts[next];
        let total = done + parts.len() - next;
        let last = next + 1 == parts.len();
        if !part_fits(Instant::now(), deadline, cfg.request_timeout, done) {
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
        let gz = gzip.compress(body.as_bytes());
        pace.compressed(body.len(), gz.len());
        if gz.len() > report::RAW_LIMIT {
            // Never sent: cut again to what this host's reports compress to.
            let smaller = pace.budget(&limits).min(budget / 2);
            if smaller < budget && budget as u64 > pacing::MIN_PART_BYTES {
                debug!(
                    "part {} is {} bytes compressed, over the server's raw limit; cutting parts of {smaller} bytes",
                    done + 1,
                    gz.len()
                );
                budget = smaller;
                header.namespaces = namespaces.metadata_for_part(budget);
                parts =
                    report::split_from(&header, &pending, &lengths, &removed, budget, part.start());
                next = 0;
                continue;
            }
        }
        if let Some(p) = progress.as_mut() {
            p.stage(&kept, part, at.map(|r| &body[r]), last)?;
        }
        let result = if gz.len() > report::RAW_LIMIT {
            Err(Failure::status(413, "larger than the server's raw limit"))
        } else {
            // Recorded before it goes out: a run killed while waiting leaves the next one
            // knowing the part may be stored. Not synced: a killed process's write survives
            // it, and the answer's write, synced, goes into the same page (docs/state.md).
            pace.sending(timefmt::now(), body.len());
            pacing::save(dir, pace, Durability::Cached)?;
            client.check_in(gz, key)
        };
        match result {
            Ok(answer) => {
                done += 1;
                next += 1;
                sent += part.len();
                accepted(state, &answer, seq, full, last, now);
                pace.accepted(
                    &limits,
                    timefmt::now(),
                    body.len(),
                    part.len(),
                    answer.elapsed,
                );
                // The pace goes into the same write as the state's fields, so the mark made
                // before sending and this outcome end in one synced page.
                pacing::save(dir, pace, Durability::Deferred)?;
                // Recorded first: the window in which an accepted part is not yet known to be
                // accepted is the only one in which a part can be sent twice (by the next run).
                match progress.as_mut() {
                    None => dir.save_state(state)?,
                    Some(p) if !last => p.commit(state)?,
                    Some(_) => {}
                }
                let resized = pace.budget(&limits);
                debug!(
                    "part {done}/{total} accepted: {} records, {} bytes ({} gzip) in {} ms; next part {resized} bytes",
                    part.len(),
                    body.len(),
                    gz.len(),
                    answer.elapsed.as_millis()
                );
                // The rest is cut again when the server's pace moved the part size enough.
                if next < parts.len()
                    && (resized < budget - budget / 10 || resized > budget + budget / 4)
                {
                    budget = resized;
                    header.namespaces = namespaces.metadata_for_part(budget);
                    parts = report::split_from(
                        &header,
                        &pending,
                        &lengths,
                        &removed,
                        budget,
                        parts[next].start(),
                    );
                    next = 0;
                }
            }
            Err(Failure::Status {
                status: 413,
                detail,
                ..
            }) if budget as u64 > pacing::MIN_PART_BYTES => {
                pace.settled();
                budget /= 2;
                pace.too_large(&limits, budget);
                warn!(
                    "server refused part {} as too large ({detail}); splitting the rest into parts of {budget} bytes",
                    done + 1
                );
                if let Some(p) = progress.as_mut() {
                    p.unstage()?;
                }
                header.namespaces = namespaces.metadata_for_part(budget);
                parts =
                    report::split_from(&header, &pending, &lengths, &removed, budget, part.start());
                next = 0;
            }
            Err(Failure::InDoubt(why)) => {
                let unanswered = pace.in_flight.unwrap_or(pacing::Sent {
                    at: timefmt::now(),
                    bytes: body.len() as u64,
                });
                pace.unanswered(&limits, unanswered);
                pace.failed(
                    timefmt::now(),
                    &backoff(cfg, &policy),
                    None,
                    pacing::random(),
                );
                return Err(Error::Transient(format!(
                    "check-in part {} of {total} ({} bytes) failed: {why}. The server may have stored it or may \
                     still be storing it, so it is not sent again in this run; the next run sends it in parts of \
                     at most {} bytes, not before {}",
                    done + 1,
                    body.len(),
                    pace.budget(&limits),
                    timefmt::format_utc(pace.hold_until.unwrap_or(unanswered.at)),
                )));
            }
            Err(f) => {
                pace.settled();
                if f.transient() {
                    pace.failed(
                        timefmt::now(),
                        &backoff(cfg, &policy),
                        f.retry_after(),
                        pacing::random(),
                    );
                }
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
        // The last part's outcome, and the record no longer naming the report.
        pacing::save(dir, pace, Durability::Synced)?;
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
        failed,
        namespaces,
    } = collect::collect(&collect_options(cfg, &state.policy()), &mut || {
        known_addresses(&state).to_vec()
    });
    let now = timefmt::now();
    let p = plan(&state, current, &failed, cfg, now);
    // The size the next run starts with; a run resizes later parts as the server answers.
    let budget = pacing::load(&dir).budget(&limits(cfg, &state.policy()));
    let mut header = header(cfg, &uuid, &host, now, left_out, failed);
    header.namespaces = namespaces.metadata_for_part(budget);
    let parts = report::split(&header, &p.pending, &p.removed, budget);
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
    let registered = key.is_some() || dir.key_waiting();
    let next = match (registered, next_due(&state, cfg, timefmt::now())) {
        (false, _) => "at the next timer run (registration)".to_string(),
        (true, None) => "at the next timer run".to_string(),
        (true, Some(due)) if due <= timefmt::now() => "at the next timer run".to_string(),
        (true, Some(due)) => format!(
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
        &match &key {
            Some(k) => format!("present ({})", log::redact(k)),
            None if dir.key_waiting() => {
                "received, waiting in .api_key.reserved: the next run installs it".into()
            }
            None => "absent".into(),
        },
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
    for (label, text) in pacing::load(&dir).describe(&limits(cfg, &policy), timefmt::now()) {
        line(label, &text);
    }
    write_stdout(&out)
}

/// Stores an API key read from standard input (never from the command line, which every user
/// can see).
fn set_api_key(cfg: &Config) -> Result<()> {
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let _ = write!(
            std::io::stderr(),
            "API key (input is echoed; end with Enter): "
        );
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
    dir.tidy()?;
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

    #[test]
    fn a_later_part_starts_only_when_its_request_can_end_by_the_deadline() {
        let now = Instant::now();
        let timeout = Duration::from_secs(30);
        let fits = |left: u64, done| part_fits(now, now + Duration::from_secs(left), timeout, done);
        // The first part goes whenever time is left; a later one needs two timeouts of it.
        assert_eq!(
            [
                fits(10, 0),
                fits(0, 0),
                fits(60, 1),
                fits(59, 1),
                fits(0, 3)
            ],
            [true, false, true, false, false]
        );
    }

    #[test]
    fn an_enrollment_state_is_kept_to_255_bytes_at_a_character_boundary() {
        let mut state = State::default();
        let long = format!("{}é{}", "a".repeat(254), "b".repeat(5000));
        let reply = format!(r#"{{"agent":{{"id":3,"enrollment_state":"{long}"}}}}"#);
        remember_agent(&mut state, &miniserde::json::from_str(&reply).unwrap());
        assert_eq!(
            (state.agent_id, state.enrollment_state.take()),
            (Some(3), Some("a".repeat(254)))
        );
        remember_agent(
            &mut state,
            &miniserde::json::from_str(r#"{"agent":{"enrollment_state":"active"}}"#).unwrap(),
        );
        assert_eq!(state.enrollment_state.as_deref(), Some("active"));
    }
    use crate::model::{Address, ConnState, Connection, Protocol, Route};

    fn cfg() -> Config {
        let env = |key: &str| (key == "GRAPHEON_AGENT_CONFIG").then(|| "/dev/null".to_string());
        config::load(&cli::Flags::default(), &config::Sources { env: &env }).unwrap()
    }

    fn route(destination: &str) -> Route {
        Route {
            destination: destination.into(),
            gateway: None,
            interface: Some("eth0".into()),
            source_ip: None,
        }
    }

    fn conn(port: u16) -> Connection {
        Connection {
            protocol: Protocol::Tcp,
            local_ip: "192.0.2.1".parse().unwrap(),
            local_port: port,
            remote_ip: Some("192.0.2.9".parse().unwrap()),
            remote_port: Some(443),
            state: Some(ConnState::Established),
            pid: None,
            process_name: None,
        }
    }

    fn snapshot(routes: &[&str], ports: &[u16]) -> Snapshot {
        let mut s = Snapshot {
            routes: routes.iter().map(|d| route(d)).collect(),
            connections: ports.iter().map(|p| conn(*p)).collect(),
            ..Snapshot::default()
        };
        s.normalize();
        s
    }

    const NOW: i64 = 1_795_744_647;

    fn accepted_state(last: Snapshot, full_at: i64) -> State {
        let mut state = State::default();
        state.sequence_number = 7;
        state.last_snapshot = Some(last);
        state.last_successful_checkin_at = Some(NOW - 60);
        state.last_full_snapshot_at = Some(full_at);
        state
    }

    fn routes_failed() -> [Option<String>; 4] {
        [None, None, None, Some("netlink: refused".into())]
    }

    #[test]
    fn a_table_no_source_could_read_keeps_its_records_and_counts_no_removals() {
        let last = snapshot(&["default", "10.0.0.0/8"], &[1, 2]);
        let state = accepted_state(last, NOW - 60);
        // The routes could not be read (empty); connection 1 is gone, 3 is new.
        let current = snapshot(&[], &[2, 3]);
        let p = plan(&state, current, &routes_failed(), &cfg(), NOW);
        assert!(!p.full);
        assert_eq!(p.removed, [0, 0, 1, 0]);
        assert_eq!(p.pending, snapshot(&[], &[3]));
        assert_eq!(p.kept, snapshot(&["default", "10.0.0.0/8"], &[2]));
    }

    #[test]
    fn a_full_snapshot_keeps_an_unread_table_in_the_base_without_sending_it() {
        let last = snapshot(&["default"], &[1]);
        let state = accepted_state(last, NOW - 2 * 86_400);
        let p = plan(&state, snapshot(&[], &[1]), &routes_failed(), &cfg(), NOW);
        assert!(p.full);
        assert_eq!(p.removed, [0, 0, 0, 0]);
        assert_eq!(p.pending, snapshot(&[], &[1]));
        assert_eq!(p.kept, snapshot(&["default"], &[]));
        // Once accepted, the saved snapshot still holds the route.
        assert_eq!(
            report::union(p.kept, p.pending),
            snapshot(&["default"], &[1])
        );
    }

    #[test]
    fn a_read_table_that_is_empty_counts_its_removals() {
        let state = accepted_state(snapshot(&["default"], &[]), NOW - 60);
        let p = plan(&state, snapshot(&[], &[]), &Default::default(), &cfg(), NOW);
        assert_eq!(p.removed, [0, 0, 0, 1]);
        assert_eq!(p.kept, Snapshot::default());
    }

    #[test]
    fn a_saved_time_in_the_future_is_due_now() {
        let cfg = cfg();
        let mut state = accepted_state(snapshot(&[], &[1]), NOW - 60);
        // The default policy interval (3,600 s) is longer than the timer's (900 s).
        assert_eq!(next_due(&state, &cfg, NOW), Some(NOW - 60 + 3_600));
        state.last_successful_checkin_at = Some(NOW + 365 * 86_400);
        assert_eq!(next_due(&state, &cfg, NOW), None);

        let fresh = plan(&state, snapshot(&[], &[1]), &Default::default(), &cfg, NOW);
        assert!(!fresh.full);
        state.last_full_snapshot_at = Some(NOW + 365 * 86_400);
        let p = plan(&state, snapshot(&[], &[1]), &Default::default(), &cfg, NOW);
        assert!(p.full, "a full-snapshot time in the future makes one due");
    }

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
