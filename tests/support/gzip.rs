//! Gzip decoding that fails exactly where the real server's does.
//!
//! The server runs Python 3.12's `gzip.decompress` (its "CRC check failed" message, without the
//! hex values `GzipFile` adds, gives it away). That function accepts several concatenated members
//! and NUL padding between them, raises `BadGzipFile` (→ 400) for a wrong magic, method, CRC or
//! length, and `EOFError` (→ 500, uncaught) for a stream that ends early. This mirrors it step by
//! step, with flate2 doing the raw inflate.

use flate2::{Crc, Decompress, FlushDecompress, Status};

/// Why a body could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum GzipError {
    /// `BadGzipFile` or `zlib.error`: the server answers 400 `Invalid gzip payload: <msg>`.
    Bad(String),
    /// `EOFError` (truncated stream): uncaught by the server, so a plain 500.
    Truncated,
    /// More than `limit` decoded bytes: the server answers 413.
    TooLarge,
}

/// Decodes `data` as Python's `gzip.decompress` would, stopping once more than `limit` bytes
/// came out (so that a gzip bomb cannot exhaust the test's memory).
pub fn decompress(data: &[u8], limit: usize) -> Result<Vec<u8>, GzipError> {
    let mut out = Vec::new();
    let mut rest = data;
    loop {
        if rest.is_empty() {
            return Ok(out);
        }
        let header_len = read_header(rest)?;
        rest = &rest[header_len..];
        let start = out.len();
        let consumed = inflate_member(rest, &mut out, limit)?;
        rest = &rest[consumed..];
        let member = &out[start..];
        // Python checks `len(do.unused_data) < 8` and raises EOFError: a missing trailer is a
        // truncation (500), not a bad file.
        let Some((trailer, after)) = rest.split_first_chunk::<8>() else {
            return Err(GzipError::Truncated);
        };
        let want_crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
        let want_len = u32::from_le_bytes([trailer[4], trailer[5], trailer[6], trailer[7]]);
        let mut crc = Crc::new();
        crc.update(member);
        if crc.sum() != want_crc {
            return Err(GzipError::Bad("CRC check failed".into()));
        }
        if member.len() as u32 != want_len {
            return Err(GzipError::Bad("Incorrect length of data produced".into()));
        }
        let padding = after.iter().take_while(|b| **b == 0).count();
        rest = &after[padding..];
    }
}

/// Length of the member header at the start of `data` (`gzip._read_gzip_header`).
fn read_header(data: &[u8]) -> Result<usize, GzipError> {
    const FHCRC: u8 = 2;
    const FEXTRA: u8 = 4;
    const FNAME: u8 = 8;
    const FCOMMENT: u8 = 16;
    let magic = &data[..data.len().min(2)];
    if magic != [0x1f, 0x8b] {
        return Err(GzipError::Bad(format!(
            "Not a gzipped file ({})",
            py_bytes_repr(magic)
        )));
    }
    let fixed = data.get(2..10).ok_or(GzipError::Truncated)?;
    if fixed[0] != 8 {
        return Err(GzipError::Bad("Unknown compression method".into()));
    }
    let flags = fixed[1];
    let mut at = 10;
    if flags & FEXTRA != 0 {
        let len = data.get(at..at + 2).ok_or(GzipError::Truncated)?;
        at += 2 + usize::from(u16::from_le_bytes([len[0], len[1]]));
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            let text = data.get(at..).ok_or(GzipError::Truncated)?;
            let nul = text
                .iter()
                .position(|b| *b == 0)
                .ok_or(GzipError::Truncated)?;
            at += nul + 1;
        }
    }
    if flags & FHCRC != 0 {
        at += 2;
    }
    if at > data.len() {
        return Err(GzipError::Truncated);
    }
    Ok(at)
}

/// Inflates one raw deflate stream into `out`; returns how many input bytes it used.
fn inflate_member(input: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<usize, GzipError> {
    let mut inflater = Decompress::new(false);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let used_before = inflater.total_in();
        let made_before = inflater.total_out();
        let from = usize::try_from(used_before).unwrap_or(usize::MAX);
        let status = inflater
            .decompress(
                input.get(from..).unwrap_or_default(),
                &mut buf,
                FlushDecompress::None,
            )
            .map_err(|e| GzipError::Bad(format!("Error -3 while decompressing data: {e}")))?;
        let made = usize::try_from(inflater.total_out() - made_before).unwrap_or(usize::MAX);
        out.extend_from_slice(&buf[..made]);
        if out.len() > limit {
            return Err(GzipError::TooLarge);
        }
        match status {
            Status::StreamEnd => {
                return Ok(usize::try_from(inflater.total_in()).unwrap_or(usize::MAX));
            }
            // No progress with input left to read means the input ran out mid-stream.
            _ if made == 0 && inflater.total_in() == used_before => {
                return Err(GzipError::Truncated);
            }
            _ => {}
        }
    }
}

/// Python's `repr()` of a bytes object, as it appears in `Not a gzipped file (b'x\x9c')`.
pub fn py_bytes_repr(bytes: &[u8]) -> String {
    let quote = if bytes.contains(&b'\'') && !bytes.contains(&b'"') {
        '"'
    } else {
        '\''
    };
    let mut text = format!("b{quote}");
    for &c in bytes {
        match c {
            b'\\' => text.push_str("\\\\"),
            b'\t' => text.push_str("\\t"),
            b'\n' => text.push_str("\\n"),
            b'\r' => text.push_str("\\r"),
            _ if char::from(c) == quote => {
                text.push('\\');
                text.push(quote);
            }
            0x20..=0x7e => text.push(char::from(c)),
            _ => text.push_str(&format!("\\x{c:02x}")),
        }
    }
    text.push(quote);
    text
}
