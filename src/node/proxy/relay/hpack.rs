//! HPACK (RFC 7541): decoding a peer's header blocks with its dynamic table, checking each field
//! against HTTP/2's rules, and re-encoding as literals without the dynamic table.
//!
//! The decoder is pullgate's own (static and dynamic tables, integers, strings, Huffman-coded
//! strings with [`super::huffman`]), checked against RFC 7541 Appendix C and against an independent
//! implementation (`loona-hpack`, in the tests). It is strict on what changes the table: size
//! updates only at the start of a block and never above the advertised table size. While a block
//! is decoded it is written out again as literals without indexing into a buffer, with every
//! `:authority` that is not a valid URI authority replaced by `localhost`: that copy is what the
//! receiver gets, so it decodes exactly the fields pullgate decoded.
//!
//! The field rules (RFC 9113 §8.2–8.3: lower-case token names, values without CR/LF/NUL, the
//! pseudo-headers a request needs, no connection-specific headers) are checked as strictly as the
//! `h2` crate checks them, so every client is held to what any HTTP/2 server would accept.

use std::borrow::Cow;
use std::collections::VecDeque;

use http::uri::Authority;

use crate::node::proxy::refusal::Refusal;

/// The `:authority` sent in place of one that is not a valid URI authority.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// What one decoded header block holds, as far as routing and refusing it go.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Inspection {
    /// Some `:authority` does not parse as an `http::uri::Authority` (it was replaced).
    pub bad_authority: bool,
    /// Why the block breaks HTTP/2's field rules, if it does (the reason pullgate refuses it
    /// with); the first problem seen.
    pub fault: Option<Refusal>,
    /// The decoded header list size (RFC 9113 §6.5.2: names + values + 32 per field).
    pub list_size: usize,
    /// The list was larger than the limit: the re-encoded copy is incomplete and must not be used,
    /// and `list_size` counts only up to the field that crossed the limit.
    pub overflow: bool,
}

/// Why a header block cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("an integer runs past the end of the block or is too large")]
    Integer,
    #[error("a string runs past the end of the block")]
    Truncated,
    #[error("a Huffman-coded string is invalid")]
    Huffman,
    #[error("index {0} is in neither table")]
    Index(usize),
    #[error("a dynamic table size update to {0} bytes, above the {1} bytes the server advertises")]
    TableSize(usize, usize),
    #[error("a dynamic table size update after a header field")]
    LateSizeUpdate,
}

