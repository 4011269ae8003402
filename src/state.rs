//! The state directory: `agent_uuid`, `api_key`, `state.json`, in the earlier agent's format,
//! and `checkin.rec`, the small fields of the last check-in and the server's pace.
//!
//! Every write is atomic and durable: files are replaced (temporary file, fsync, rename, fsync
//! of the directory), so a crash or a full disk leaves either the old file or the new one, never
//! a torn one; `checkin.rec` is overwritten in place, one of its two checksummed slots at a time
//! (see [`crate::slots`]). The directory is 0700 and every file 0600. One run at a time holds
//! `agent.lock`.

use std::cell::{Cell, RefCell, RefMut};
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use miniserde::json::Value;

use crate::error::{Error, Result};
use crate::input;
use crate::json::read::{Fault, Number, Reader, Scalar, Step};
use crate::json::Object;
use crate::model::Snapshot;
use crate::policy::Policy;
use crate::report::{records, Part};
use crate::slots::{self, SlotFile, Slots};
use crate::timefmt;

const UUID_FILE: &str = "agent_uuid";
const KEY_FILE: &str = "api_key";
const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "agent.lock";
/// Where the API key is written first: room taken before registering ([`KeySlot`]).
const KEY_RESERVATION: &str = ".api_key.reserved";
/// The room reserved for the key (the longest key accepted is 512 bytes).
const KEY_ROOM: u64 = 4096;
/// The small fields of the last check-in, the progress of a report in parts and the server's
/// pace, in two slots overwritten in place ([`Record`]).
pub const RECORD_FILE: &str = "checkin.rec";
/// 0.2.0 kept the `checkin` member of the record here; read once and folded in.
const CURSOR_FILE: &str = "checkin.json";
/// 0.2.0 kept the `pacing` member of the record here; read once and folded in.
const PACING_FILE: &str = "pacing.json";
/// A `pacing` member longer than this is not the agent's (its own is under 600 bytes).
const MAX_PACING_BYTES: usize = 1024;
/// Room in a slot for the payload's keys and the identities of folded 0.2.0 files (two of
/// about 60 bytes), besides the `checkin` and `pacing` members.
const RECORD_OVERHEAD: usize = 256;
/// Longest enrollment state kept: the server's are words like `active` (and it is read back
/// with this limit).
pub const MAX_ENROLLMENT_STATE: usize = 255;
/// The next `state.json` while a report is sent in parts (followed by random hex).
const REPORT_PREFIX: &str = "state.json.partial-";
const MAX_CURSOR_BYTES: u64 = 64 << 10;
/// A report file's buffer is written out when it holds this much.
const FLUSH_AT: usize = 256 << 10;
/// Larger state files are not read: no real snapshot comes near this, and reading one whole
/// would take the memory of a small host.
const MAX_STATE_BYTES: u64 = 256 << 20;

/// What the agent remembers between runs (`state.json`, with the `checkin` member of
/// `checkin.rec` beside it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    pub policy: Option<Policy>,
    pub agent_id: Option<i64>,
    pub enrollment_state: Option<String>,
    /// The sequence number of the last accepted check-in (0: none yet).
    pub sequence_number: u64,
    /// What the server has accepted so far; `None` until the first accepted check-in, which
    /// makes the next report a full snapshot. Replace it with [`State::set_snapshot`], so that
    /// saving knows the file no longer holds it.
    pub last_snapshot: Option<Snapshot>,
    pub last_successful_checkin_at: Option<i64>,
    /// The scalar members of the server's summary of the last accepted check-in, as a JSON
    /// object.
    pub last_checkin_summary: Option<String>,
    pub last_jitter_seconds: Option<u32>,
    /// When the last complete full snapshot was accepted.
    pub last_full_snapshot_at: Option<i64>,
    /// A full snapshot sent in parts was interrupted: the remaining parts still say full.
    pub full_snapshot_in_progress: bool,
    /// A report sent in parts was interrupted: the next run sends the rest without waiting for
    /// the cadence.
    pub report_incomplete: bool,
    origin: Origin,
}

/// Which `state.json` a state was read from or last written to, and whether its snapshot is
/// still the one in that file. Bookkeeping, not part of the state's value: equality ignores it.
#[derive(Clone, Debug, Default)]
struct Origin {
    file: Cell<Option<FileId>>,
    snapshot_saved: Cell<bool>,
    /// The report file (`state.json.partial-…`) the snapshot was resumed from.
    report_file: RefCell<Option<String>>,
    /// The snapshot is not read yet ([`StateDir::load_state_deferred`]); the report to resume
    /// it from, if any, waits here.
    deferred: Cell<bool>,
    resume: RefCell<Option<Cursor>>,
}

impl PartialEq for Origin {
    fn eq(&self, _: &Origin) -> bool {
        true
    }
}

/// Identifies one version of `state.json`: whoever replaces it (this agent or the earlier
/// one) changes its inode, size or modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl FileId {
    fn of(meta: &fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }

    fn text(&self) -> String {
        format!(
            "{}:{}:{}:{}.{:09}",
            self.dev, self.ino, self.size, self.mtime, self.mtime_nsec
        )
    }
}

/// What the record's `checkin` member adds to the small fields: which `state.json` they go
/// with, and the progress of a report being sent in parts.
#[derive(Clone, Debug, Default)]
struct Cursor {
    state_file: Option<String>,
    report_file: Option<String>,
    report_length: u64,
    report_full: bool,
}

/// Longest summary kept: the server's summary is a handful of counters.
const MAX_SUMMARY_MEMBERS: usize = 64;
const MAX_SUMMARY_STRING: usize = 1024;
/// The summary's whole text is at most this long (members past it are left out), so the small
/// fields fit one slot of `checkin.rec` with the pace beside them.
const MAX_SUMMARY_BYTES: usize = 1024;

/// The scalar members of the server's `summary` (counters, names), as a JSON object; nested
/// values are left out, so a hostile reply cannot make the state file grow. `None` when the
/// summary is not an object.
pub fn summary_scalars(summary: &Value) -> Option<String> {
    let Value::Object(map) = summary else {
        return None;
    };
    let mut out = String::new();
    let mut o = Object::new(&mut out);
    let mut kept = 0;
    for (key, value) in map.iter() {
        if kept == MAX_SUMMARY_MEMBERS || key.len() > 64 {
            continue;
        }
        let mark = o.out().len();
        match value {
            Value::Null => o.raw(key, "null"),
            Value::Bool(b) => o.num(key, b),
            Value::Number(miniserde::json::Number::U64(n)) => o.int(key, *n),
            Value::Number(miniserde::json::Number::I64(n)) => o.num(key, n),
            Value::Number(miniserde::json::Number::F64(f)) if f.is_finite() => o.num(key, f),
            Value::String(s) if s.len() <= MAX_SUMMARY_STRING => o.str(key, s),
            _ => continue,
        };
        // `>=`: the closing brace comes after.
        if o.out().len() >= MAX_SUMMARY_BYTES {
            o.out().truncate(mark);
            break;
        }
        kept += 1;
    }
    o.end();
    Some(out)
}

/// Reads a summary object member by member, keeping the scalars as [`summary_scalars`] does.
fn read_summary(r: &mut Reader<'_>) -> Step<Option<String>> {
    if !r.at_object()? {
        r.skip()?;
        return Ok(None);
    }
    let mut out = String::new();
    let mut o = Object::new(&mut out);
    r.begin_object()?;
    let (mut first, mut key, mut kept, mut full) = (true, String::new(), 0, false);
    while r.next_key(&mut first, &mut key, 64)? {
        let value = r.scalar(MAX_SUMMARY_STRING)?;
        if kept == MAX_SUMMARY_MEMBERS || key.is_empty() || full {
            continue;
        }
        let mark = o.out().len();
        match value {
            Scalar::Null => o.raw(&key, "null"),
            Scalar::Bool(b) => o.num(&key, b),
            Scalar::Number(Number::Unsigned(n)) => o.int(&key, n),
            Scalar::Number(Number::Negative(n)) => o.num(&key, n),
            Scalar::Number(Number::Decimal(d)) => o.raw(&key, d.as_str()),
            Scalar::String(s) => o.str(&key, &s),
            Scalar::LongString | Scalar::Compound => continue,
        };
        // `>=`: the closing brace comes after.
        if o.out().len() >= MAX_SUMMARY_BYTES {
            // The rest of the object is still read (and skipped): it is part of the document.
            o.out().truncate(mark);
            full = true;
            continue;
        }
        kept += 1;
    }
    o.end();
    Ok(Some(out))
}

/// Reads the members of `state.json` or of the record's `checkin` member (the same keys, as
/// 0.2.0's `checkin.json` had) without a JSON tree. The snapshot is read only when `snapshot`
/// is set (the `checkin` member has none).
fn read_state(r: &mut Reader<'_>, snapshot: bool) -> Step<(State, Cursor)> {
    let mut state = State::default();
    let mut cursor = Cursor::default();
    let mut captured = Vec::new();
    r.begin_object()?;
    let (mut first, mut key) = (true, String::new());
    let text = |s: Scalar| match s {
        Scalar::String(s) => Some(s),
        _ => None,
    };
    let number = |s: Scalar| match s {
        Scalar::Number(n) => Some(n),
        _ => None,
    };
    while r.next_key(&mut first, &mut key, 64)? {
        match key.as_str() {
            "policy" => {
                captured.clear();
                if r.capture(&mut captured, 64 << 10)? {
                    state.policy = std::str::from_utf8(&captured)
                        .ok()
                        .and_then(|t| miniserde::json::from_str::<Value>(t).ok())
                        .and_then(|v| Policy::from_value(&v));
                }
            }
            "agent_id" => state.agent_id = number(r.scalar(0)?).and_then(Number::as_i64),
            "enrollment_state" => state.enrollment_state = text(r.scalar(MAX_ENROLLMENT_STATE)?),
            "sequence_number" => {
                state.sequence_number = number(r.scalar(0)?).and_then(Number::as_u64).unwrap_or(0)
            }
            "last_snapshot" if snapshot && r.at_object()? => {
                let mut s = Snapshot::default();
                let mut tally = records::Tally::default();
                records::read_snapshot(r, &mut s, &mut tally)?;
                if tally.dropped > 0 {
                    debug!(
                        "{} cached records no longer parse; they will be reported again",
                        tally.dropped
                    );
                }
                tidy(&mut s);
                state.last_snapshot = Some(s);
            }
            "last_successful_checkin_at" => {
                state.last_successful_checkin_at =
                    text(r.scalar(64)?).and_then(|t| timefmt::parse(&t))
            }
            "last_full_snapshot_at" => {
                state.last_full_snapshot_at = text(r.scalar(64)?).and_then(|t| timefmt::parse(&t))
            }
            "last_checkin_summary" => state.last_checkin_summary = read_summary(r)?,
            "last_jitter_seconds" => {
                state.last_jitter_seconds = number(r.scalar(0)?)
                    .and_then(Number::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
            }
            "full_snapshot_in_progress" => {
                state.full_snapshot_in_progress = r.scalar(0)? == Scalar::Bool(true)
            }
            "report_incomplete" => state.report_incomplete = r.scalar(0)? == Scalar::Bool(true),
            "state_file" => cursor.state_file = text(r.scalar(255)?),
            "report_file" => cursor.report_file = text(r.scalar(255)?),
            "report_length" => {
                cursor.report_length = number(r.scalar(0)?).and_then(Number::as_u64).unwrap_or(0)
            }
            "report_full" => cursor.report_full = r.scalar(0)? == Scalar::Bool(true),
            _ => r.skip()?,
        }
    }
    r.end()?;
    Ok((state, cursor))
}

impl State {
    /// The cached policy, or the server's defaults before the first one arrives.
    pub fn policy(&self) -> Policy {
        self.policy.clone().unwrap_or_default()
    }

    /// Replaces the snapshot (the file no longer holds it until the next save).
    pub fn set_snapshot(&mut self, snapshot: Option<Snapshot>) {
        self.last_snapshot = snapshot;
        self.origin.snapshot_saved.set(false);
    }

    /// True when `state.json` holds exactly this state's snapshot, so saving rewrites only the
    /// small fields.
    pub fn snapshot_saved(&self) -> bool {
        self.origin.snapshot_saved.get() && self.origin.file.get().is_some()
    }

    /// Every member except the snapshot, as one JSON object.
    fn fields_json(&self) -> String {
        self.fields_json_with(self.last_checkin_summary.as_deref())
    }

    /// [`State::fields_json`] with `summary` in place of the state's own.
    fn fields_json_with(&self, summary: Option<&str>) -> String {
        let policy = self.policy.as_ref().map(Policy::to_json);
        let mut out = String::with_capacity(1024);
        let mut o = Object::new(&mut out);
        o.raw("policy", policy.as_deref().unwrap_or("null"))
            .opt_num("agent_id", self.agent_id)
            .opt_str("enrollment_state", self.enrollment_state.as_deref())
            .num("sequence_number", self.sequence_number)
            .opt_str(
                "last_successful_checkin_at",
                self.last_successful_checkin_at
                    .map(timefmt::format_utc)
                    .as_deref(),
            )
            .raw("last_checkin_summary", summary.unwrap_or("null"))
            .opt_num("last_jitter_seconds", self.last_jitter_seconds)
            .opt_str(
                "last_full_snapshot_at",
                self.last_full_snapshot_at
                    .map(timefmt::format_utc)
                    .as_deref(),
            )
            .num("full_snapshot_in_progress", self.full_snapshot_in_progress)
            .num("report_incomplete", self.report_incomplete);
        o.end();
        out
    }

    /// The whole `state.json`: the snapshot first, then the other members.
    fn to_json(&self) -> String {
        let snapshot = self.last_snapshot.as_ref().map(records::snapshot_json);
        let fields = self.fields_json();
        let mut out =
            String::with_capacity(32 + fields.len() + snapshot.as_ref().map_or(0, String::len));
        out.push_str("{\"last_snapshot\":");
        out.push_str(snapshot.as_deref().unwrap_or("null"));
        out.push(',');
        out.push_str(&fields[1..]);
        out
    }

    /// The `checkin` member of `checkin.rec`: the members besides the snapshot, the
    /// `state.json` they go with (its [`FileId`] text), and the progress of a report in parts.
    /// A summary that would not leave the pace room beside it in the slot is left out.
    fn cursor_json(&self, state_file: &str, report: Option<(&str, u64, bool)>) -> String {
        let summary = self.last_checkin_summary.as_deref();
        let out = self.cursor_json_with(summary, state_file, report);
        if out.len() <= slots::ROOM - MAX_PACING_BYTES - RECORD_OVERHEAD || summary.is_none() {
            return out;
        }
        self.cursor_json_with(None, state_file, report)
    }

    fn cursor_json_with(
        &self,
        summary: Option<&str>,
        state_file: &str,
        report: Option<(&str, u64, bool)>,
    ) -> String {
        let fields = self.fields_json_with(summary);
        let mut extra = String::new();
        let mut o = Object::new(&mut extra);
        o.str("state_file", state_file);
        if let Some((name, length, full)) = report {
            o.str("report_file", name)
                .int("report_length", length)
                .num("report_full", full);
        }
        o.end();
        let mut out = String::with_capacity(fields.len() + extra.len());
        out.push_str(&fields[..fields.len() - 1]);
        out.push(',');
        out.push_str(&extra[1..]);
        out
    }
}

/// The state directory of one agent.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    record: RefCell<Record>,
}

/// When a write to `checkin.rec` is on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Synced before the call returns.
    Synced,
    /// Written to the page cache only: it survives the process being killed, not a host
    /// crash; the next synced write of the run, into the same slot, makes it durable.
    Cached,
    /// Kept in memory and written with the next write.
    Deferred,
}

