//! Decoding HPACK's Huffman-coded strings (RFC 7541 §5.2, Appendix B) at table speed.
//!
//! Every header block a client sends is decoded, and gRPC clients Huffman-code most strings, so
//! this runs on every call. The code (each symbol's length and bits) is `httlib-huffman`'s table of
//! RFC 7541 Appendix B; the decoding here is pullgate's: a lookup of the next [`FAST_BITS`] bits
//! decodes every symbol whose code is that short (the letters, digits and punctuation of header
//! names, paths and content types), and the rare longer codes are decoded by their lengths, which
//! a canonical code allows: the codes of one length are consecutive numbers, in symbol order, after
//! those of the shorter lengths.
//!
//! The end of a string is checked as RFC 7541 §5.2 requires: padding of at most 7 bits, all ones
//! (a prefix of the EOS code), and no EOS symbol inside.

use std::sync::OnceLock;

/// Bits looked up at once. Codes of 5 to 10 bits cover every byte of ordinary header text.
const FAST_BITS: u32 = 10;
/// The longest code (EOS's).
const MAX_BITS: u32 = 30;
/// The end-of-string symbol, never valid inside a string.
const EOS: u16 = 256;

/// A string that is not valid Huffman-coded HPACK text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid;

struct Tables {
    /// For every [`FAST_BITS`]-bit prefix: the symbol whose code it starts with and the code's
    /// length, or length 0 when the code is longer.
    fast: Vec<(u16, u8)>,
    /// Per code length: the first code of that length, and where its symbols start in `symbols`.
    first: [(u32, u16); MAX_BITS as usize + 1],
    /// Per code length: how many codes have it.
    count: [u16; MAX_BITS as usize + 1],
    /// The symbols ordered by code.
    symbols: Vec<u16>,
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(build)
}

fn build() -> Tables {
    let code = &httlib_huffman::encoder::table::ENCODE_TABLE;
    let mut symbols: Vec<u16> = (0..=EOS).collect();
    symbols.sort_by_key(|&s| (code[s as usize].0, code[s as usize].1));
    let mut first = [(0u32, 0u16); MAX_BITS as usize + 1];
    let mut count = [0u16; MAX_BITS as usize + 1];
    for (i, &s) in symbols.iter().enumerate().rev() {
        let (len, bits) = code[s as usize];
        first[len as usize] = (bits, i as u16);
        count[len as usize] += 1;
    }
    let mut fast = vec![(0u16, 0u8); 1 << FAST_BITS];
    for s in 0..=EOS {
        let (len, bits) = code[s as usize];
        if u32::from(len) <= FAST_BITS {
            let shift = FAST_BITS - u32::from(len);
            let start = (bits << shift) as usize;
            for entry in &mut fast[start..start + (1 << shift)] {
                *entry = (s, len);
            }
        }
    }
    Tables {
        fast,
        first,
        count,
        symbols,
    }
}

/// Appends the decoding of `src` to `out`.
pub fn decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), Invalid> {
    let t = tables();
    out.reserve(src.len() * 8 / 5 + 1);
    // The bits not decoded yet are the low `bits` bits of `acc` (at most 7 + 30 + 8 of them).
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    for &byte in src {
        acc = (acc << 8) | u64::from(byte);
        bits += 8;
        while bits >= 5 {
            // The next FAST_BITS bits, padded with zeros past the end of what has arrived: a code
            // no longer than what has arrived is decided by the bits that have.
            let peek = if bits >= FAST_BITS {
                (acc >> (bits - FAST_BITS)) as usize
            } else {
                (acc << (FAST_BITS - bits)) as usize
            } & ((1 << FAST_BITS) - 1);
            let (symbol, len) = match t.fast[peek] {
                (symbol, len) if len > 0 => (symbol, u32::from(len)),
                _ => match long(t, acc, bits)? {
                    Some(found) => found,
                    None => break,
                },
            };
            if len > bits {
                break;
            }
            if symbol == EOS {
                return Err(Invalid);
            }
            out.push(symbol as u8);
            bits -= len;
            acc &= (1u64 << bits) - 1;
        }
    }
    // What is left must be padding: fewer than 8 bits, all ones.
    if bits > 7 || acc != (1u64 << bits) - 1 {
        return Err(Invalid);
    }
    Ok(())
}