/// The static table (RFC 7541 Appendix A); index 1 is the first entry.
const STATIC: [(&str, &str); 61] = [
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

/// Per-entry overhead in the table size (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;

/// A decoder tracking the client's dynamic table.
pub struct Decoder {
    /// Newest first.
    dynamic: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    /// The table's current maximum size, as set by the client's size updates.
    max: usize,
    /// SETTINGS_HEADER_TABLE_SIZE the server advertises: size updates above it are errors.
    allowed: usize,
    /// The last `:path` and `:authority` values found acceptable.
    accepted: Accepted,
}

/// The last `:path` and `:authority` values that were found valid. A client sends the same
/// few over and over, and comparing bytes costs less than parsing them again (with an allocation
/// each) on every request. Only ever holds non-empty values that passed the full check.
#[derive(Default)]
struct Accepted {
    path: Vec<u8>,
    authority: Vec<u8>,
}

impl Accepted {
    /// Whether `value` passes `check`, remembering it in `last` if it does.
    fn check(last: &mut Vec<u8>, value: &[u8], check: impl FnOnce(&[u8]) -> bool) -> bool {
        if !value.is_empty() && value == last.as_slice() {
            return true;
        }
        let ok = check(value);
        if ok && !value.is_empty() {
            last.clear();
            last.extend_from_slice(value);
        }
        ok
    }
}

impl Decoder {
    /// A decoder for a server that advertises `table_size` as SETTINGS_HEADER_TABLE_SIZE.
    pub fn new(table_size: usize) -> Self {
        Decoder {
            dynamic: VecDeque::new(),
            size: 0,
            max: table_size,
            allowed: table_size,
            accepted: Accepted::default(),
        }
    }

    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), DecodeError> {
        match index {
            1..=61 => {
                let (n, v) = STATIC[index - 1];
                Ok((n.as_bytes(), v.as_bytes()))
            }
            _ => self
                .dynamic
                .get(index.wrapping_sub(62))
                .map(|(n, v)| (n.as_slice(), v.as_slice()))
                .ok_or(DecodeError::Index(index)),
        }
    }

    fn evict_to(&mut self, room: usize) {
        while self.size > room {
            let (n, v) = self
                .dynamic
                .pop_back()
                .expect("a non-zero size has entries");
            self.size -= n.len() + v.len() + ENTRY_OVERHEAD;
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max {
            // An entry larger than the table empties it and is not added (RFC 7541 §4.4).
            self.evict_to(0);
            return;
        }
        self.evict_to(self.max - size);
        self.size += size;
        self.dynamic.push_front((name, value));
    }

    /// Decodes `block`, inspecting every field and appending its re-encoding (literals without
    /// indexing, authorities fixed) to `copy` while the list stays within `max_list`. `request` says
    /// whether this block opens a stream (request headers) rather than carrying trailers.
    ///
    /// Once the list is over `max_list` the block is only walked to keep the table in step: no
    /// field is inspected or copied, and strings that do not enter the table are skipped without
    /// being decoded. A block of one-byte references to a large table entry therefore costs one
    /// table lookup per byte, not one header check per field.
    pub fn decode(
        &mut self,
        block: &[u8],
        request: bool,
        max_list: usize,
        copy: &mut Vec<u8>,
    ) -> Result<Inspection, DecodeError> {
        let mut fields = Fields {
            seen: Seen::default(),
            insp: Inspection::default(),
            request,
            max_list,
            copy,
            accepted: std::mem::take(&mut self.accepted),
        };
        let mut pos = 0;
        let mut any = false;
        while let Some(&first) = block.get(pos) {
            if first & 0x80 != 0 {
                // Indexed field (§6.1).
                let (n, v) = self.get(int(block, &mut pos, 7)?)?;
                fields.field(n, v);
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3).
                let size = int(block, &mut pos, 5)?;
                if any {
                    return Err(DecodeError::LateSizeUpdate);
                }
                if size > self.allowed {
                    return Err(DecodeError::TableSize(size, self.allowed));
                }
                self.max = size;
                self.evict_to(size);
                continue;
            } else {
                // Literal with incremental indexing (§6.2.1), without indexing or never indexed.
                let indexing = first & 0xc0 == 0x40;
                let index = int(block, &mut pos, if indexing { 6 } else { 4 })?;
                if fields.insp.overflow && !indexing {
                    // Nothing more is looked at and this field does not enter the table.
                    if index == 0 {
                        skip_string(block, &mut pos)?;
                    } else {
                        self.get(index)?;
                    }
                    skip_string(block, &mut pos)?;
                    any = true;
                    continue;
                }
                let name = match index {
                    0 => string(block, &mut pos)?,
                    i => Cow::Borrowed(self.get(i)?.0),
                };
                let value = string(block, &mut pos)?;
                fields.field(&name, &value);
                if indexing {
                    let (name, value) = (name.into_owned(), value.into_owned());
                    self.insert(name, value);
                }
            }
            any = true;
        }
        self.accepted = fields.accepted;
        let mut insp = fields.insp;
        if request && insp.fault.is_none() {
            insp.fault = fields.seen.missing();
        }
        if insp.overflow {
            // Over the limit, the rest of the block was not inspected: that is the reason.
            insp.fault = Some(Refusal::HeaderListTooLarge);
        }
        Ok(insp)
    }
}

/// The per-field side of decoding one block: the size count, the inspection and the copy.
struct Fields<'c> {
    seen: Seen,
    insp: Inspection,
    request: bool,
    max_list: usize,
    copy: &'c mut Vec<u8>,
    accepted: Accepted,
}

impl Fields<'_> {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        if self.insp.overflow {
            return;
        }
        self.insp.list_size += name.len() + value.len() + ENTRY_OVERHEAD;
        if self.insp.list_size > self.max_list {
            // Checked before any work on the field; nothing after it is looked at.
            self.insp.overflow = true;
            return;
        }
        let replace = self.seen.field(
            name,
            value,
            self.request,
            &mut self.insp,
            &mut self.accepted,
        );
        let value = if replace {
            REPLACEMENT_AUTHORITY
        } else {
            value
        };
        put_literal(self.copy, name, value);
    }
}