/// `checkin.rec` as this run knows it: its two members and the file open for writing.
///
/// The payload of a slot is `{"checkin":…,"pacing":…}`: `checkin` is what 0.2.0 kept in
/// `checkin.json` (the small fields, the `state.json` they go with, the progress of a report),
/// `pacing` what it kept in `pacing.json` (owned by [`crate::pacing`], opaque here). Both go
/// into one slot so that a check-in that changes nothing ends with one synced page. While
/// 0.2.0's files are beside the record, a third member, `folded`, names them with their
/// identities.
#[derive(Debug, Default)]
struct Record {
    read: bool,
    checkin: Option<String>,
    /// Where the `checkin` member was read from (for the operator's messages).
    checkin_from: Option<PathBuf>,
    pacing: Option<String>,
    /// Where the `pacing` member came from, when it was there but is not JSON.
    pacing_damaged: Option<PathBuf>,
    /// Where the `pacing` member was read from (for the operator's messages).
    pacing_from: Option<PathBuf>,
    /// The payload last read or written: a write of the same payload is skipped.
    on_disk: Option<Vec<u8>>,
    writer: Option<SlotFile>,
    /// What is at the path is not a regular file: it is moved aside before the first write.
    planted: bool,
    /// 0.2.0's files found beside it, with their identities ([`FileId::text`]): named in
    /// the `folded` member of the record's writes until their removal is durable.
    legacy: Vec<(&'static str, String)>,
}

impl Record {
    fn payload(&self) -> String {
        let mut out = String::with_capacity(1024);
        let mut o = Object::new(&mut out);
        o.raw("checkin", self.checkin.as_deref().unwrap_or("null"))
            .raw("pacing", self.pacing.as_deref().unwrap_or("null"));
        if !self.legacy.is_empty() {
            let mut folded = String::new();
            let mut f = Object::new(&mut folded);
            for (name, id) in &self.legacy {
                f.str(name, id);
            }
            f.end();
            o.raw("folded", &folded);
        }
        o.end();
        out
    }
}

/// What a slot's payload holds.
#[derive(Debug, Default)]
struct Members {
    checkin: Option<String>,
    pacing: Option<String>,
    /// 0.2.0's files this record holds the members of: name and identity.
    folded: Vec<(String, String)>,
}

/// The members of a slot's payload; `None` when it is not the agent's JSON.
fn parse_record(payload: &[u8]) -> Option<Members> {
    let mut r = Reader::new(payload);
    let mut members = Members::default();
    let parsed = (|| -> Step<()> {
        r.begin_object()?;
        let (mut first, mut key) = (true, String::new());
        while r.next_key(&mut first, &mut key, 64)? {
            let member = match key.as_str() {
                "checkin" => &mut members.checkin,
                "pacing" => &mut members.pacing,
                "folded" if r.at_object()? => {
                    r.begin_object()?;
                    let (mut first, mut name) = (true, String::new());
                    while r.next_key(&mut first, &mut name, 64)? {
                        if let Scalar::String(id) = r.scalar(128)? {
                            members.folded.push((name.clone(), id));
                        }
                    }
                    continue;
                }
                _ => {
                    r.skip()?;
                    continue;
                }
            };
            if !r.at_object()? {
                r.skip()?;
                continue;
            }
            let mut text = Vec::new();
            if r.capture(&mut text, slots::ROOM)? {
                *member = String::from_utf8(text).ok();
            }
        }
        r.end()
    })();
    parsed.ok().map(|()| members)
}

/// The members of the newest slot whose payload is the agent's JSON, and whether that is the
/// older slot (then taken as the newest by `slots`, so the next write goes over the other).
fn usable(slots: &mut Slots) -> Option<(Members, bool)> {
    if let Some(members) = slots.newest.as_ref().and_then(|n| parse_record(&n.2)) {
        return Some((members, false));
    }
    let older = slots.older.as_ref().and_then(|o| parse_record(&o.2))?;
    slots.fall_back();
    Some((older, true))
}

/// 0.2.0's `checkin.json` as the record's `checkin` member (rendered again, bounded, in this
/// agent's format); `None` when it is not the JSON 0.2.0 wrote (whose `state_file` is a
/// [`FileId`] text).
fn legacy_checkin(text: &str) -> Option<String> {
    let (fields, cursor) = read_state(&mut Reader::new(text.as_bytes()), false).ok()?;
    let state_file = cursor.state_file.as_deref().filter(|f| {
        f.bytes()
            .all(|b| b.is_ascii_digit() || b == b':' || b == b'.')
    })?;
    let report = cursor
        .report_file
        .as_deref()
        .filter(|name| is_report_file(name))
        .map(|name| (name, cursor.report_length, cursor.report_full));
    Some(fields.cursor_json(state_file, report))
}

/// A JSON object of at most `cap` bytes, as text; `None` otherwise.
fn json_object(text: &str, cap: usize) -> Option<String> {
    let mut r = Reader::new(text.as_bytes());
    let mut out = Vec::new();
    let whole = (|| -> Step<bool> {
        if !r.at_object()? || !r.capture(&mut out, cap)? {
            return Ok(false);
        }
        r.end()?;
        Ok(true)
    })();
    match whole {
        Ok(true) => String::from_utf8(out).ok(),
        _ => None,
    }
}

/// The room reserved for an API key about to be issued ([`StateDir::reserve_api_key`]).
/// Dropped without a key, it is given back.
///
/// The reservation holds on filesystems that overwrite in place (ext4, xfs, tmpfs). On
/// copy-on-write ones (btrfs, ZFS) overwriting needs new blocks too, so a full disk can still
/// refuse the key; [`KeySlot::store`] then frees the room and writes the key plainly.
#[derive(Debug)]
pub struct KeySlot<'a> {
    dir: &'a StateDir,
    /// `None` once the room was given back to make space for a plain write.
    file: Option<File>,
    holds_key: bool,
}

impl KeySlot<'_> {
    /// Stores the key in the reserved room, then puts it in place as `api_key`. When the key
    /// is written but cannot be made durable or renamed, it stays in the reservation, which
    /// the next run installs (exit 1).
    pub fn store(mut self, key: &str) -> Result<()> {
        let reservation = self.dir.path.join(KEY_RESERVATION);
        let path = self.dir.path.join(KEY_FILE);
        let line = format!("{key}\n");
        let Some(file) = self.file.take() else {
            return self.dir.write_api_key(key);
        };
        if let Err(e) = file.write_all_at(line.as_bytes(), 0) {
            // The room did not take it (copy-on-write filesystem, or a key longer than the
            // room): give the room back before the plain write, which on a full disk needs it.
            warn!(
                "cannot store the API key in {} ({e}); writing it to {} instead",
                reservation.display(),
                path.display()
            );
            let _ = file.set_len(0);
            drop(file);
            let _ = fs::remove_file(&reservation);
            return self.dir.write_api_key(key).map_err(|e| {
                Error::Transient(format!(
                    "the server issued an API key but it cannot be stored: {e}. It is shown only \
                     once: free space in {}, then ask the server's administrator to issue this \
                     agent a new key and install it with --set-api-key",
                    self.dir.path.display()
                ))
            });
        }
        // From here the reservation holds the only copy: it is never removed.
        self.holds_key = true;
        let kept = |what: String| {
            Error::Transient(format!(
                "the API key was received and written to {}, but {what}; it is kept there and \
                 the next run installs it",
                reservation.display()
            ))
        };
        file.set_len(line.len() as u64)
            .and_then(|()| file.sync_all())
            .map_err(|e| kept(format!("it cannot be made durable ({e})")))?;
        fs::rename(&reservation, &path).map_err(|e| {
            kept(format!(
                "it cannot be put in place as {} ({e})",
                path.display()
            ))
        })?;
        File::open(&self.dir.path)
            .and_then(|d| d.sync_all())
            .map_err(|e| {
                Error::Transient(format!(
                    "the API key was put in place as {}, but syncing {} failed ({e}): a crash \
                     before the disk catches up may lose it",
                    path.display(),
                    self.dir.path.display()
                ))
            })
    }
}

impl Drop for KeySlot<'_> {
    fn drop(&mut self) {
        if !self.holds_key {
            let _ = fs::remove_file(self.dir.path.join(KEY_RESERVATION));
        }
    }
}

/// What `.api_key.reserved` holds.
#[derive(Debug, PartialEq, Eq)]
enum Reserved {
    Nothing,
    /// Only the padding written when the room was taken: no key arrived.
    Padding,
    /// A key of this many bytes at the start.
    Key(usize),
    /// Something the agent did not write: moved aside, never deleted.
    Unrecognised,
}

