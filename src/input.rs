//! Bounded reading of input the agent does not own: files an operator points at (env file,
//! CA file, everything under `--proc-root`) and JSON from other programs (`ip -json`, the
//! server).
//!
//! A path can name a FIFO (open blocks until a writer comes), `/dev/zero` (reads never end) or a
//! file far larger than anything real; nested JSON costs the parser about a hundred bytes of
//! memory per byte of input. Everything here fails fast instead, with an error naming the cause.

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Limits on JSON read from elsewhere, checked before parsing ([`check_json`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonLimits {
    /// Deepest nesting of arrays and objects: real documents nest a handful of levels.
    pub depth: usize,
    /// The most memory the parsed tree may take, as estimated by [`check_json`].
    pub memory: usize,
}

/// Output of `ip -json`, the fallback when netlink fails: about 25,000 neighbours or routes fit
/// (each takes about a kilobyte parsed); a runaway tool's output is refused before it can
/// take the unit's 96 MiB.
pub const COMMAND_JSON: JsonLimits = JsonLimits {
    depth: 64,
    memory: 32 << 20,
};

/// A server reply: a real one is a few kilobytes (policy, summary, errors).
pub const REPLY_JSON: JsonLimits = JsonLimits {
    depth: 64,
    memory: 1 << 20,
};

/// What the parser spends, measured with miniserde (peak memory while parsing): an array that
/// holds something takes its value and a vector (1 MiB of `[[..]],` chains, about 520,000
/// arrays, took 75 MB); an object takes a map node (100,000 four-member objects of `ip neigh`
/// took 98 MB, 976 bytes each); an element takes its value and its share of the growth
/// (1,000,000 numbers in an array took 23 MB). Strings cost at most the text itself.
const ARRAY_COST: usize = 150;
const OBJECT_COST: usize = 600;
const MEMBER_COST: usize = 64;
const ELEMENT_COST: usize = 32;

/// Why a file could not be opened as the regular file the caller expects: it is a symbolic
/// link (when links are not followed), a FIFO, a device or a directory. Unlike an I/O failure,
/// this does not pass by itself: someone must replace the file. Carried inside an
/// [`io::Error`] of kind `InvalidInput`; [`not_a_file`] finds it.
#[derive(Debug)]
pub struct NotAFile(pub &'static str);

impl std::fmt::Display for NotAFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            "a symbolic link" => f.write_str("a symbolic link"),
            kind => write!(f, "not a regular file (it is {kind})"),
        }
    }
}

impl std::error::Error for NotAFile {}

/// What the file was instead of a regular file, if that is why `err` happened.
pub fn not_a_file(err: &io::Error) -> Option<&'static str> {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<NotAFile>())
        .map(|n| n.0)
}

/// Whether [`open_regular`] follows a symbolic link at the last component of the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links {
    /// Files the operator points at (env file, CA file, `/proc`): a link is their choice.
    Follow,
    /// The agent's own files: it creates no links, so one is planted and never followed.
    Refuse,
}

/// Opens `path` for reading when it is a regular file. The open itself never blocks
/// (`O_NONBLOCK`, which regular files ignore), so a FIFO is refused instead of waited on.
///
/// The agent's own files are read without updating their access time (`O_NOATIME`, allowed
/// to their owner): under `relatime` the first read after each write would otherwise dirty
/// the inode, a 4 KiB write for every file a run reads back.
pub fn open_regular(path: &Path, links: Links) -> io::Result<File> {
    let flags = libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    let open = |extra: i32| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags | extra)
            .open(path)
    };
    let opened = match links {
        Links::Follow => open(0),
        // EPERM: a file of another user (root's, read by an agent running as its own user).
        Links::Refuse => match open(libc::O_NOFOLLOW | libc::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(libc::O_NOFOLLOW),
            opened => opened,
        },
    };
    let file = opened.map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) if links == Links::Refuse => not_file("a symbolic link"),
        _ => e,
    })?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(not_file(kind(&meta)));
    }
    Ok(file)
}

/// Opens `name` relative to the open directory `dir` for reading when it is a regular file,
/// following links, as [`open_regular`] with [`Links::Follow`]. A run reads a dozen files
/// from each of hundreds of `/proc/<pid>` directories: relative to a held descriptor, no
/// path is built and the kernel resolves only the last components.
pub fn open_regular_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<File> {
    let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: `name` is NUL-terminated and `dir` an open descriptor; the result is checked.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(not_file(kind(&meta)));
    }
    Ok(file)
}

fn not_file(kind: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, NotAFile(kind))
}