/// A code longer than [`FAST_BITS`] at the top of the `bits` bits of `acc`: `None` if more bits
/// are needed to tell.
fn long(t: &Tables, acc: u64, bits: u32) -> Result<Option<(u16, u32)>, Invalid> {
    for len in FAST_BITS + 1..=MAX_BITS.min(bits) {
        let code = (acc >> (bits - len)) as u32 & ((1u32 << len) - 1);
        let (first, at) = t.first[len as usize];
        let n = u32::from(t.count[len as usize]);
        if n > 0 && code >= first && code - first < n {
            let symbol = t.symbols[usize::from(at) + (code - first) as usize];
            return Ok(Some((symbol, len)));
        }
    }
    match bits >= MAX_BITS {
        // Every 30-bit string starts with some code; none did.
        true => Err(Invalid),
        false => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(src: &[u8]) -> Result<Vec<u8>, Invalid> {
        let mut out = Vec::new();
        decode(src, &mut out).map(|()| out)
    }

    #[test]
    fn the_code_is_canonical() {
        // Decoding by lengths relies on it: within a length, codes rise with the symbol, and each
        // length's first code follows the last code of the shorter lengths.
        let code = &httlib_huffman::encoder::table::ENCODE_TABLE;
        let mut sorted: Vec<usize> = (0..=256).collect();
        sorted.sort_by_key(|&s| (code[s].0, s));
        let mut next = 0u32;
        let mut len = code[sorted[0]].0;
        for s in sorted {
            let (l, bits) = code[s];
            next <<= l - len;
            len = l;
            assert_eq!(bits, next, "symbol {s}");
            next += 1;
        }
    }

    #[test]
    fn rfc7541_examples_decode() {
        // RFC 7541 C.4.1 and C.6.1.
        let www = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        assert_eq!(ours(&www).unwrap(), b"www.example.com");
        let date = [
            0xd0, 0x7a, 0xbe, 0x94, 0x10, 0x54, 0xd4, 0x44, 0xa8, 0x20, 0x05, 0x95, 0x04, 0x0b,
            0x81, 0x66, 0xe0, 0x82, 0xa6, 0x2d, 0x1b, 0xff,
        ];
        assert_eq!(ours(&date).unwrap(), b"Mon, 21 Oct 2013 20:13:21 GMT");
        assert_eq!(ours(&[]).unwrap(), b"");
    }

    #[test]
    fn every_byte_string_round_trips_as_httlib_huffman_decodes_it() {
        // Every symbol alone, and pseudo-random strings over all bytes and over header text.
        let mut inputs: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..2000 {
            let len = (next() % 64) as usize;
            let text = b"abcdefghijklmnopqrstuvwxyz0123456789/-._:;= ";
            inputs.push(
                (0..len)
                    .map(|_| match i % 2 {
                        0 => next() as u8,
                        _ => text[(next() % text.len() as u64) as usize],
                    })
                    .collect(),
            );
        }
        for input in inputs {
            let mut coded = Vec::new();
            httlib_huffman::encode(&input, &mut coded).unwrap();
            assert_eq!(ours(&coded).unwrap(), input, "{coded:02x?}");
            let mut theirs = Vec::new();
            httlib_huffman::decode(&coded, &mut theirs, httlib_huffman::DecoderSpeed::FiveBits)
                .unwrap();
            assert_eq!(theirs, input);
        }
    }

    #[test]
    fn bad_padding_and_eos_are_refused() {
        // 'a' is 00011 (5 bits): padded with three ones is valid; with zeros, or with a whole
        // byte of ones more, it is not.
        assert_eq!(ours(&[0b0001_1111]).unwrap(), b"a");
        assert_eq!(ours(&[0b0001_1000]), Err(Invalid));
        assert_eq!(ours(&[0b0001_1111, 0xff]), Err(Invalid));
        // The EOS code (30 ones) inside a string.
        assert_eq!(ours(&[0xff, 0xff, 0xff, 0xfc]), Err(Invalid));
        assert_eq!(ours(&[0xff, 0xff, 0xff, 0xff]), Err(Invalid));
    }
}
