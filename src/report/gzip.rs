//! gzip framing (RFC 1952) around `miniz_oxide`'s raw deflate.
//!
//! The server accepts only `Content-Encoding: gzip`: a zlib stream labelled gzip, a bad CRC or
//! trailing bytes are refused (400), so the header and trailer are written here exactly.

use miniz_oxide::deflate::core::{
    compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush, TDEFLStatus,
};

/// Level 1: report JSON is repetitive enough that the fastest level is within a few percent of
/// level 6's size (3.2 MB of connections: 129 kB against 120 kB) at a third of the CPU, and a
/// part's compressed size is far below the server's raw limit either way.
const LEVEL: i32 = 1;

/// Compresses the parts of one report, one gzip member each. Made once per run: the deflate
/// state (a few hundred KiB of tables), the CRC tables and the output buffer serve every part,
/// instead of being allocated, zeroed and unmapped again for each.
pub struct Gzip {
    deflate: Box<CompressorOxide>,
    crc: Box<[[u32; 256]; 8]>,
    out: Vec<u8>,
}

impl Default for Gzip {
    fn default() -> Gzip {
        Gzip::new()
    }
}

impl Gzip {
    /// A compressor at the report's level, raw deflate (the gzip frame is written here).
    pub fn new() -> Gzip {
        let flags = create_comp_flags_from_zip_params(LEVEL, 0, 0);
        Gzip {
            deflate: Box::new(CompressorOxide::new(flags)),
            crc: crc_tables(),
            out: Vec::new(),
        }
    }

    /// `data` as one gzip member: fixed header (no name, mtime 0, OS unix), deflate, CRC-32 and
    /// the length modulo 2^32, both little-endian. The bytes stay valid until the next call.
    pub fn compress(&mut self, data: &[u8]) -> &[u8] {
        self.deflate.reset();
        self.out.clear();
        self.out
            .extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3]);
        // Report JSON deflates to a tenth or less; the buffer grows when it does not.
        let mut at = self.out.len();
        self.out.resize(at + data.len() / 4 + 64, 0);
        let mut input = data;
        loop {
            let (status, read, written) = compress(
                &mut self.deflate,
                input,
                &mut self.out[at..],
                TDEFLFlush::Finish,
            );
            at += written;
            input = input.get(read..).unwrap_or_default();
            match status {
                TDEFLStatus::Okay => {
                    let grown = self.out.len() * 2;
                    self.out.resize(grown, 0);
                }
                // Done; the other statuses (bad parameters, a failed callback) cannot come
                // from a buffer compressor whose parameters are fixed above.
                _ => break,
            }
        }
        self.out.truncate(at);
        let crc = crc32(&self.crc, data);
        self.out.extend_from_slice(&crc.to_le_bytes());
        self.out
            .extend_from_slice(&(data.len() as u32).to_le_bytes());
        &self.out
    }
}

/// The CRC-32 tables of the slicing-by-8 method: eight bytes per step instead of one (the
/// byte-at-a-time loop cost more CPU than the deflate itself at level 1). Built at run time:
/// 8 KiB in the heap, not in the binary.
fn crc_tables() -> Box<[[u32; 256]; 8]> {
    let mut t = Box::new([[0u32; 256]; 8]);
    for n in 0..256 {
        let mut c = n as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        t[0][n] = c;
    }
    for n in 0..256 {
        for k in 1..8 {
            let prev = t[k - 1][n];
            t[k][n] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
        }
    }
    t
}

/// CRC-32 (IEEE 802.3, reflected), as gzip's trailer needs.
fn crc32(t: &[[u32; 256]; 8], data: &[u8]) -> u32 {
    let mut c = !0u32;
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let lo = c ^ u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        let hi = u32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]);
        c = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = t[0][((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gunzip_independently(bytes: &[u8]) -> Vec<u8> {
        // flate2's GzDecoder checks the header, the CRC and the size itself.
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn crc_matches_the_standard_check_value() {
        let t = crc_tables();
        assert_eq!(crc32(&t, b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(&t, b""), 0);
        // Every length around the eight-byte steps: the same as flate2's CRC of it.
        let data: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(37)).collect();
        for len in 0..=data.len() {
            let mut expected = flate2::Crc::new();
            expected.update(&data[..len]);
            assert_eq!(crc32(&t, &data[..len]), expected.sum(), "len {len}");
        }
    }

    #[test]
    fn output_decodes_with_an_independent_gzip_decoder() {
        // One compressor for every input, as one report's parts share one.
        let mut gzip = Gzip::new();
        let mut state = 0x1234_5678u32;
        for len in [0usize, 1, 100, 65_537, 300_000] {
            let data: Vec<u8> = (0..len)
                .map(|i| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    if i % 3 == 0 {
                        (state & 0xff) as u8
                    } else {
                        b'a' + (i % 7) as u8
                    }
                })
                .collect();
            let gz = gzip.compress(&data);
            assert_eq!(&gz[..3], &[0x1f, 0x8b, 8]);
            assert_eq!(gunzip_independently(gz), data, "len {len}");
            let trailer = &gz[gz.len() - 8..];
            assert_eq!(
                u32::from_le_bytes(trailer[4..].try_into().unwrap()),
                len as u32
            );
        }
    }

    #[test]
    fn the_system_gzip_tool_accepts_it() {
        let Ok(mut child) = std::process::Command::new("gzip")
            .args(["-t", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
        else {
            panic!("gzip(1) is part of every Debian base system and is needed by this test");
        };
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(Gzip::new().compress(b"{\"a\":1}"))
            .unwrap();
        assert!(child.wait().unwrap().success());
    }
}
