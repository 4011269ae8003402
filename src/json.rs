//! Compact JSON output and small helpers for reading `miniserde` values.
//!
//! Output is written by hand: field order is fixed, nothing is allocated per field, and the
//! same record always produces the same bytes, which the delta and the size budget rely on.
pub mod read;

use std::net::IpAddr;

use miniserde::json::{Number, Value};

use crate::model::Mac;

/// Appends `text` as a JSON string literal. Runs of characters that need no escape are copied
/// whole: this is the hot path of rendering 100,000 records.
pub fn push_str<S: Sink + ?Sized>(out: &mut S, text: &str) {
    out.put_char('"');
    // Nearly every string (names, states, keys) needs no escape at all. 0xE2 leads U+2028/9.
    if !text
        .bytes()
        .any(|b| b < 0x20 || b == b'"' || b == b'\\' || b == 0xE2)
    {
        out.put(text);
        out.put_char('"');
        return;
    }
    let mut start = 0;
    for (at, c) in text.char_indices() {
        let escaped = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => "",
            _ => continue,
        };
        out.put(&text[start..at]);
        if escaped.is_empty() {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.put(escaped);
        }
        start = at + c.len_utf8();
    }
    out.put(&text[start..]);
    out.put_char('"');
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Where JSON text goes: a `String`, or a [`Length`] that only counts, so report parts can be
/// sized without rendering every record twice.
pub trait Sink: std::fmt::Write {
    /// Appends text.
    fn put(&mut self, text: &str);
    /// Appends one character.
    fn put_char(&mut self, c: char);
}

impl Sink for String {
    fn put(&mut self, text: &str) {
        self.push_str(text);
    }
    fn put_char(&mut self, c: char) {
        self.push(c);
    }
}

/// Counts the bytes that would be written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Length(pub usize);

impl std::fmt::Write for Length {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.0 += text.len();
        Ok(())
    }
}

impl Sink for Length {
    fn put(&mut self, text: &str) {
        self.0 += text.len();
    }
    fn put_char(&mut self, c: char) {
        self.0 += c.len_utf8();
    }
}

/// Appends the decimal digits of `n`.
pub fn push_u64<S: Sink + ?Sized>(out: &mut S, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    out.put(std::str::from_utf8(&digits[at..]).unwrap_or("0"));
}

/// Builds one JSON object, managing the commas.
pub struct Object<'a, S: Sink + ?Sized = String> {
    out: &'a mut S,
    first: bool,
}

impl<'a, S: Sink + ?Sized> Object<'a, S> {
    /// Opens an object at the end of `out`.
    pub fn new(out: &'a mut S) -> Object<'a, S> {
        out.put_char('{');
        Object { out, first: true }
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.put_char(',');
        }
        self.first = false;
        // Keys are the program's own names: plain ASCII, nothing to escape. Others (a summary
        // relayed from the server) go through the escaper.
        if key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            self.out.put_char('"');
            self.out.put(key);
            self.out.put("\":");
        } else {
            push_str(self.out, key);
            self.out.put_char(':');
        }
    }

    /// The output, to write a member's value directly after `raw(key, "")`.
    pub fn out(&mut self) -> &mut S {
        self.out
    }

    /// A string member.
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        push_str(self.out, value);
        self
    }

    /// An address member, written without `fmt` (the hot path of large reports).
    pub fn ip(&mut self, key: &str, ip: IpAddr) -> &mut Self {
        self.key(key);
        match ip {
            IpAddr::V4(v4) => {
                // `"255.255.255.255"` at most, built on the stack and written at once.
                let mut text = [0u8; 17];
                let mut at = 0;
                text[at] = b'"';
                at += 1;
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        text[at] = b'.';
                        at += 1;
                    }
                    if octet >= 100 {
                        text[at] = b'0' + octet / 100;
                        at += 1;
                    }
                    if octet >= 10 {
                        text[at] = b'0' + octet / 10 % 10;
                        at += 1;
                    }
                    text[at] = b'0' + octet % 10;
                    at += 1;
                }
                text[at] = b'"';
                at += 1;
                // Only ASCII was written.
                self.out
                    .put(std::str::from_utf8(&text[..at]).unwrap_or("null"));
            }
            // IPv6 text has compression rules worth leaving to the standard library.
            IpAddr::V6(v6) => {
                self.out.put_char('"');
                let _ = write!(self.out, "{v6}");
                self.out.put_char('"');
            }
        }
        self
    }

    /// An address member, `null` when absent.
    pub fn opt_ip(&mut self, key: &str, ip: Option<IpAddr>) -> &mut Self {
        match ip {
            Some(ip) => self.ip(key, ip),
            None => self.raw(key, "null"),
        }
    }

    /// A MAC member (`aa:bb:cc:dd:ee:ff`), `null` when absent.
    pub fn opt_mac(&mut self, key: &str, mac: Option<Mac>) -> &mut Self {
        let Some(Mac(octets)) = mac else {
            return self.raw(key, "null");
        };
        self.key(key);
        let mut text = *b"\"00:00:00:00:00:00\"";
        for (i, octet) in octets.into_iter().enumerate() {
            text[1 + i * 3] = HEX[usize::from(octet >> 4)];
            text[2 + i * 3] = HEX[usize::from(octet & 0xf)];
        }
        // Only ASCII was written.
        self.out.put(std::str::from_utf8(&text).unwrap_or("null"));
        self
    }

    /// An unsigned integer member, written without `fmt`.
    pub fn int(&mut self, key: &str, n: u64) -> &mut Self {
        self.key(key);
        push_u64(self.out, n);
        self
    }

    /// An integer member, `null` when absent.
    pub fn opt_int(&mut self, key: &str, n: Option<u64>) -> &mut Self {
        match n {
            Some(n) => self.int(key, n),
            None => self.raw(key, "null"),
        }
    }

    /// A string member, `null` when absent.
    pub fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        match value {
            Some(v) => self.str(key, v),
            None => self.raw(key, "null"),
        }
    }

    /// A member whose value is anything `Display` prints as valid JSON (numbers, booleans).
    pub fn num(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Self {
        self.key(key);
        let _ = write!(self.out, "{value}");
        self
    }

    /// A number member, `null` when absent.
    pub fn opt_num(&mut self, key: &str, value: Option<impl std::fmt::Display>) -> &mut Self {
        match value {
            Some(v) => self.num(key, v),
            None => self.raw(key, "null"),
        }
    }

    /// A member whose value is already valid JSON text.
    pub fn raw(&mut self, key: &str, json: &str) -> &mut Self {
        self.key(key);
        self.out.put(json);
        self
    }

    /// Closes the object.
    pub fn end(self) {
        self.out.put_char('}');
    }
}

