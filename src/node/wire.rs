//! Field-preserving edits of protobuf messages at the wire level.
//!
//! Decoding a message with generated bindings and encoding it again loses every field the bindings do
//! not know (prost drops unknown fields) and may reorder the rest. A proxy that must change one string
//! — `PullImageRequest.image.image` — and pass everything else to containerd untouched edits the bytes
//! instead: it walks the tag/length structure along a field path, replaces the string, and rewrites only
//! the length prefixes of the enclosing messages. Every other byte is copied as it came, in order,
//! including fields newer than pullgate's bindings.
//!
//! Repeated occurrences follow protobuf's merge rules: a parser merges repeated occurrences of an
//! embedded message and keeps the last occurrence of a scalar, so [`set_string`] rewrites *every*
//! occurrence along the path. Whatever a decoder downstream picks, it sees the new value.

/// Why bytes are not a well-formed protobuf message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated varint at byte {0}")]
    TruncatedVarint(usize),
    #[error("varint longer than 10 bytes at byte {0}")]
    VarintTooLong(usize),
    #[error("field number 0 or out of range at byte {0}")]
    BadFieldNumber(usize),
    #[error("unsupported wire type {wire_type} at byte {offset}")]
    BadWireType { wire_type: u8, offset: usize },
    #[error("field at byte {offset} needs {needed} bytes but only {available} remain")]
    Truncated {
        offset: usize,
        needed: u64,
        available: usize,
    },
    #[error("unbalanced group at byte {0}")]
    BadGroup(usize),
    #[error(
        "field {field} on the path has wire type {wire_type}, not a length-delimited message or string"
    )]
    NotLengthDelimited { field: u32, wire_type: u8 },
}

const WT_VARINT: u8 = 0;
const WT_I64: u8 = 1;
const WT_LEN: u8 = 2;
const WT_SGROUP: u8 = 3;
const WT_EGROUP: u8 = 4;
const WT_I32: u8 = 5;

/// One top-level field of a message: its number, wire type, where it starts, where its payload starts
/// (after the tag, and after the length for length-delimited fields), and where it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub number: u32,
    pub wire_type: u8,
    pub start: usize,
    pub payload: usize,
    pub end: usize,
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, WireError> {
    let start = *pos;
    let mut value: u64 = 0;
    for i in 0..10 {
        let Some(&b) = buf.get(*pos) else {
            return Err(WireError::TruncatedVarint(start));
        };
        *pos += 1;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(WireError::VarintTooLong(start))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Iterates over the top-level fields of a message, validating structure as it goes.
pub struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

/// Walks the top-level fields of `buf`.
pub fn fields(buf: &[u8]) -> Fields<'_> {
    Fields {
        buf,
        pos: 0,
        failed: false,
    }
}

impl Fields<'_> {
    fn next_field(&mut self) -> Result<Field, WireError> {
        let start = self.pos;
        let key = read_varint(self.buf, &mut self.pos)?;
        let number = key >> 3;
        let wire_type = (key & 7) as u8;
        if number == 0 || number > u64::from(u32::MAX >> 3) {
            return Err(WireError::BadFieldNumber(start));
        }
        let number = number as u32;
        let mut payload = self.pos;
        let remaining = |pos: usize| self.buf.len() - pos;
        let skip = |pos: usize, n: u64| -> Result<usize, WireError> {
            if n > remaining(pos) as u64 {
                Err(WireError::Truncated {
                    offset: start,
                    needed: n,
                    available: remaining(pos),
                })
            } else {
                Ok(pos + n as usize)
            }
        };
        let end = match wire_type {
            WT_VARINT => {
                read_varint(self.buf, &mut self.pos)?;
                self.pos
            }
            WT_I64 => skip(self.pos, 8)?,
            WT_I32 => skip(self.pos, 4)?,
            WT_LEN => {
                let len = read_varint(self.buf, &mut self.pos)?;
                payload = self.pos;
                skip(self.pos, len)?
            }
            WT_SGROUP => self.skip_group(number, start)?,
            WT_EGROUP => return Err(WireError::BadGroup(start)),
            other => {
                return Err(WireError::BadWireType {
                    wire_type: other,
                    offset: start,
                });
            }
        };
        self.pos = end;
        Ok(Field {
            number,
            wire_type,
            start,
            payload,
            end,
        })
    }

    /// Skips a (deprecated) group up to its matching end tag; returns the position after it.
    fn skip_group(&mut self, number: u32, start: usize) -> Result<usize, WireError> {
        loop {
            if self.pos >= self.buf.len() {
                return Err(WireError::BadGroup(start));
            }
            let before = self.pos;
            let key = read_varint(self.buf, &mut self.pos)?;
            if (key & 7) as u8 == WT_EGROUP {
                return if key >> 3 == u64::from(number) {
                    Ok(self.pos)
                } else {
                    Err(WireError::BadGroup(before))
                };
            }
            self.pos = before;
            self.next_field()?;
        }
    }
}

