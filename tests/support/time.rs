//! Datetimes as the real server reads and writes them.
//!
//! The server writes naive UTC datetimes (`2026-11-30T01:57:21.769788`, Python's `isoformat()` of a
//! naive value: no fraction when the microseconds are zero) and, when reading `observed_at`, drops
//! any offset instead of converting it.

use std::time::{SystemTime, UNIX_EPOCH};

/// The current UTC time in the server's naive format.
pub fn now_naive() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    naive_from_unix(secs, since.subsec_micros())
}

/// Formats a Unix time as a naive datetime, the way Python's `datetime.isoformat()` does.
pub fn naive_from_unix(secs: i64, micros: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    naive(y, m, d, rem / 3600, rem % 3600 / 60, rem % 60, micros)
}

fn naive(y: i64, m: u32, d: u32, hh: i64, mm: i64, ss: i64, micros: u32) -> String {
    let base = format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}");
    if micros == 0 {
        base
    } else {
        format!("{base}.{micros:06}")
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Parses an RFC 3339 datetime (`2026-11-30T01:57:27Z`, optional fraction of up to six digits,
/// `Z` or `±HH:MM` or no offset) and returns it as the server stores it: naive, offset dropped.
/// Stricter than pydantic (no unix timestamps, no date-only, no space separator), which only
/// makes the fake refuse what a careful agent never sends.
pub fn parse_datetime(text: &str) -> Result<String, &'static str> {
    let b = text.as_bytes();
    if b.len() < 19 {
        return Err("input is too short");
    }
    let num = |from: usize, to: usize| -> Result<i64, &'static str> {
        let part = b.get(from..to).ok_or("input is too short")?;
        if !part.iter().all(u8::is_ascii_digit) {
            return Err("invalid character in date or time");
        }
        Ok(part.iter().fold(0, |acc, c| acc * 10 + i64::from(c - b'0')))
    };
    let sep = |at: usize, want: u8| -> Result<(), &'static str> {
        if b.get(at) == Some(&want) {
            Ok(())
        } else {
            Err("invalid date or time separator")
        }
    };
    let y = num(0, 4)?;
    sep(4, b'-')?;
    let m = num(5, 7)?;
    sep(7, b'-')?;
    let d = num(8, 10)?;
    sep(10, b'T')?;
    let hh = num(11, 13)?;
    sep(13, b':')?;
    let mm = num(14, 16)?;
    sep(16, b':')?;
    let ss = num(17, 19)?;
    if !(1..=12).contains(&m) {
        return Err("month value is outside expected range of 1-12");
    }
    let (m, d) = (m as u32, d as u32);
    if d == 0 || d > days_in_month(y, m) {
        return Err("day value is outside expected range");
    }
    if hh > 23 || mm > 59 || ss > 59 {
        return Err("time value is outside expected range");
    }
    let mut at = 19;
    let mut micros = 0u32;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let digits = b[at..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || digits > 6 {
            return Err("invalid second fraction");
        }
        for i in 0..6 {
            let digit = if i < digits {
                u32::from(b[at + i] - b'0')
            } else {
                0
            };
            micros = micros * 10 + digit;
        }
        at += digits;
    }
    match &b[at..] {
        [] | [b'Z'] => {}
        [sign, h1, h2, b':', m1, m2]
            if matches!(sign, b'+' | b'-')
                && [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()) =>
        {
            let hours = (h1 - b'0') * 10 + (h2 - b'0');
            let minutes = (m1 - b'0') * 10 + (m2 - b'0');
            if hours > 23 || minutes > 59 {
                return Err("timezone offset is outside expected range");
            }
        }
        _ => return Err("invalid timezone sign or trailing characters"),
    }
    Ok(naive(y, m, d, hh, mm, ss, micros))
}
