//! A pull reader for JSON text from a byte stream, for files too large to hold as a tree.
//!
//! The caller walks the document (objects, arrays, scalars) and builds its own typed values as
//! it goes; what it does not want is skipped without being stored. Memory stays bounded whatever
//! the input: nesting deeper than [`MAX_DEPTH`] is refused (a run of `[` costs one counter, not a
//! stack), and strings longer than the caller's limit are skipped, not kept.

use std::io::{self, BufRead};

/// Deeper nesting is refused: no file this agent reads nests more than a few levels.
pub const MAX_DEPTH: usize = 64;

/// Why reading stopped.
#[derive(Debug)]
pub enum Fault {
    /// The text is not JSON (or not the shape the caller expects).
    Syntax,
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// The input ended inside the document.
    Eof,
    /// The input could not be read.
    Io(io::Error),
}

/// Result of one reading step.
pub type Step<T> = Result<T, Fault>;

/// A JSON number, as exact as its text allows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Number {
    Unsigned(u64),
    Negative(i64),
    /// A number with a fraction or an exponent, or an integer too large for 64 bits.
    Decimal(Decimal),
}

impl Number {
    /// The number as an integer when it is one (a decimal without fraction counts).
    pub fn as_i64(self) -> Option<i64> {
        match self {
            Number::Unsigned(n) => i64::try_from(n).ok(),
            Number::Negative(n) => Some(n),
            Number::Decimal(d) => d.small_integer(),
        }
    }

    /// The number as an unsigned integer when it is one.
    pub fn as_u64(self) -> Option<u64> {
        match self {
            Number::Unsigned(n) => Some(n),
            Number::Negative(_) => None,
            Number::Decimal(d) => d.small_integer().and_then(|n| u64::try_from(n).ok()),
        }
    }
}

/// Longest number text read; longer is refused as not JSON this agent wrote or reads.
const MAX_NUMBER_TEXT: usize = 40;

/// The text of a JSON number that is not a 64-bit integer, checked against the JSON grammar.
///
/// The agent never computes with such numbers: it copies them (a summary member) or reads
/// them as integers (`1e2`, `100.0`). Keeping the text, not an `f64`, leaves the standard
/// library's decimal-to-float conversion and its tables (about 16 KB) out of the binary.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    text: [u8; MAX_NUMBER_TEXT],
    len: u8,
}

impl std::fmt::Debug for Decimal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Decimal {
    /// Checks `text` against the JSON number grammar
    /// (`-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`).
    pub fn parse(text: &[u8]) -> Option<Decimal> {
        let digits = |at: usize| {
            text[at.min(text.len())..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count()
        };
        let mut at = usize::from(text.first() == Some(&b'-'));
        match (text.get(at), digits(at)) {
            (Some(b'0'), 1) => at += 1,
            (Some(b'1'..=b'9'), n) => at += n,
            _ => return None,
        }
        if text.get(at) == Some(&b'.') {
            let n = digits(at + 1);
            if n == 0 {
                return None;
            }
            at += 1 + n;
        }
        if matches!(text.get(at), Some(b'e' | b'E')) {
            at += 1;
            if matches!(text.get(at), Some(b'+' | b'-')) {
                at += 1;
            }
            let n = digits(at);
            if n == 0 {
                return None;
            }
            at += n;
        }
        if at != text.len() || text.len() > MAX_NUMBER_TEXT {
            return None;
        }
        let mut d = Decimal {
            text: [0; MAX_NUMBER_TEXT],
            len: text.len() as u8,
        };
        d.text[..text.len()].copy_from_slice(text);
        Some(d)
    }

    /// The number's text as read (valid JSON).
    pub fn as_str(&self) -> &str {
        // Only ASCII digits, signs, `.`, `e` and `E` get past `parse`.
        std::str::from_utf8(&self.text[..usize::from(self.len)]).unwrap_or("0")
    }

    /// The exact value when it is a whole number of magnitude below 9e15 (where an `f64`, the
    /// earlier Python agent's numbers, still holds every integer exactly); `None` otherwise.
    pub fn small_integer(&self) -> Option<i64> {
        const LIMIT: u128 = 9_000_000_000_000_000;
        let text = &self.text[..usize::from(self.len)];
        let negative = text.first() == Some(&b'-');
        let (mut mantissa, mut exponent, mut in_fraction) = (0u128, 0i64, false);
        let mut rest = text.iter().skip(usize::from(negative));
        for &b in rest.by_ref() {
            match b {
                b'0'..=b'9' => {
                    // At most 40 digits fit the text, and 10^39 < 2^128, so no overflow here.
                    mantissa = mantissa * 10 + u128::from(b - b'0');
                    exponent -= i64::from(in_fraction);
                }
                b'.' => in_fraction = true,
                _ => break,
            }
        }
        let mut written = 0i64;
        let mut exponent_negative = false;
        for &b in rest {
            match b {
                b'-' => exponent_negative = true,
                b'+' => {}
                // Saturates: any exponent beyond a few digits is out of range either way.
                _ => written = (written * 10 + i64::from(b - b'0')).min(1_000_000),
            }
        }
        exponent += if exponent_negative { -written } else { written };
        if mantissa == 0 {
            return Some(0);
        }
        while mantissa % 10 == 0 {
            mantissa /= 10;
            exponent += 1;
        }
        if !(0..=16).contains(&exponent) {
            return None;
        }
        let value = mantissa.checked_mul(10u128.pow(exponent as u32))?;
        if value >= LIMIT {
            return None;
        }
        let value = value as i64;
        Some(if negative { -value } else { value })
    }
}

/// A value read by [`Reader::scalar`].
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    /// A string longer than the caller's limit (skipped).
    LongString,
    /// An object or an array (skipped).
    Compound,
}