impl Iterator for Fields<'_> {
    type Item = Result<Field, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let r = self.next_field();
        self.failed = r.is_err();
        Some(r)
    }
}

/// The occurrences of field `number` at the top level of `msg`, each required to be
/// length-delimited (a message, string or bytes field).
fn len_delimited(msg: &[u8], number: u32) -> impl Iterator<Item = Result<Field, WireError>> + '_ {
    fields(msg).filter_map(move |f| match f {
        Err(e) => Some(Err(e)),
        Ok(f) if f.number != number => None,
        Ok(f) if f.wire_type != WT_LEN => Some(Err(WireError::NotLengthDelimited {
            field: number,
            wire_type: f.wire_type,
        })),
        Ok(f) => Some(Ok(f)),
    })
}

/// Checks that `buf` is a structurally valid message (every field's tag, wire type and length).
/// Nested messages are opaque bytes at this level and are not checked.
pub fn validate(buf: &[u8]) -> Result<(), WireError> {
    fields(buf).try_for_each(|f| f.map(|_| ()))
}

/// Sets the string (or bytes) field at `path` — field numbers of nested messages, ending with the
/// string field — to `value`, and returns the new message.
///
/// Every occurrence along the path is rewritten; if the path does not occur, the missing messages and
/// the field are appended at the end of the innermost message that exists. All other bytes are kept
/// exactly, in their original order.
pub fn set_string(msg: &[u8], path: &[u32], value: &[u8]) -> Result<Vec<u8>, WireError> {
    assert!(!path.is_empty(), "set_string needs a non-empty field path");
    let mut out = Vec::with_capacity(msg.len() + value.len() + 16);
    set_into(msg, path, value, &mut out)?;
    Ok(out)
}

fn set_into(msg: &[u8], path: &[u32], value: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
    let (target, rest) = (path[0], &path[1..]);
    let mut copied_to = 0;
    let mut found = false;
    for field in len_delimited(msg, target) {
        let field = field?;
        found = true;
        // Copy everything before this field untouched, including its tag.
        out.extend_from_slice(&msg[copied_to..field.start]);
        let tag_end = tag_len(&msg[field.start..]) + field.start;
        out.extend_from_slice(&msg[field.start..tag_end]);
        if rest.is_empty() {
            put_varint(out, value.len() as u64);
            out.extend_from_slice(value);
        } else {
            let mut inner = Vec::with_capacity(field.end - field.payload + value.len() + 8);
            set_into(&msg[field.payload..field.end], rest, value, &mut inner)?;
            put_varint(out, inner.len() as u64);
            out.extend_from_slice(&inner);
        }
        copied_to = field.end;
    }
    out.extend_from_slice(&msg[copied_to..]);
    if !found {
        append_path(out, path, value);
    }
    Ok(())
}