/// Reads an integer with an `n`-bit prefix at `pos` (RFC 7541 §5.1); at most 2^28 + prefix.
fn int(buf: &[u8], pos: &mut usize, n: u8) -> Result<usize, DecodeError> {
    let max = (1usize << n) - 1;
    let first = *buf.get(*pos).ok_or(DecodeError::Integer)? as usize & max;
    *pos += 1;
    if first < max {
        return Ok(first);
    }
    let mut value = max;
    for shift in [0, 7, 14, 21] {
        let b = *buf.get(*pos).ok_or(DecodeError::Integer)?;
        *pos += 1;
        value += ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DecodeError::Integer)
}

/// Reads a string literal at `pos` (RFC 7541 §5.2), Huffman-decoded if it is coded.
fn string<'b>(buf: &'b [u8], pos: &mut usize) -> Result<Cow<'b, [u8]>, DecodeError> {
    let huffman = buf.get(*pos).is_some_and(|b| b & 0x80 != 0);
    let len = int(buf, pos, 7)?;
    let raw = buf
        .get(*pos..pos.saturating_add(len))
        .ok_or(DecodeError::Truncated)?;
    *pos += len;
    if !huffman {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = Vec::new();
    super::huffman::decode(raw, &mut out).map_err(|_| DecodeError::Huffman)?;
    Ok(Cow::Owned(out))
}

/// Skips a string literal at `pos` without decoding it.
fn skip_string(buf: &[u8], pos: &mut usize) -> Result<(), DecodeError> {
    let len = int(buf, pos, 7)?;
    if buf.len() - *pos < len {
        return Err(DecodeError::Truncated);
    }
    *pos += len;
    Ok(())
}

/// Pseudo-headers seen so far in one block, for spotting what HTTP/2 does not allow.
#[derive(Default)]
struct Seen {
    regular: bool,
    method: Option<bool>, // Some(is CONNECT)
    scheme: bool,
    path: bool,
    authority: bool,
}

impl Seen {
    /// Looks at one field; returns whether it is an `:authority` to replace.
    fn field(
        &mut self,
        name: &[u8],
        value: &[u8],
        request: bool,
        insp: &mut Inspection,
        accepted: &mut Accepted,
    ) -> bool {
        let mut fault = None;
        let mut replace = false;
        if let Some(pseudo) = name.strip_prefix(b":") {
            let repeated = match pseudo {
                b"authority" => {
                    replace = !Accepted::check(&mut accepted.authority, value, |v| {
                        Authority::try_from(v).is_ok()
                    });
                    insp.bad_authority |= replace;
                    std::mem::replace(&mut self.authority, true)
                }
                b"method" => {
                    if http::Method::from_bytes(value).is_err() {
                        fault = Some(Refusal::BadPseudoHeader);
                    }
                    self.method
                        .replace(value == b"CONNECT".as_slice())
                        .is_some()
                }
                b"scheme" => {
                    if value.is_empty() || std::str::from_utf8(value).is_err() {
                        fault = Some(Refusal::BadPseudoHeader);
                    }
                    std::mem::replace(&mut self.scheme, true)
                }
                b"path" => {
                    if value.is_empty() {
                        fault = Some(Refusal::MissingPseudoHeader);
                    } else if !Accepted::check(&mut accepted.path, value, |v| {
                        http::uri::PathAndQuery::try_from(v).is_ok()
                    }) {
                        fault = Some(Refusal::BadPseudoHeader);
                    }
                    std::mem::replace(&mut self.path, true)
                }
                // `:status` in a request, `:protocol` (pullgate serves no extended CONNECT), or
                // unknown: all refused.
                _ => true,
            };
            if repeated || self.regular || !request {
                fault = Some(Refusal::BadPseudoHeader);
            }
        } else {
            self.regular = true;
            if !valid_name(name) || !valid_value(value) {
                fault = Some(Refusal::InvalidHeader);
            } else if matches!(
                name,
                b"connection"
                    | b"transfer-encoding"
                    | b"upgrade"
                    | b"keep-alive"
                    | b"proxy-connection"
            ) || (name == b"te" && value != b"trailers")
            {
                fault = Some(Refusal::ConnectionHeader);
            }
        }
        if insp.fault.is_none() {
            insp.fault = fault;
        }
        replace
    }

