//! Small helpers over `miniserde::json::Value`, which has no `PartialEq` and no path access.

use miniserde::json::{self, Array, Number, Object, Value};

/// Parses JSON text; panics with the text when it is not JSON (test fixtures only).
pub fn parse(text: &str) -> Value {
    json::from_str(text).unwrap_or_else(|_| panic!("not JSON: {text:.200}"))
}

/// Serialises a value (compact, keys sorted because `Object` is a `BTreeMap`).
pub fn to_string(value: &Value) -> String {
    json::to_string(value)
}

/// The canonical form of JSON text: parsed and re-serialised, so two documents that differ only
/// in whitespace or key order compare equal as strings.
pub fn canonical(text: &str) -> String {
    to_string(&parse(text))
}

/// The value at a dotted path such as `checkin.sequence_number` or `connections.3.local_ip`
/// (array elements by index).
pub fn get<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    let mut at = value;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        at = match at {
            Value::Object(obj) => obj.get(part)?,
            Value::Array(arr) => arr.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(at)
}

/// Mutable access to the value at a dotted path (see [`get`]).
pub fn get_mut<'a>(value: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    let mut at = value;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        at = match at {
            Value::Object(obj) => obj.get_mut(part)?,
            Value::Array(arr) => arr.get_mut(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(at)
}

/// Replaces the value at a dotted path; panics when the path does not exist.
pub fn set(value: &mut Value, path: &str, new: Value) {
    *get_mut(value, path).unwrap_or_else(|| panic!("no JSON path {path}")) = new;
}

/// The string at a dotted path, if it is a string.
pub fn str_at<'a>(value: &'a Value, path: &str) -> Option<&'a str> {
    match get(value, path)? {
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// The non-negative integer at a dotted path, if it is one.
pub fn u64_at(value: &Value, path: &str) -> Option<u64> {
    match get(value, path)? {
        Value::Number(Number::U64(n)) => Some(*n),
        Value::Number(Number::I64(n)) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// The boolean at a dotted path, if it is one.
pub fn bool_at(value: &Value, path: &str) -> Option<bool> {
    match get(value, path)? {
        Value::Bool(b) => Some(*b),
        _ => None,
    }
}

/// True when the path exists and holds `null`.
pub fn is_null(value: &Value, path: &str) -> bool {
    matches!(get(value, path), Some(Value::Null))
}

/// The length of the array at a dotted path, if it is an array.
pub fn len_at(value: &Value, path: &str) -> Option<usize> {
    match get(value, path)? {
        Value::Array(a) => Some(a.len()),
        _ => None,
    }
}

/// A JSON string value.
pub fn string(text: &str) -> Value {
    Value::String(text.to_string())
}

/// A JSON string value, or `null`.
pub fn opt_string(text: Option<&str>) -> Value {
    text.map_or(Value::Null, string)
}

/// A JSON non-negative integer value.
pub fn uint(n: u64) -> Value {
    Value::Number(Number::U64(n))
}

/// A JSON object from key/value pairs.
pub fn object<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    let mut obj = Object::new();
    for (k, v) in pairs {
        obj.insert(k.to_string(), v);
    }
    Value::Object(obj)
}

/// A JSON array of strings.
pub fn strings<I: IntoIterator<Item = S>, S: AsRef<str>>(items: I) -> Value {
    let mut arr = Array::new();
    for item in items {
        arr.push(string(item.as_ref()));
    }
    Value::Array(arr)
}