impl Scalar {
    /// The string, if the value is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Scalar::String(s) => Some(s),
            _ => None,
        }
    }
}

/// The reader. `depth` counts the objects and arrays the caller has entered.
///
/// The source is a trait object, not a type parameter: every caller (files, slices, the copy
/// that [`Reader::capture`] makes) then shares one compiled reader instead of one per source
/// type, which kept four copies of it in the release binary. The buffered reads stay in bulk
/// (strings and whitespace are scanned a buffer at a time), so the indirect call is per token.
pub struct Reader<'a> {
    src: Box<dyn BufRead + 'a>,
    depth: usize,
    /// The bytes of the string being read, kept between strings: a saved snapshot has a
    /// dozen strings per record, and a buffer each was most of the reader's allocations.
    scratch: Vec<u8>,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl<'a> Reader<'a> {
    /// Reads from `src` (buffered).
    pub fn new(src: impl BufRead + 'a) -> Reader<'a> {
        Reader {
            src: Box::new(src),
            depth: 0,
            scratch: Vec::new(),
        }
    }

    fn peek(&mut self) -> Step<Option<u8>> {
        loop {
            match self.src.fill_buf() {
                Ok(buf) => return Ok(buf.first().copied()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fault::Io(e)),
            }
        }
    }

    fn bump(&mut self) {
        self.src.consume(1);
    }

    /// The next byte that is not whitespace, left unread; `None` at the end of the input.
    fn peek_token(&mut self) -> Step<Option<u8>> {
        loop {
            let buf = match self.src.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fault::Io(e)),
            };
            if buf.is_empty() {
                return Ok(None);
            }
            let blanks = buf.iter().take_while(|b| is_ws(**b)).count();
            let found = buf.get(blanks).copied();
            self.src.consume(blanks);
            if found.is_some() {
                return Ok(found);
            }
        }
    }

    fn token(&mut self) -> Step<u8> {
        self.peek_token()?.ok_or(Fault::Eof)
    }

    fn expect(&mut self, want: u8) -> Step<()> {
        if self.token()? != want {
            return Err(Fault::Syntax);
        }
        self.bump();
        Ok(())
    }

    fn enter(&mut self, extra: usize) -> Step<()> {
        if self.depth + extra >= MAX_DEPTH {
            return Err(Fault::TooDeep);
        }
        Ok(())
    }

    /// True when the next value is an object (left unread).
    pub fn at_object(&mut self) -> Step<bool> {
        Ok(self.token()? == b'{')
    }

    /// True when the next value is an array (left unread).
    pub fn at_array(&mut self) -> Step<bool> {
        Ok(self.token()? == b'[')
    }

    /// Enters an object (`{`).
    pub fn begin_object(&mut self) -> Step<()> {
        self.enter(0)?;
        self.expect(b'{')?;
        self.depth += 1;
        Ok(())
    }

    /// The next key of the object being read into `key` (cut at `max` bytes), or `false` at
    /// its end. `first` starts true for each object.
    pub fn next_key(&mut self, first: &mut bool, key: &mut String, max: usize) -> Step<bool> {
        if !self.another(b'}', first)? {
            return Ok(false);
        }
        self.expect(b'"')?;
        key.clear();
        if !self.string_body(Some((key, max)))? {
            key.clear();
        }
        self.expect(b':')?;
        Ok(true)
    }

    /// Enters an array (`[`).
    pub fn begin_array(&mut self) -> Step<()> {
        self.enter(0)?;
        self.expect(b'[')?;
        self.depth += 1;
        Ok(())
    }

    /// True when the array being read has another item (then read it), false at its end.
    pub fn next_item(&mut self, first: &mut bool) -> Step<bool> {
        self.another(b']', first)
    }

    /// Between the members of an object or the items of an array: false (and the container
    /// left) at `close`, otherwise true past the comma that must separate all but the first.
    fn another(&mut self, close: u8, first: &mut bool) -> Step<bool> {
        let c = self.token()?;
        if c == close {
            self.bump();
            self.depth -= 1;
            return Ok(false);
        }
        if !*first {
            if c != b',' {
                return Err(Fault::Syntax);
            }
            self.bump();
        }
        *first = false;
        Ok(true)
    }

    /// Reads a scalar; strings longer than `max` bytes and compound values are skipped.
    pub fn scalar(&mut self, max: usize) -> Step<Scalar> {
        match self.token()? {
            b'{' | b'[' => {
                self.skip()?;
                Ok(Scalar::Compound)
            }
            b'"' => {
                self.bump();
                let mut s = String::new();
                Ok(if self.string_body(Some((&mut s, max)))? {
                    Scalar::String(s)
                } else {
                    Scalar::LongString
                })
            }
            b't' => self.literal(b"true").map(|()| Scalar::Bool(true)),
            b'f' => self.literal(b"false").map(|()| Scalar::Bool(false)),
            b'n' => self.literal(b"null").map(|()| Scalar::Null),
            _ => self.number().map(Scalar::Number),
        }
    }

    /// Skips one value of any kind. Nesting is tracked with one bit per level, so memory does
    /// not grow with the input.
    pub fn skip(&mut self) -> Step<()> {
        // Bit n set: level n is an object.
        let mut kinds: u64 = 0;
        let mut levels = 0usize;
        'value: loop {
            match self.token()? {
                c @ (b'{' | b'[') => {
                    self.enter(levels + 1)?;
                    self.bump();
                    let object = c == b'{';
                    if object {
                        kinds |= 1 << levels;
                    } else {
                        kinds &= !(1 << levels);
                    }
                    levels += 1;
                    let close = if object { b'}' } else { b']' };
                    if self.token()? == close {
                        self.bump();
                        levels -= 1;
                    } else {
                        if object {
                            self.skip_key()?;
                        }
                        continue 'value;
                    }
                }
                b'"' => {
                    self.bump();
                    self.string_body(None)?;
                }
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                _ => {
                    self.number()?;
                }
            }
            // After a value: close levels or move to the next member.
            loop {
                if levels == 0 {
                    return Ok(());
                }
                let object = kinds & (1 << (levels - 1)) != 0;
                match (self.token()?, object) {
                    (b',', _) => {
                        self.bump();
                        if object {
                            self.skip_key()?;
                        }
                        continue 'value;
                    }
                    (b'}', true) | (b']', false) => {
                        self.bump();
                        levels -= 1;
                    }
                    _ => return Err(Fault::Syntax),
                }
            }
        }
    }

    fn skip_key(&mut self) -> Step<()> {
        self.expect(b'"')?;
        self.string_body(None)?;
        self.expect(b':')
    }

    /// Copies the next value's text into `out` when it is at most `max` bytes long (after
    /// skipping whitespace between tokens is not attempted: the text is kept as written).
    /// Returns false (and skips the value) when it is longer.
    pub fn capture(&mut self, out: &mut Vec<u8>, max: usize) -> Step<bool> {
        self.token()?;
        let mut tee = Tee {
            src: &mut self.src,
            out,
            max,
            over: false,
        };
        let mut inner = Reader {
            src: Box::new(&mut tee),
            depth: self.depth,
            scratch: Vec::new(),
        };
        inner.skip()?;
        drop(inner);
        Ok(!tee.over)
    }

    /// Checks that nothing but whitespace follows the document.
    pub fn end(&mut self) -> Step<()> {
        match self.peek_token()? {
            None => Ok(()),
            Some(_) => Err(Fault::Syntax),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Step<()> {
        for &want in word {
            match self.peek()? {
                Some(b) if b == want => self.bump(),
                Some(_) => return Err(Fault::Syntax),
                None => return Err(Fault::Eof),
            }
        }
        Ok(())
    }

    fn number(&mut self) -> Step<Number> {
        let mut text = [0u8; MAX_NUMBER_TEXT];
        let mut len = 0;
        while let Some(b) = self.peek()? {
            if !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                break;
            }
            if len == text.len() {
                return Err(Fault::Syntax);
            }
            text[len] = b;
            len += 1;
            self.bump();
        }
        let text = &text[..len];
        if !(text.first() == Some(&b'-') || text.first().is_some_and(u8::is_ascii_digit)) {
            return Err(Fault::Syntax);
        }
        // Integers are read as leniently as ever (`01` is 1); only other numbers must be in
        // the JSON grammar, because their text is copied into files this agent writes.
        let integer = std::str::from_utf8(text).map_err(|_| Fault::Syntax)?;
        if let Ok(n) = integer.parse::<u64>() {
            return Ok(Number::Unsigned(n));
        }
        if let Ok(n) = integer.parse::<i64>() {
            return Ok(Number::Negative(n));
        }
        Decimal::parse(text)
            .map(Number::Decimal)
            .ok_or(Fault::Syntax)
    }

    /// Reads a string after its opening quote. With `into`, the text is appended there while it
    /// stays within its limit; returns false when it did not (the rest is skipped).
    fn string_body(&mut self, into: Option<(&mut String, usize)>) -> Step<bool> {
        let mut bytes = std::mem::take(&mut self.scratch);
        bytes.clear();
        let result = self.string_bytes(&mut bytes, into);
        self.scratch = bytes;
        result
    }

    fn string_bytes(
        &mut self,
        bytes: &mut Vec<u8>,
        mut into: Option<(&mut String, usize)>,
    ) -> Step<bool> {
        let keep = into.is_some();
        let max = into.as_ref().map_or(0, |(_, m)| *m);
        let mut fits = true;
        loop {
            let buf = match self.src.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fault::Io(e)),
            };
            if buf.is_empty() {
                return Err(Fault::Eof);
            }
            let run = buf
                .iter()
                .take_while(|b| **b != b'"' && **b != b'\\' && **b >= 0x20)
                .count();
            if keep && fits {
                if bytes.len() + run > max {
                    fits = false;
                } else {
                    bytes.extend_from_slice(&buf[..run]);
                }
            }
            let stop = buf.get(run).copied();
            self.src.consume(run);
            match stop {
                None => continue,
                Some(b'"') => {
                    self.bump();
                    break;
                }
                Some(b'\\') => {
                    self.bump();
                    let mut utf8 = [0u8; 4];
                    let c = self.escape()?;
                    let encoded = c.encode_utf8(&mut utf8).as_bytes();
                    if keep && fits {
                        if bytes.len() + encoded.len() > max {
                            fits = false;
                        } else {
                            bytes.extend_from_slice(encoded);
                        }
                    }
                }
                // A raw control character is not allowed inside a JSON string.
                Some(_) => return Err(Fault::Syntax),
            }
        }
        let Some((out, _)) = into.as_mut() else {
            return Ok(true);
        };
        if !fits {
            return Ok(false);
        }
        let text = std::str::from_utf8(bytes).map_err(|_| Fault::Syntax)?;
        out.push_str(text);
        Ok(true)
    }

    fn escape(&mut self) -> Step<char> {
        let c = self.peek()?.ok_or(Fault::Eof)?;
        self.bump();
        Ok(match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = self.hex4()?;
                if (0xD800..0xDC00).contains(&hi) {
                    self.literal(b"\\u")?;
                    let lo = self.hex4()?;
                    if !(0xDC00..0xE000).contains(&lo) {
                        return Err(Fault::Syntax);
                    }
                    let code = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                    char::from_u32(code).ok_or(Fault::Syntax)?
                } else {
                    char::from_u32(hi).ok_or(Fault::Syntax)?
                }
            }
            _ => return Err(Fault::Syntax),
        })
    }

    fn hex4(&mut self) -> Step<u32> {
        let mut n = 0;
        for _ in 0..4 {
            let b = self.peek()?.ok_or(Fault::Eof)?;
            self.bump();
            let digit = (b as char).to_digit(16).ok_or(Fault::Syntax)?;
            n = n * 16 + digit;
        }
        Ok(n)
    }
}

