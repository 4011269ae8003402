//! Just enough HTTP/1.1 for one request per connection: request line, headers, a
//! `Content-Length` or `Transfer-Encoding: chunked` body, and a response with `Connection: close`.
//!
//! Every read and write gives up when the server is stopping or the peer stalls past a deadline,
//! so no connection thread can outlive the server.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Longest request head (request line plus headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// How long a peer may stall a read or a write before the connection is dropped.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);
/// Socket timeout between checks of the stop flag.
pub const POLL: Duration = Duration::from_millis(50);

/// A parsed request.
#[derive(Clone, Debug)]
pub struct Request {
    /// `POST`, `GET`, ...
    pub method: String,
    /// The request target as sent, query included.
    pub target: String,
    /// Header names and values in arrival order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body after removing any chunked framing (not decoded otherwise).
    pub body: Vec<u8>,
    /// True when the body came with `Transfer-Encoding: chunked`.
    pub chunked: bool,
}

impl Request {
    /// First value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The target without its query string.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }
}

/// First value of a header in a list, by case-insensitive name.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Why no request could be read.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed (or the server stopped) before sending a request line.
    Closed,
    /// Not HTTP as a server would accept it; answered with 400.
    Malformed(String),
    /// A body larger than the server is willing to read; answered with 413.
    TooLarge,
    /// The connection failed or stalled mid-request.
    Io,
}

/// Buffered reads from a connection that honour the stop flag and the stall limit.
pub struct Conn<'a> {
    stream: &'a TcpStream,
    stop: &'a AtomicBool,
    buf: Vec<u8>,
    pos: usize,
}