/// `.<name>.tmp-<pid>`, as [`StateDir::write`] names its temporary files.
fn is_temporary(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(".tmp-")
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Held while a run may write state; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

impl StateDir {
    /// Opens the directory, creating it 0700 when missing. An existing one must be a real
    /// directory (not a symbolic link), owned by this user and writable by nobody else: anyone
    /// who can write into it could plant a link that turns the agent's next write into a write
    /// elsewhere, as root. A directory readable by others (the earlier agent's may be 0755) is
    /// tightened to 0700.
    pub fn create(path: &Path) -> Result<StateDir> {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => return Err(symlinked_dir(path)),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(path)
                    .map_err(|e| Error::io("cannot create the state directory", path, e))?;
            }
            Err(e) => return Err(Error::io("cannot open the state directory", path, e)),
        }
        check_ancestors(path)?;
        // Checked and tightened through one descriptor, so the path cannot be swapped for a
        // link between the check and the chmod.
        let dir = open_dir(path)?;
        let meta = dir
            .metadata()
            .map_err(|e| Error::io("cannot inspect the state directory", path, e))?;
        check_owned(path, &meta, "state directory")?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(Error::Config(format!(
                "state directory {} is writable by other users (mode {mode:04o}): they could have \
                 planted files in it; check its contents, then run chmod 700 {}",
                path.display(),
                path.display()
            )));
        }
        if mode & 0o077 != 0 {
            dir.set_permissions(fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io("cannot restrict the state directory", path, e))?;
        }
        Ok(StateDir {
            path: path.to_path_buf(),
            record: RefCell::default(),
        })
    }

    /// Opens an existing directory for reading only (`--status`, `--dry-run`): nothing is created.
    pub fn existing(path: &Path) -> StateDir {
        StateDir {
            path: path.to_path_buf(),
            record: RefCell::default(),
        }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `checkin.rec`, read on first use (and again by each [`StateDir::load_state`]).
    fn record(&self) -> RefMut<'_, Record> {
        let mut record = self.record.borrow_mut();
        if !record.read {
            *record = self.read_record();
        }
        record
    }

    /// Reads `checkin.rec` and, where 0.2.0's `checkin.json` or `pacing.json` is beside it and
    /// not the file the record names as folded in (none was folded in yet, or 0.2.0 ran since,
    /// after a rollback), takes their members when they parse.
    /// Nothing here fails a run: what cannot be read is warned about and left out, and the
    /// members of `state.json` and the default pace are used instead.
    fn read_record(&self) -> Record {
        let path = self.path.join(RECORD_FILE);
        let mut record = Record {
            read: true,
            ..Record::default()
        };
        let mut folded = Vec::new();
        match input::open_regular(&path, input::Links::Refuse) {
            Ok(file) => match Slots::read(&file) {
                Ok(mut read) => match usable(&mut read) {
                    Some((members, fell_back)) => {
                        if fell_back {
                            warn!(
                                "the newest record in {} is whole but not the agent's (the \
                                 file was changed by something else); using the record before \
                                 it, so the last check-in's sequence number, time and pace may \
                                 be one write older",
                                path.display()
                            );
                        } else if read.damaged > 0 {
                            debug!(
                                "{}: one slot holds no whole record (a write was cut short); \
                                 using the other",
                                path.display()
                            );
                        }
                        record.on_disk = read.newest.map(|n| n.2);
                        record.checkin = members.checkin;
                        record.checkin_from = Some(path.clone());
                        record.pacing = members.pacing;
                        record.pacing_from = Some(path.clone());
                        folded = members.folded;
                    }
                    None => warn!(
                        "{} is damaged ({}); using the last check-in's fields from \
                         {STATE_FILE} (its sequence number and time may be older) and starting \
                         again from small check-in parts",
                        path.display(),
                        if read.damaged == 2 {
                            "neither of its slots holds a whole record"
                        } else {
                            "no slot holds a record the agent can read"
                        }
                    ),
                },
                Err(e) => warn!(
                    "cannot read {} ({e}); using the last check-in's fields from {STATE_FILE}",
                    path.display()
                ),
            },
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                if let Some(kind) = input::not_a_file(&e) {
                    record.planted = true;
                    warn!(
                        "{} is {kind}, which the agent never creates; using the last check-in's \
                         fields from {STATE_FILE}; it is moved aside at the next write",
                        path.display()
                    );
                } else {
                    warn!(
                        "cannot read {} ({e}); using the last check-in's fields from {STATE_FILE}",
                        path.display()
                    );
                }
            }
        }
        for name in [CURSOR_FILE, PACING_FILE] {
            let legacy = self.path.join(name);
            let Ok(meta) = fs::symlink_metadata(&legacy) else {
                continue;
            };
            let id = FileId::of(&meta).text();
            let seen = folded.iter().any(|(n, i)| n == name && *i == id);
            record.legacy.push((name, id));
            if seen {
                // Folded in by an earlier run, stopped before the file's removal was durable.
                continue;
            }
            // Not folded in yet: from before the upgrade, or 0.2.0 wrote it after a rollback
            // (0.2.0 replaces its files, so a rewritten one has another identity).
            let text = match read_own(&legacy, MAX_CURSOR_BYTES) {
                Ok(text) => text,
                Err(e) => {
                    warn!("cannot read {} ({e}); ignoring it", legacy.display());
                    continue;
                }
            };
            if name == CURSOR_FILE {
                match legacy_checkin(&text) {
                    Some(checkin) => {
                        record.checkin = Some(checkin);
                        record.checkin_from = Some(legacy);
                    }
                    None => warn!(
                        "{} (written by agent 0.2.0) is damaged; ignoring it and keeping the last \
                         check-in's fields of {}",
                        legacy.display(),
                        if record.checkin.is_some() {
                            RECORD_FILE
                        } else {
                            STATE_FILE
                        }
                    ),
                }
            } else {
                match json_object(&text, MAX_PACING_BYTES) {
                    Some(pacing) => {
                        record.pacing = Some(pacing);
                        record.pacing_from = Some(legacy);
                        record.pacing_damaged = None;
                    }
                    None if record.pacing.is_some() => warn!(
                        "{} (written by agent 0.2.0) is damaged; ignoring it and keeping the pace \
                         saved in {RECORD_FILE}",
                        legacy.display()
                    ),
                    None => {
                        record.pacing_from = Some(legacy.clone());
                        record.pacing_damaged = Some(legacy);
                    }
                }
            }
        }
        record
    }

    /// The `pacing` member of `checkin.rec` (JSON text), as [`crate::pacing`] saved it. `Err`
    /// names the file when a member was there but damaged.
    pub fn pacing_record(&self) -> std::result::Result<Option<String>, PathBuf> {
        let record = self.record();
        match (&record.pacing, &record.pacing_damaged) {
            (Some(text), _) => Ok(Some(text.clone())),
            (None, Some(path)) => Err(path.clone()),
            (None, None) => Ok(None),
        }
    }

    /// The `checkin` member of `checkin.rec` (JSON text), whichever `state.json` it names.
    pub fn checkin_record(&self) -> Option<String> {
        self.record().checkin.clone()
    }

    /// Where the pace was read from, for the operator's messages.
    pub fn pacing_path(&self) -> PathBuf {
        self.record()
            .pacing_from
            .clone()
            .unwrap_or_else(|| self.path.join(RECORD_FILE))
    }

    /// Replaces the `pacing` member of `checkin.rec` (a JSON object, as [`crate::pacing`]
    /// renders it), written as `when` says. Call with the lock held.
    pub fn save_pacing(&self, pacing: String, when: Durability) -> Result<()> {
        {
            let mut record = self.record();
            record.pacing = Some(pacing);
            record.pacing_damaged = None;
        }
        self.write_record(when)
    }

    /// Replaces the `checkin` member in memory; the next write of the record writes it.
    fn set_checkin(&self, checkin: Option<String>) {
        self.record().checkin = checkin;
    }

    /// Writes the record's members into the slot that does not hold the newest durable record
    /// (nothing when they are what the file already holds). While 0.2.0's files are beside
    /// it, the write is synced and names them (`folded`), then they are removed and the
    /// removal made durable: a crash before that leaves files the next run knows as folded.
    fn write_record(&self, when: Durability) -> Result<()> {
        if when == Durability::Deferred {
            return Ok(());
        }
        let path = self.path.join(RECORD_FILE);
        let mut record = self.record();
        let mut payload = record.payload().into_bytes();
        if payload.len() > slots::ROOM && record.pacing.is_some() {
            // The fields are bounded where they are received so that this does not happen;
            // the pace is the member whose loss costs least (the default pace until the
            // server answers again), the report's progress is never given up.
            warn!(
                "the last check-in's fields and the server's pace do not fit {} together ({} \
                 bytes); the pace is left out and the default one used until the server \
                 sends it again",
                path.display(),
                payload.len()
            );
            record.pacing = None;
            payload = record.payload().into_bytes();
        }
        if payload.len() > slots::ROOM {
            return Err(Error::Transient(format!(
                "the last check-in's fields do not fit {} ({} bytes, {} at most); nothing was \
                 recorded and the next run sends this check-in again; report this to the \
                 agent's maintainers",
                path.display(),
                payload.len(),
                slots::ROOM
            )));
        }
        let folding = !record.legacy.is_empty();
        let sync = when == Durability::Synced || folding;
        let unchanged = record.on_disk.as_deref() == Some(&payload[..]);
        if unchanged && !sync {
            return Ok(());
        }
        if record.writer.is_none() {
            let planted = std::mem::take(&mut record.planted);
            record.writer = Some(self.open_record(&path, &payload, sync, planted)?);
            record.on_disk = Some(payload);
        } else if let Some(writer) = record.writer.as_mut() {
            let written = if unchanged {
                writer.sync()
            } else {
                writer.write(&payload, sync)
            };
            written.map_err(|e| Error::io("cannot write", &path, e))?;
            record.on_disk = Some(payload);
        }
        if folding {
            // The record now holds what 0.2.0's files held, and names them: until their
            // removal is durable a crash can bring them back, known by their identity.
            for (name, _) in &record.legacy {
                self.remove_quietly(name);
            }
            match File::open(&self.path).and_then(|d| d.sync_all()) {
                Ok(()) => record.legacy.clear(),
                Err(e) => warn!(
                    "cannot sync the state directory {} ({e}); the record keeps naming the \
                     0.2.0 files it folded in",
                    self.path.display()
                ),
            }
        }
        Ok(())
    }

    /// Opens `checkin.rec` for writing and writes `first` (synced with `sync`), creating the
    /// file (with `first` in its first slot, durable) when missing; what is there but is not a
    /// regular file is moved aside first.
    fn open_record(
        &self,
        path: &Path,
        first: &[u8],
        sync: bool,
        planted: bool,
    ) -> Result<SlotFile> {
        // O_NOATIME: the slots are read back through this descriptor (see input::open_regular).
        let open = |noatime: i32| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(
                    libc::O_CLOEXEC
                        | libc::O_NOCTTY
                        | libc::O_NOFOLLOW
                        | libc::O_NONBLOCK
                        | noatime,
                )
                .open(path)
        };
        let opened = match open(libc::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
            opened => opened,
        };
        let regular = match opened {
            Ok(file) => match file.metadata() {
                Ok(meta) if meta.is_file() => Some(file),
                Ok(_) => None,
                Err(e) => return Err(Error::io("cannot inspect", path, e)),
            },
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            // A link (ELOOP), a FIFO without a reader (ENXIO), a directory (EISDIR).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ELOOP | libc::ENXIO | libc::EISDIR)
                ) =>
            {
                None
            }
            Err(e) => return Err(Error::io("cannot open", path, e)),
        };
        if let Some(file) = regular {
            let written = (|| {
                let mut slots = Slots::read(&file)?;
                // The slot kept is the one read_record took the members from.
                usable(&mut slots);
                let mut writer = SlotFile::open(file, &slots)?;
                if slots.newest.as_ref().map(|n| &n.2[..]) != Some(first) {
                    writer.write(first, sync)?;
                }
                Ok(writer)
            })();
            return written.map_err(|e| Error::io("cannot write", path, e));
        }
        if planted || fs::symlink_metadata(path).is_ok() {
            // A name not taken yet: an earlier one moved aside this second is kept too.
            let now = timefmt::now();
            let aside = (0..)
                .map(|n| match n {
                    0 => self.path.join(format!("{RECORD_FILE}.corrupt-{now}")),
                    n => self.path.join(format!("{RECORD_FILE}.corrupt-{now}-{n}")),
                })
                .find(|p| fs::symlink_metadata(p).is_err())
                .unwrap_or_default();
            fs::rename(path, &aside).map_err(|e| Error::io("cannot move aside", path, e))?;
            warn!(
                "{} was not a regular file; moved it to {} and writing a new one",
                path.display(),
                aside.display()
            );
        }
        let tmp = self
            .path
            .join(format!(".{RECORD_FILE}.tmp-{}", std::process::id()));
        let created = (|| -> std::io::Result<SlotFile> {
            let _ = fs::remove_file(&tmp);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&tmp)?;
            let mut writer = SlotFile::format(file)?;
            writer.write(first, true)?;
            fs::rename(&tmp, path)?;
            File::open(&self.path)?.sync_all()?;
            Ok(writer)
        })();
        created.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io("cannot write", path, e)
        })
    }

    /// Takes the run lock, waiting up to `wait` for another run to finish. `None`: another run
    /// still holds it. Call [`StateDir::tidy`] next.
    pub fn lock(&self, wait: Duration) -> Result<Option<Lock>> {
        let path = self.path.join(LOCK_FILE);
        // O_NOFOLLOW: a planted `agent.lock` link must not make us create a file elsewhere.
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => Error::Config(format!(
                    "{} is a symbolic link, which the agent never creates: remove it",
                    path.display()
                )),
                // A FIFO without a reader (ENXIO) or a directory (EISDIR): nothing a later run
                // can get past.
                Some(libc::ENXIO | libc::EISDIR) => not_a_lock_file(&path),
                _ => Error::io("cannot open the lock file", &path, e),
            })?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("cannot inspect the lock file", &path, e))?;
        if !meta.is_file() {
            return Err(not_a_lock_file(&path));
        }
        let start = Instant::now();
        loop {
            // SAFETY: flock on a file descriptor we own; no memory is passed.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Some(Lock { _file: file }));
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) && err.kind() != ErrorKind::Interrupted
            {
                return Err(Error::io("cannot lock", &path, err));
            }
            if start.elapsed() >= wait {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A small file of the directory (at most 64 KiB); `None` when missing, empty text when it
    /// is not UTF-8 or too large (the caller judges it as damaged).
    pub(crate) fn read_small(&self, name: &str) -> Result<Option<String>> {
        let path = self.path.join(name);
        match read_own(&path, 64 << 10) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) if input::not_a_file(&e).is_some() => Err(planted(&path, &e)),
            // Binary junk or a huge file never fixes itself: the callers judge it as corrupt.
            Err(e) if e.kind() == ErrorKind::InvalidData => Ok(Some(String::new())),
            Err(e) => Err(Error::io("cannot read", &path, e)),
        }
    }

    /// The agent's identity, if it has one.
    pub fn read_uuid(&self) -> Result<Option<String>> {
        let Some(text) = self.read_small(UUID_FILE)? else {
            return Ok(None);
        };
        let uuid = text.trim();
        if uuid.is_empty() || uuid.len() > 128 || !uuid.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Config(format!(
                "{} is corrupt; restore it from a backup to keep this agent's identity, or delete it \
                 to enroll as a new agent",
                self.path.join(UUID_FILE).display()
            )));
        }
        Ok(Some(uuid.to_string()))
    }

    /// The agent's identity, created (random v4 UUID) on the first run.
    pub fn ensure_uuid(&self) -> Result<String> {
        if let Some(uuid) = self.read_uuid()? {
            return Ok(uuid);
        }
        let uuid = new_uuid()?;
        self.write(UUID_FILE, format!("{uuid}\n").as_bytes())?;
        info!("created agent identity {uuid}");
        Ok(uuid)
    }

    /// The per-agent API key, if one was issued.
    pub fn read_api_key(&self) -> Result<Option<String>> {
        let Some(text) = self.read_small(KEY_FILE)? else {
            return Ok(None);
        };
        match check_api_key(text.trim()) {
            Ok(key) => Ok(Some(key.to_string())),
            Err(why) => {
                warn!(
                    "{} is unusable ({why}); ignoring it",
                    self.path.join(KEY_FILE).display()
                );
                Ok(None)
            }
        }
    }

    /// Stores the API key (0600), replacing any other (`--set-api-key`).
    pub fn write_api_key(&self, key: &str) -> Result<()> {
        self.write(KEY_FILE, format!("{key}\n").as_bytes())
    }

    /// Takes the room the API key will need, before registering: the server shows a key once,
    /// so a key that arrives when the disk is full must still find its place. Fails (on a full
    /// disk, exit 1) before anything is sent. Call with the lock held.
    pub fn reserve_api_key(&self) -> Result<KeySlot<'_>> {
        let path = self.path.join(KEY_RESERVATION);
        let _ = fs::remove_file(&path);
        let taken = (|| -> std::io::Result<File> {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&path)?;
            // Written, not just sized: only written blocks are really allocated (ext4's delayed
            // allocation is settled by the fsync, tmpfs allocates on write).
            file.write_all(&[b'\n'; KEY_ROOM as usize])?;
            file.sync_all()?;
            File::open(&self.path)?.sync_all()?;
            Ok(file)
        })();
        match taken {
            Ok(file) => Ok(KeySlot {
                dir: self,
                file: Some(file),
                holds_key: false,
            }),
            Err(e) => {
                let _ = fs::remove_file(&path);
                Err(Error::io(
                    "nothing was sent to the server: no room for the API key it would issue in",
                    &path,
                    e,
                ))
            }
        }
    }

    /// Cleans up after a killed run; call with the lock held, before anything else is written.
    /// Under the lock, nothing else writes here: temporary files are what a killed run left
    /// (each up to the size of the state), and a key a killed run received but did not put in
    /// place is installed now.
    pub fn tidy(&self) -> Result<()> {
        let names = list_names(&self.path)
            .map_err(|e| Error::io("cannot list the state directory", &self.path, e))?;
        for name in names {
            let path = self.path.join(&name);
            let name = name.to_string_lossy();
            if is_temporary(&name) {
                match fs::remove_file(&path) {
                    Ok(()) => debug!("removed {name}, left by an interrupted run"),
                    Err(e) => warn!("cannot remove {}: {e}", path.display()),
                }
            }
        }
        self.install_reserved_key()
    }

    /// What `.api_key.reserved` holds, read without changing anything.
    fn reserved(&self) -> Result<Reserved> {
        let path = self.path.join(KEY_RESERVATION);
        let bytes =
            match input::read_regular(&path, input::Links::Refuse, KEY_ROOM) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Reserved::Nothing),
                Err(e) if input::not_a_file(&e).is_some() => return Err(planted(&path, &e)),
                // Larger than the room: not what the agent writes there.
                Err(e) if e.kind() == ErrorKind::InvalidData => return Ok(Reserved::Unrecognised),
                Err(e) => return Err(Error::io(
                    "cannot read (it may hold an API key an earlier run received, so it is kept)",
                    &path,
                    e,
                )),
            };
        // The padding the agent writes is newlines; a crash can leave zeros in its place.
        if bytes.iter().all(|&b| b == b'\n' || b == 0) {
            return Ok(Reserved::Padding);
        }
        // A key is written at the start, followed by a newline and what is left of the padding.
        let key = std::str::from_utf8(&bytes)
            .ok()
            .map(|text| text.trim_end_matches(['\n', '\0']))
            .filter(|key| check_api_key(key).is_ok());
        Ok(match key {
            Some(key) => Reserved::Key(key.len()),
            None => Reserved::Unrecognised,
        })
    }

    /// Whether an API key an earlier run received waits in its reservation (`--status`).
    pub fn key_waiting(&self) -> bool {
        matches!(self.reserved(), Ok(Reserved::Key(_)))
    }

    fn install_reserved_key(&self) -> Result<()> {
        let reservation = self.path.join(KEY_RESERVATION);
        let key_len = match self.reserved()? {
            Reserved::Nothing => return Ok(()),
            Reserved::Padding => {
                // No key was ever stored there.
                let _ = fs::remove_file(&reservation);
                return Ok(());
            }
            Reserved::Unrecognised => {
                let aside = self
                    .path
                    .join(format!("{KEY_FILE}.unrecognised-{}", timefmt::now()));
                fs::rename(&reservation, &aside)
                    .map_err(|e| Error::io("cannot move aside", &reservation, e))?;
                warn!(
                    "{} held neither an API key nor the agent's padding; moved it to {}: if it \
                     holds a key the server issued, install that key with --set-api-key",
                    reservation.display(),
                    aside.display()
                );
                return Ok(());
            }
            Reserved::Key(len) => len,
        };
        let target = if self.path.join(KEY_FILE).exists() {
            // A key was installed since (`--set-api-key`); this one is kept beside it.
            let aside = format!("{KEY_FILE}.unused-{}", timefmt::now());
            warn!(
                "found an API key received by an earlier run beside the current one; kept it in {}",
                self.path.join(&aside).display()
            );
            aside
        } else {
            info!("installing the API key an earlier run received but could not put in place");
            KEY_FILE.to_string()
        };
        let path = self.path.join(target);
        // Cut to the key and its newline first, in place (no new room needed), so the file
        // installed reads as a key; then rename.
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&reservation)
            .and_then(|file| {
                file.write_all_at(b"\n", key_len as u64)?;
                file.set_len(key_len as u64 + 1)?;
                file.sync_all()
            })
            .and_then(|()| fs::rename(&reservation, &path))
            .and_then(|()| File::open(&self.path)?.sync_all())
            .map_err(|e| {
                Error::io(
                    "cannot install the API key an earlier run left in its reservation as",
                    &path,
                    e,
                )
            })
    }

    /// Loads the state: `state.json`, the small fields of the record's `checkin` member laid
    /// over it when they belong to this very `state.json`, and the accepted parts of a report
    /// cut short. A missing file is a fresh state; a corrupt one is moved aside with a warning
    /// (when `repair`) and the run continues from a fresh state. With `repair` (the caller
    /// holds the lock), report files nothing refers to any more are removed.
    pub fn load_state(&self, repair: bool) -> Result<State> {
        self.load(repair, true)
    }

    /// [`StateDir::load_state`] without the snapshot, which [`StateDir::load_snapshot`] reads
    /// later: a run collects before it needs the snapshot, and so never holds both the
    /// collection's buffers and the saved records at once.
    pub fn load_state_deferred(&self, repair: bool) -> Result<State> {
        self.load(repair, false)
    }

    fn load(&self, repair: bool, snapshot: bool) -> Result<State> {
        // Read again: a run (or, after a rollback, 0.2.0) may have written it since.
        *self.record.borrow_mut() = Record::default();
        let mut state = self.load_state_file(repair, snapshot)?;
        let cursor = self.load_cursor(&state);
        if let Some((fields, cursor)) = cursor {
            self.take_fields(&mut state, fields);
            if snapshot {
                self.resume(&mut state, cursor);
            } else {
                *state.origin.report_file.borrow_mut() = cursor.report_file.clone();
                *state.origin.resume.borrow_mut() = Some(cursor);
            }
        }
        if repair {
            self.remove_stale_reports(&state);
        }
        Ok(state)
    }

    /// Reads the snapshot a [`StateDir::load_state_deferred`] left out (and the accepted parts
    /// of a report cut short); nothing when it is already read.
    pub fn load_snapshot(&self, state: &mut State) -> Result<()> {
        if !state.origin.deferred.get() {
            return Ok(());
        }
        let path = self.path.join(STATE_FILE);
        if let Some(id) = state.origin.file.get() {
            let file = input::open_regular(&path, input::Links::Refuse)
                .map_err(|e| Error::io("cannot read", &path, e))?;
            let meta = file
                .metadata()
                .map_err(|e| Error::io("cannot read", &path, e))?;
            if FileId::of(&meta) != id {
                return Err(Error::Transient(format!(
                    "{} was replaced while this run held the lock; the next run reads it again",
                    path.display()
                )));
            }
            let reader = &mut Reader::new(BufReader::with_capacity(64 << 10, file));
            match read_state(reader, true) {
                Ok((read, _)) => state.last_snapshot = read.last_snapshot,
                Err(Fault::Io(e)) => return Err(Error::io("cannot read", &path, e)),
                Err(_) => {
                    return Err(Error::Transient(format!(
                        "{} no longer parses; the next run reads it again",
                        path.display()
                    )))
                }
            }
        }
        state.origin.deferred.set(false);
        let cursor = state.origin.resume.borrow_mut().take();
        if let Some(cursor) = cursor {
            self.resume(state, cursor);
        }
        Ok(())
    }

    fn load_state_file(&self, repair: bool, snapshot: bool) -> Result<State> {
        let path = self.path.join(STATE_FILE);
        // Never through a link, only a regular file: a link or a FIFO is moved aside below like
        // any corrupt state (renaming one is harmless).
        let opened = match input::open_regular(&path, input::Links::Refuse) {
            Ok(file) => Ok(file),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(State::default()),
            Err(e) if input::not_a_file(&e).is_some() => Err(e),
            Err(e) => return Err(Error::io("cannot read", &path, e)),
        };
        let parsed = match opened {
            Err(_) => Err(Fault::Syntax),
            Ok(file) => {
                let meta = file
                    .metadata()
                    .map_err(|e| Error::io("cannot read", &path, e))?;
                if meta.len() > MAX_STATE_BYTES || !meta.is_file() {
                    Err(Fault::Syntax)
                } else {
                    read_state(
                        &mut Reader::new(BufReader::with_capacity(64 << 10, file)),
                        snapshot,
                    )
                    .map(|read| (read, FileId::of(&meta)))
                }
            }
        };
        match parsed {
            Ok(((state, _), id)) => {
                state.origin.file.set(Some(id));
                state.origin.snapshot_saved.set(true);
                state.origin.deferred.set(!snapshot);
                return Ok(state);
            }
            Err(Fault::Io(e)) if e.kind() != ErrorKind::InvalidData => {
                return Err(Error::io("cannot read", &path, e))
            }
            Err(_) => {}
        }
        if repair {
            let aside = self
                .path
                .join(format!("{STATE_FILE}.corrupt-{}", timefmt::now()));
            fs::rename(&path, &aside).map_err(|e| Error::io("cannot move aside", &path, e))?;
            warn!(
                "{} was corrupt; moved it to {} and starting from a fresh state (the next report is a full snapshot)",
                path.display(),
                aside.display()
            );
        } else {
            warn!(
                "{} is corrupt; treating it as a fresh state",
                path.display()
            );
        }
        Ok(State::default())
    }

    /// The `checkin` member of the record, when it belongs to the `state.json` just read. It
    /// is rendered again (bounded, in this agent's format) or, written for another
    /// `state.json`, dropped from the record's next write.
    fn load_cursor(&self, state: &State) -> Option<(State, Cursor)> {
        let (text, from) = {
            let mut record = self.record();
            (record.checkin.take()?, record.checkin_from.clone())
        };
        let base = state.origin.file.get()?.text();
        let read = read_state(&mut Reader::new(text.as_bytes()), false);
        match read {
            Ok((fields, cursor)) if cursor.state_file.as_deref() == Some(&base) => {
                let report = cursor
                    .report_file
                    .as_deref()
                    .map(|name| (name, cursor.report_length, cursor.report_full));
                self.set_checkin(Some(fields.cursor_json(&base, report)));
                Some((fields, cursor))
            }
            // Written for an earlier state.json (replaced since, e.g. by the earlier agent).
            Ok(_) => None,
            Err(_) => {
                warn!(
                    "the last check-in's fields in {} are unreadable; using those of {STATE_FILE} (the \
                     last check-in's sequence number and time may be older)",
                    from.unwrap_or_else(|| self.path.join(RECORD_FILE)).display()
                );
                None
            }
        }
    }

    /// Takes the small fields of the record's `checkin` member.
    fn take_fields(&self, state: &mut State, fields: State) {
        let snapshot = state.last_snapshot.take();
        let origin = std::mem::take(&mut state.origin);
        *state = fields;
        state.last_snapshot = snapshot;
        state.origin = origin;
    }

    /// When a report was cut short, takes the records of its accepted parts.
    fn resume(&self, state: &mut State, cursor: Cursor) {
        let Some(name) = cursor.report_file else {
            return;
        };
        match self.read_report(&name, cursor.report_length) {
            Ok((accepted, begun)) => {
                let base = state.last_snapshot.take().unwrap_or_default();
                let full = cursor.report_full;
                let mut s = Snapshot {
                    addresses: choose(begun[0], full, accepted.addresses, base.addresses),
                    neighbors: choose(begun[1], full, accepted.neighbors, base.neighbors),
                    connections: choose(begun[2], full, accepted.connections, base.connections),
                    routes: choose(begun[3], full, accepted.routes, base.routes),
                };
                tidy(&mut s);
                state.last_snapshot = Some(s);
                state.origin.snapshot_saved.set(false);
                *state.origin.report_file.borrow_mut() = Some(name);
            }
            Err(why) => warn!(
                "the report in progress cannot be resumed ({why}); its accepted parts will be sent again"
            ),
        }
    }

    /// The accepted prefix of a report file: its records and which tables it had begun.
    fn read_report(
        &self,
        name: &str,
        length: u64,
    ) -> std::result::Result<(Snapshot, [bool; 4]), String> {
        if !is_report_file(name) {
            return Err(format!("{RECORD_FILE} names {name:?}, not a report file"));
        }
        let path = self.path.join(name);
        let file = input::open_regular(&path, input::Links::Refuse)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let size = file.metadata().map_err(|e| e.to_string())?.len();
        if size < length {
            return Err(format!(
                "{} is shorter than its accepted parts",
                path.display()
            ));
        }
        let mut r = Reader::new(BufReader::with_capacity(64 << 10, file.take(length)));
        let mut s = Snapshot::default();
        let mut tally = records::Tally::default();
        let result = (|| -> Step<()> {
            r.begin_object()?;
            let (mut first, mut key) = (true, String::new());
            if !r.next_key(&mut first, &mut key, 64)? || key != "last_snapshot" {
                return Err(Fault::Syntax);
            }
            records::read_snapshot(&mut r, &mut s, &mut tally)
        })();
        match result {
            // The accepted prefix ends between records, or after the snapshot's last table.
            Ok(()) | Err(Fault::Eof) => Ok((s, tally.begun)),
            Err(_) => Err(format!("{} is damaged", path.display())),
        }
    }

    /// Removes report files that neither the loaded state nor the record's `checkin` member
    /// refers to (what a run killed before its first accepted part, or a finished resume, left
    /// behind), and the temporary files of writes a killed run did not finish.
    fn remove_stale_reports(&self, state: &State) {
        let keep = state.origin.report_file.borrow().clone();
        let Ok(names) = list_names(&self.path) else {
            return;
        };
        for name in names {
            let Some(name) = name.to_str() else { continue };
            let stale =
                (is_report_file(name) && keep.as_deref() != Some(name)) || is_temp_file(name);
            if stale {
                let path = self.path.join(name);
                match fs::remove_file(&path) {
                    Ok(()) => debug!("removed {name}, left by a run that was stopped"),
                    Err(e) => warn!("cannot remove {}: {e}", path.display()),
                }
            }
        }
    }

    fn state_file_id(&self) -> Result<Option<FileId>> {
        let path = self.path.join(STATE_FILE);
        match fs::symlink_metadata(&path) {
            Ok(meta) => Ok(Some(FileId::of(&meta))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("cannot read", &path, e)),
        }
    }

    /// Persists the state. When `state.json` still holds this state's snapshot, only the small
    /// fields are written (the `checkin` member of `checkin.rec`, with the pace that
    /// [`StateDir::save_pacing`] left for it: one page); otherwise `state.json` is replaced
    /// whole. While a report is in progress, [`Report::commit`] saves instead (this would
    /// forget the report's accepted parts, which would then be sent again).
    pub fn save_state(&self, state: &State) -> Result<()> {
        let on_disk = self.state_file_id()?;
        if let Some(id) =
            on_disk.filter(|id| state.snapshot_saved() && state.origin.file.get() == Some(*id))
        {
            self.set_checkin(Some(state.cursor_json(&id.text(), None)));
            return self.write_record(Durability::Synced);
        }
        self.write(STATE_FILE, state.to_json().as_bytes())?;
        state.origin.file.set(self.state_file_id()?);
        state.origin.snapshot_saved.set(true);
        // The fields now live in state.json; a report resumed from is folded in. The record's
        // `checkin` member names the old file (so it is ignored) until the record's next write
        // drops it.
        self.set_checkin(None);
        self.remove_quietly(CURSOR_FILE);
        if let Some(name) = state.origin.report_file.borrow_mut().take() {
            self.remove_quietly(&name);
        }
        Ok(())
    }

    fn remove_quietly(&self, name: &str) {
        let path = self.path.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => warn!("cannot remove {}: {e}", path.display()),
        }
    }

    /// Starts the file of a report about to be sent in parts (see [`Report`]). `state.json`
    /// must be the file the state was read from; when it is not (a fresh or corrupt state, a
    /// file replaced meanwhile), the state is saved first so the progress has a base.
    pub fn begin_report(&self, state: &State, full: bool) -> Result<Report<'_>> {
        let on_disk = self.state_file_id()?;
        if on_disk.is_none() || on_disk != state.origin.file.get() {
            self.save_state(state)?;
        }
        let base = state
            .origin
            .file
            .get()
            .ok_or_else(|| Error::Transient(format!("{STATE_FILE} vanished while saving")))?;
        let mut b = [0u8; 6];
        getrandom::fill(&mut b)
            .map_err(|e| Error::Transient(format!("no randomness for a file name: {e}")))?;
        let name: String = format!(
            "{REPORT_PREFIX}{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        );
        let path = self.path.join(&name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| Error::io("cannot create", &path, e))?;
        Ok(Report {
            dir: self,
            file,
            name,
            base,
            full,
            buf: String::with_capacity(FLUSH_AT + 4096),
            staged: Pen::default(),
            committed: Pen::default(),
            finished: false,
        })
    }

    /// Atomic, durable replacement of one file, mode 0600.
    pub(crate) fn write(&self, name: &str, data: &[u8]) -> Result<()> {
        let path = self.path.join(name);
        let tmp = self
            .path
            .join(format!(".{name}.tmp-{}", std::process::id()));
        let result = (|| -> std::io::Result<()> {
            let _ = fs::remove_file(&tmp);
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&tmp)?;
            file.write_all(data)?;
            file.sync_all()?;
            drop(file);
            fs::rename(&tmp, &path)?;
            File::open(&self.path)?.sync_all()
        })();
        result.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io("cannot write", &path, e)
        })
    }
}

