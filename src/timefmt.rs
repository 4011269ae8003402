//! UTC timestamps without a time crate: formatting for reports, parsing for the server's naive
//! datetimes (which mean UTC) and the earlier agent's ISO timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, now.
pub fn now() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// `2026-11-30T01:57:27Z`: the server drops offsets instead of converting, so always UTC `Z`.
pub fn format_utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses `YYYY-MM-DD[T ]HH:MM[:SS[.fraction]][Z|±HH:MM]` into epoch seconds. No offset means UTC
/// (the server writes naive datetimes). Anything malformed is `None`.
pub fn parse(text: &str) -> Option<i64> {
    let b = text.trim().as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let year = num(0, 4)?;
    if b.get(4) != Some(&b'-')
        || b.get(7) != Some(&b'-')
        || !matches!(b.get(10), Some(b'T' | b't' | b' '))
    {
        return None;
    }
    let (month, day) = (num(5, 2)?, num(8, 2)?);
    let (hour, minute) = (num(11, 2)?, num(14, 2)?);
    if b.get(13) != Some(&b':') {
        return None;
    }
    let mut at = 16;
    let mut second = 0;
    if b.get(at) == Some(&b':') {
        second = num(17, 2)?;
        at = 19;
        if b.get(at) == Some(&b'.') {
            at += 1;
            let start = at;
            while b.get(at).is_some_and(u8::is_ascii_digit) {
                at += 1;
            }
            if at == start {
                return None;
            }
        }
    }
    let offset = match b.get(at) {
        None => 0,
        Some(b'Z' | b'z') if at + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if b.len() == at + 6 && b[at + 3] == b':' => {
            let minutes = num(at + 1, 2)? * 60 + num(at + 4, 2)?;
            if *sign == b'+' {
                minutes * 60
            } else {
                -minutes * 60
            }
        }
        _ => return None,
    };
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

/// Parses an HTTP-date (RFC 9110 5.6.7: `Sun, 06 Nov 1994 08:49:37 GMT`, and the obsolete
/// `Sunday, 06-Nov-94 08:49:37 GMT` and `Sun Nov  6 08:49:37 1994`) into epoch seconds. The
/// weekday is not checked: it adds nothing a receiver needs.
pub fn parse_http_date(text: &str) -> Option<i64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = |m: &str| MONTHS.iter().position(|x| *x == m).map(|i| i as i64 + 1);
    let number = |t: &str, digits: std::ops::RangeInclusive<usize>| -> Option<i64> {
        (digits.contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse().ok())
            .flatten()
    };
    let clock = |t: &str| -> Option<(i64, i64, i64)> {
        let mut p = t.split(':');
        let h = number(p.next()?, 2..=2)?;
        let m = number(p.next()?, 2..=2)?;
        let s = number(p.next()?, 2..=2)?;
        p.next().is_none().then_some((h, m, s))
    };
    let words: Vec<&str> = text.split_ascii_whitespace().collect();
    let (y, mo, d, (h, mi, s)) = match words.as_slice() {
        // IMF-fixdate.
        [wd, d, mo, y, t, "GMT"] if wd.ends_with(',') => {
            (number(y, 4..=4)?, month(mo)?, number(d, 2..=2)?, clock(t)?)
        }
        // RFC 850: two-digit years are within 50 years of now, i.e. 19xx from 70 on.
        [wd, date, t, "GMT"] if wd.ends_with(',') => {
            let mut p = date.split('-');
            let d = number(p.next()?, 2..=2)?;
            let mo = month(p.next()?)?;
            let yy = number(p.next()?, 2..=2)?;
            if p.next().is_some() {
                return None;
            }
            (
                if yy < 70 { 2000 + yy } else { 1900 + yy },
                mo,
                d,
                clock(t)?,
            )
        }
        // asctime: the day may be one digit.
        [_, mo, d, t, y] => (number(y, 4..=4)?, month(mo)?, number(d, 1..=2)?, clock(t)?),
        _ => return None,
    };
    if !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s)
}

// Howard Hinnant's civil calendar algorithms (public domain), proleptic Gregorian.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_with_z() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(1_795_744_647), "2026-11-27T01:57:27Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn server_naive_datetimes_are_utc() {
        let naive = parse("2026-11-30T01:57:21.769788").unwrap();
        assert_eq!(format_utc(naive), "2026-11-30T01:57:21Z");
        assert_eq!(parse("2026-11-30T01:57:21Z"), Some(naive));
        assert_eq!(parse("2026-11-30T02:57:21+01:00"), Some(naive));
        assert_eq!(parse("2026-11-29T23:57:21.5-02:00"), Some(naive));
        assert_eq!(parse("2026-11-30 01:57:21"), Some(naive));
    }

    #[test]
    fn malformed_datetimes_are_rejected() {
        for bad in [
            "",
            "2026",
            "2026-13-01T00:00:00",
            "2026-11-30T25:00:00",
            "2026-11-30T01:57:21.",
            "2026-11-30T01:57:21+0100",
            "2026-11-30T01:57:21Zjunk",
            "２０２６-11-30T01:57:21",
            "2026-11-30X01:57",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn round_trips_across_centuries() {
        for secs in [
            -86_400 * 366 * 3,
            0,
            1,
            68_169_599,
            4_102_444_800,
            1_795_744_647,
        ] {
            assert_eq!(parse(&format_utc(secs)), Some(secs));
        }
    }

    #[test]
    fn http_dates_in_all_three_formats() {
        let t = 784_111_777; // 1994-11-06T08:49:37Z
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(t));
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), Some(t));
        assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), Some(t));
        assert_eq!(
            parse_http_date("Tue, 01 Dec 2026 21:40:00 GMT").map(format_utc),
            Some("2026-12-01T21:40:00Z".to_string())
        );
        for bad in [
            "",
            "120",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 6 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 8:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37:00 GMT",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad}");
        }
    }
}
