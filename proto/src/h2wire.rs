//! The parts of HTTP/2 (RFC 9113) and HPACK (RFC 7541) that the plugin's blocking client
//! (`cni-plugin/src/h2.rs`) needs for one unary gRPC call: frame and setting constants, frame
//! encoding and parsing, HPACK integer/string/literal encoding, and an HPACK decoder (static and
//! dynamic table, Huffman) for the daemon's replies. No I/O and no dependencies. The daemon's side
//! of the socket is tonic's server (hyper + h2); the integration tests also write raw frames with
//! these functions.
//!
//! Written by hand, not taken from the `h2` crate: `h2` is an async stack that needs a runtime,
//! and the plugin is a process per pod event whose cost is mostly start-up (see the README's
//! "Why our own …" section). Everything that parses input is bounds-checked and never panics.

#![allow(missing_docs)]

use std::collections::VecDeque;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY: u8 = 0x20;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// The spec's initial flow-control window and frame size.
pub const DEFAULT_WINDOW: i64 = 65_535;
pub const DEFAULT_MAX_FRAME: usize = 16_384;
/// The largest decoded header list accepted (RFC 7541 size: name + value + 32 per field).
pub const MAX_HEADER_LIST: usize = 256 << 10;
/// Our (default) HPACK decoder table size: what the peer's encoder may use.
pub const HPACK_TABLE: usize = 4096;

pub fn frame_header(out: &mut Vec<u8>, len: usize, ty: u8, flags: u8, stream: u32) {
    let len = u32::try_from(len).unwrap_or(u32::MAX).min(0x00ff_ffff);
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(ty);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
}

pub fn frame(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
    frame_header(out, payload.len(), ty, flags, stream);
    out.extend_from_slice(payload);
}

// ---------------------------------------------------------------------------------------------
// HPACK (RFC 7541)

/// An HPACK integer with an `n`-bit prefix; `first` holds the bits above the prefix.
pub fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

pub fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// "Literal header field without indexing" with a static-table name (`idx`) or a new name.
pub fn hpack_literal(out: &mut Vec<u8>, idx: usize, name: &str, value: &str) {
    hpack_int(out, 0, 4, idx);
    if idx == 0 {
        hpack_str(out, name.as_bytes());
    }
    hpack_str(out, value.as_bytes());
}

pub const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Code lengths of the HPACK Huffman code for symbols 0..=255 (EOS, 256, is 30 bits). The code is
/// canonical (RFC 7541 Appendix B assigns codes in order of length, then symbol), so the lengths
/// define it; a unit test checks samples of the RFC's table.
const HUFFMAN_LENGTHS: [u8; 256] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
];
const EOS: u16 = 256;
const EOS_LEN: usize = 30;

fn huffman_len(sym: u16) -> usize {
    if sym == EOS {
        EOS_LEN
    } else {
        usize::from(HUFFMAN_LENGTHS.get(usize::from(sym)).copied().unwrap_or(30))
    }
}

type HuffmanTables = ([u16; 257], [u16; EOS_LEN + 1]);

/// The canonical decoding tables, built once (not per string: 6,000 empty strings in one header
/// block must not cost 6,000 table builds).
fn huffman_tables() -> &'static HuffmanTables {
    static T: std::sync::OnceLock<HuffmanTables> = std::sync::OnceLock::new();
    T.get_or_init(build_huffman_tables)
}

/// Symbols ordered by (length, symbol), and per length the count.
fn build_huffman_tables() -> HuffmanTables {
    let mut syms = [0u16; 257];
    for (i, s) in syms.iter_mut().enumerate() {
        *s = i as u16;
    }
    syms.sort_by_key(|s| (huffman_len(*s), *s));
    let mut counts = [0u16; EOS_LEN + 1];
    for s in 0..=EOS {
        if let Some(c) = counts.get_mut(huffman_len(s)) {
            *c += 1;
        }
    }
    (syms, counts)
}