/// Length of the tag varint at the start of `buf` (already validated by the field walk).
fn tag_len(buf: &[u8]) -> usize {
    buf.iter()
        .position(|b| b & 0x80 == 0)
        .map_or(buf.len(), |i| i + 1)
}

/// Appends `path` as freshly encoded nested messages holding `value`.
fn append_path(out: &mut Vec<u8>, path: &[u32], value: &[u8]) {
    let mut payload = value.to_vec();
    for &number in path.iter().rev() {
        let mut wrapped = Vec::with_capacity(payload.len() + 8);
        put_varint(&mut wrapped, (u64::from(number) << 3) | u64::from(WT_LEN));
        put_varint(&mut wrapped, payload.len() as u64);
        wrapped.extend_from_slice(&payload);
        payload = wrapped;
    }
    out.extend_from_slice(&payload);
}

/// Removes every occurrence of the field at `path` (the last number is the field to drop; the ones
/// before it are enclosing messages, whose lengths are rewritten). Everything else is kept as is.
pub fn remove_field(msg: &[u8], path: &[u32]) -> Result<Vec<u8>, WireError> {
    assert!(
        !path.is_empty(),
        "remove_field needs a non-empty field path"
    );
    let mut out = Vec::with_capacity(msg.len());
    remove_into(msg, path, &mut out)?;
    Ok(out)
}

fn remove_into(msg: &[u8], path: &[u32], out: &mut Vec<u8>) -> Result<(), WireError> {
    let (target, rest) = (path[0], &path[1..]);
    let mut copied_to = 0;
    for field in fields(msg) {
        let field = field?;
        if field.number != target {
            continue;
        }
        out.extend_from_slice(&msg[copied_to..field.start]);
        copied_to = field.end;
        if rest.is_empty() {
            continue; // dropped
        }
        if field.wire_type != WT_LEN {
            return Err(WireError::NotLengthDelimited {
                field: target,
                wire_type: field.wire_type,
            });
        }
        let mut inner = Vec::with_capacity(field.end - field.payload);
        remove_into(&msg[field.payload..field.end], rest, &mut inner)?;
        let tag_end = tag_len(&msg[field.start..]) + field.start;
        out.extend_from_slice(&msg[field.start..tag_end]);
        put_varint(out, inner.len() as u64);
        out.extend_from_slice(&inner);
    }
    out.extend_from_slice(&msg[copied_to..]);
    Ok(())
}

/// Appends one more occurrence of length-delimited field `number` (a repeated string, or a message)
/// holding `value` at the end of `msg`.
pub fn append_bytes(msg: &mut Vec<u8>, number: u32, value: &[u8]) {
    append_path(msg, &[number], value);
}

/// Rewrites each occurrence of the length-delimited field `number` (typically the elements of a
/// repeated message field) with `edit`, which returns `Some(new bytes)` to replace an element or
/// `None` to keep it byte for byte. Other fields are copied untouched.
pub fn map_repeated(
    msg: &[u8],
    number: u32,
    mut edit: impl FnMut(&[u8]) -> Result<Option<Vec<u8>>, WireError>,
) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(msg.len() + 64);
    let mut copied_to = 0;
    for field in len_delimited(msg, number) {
        let field = field?;
        if let Some(new) = edit(&msg[field.payload..field.end])? {
            out.extend_from_slice(&msg[copied_to..field.start]);
            append_path(&mut out, &[number], &new);
            copied_to = field.end;
        }
    }
    out.extend_from_slice(&msg[copied_to..]);
    Ok(out)
}

/// All values of a repeated string (or bytes) field `number` at the top level of `msg`, in order.
pub fn repeated_strings(msg: &[u8], number: u32) -> Result<Vec<&[u8]>, WireError> {
    let mut out = Vec::new();
    for field in fields(msg) {
        let field = field?;
        if field.number == number && field.wire_type == WT_LEN {
            out.push(&msg[field.payload..field.end]);
        }
    }
    Ok(out)
}