/// Passes bytes through while keeping a copy of them, up to a limit.
struct Tee<'a, R> {
    src: &'a mut R,
    out: &'a mut Vec<u8>,
    max: usize,
    over: bool,
}

impl<R: BufRead> io::Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Tee<'_, R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.src.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        if !self.over {
            if let Ok(buf) = self.src.fill_buf() {
                if self.out.len() + n > self.max {
                    self.over = true;
                    self.out.clear();
                } else {
                    self.out.extend_from_slice(&buf[..n.min(buf.len())]);
                }
            }
        }
        self.src.consume(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(text: &str) -> Reader<'_> {
        Reader::new(text.as_bytes())
    }

    #[test]
    fn scalars_read_with_their_exact_values() {
        let mut r = reader(
            r#"[18446744073709551615, -3, 2.5, 1e2, "a\"\u00e9\ud83d\ude00", true, null, {"x":[1]}]"#,
        );
        r.begin_array().unwrap();
        let mut first = true;
        let mut got = Vec::new();
        while r.next_item(&mut first).unwrap() {
            got.push(r.scalar(64).unwrap());
        }
        r.end().unwrap();
        assert_eq!(
            got,
            [
                Scalar::Number(Number::Unsigned(u64::MAX)),
                Scalar::Number(Number::Negative(-3)),
                Scalar::Number(Number::Decimal(Decimal::parse(b"2.5").unwrap())),
                Scalar::Number(Number::Decimal(Decimal::parse(b"1e2").unwrap())),
                Scalar::String("a\"é😀".into()),
                Scalar::Bool(true),
                Scalar::Null,
                Scalar::Compound,
            ]
        );
    }

    #[test]
    fn decimals_count_as_integers_only_when_whole_and_below_9e15() {
        let read = |text: &str| -> Vec<(Option<i64>, Option<u64>)> {
            let mut r = reader(text);
            r.begin_array().unwrap();
            let (mut first, mut got) = (true, Vec::new());
            while r.next_item(&mut first).unwrap() {
                let Scalar::Number(n) = r.scalar(0).unwrap() else {
                    panic!("not a number in {text}");
                };
                got.push((n.as_i64(), n.as_u64()));
            }
            got
        };
        assert_eq!(
            read("[100.0, 1e2, 1.5e1, 0.1e1, -2.50e1, 0.0, -0.0, 0e5, 12.5, 1e-2, 8999999999999999.0, 9e15, 1e16, 1e400, 1e-400]"),
            [
                (Some(100), Some(100)),
                (Some(100), Some(100)),
                (Some(15), Some(15)),
                (Some(1), Some(1)),
                (Some(-25), None),
                (Some(0), Some(0)),
                (Some(0), Some(0)),
                (Some(0), Some(0)),
                (None, None),
                (None, None),
                (Some(8_999_999_999_999_999), Some(8_999_999_999_999_999)),
                (None, None),
                (None, None),
                (None, None),
                (None, None),
            ]
        );
    }

    #[test]
    fn decimals_keep_their_text_and_follow_the_json_grammar() {
        let text = |n: &str| match reader(n).scalar(0) {
            Ok(Scalar::Number(Number::Decimal(d))) => Ok(d.as_str().to_string()),
            Ok(other) => Ok(format!("{other:?}")),
            Err(e) => Err(format!("{e:?}")),
        };
        let got: Vec<_> = [
            "2.50", "-1E+2", "1e400", "01", "1.", "01.5", "-.5", "1e", "1.5.5", "--1",
        ]
        .iter()
        .map(|n| text(n))
        .collect();
        assert_eq!(
            got,
            [
                Ok("2.50".to_string()),
                Ok("-1E+2".to_string()),
                Ok("1e400".to_string()),
                Ok("Number(Unsigned(1))".to_string()),
                Err("Syntax".to_string()),
                Err("Syntax".to_string()),
                Err("Syntax".to_string()),
                Err("Syntax".to_string()),
                Err("Syntax".to_string()),
                Err("Syntax".to_string()),
            ]
        );
    }

    #[test]
    fn long_strings_are_skipped_not_kept() {
        let text = format!(r#"["{}", "ok"]"#, "x".repeat(100_000));
        let mut r = reader(&text);
        r.begin_array().unwrap();
        let mut first = true;
        assert!(r.next_item(&mut first).unwrap());
        assert_eq!(r.scalar(255).unwrap(), Scalar::LongString);
        assert!(r.next_item(&mut first).unwrap());
        assert_eq!(r.scalar(255).unwrap(), Scalar::String("ok".into()));
        assert!(!r.next_item(&mut first).unwrap());
    }

    #[test]
    fn a_megabyte_of_brackets_is_refused_at_the_depth_limit() {
        let text = "[".repeat(1 << 20);
        assert!(matches!(reader(&text).skip(), Err(Fault::TooDeep)));
        let mut r = reader(&text);
        assert!(matches!(r.scalar(10), Err(Fault::TooDeep)));
        // Just under the limit is fine.
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH - 1), "]".repeat(MAX_DEPTH - 1));
        reader(&ok).skip().unwrap();
    }

    #[test]
    fn malformed_text_is_a_syntax_error_and_truncated_text_an_eof() {
        for bad in [
            "[1 2]",
            "{\"a\" 1}",
            "{\"a\":1,}",
            "[1,]",
            "{1:2}",
            "[tru]",
            "[\"\u{1}\"]",
            "[\"\\x\"]",
            "[}",
            "[01x]",
        ] {
            assert!(matches!(reader(bad).skip(), Err(Fault::Syntax)), "{bad:?}");
        }
        for cut in ["[1,", "{\"a\":", "\"abc", "[{\"a\":[1,2]"] {
            assert!(matches!(reader(cut).skip(), Err(Fault::Eof)), "{cut:?}");
        }
    }

    #[test]
    fn capture_keeps_the_text_of_small_values_only() {
        let mut r = reader(r#"{"p": {"a": [1, 2]}, "q": [3, 4, 5]}"#);
        r.begin_object().unwrap();
        let (mut first, mut key) = (true, String::new());
        let mut out = Vec::new();
        assert!(r.next_key(&mut first, &mut key, 64).unwrap());
        assert!(r.capture(&mut out, 64).unwrap());
        assert_eq!(out, br#"{"a": [1, 2]}"#);
        assert!(r.next_key(&mut first, &mut key, 64).unwrap());
        out.clear();
        assert!(!r.capture(&mut out, 4).unwrap());
        assert!(!r.next_key(&mut first, &mut key, 64).unwrap());
        r.end().unwrap();
    }
}
