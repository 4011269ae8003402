//! Single-line logs on stderr, filtered by `--log-level`. Never pass a secret to these macros:
//! use [`redact`] for keys.
//!
//! Under systemd, stderr is a stream to the journal, which stores every line at the unit's
//! default priority unless the line starts with an sd-daemon(3) `<N>` prefix. The prefixes are
//! written only when `JOURNAL_STREAM` names stderr itself (its `device:inode`), as sd-daemon
//! documents: a redirected stderr (`2>file`, a pipe) gets plain lines.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// Log levels, most severe first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

impl Level {
    /// Accepts the earlier agent's names (`DEBUG`, `info`, `WARNING`, ...), any case.
    pub fn parse(text: &str) -> Option<Level> {
        match text.trim().to_ascii_lowercase().as_str() {
            "error" | "critical" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" | "trace" => Some(Level::Debug),
            _ => None,
        }
    }

    /// The syslog priority the journal stores the line at.
    fn priority(self) -> u8 {
        match self {
            Level::Error => 3,
            Level::Warn => 4,
            Level::Info => 6,
            Level::Debug => 7,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warning",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

/// Sets the most verbose level that is printed.
pub fn set_level(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

/// True when a message at `level` would be printed (to skip building expensive messages).
pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

/// Writes one line; newlines inside the message are flattened so a line stays one record.
pub fn write(level: Level, args: std::fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let text = args.to_string().replace(['\n', '\r'], " ");
    let _ = writeln!(io_stderr(), "{}", line(level, &text, to_journal()));
}

/// One log line, with the journal's priority prefix when stderr is the journal.
pub fn line(level: Level, text: &str, journal: bool) -> String {
    if journal {
        format!(
            "<{}>grapheon-agent {}: {text}",
            level.priority(),
            level.name()
        )
    } else {
        format!("grapheon-agent {}: {text}", level.name())
    }
}

/// True when `journal_stream` (the value of `JOURNAL_STREAM`, `device:inode` in decimal)
/// identifies the file stderr is (`stderr`: its device and inode).
pub fn is_journal(journal_stream: Option<&str>, stderr: Option<(u64, u64)>) -> bool {
    let (Some(value), Some((dev, ino))) = (journal_stream, stderr) else {
        return false;
    };
    let Some((d, i)) = value.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

fn to_journal() -> bool {
    static JOURNAL: OnceLock<bool> = OnceLock::new();
    *JOURNAL.get_or_init(|| {
        let stream = std::env::var("JOURNAL_STREAM").ok();
        is_journal(stream.as_deref(), stderr_identity())
    })
}

fn stderr_identity() -> Option<(u64, u64)> {
    // SAFETY: fstat fills a zeroed struct we own; fd 2 may be closed, which is an error return.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let fd = std::io::stderr().as_raw_fd();
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    // The field types differ between targets (32-bit ARM), hence the casts.
    #[allow(clippy::unnecessary_cast)]
    Some((st.st_dev as u64, st.st_ino as u64))
}

fn io_stderr() -> std::io::StderrLock<'static> {
    std::io::stderr().lock()
}

/// Shows at most the first characters of a secret, enough to tell keys apart.
pub fn redact(secret: &str) -> String {
    let shown: String = secret.chars().take(8).collect();
    format!("{shown}…")
}

/// Logs at error level.
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Error, format_args!($($t)*)) } }
/// Logs at warning level.
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Warn, format_args!($($t)*)) } }
/// Logs at info level.
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Info, format_args!($($t)*)) } }
/// Logs at debug level.
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Debug, format_args!($($t)*)) } }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_lines_carry_the_priority_of_their_level() {
        let lines: Vec<String> = [Level::Error, Level::Warn, Level::Info, Level::Debug]
            .into_iter()
            .map(|l| line(l, "x", true))
            .collect();
        assert_eq!(
            lines,
            [
                "<3>grapheon-agent error: x",
                "<4>grapheon-agent warning: x",
                "<6>grapheon-agent info: x",
                "<7>grapheon-agent debug: x",
            ]
        );
        assert_eq!(line(Level::Error, "x", false), "grapheon-agent error: x");
    }

    #[test]
    fn only_a_journal_stream_naming_stderr_itself_counts() {
        let stderr = Some((64769, 1234));
        assert!(is_journal(Some("64769:1234"), stderr));
        // Inherited by a child whose stderr was redirected: another file.
        assert!(!is_journal(Some("64769:1235"), stderr));
        assert!(!is_journal(Some("64769"), stderr));
        assert!(!is_journal(Some(""), stderr));
        assert!(!is_journal(None, stderr));
        assert!(!is_journal(Some("64769:1234"), None));
    }
}