/// Sorts and de-duplicates a snapshot read from a file, and gives back the tables' spare
/// capacity: at 200,000 records that is tens of megabytes a delta run would otherwise hold
/// beside the collection. A file this agent wrote is sorted already and is not sorted again;
/// only another writer's file (the earlier agent's) pays for the stable sort's buffer, once.
/// The stable sort is the one [`Snapshot::normalize`] compiles for the same record types: an
/// unstable sort here compiled a second sort of each table into the binary (8 KB).
fn tidy(s: &mut Snapshot) {
    fn table<T: Ord>(v: &mut Vec<T>) {
        if !v.is_sorted() {
            v.sort();
        }
        v.dedup();
        v.shrink_to_fit();
    }
    table(&mut s.addresses);
    table(&mut s.neighbors);
    table(&mut s.connections);
    table(&mut s.routes);
}

/// A table of a resumed snapshot: what the report file holds once the report reached the table;
/// before that, what the server had (a delta) or nothing (a full snapshot sends it again).
fn choose<T>(begun: bool, full: bool, accepted: Vec<T>, base: Vec<T>) -> Vec<T> {
    match (begun, full) {
        (true, _) => accepted,
        (false, true) => Vec::new(),
        (false, false) => base,
    }
}

/// `.state.json.tmp-<pid>` and the like, from [`StateDir::write`]; the caller holds the lock, so
/// no other run is writing one.
fn is_temp_file(name: &str) -> bool {
    [
        STATE_FILE,
        RECORD_FILE,
        CURSOR_FILE,
        PACING_FILE,
        KEY_FILE,
        UUID_FILE,
    ]
    .iter()
    .any(|f| {
        name.strip_prefix('.')
            .and_then(|n| n.strip_prefix(f))
            .and_then(|n| n.strip_prefix(".tmp-"))
            .is_some_and(|pid| {
                !pid.is_empty()
                    && pid.bytes().all(|b| b.is_ascii_digit())
                    && pid != std::process::id().to_string()
            })
    })
}

fn is_report_file(name: &str) -> bool {
    name.strip_prefix(REPORT_PREFIX)
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Where a report file's writer stands.
#[derive(Clone, Copy, Debug, Default)]
struct Pen {
    /// Bytes in the file.
    bytes: u64,
    /// Tables whose array was begun (report order).
    begun: usize,
    /// The current array has an item (the next one needs a comma).
    items: bool,
    /// The snapshot object is closed.
    closed: bool,
}

/// A report sent in parts, recorded as the next `state.json` growing part by part.
///
/// The file is `{"last_snapshot":{` followed, table by table, by the records of the old
/// snapshot still present (`kept`) and then the records of each accepted part, in report order.
/// A part's records are appended before it is sent ([`Report::stage`]); once the server accepts
/// it, [`Report::commit`] makes them durable and records the accepted length in the `checkin`
/// member of `checkin.rec`.
/// After the last part, [`Report::finish`] appends the other members and renames the file over
/// `state.json`: the snapshot is written once per run, however many parts it takes. A run that
/// stops between parts leaves `state.json` as it was plus `checkin.rec` naming the accepted
/// prefix of this file, from which the next run resumes (see `docs/state.md`).
pub struct Report<'d> {
    dir: &'d StateDir,
    file: File,
    name: String,
    /// The `state.json` the progress is recorded against.
    base: FileId,
    full: bool,
    buf: String,
    staged: Pen,
    committed: Pen,
    finished: bool,
}

const TABLES: [&str; 4] = ["addresses", "neighbors", "connections", "routes"];

