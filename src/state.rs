//! The state directory: `agent_uuid`, `api_key`, `state.json`, in the earlier agent's format.
//!
//! Every write is atomic and durable (temporary file, fsync, rename, fsync of the directory), so
//! a crash or a full disk leaves either the old file or the new one, never a torn one. The
//! directory is 0700 and every file 0600. One run at a time holds `agent.lock`.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use miniserde::json::Value;

use crate::error::{Error, Result};
use crate::input;
use crate::json::{self, Object};
use crate::model::Snapshot;
use crate::policy::Policy;
use crate::report::records;
use crate::timefmt;

const UUID_FILE: &str = "agent_uuid";
const KEY_FILE: &str = "api_key";
const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "agent.lock";
/// Where the API key is written first: room taken before registering ([`KeySlot`]).
const KEY_RESERVATION: &str = ".api_key.reserved";
/// The room reserved for the key (the longest key accepted is 512 bytes).
const KEY_ROOM: u64 = 4096;
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

/// The room reserved for an API key about to be issued ([`StateDir::reserve_api_key`]).
/// Dropped without a key, it is given back.
#[derive(Debug)]
pub struct KeySlot<'a> {
    dir: &'a StateDir,
    file: File,
    holds_key: bool,
}

impl KeySlot<'_> {
    /// Stores the key in the reserved room, then puts it in place as `api_key`. When that
    /// fails, the key stays in the reservation, which the next run installs.
    pub fn store(mut self, key: &str) -> Result<()> {
        let reservation = self.dir.path.join(KEY_RESERVATION);
        let line = format!("{key}\n");
        let written = (|| -> std::io::Result<()> {
            self.file.write_all_at(line.as_bytes(), 0)?;
            self.holds_key = true;
            self.file.set_len(line.len() as u64)?;
            self.file.sync_all()
        })();
        if let Err(e) = written {
            if !self.holds_key {
                // Not even the reserved room took it (a key longer than the room?): the plain
                // write is the last chance to keep the only copy.
                warn!("cannot store the API key in {}: {e}", reservation.display());
                return self.dir.write_api_key(key);
            }
            // The key is in the file; only the padding may remain. The next run installs it.
            warn!("cannot trim {}: {e}", reservation.display());
        }
        self.holds_key = true;
        let path = self.dir.path.join(KEY_FILE);
        fs::rename(&reservation, &path)
            .and_then(|()| File::open(&self.dir.path)?.sync_all())
            .map_err(|e| {
                Error::Transient(format!(
                    "the API key was received but cannot be put in place as {} ({e}); it is kept \
                     in {}, and the next run installs it",
                    path.display(),
                    reservation.display()
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
                _ => Error::io("cannot open the lock file", &path, e),
            })?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("cannot inspect the lock file", &path, e))?;
        if !meta.is_file() {
            return Err(Error::Config(format!(
                "{} is not a regular file, which the agent never creates: remove it",
                path.display()
            )));
        }
        let start = Instant::now();
        loop {
            // SAFETY: flock on a file descriptor we own; no memory is passed.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                let lock = Lock { _file: file };
                self.tidy()?;
                return Ok(Some(lock));
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
                file,
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

    /// Under the lock, nothing else writes here: temporary files are what a killed run left
    /// (each up to the size of the state), and a key a killed run received but did not put in
    /// place is installed now.
    fn tidy(&self) -> Result<()> {
        let entries = fs::read_dir(&self.path)
            .map_err(|e| Error::io("cannot list the state directory", &self.path, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if is_temporary(&name) {
                match fs::remove_file(entry.path()) {
                    Ok(()) => debug!("removed {name}, left by an interrupted run"),
                    Err(e) => warn!("cannot remove {}: {e}", entry.path().display()),
                }
            }
        }
        let reservation = self.path.join(KEY_RESERVATION);
        let text = match read_capped(&reservation, KEY_ROOM) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(_) => String::new(),
        };
        let key = text.trim();
        if check_api_key(key).is_err() {
            // Only the padding (or a torn write): no key was ever stored there.
            let _ = fs::remove_file(&reservation);
            return Ok(());
        }
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
        fs::rename(&reservation, &path)
            .and_then(|()| File::open(&self.path)?.sync_all())
            .map_err(|e| Error::io("cannot install the received API key as", &path, e))
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

/// Reads one of the agent's own files: never through a symbolic link (the agent creates none),
/// only a regular file (a FIFO would block), at most `cap` bytes. Anything else is
/// `InvalidData`, which the callers judge as corrupt.
fn read_capped(path: &Path, cap: u64) -> std::io::Result<String> {
    let invalid = |why: String| std::io::Error::new(ErrorKind::InvalidData, why);
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => invalid("a symbolic link".into()),
            _ => e,
        })?;
    if !file.metadata()?.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    let bytes = input::read_capped(file, cap)?;
    String::from_utf8(bytes).map_err(|_| invalid("not UTF-8".into()))
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

fn symlinked_dir(path: &Path) -> Error {
    Error::Config(format!(
        "state directory {} is a symbolic link: pass the directory it points to with \
         --state-dir (GRAPHEON_AGENT_STATE_DIR), so the agent's writes cannot be redirected",
        path.display()
    ))
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
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to give a directory away");
            return;
        }
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
        assert_eq!(dir.read_api_key().unwrap(), None);
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
        let _lock = dir.lock(Duration::ZERO).unwrap().unwrap();
        assert_eq!(names(&dir), ["agent.lock", KEY_FILE]);
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
}
