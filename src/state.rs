//! The state directory: `agent_uuid`, `api_key`, `state.json`, in the earlier agent's format.
//!
//! Every write is atomic and durable (temporary file, fsync, rename, fsync of the directory), so
//! a crash or a full disk leaves either the old file or the new one, never a torn one. The
//! directory is 0700 and every file 0600. One run at a time holds `agent.lock`.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use miniserde::json::Value;

use crate::error::{Error, Result};
use crate::json::{self, Object};
use crate::model::Snapshot;
use crate::policy::Policy;
use crate::report::records;
use crate::timefmt;

const UUID_FILE: &str = "agent_uuid";
const KEY_FILE: &str = "api_key";
const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "agent.lock";
/// Larger state files are not read: no real snapshot comes near this, and reading one whole
/// would take the memory of a small host.
const MAX_STATE_BYTES: u64 = 256 << 20;

/// What the agent remembers between runs (`state.json`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    pub policy: Option<Policy>,
    pub agent_id: Option<i64>,
    pub enrollment_state: Option<String>,
    /// The sequence number of the last accepted check-in (0: none yet).
    pub sequence_number: u64,
    /// What the server has accepted so far; `None` until the first accepted check-in, which
    /// makes the next report a full snapshot.
    pub last_snapshot: Option<Snapshot>,
    pub last_successful_checkin_at: Option<i64>,
    /// The server's summary of the last accepted check-in, kept as JSON text.
    pub last_checkin_summary: Option<String>,
    pub last_jitter_seconds: Option<u32>,
    /// When the last complete full snapshot was accepted.
    pub last_full_snapshot_at: Option<i64>,
    /// A full snapshot sent in parts was interrupted: the remaining parts still say full.
    pub full_snapshot_in_progress: bool,
    /// A report sent in parts was interrupted: the next run sends the rest without waiting for
    /// the cadence.
    pub report_incomplete: bool,
}

impl State {
    /// The cached policy, or the server's defaults before the first one arrives.
    pub fn policy(&self) -> Policy {
        self.policy.clone().unwrap_or_default()
    }

    fn to_json(&self) -> String {
        let snapshot = self.last_snapshot.as_ref().map(records::snapshot_json);
        let policy = self.policy.as_ref().map(Policy::to_json);
        let mut out = String::with_capacity(512 + snapshot.as_ref().map_or(0, String::len));
        let mut o = Object::new(&mut out);
        o.raw("policy", policy.as_deref().unwrap_or("null"))
            .opt_num("agent_id", self.agent_id)
            .opt_str("enrollment_state", self.enrollment_state.as_deref())
            .num("sequence_number", self.sequence_number)
            .raw("last_snapshot", snapshot.as_deref().unwrap_or("null"))
            .opt_str(
                "last_successful_checkin_at",
                self.last_successful_checkin_at
                    .map(timefmt::format_utc)
                    .as_deref(),
            )
            .raw(
                "last_checkin_summary",
                self.last_checkin_summary.as_deref().unwrap_or("null"),
            )
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

    /// Parses `state.json` text; `None` when it is not a JSON object at all (corrupt).
    fn from_json(text: &str) -> Option<State> {
        let v: Value = miniserde::json::from_str(text).ok()?;
        if !matches!(v, Value::Object(_)) {
            return None;
        }
        let snapshot = match json::get(&v, "last_snapshot") {
            Some(s @ Value::Object(_)) => {
                let (snapshot, dropped) = records::snapshot_from(s);
                if dropped > 0 {
                    debug!("{dropped} cached records no longer parse; they will be reported again");
                }
                Some(snapshot)
            }
            _ => None,
        };
        let summary = match json::get(&v, "last_checkin_summary") {
            None | Some(Value::Null) => None,
            Some(s) => Some(miniserde::json::to_string(s)),
        };
        Some(State {
            policy: json::get(&v, "policy").and_then(Policy::from_value),
            agent_id: json::get_i64(&v, "agent_id"),
            enrollment_state: json::get_str(&v, "enrollment_state").map(str::to_string),
            sequence_number: json::get_i64(&v, "sequence_number")
                .and_then(|n| u64::try_from(n).ok())
                .unwrap_or(0),
            last_snapshot: snapshot,
            last_successful_checkin_at: json::get_str(&v, "last_successful_checkin_at")
                .and_then(timefmt::parse),
            last_checkin_summary: summary,
            last_jitter_seconds: json::get_i64(&v, "last_jitter_seconds")
                .and_then(|n| u32::try_from(n).ok()),
            last_full_snapshot_at: json::get_str(&v, "last_full_snapshot_at")
                .and_then(timefmt::parse),
            full_snapshot_in_progress: json::get_bool(&v, "full_snapshot_in_progress")
                .unwrap_or(false),
            report_incomplete: json::get_bool(&v, "report_incomplete").unwrap_or(false),
        })
    }
}

/// The state directory of one agent.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
}

/// Held while a run may write state; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

impl StateDir {
    /// Opens the directory, creating it 0700 when missing and tightening a wider mode (the
    /// earlier agent's directory may be 0755).
    pub fn create(path: &Path) -> Result<StateDir> {
        match fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {
                if meta.permissions().mode() & 0o077 != 0 {
                    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
                        .map_err(|e| Error::io("cannot restrict the state directory", path, e))?;
                }
            }
            Ok(_) => {
                return Err(Error::Config(format!(
                    "state directory {} exists but is not a directory",
                    path.display()
                )))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(path)
                    .map_err(|e| Error::io("cannot create the state directory", path, e))?;
            }
            Err(e) => return Err(Error::io("cannot open the state directory", path, e)),
        }
        Ok(StateDir {
            path: path.to_path_buf(),
        })
    }

    /// Opens an existing directory for reading only (`--status`, `--dry-run`): nothing is created.
    pub fn existing(path: &Path) -> StateDir {
        StateDir {
            path: path.to_path_buf(),
        }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the run lock, waiting up to `wait` for another run to finish. `None`: another run
    /// still holds it.
    pub fn lock(&self, wait: Duration) -> Result<Option<Lock>> {
        let path = self.path.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| Error::io("cannot open the lock file", &path, e))?;
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
        match read_capped(&path, 64 << 10) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
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

    /// Stores the API key (0600). Called the moment a key arrives: the server shows it once.
    pub fn write_api_key(&self, key: &str) -> Result<()> {
        self.write(KEY_FILE, format!("{key}\n").as_bytes())
    }

    /// Loads `state.json`. A missing file is a fresh state; a corrupt one is moved aside with a
    /// warning (when `repair`) and the run continues from a fresh state.
    pub fn load_state(&self, repair: bool) -> Result<State> {
        let path = self.path.join(STATE_FILE);
        let text = match read_capped(&path, MAX_STATE_BYTES) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(State::default()),
            Err(e) if e.kind() == ErrorKind::InvalidData => String::new(),
            Err(e) => return Err(Error::io("cannot read", &path, e)),
        };
        if let Some(state) = State::from_json(&text) {
            return Ok(state);
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

    /// Saves `state.json` atomically.
    pub fn save_state(&self, state: &State) -> Result<()> {
        self.write(STATE_FILE, state.to_json().as_bytes())
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
                .custom_flags(libc::O_CLOEXEC)
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

fn read_capped(path: &Path, cap: u64) -> std::io::Result<String> {
    let file = File::open(path)?;
    let mut bytes = Vec::new();
    file.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            "file too large",
        ));
    }
    String::from_utf8(bytes).map_err(|_| std::io::Error::new(ErrorKind::InvalidData, "not UTF-8"))
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
}
