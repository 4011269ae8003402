//! Bounded reading of input the agent does not own: files an operator points at (env file,
//! CA file, everything under `--proc-root`) and JSON from other programs (`ip -json`, the
//! server).
//!
//! A path can name a FIFO (open blocks until a writer comes), `/dev/zero` (reads never end) or a
//! file far larger than anything real; nested JSON costs the parser about a hundred bytes of
//! memory per byte of input. Everything here fails fast instead, with an error naming the cause.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Deeper JSON than this is refused before parsing: real documents nest a handful of levels.
pub const MAX_JSON_DEPTH: usize = 64;

/// Opens `path` for reading when it is a regular file (symlinks followed). The open itself never
/// blocks (`O_NONBLOCK`, which regular files ignore), so a FIFO is refused instead of waited on.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file (it is {})", kind(&meta)),
        ));
    }
    Ok(file)
}

/// Reads a whole regular file of at most `cap` bytes; a larger one is an error
/// (`InvalidData`), never silently cut.
pub fn read_regular(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    read_capped(open_regular(path)?, cap)
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

/// Checks that JSON `text` nests arrays and objects at most `max` levels deep, counting only
/// brackets outside strings. Cheap (one pass, no allocation), so it runs before the parser.
pub fn check_json_depth(text: &str, max: usize) -> Result<(), String> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
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
                if depth > max {
                    return Err(format!("JSON nested deeper than {max} levels"));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
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
        let fifo_err = read_regular(&fifo, 1024).unwrap_err();
        let zero_err = read_regular(Path::new("/dev/zero"), 1024).unwrap_err();
        let dir_err = read_regular(&dir, 1024).unwrap_err();
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
        assert_eq!(read_regular(&path, 5).unwrap(), b"12345");
        let err = read_regular(&path, 4).unwrap_err();
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
        assert_eq!(check_json_depth(r#"[{"a":[1,"[[[["]}]"#, 3), Ok(()));
        assert_eq!(check_json_depth(r#"{"a":"\"[[[["}"#, 1), Ok(()));
        assert_eq!(
            check_json_depth("[[[[", 3),
            Err("JSON nested deeper than 3 levels".to_string())
        );
        assert_eq!(
            check_json_depth(&"[".repeat(60 << 20), MAX_JSON_DEPTH),
            Err("JSON nested deeper than 64 levels".to_string())
        );
    }
}