impl<'a> Conn<'a> {
    /// Wraps a stream; its read and write timeouts are set to [`POLL`].
    pub fn new(stream: &'a TcpStream, stop: &'a AtomicBool) -> Conn<'a> {
        let _ = stream.set_read_timeout(Some(POLL));
        let _ = stream.set_write_timeout(Some(POLL));
        Conn {
            stream,
            stop,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// Reads more bytes into the buffer; `Ok(0)` at end of stream.
    fn fill(&mut self) -> Result<usize, ReadError> {
        let deadline = Instant::now() + STALL_LIMIT;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Err(ReadError::Io);
            }
            match (&*self.stream).read(&mut chunk) {
                Ok(n) => {
                    if self.pos > 0 && self.pos == self.buf.len() {
                        self.buf.clear();
                        self.pos = 0;
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if is_timeout(&e) && Instant::now() < deadline => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(ReadError::Io),
            }
        }
    }

    /// One line without its line ending (CRLF, or a bare LF as lenient servers accept).
    fn line(&mut self, max: usize) -> Result<Vec<u8>, ReadError> {
        loop {
            if let Some(nl) = self.buf[self.pos..].iter().position(|b| *b == b'\n') {
                let mut line = self.buf[self.pos..self.pos + nl].to_vec();
                self.pos += nl + 1;
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buf.len() - self.pos > max {
                return Err(ReadError::Malformed("line too long".into()));
            }
            if self.fill()? == 0 {
                return Err(ReadError::Io);
            }
        }
    }

    /// Exactly `n` bytes.
    fn take(&mut self, n: usize) -> Result<Vec<u8>, ReadError> {
        while self.buf.len() - self.pos < n {
            if self.fill()? == 0 {
                return Err(ReadError::Io);
            }
        }
        let out = self.buf[self.pos..self.pos + n].to_vec();
        self.pos += n;
        Ok(out)
    }

    /// Reads the request line and headers. Blank lines before the request line are skipped
    /// (RFC 9112 §2.2); obsolete header folding is refused as most servers do.
    pub fn read_head(&mut self) -> Result<Request, ReadError> {
        let request_line = loop {
            if self.pos == self.buf.len() && self.fill()? == 0 {
                return Err(ReadError::Closed);
            }
            let line = self.line(MAX_HEAD)?;
            if !line.is_empty() {
                break line;
            }
        };
        let request_line = String::from_utf8(request_line)
            .map_err(|_| ReadError::Malformed("request line is not UTF-8".into()))?;
        let mut parts = request_line.split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ReadError::Malformed(format!(
                "bad request line {request_line:?}"
            )));
        };
        if method.is_empty() || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
            return Err(ReadError::Malformed(format!(
                "bad request line {request_line:?}"
            )));
        }
        let mut headers = Vec::new();
        let mut head_len = request_line.len();
        loop {
            let line = self.line(MAX_HEAD)?;
            head_len += line.len() + 2;
            if head_len > MAX_HEAD {
                return Err(ReadError::Malformed("request head too large".into()));
            }
            if line.is_empty() {
                break;
            }
            if matches!(line.first(), Some(b' ' | b'\t')) {
                return Err(ReadError::Malformed("obsolete header folding".into()));
            }
            let line = String::from_utf8(line)
                .map_err(|_| ReadError::Malformed("header is not UTF-8".into()))?;
            let Some((name, value)) = line.split_once(':') else {
                return Err(ReadError::Malformed(format!(
                    "header without colon {line:?}"
                )));
            };
            if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
                return Err(ReadError::Malformed(format!("bad header name {name:?}")));
            }
            headers.push((name.to_string(), value.trim().to_string()));
        }
        Ok(Request {
            method: method.to_string(),
            target: target.to_string(),
            headers,
            body: Vec::new(),
            chunked: false,
        })
    }

    /// Reads the body that the head announces into `request.body`, refusing more than `max`.
    pub fn read_body(&mut self, request: &mut Request, max: usize) -> Result<(), ReadError> {
        if let Some(te) = request.header("transfer-encoding") {
            // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3); only chunked is
            // understood, as by uvicorn.
            let last = te.rsplit(',').next().unwrap_or_default().trim();
            if !last.eq_ignore_ascii_case("chunked") {
                return Err(ReadError::Malformed(format!(
                    "unsupported transfer-encoding {te:?}"
                )));
            }
            request.chunked = true;
            request.body = self.read_chunked(max)?;
            return Ok(());
        }
        let mut length: Option<usize> = None;
        for (name, value) in &request.headers {
            if !name.eq_ignore_ascii_case("content-length") {
                continue;
            }
            let parsed = value
                .parse::<usize>()
                .ok()
                .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| ReadError::Malformed(format!("bad content-length {value:?}")))?;
            if length.is_some_and(|l| l != parsed) {
                return Err(ReadError::Malformed("conflicting content-length".into()));
            }
            length = Some(parsed);
        }
        let length = length.unwrap_or(0);
        if length > max {
            return Err(ReadError::TooLarge);
        }
        request.body = self.take(length)?;
        Ok(())
    }

    fn read_chunked(&mut self, max: usize) -> Result<Vec<u8>, ReadError> {
        let mut body = Vec::new();
        loop {
            let line = self.line(4096)?;
            let line = String::from_utf8_lossy(&line);
            let size_text = line.split(';').next().unwrap_or_default().trim();
            if size_text.is_empty()
                || size_text.len() > 15
                || !size_text.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(ReadError::Malformed(format!("bad chunk size {line:?}")));
            }
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| ReadError::Malformed(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailer fields, ignored, up to the empty line.
                while !self.line(MAX_HEAD)?.is_empty() {}
                return Ok(body);
            }
            if body.len() + size > max {
                return Err(ReadError::TooLarge);
            }
            body.extend(self.take(size)?);
            if !self.line(2)?.is_empty() {
                return Err(ReadError::Malformed("chunk not followed by CRLF".into()));
            }
        }
    }

    /// Writes all of `bytes`, retrying on timeouts until the stop flag or the stall limit.
    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        write_all(self.stream, self.stop, bytes)
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Writes all of `bytes` to a stream whose write timeout is short, giving up when the server
/// stops or the peer has not taken a byte for [`STALL_LIMIT`].
pub fn write_all(stream: &TcpStream, stop: &AtomicBool, mut bytes: &[u8]) -> io::Result<()> {
    let mut deadline = Instant::now() + STALL_LIMIT;
    while !bytes.is_empty() {
        if stop.load(Ordering::SeqCst) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        match (&*stream).write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                bytes = &bytes[n..];
                deadline = Instant::now() + STALL_LIMIT;
            }
            Err(e) if is_timeout(&e) && Instant::now() < deadline => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The reason phrase uvicorn (Python's `http.HTTPStatus`) sends for a status.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Request Entity Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// A response head with `Connection: close` and the given body length.
pub fn head(status: u16, content_type: &str, content_length: usize) -> String {
    format!(
        "HTTP/1.1 {status} {}\r\nserver: uvicorn\r\ncontent-type: {content_type}\r\n\
         content-length: {content_length}\r\nconnection: close\r\n\r\n",
        reason(status),
    )
}