/// Decodes a Huffman-coded string. Padding must be at most 7 one-bits (the EOS prefix).
pub fn huffman_decode(input: &[u8]) -> Result<Vec<u8>, String> {
    let (syms, counts) = huffman_tables();
    if input.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(input.len() * 8 / 5);
    // Canonical decoding: `code` holds the bits read for the current symbol, `first` the first
    // code of the current length, `index` the position of that length's first symbol.
    let (mut code, mut first, mut index, mut len) = (0u32, 0u32, 0u32, 0usize);
    let mut ones = true;
    for byte in input {
        for bit in (0..8).rev() {
            let b = u32::from((byte >> bit) & 1);
            code |= b;
            ones &= b == 1;
            len += 1;
            let count = u32::from(counts.get(len).copied().unwrap_or(0));
            if code.wrapping_sub(first) < count && code >= first {
                let pos = (index + code - first) as usize;
                let sym = syms.get(pos).copied().ok_or("huffman: bad code")?;
                if sym == EOS {
                    return Err("huffman: EOS in a string".into());
                }
                out.push(sym as u8);
                (code, first, index, len) = (0, 0, 0, 0);
                ones = true;
                continue;
            }
            if len >= EOS_LEN {
                return Err("huffman: code longer than 30 bits".into());
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
    }
    if len > 7 || !ones {
        return Err("huffman: bad padding".into());
    }
    Ok(out)
}

/// An HPACK decoder with its dynamic table.
pub struct Decoder {
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max: HPACK_TABLE,
        }
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let v = *self.b.get(self.at).ok_or("hpack: truncated block")?;
        self.at += 1;
        Ok(v)
    }

    fn int(&mut self, n: u32) -> Result<usize, String> {
        let max = (1usize << n) - 1;
        let mut v = usize::from(self.byte()?) & max;
        if v < max {
            return Ok(v);
        }
        let mut shift = 0u32;
        loop {
            let b = self.byte()?;
            let add = usize::from(b & 0x7f)
                .checked_shl(shift)
                .filter(|_| shift <= 28)
                .ok_or("hpack: integer overflow")?;
            v = v.checked_add(add).ok_or("hpack: integer overflow")?;
            if b & 0x80 == 0 {
                return Ok(v);
            }
            shift += 7;
        }
    }

    fn string(&mut self) -> Result<Vec<u8>, String> {
        let huff = self.b.get(self.at).ok_or("hpack: truncated block")? & 0x80 != 0;
        let len = self.int(7)?;
        let end = self.at.checked_add(len).ok_or("hpack: bad length")?;
        let raw = self.b.get(self.at..end).ok_or("hpack: truncated string")?;
        self.at = end;
        if huff {
            huffman_decode(raw)
        } else {
            Ok(raw.to_vec())
        }
    }
}

impl Decoder {
    fn entry(&self, idx: usize) -> Result<(Vec<u8>, Vec<u8>), String> {
        if idx == 0 {
            return Err("hpack: index 0".into());
        }
        if let Some((n, v)) = STATIC_TABLE.get(idx - 1) {
            return Ok((n.as_bytes().to_vec(), v.as_bytes().to_vec()));
        }
        self.table
            .get(idx - STATIC_TABLE.len() - 1)
            .cloned()
            .ok_or_else(|| format!("hpack: index {idx} out of range"))
    }

    fn evict(&mut self) {
        while self.size > self.max {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => self.size = 0,
            }
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        self.size += name.len() + value.len() + 32;
        self.table.push_front((name, value));
        self.evict();
    }

    /// Decodes one header block into (name, value) pairs.
    pub fn decode(&mut self, block: &[u8]) -> Result<Vec<(String, String)>, String> {
        let mut c = Cursor { b: block, at: 0 };
        let mut out = Vec::new();
        // Indexed fields can expand a small block a thousandfold: the decoded size is bounded.
        let mut total = 0usize;
        while c.at < block.len() {
            let b = block.get(c.at).copied().unwrap_or(0);
            let (name, value) = if b & 0x80 != 0 {
                self.entry(c.int(7)?)?
            } else if b & 0xc0 == 0x40 {
                let idx = c.int(6)?;
                let name = if idx == 0 {
                    c.string()?
                } else {
                    self.entry(idx)?.0
                };
                let value = c.string()?;
                self.insert(name.clone(), value.clone());
                (name, value)
            } else if b & 0xe0 == 0x20 {
                let max = c.int(5)?;
                if max > HPACK_TABLE {
                    return Err(format!("hpack: table size {max} above ours"));
                }
                self.max = max;
                self.evict();
                continue;
            } else {
                // Literal without indexing (0000) or never indexed (0001): 4-bit name index.
                let idx = c.int(4)?;
                let name = if idx == 0 {
                    c.string()?
                } else {
                    self.entry(idx)?.0
                };
                (name, c.string()?)
            };
            // Counted after the text conversion: invalid UTF-8 grows threefold in it.
            let (name, value) = (
                String::from_utf8_lossy(&name).into_owned(),
                String::from_utf8_lossy(&value).into_owned(),
            );
            total += name.len() + value.len() + 32;
            if total > MAX_HEADER_LIST {
                return Err(format!("hpack: header list over {MAX_HEADER_LIST} bytes"));
            }
            out.push((name, value));
        }
        Ok(out)
    }
}