/// The member `key` of an object value, if the value is an object that has it.
pub fn get<'v>(value: &'v Value, key: &str) -> Option<&'v Value> {
    match value {
        Value::Object(map) => map.get(key),
        _ => None,
    }
}

/// A string member.
pub fn get_str<'v>(value: &'v Value, key: &str) -> Option<&'v str> {
    match get(value, key)? {
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// An integer member (a float with no fraction counts; anything else is `None`).
pub fn get_i64(value: &Value, key: &str) -> Option<i64> {
    as_i64(get(value, key)?)
}

/// An integer value.
pub fn as_i64(value: &Value) -> Option<i64> {
    match value {
        Value::Number(Number::U64(n)) => i64::try_from(*n).ok(),
        Value::Number(Number::I64(n)) => Some(*n),
        Value::Number(Number::F64(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(*f as i64),
        _ => None,
    }
}

/// A boolean member.
pub fn get_bool(value: &Value, key: &str) -> Option<bool> {
    match get(value, key)? {
        Value::Bool(b) => Some(*b),
        _ => None,
    }
}

/// An array member.
pub fn get_array<'v>(value: &'v Value, key: &str) -> Option<&'v [Value]> {
    match get(value, key)? {
        Value::Array(items) => Some(items),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_escape_quotes_controls_and_line_separators() {
        let mut out = String::new();
        push_str(&mut out, "a\"b\\c\nd\u{1}e\u{2028}é");
        assert_eq!(out, r#""a\"b\\c\nd\u0001e\u2028é""#);
    }

    #[test]
    fn fast_writers_match_the_standard_formatting() {
        let mut out = String::new();
        let mut o = Object::new(&mut out);
        o.ip("a", "192.0.2.255".parse().unwrap())
            .ip("b", "0.0.0.0".parse().unwrap())
            .opt_ip("c", Some("fe80::1".parse().unwrap()))
            .opt_ip("d", None)
            .opt_mac("e", Mac::parse("AE:ED:E2:0E:B9:0C"))
            .opt_mac("f", None)
            .int("g", 0)
            .int("h", u64::MAX)
            .opt_int("i", Some(65_535))
            .opt_int("j", None);
        o.end();
        assert_eq!(
            out,
            r#"{"a":"192.0.2.255","b":"0.0.0.0","c":"fe80::1","d":null,"e":"ae:ed:e2:0e:b9:0c","f":null,"g":0,"h":18446744073709551615,"i":65535,"j":null}"#
        );
    }

    #[test]
    fn length_counts_exactly_what_a_string_receives() {
        for text in ["plain", "quo\"te", "tab\tand\u{1}", "é\u{2028}x", ""] {
            let (mut out, mut len) = (String::new(), Length::default());
            push_str(&mut out, text);
            push_str(&mut len, text);
            assert_eq!(len.0, out.len(), "{text:?}");
        }
        let (mut out, mut len) = (String::new(), Length::default());
        Object::new(&mut out)
            .ip("a", "fe80::1".parse().unwrap())
            .int("b", 12345)
            .num("c", true);
        Object::new(&mut len)
            .ip("a", "fe80::1".parse().unwrap())
            .int("b", 12345)
            .num("c", true);
        assert_eq!(len.0, out.len());
    }

    #[test]
    fn object_builder_writes_compact_json_that_parses_back() {
        let mut out = String::new();
        let mut o = Object::new(&mut out);
        o.str("a", "x")
            .num("n", 5)
            .opt_num("m", None::<u8>)
            .opt_str("s", None)
            .raw("r", "[]");
        o.end();
        assert_eq!(out, r#"{"a":"x","n":5,"m":null,"s":null,"r":[]}"#);
        let v: Value = miniserde::json::from_str(&out).unwrap();
        assert_eq!(get_str(&v, "a"), Some("x"));
        assert_eq!(get_i64(&v, "n"), Some(5));
        assert_eq!(get_i64(&v, "m"), None);
    }
}