    /// What a request block lacks that HTTP/2 requires.
    fn missing(&self) -> Option<Refusal> {
        match self.method {
            None => Some(Refusal::MissingPseudoHeader),
            Some(false) if !self.scheme || !self.path => Some(Refusal::MissingPseudoHeader),
            _ => None,
        }
    }
}

/// Whether `name` is a valid header name: a non-empty token in lower case (RFC 9110 §5.6.2,
/// RFC 9113 §8.2.1).
fn valid_name(name: &[u8]) -> bool {
    // Every byte looked up in a table, without an early exit: names are short, and a loop
    // without branches costs less than one that stops at the first bad byte.
    !name.is_empty() && name.iter().fold(true, |ok, &b| ok & NAME_BYTES[b as usize])
}

/// The bytes [`valid_name`] accepts.
static NAME_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = matches!(b as u8, b'a'..=b'z' | b'0'..=b'9' | b'!' | b'#' | b'$' | b'%' | b'&'
            | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~');
        b += 1;
    }
    t
};

/// Whether `value` is a valid header value: visible bytes, spaces and tabs (no CR, LF, NUL
/// or other control bytes).
fn valid_value(value: &[u8]) -> bool {
    // Without an early exit, so that the compiler checks many bytes at once.
    value.iter().fold(true, |ok, &b| {
        ok & ((b >= 0x20 && b != 0x7f) | (b == b'\t'))
    })
}