/// Reads the string field at `path` with protobuf's merge semantics (the last occurrence wins,
/// across all occurrences of the enclosing messages). `None` if it does not occur.
pub fn get_string<'a>(msg: &'a [u8], path: &[u32]) -> Result<Option<&'a [u8]>, WireError> {
    let (target, rest) = (path[0], &path[1..]);
    let mut last = None;
    for field in len_delimited(msg, target) {
        let field = field?;
        let payload = &msg[field.payload..field.end];
        if rest.is_empty() {
            last = Some(payload);
        } else if let Some(v) = get_string(payload, rest)? {
            last = Some(v);
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::{
        AuthConfig, ImageSpec, PodSandboxConfig, PodSandboxMetadata, PullImageRequest,
    };
    use proptest::prelude::*;
    use prost::Message;

    /// Field path of `PullImageRequest.image.image`.
    const IMAGE_IMAGE: &[u32] = &[1, 1];

    fn key(number: u32, wt: u8) -> Vec<u8> {
        let mut v = Vec::new();
        put_varint(&mut v, (u64::from(number) << 3) | u64::from(wt));
        v
    }

    fn len_field(number: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = key(number, WT_LEN);
        put_varint(&mut v, payload.len() as u64);
        v.extend_from_slice(payload);
        v
    }

    fn pull_request() -> PullImageRequest {
        PullImageRequest {
            image: Some(ImageSpec {
                image: "nginx:1.25".into(),
                annotations: [("a".to_string(), "b".to_string())].into(),
                user_specified_image: "nginx:1.25".into(),
                runtime_handler: "runc".into(),
            }),
            auth: Some(AuthConfig {
                username: "u".into(),
                password: "p".into(),
                ..Default::default()
            }),
            sandbox_config: Some(PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: "web".into(),
                    namespace: "shop".into(),
                    uid: "1234".into(),
                    attempt: 1,
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn rewrite_keeps_every_other_known_field() {
        let req = pull_request();
        let bytes = req.encode_to_vec();
        let new = "registry.corp/approved/library/nginx@sha256:".to_string() + &"a".repeat(64);
        let out = set_string(&bytes, IMAGE_IMAGE, new.as_bytes()).unwrap();
        let decoded = PullImageRequest::decode(out.as_slice()).unwrap();
        let mut expected = req.clone();
        expected.image.as_mut().unwrap().image = new.clone();
        assert_eq!(decoded, expected);
        // Only the ImageSpec changed: auth and sandbox_config bytes are identical slices.
        assert!(contains(&out, &req.auth.as_ref().unwrap().encode_to_vec()));
        assert!(contains(
            &out,
            &req.sandbox_config.as_ref().unwrap().encode_to_vec()
        ));
        assert_eq!(get_string(&out, IMAGE_IMAGE).unwrap(), Some(new.as_bytes()));
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn unknown_fields_survive_byte_for_byte() {
        // ImageSpec with unknown fields of every wire type before and after `image`.
        let mut prefix = key(40, WT_VARINT);
        prefix.extend([0xff, 0xff, 0x03]);
        let mut suffix = key(41, WT_I64);
        suffix.extend([1, 2, 3, 4, 5, 6, 7, 8]);
        suffix.extend(key(42, WT_I32));
        suffix.extend([9, 9, 9, 9]);
        suffix.extend(len_field(43, b"future nested message"));
        suffix.extend(key(44, WT_SGROUP));
        suffix.extend(key(1, WT_VARINT));
        suffix.push(5);
        suffix.extend(key(44, WT_EGROUP));
        let spec_with =
            |image: &[u8]| [prefix.clone(), len_field(1, image), suffix.clone()].concat();
        let msg_with = |image: &[u8]| {
            let mut msg = len_field(100, b"unknown top-level before");
            msg.extend(len_field(1, &spec_with(image)));
            msg.extend(key(200, WT_VARINT));
            msg.push(1);
            msg
        };
        let msg = msg_with(b"busybox");

        let out = set_string(&msg, IMAGE_IMAGE, b"registry.corp/x@sha256:00").unwrap();
        assert_eq!(out, msg_with(b"registry.corp/x@sha256:00"));

        // And back again gives the original bytes exactly.
        assert_eq!(set_string(&out, IMAGE_IMAGE, b"busybox").unwrap(), msg);
    }

    #[test]
    fn every_occurrence_is_rewritten() {
        // Two ImageSpec occurrences (a parser merges them), the second with two `image` fields.
        let mut msg = Vec::new();
        msg.extend(len_field(1, &len_field(1, b"first")));
        msg.extend(len_field(50, b"unknown"));
        let mut second = len_field(1, b"second");
        second.extend(len_field(1, b"third"));
        msg.extend(len_field(1, &second));
        assert_eq!(get_string(&msg, IMAGE_IMAGE).unwrap(), Some(&b"third"[..]));

        let out = set_string(&msg, IMAGE_IMAGE, b"pinned").unwrap();
        let decoded = PullImageRequest::decode(out.as_slice()).unwrap();
        assert_eq!(decoded.image.unwrap().image, "pinned");
        let mut want = Vec::new();
        want.extend(len_field(1, &len_field(1, b"pinned")));
        want.extend(len_field(50, b"unknown"));
        let mut second = len_field(1, b"pinned");
        second.extend(len_field(1, b"pinned"));
        want.extend(len_field(1, &second));
        assert_eq!(out, want);
    }

    #[test]
    fn missing_path_is_appended() {
        let msg = len_field(3, b"sandbox");
        let out = set_string(&msg, IMAGE_IMAGE, b"img").unwrap();
        assert_eq!(out[..msg.len()], msg[..]);
        assert_eq!(get_string(&out, IMAGE_IMAGE).unwrap(), Some(&b"img"[..]));
        // An existing ImageSpec without `image` gets the field appended inside it.
        let msg = len_field(1, &len_field(2, b"annotation entry"));
        let out = set_string(&msg, IMAGE_IMAGE, b"img").unwrap();
        let mut inner = len_field(2, b"annotation entry");
        inner.extend(len_field(1, b"img"));
        assert_eq!(out, len_field(1, &inner));
    }

    #[test]
    fn length_prefixes_grow_across_varint_boundaries() {
        // A 120-byte value inside a small spec: the inner and outer lengths both need 2 bytes now.
        let msg = pull_request().encode_to_vec();
        let long = "r".repeat(300);
        let out = set_string(&msg, IMAGE_IMAGE, long.as_bytes()).unwrap();
        let decoded = PullImageRequest::decode(out.as_slice()).unwrap();
        assert_eq!(decoded.image.as_ref().unwrap().image, long);
        assert_eq!(decoded.sandbox_config, pull_request().sandbox_config);
        let back = set_string(&out, IMAGE_IMAGE, b"nginx:1.25").unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x0a], "truncated varint"),
            (vec![0x0a, 0x05, b'a'], "needs 5 bytes"),
            (vec![0x00, 0x01], "field number 0"),
            (vec![0x0f], "wire type 7"),
            (vec![0x0c], "group"),
            (vec![0x0b, 0x08, 0x01], "group"),
            (
                vec![
                    0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
                ],
                "10 bytes",
            ),
            (vec![0x08, 0x01], "wire type 0"),
        ];
        for (bytes, want) in cases {
            let e = set_string(&bytes, IMAGE_IMAGE, b"x")
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{bytes:?}: {e}");
        }
        // A nested message that is not well-formed is an error too.
        let e = set_string(&len_field(1, &[0x0a, 0x09]), IMAGE_IMAGE, b"x").unwrap_err();
        assert!(matches!(e, WireError::Truncated { .. }), "{e}");
    }

    #[test]
    fn remove_field_drops_credentials_and_keeps_the_rest() {
        let mut req = pull_request().encode_to_vec();
        req.extend(len_field(77, b"future"));
        let out = remove_field(&req, &[2]).unwrap();
        let decoded = PullImageRequest::decode(out.as_slice()).unwrap();
        let mut want = pull_request();
        want.auth = None;
        assert_eq!(decoded, want);
        assert!(out.ends_with(&len_field(77, b"future")));
        assert!(!contains(&out, b"p\x12"), "password bytes gone");
        // Removing inside a nested message rewrites the enclosing length only.
        let out = remove_field(&req, &[1, 2]).unwrap();
        let decoded = PullImageRequest::decode(out.as_slice()).unwrap();
        assert!(decoded.image.as_ref().unwrap().annotations.is_empty());
        assert_eq!(decoded.image.unwrap().image, "nginx:1.25");
        assert_eq!(
            remove_field(&req, &[99]).unwrap(),
            req,
            "absent field: unchanged"
        );
    }

    #[test]
    fn map_repeated_edits_only_chosen_elements() {
        let mut msg = len_field(1, &len_field(2, b"a:1"));
        msg.extend(key(5, WT_VARINT));
        msg.push(3);
        msg.extend(len_field(1, &len_field(2, b"b:1")));
        let out = map_repeated(&msg, 1, |elem| {
            let tags = repeated_strings(elem, 2)?;
            Ok((tags == [b"b:1"]).then(|| {
                let mut e = elem.to_vec();
                append_bytes(&mut e, 2, b"docker.io/library/b:1");
                e
            }))
        })
        .unwrap();
        let mut want = len_field(1, &len_field(2, b"a:1"));
        want.extend(key(5, WT_VARINT));
        want.push(3);
        let mut second = len_field(2, b"b:1");
        second.extend(len_field(2, b"docker.io/library/b:1"));
        want.extend(len_field(1, &second));
        assert_eq!(out, want);
        assert_eq!(map_repeated(&msg, 1, |_| Ok(None)).unwrap(), msg);
    }

    proptest! {
        /// For any message built from arbitrary fields, rewriting `image.image` keeps every other
        /// field's bytes and order, and the rewrite is reversible.
        #[test]
        fn rewrite_preserves_all_other_bytes(
            before in proptest::collection::vec((2u32..500, proptest::collection::vec(any::<u8>(), 0..40)), 0..6),
            after in proptest::collection::vec((2u32..500, proptest::collection::vec(any::<u8>(), 0..40)), 0..6),
            inner_extra in proptest::collection::vec((2u32..500, any::<u64>()), 0..6),
            original in "[a-z0-9./:-]{1,80}",
            replacement in "[a-z0-9./:@-]{0,200}",
        ) {
            let others = |fs: &[(u32, Vec<u8>)]| fs.iter().flat_map(|(n, p)| len_field(*n, p)).collect::<Vec<u8>>();
            let mut spec = len_field(1, original.as_bytes());
            for (n, v) in &inner_extra {
                spec.extend(key(*n, WT_VARINT));
                put_varint(&mut spec, *v);
            }
            let mut msg = others(&before);
            msg.extend(len_field(1, &spec));
            msg.extend(others(&after));

            let out = set_string(&msg, IMAGE_IMAGE, replacement.as_bytes()).unwrap();
            let mut want_spec = len_field(1, replacement.as_bytes());
            want_spec.extend_from_slice(&spec[len_field(1, original.as_bytes()).len()..]);
            let mut want = others(&before);
            want.extend(len_field(1, &want_spec));
            want.extend(others(&after));
            prop_assert_eq!(&out, &want);
            prop_assert_eq!(set_string(&out, IMAGE_IMAGE, original.as_bytes()).unwrap(), msg);
        }

        /// Arbitrary bytes never panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = set_string(&bytes, IMAGE_IMAGE, b"x");
            let _ = get_string(&bytes, IMAGE_IMAGE);
            let _ = validate(&bytes);
        }
    }
}
