//! Compact JSON output and small helpers for reading `miniserde` values.
//!
//! Output is written by hand: field order is fixed, nothing is allocated per field, and the
//! same record always produces the same bytes, which the delta and the size budget rely on.

use miniserde::json::{Number, Value};

/// Appends `text` as a JSON string literal. Runs of characters that need no escape are copied
/// whole: this is the hot path of rendering 100,000 records.
pub fn push_str(out: &mut String, text: &str) {
    out.push('"');
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
        out.push_str(&text[start..at]);
        if escaped.is_empty() {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push_str(escaped);
        }
        start = at + c.len_utf8();
    }
    out.push_str(&text[start..]);
    out.push('"');
}

/// Builds one JSON object, managing the commas.
pub struct Object<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> Object<'a> {
    /// Opens an object at the end of `out`.
    pub fn new(out: &'a mut String) -> Object<'a> {
        out.push('{');
        Object { out, first: true }
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        push_str(self.out, key);
        self.out.push(':');
    }

    /// A string member.
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        push_str(self.out, value);
        self
    }

    /// A string member written from its `Display` form, without an intermediate `String`. Only
    /// for values whose text needs no escaping (addresses, MACs).
    pub fn plain(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Self {
        self.key(key);
        use std::fmt::Write;
        let _ = write!(self.out, "\"{value}\"");
        self
    }

    /// A `plain` member, `null` when absent.
    pub fn opt_plain(&mut self, key: &str, value: Option<impl std::fmt::Display>) -> &mut Self {
        match value {
            Some(v) => self.plain(key, v),
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
        use std::fmt::Write;
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
        self.out.push_str(json);
        self
    }

    /// Closes the object.
    pub fn end(self) {
        self.out.push('}');
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