/// Appends an HPACK integer with an `n`-bit prefix whose high bits are `flags` (RFC 7541 §5.1).
pub fn put_int(out: &mut Vec<u8>, flags: u8, n: u8, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// Appends a literal field without indexing and with a literal name, no Huffman coding
/// (RFC 7541 §6.2.2): the receiver's dynamic table is not touched.
pub fn put_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    put_int(out, 0, 7, name.len());
    out.extend_from_slice(name);
    put_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// A dynamic table size update to `size` (RFC 7541 §6.3).
pub fn put_size_update(out: &mut Vec<u8>, size: usize) {
    put_int(out, 0x20, 5, size);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        hex::decode(s.split_whitespace().collect::<String>()).unwrap()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        list.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    /// Decodes a sequence of blocks with one decoder, as one connection would, checking each
    /// block's fields (through the re-encoded copy) and the dynamic table after it.
    type Fields<'a> = &'a [(&'a str, &'a str)];

    fn check_sequence(table_size: usize, blocks: &[(&str, Fields, Fields)]) {
        let mut d = Decoder::new(4096);
        d.max = table_size;
        for (i, (encoded, want, table)) in blocks.iter().enumerate() {
            let mut copy = Vec::new();
            d.decode(&hex(encoded), false, 1 << 20, &mut copy).unwrap();
            assert_eq!(literals(&copy), pairs(want), "block {}", i + 1);
            let got: Vec<(Vec<u8>, Vec<u8>)> = d.dynamic.iter().cloned().collect();
            assert_eq!(got, pairs(table), "table after block {}", i + 1);
            let size: usize = table.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
            assert_eq!(d.size, size, "table size after block {}", i + 1);
        }
    }

    const REQ1: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ];
    const REQ2: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
        ("cache-control", "no-cache"),
    ];
    const REQ3: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ];
    const T1: &[(&str, &str)] = &[(":authority", "www.example.com")];
    const T2: &[(&str, &str)] = &[
        ("cache-control", "no-cache"),
        (":authority", "www.example.com"),
    ];
    const T3: &[(&str, &str)] = &[
        ("custom-key", "custom-value"),
        ("cache-control", "no-cache"),
        (":authority", "www.example.com"),
    ];
    const RT1: &[(&str, &str)] = &[
        ("location", "https://www.example.com"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("cache-control", "private"),
        (":status", "302"),
    ];
    const RT2: &[(&str, &str)] = &[
        (":status", "307"),
        ("location", "https://www.example.com"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("cache-control", "private"),
    ];
    const RT3: &[(&str, &str)] = &[
        (
            "set-cookie",
            "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
        ),
        ("content-encoding", "gzip"),
        ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
    ];
    const RESP1: &[(&str, &str)] = &[
        (":status", "302"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("location", "https://www.example.com"),
    ];
    const RESP2: &[(&str, &str)] = &[
        (":status", "307"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("location", "https://www.example.com"),
    ];
    const RESP3: &[(&str, &str)] = &[
        (":status", "200"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
        ("location", "https://www.example.com"),
        ("content-encoding", "gzip"),
        (
            "set-cookie",
            "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
        ),
    ];

    #[test]
    fn rfc7541_c3_requests_without_huffman() {
        check_sequence(
            4096,
            &[
                (
                    "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                    REQ1,
                    T1,
                ),
                ("8286 84be 5808 6e6f 2d63 6163 6865", REQ2, T2),
                (
                    "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
                    REQ3,
                    T3,
                ),
            ],
        );
    }

    #[test]
    fn rfc7541_c4_requests_with_huffman() {
        check_sequence(
            4096,
            &[
                ("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff", REQ1, T1),
                ("8286 84be 5886 a8eb 1064 9cbf", REQ2, T2),
                (
                    "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
                    REQ3,
                    T3,
                ),
            ],
        );
    }

    #[test]
    fn rfc7541_c5_responses_without_huffman_evict() {
        check_sequence(
            256,
            &[
                (
                    "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
                     2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
                     6c65 2e63 6f6d",
                    RESP1,
                    RT1,
                ),
                ("4803 3330 37c1 c0bf", RESP2, RT2),
                (
                    "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d
                     54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049
                     5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e
                     3d31",
                    RESP3,
                    RT3,
                ),
            ],
        );
    }

    #[test]
    fn rfc7541_c6_responses_with_huffman_evict() {
        check_sequence(
            256,
            &[
                (
                    "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6
                     2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
                    RESP1,
                    RT1,
                ),
                ("4883 640e ffc1 c0bf", RESP2, RT2),
                (
                    "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab
                     77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f
                     9587 3160 65c0 03ed 4ee5 b106 3d50 07",
                    RESP3,
                    RT3,
                ),
            ],
        );
    }

    #[test]
    fn size_updates_above_the_advertised_table_are_errors() {
        let mut d = Decoder::new(4096);
        let mut copy = Vec::new();
        let mut over = Vec::new();
        put_size_update(&mut over, 4097);
        over.extend_from_slice(&[0x82]);
        assert!(d.decode(&over, true, 1 << 20, &mut copy).is_err());
        let mut ok = Vec::new();
        put_size_update(&mut ok, 100);
        ok.extend_from_slice(&[0x82]);
        let mut d = Decoder::new(4096);
        assert!(d.decode(&ok, false, 1 << 20, &mut copy).is_ok());
        assert_eq!(d.max, 100);
        // Only at the start of a block (RFC 7541 §4.2).
        let late = [0x82, 0x20];
        assert_eq!(
            Decoder::new(4096).decode(&late, false, 1 << 20, &mut copy),
            Err(DecodeError::LateSizeUpdate)
        );
    }

    #[test]
    fn an_entry_larger_than_the_table_empties_it() {
        let mut d = Decoder::new(4096);
        d.max = 100;
        let mut block = Vec::new();
        // Literal with incremental indexing, new name: fits, then one that does not.
        for value in ["short", &"x".repeat(90)] {
            block.push(0x40);
            put_int(&mut block, 0, 7, 1);
            block.push(b'a');
            put_int(&mut block, 0, 7, value.len());
            block.extend_from_slice(value.as_bytes());
        }
        d.decode(&block, false, 1 << 20, &mut Vec::new()).unwrap();
        assert!(d.dynamic.is_empty());
        assert_eq!(d.size, 0);
        assert_eq!(d.get(62), Err(DecodeError::Index(62)));
        assert_eq!(d.get(61).unwrap().0, b"www-authenticate");
    }

    /// Decodes a block encoded by [`put_literal`] back, as a receiver would.
    fn literals(copy: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        loona_hpack::Decoder::new().decode(copy).unwrap()
    }

    #[test]
    fn copies_replace_bad_authorities_only() {
        let mut client = loona_hpack::Encoder::new();
        let mut d = Decoder::new(4096);
        for (authority, bad) in [
            (&b"localhost"[..], false),
            (b"/run/pullgate/pullgate.sock", true),
            (b"%2Frun%2Fpullgate%2Fpullgate.sock", true),
            (b"", true),
            (b"a b", true),
            (b"\xff\xfe", true),
            (b"127.0.0.1:10010", false),
        ] {
            let fields: Vec<(&[u8], &[u8])> = vec![
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", b"/runtime.v1.RuntimeService/Version"),
                (b":authority", authority),
                (b"content-type", b"application/grpc"),
            ];
            let block = client.encode(fields.iter().copied());
            let mut copy = Vec::new();
            let insp = d.decode(&block, true, 1 << 20, &mut copy).unwrap();
            assert_eq!(insp.bad_authority, bad, "{authority:?}");
            assert_eq!(insp.fault, None, "{authority:?}");
            let mut want: Vec<(Vec<u8>, Vec<u8>)> = fields
                .iter()
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect();
            if bad {
                want[3].1 = REPLACEMENT_AUTHORITY.to_vec();
            }
            assert_eq!(literals(&copy), want);
        }
    }

    #[test]
    fn faults_name_what_h2_refuses() {
        type Case<'a> = (&'a [(&'a str, &'a str)], bool, Option<Refusal>);
        let cases: &[Case] = &[
            (
                &[(":method", "POST"), (":path", "/a/b")],
                true,
                Some(Refusal::MissingPseudoHeader),
            ),
            (
                &[(":scheme", "http"), (":path", "/a/b")],
                true,
                Some(Refusal::MissingPseudoHeader),
            ),
            (
                &[(":method", "POST"), (":scheme", "http"), (":path", "")],
                true,
                Some(Refusal::MissingPseudoHeader),
            ),
            (
                &[
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", "/a"),
                    (":status", "200"),
                ],
                true,
                Some(Refusal::BadPseudoHeader),
            ),
            (
                &[
                    (":method", "POST"),
                    ("x", "y"),
                    (":scheme", "http"),
                    (":path", "/a"),
                ],
                true,
                Some(Refusal::BadPseudoHeader),
            ),
            (
                &[
                    (":method", "POST"),
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", "/a"),
                ],
                true,
                Some(Refusal::BadPseudoHeader),
            ),
            (
                &[
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", "/a"),
                    ("Upper", "x"),
                ],
                true,
                Some(Refusal::InvalidHeader),
            ),
            (
                &[
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", "/a"),
                    ("x", "a\nb"),
                ],
                true,
                Some(Refusal::InvalidHeader),
            ),
            (
                &[
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", "/a"),
                    ("connection", "close"),
                ],
                true,
                Some(Refusal::ConnectionHeader),
            ),
            (
                &[
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", "/a"),
                    ("te", "gzip"),
                ],
                true,
                Some(Refusal::ConnectionHeader),
            ),
            (
                &[
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", "/a"),
                    ("te", "trailers"),
                ],
                true,
                None,
            ),
            (&[("grpc-status", "0")], false, None),
            (&[(":path", "/a")], false, Some(Refusal::BadPseudoHeader)),
        ];
        for (fields, request, want) in cases {
            let mut client = loona_hpack::Encoder::new();
            let block = client.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
            let insp = Decoder::new(4096)
                .decode(&block, *request, 1 << 20, &mut Vec::new())
                .unwrap();
            assert_eq!(insp.fault, *want, "{fields:?}");
        }
    }

    #[test]
    fn remembered_paths_and_authorities_never_let_a_bad_one_through() {
        let mut d = Decoder::new(4096);
        let mut client = loona_hpack::Encoder::new();
        let mut block = |authority: &str, path: &str| {
            let fields = [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", authority),
                (":path", path),
            ];
            let block = client.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
            d.decode(&block, true, 1 << 20, &mut Vec::new()).unwrap()
        };
        for _ in 0..2 {
            // First, while nothing is remembered yet.
            let empty = block("", "/a.B/C");
            assert!(empty.bad_authority, "an empty :authority is refused by h2");
            let good = block("localhost", "/a.B/C");
            assert_eq!((good.bad_authority, good.fault), (false, None));
            let bad_path = block("localhost", "/a.B/C\x7f");
            assert_eq!(bad_path.fault, Some(Refusal::BadPseudoHeader));
            let bad_authority = block("/run/containerd/containerd.sock", "/a.B/C");
            assert_eq!(
                (bad_authority.bad_authority, bad_authority.fault),
                (true, None)
            );
        }
    }

    #[test]
    fn oversized_lists_are_flagged_and_not_copied_or_inspected_past_the_limit() {
        let mut client = loona_hpack::Encoder::new();
        let big = "v".repeat(3000);
        // The invalid name comes after the limit was crossed: it is never looked at, and the
        // refusal is named for the size.
        let fields = [
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/a/b"),
            (b"x-big", big.as_bytes()),
            (b"x-big2", big.as_bytes()),
            (b"Upper", b"x"),
        ];
        let block = client.encode(fields.iter().copied());
        let mut copy = Vec::new();
        let insp = Decoder::new(4096)
            .decode(&block, true, 4000, &mut copy)
            .unwrap();
        assert!(insp.overflow);
        assert_eq!(insp.fault, Some(Refusal::HeaderListTooLarge));
        assert!(copy.len() < 4000);
    }

    #[test]
    fn references_to_a_large_entry_stop_counting_at_the_limit_and_keep_the_table() {
        // One 4000-byte entry in the table, then 60,000 one-byte references to it: 240 MB of
        // header list from 60 KB of block.
        let mut block = Vec::new();
        block.push(0x40);
        put_int(&mut block, 0, 7, 5);
        block.extend_from_slice(b"x-big");
        put_int(&mut block, 0, 7, 3950);
        block.extend_from_slice(&[b'v'; 3950]);
        block.extend(std::iter::repeat_n(0xbe, 60_000));
        // After the limit: a literal that enters the table (it must, to stay in step with the
        // client), and one that does not (skipped undecoded).
        block.push(0x40);
        put_int(&mut block, 0, 7, 5);
        block.extend_from_slice(b"x-new");
        put_int(&mut block, 0, 7, 3);
        block.extend_from_slice(b"abc");
        block.push(0x00);
        put_int(&mut block, 0, 7, 1);
        block.push(b'y');
        put_int(&mut block, 0, 7, 1);
        block.push(b'z');
        let mut d = Decoder::new(4096);
        let mut copy = Vec::new();
        let insp = d.decode(&block, false, 64 * 1024, &mut copy).unwrap();
        assert!(insp.overflow);
        assert_eq!(insp.fault, Some(Refusal::HeaderListTooLarge));
        // Counting stopped at the field that crossed the limit.
        assert!(insp.list_size <= 64 * 1024 + 4000, "{}", insp.list_size);
        assert!(copy.len() <= 64 * 1024, "{}", copy.len());
        assert_eq!(
            d.get(62).unwrap(),
            (&b"x-new"[..], &b"abc"[..]),
            "the table follows the client's"
        );
    }

    #[test]
    fn name_and_value_checks_agree_with_the_http_crate() {
        for b in 0..=255u8 {
            let name = [b'x', b];
            let lower =
                http::HeaderName::from_bytes(&name).is_ok_and(|n| n.as_str().as_bytes() == name);
            assert_eq!(valid_name(&name), lower, "name byte {b}");
            let value = [b'v', b];
            assert_eq!(
                valid_value(&value),
                http::HeaderValue::from_bytes(&value).is_ok(),
                "value byte {b}"
            );
        }
    }

    #[test]
    fn integers_use_continuation_bytes_past_the_prefix() {
        // RFC 7541 C.1.1-C.1.3.
        let mut out = Vec::new();
        put_int(&mut out, 0, 5, 10);
        assert_eq!(out, [0x0a]);
        out.clear();
        put_int(&mut out, 0, 5, 1337);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        out.clear();
        put_int(&mut out, 0, 8, 42);
        assert_eq!(out, [0x2a]);
        out.clear();
        put_size_update(&mut out, 0);
        assert_eq!(out, [0x20]);
    }
}