/// Reads a whole regular file of at most `cap` bytes; a larger one is an error
/// (`InvalidData`), never silently cut.
pub fn read_regular(path: &Path, links: Links, cap: u64) -> io::Result<Vec<u8>> {
    read_capped(open_regular(path, links)?, cap)
}

/// Reads an open file of at most `cap` bytes; a larger one is an error (`InvalidData`).
pub fn read_capped(file: File, cap: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {cap} bytes"),
        ));
    }
    Ok(bytes)
}

fn kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if meta.mode() & libc::S_IFMT == libc::S_IFLNK {
        "a symbolic link"
    } else {
        "not a file"
    }
}

/// Checks JSON `text` against `limits` before it is parsed: the nesting depth, and the memory
/// the parsed tree would take, estimated from the arrays, objects and commas outside strings.
/// Depth alone does not bound memory: many shallow arrays cost as much as one deep one. Cheap
/// (one pass, no allocation).
pub fn check_json(text: &str, limits: JsonLimits) -> Result<(), String> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut cost = 0usize;
    let too_many = |limits: JsonLimits| {
        format!(
            "JSON with too many values (parsing it would take more than {} KiB)",
            limits.memory >> 10
        )
    };
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limits.depth {
                    return Err(format!("JSON nested deeper than {} levels", limits.depth));
                }
                cost += if b == b'[' { ARRAY_COST } else { OBJECT_COST };
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b':' => cost += MEMBER_COST,
            b',' => cost += ELEMENT_COST,
            _ => continue,
        }
        if cost > limits.memory {
            return Err(too_many(limits));
        }
    }
    // Strings and numbers cost at most what they take as text.
    if cost.saturating_add(text.len()) > limits.memory {
        return Err(too_many(limits));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn temp(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!(
            "ga-input-{tag}-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn fifo_and_device_are_refused_at_once() {
        let dir = temp("fifo");
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = Instant::now();
        let fifo_err = read_regular(&fifo, Links::Follow, 1024).unwrap_err();
        let zero_err = read_regular(Path::new("/dev/zero"), Links::Follow, 1024).unwrap_err();
        let dir_err = read_regular(&dir, Links::Follow, 1024).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            [
                fifo_err.to_string(),
                zero_err.to_string(),
                dir_err.to_string()
            ],
            [
                "not a regular file (it is a FIFO)",
                "not a regular file (it is a character device)",
                "not a regular file (it is a directory)",
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_over_the_cap_is_an_error_not_cut() {
        let dir = temp("cap");
        let path = dir.join("f");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(read_regular(&path, Links::Follow, 5).unwrap(), b"12345");
        let err = read_regular(&path, Links::Follow, 4).unwrap_err();
        assert_eq!(
            (err.kind(), err.to_string()),
            (
                io::ErrorKind::InvalidData,
                "larger than 4 bytes".to_string()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nesting_is_counted_outside_strings_only() {
        let three = JsonLimits {
            depth: 3,
            memory: usize::MAX,
        };
        assert_eq!(check_json(r#"[{"a":[1,"[[[["]}]"#, three), Ok(()));
        assert_eq!(
            check_json(r#"{"a":"\"[[[["}"#, JsonLimits { depth: 1, ..three }),
            Ok(())
        );
        assert_eq!(
            check_json("[[[[", three),
            Err("JSON nested deeper than 3 levels".to_string())
        );
        assert_eq!(
            check_json(&"[".repeat(1000), COMMAND_JSON),
            Err("JSON nested deeper than 64 levels".to_string())
        );
    }

    #[test]
    fn wide_shallow_json_is_refused_by_its_memory_not_its_depth() {
        // What the depth check alone let through: 63-deep chains side by side, and a flat array
        // of half a million numbers (16 MiB parsed: too much for a reply, fine from ip).
        let chain = format!("{}{}", "[".repeat(63), "]".repeat(63));
        let chains = format!("[{}]", vec![chain; 16 << 10].join(","));
        let numbers = format!("[{}]", vec!["1"; 512 << 10].join(","));
        let too_many = |limit: &str| {
            Err(format!(
                "JSON with too many values (parsing it would take more than {limit} KiB)"
            ))
        };
        assert_eq!(
            [
                check_json(&chains, REPLY_JSON),
                check_json(&chains, COMMAND_JSON),
                check_json(&numbers, REPLY_JSON),
                check_json(&numbers, COMMAND_JSON),
            ],
            [
                too_many("1024"),
                too_many("32768"),
                too_many("1024"),
                Ok(())
            ]
        );
        // Commas and brackets inside strings cost nothing.
        let long_string = format!(r#"["{}"]"#, "[,:{".repeat(100 << 10));
        assert_eq!(check_json(&long_string, REPLY_JSON), Ok(()));
    }
}