impl Report<'_> {
    /// Appends the records of `part` (`rendered`: each table's records as the report body has
    /// them, `rec,rec,…`), the `kept` records of every table the report enters, and with
    /// `last` the end of the snapshot; not yet durable.
    pub fn stage(
        &mut self,
        kept: &Snapshot,
        part: &Part,
        rendered: [&str; 4],
        last: bool,
    ) -> Result<()> {
        let mut pen = self.staged;
        if pen.bytes == 0 && self.buf.is_empty() {
            self.buf.push_str("{\"last_snapshot\":{");
        }
        for (t, records) in rendered.into_iter().enumerate() {
            if part.ranges[t].is_empty() {
                continue;
            }
            self.begin_through(&mut pen, t, kept)?;
            if pen.items {
                self.buf.push(',');
            }
            self.buf.push_str(records);
            pen.items = true;
            if self.buf.len() >= FLUSH_AT {
                self.flush(&mut pen)?;
            }
        }
        if last && !pen.closed {
            self.begin_through(&mut pen, 3, kept)?;
            self.buf.push_str("]}");
            pen.closed = true;
        }
        self.flush(&mut pen)?;
        self.staged = pen;
        Ok(())
    }

    fn begin_through(&mut self, pen: &mut Pen, t: usize, kept: &Snapshot) -> Result<()> {
        while pen.begun <= t {
            if pen.begun > 0 {
                self.buf.push_str("],");
            }
            crate::json::push_str(&mut self.buf, TABLES[pen.begun]);
            self.buf.push_str(":[");
            pen.items = false;
            let table = pen.begun;
            pen.begun += 1;
            for i in 0..crate::report::table_len(kept, table) {
                self.record(pen, kept, table, i)?;
            }
        }
        Ok(())
    }

    fn record(&mut self, pen: &mut Pen, s: &Snapshot, t: usize, i: usize) -> Result<()> {
        if pen.items {
            self.buf.push(',');
        }
        pen.items = true;
        crate::report::push_record(&mut self.buf, s, t, i);
        if self.buf.len() >= FLUSH_AT {
            self.flush(pen)?;
        }
        Ok(())
    }

    fn flush(&mut self, pen: &mut Pen) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(self.buf.as_bytes(), pen.bytes)
            .map_err(|e| Error::io("cannot write", &self.dir.path.join(&self.name), e))?;
        pen.bytes += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Forgets what was staged since the last commit (the part was not accepted).
    pub fn unstage(&mut self) -> Result<()> {
        self.buf.clear();
        self.staged = self.committed;
        self.file
            .set_len(self.committed.bytes)
            .map_err(|e| Error::io("cannot truncate", &self.dir.path.join(&self.name), e))
    }

    /// Records that the staged part was accepted: its records durable, then the record's
    /// `checkin` member naming the new accepted length with the state's small fields (and the
    /// pace left by [`StateDir::save_pacing`]), synced.
    pub fn commit(&mut self, state: &State) -> Result<()> {
        let path = self.dir.path.join(&self.name);
        self.file
            .sync_data()
            .map_err(|e| Error::io("cannot write", &path, e))?;
        let report = Some((self.name.as_str(), self.staged.bytes, self.full));
        self.dir
            .set_checkin(Some(state.cursor_json(&self.base.text(), report)));
        self.dir.write_record(Durability::Synced)?;
        self.committed = self.staged;
        // The file this report resumed from is no longer referred to.
        let previous = state.origin.report_file.replace(Some(self.name.clone()));
        if let Some(previous) = previous.filter(|p| *p != self.name) {
            self.dir.remove_quietly(&previous);
        }
        Ok(())
    }

    /// After the last part was accepted (staged with `last`): appends the state's other members
    /// and makes the file `state.json`. `snapshot` becomes the state's snapshot in memory.
    pub fn finish(mut self, state: &mut State, snapshot: Snapshot) -> Result<()> {
        let path = self.dir.path.join(&self.name);
        if !self.staged.closed {
            return Err(Error::Transient(format!(
                "{} was finished before its last part",
                path.display()
            )));
        }
        let fields = state.fields_json();
        self.buf.push(',');
        self.buf.push_str(&fields[1..]);
        let mut pen = self.staged;
        self.flush(&mut pen)?;
        self.file
            .sync_all()
            .map_err(|e| Error::io("cannot write", &path, e))?;
        let target = self.dir.path.join(STATE_FILE);
        fs::rename(&path, &target).map_err(|e| Error::io("cannot replace", &target, e))?;
        self.finished = true;
        File::open(&self.dir.path)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io("cannot write", &self.dir.path, e))?;
        // The record's `checkin` member belongs to the old state.json now (so it is ignored);
        // the new one carries every field. The caller's next write of the record drops it.
        self.dir.set_checkin(None);
        self.dir.remove_quietly(CURSOR_FILE);
        if let Some(previous) = state.origin.report_file.borrow_mut().take() {
            if previous != self.name {
                self.dir.remove_quietly(&previous);
            }
        }
        state.last_snapshot = Some(snapshot);
        state.origin.file.set(self.dir.state_file_id()?);
        state.origin.snapshot_saved.set(true);
        Ok(())
    }
}

impl Drop for Report<'_> {
    fn drop(&mut self) {
        // A report no part of which was accepted leaves nothing to resume from.
        if !self.finished && self.committed.bytes == 0 {
            self.dir.remove_quietly(&self.name);
        }
    }
}

/// Reads one of the agent's own files: never through a symbolic link (the agent creates none),
/// only a regular file (a FIFO would block), at most `cap` bytes. Text that is not UTF-8 is
/// `InvalidData`, as a file over the cap is: the callers judge both as corrupt.
fn read_own(path: &Path, cap: u64) -> std::io::Result<String> {
    let bytes = input::read_regular(path, input::Links::Refuse, cap)?;
    String::from_utf8(bytes).map_err(|_| std::io::Error::new(ErrorKind::InvalidData, "not UTF-8"))
}

/// The names in a directory (without `.` and `..`), listed without updating its access time:
/// after a run that added or removed a file, the next listing would otherwise dirty the
/// directory's inode (a 4 KiB write on a filesystem without a journal). `O_NOATIME` is
/// allowed to the directory's owner, which [`StateDir::create`] checked.
fn list_names(path: &Path) -> std::io::Result<Vec<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::IntoRawFd;
    let open = |noatime: i32| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC | noatime)
            .open(path)
    };
    let dir = match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0)?,
        opened => opened?,
    };
    let fd = dir.into_raw_fd();
    // SAFETY: fdopendir takes ownership of a directory descriptor we own (closed below by
    // closedir, or here when it fails).
    let stream = unsafe { libc::fdopendir(fd) };
    if stream.is_null() {
        let err = std::io::Error::last_os_error();
        // SAFETY: the descriptor is still ours when fdopendir failed.
        unsafe { libc::close(fd) };
        return Err(err);
    }
    let mut names = Vec::new();
    loop {
        // SAFETY: readdir on the open stream; the entry it returns stays valid until the next
        // readdir or closedir, and its name is NUL-terminated.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            break;
        }
        // SAFETY: as above.
        let name = unsafe { std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(std::ffi::OsStr::from_bytes(name).to_os_string());
        }
    }
    // SAFETY: closes the stream (and its descriptor) opened above, once.
    unsafe { libc::closedir(stream) };
    Ok(names)
}

/// Opens a directory itself, not a link to one.
fn open_dir(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => symlinked_dir(path),
            Some(libc::ENOTDIR) => Error::Config(format!(
                "state directory {} exists but is not a directory",
                path.display()
            )),
            _ => Error::io("cannot open the state directory", path, e),
        })
}

fn not_a_lock_file(path: &Path) -> Error {
    Error::Config(format!(
        "{} is not a regular file, which the agent never creates: remove it",
        path.display()
    ))
}

/// One of the agent's files is a link, FIFO, device or directory: someone put it there, and no
/// later run gets past it, so the operator is told what it is and what to do.
fn planted(path: &Path, err: &std::io::Error) -> Error {
    match input::not_a_file(err) {
        Some("a symbolic link") => Error::Config(format!(
            "{} is a symbolic link, which the agent never creates: replace it with the file it \
             points to",
            path.display()
        )),
        kind => Error::Config(format!(
            "{} is {}, which the agent never creates: remove it, or put the file that belongs \
             there in its place",
            path.display(),
            kind.unwrap_or("not a regular file")
        )),
    }
}

fn symlinked_dir(path: &Path) -> Error {
    Error::Config(format!(
        "state directory {} is a symbolic link: pass the directory it points to with \
         --state-dir (GRAPHEON_AGENT_STATE_DIR), so the agent's writes cannot be redirected",
        path.display()
    ))
}

/// Refuses a state directory inside one that another user can change: the checks here are
/// made on the last component, and the later reads and writes go by path, so whoever can
/// rename entries in a directory above could swap the checked directory for a link to one they
/// filled (a planted `.api_key.reserved` would be installed as the key). Every directory above
/// must belong to root or to the agent's user and be writable by nobody else, unless sticky
/// (`/tmp`: others cannot rename what they do not own). Both the path as given and the one its
/// links resolve to are checked.
fn check_ancestors(path: &Path) -> Result<()> {
    let absolute = match path.is_absolute() {
        true => path.to_path_buf(),
        false => std::env::current_dir()
            .map_err(|e| Error::io("cannot resolve the state directory", path, e))?
            .join(path),
    };
    let resolved = absolute.parent().and_then(|p| fs::canonicalize(p).ok());
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let above = absolute.ancestors().skip(1);
    for dir in above.chain(resolved.iter().flat_map(|r| r.ancestors())) {
        let meta = fs::metadata(dir).map_err(|e| {
            Error::io(
                "cannot inspect the directory above the state directory",
                dir,
                e,
            )
        })?;
        let mode = meta.mode() & 0o7777;
        let why = if meta.uid() != 0 && meta.uid() != me {
            format!("belongs to user {}", meta.uid())
        } else if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            format!("other users can write (mode {mode:04o})")
        } else {
            continue;
        };
        return Err(Error::Config(format!(
            "state directory {} is inside {}, which {why}: whoever can change that directory can \
             swap the state directory for a link to files of their choosing; choose a state \
             directory whose parents only root or the agent's user can change, or make {} \
             writable by its owner only (chmod go-w)",
            path.display(),
            dir.display(),
            dir.display()
        )));
    }
    Ok(())
}

/// Refuses what another user owns: they could replace its contents at will.
fn check_owned(path: &Path, meta: &fs::Metadata, what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(Error::Config(format!(
            "{what} {} belongs to user {} but the agent runs as user {me}: run the agent as its \
             owner, or chown {me} {} after checking its contents",
            path.display(),
            meta.uid(),
            path.display()
        )));
    }
    Ok(())
}

/// Checks the shape of an API key: printable ASCII without spaces, of a plausible length.
pub fn check_api_key(key: &str) -> std::result::Result<&str, &'static str> {
    if key.len() < 16 || key.len() > 512 {
        return Err("an API key has 16 to 512 characters");
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("an API key has only printable ASCII characters and no spaces");
    }
    Ok(key)
}