/// `grpc-message` is percent-encoded.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let hex = |j: usize| b.get(j).and_then(|h| (*h as char).to_digit(16));
        match (c, hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A frame header: payload length, type, flags, stream (RFC 9113 §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHead {
    pub len: usize,
    pub ty: u8,
    pub flags: u8,
    pub stream: u32,
}

/// Length of a frame header.
pub const FRAME_HEAD: usize = 9;

/// Parses the 9-byte header at the start of `b`, if there are 9 bytes.
pub fn frame_head(b: &[u8]) -> Option<FrameHead> {
    let h: &[u8; FRAME_HEAD] = b.get(..FRAME_HEAD)?.try_into().ok()?;
    Some(FrameHead {
        len: usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]),
        ty: h[3],
        flags: h[4],
        stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
    })
}

/// A frame's payload without its padding (DATA and HEADERS with PADDED) and, for HEADERS with
/// PRIORITY, without the priority fields.
pub fn frame_body<'a>(head: &FrameHead, payload: &'a [u8]) -> Result<&'a [u8], String> {
    let mut p = payload;
    let mut pad = 0usize;
    if head.flags & PADDED != 0 && (head.ty == DATA || head.ty == HEADERS) {
        let (&n, rest) = p.split_first().ok_or("padded frame without a pad length")?;
        pad = usize::from(n);
        p = rest;
    }
    if head.ty == HEADERS && head.flags & PRIORITY != 0 {
        p = p
            .get(5..)
            .ok_or("HEADERS too short for its priority fields")?;
    }
    let keep = p
        .len()
        .checked_sub(pad)
        .ok_or("padding longer than the frame")?;
    Ok(&p[..keep])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn huffman_encode(s: &[u8]) -> Vec<u8> {
        // Canonical codes from the lengths, as the decoder derives them.
        let (syms, counts) = huffman_tables();
        let mut codes = [0u32; 257];
        let (mut code, mut i) = (0u32, 0usize);
        for count in counts.iter().skip(1) {
            for _ in 0..*count {
                codes[usize::from(syms[i])] = code;
                code += 1;
                i += 1;
            }
            code <<= 1;
        }
        let (mut acc, mut nbits, mut out) = (0u64, 0u32, Vec::new());
        for &b in s {
            let len = huffman_len(u16::from(b)) as u32;
            acc = (acc << len) | u64::from(codes[usize::from(b)]);
            nbits += len;
            while nbits >= 8 {
                out.push((acc >> (nbits - 8)) as u8);
                nbits -= 8;
            }
        }
        if nbits > 0 {
            out.push(((acc << (8 - nbits)) as u8) | (0xff >> nbits));
        }
        out
    }

    #[test]
    fn huffman_matches_the_rfc() {
        // RFC 7541 C.4.1: "www.example.com".
        let enc = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        assert_eq!(huffman_decode(&enc).as_deref(), Ok(&b"www.example.com"[..]));
        // C.4.2: "no-cache"; C.6.1: "302", "private".
        assert_eq!(
            huffman_decode(&[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf]).as_deref(),
            Ok(&b"no-cache"[..])
        );
        assert_eq!(huffman_decode(&[0x64, 0x02]).as_deref(), Ok(&b"302"[..]));
        assert_eq!(
            huffman_decode(&[0xae, 0xc3, 0x77, 0x1a, 0x4b]).as_deref(),
            Ok(&b"private"[..])
        );
        // Every byte value round-trips.
        let all: Vec<u8> = (0..=255u8).collect();
        assert_eq!(huffman_decode(&huffman_encode(&all)), Ok(all));
        // Padding of 8 one-bits, or zero padding, is an error.
        assert!(huffman_decode(&[0x64, 0x02, 0xff]).is_err());
        assert!(huffman_decode(&[0x00]).is_err());
    }

    #[test]
    fn hpack_decodes_rfc_examples_with_the_dynamic_table() {
        // RFC 7541 C.3 (requests without Huffman), three blocks on one decoder.
        let mut d = Decoder::default();
        let b1 = b"\x82\x86\x84\x41\x0fwww.example.com";
        let f = d.decode(b1).expect("c.3.1");
        assert_eq!(f[3], (":authority".into(), "www.example.com".into()));
        let b2 = b"\x82\x86\x84\xbe\x58\x08no-cache";
        let f = d.decode(b2).expect("c.3.2");
        assert_eq!(f[3], (":authority".into(), "www.example.com".into()));
        assert_eq!(f[4], ("cache-control".into(), "no-cache".into()));
        let b3 = b"\x82\x87\x85\xbf\x40\x0acustom-key\x0ccustom-value";
        let f = d.decode(b3).expect("c.3.3");
        assert_eq!(f[3], (":authority".into(), "www.example.com".into()));
        assert_eq!(f[4], ("custom-key".into(), "custom-value".into()));
        // C.6.1 with Huffman: ":status 302".
        let mut d = Decoder::default();
        let f = d.decode(&[0x48, 0x82, 0x64, 0x02]).expect("c.6.1");
        assert_eq!(f[0], (":status".into(), "302".into()));
        // A size update to 0 empties the table; index 62 is then out of range.
        assert!(d.decode(&[0x20]).is_ok());
        assert!(d.decode(&[0xbe]).is_err());
    }

    #[test]
    fn hpack_never_panics_on_garbage() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 24) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            let _ = Decoder::default().decode(&bytes);
            let _ = huffman_decode(&bytes);
        }
    }

    #[test]
    fn grpc_message_is_percent_decoded() {
        assert_eq!(percent_decode("ipset%20add%3A 100%"), "ipset add: 100%");
        assert_eq!(percent_decode("%E2%9C%93"), "✓");
    }

    #[test]
    fn an_hpack_bomb_is_refused() {
        // One 4,000-byte entry in the dynamic table, then referenced by index byte after byte.
        let mut b = vec![0x40];
        hpack_str(&mut b, b"x-big");
        hpack_str(&mut b, &[b'a'; 4000]);
        b.extend(std::iter::repeat_n(0x80 | 62, 1000));
        let e = Decoder::default().decode(&b).expect_err("bomb");
        assert!(e.contains("header list"), "{e}");
    }

    #[test]
    fn invalid_utf8_cannot_triple_a_header_list_past_the_bound() {
        // One 3,900-byte entry of 0xff (each byte becomes 3 in the text), referenced 62 times:
        // 246 KB of raw fields, 730 KB as text.
        let mut b = vec![0x40];
        hpack_str(&mut b, b"x-ff");
        hpack_str(&mut b, &[0xff; 3900]);
        b.extend(std::iter::repeat_n(0x80 | 62, 61));
        let e = Decoder::default().decode(&b).expect_err("amplified");
        assert!(e.contains("header list"), "{e}");
        // Many empty Huffman strings decode (cheaply: the tables are built once).
        let mut b = Vec::new();
        for _ in 0..6000 {
            b.extend_from_slice(&[0x00, 0x80, 0x80]);
        }
        let t = std::time::Instant::now();
        let r = Decoder::default().decode(&b);
        println!(
            "6,000 empty Huffman fields: {:?} ({:?})",
            r.as_ref().map(Vec::len),
            t.elapsed()
        );
    }

    #[test]
    fn frame_heads_and_bodies_parse_and_refuse_bad_padding() {
        let mut b = Vec::new();
        frame(
            &mut b,
            HEADERS,
            END_HEADERS | PADDED | PRIORITY,
            3,
            &[2, 0, 0, 0, 0, 9, b'h', 0, 0],
        );
        let h = frame_head(&b).expect("head");
        assert_eq!((h.len, h.ty, h.stream), (9, HEADERS, 3));
        assert_eq!(frame_body(&h, &b[FRAME_HEAD..]), Ok(&b"h"[..]));
        assert!(frame_head(&b[..8]).is_none());
        let bad = FrameHead {
            len: 2,
            ty: DATA,
            flags: PADDED,
            stream: 1,
        };
        assert!(frame_body(&bad, &[5, 0]).is_err());
        assert!(frame_body(&bad, &[]).is_err());
    }
}
