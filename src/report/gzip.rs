//! gzip framing (RFC 1952) around `miniz_oxide`'s raw deflate.
//!
//! The server accepts only `Content-Encoding: gzip`: a zlib stream labelled gzip, a bad CRC or
//! trailing bytes are refused (400), so the header and trailer are written here exactly.

/// Compresses `data` into one gzip member: fixed header (no name, mtime 0, OS unix), deflate,
/// CRC-32 and the length modulo 2^32, both little-endian.
pub fn compress(data: &[u8]) -> Vec<u8> {
    // Level 1: report JSON is repetitive enough that the fastest level is within a few percent
    // of level 6's size (3.2 MB of connections: 129 kB against 120 kB) at a third of the CPU,
    // and a part's compressed size is far below the server's raw limit either way.
    let deflated = miniz_oxide::deflate::compress_to_vec(data, 1);
    let mut out = Vec::with_capacity(deflated.len() + 18);
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3]);
    out.extend_from_slice(&deflated);
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut c = n as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[n] = c;
        n += 1;
    }
    table
};

/// CRC-32 (IEEE 802.3, reflected), as gzip's trailer needs.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
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
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn output_decodes_with_an_independent_gzip_decoder() {
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
            let gz = compress(&data);
            assert_eq!(&gz[..3], &[0x1f, 0x8b, 8]);
            assert_eq!(gunzip_independently(&gz), data, "len {len}");
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
            .write_all(&compress(b"{\"a\":1}"))
            .unwrap();
        assert!(child.wait().unwrap().success());
    }
}