fn new_uuid() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)
        .map_err(|e| Error::Transient(format!("no randomness for a new agent id: {e}")))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!(
                "ga-state-{tag}-{}-{:?}",
                std::process::id(),
                Instant::now()
            ));
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn directory_and_files_are_private() {
        let t = TempDir::new("modes");
        let dir = StateDir::create(&t.0.join("sub")).unwrap();
        dir.ensure_uuid().unwrap();
        dir.write_api_key("gpak_0123456789abcdef").unwrap();
        dir.save_state(&State::default()).unwrap();
        assert_eq!(mode(dir.path()), 0o700);
        for f in [UUID_FILE, KEY_FILE, STATE_FILE] {
            assert_eq!(mode(&dir.path().join(f)), 0o600, "{f}");
        }
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 3, "no temporary files left: {leftovers:?}");
    }

    #[test]
    fn wide_directory_is_tightened() {
        let t = TempDir::new("wide");
        fs::create_dir_all(&t.0).unwrap();
        fs::set_permissions(&t.0, fs::Permissions::from_mode(0o755)).unwrap();
        StateDir::create(&t.0).unwrap();
        assert_eq!(mode(&t.0), 0o700);
    }

    #[test]
    fn a_symlinked_state_directory_is_refused_and_its_target_untouched() {
        let t = TempDir::new("link");
        let target = t.0.join("target");
        fs::create_dir_all(&target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        let link = t.0.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = StateDir::create(&link).unwrap_err();
        assert_eq!(
            (err.exit_code(), err.to_string()),
            (
                2,
                format!(
                    "state directory {} is a symbolic link: pass the directory it points to with \
                     --state-dir (GRAPHEON_AGENT_STATE_DIR), so the agent's writes cannot be \
                     redirected",
                    link.display()
                )
            )
        );
        assert_eq!(mode(&target), 0o755, "the link's target is not chmodded");
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let t = TempDir::new("shared");
        fs::create_dir_all(&t.0).unwrap();
        fs::set_permissions(&t.0, fs::Permissions::from_mode(0o1777)).unwrap();
        let err = StateDir::create(&t.0).unwrap_err();
        assert_eq!(
            (err.exit_code(), err.to_string()),
            (
                2,
                format!(
                    "state directory {} is writable by other users (mode 1777): they could have \
                     planted files in it; check its contents, then run chmod 700 {}",
                    t.0.display(),
                    t.0.display()
                )
            )
        );
        assert_eq!(mode(&t.0), 0o777);
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        require_root();
        let t = TempDir::new("foreign");
        fs::create_dir_all(&t.0).unwrap();
        fs::set_permissions(&t.0, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&t.0, Some(65534), Some(65534)).unwrap();
        let err = StateDir::create(&t.0).unwrap_err();
        assert_eq!(
            (err.exit_code(), err.to_string()),
            (
                2,
                format!(
                    "state directory {} belongs to user 65534 but the agent runs as user 0: run \
                     the agent as its owner, or chown 0 {} after checking its contents",
                    t.0.display(),
                    t.0.display()
                )
            )
        );
    }

    #[test]
    fn a_state_directory_inside_one_others_can_change_is_refused() {
        let t = TempDir::new("parents");
        let open = t.0.join("open");
        fs::create_dir_all(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let state = open.join("deeper").join("state");
        let err = StateDir::create(&state).unwrap_err();
        assert_eq!(
            (err.exit_code(), err.to_string()),
            (
                2,
                format!(
                    "state directory {} is inside {}, which other users can write (mode 0777): \
                     whoever can change that directory can swap the state directory for a link \
                     to files of their choosing; choose a state directory whose parents only \
                     root or the agent's user can change, or make {} writable by its owner only \
                     (chmod go-w)",
                    state.display(),
                    open.display(),
                    open.display()
                )
            )
        );
        // Reached through a link, the directory the link resolves to is checked too.
        let link = t.0.join("link");
        std::os::unix::fs::symlink(&open, &link).unwrap();
        assert!(StateDir::create(&link.join("state")).is_err());
        // Sticky, as /tmp is: others cannot rename what is not theirs.
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(StateDir::create(&state).is_ok());
        fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(StateDir::create(&state).is_ok());
    }

    #[test]
    fn a_planted_lock_link_is_refused_and_creates_nothing() {
        let t = TempDir::new("locklink");
        let dir = StateDir::create(&t.0.join("state")).unwrap();
        let victim = t.0.join("victim");
        std::os::unix::fs::symlink(&victim, dir.path().join(LOCK_FILE)).unwrap();
        let err = dir.lock(Duration::ZERO).unwrap_err();
        assert_eq!(
            (err.exit_code(), err.to_string()),
            (
                2,
                format!(
                    "{} is a symbolic link, which the agent never creates: remove it",
                    dir.path().join(LOCK_FILE).display()
                )
            )
        );
        assert!(!victim.exists());
    }

    #[test]
    fn state_files_are_never_read_through_a_link() {
        let t = TempDir::new("filelink");
        let dir = StateDir::create(&t.0.join("state")).unwrap();
        let elsewhere = t.0.join("elsewhere");
        fs::write(&elsewhere, "gpak_0123456789abcdef\n").unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join(KEY_FILE)).unwrap();
        let err = dir.read_api_key().unwrap_err();
        assert_eq!(
            (err.exit_code(), err.to_string()),
            (
                2,
                format!(
                    "{} is a symbolic link, which the agent never creates: replace it with the \
                     file it points to",
                    dir.path().join(KEY_FILE).display()
                )
            )
        );
        let fifo = dir.path().join(UUID_FILE);
        mkfifo(&fifo);
        let err = dir.read_uuid().unwrap_err();
        assert_eq!(
            (err.exit_code(), err.to_string()),
            (
                2,
                format!(
                    "{} is a FIFO, which the agent never creates: remove it, or put the file \
                     that belongs there in its place",
                    fifo.display()
                )
            )
        );
    }

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn a_lock_file_that_is_a_fifo_or_a_directory_is_a_configuration_error() {
        let t = TempDir::new("lockkind");
        let dir = StateDir::create(&t.0).unwrap();
        let lock = dir.path().join(LOCK_FILE);
        let mut seen = Vec::new();
        for make in [mkfifo as fn(&Path), |p: &Path| fs::create_dir(p).unwrap()] {
            make(&lock);
            let err = dir.lock(Duration::ZERO).unwrap_err();
            seen.push((err.exit_code(), err.to_string()));
            let _ = fs::remove_file(&lock).or_else(|_| fs::remove_dir(&lock));
        }
        let expected = (
            2,
            format!(
                "{} is not a regular file, which the agent never creates: remove it",
                lock.display()
            ),
        );
        assert_eq!(seen, [expected.clone(), expected]);
    }

    fn names(dir: &StateDir) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn temporary_files_of_a_killed_run_are_removed_under_the_lock() {
        let t = TempDir::new("stale");
        let dir = StateDir::create(&t.0).unwrap();
        dir.save_state(&State::default()).unwrap();
        for name in [
            ".state.json.tmp-4242",
            ".api_key.tmp-17",
            ".agent_uuid.tmp-9",
        ] {
            fs::write(dir.path().join(name), "left by a killed run").unwrap();
        }
        // Not ours: kept.
        fs::write(dir.path().join("notes.tmp-1"), "x").unwrap();
        let _lock = dir.lock(Duration::ZERO).unwrap().unwrap();
        assert_eq!(names(&dir).len(), 6, "taking the lock removes nothing");
        dir.tidy().unwrap();
        assert_eq!(names(&dir), ["agent.lock", "notes.tmp-1", "state.json"]);
    }

    #[test]
    fn a_reserved_key_slot_is_given_back_when_no_key_arrives() {
        let t = TempDir::new("slot");
        let dir = StateDir::create(&t.0).unwrap();
        let slot = dir.reserve_api_key().unwrap();
        assert_eq!(
            fs::metadata(dir.path().join(KEY_RESERVATION))
                .unwrap()
                .len(),
            KEY_ROOM
        );
        drop(slot);
        assert_eq!(names(&dir), Vec::<String>::new());
        dir.reserve_api_key()
            .unwrap()
            .store("gpak_0123456789abcdef")
            .unwrap();
        assert_eq!(names(&dir), [KEY_FILE]);
        assert_eq!(
            dir.read_api_key().unwrap().as_deref(),
            Some("gpak_0123456789abcdef")
        );
        assert_eq!(mode(&dir.path().join(KEY_FILE)), 0o600);
    }

    #[test]
    fn a_key_left_in_its_reserved_slot_is_installed_by_the_next_run() {
        let t = TempDir::new("leftkey");
        let dir = StateDir::create(&t.0).unwrap();
        // As a run killed between writing the key and renaming it leaves it: key, then padding.
        let mut text = "gpak_0123456789abcdef\n".to_string();
        text.push_str(&"\n".repeat(100));
        fs::write(dir.path().join(KEY_RESERVATION), &text).unwrap();
        assert!(dir.key_waiting(), "--status sees it");
        dir.tidy().unwrap();
        assert_eq!(names(&dir), [KEY_FILE]);
        assert_eq!(
            dir.read_api_key().unwrap().as_deref(),
            Some("gpak_0123456789abcdef")
        );
        assert!(!dir.key_waiting());
    }

    #[test]
    fn a_reservation_is_deleted_only_when_it_holds_nothing_but_padding() {
        let t = TempDir::new("reserved");
        let dir = StateDir::create(&t.0).unwrap();
        let reservation = dir.path().join(KEY_RESERVATION);
        // Padding only, newlines or the zeros a crash can leave: no key ever arrived.
        fs::write(&reservation, b"\n\0\n\0\0\n").unwrap();
        dir.tidy().unwrap();
        assert_eq!(names(&dir), Vec::<String>::new());
        // A key followed by zeros: installed, cut to the key.
        let mut bytes = b"gpak_0123456789abcdef\n".to_vec();
        bytes.extend([0u8; 100]);
        fs::write(&reservation, &bytes).unwrap();
        dir.tidy().unwrap();
        assert_eq!(names(&dir), [KEY_FILE]);
        assert_eq!(
            fs::read(dir.path().join(KEY_FILE)).unwrap(),
            b"gpak_0123456789abcdef\n"
        );
        // Anything else is moved aside, never deleted.
        fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        fs::write(&reservation, b"short\n\n").unwrap();
        dir.tidy().unwrap();
        let moved = names(&dir);
        assert_eq!(moved.len(), 1);
        assert!(moved[0].starts_with("api_key.unrecognised-"), "{moved:?}");
        assert_eq!(fs::read(dir.path().join(&moved[0])).unwrap(), b"short\n\n");
        // A FIFO in its place is reported, not read.
        mkfifo(&reservation);
        let err = dir.tidy().unwrap_err();
        assert_eq!(
            (err.exit_code(), err.to_string()),
            (
                2,
                format!(
                    "{} is a FIFO, which the agent never creates: remove it, or put the file \
                     that belongs there in its place",
                    reservation.display()
                )
            )
        );
    }

    #[test]
    fn a_key_that_cannot_be_renamed_stays_in_its_reservation() {
        let t = TempDir::new("norename");
        let dir = StateDir::create(&t.0).unwrap();
        let slot = dir.reserve_api_key().unwrap();
        // A directory where api_key goes: the rename fails.
        fs::create_dir(dir.path().join(KEY_FILE)).unwrap();
        let err = slot.store("gpak_0123456789abcdef").unwrap_err();
        assert_eq!(
            (err.exit_code(), err.to_string()),
            (
                1,
                format!(
                    "the API key was received and written to {}, but it cannot be put in place \
                     as {} (Is a directory (os error 21)); it is kept there and the next run \
                     installs it",
                    dir.path().join(KEY_RESERVATION).display(),
                    dir.path().join(KEY_FILE).display()
                )
            )
        );
        assert_eq!(
            fs::read(dir.path().join(KEY_RESERVATION)).unwrap(),
            b"gpak_0123456789abcdef\n"
        );
    }

    /// A tmpfs of 64 KiB on a new directory, unmounted on drop (needs root, as CI runs).
    struct SmallDisk(TempDir);
    impl SmallDisk {
        fn new(tag: &str) -> SmallDisk {
            require_root();
            let t = TempDir::new(tag);
            fs::create_dir_all(&t.0).unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"])
                .arg(&t.0)
                .status()
                .expect("run mount")
                .success();
            assert!(ok, "mount -t tmpfs failed");
            SmallDisk(t)
        }
        /// Takes every free block.
        fn fill(&self) {
            let mut f = File::create(self.0 .0.join("filler")).unwrap();
            while f.write_all(&[7u8; 4096]).is_ok() {}
            let _ = f.write_all(&[7u8; 1]);
        }
    }
    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(&self.0 .0)
                .status();
        }
    }

    fn require_root() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test needs root (CI runs as root)"
        );
    }

    #[test]
    fn a_reservation_that_cannot_take_the_key_gives_its_room_to_the_plain_write() {
        let disk = SmallDisk::new("cow");
        let dir = StateDir::create(&disk.0 .0.join("state")).unwrap();
        let mut slot = dir.reserve_api_key().unwrap();
        disk.fill();
        // As on a copy-on-write filesystem, overwriting the reservation fails; here because
        // the descriptor is read-only.
        slot.file = Some(File::open(dir.path().join(KEY_RESERVATION)).unwrap());
        slot.store("gpak_0123456789abcdef").unwrap();
        assert_eq!(names(&dir), [KEY_FILE]);
        assert_eq!(
            dir.read_api_key().unwrap().as_deref(),
            Some("gpak_0123456789abcdef")
        );
    }

    #[test]
    fn uuid_is_a_random_v4_and_stable() {
        let t = TempDir::new("uuid");
        let dir = StateDir::create(&t.0).unwrap();
        let a = dir.ensure_uuid().unwrap();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"));
        assert_eq!(dir.ensure_uuid().unwrap(), a);
        assert_eq!(
            fs::read_to_string(dir.path().join(UUID_FILE)).unwrap(),
            format!("{a}\n")
        );
    }

    #[test]
    fn earlier_agent_directory_is_read_as_is() {
        let dir = StateDir::existing(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/state/python-agent"
        )));
        assert_eq!(
            dir.read_uuid().unwrap().as_deref(),
            Some("804c722f-7186-47c7-89fd-03e36f90dee4")
        );
        assert_eq!(
            dir.read_api_key().unwrap().as_deref(),
            Some("gpak_EXAMPLEonlyEXAMPLEonlyEXAMPLEonly000000")
        );
        let s = dir.load_state(false).unwrap();
        assert_eq!(s.sequence_number, 2);
        assert_eq!(s.agent_id, Some(1));
        assert_eq!(s.enrollment_state.as_deref(), Some("active"));
        assert_eq!(s.policy().checkin_interval_seconds, 60);
        assert_eq!(
            s.last_successful_checkin_at
                .map(timefmt::format_utc)
                .as_deref(),
            Some("2026-11-30T01:57:30Z")
        );
        assert_eq!(s.last_snapshot.as_ref().map(Snapshot::len), Some(10));
        assert!(s
            .last_checkin_summary
            .unwrap()
            .contains("\"connections_created\":2"));
    }

    #[test]
    fn state_round_trips() {
        let t = TempDir::new("rt");
        let dir = StateDir::create(&t.0).unwrap();
        let dir_fixture = StateDir::existing(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/state/python-agent"
        )));
        let mut s = dir_fixture.load_state(false).unwrap();
        s.last_full_snapshot_at = Some(1_795_744_647);
        s.full_snapshot_in_progress = true;
        s.report_incomplete = true;
        s.last_jitter_seconds = Some(12);
        dir.save_state(&s).unwrap();
        assert_eq!(dir.load_state(false).unwrap(), s);
    }

    #[test]
    fn corrupt_state_is_moved_aside_and_identity_kept() {
        let t = TempDir::new("corrupt");
        let dir = StateDir::create(&t.0).unwrap();
        let uuid = dir.ensure_uuid().unwrap();
        dir.write_api_key("gpak_0123456789abcdef").unwrap();
        for junk in [
            "{\"sequence_number\": 4, \"last_snap",
            "",
            "[1,2]",
            "\u{0}\u{1}",
        ] {
            fs::write(dir.path().join(STATE_FILE), junk).unwrap();
            assert_eq!(dir.load_state(true).unwrap(), State::default());
            assert!(!dir.path().join(STATE_FILE).exists());
        }
        let aside = fs::read_dir(dir.path()).unwrap().filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        });
        assert!(aside.count() >= 1);
        assert_eq!(dir.read_uuid().unwrap(), Some(uuid));
        assert_eq!(
            dir.read_api_key().unwrap().as_deref(),
            Some("gpak_0123456789abcdef")
        );
    }

    #[test]
    fn corrupt_uuid_is_a_configuration_error_not_a_new_identity() {
        let t = TempDir::new("baduuid");
        let dir = StateDir::create(&t.0).unwrap();
        fs::write(dir.path().join(UUID_FILE), "\n").unwrap();
        assert!(matches!(dir.ensure_uuid(), Err(Error::Config(_))));
    }

    #[test]
    fn binary_key_and_uuid_files_are_judged_not_retried() {
        let t = TempDir::new("binary");
        let dir = StateDir::create(&t.0).unwrap();
        fs::write(dir.path().join(KEY_FILE), [0xff, 0xfe, 0x00, 0x80]).unwrap();
        assert_eq!(
            dir.read_api_key().unwrap(),
            None,
            "an unusable key is ignored with a warning"
        );
        fs::write(dir.path().join(UUID_FILE), [0xff, 0xfe]).unwrap();
        assert!(
            matches!(dir.read_uuid(), Err(Error::Config(_))),
            "exit 2, not a transient failure"
        );
    }

    #[test]
    fn lock_is_exclusive_between_holders() {
        let t = TempDir::new("lock");
        let dir = StateDir::create(&t.0).unwrap();
        let held = dir.lock(Duration::ZERO).unwrap();
        assert!(held.is_some());
        // A second open file description conflicts with the first, as another process would.
        assert!(dir.lock(Duration::from_millis(250)).unwrap().is_none());
        drop(held);
        assert!(dir.lock(Duration::ZERO).unwrap().is_some());
    }

    #[test]
    fn api_key_shape_is_checked() {
        assert!(check_api_key("gpak_EXAMPLEonlyEXAMPLEonly").is_ok());
        assert!(check_api_key("short").is_err());
        assert!(check_api_key("gpak_has space inside it").is_err());
        assert!(check_api_key(&"x".repeat(513)).is_err());
    }

    use crate::model::{ConnState, Connection, Protocol};
    use crate::report::{self, tests::header};

    fn conn(port: u16) -> Connection {
        Connection {
            protocol: Protocol::Tcp,
            local_ip: "127.0.0.1".parse().unwrap(),
            local_port: port,
            remote_ip: Some("127.0.0.1".parse().unwrap()),
            remote_port: Some(8000),
            state: Some(ConnState::Established),
            pid: Some(4242),
            process_name: Some("holder".into()),
        }
    }

    fn snap(ports: impl IntoIterator<Item = u16>) -> Snapshot {
        let mut s = Snapshot {
            connections: ports.into_iter().map(conn).collect(),
            ..Snapshot::default()
        };
        s.normalize();
        s
    }

    /// A directory whose state.json holds `base` at sequence 7.
    fn saved(tag: &str, base: Snapshot) -> (TempDir, StateDir) {
        let t = TempDir::new(tag);
        let dir = StateDir::create(&t.0).unwrap();
        let mut s = State {
            sequence_number: 7,
            ..State::default()
        };
        s.set_snapshot(Some(base));
        dir.save_state(&s).unwrap();
        (t, dir)
    }

    /// Sends `parts` of the delta from `base` to `current` the way a check-in does, accepting
    /// the first `accepted` of them; `finish` when all were accepted.
    fn send(
        dir: &StateDir,
        current: Snapshot,
        budget: usize,
        accepted: usize,
    ) -> (usize, Snapshot) {
        // As a run does: the snapshot is read after collection.
        let mut state = dir.load_state_deferred(true).unwrap();
        assert_eq!(state.last_snapshot, None);
        dir.load_snapshot(&mut state).unwrap();
        let full = state.last_snapshot.is_none();
        let base = state.last_snapshot.clone().unwrap_or_default();
        let (kept, pending) = report::partition(&base, current);
        let parts = report::split(&header(), &pending, &[0; 4], budget);
        let mut progress = dir.begin_report(&state, full).unwrap();
        state.set_snapshot(None);
        let mut body = String::new();
        let mut stage = |progress: &mut Report<'_>, part: &Part, last: bool| {
            let at = report::render_into(
                &mut body,
                &header(),
                1,
                full,
                (1, 1),
                &[0; 4],
                &pending,
                part,
            );
            progress
                .stage(&kept, part, at.map(|r| &body[r]), last)
                .unwrap();
        };
        for (i, part) in parts.iter().enumerate().take(accepted) {
            let last = i + 1 == parts.len();
            stage(&mut progress, part, last);
            state.sequence_number += 1;
            state.report_incomplete = !last;
            if last {
                progress
                    .finish(&mut state, report::union(kept, pending))
                    .unwrap();
                return (parts.len(), state.last_snapshot.unwrap());
            }
            progress.commit(&state).unwrap();
        }
        // The part after the accepted ones is staged, then the process dies before an answer.
        if let Some(part) = parts.get(accepted) {
            stage(&mut progress, part, accepted + 1 == parts.len());
        }
        std::mem::forget(progress);
        let mut expect = kept;
        for part in &parts[..accepted] {
            expect
                .connections
                .extend_from_slice(&pending.connections[part.ranges[2].clone()]);
        }
        expect.normalize();
        (parts.len(), expect)
    }

    /// The two slots of `checkin.rec`.
    fn pages(dir: &StateDir) -> [Vec<u8>; 2] {
        let bytes = fs::read(dir.path().join(RECORD_FILE)).unwrap();
        assert_eq!(bytes.len() as u64, slots::FILE_LEN);
        [bytes[..slots::SLOT].to_vec(), bytes[slots::SLOT..].to_vec()]
    }

    #[test]
    fn a_delta_with_no_change_writes_only_the_small_fields() {
        let (_t, dir) = saved("nochange", snap(1..=2000));
        let before = fs::read(dir.path().join(STATE_FILE)).unwrap();
        let mut s = dir.load_state(true).unwrap();
        s.sequence_number = 8;
        s.last_successful_checkin_at = Some(1_795_744_700);
        dir.save_state(&s).unwrap();
        assert_eq!(fs::read(dir.path().join(STATE_FILE)).unwrap(), before);
        assert_eq!(dir.load_state(true).unwrap(), s);
        assert_eq!(names(&dir), [RECORD_FILE, STATE_FILE]);

        // The next run: the mark before sending (cached), then the outcome (synced), go into
        // the same page; the page of the record the run started from is left as it was.
        let start = pages(&dir);
        let s = dir.load_state(true).unwrap();
        dir.save_pacing(
            r#"{"in_flight":{"at":"2026-11-30T02:00:00Z","bytes":900}}"#.into(),
            Durability::Cached,
        )
        .unwrap();
        let marked = pages(&dir);
        // A process killed now leaves the mark in the page cache, where the next run reads it.
        assert_eq!(
            StateDir::existing(dir.path())
                .pacing_record()
                .unwrap()
                .as_deref(),
            Some(r#"{"in_flight":{"at":"2026-11-30T02:00:00Z","bytes":900}}"#)
        );
        dir.save_pacing(r#"{"in_flight":null}"#.into(), Durability::Deferred)
            .unwrap();
        assert_eq!(pages(&dir), marked, "deferred: nothing written");
        let mut next = s.clone();
        next.sequence_number = 9;
        dir.save_state(&next).unwrap();
        let end = pages(&dir);
        let changed: Vec<usize> = (0..2).filter(|&i| end[i] != start[i]).collect();
        assert_eq!(changed.len(), 1, "one page written");
        assert_eq!(marked[1 - changed[0]], start[1 - changed[0]]);
        // The final save of the pace, unchanged, writes nothing.
        dir.save_pacing(r#"{"in_flight":null}"#.into(), Durability::Synced)
            .unwrap();
        assert_eq!(pages(&dir), end);
        let read = StateDir::existing(dir.path());
        assert_eq!(read.load_state(false).unwrap(), next);
        assert_eq!(
            read.pacing_record().unwrap().as_deref(),
            Some(r#"{"in_flight":null}"#)
        );
    }

    #[test]
    fn loading_leaves_the_access_time_of_the_directory_and_its_files() {
        let (_t, dir) = saved("atime", snap(1..=10));
        let s = dir.load_state(true).unwrap();
        dir.save_state(&s).unwrap();
        // Under relatime an access time older than the modification time is updated by the
        // next read: a write of the inode, which the agent's reads must not cause.
        let atime = |p: &Path| fs::metadata(p).unwrap().accessed().unwrap();
        let paths = [
            dir.path().to_path_buf(),
            dir.path().join(STATE_FILE),
            dir.path().join(RECORD_FILE),
        ];
        for p in &paths {
            let old = fs::metadata(p).unwrap().modified().unwrap() - Duration::from_secs(60);
            let times = fs::FileTimes::new().set_accessed(old);
            File::open(p).unwrap().set_times(times).unwrap();
        }
        let before: Vec<_> = paths.iter().map(|p| atime(p)).collect();
        let s = dir.load_state(true).unwrap();
        dir.tidy().unwrap();
        assert_eq!(s.last_snapshot, Some(snap(1..=10)));
        let after: Vec<_> = paths.iter().map(|p| atime(p)).collect();
        assert_eq!(after, before);
    }

    /// The fields of 0.2.0's `checkin.json` for `state_file`, as 0.2.0 wrote them.
    fn checkin_0_2_0(state_file: &str) -> String {
        format!(
            concat!(
                r#"{{"policy":{{"checkin_interval_seconds":900,"jitter_seconds":30,"#,
                r#""command_timeout_seconds":15,"enabled_commands":{{"ip_addr":true,"#,
                r#""ip_neigh":true,"ip_route":true,"ss_tunap":true}},"max_report_bytes":262144,"#,
                r#""is_active":true}},"agent_id":5,"enrollment_state":"active","#,
                r#""sequence_number":42,"last_successful_checkin_at":"2026-11-30T02:00:00Z","#,
                r#""last_checkin_summary":{{"connections_created":0}},"last_jitter_seconds":3,"#,
                r#""last_full_snapshot_at":"2026-11-29T02:00:00Z","full_snapshot_in_progress":false,"#,
                r#""report_incomplete":false,"state_file":"{}"}}"#
            ),
            state_file
        )
    }

    /// 0.2.0's `pacing.json` of a run killed while a part awaited its answer.
    const PACING_0_2_0: &str = concat!(
        r#"{"part_bytes":98304,"micros_per_kib":1234,"gzip_permille":51,"#,
        r#""last_part":{"at":"2026-11-30T02:00:00Z","bytes":65536,"records":385,"millis":1250},"#,
        r#""failures":0,"backoff_until":null,"in_flight":{"at":"2026-11-30T02:00:01Z","bytes":98304},"#,
        r#""unanswered":null,"hold_until":null}"#
    );

    fn state_file_text(dir: &StateDir) -> String {
        FileId::of(&fs::symlink_metadata(dir.path().join(STATE_FILE)).unwrap()).text()
    }

    #[test]
    fn the_files_of_0_2_0_are_folded_into_the_record_once() {
        let (_t, dir) = saved("upgrade", snap(1..=10));
        fs::write(
            dir.path().join(CURSOR_FILE),
            checkin_0_2_0(&state_file_text(&dir)),
        )
        .unwrap();
        fs::write(dir.path().join(PACING_FILE), PACING_0_2_0).unwrap();
        let s = dir.load_state(true).unwrap();
        assert_eq!(
            (s.sequence_number, s.agent_id, s.last_jitter_seconds),
            (42, Some(5), Some(3))
        );
        assert_eq!(
            s.last_checkin_summary.as_deref(),
            Some(r#"{"connections_created":0}"#)
        );
        assert_eq!(dir.pacing_record().unwrap().as_deref(), Some(PACING_0_2_0));
        // The first durable write holds both; 0.2.0's files are removed after it.
        dir.save_state(&s).unwrap();
        assert_eq!(names(&dir), [RECORD_FILE, STATE_FILE]);
        let again = StateDir::existing(dir.path());
        assert_eq!(again.load_state(false).unwrap(), s);
        assert_eq!(
            again.pacing_record().unwrap().as_deref(),
            Some(PACING_0_2_0)
        );
    }

    #[test]
    fn a_file_0_2_0_wrote_after_the_record_wins_and_an_older_one_is_only_removed() {
        let (_t, dir) = saved("rollback", snap(1..=10));
        let mut s = dir.load_state(true).unwrap();
        s.sequence_number = 40;
        dir.save_pacing(r#"{"failures":1}"#.into(), Durability::Deferred)
            .unwrap();
        dir.save_state(&s).unwrap();
        // Rolled back: 0.2.0 checked in twice more, writing its own files.
        std::thread::sleep(Duration::from_millis(20));
        fs::write(
            dir.path().join(CURSOR_FILE),
            checkin_0_2_0(&state_file_text(&dir)),
        )
        .unwrap();
        fs::write(dir.path().join(PACING_FILE), PACING_0_2_0).unwrap();
        let s = dir.load_state(true).unwrap();
        assert_eq!(s.sequence_number, 42);
        assert_eq!(dir.pacing_record().unwrap().as_deref(), Some(PACING_0_2_0));
        dir.save_state(&s).unwrap();
        assert_eq!(names(&dir), [RECORD_FILE, STATE_FILE]);
        // 0.2.0 ran again; the record's modification time, later than its files', is no proof
        // they were folded in (it reaches the disk apart from the slot's data, and clocks step).
        fs::write(dir.path().join(PACING_FILE), r#"{"failures":7}"#).unwrap();
        let old = fs::metadata(dir.path().join(RECORD_FILE))
            .unwrap()
            .modified()
            .unwrap()
            - Duration::from_secs(60);
        File::options()
            .write(true)
            .open(dir.path().join(PACING_FILE))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let s = dir.load_state(true).unwrap();
        assert_eq!(
            dir.pacing_record().unwrap().as_deref(),
            Some(r#"{"failures":7}"#)
        );
        dir.save_state(&s).unwrap();
        assert_eq!(names(&dir), [RECORD_FILE, STATE_FILE]);
    }

    /// The newest payload of `dir`'s record.
    fn newest_payload(dir: &StateDir) -> String {
        let file = File::open(dir.path().join(RECORD_FILE)).unwrap();
        String::from_utf8(Slots::read(&file).unwrap().newest.unwrap().2).unwrap()
    }

    #[test]
    fn the_longest_fields_fit_one_slot_with_the_report_progress_and_the_longest_pace() {
        let (_t, dir) = saved("longest", snap(1..=3));
        let summary = format!(r#"{{"note":"{}"}}"#, "\\u0001".repeat(168));
        let state = State {
            // The largest values a policy keeps.
            policy: Some(Policy {
                checkin_interval_seconds: 86_400,
                jitter_seconds: 3_600,
                command_timeout_seconds: 300,
                max_report_bytes: 10 << 20,
                ..Policy::default()
            }),
            agent_id: Some(i64::MIN),
            enrollment_state: Some("\u{1}".repeat(MAX_ENROLLMENT_STATE)),
            sequence_number: u64::MAX,
            last_successful_checkin_at: Some(253_402_300_799),
            last_checkin_summary: Some(summary),
            last_jitter_seconds: Some(u32::MAX),
            last_full_snapshot_at: Some(253_402_300_799),
            full_snapshot_in_progress: true,
            report_incomplete: true,
            ..State::default()
        };
        let id = format!("{0}:{0}:{0}:-9223372036854775808.999999999", u64::MAX);
        let report = format!("{REPORT_PREFIX}{}", "f".repeat(255 - REPORT_PREFIX.len()));
        dir.record().legacy = vec![(CURSOR_FILE, id.clone()), (PACING_FILE, id.clone())];
        dir.set_checkin(Some(
            state.cursor_json(&id, Some((&report, u64::MAX, true))),
        ));
        let pace = format!(r#"{{"p":"{}"}}"#, "x".repeat(MAX_PACING_BYTES - 8));
        assert_eq!(pace.len(), MAX_PACING_BYTES);
        dir.save_pacing(pace.clone(), Durability::Synced).unwrap();
        let members = parse_record(newest_payload(&dir).as_bytes()).unwrap();
        assert_eq!(members.pacing, Some(pace));
        let (fields, cursor) =
            read_state(&mut Reader::new(members.checkin.unwrap().as_bytes()), false).unwrap();
        // Everything but the summary, which is left out to make room.
        assert_eq!(
            fields,
            State {
                last_checkin_summary: None,
                ..state
            }
        );
        assert_eq!(
            (cursor.state_file, cursor.report_file, cursor.report_length),
            (Some(id), Some(report), u64::MAX)
        );
    }

    #[test]
    fn a_pace_too_long_for_the_slot_is_left_out_and_the_report_progress_kept() {
        let (_t, dir) = saved("longpace", snap(1..=3));
        let state = dir.load_state(true).unwrap();
        let base = state_file_text(&dir);
        let report = format!("{REPORT_PREFIX}00ff");
        dir.set_checkin(Some(state.cursor_json(&base, Some((&report, 4242, false)))));
        let pace = format!(r#"{{"p":"{}"}}"#, "x".repeat(slots::ROOM));
        dir.save_pacing(pace, Durability::Synced).unwrap();
        let members = parse_record(newest_payload(&dir).as_bytes()).unwrap();
        assert_eq!(members.pacing, None);
        let (_, cursor) =
            read_state(&mut Reader::new(members.checkin.unwrap().as_bytes()), false).unwrap();
        assert_eq!(
            (cursor.state_file, cursor.report_file, cursor.report_length),
            (Some(base), Some(report), 4242)
        );
    }

    #[test]
    fn damaged_0_2_0_files_never_replace_the_records_members() {
        let (_t, dir) = saved("damaged-legacy", snap(1..=10));
        let mut s = dir.load_state(true).unwrap();
        s.sequence_number = 40;
        dir.save_pacing(r#"{"failures":1}"#.into(), Durability::Deferred)
            .unwrap();
        dir.save_state(&s).unwrap();
        // Written later than the record, as 0.2.0 after a rollback would.
        std::thread::sleep(Duration::from_millis(20));
        fs::write(dir.path().join(CURSOR_FILE), "{\"sequence_number\":41,").unwrap();
        fs::write(dir.path().join(PACING_FILE), "not json").unwrap();
        let reread = StateDir::existing(dir.path());
        let loaded = reread.load_state(true).unwrap();
        assert_eq!(loaded, s);
        assert_eq!(
            reread.pacing_record().unwrap().as_deref(),
            Some(r#"{"failures":1}"#)
        );
        reread.save_state(&loaded).unwrap();
        assert_eq!(names(&dir), [RECORD_FILE, STATE_FILE]);
        // Without a record to keep, a damaged pacing.json is named to the operator.
        fs::remove_file(dir.path().join(RECORD_FILE)).unwrap();
        fs::write(dir.path().join(PACING_FILE), "not json").unwrap();
        let fresh = StateDir::existing(dir.path());
        assert_eq!(fresh.pacing_record(), Err(dir.path().join(PACING_FILE)));
    }

    #[test]
    fn a_0_2_0_file_left_by_a_crash_after_it_was_folded_in_is_known_and_only_removed() {
        let (_t, dir) = saved("leftover", snap(1..=10));
        fs::write(dir.path().join(PACING_FILE), PACING_0_2_0).unwrap();
        let keep = std::env::temp_dir().join(format!("ga-state-keep-{}", std::process::id()));
        let _ = fs::remove_file(&keep);
        fs::hard_link(dir.path().join(PACING_FILE), &keep).unwrap();
        let id = FileId::of(&fs::symlink_metadata(&keep).unwrap()).text();
        let s = dir.load_state(true).unwrap();
        dir.save_state(&s).unwrap();
        // The folding write was synced and names the file it folded in.
        let newest = |dir: &StateDir| {
            let file = File::open(dir.path().join(RECORD_FILE)).unwrap();
            let slots = Slots::read(&file).unwrap();
            String::from_utf8(slots.newest.unwrap().2).unwrap()
        };
        let folded = newest(&dir);
        assert!(
            folded.ends_with(&format!(r#","folded":{{"pacing.json":"{id}"}}}}"#)),
            "{folded}"
        );
        assert_eq!(names(&dir), [RECORD_FILE, STATE_FILE]);
        // A host crash before the directory was synced: the file is back, the same file. The
        // pace recorded since (here put in place by hand) is kept.
        fs::hard_link(&keep, dir.path().join(PACING_FILE)).unwrap();
        fs::remove_file(&keep).unwrap();
        let since = folded.replace(PACING_0_2_0, r#"{"failures":2}"#);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join(RECORD_FILE))
            .unwrap();
        let slots = Slots::read(&file).unwrap();
        SlotFile::open(file, &slots)
            .unwrap()
            .write(since.as_bytes(), true)
            .unwrap();
        let reread = StateDir::existing(dir.path());
        let s = reread.load_state(true).unwrap();
        assert_eq!(
            reread.pacing_record().unwrap().as_deref(),
            Some(r#"{"failures":2}"#)
        );
        reread.save_state(&s).unwrap();
        assert_eq!(names(&dir), [RECORD_FILE, STATE_FILE]);
        // Once the removal is durable the next write names nothing.
        reread
            .save_pacing(r#"{"failures":3}"#.into(), Durability::Synced)
            .unwrap();
        assert!(!newest(&reread).contains("folded"), "{}", newest(&reread));
    }

    #[test]
    fn a_torn_slot_leaves_the_other_record_and_two_mean_the_fields_of_state_json() {
        let (_t, dir) = saved("torn", snap(1..=10));
        let mut s = dir.load_state(true).unwrap();
        s.sequence_number = 20;
        dir.save_state(&s).unwrap();
        let mut s = dir.load_state(true).unwrap();
        s.sequence_number = 21;
        dir.save_state(&s).unwrap();
        let generation = |page: &[u8]| u64::from_le_bytes(page[8..16].try_into().unwrap());
        let [a, b] = pages(&dir);
        let torn = if generation(&a) > generation(&b) {
            0
        } else {
            1
        };
        let path = dir.path().join(RECORD_FILE);
        let mut bytes = fs::read(&path).unwrap();
        bytes[torn * slots::SLOT + 40] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(
            StateDir::existing(dir.path())
                .load_state(false)
                .unwrap()
                .sequence_number,
            20,
            "a torn newest slot leaves the record before it"
        );
        // The next write goes into the torn slot, never into the one still whole.
        let whole = pages(&dir)[1 - torn].clone();
        let mut s = dir.load_state(true).unwrap();
        s.sequence_number = 22;
        dir.save_state(&s).unwrap();
        assert_eq!(pages(&dir)[1 - torn], whole);
        assert_eq!(dir.load_state(true).unwrap().sequence_number, 22);
        // Both slots garbage: the fields of state.json (sequence 7), and a fresh record later.
        fs::write(&path, vec![0x5a; slots::FILE_LEN as usize]).unwrap();
        let s = dir.load_state(true).unwrap();
        assert_eq!(s.sequence_number, 7);
        assert_eq!(dir.pacing_record(), Ok(None));
        dir.save_state(&s).unwrap();
        assert_eq!(StateDir::existing(dir.path()).load_state(false).unwrap(), s);
    }

    #[test]
    fn a_whole_newest_slot_that_is_not_the_agents_json_leaves_the_older_record() {
        let (_t, dir) = saved("notjson", snap(1..=3));
        let mut s = dir.load_state(true).unwrap();
        s.sequence_number = 21;
        dir.save_state(&s).unwrap();
        let path = dir.path().join(RECORD_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let slots = Slots::read(&file).unwrap();
        let kept = slots.newest.clone().unwrap();
        let mut w = SlotFile::open(file, &slots).unwrap();
        w.write(b"[\"whole, but not a record\"]", true).unwrap();
        let reread = StateDir::existing(dir.path());
        assert_eq!(reread.load_state(false).unwrap().sequence_number, 21);
        // The next write goes over the unusable slot, never over the record it fell back to.
        let mut s = dir.load_state(true).unwrap();
        s.sequence_number = 22;
        dir.save_state(&s).unwrap();
        assert_eq!(pages(&dir)[kept.0][32..32 + kept.2.len()], kept.2[..]);
        assert_eq!(
            StateDir::existing(dir.path())
                .load_state(false)
                .unwrap()
                .sequence_number,
            22
        );
    }

    #[test]
    fn a_record_that_is_a_link_fifo_short_or_oversized_is_judged_and_replaced() {
        let (t, dir) = saved("badrecord", snap(1..=10));
        let path = dir.path().join(RECORD_FILE);
        let mut s = dir.load_state(true).unwrap();
        s.sequence_number = 30;
        dir.save_state(&s).unwrap();
        let good = fs::read(&path).unwrap();
        // A link (to a record that would parse) is not followed: the fields of state.json.
        let elsewhere = t.0.join("elsewhere");
        fs::write(&elsewhere, &good).unwrap();
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        let s = dir.load_state(true).unwrap();
        assert_eq!(s.sequence_number, 7);
        dir.save_state(&s).unwrap();
        assert!(
            fs::symlink_metadata(&path).unwrap().is_file(),
            "moved aside, written anew"
        );
        assert_eq!(
            fs::read(&elsewhere).unwrap(),
            good,
            "the link's target is untouched"
        );
        // A directory.
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        let s = dir.load_state(true).unwrap();
        assert_eq!(s.sequence_number, 7);
        dir.save_state(&s).unwrap();
        assert!(fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(dir.load_state(true).unwrap().sequence_number, 7);
        // A FIFO: no read blocks.
        fs::remove_file(&path).unwrap();
        mkfifo(&path);
        let s = dir.load_state(true).unwrap();
        assert_eq!(s.sequence_number, 7);
        dir.save_state(&s).unwrap();
        assert!(fs::symlink_metadata(&path).unwrap().is_file());
        let aside: Vec<String> = names(&dir)
            .into_iter()
            .filter(|n| n.starts_with("checkin.rec.corrupt-"))
            .collect();
        assert_eq!(
            aside.len(),
            3,
            "the link, the directory and the FIFO: {:?}",
            names(&dir)
        );
        // Oversized: the slots are read, the rest ignored and cut at the next write.
        let mut long = good.clone();
        long.extend(vec![b'x'; 1 << 20]);
        fs::write(&path, &long).unwrap();
        let s = dir.load_state(true).unwrap();
        assert_eq!(s.sequence_number, 30);
        dir.save_state(&s).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), slots::FILE_LEN);
        // Short: a file cut inside its first slot holds no record.
        fs::write(&path, &good[..100]).unwrap();
        assert_eq!(dir.load_state(true).unwrap().sequence_number, 7);
    }

    #[test]
    fn a_report_stopped_after_part_k_resumes_from_its_accepted_records() {
        let (_t, dir) = saved("resume", snap(1..=100));
        // 100 kept, 2,900 new: several parts of a small budget.
        let (parts, accepted) = send(&dir, snap(1..=3000), 16_000, 3);
        assert!(parts > 5, "{parts} parts");
        let s = dir.load_state(true).unwrap();
        assert_eq!(s.sequence_number, 10);
        assert!(s.report_incomplete);
        assert_eq!(s.last_snapshot.as_ref(), Some(&accepted));
        assert!(!s.snapshot_saved());
        // The resumed run sends exactly what is left and ends at the collected snapshot.
        let (rest, done) = send(&dir, snap(1..=3000), 16_000, usize::MAX);
        assert_eq!(done, snap(1..=3000));
        assert!(rest < parts);
        let s = dir.load_state(true).unwrap();
        assert_eq!(s.last_snapshot, Some(snap(1..=3000)));
        assert_eq!(s.sequence_number, 10 + rest as u64);
        assert!(!s.report_incomplete && s.snapshot_saved());
        assert_eq!(
            names(&dir),
            [RECORD_FILE, STATE_FILE],
            "no report file left"
        );
    }

    #[test]
    fn a_full_report_cut_short_forgets_the_tables_it_had_not_reached() {
        let t = TempDir::new("fullcut");
        let dir = StateDir::create(&t.0).unwrap();
        let mut current = snap(1..=3000);
        current.routes = vec![crate::model::Route {
            destination: "default".into(),
            gateway: None,
            interface: None,
            source_ip: None,
        }];
        let (_, accepted) = send(&dir, current, 16_000, 2);
        let s = dir.load_state(true).unwrap();
        let got = s.last_snapshot.unwrap();
        assert_eq!(got, accepted);
        assert!(got.routes.is_empty(), "routes were not reached: sent again");
    }

    #[test]
    fn a_finished_report_reads_as_the_earlier_agent_format() {
        let (_t, dir) = saved("format", snap(1..=10));
        send(&dir, snap(5..=40), 4_000, usize::MAX);
        let text = fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        let v: Value = miniserde::json::from_str(&text).unwrap();
        let Value::Object(map) = &v else { panic!() };
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "agent_id",
                "enrollment_state",
                "full_snapshot_in_progress",
                "last_checkin_summary",
                "last_full_snapshot_at",
                "last_jitter_seconds",
                "last_snapshot",
                "last_successful_checkin_at",
                "policy",
                "report_incomplete",
                "sequence_number",
            ]
        );
        let at = text.find("\"last_snapshot\":").unwrap() + "\"last_snapshot\":".len();
        let end = text.find(",\"policy\"").unwrap();
        assert_eq!(
            records::snapshot_from_text(&text[at..end]),
            Some((snap(5..=40), 0))
        );
    }

    #[test]
    fn staged_records_of_an_unanswered_part_are_not_taken_as_accepted() {
        let (_t, dir) = saved("staged", snap(1..=10));
        let (_, accepted) = send(&dir, snap(1..=2000), 16_000, 0);
        assert_eq!(accepted, snap(1..=10));
        // Nothing was accepted: no cursor names the report file, which the next run removes.
        let s = dir.load_state(true).unwrap();
        assert_eq!(s.last_snapshot, Some(snap(1..=10)));
        assert_eq!(names(&dir), [STATE_FILE]);
    }

    #[test]
    fn small_fields_written_for_a_replaced_state_json_are_ignored() {
        let (_t, dir) = saved("replaced", snap(1..=10));
        let mut s = dir.load_state(true).unwrap();
        s.sequence_number = 99;
        dir.save_state(&s).unwrap();
        // The earlier agent rewrites state.json (new inode): its own fields count.
        let text = fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        let replaced = text.replace("\"sequence_number\":7", "\"sequence_number\":12");
        fs::write(dir.path().join("tmp"), replaced).unwrap();
        fs::rename(dir.path().join("tmp"), dir.path().join(STATE_FILE)).unwrap();
        assert_eq!(dir.load_state(true).unwrap().sequence_number, 12);
    }

    #[test]
    fn sequence_numbers_read_back_as_u64() {
        let t = TempDir::new("seq");
        let dir = StateDir::create(&t.0).unwrap();
        let s = State {
            sequence_number: u64::MAX,
            ..State::default()
        };
        dir.save_state(&s).unwrap();
        assert_eq!(dir.load_state(true).unwrap().sequence_number, u64::MAX);
    }

    #[test]
    fn deep_nesting_and_huge_strings_cost_no_memory_and_count_as_corrupt_or_dropped() {
        let t = TempDir::new("hostile");
        let dir = StateDir::create(&t.0).unwrap();
        let deep = format!(r#"{{"sequence_number":3,"x":{}}}"#, "[".repeat(1 << 20));
        fs::write(dir.path().join(STATE_FILE), deep).unwrap();
        assert_eq!(dir.load_state(true).unwrap(), State::default());
        // A record with a megabyte-long name is dropped; its neighbours are kept.
        let long = format!(
            r#"{{"sequence_number":3,"last_snapshot":{{"connections":[{},{}]}}}}"#,
            records::snapshot_json(&snap([1]))
                .split("\"connections\":[")
                .nth(1)
                .unwrap()
                .split(']')
                .next()
                .unwrap(),
            r#"{"local_ip":"127.0.0.1","local_port":2,"protocol":"tcp","process_name":""#
                .to_string()
                + &"x".repeat(1 << 20)
                + "\"}"
        );
        fs::write(dir.path().join(STATE_FILE), long).unwrap();
        let s = dir.load_state(true).unwrap();
        assert_eq!((s.sequence_number, s.last_snapshot), (3, Some(snap([1]))));
    }

    #[test]
    fn a_summary_with_its_closing_brace_is_at_most_1_kib() {
        for n in 1010..1024 {
            let text = format!(r#"{{"k":"{}"}}"#, "v".repeat(n));
            let cut = summary_scalars(&miniserde::json::from_str(&text).unwrap()).unwrap();
            let read = format!(r#"{{"last_checkin_summary":{text}}}"#);
            let (s, _) = read_state(&mut Reader::new(read.as_bytes()), false).unwrap();
            let expect = if text.len() <= MAX_SUMMARY_BYTES {
                &text
            } else {
                "{}"
            };
            assert_eq!(
                (cut.as_str(), s.last_checkin_summary.as_deref()),
                (expect, Some(expect))
            );
        }
    }

    #[test]
    fn a_long_summary_is_cut_so_the_fields_fit_one_slot() {
        let members: Vec<String> = (0..64)
            .map(|i| format!(r#""counter_{i:02}":"{}""#, "v".repeat(100)))
            .collect();
        let reply: Value =
            miniserde::json::from_str(&format!("{{{}}}", members.join(","))).unwrap();
        let cut = summary_scalars(&reply).unwrap();
        assert!(cut.len() <= MAX_SUMMARY_BYTES, "{} bytes", cut.len());
        let kept: Value = miniserde::json::from_str(&cut).unwrap();
        let Value::Object(kept) = kept else { panic!() };
        assert_eq!(kept.len(), 8, "{cut}");
        // The same cut when state.json is read.
        let text = format!(r#"{{"last_checkin_summary":{{{}}}}}"#, members.join(","));
        let (s, _) = read_state(&mut Reader::new(text.as_bytes()), true).unwrap();
        assert_eq!(s.last_checkin_summary.as_deref(), Some(cut.as_str()));
        // A summary set some other way that would crowd out the pace is left out of the record
        // (state.json keeps it); every other field is recorded.
        let (_t, dir) = saved("longsummary", snap(1..=3));
        let mut s = dir.load_state(true).unwrap();
        s.sequence_number = 8;
        s.last_checkin_summary = Some(format!(r#"{{"x":"{}"}}"#, "y".repeat(3000)));
        dir.save_state(&s).unwrap();
        let read = StateDir::existing(dir.path()).load_state(false).unwrap();
        assert_eq!(
            read,
            State {
                last_checkin_summary: None,
                ..s
            }
        );
    }

    #[test]
    fn only_the_scalar_members_of_a_summary_are_kept() {
        let reply: Value = miniserde::json::from_str(&format!(
            r#"{{"hosts_created":1,"name":"x","ratio":0.5,"deep":{}1{},"list":[1,2],"none":null}}"#,
            "[".repeat(100),
            "]".repeat(100)
        ))
        .unwrap();
        assert_eq!(
            summary_scalars(&reply).as_deref(),
            Some(r#"{"hosts_created":1,"name":"x","none":null,"ratio":0.5}"#)
        );
        let text = r#"{"last_checkin_summary":{"a":1,"b":{"c":[2]},"d":"e"}}"#;
        let (s, _) = read_state(&mut Reader::new(text.as_bytes()), true).unwrap();
        assert_eq!(
            s.last_checkin_summary.as_deref(),
            Some(r#"{"a":1,"d":"e"}"#)
        );
    }
}
