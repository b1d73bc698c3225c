//! The compiled form of a verified bundle: the node's index, written once when a bundle is installed
//! and read back at every start instead of parsing the JSON again.
//!
//! It holds exactly what [`Bundle`] holds, already validated: strings that repeat (sources, scope
//! paths, licences, scanners, approvers) once each in a table, digests as bytes, numbers as LEB128.
//! Reading it allocates the same structures the JSON parse builds, without the JSON syntax, the
//! validation or the digest and reference parsing. It is bound to the signed JSON by the SHA-512 the
//! signatures cover, so the signatures are still checked against the trust file at every start; its
//! body carries a SHA-256 so that a damaged file is refused instead of read.
//!
//! ```text
//! MAGIC                       b"pullgate compiled bundle\n"
//! codec version               u32, little endian (CODEC_VERSION)
//! build                       u8 length + bytes: the pullgate version that wrote it
//! signed SHA-512              64 bytes: what the bundle's signatures cover
//! signed length               u64 LE: length of the signed JSON
//! JSON modified               i128 LE: the JSON file's modification time when compiled (ns)
//! body length                 u64 LE
//! checksum                    32 bytes: SHA-256 of everything before it and of the body
//! body                        string table, then the bundle
//! ```
//!
//! An index of another codec version or another pullgate version is not read at all (the types it
//! fills can change between versions): the caller compiles the JSON again. This module is pure; the
//! node's bundle store decides where the file lives and when to trust it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sha2::Digest as _;
use time::{OffsetDateTime, UtcOffset};

use super::{
    Bundle, Exception, FirstParty, ImageEntry, Lifecycle, Mirror, Provenance, Scan, Severity,
    SignedBytes,
};
use crate::policy::license::LicenseExpression;
use crate::policy::reference::Digest;
use crate::policy::rollout::Step;
use crate::policy::rules::{Rules, Set};
use crate::policy::scope::{Mode, ScopeId, ScopeNode, Scopes};

/// First bytes of every compiled bundle.
pub const MAGIC: &[u8] = b"pullgate compiled bundle\n";
/// Version of the layout below; bumped with any change to it.
pub const CODEC_VERSION: u32 = 1;
/// The pullgate version that writes and reads this build's indexes.
const BUILD: &str = env!("CARGO_PKG_VERSION");

/// Why a compiled bundle was not read. None of these is a policy decision: the caller falls back to
/// the signed JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompiledError {
    #[error("not a compiled bundle (it does not start with pullgate's header)")]
    NotCompiled,
    #[error(
        "written by another version (codec {codec}, pullgate {build}; this is codec {CODEC_VERSION}, pullgate {BUILD})"
    )]
    OtherVersion { codec: u32, build: String },
    #[error("its checksum does not match its content (the file is damaged)")]
    Damaged,
    #[error("its content is invalid at byte {at}: {what}")]
    Invalid { at: u64, what: &'static str },
    #[error("it cannot be read: {0}")]
    Io(String),
}

/// A compiled bundle read back: the bundle, the signed bytes it was compiled from (not yet checked
/// against any signature) and the JSON file's modification time then.
#[derive(Debug)]
pub struct Compiled {
    pub bundle: Bundle,
    pub signed: SignedBytes,
    /// Nanoseconds since the Unix epoch.
    pub json_modified: i128,
}

/// Compiles a bundle (whose signed JSON is described by `signed`, in a file last modified at
/// `json_modified`, nanoseconds since the Unix epoch) into its index form.
pub fn compile(bundle: &Bundle, signed: &SignedBytes, json_modified: i128) -> Vec<u8> {
    let mut w = Writer::default();
    w.bundle(bundle);
    let mut body = Vec::with_capacity(w.out.len() + w.table.len() * 24 + 16);
    put_varint(&mut body, w.table.len() as u64);
    for s in &w.table {
        put_varint(&mut body, s.len() as u64);
        body.extend_from_slice(s.as_bytes());
    }
    body.extend_from_slice(&w.out);

    let mut out = Vec::with_capacity(body.len() + 200);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&CODEC_VERSION.to_le_bytes());
    out.push(BUILD.len() as u8);
    out.extend_from_slice(BUILD.as_bytes());
    out.extend_from_slice(&signed.sha512);
    out.extend_from_slice(&signed.len.to_le_bytes());
    out.extend_from_slice(&json_modified.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let sum = checksum(&out, &body);
    out.extend_from_slice(&sum);
    out.extend_from_slice(&body);
    out
}

fn checksum(head: &[u8], body: &[u8]) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update(head);
    h.update(body);
    h.finalize().into()
}

/// Reads a compiled bundle from `reader` (a body over `max` bytes is refused before it is read):
/// checks the header, decodes the body while hashing it, and returns the bundle only if the checksum
/// matches. The file is streamed, never held whole next to the bundle it becomes.
pub fn read(reader: impl std::io::Read, max: u64) -> Result<Compiled, CompiledError> {
    let mut r = Reader::new(reader);
    let magic = r
        .bytes(MAGIC.len())
        .map_err(|_| CompiledError::NotCompiled)?;
    if magic != MAGIC {
        return Err(CompiledError::NotCompiled);
    }
    let codec = u32::from_le_bytes(r.array()?);
    let build_len = r.u8()? as usize;
    let build = String::from_utf8_lossy(r.bytes(build_len)?).into_owned();
    if codec != CODEC_VERSION || build != BUILD {
        return Err(CompiledError::OtherVersion { codec, build });
    }
    let sha512: [u8; 64] = r.array()?;
    let len = u64::from_le_bytes(r.array()?);
    let json_modified = i128::from_le_bytes(r.array()?);
    let body_len = u64::from_le_bytes(r.array()?);
    if body_len > max {
        return Err(r.invalid("the body is larger than the limit"));
    }
    r.flush_hash();
    let sum: [u8; 32] = r.array()?;
    r.skip_hash();
    r.set_end_of_body(r.offset() + body_len);

    let decoded = r.body();
    // Whatever the decoder did not read is hashed too, so that damage is reported as such.
    let rest = r.drain();
    let damaged = r.finish_hash() != sum;
    match (decoded, rest) {
        _ if damaged => Err(CompiledError::Damaged),
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(e),
        (Ok(bundle), Ok(())) => Ok(Compiled {
            bundle,
            signed: SignedBytes { sha512, len },
            json_modified,
        }),
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Encodes a bundle; repeated strings go to `table` once.
#[derive(Default)]
struct Writer {
    out: Vec<u8>,
    table: Vec<Arc<str>>,
    index: HashMap<Arc<str>, u32>,
}

impl Writer {
    fn varint(&mut self, v: u64) {
        put_varint(&mut self.out, v);
    }
    fn bool(&mut self, b: bool) {
        self.out.push(b as u8);
    }
    fn i64(&mut self, v: i64) {
        // Zigzag: small magnitudes stay short.
        self.varint(((v << 1) ^ (v >> 63)) as u64);
    }
    fn str(&mut self, s: &str) {
        self.varint(s.len() as u64);
        self.out.extend_from_slice(s.as_bytes());
    }
    fn shared(&mut self, s: &Arc<str>) {
        let next = self.table.len() as u32;
        let i = *self.index.entry(s.clone()).or_insert_with(|| {
            self.table.push(s.clone());
            next
        });
        self.varint(i as u64);
    }
    fn time(&mut self, t: OffsetDateTime) {
        let nanos = t.unix_timestamp_nanos();
        self.i64((nanos / 1_000_000_000) as i64);
        self.varint((nanos.rem_euclid(1_000_000_000)) as u64);
        self.i64(t.offset().whole_seconds() as i64);
    }
    fn opt_time(&mut self, t: Option<OffsetDateTime>) {
        self.bool(t.is_some());
        if let Some(t) = t {
            self.time(t);
        }
    }
    fn digest(&mut self, d: &Digest) {
        match d {
            Digest::Sha256(b) => {
                self.out.push(0);
                self.out.extend_from_slice(b);
            }
            Digest::Sha512(b) => {
                self.out.push(1);
                self.out.extend_from_slice(&b[..]);
            }
        }
    }

    fn bundle(&mut self, b: &Bundle) {
        self.varint(b.format as u64);
        self.varint(b.version);
        self.time(b.issued_at);
        self.time(b.expires_at);
        self.str(&b.issuer);
        self.str(&b.private_registry);
        self.varint(b.mirrors.len() as u64);
        for m in &b.mirrors {
            self.str(&m.source_domain);
            self.str(&m.source_path);
            self.str(&m.target_path);
        }
        self.scopes(&b.scopes);
        self.varint(b.first_party.len() as u64);
        for f in &b.first_party {
            self.str(&f.path);
            self.varint(f.scope as u64);
            self.bool(f.require_digest);
        }
        self.varint(b.images.len() as u64);
        for e in &b.images {
            self.image(e);
        }
        self.varint(b.exceptions.len() as u64);
        for e in &b.exceptions {
            self.shared(&e.source);
            self.digest(&e.digest);
            self.bool(e.tag.is_some());
            if let Some(t) = &e.tag {
                self.str(t);
            }
            self.varint(e.scope as u64);
            self.time(e.expires_at);
            self.str(&e.ticket);
            self.str(&e.reason);
            self.str(&e.approved_by);
        }
        self.bool(b.rollout.is_some());
        if let Some(steps) = &b.rollout {
            self.varint(steps.len() as u64);
            for s in steps.iter() {
                self.varint(s.after.as_secs());
                self.varint(s.after.subsec_nanos() as u64);
                self.varint(s.percent as u64);
            }
        }
        // Licence expressions are parsed again when read (there are few distinct ones); sorted so
        // the same bundle always compiles to the same bytes.
        let mut licenses: Vec<&Arc<str>> = b.licenses.keys().collect();
        licenses.sort();
        self.varint(licenses.len() as u64);
        for l in licenses {
            self.shared(l);
        }
    }

    fn scopes(&mut self, s: &Scopes) {
        let (nodes, namespaces, label) = s.parts();
        self.str(label);
        self.varint(nodes.len() as u64);
        for n in nodes {
            self.shared(&n.path);
            self.varint(n.parent.map_or(0, |p| p as u64 + 1));
            self.bool(n.mode == Mode::Warn);
            self.bool(n.rules.is_some());
            if let Some(r) = &n.rules {
                self.rules(r);
            }
            self.varint(n.apps().len() as u64);
            for (name, id) in n.apps() {
                self.str(name);
                self.varint(*id as u64);
            }
        }
        let mut bound: Vec<(&Box<str>, &ScopeId)> = namespaces.iter().collect();
        bound.sort();
        self.varint(bound.len() as u64);
        for (ns, id) in bound {
            self.str(ns);
            self.varint(*id as u64);
        }
    }

    fn rules(&mut self, r: &Rules) {
        self.varint(r.min_scanners.value as u64);
        self.shared(&r.min_scanners.from);
        self.out.push(severity_code(r.max_severity.value));
        self.shared(&r.max_severity.from);
        for list in [&r.allow, &r.deny] {
            self.bool(list.is_some());
            if let Some(set) = list {
                self.varint(set.value.len() as u64);
                for l in set.value.iter() {
                    self.str(l);
                }
                self.shared(&set.from);
            }
        }
    }

    fn image(&mut self, e: &ImageEntry) {
        self.shared(&e.source);
        self.varint(e.scope as u64);
        self.varint(e.tags.len() as u64);
        for (t, d) in e.tags.iter() {
            self.str(t);
            self.digest(d);
        }
        self.varint(e.digests.len() as u64);
        for d in e.digests.iter() {
            self.digest(d);
        }
        self.varint(e.lifecycles.len() as u64);
        for (i, l) in e.lifecycles.iter() {
            self.varint(*i as u64);
            self.opt_time(l.deprecated_at);
            self.opt_time(l.sunset_at);
            self.bool(l.replacement.is_some());
            if let Some(r) = &l.replacement {
                self.shared(r);
            }
        }
        let p = &e.provenance;
        self.shared(&p.license);
        self.varint(p.scans.len() as u64);
        for s in p.scans.iter() {
            self.shared(&s.scanner);
            self.shared(&s.version);
            self.digest(&s.report);
            self.out.push(severity_code(s.worst_severity));
        }
        self.shared(&p.approved_by);
        self.i64(p.approved_at);
    }
}

const SEVERITIES: [Severity; 6] = [
    Severity::None,
    Severity::Unknown,
    Severity::Low,
    Severity::Medium,
    Severity::High,
    Severity::Critical,
];

fn severity_code(s: Severity) -> u8 {
    SEVERITIES.iter().position(|x| *x == s).expect("listed") as u8
}

/// Decodes what [`Writer`] wrote, from a reader, through a buffer: every byte that leaves the buffer
/// goes through the checksum's hash unless skipped. Every length is checked against the bytes left
/// and every id against what it indexes, so damaged content is an error, never a panic or a huge
/// allocation.
struct Reader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Unread bytes are `buf[pos..end]`; `buf[hashed..pos]` are read and not hashed yet.
    pos: usize,
    end: usize,
    /// `end`, or where the body ends if that is sooner: below it a byte can be read without checks.
    stop: usize,
    hashed: usize,
    /// Offset in the file of `buf[0]`.
    base: u64,
    /// Offset in the file where the body ends (the whole file until the header is read).
    end_of_body: u64,
    hash: sha2::Sha256,
    table: Vec<Arc<str>>,
}

type Read<T> = Result<T, CompiledError>;

const CHUNK: usize = 256 * 1024;

/// The most items reserved for at once: counts are decoded before the checksum is known, so a
/// damaged count may reserve no more than this (a collection that is really larger grows).
const RESERVE_MAX: usize = 1 << 16;

/// What to reserve for `n` items read from the file.
fn reserve(n: usize) -> usize {
    n.min(RESERVE_MAX)
}

impl<R: std::io::Read> Reader<R> {
    fn new(inner: R) -> Self {
        Reader {
            inner,
            buf: vec![0; CHUNK],
            pos: 0,
            end: 0,
            stop: 0,
            hashed: 0,
            base: 0,
            end_of_body: u64::MAX,
            hash: sha2::Sha256::new(),
            table: Vec::new(),
        }
    }
    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }
    fn set_end_of_body(&mut self, end: u64) {
        self.end_of_body = end;
        self.update_stop();
    }
    fn update_stop(&mut self) {
        let body_left = self.end_of_body.saturating_sub(self.base);
        self.stop = self
            .end
            .min(usize::try_from(body_left).unwrap_or(usize::MAX));
    }
    fn invalid(&self, what: &'static str) -> CompiledError {
        CompiledError::Invalid {
            at: self.offset(),
            what,
        }
    }
    fn flush_hash(&mut self) {
        self.hash.update(&self.buf[self.hashed..self.pos]);
        self.hashed = self.pos;
    }
    fn skip_hash(&mut self) {
        self.hashed = self.pos;
    }
    fn finish_hash(&mut self) -> [u8; 32] {
        self.flush_hash();
        std::mem::take(&mut self.hash).finalize().into()
    }
    /// Makes `n` unread bytes available in the buffer, reading more; `false` at the end of the file.
    fn fill(&mut self, n: usize) -> Read<bool> {
        let filled = self.fill_unchecked(n);
        self.update_stop();
        filled
    }
    fn fill_unchecked(&mut self, n: usize) -> Read<bool> {
        if self.end - self.pos >= n {
            return Ok(true);
        }
        self.flush_hash();
        self.buf.copy_within(self.pos..self.end, 0);
        self.base += self.pos as u64;
        self.end -= self.pos;
        self.pos = 0;
        self.hashed = 0;
        if self.buf.len() < n {
            self.buf.resize(n.next_multiple_of(CHUNK), 0);
        }
        while self.end < n {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(k) => self.end += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(CompiledError::Io(e.to_string()));
                }
            }
        }
        Ok(true)
    }
    /// Reads (and hashes) the rest of the body, then makes sure nothing follows it. Reads at most
    /// one buffer past the body, whatever the reader holds.
    fn drain(&mut self) -> Read<()> {
        let at_end = self.offset() == self.end_of_body;
        while self.offset() < self.end_of_body {
            if self.pos == self.end && !self.fill(1)? {
                break;
            }
            let body_left = self.end_of_body - self.offset();
            self.pos += ((self.end - self.pos) as u64).min(body_left) as usize;
        }
        let extra = self.pos < self.end || self.fill(1)?;
        if extra || !at_end {
            return Err(self.invalid("the file is not as long as its header says"));
        }
        Ok(())
    }
    fn bytes(&mut self, n: usize) -> Read<&[u8]> {
        if self.stop.saturating_sub(self.pos) < n
            && (n as u64 > self.end_of_body.saturating_sub(self.offset()) || !self.fill(n)?)
        {
            return Err(self.invalid("cut short"));
        }
        let b = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }
    fn array<const N: usize>(&mut self) -> Read<[u8; N]> {
        Ok(self.bytes(N)?.try_into().expect("N bytes"))
    }
    fn u8(&mut self) -> Read<u8> {
        if self.pos < self.stop {
            let b = self.buf[self.pos];
            self.pos += 1;
            return Ok(b);
        }
        Ok(self.bytes(1)?[0])
    }
    fn varint(&mut self) -> Read<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.invalid("a number is too long"))
    }
    fn u32(&mut self) -> Read<u32> {
        u32::try_from(self.varint()?).map_err(|_| self.invalid("a number is out of range"))
    }
    fn i64(&mut self) -> Read<i64> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }
    fn bool(&mut self) -> Read<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.invalid("a flag is neither 0 nor 1")),
        }
    }
    /// A count of items that take at least `min` bytes each: never more than the bytes left allow.
    fn len(&mut self, min: usize) -> Read<usize> {
        let n = self.varint()?;
        let left = self.end_of_body.saturating_sub(self.offset());
        if n > left / min.max(1) as u64 {
            return Err(self.invalid("a count is larger than the bytes left"));
        }
        Ok(n as usize)
    }
    fn str(&mut self) -> Read<&str> {
        let n = self.len(1)?;
        let at = self.offset();
        let b = self.bytes(n)?;
        std::str::from_utf8(b).map_err(|_| CompiledError::Invalid {
            at,
            what: "a string is not UTF-8",
        })
    }
    fn shared(&mut self) -> Read<Arc<str>> {
        let i = self.varint()?;
        self.table
            .get(i as usize)
            .cloned()
            .ok_or_else(|| self.invalid("a string id is outside the table"))
    }
    fn id(&mut self, count: usize) -> Read<ScopeId> {
        let id = self.u32()?;
        if id as usize >= count {
            return Err(self.invalid("a scope id is outside the scope tree"));
        }
        Ok(id)
    }
    fn time(&mut self) -> Read<OffsetDateTime> {
        let secs = self.i64()?;
        let nanos = self.varint()?;
        let offset = self.i64()?;
        let t = OffsetDateTime::from_unix_timestamp(secs)
            .ok()
            .and_then(|t| t.replace_nanosecond(u32::try_from(nanos).ok()?).ok())
            .ok_or_else(|| self.invalid("a time is out of range"))?;
        let offset = i32::try_from(offset)
            .ok()
            .and_then(|o| UtcOffset::from_whole_seconds(o).ok())
            .ok_or_else(|| self.invalid("a time offset is out of range"))?;
        t.checked_to_offset(offset)
            .ok_or_else(|| self.invalid("a time is out of range in its offset"))
    }
    fn opt_time(&mut self) -> Read<Option<OffsetDateTime>> {
        Ok(if self.bool()? {
            Some(self.time()?)
        } else {
            None
        })
    }
    fn digest(&mut self) -> Read<Digest> {
        match self.u8()? {
            0 => Ok(Digest::Sha256(self.array()?)),
            1 => Ok(Digest::Sha512(Box::new(self.array()?))),
            _ => Err(self.invalid("unknown digest algorithm")),
        }
    }
    fn severity(&mut self) -> Read<Severity> {
        let c = self.u8()?;
        SEVERITIES
            .get(c as usize)
            .copied()
            .ok_or_else(|| self.invalid("unknown severity"))
    }

    /// The string table, then the bundle, up to the end of the body.
    fn body(&mut self) -> Read<Bundle> {
        let n = self.len(1)?;
        self.table.reserve(reserve(n));
        for _ in 0..n {
            let s: Arc<str> = self.str()?.into();
            self.table.push(s);
        }
        let bundle = self.bundle()?;
        if self.offset() != self.end_of_body {
            return Err(self.invalid("bytes after the end of the bundle"));
        }
        Ok(bundle)
    }

    fn bundle(&mut self) -> Read<Bundle> {
        let format = self.u32()?;
        let version = self.varint()?;
        let issued_at = self.time()?;
        let expires_at = self.time()?;
        let issuer = self.str()?.to_owned();
        let private_registry = self.str()?.to_owned();
        let n = self.len(3)?;
        let mut mirrors = Vec::with_capacity(reserve(n));
        for _ in 0..n {
            mirrors.push(Mirror {
                source_domain: self.str()?.to_owned(),
                source_path: self.str()?.to_owned(),
                target_path: self.str()?.to_owned(),
            });
        }
        let scopes = self.scopes()?;
        let count = scopes.parts().0.len();
        let n = self.len(3)?;
        let mut first_party = Vec::with_capacity(reserve(n));
        for _ in 0..n {
            let path = self.str()?.to_owned();
            let scope = self.id(count)?;
            first_party.push(FirstParty {
                path,
                scope_path: scopes.path(scope).clone(),
                scope,
                require_digest: self.bool()?,
            });
        }
        let n = self.len(8)?;
        let mut images = Vec::with_capacity(reserve(n));
        for _ in 0..n {
            images.push(self.image(&scopes)?);
        }
        images.shrink_to_fit();
        if !super::sorted_for_index(&images) {
            return Err(self.invalid("images are not sorted by source and scope"));
        }
        let repos = super::index_repositories(&images);
        let n = self.len(40)?;
        let mut exceptions = Vec::with_capacity(reserve(n));
        for _ in 0..n {
            let source = self.shared()?;
            let digest = self.digest()?;
            let tag = if self.bool()? {
                Some(self.str()?.into())
            } else {
                None
            };
            let scope = self.id(count)?;
            exceptions.push(Exception {
                source,
                digest,
                tag,
                scope_path: scopes.path(scope).clone(),
                scope,
                expires_at: self.time()?,
                ticket: self.str()?.to_owned(),
                reason: self.str()?.to_owned(),
                approved_by: self.str()?.to_owned(),
            });
        }
        let rollout = if self.bool()? {
            let n = self.len(3)?;
            let mut steps = Vec::with_capacity(reserve(n));
            for _ in 0..n {
                steps.push(self.step()?);
            }
            Some(steps.into_boxed_slice())
        } else {
            None
        };
        let n = self.len(1)?;
        let mut licenses = HashMap::with_capacity(reserve(n));
        for _ in 0..n {
            let l = self.shared()?;
            let parsed = LicenseExpression::parse(&l)
                .map_err(|_| self.invalid("a licence expression does not parse"))?;
            licenses.insert(l, parsed);
        }
        Ok(Bundle {
            format,
            version,
            issued_at,
            expires_at,
            issuer,
            private_registry,
            mirrors,
            scopes,
            first_party,
            images,
            repos,
            exceptions,
            rollout,
            licenses,
        })
    }

    fn step(&mut self) -> Read<Step> {
        let secs = self.varint()?;
        let nanos = self.u32()?;
        if nanos >= 1_000_000_000 {
            return Err(self.invalid("a rollout delay's nanoseconds are a second or more"));
        }
        let percent = u8::try_from(self.varint()?)
            .map_err(|_| self.invalid("a rollout percentage is out of range"))?;
        Ok(Step {
            after: Duration::new(secs, nanos),
            percent,
        })
    }

    fn scopes(&mut self) -> Read<Scopes> {
        let label = self.str()?.to_owned();
        let n = self.len(4)?;
        if n == 0 {
            // Decisions take the organisation, scope 0, for any pod without a bound namespace.
            return Err(self.invalid("the scope tree has no organisation"));
        }
        let mut nodes = Vec::with_capacity(reserve(n));
        for i in 0..n {
            let path = self.shared()?;
            let parent = match self.u32()? {
                0 => None,
                p if (p as usize) <= i => Some(p - 1),
                _ => return Err(self.invalid("a scope's parent comes after it")),
            };
            let mode = if self.bool()? {
                Mode::Warn
            } else {
                Mode::Enforce
            };
            let rules = if self.bool()? {
                Some(Arc::new(self.rules()?))
            } else {
                None
            };
            let m = self.len(2)?;
            let mut apps = Vec::with_capacity(reserve(m));
            for _ in 0..m {
                let name: Box<str> = self.str()?.into();
                apps.push((name, self.id(n)?));
            }
            nodes.push(ScopeNode::new(
                path,
                parent,
                mode,
                rules,
                apps.into_boxed_slice(),
            ));
        }
        let m = self.len(2)?;
        let mut namespaces = HashMap::with_capacity(reserve(m));
        for _ in 0..m {
            let ns: Box<str> = self.str()?.into();
            namespaces.insert(ns, self.id(n)?);
        }
        Scopes::from_parts(nodes, namespaces, label)
            .ok_or_else(|| self.invalid("a scope path is listed twice"))
    }

    fn rules(&mut self) -> Read<Rules> {
        let min_scanners = Set {
            value: self.u32()?,
            from: self.shared()?,
        };
        let max_severity = Set {
            value: self.severity()?,
            from: self.shared()?,
        };
        let mut lists = [None, None];
        for list in &mut lists {
            if self.bool()? {
                let n = self.len(1)?;
                let mut value = Vec::with_capacity(reserve(n));
                for _ in 0..n {
                    value.push(self.str()?.to_owned());
                }
                *list = Some(Set {
                    value: value.into_boxed_slice(),
                    from: self.shared()?,
                });
            }
        }
        let [allow, deny] = lists;
        Ok(Rules {
            min_scanners,
            max_severity,
            allow,
            deny,
        })
    }

    fn image(&mut self, scopes: &Scopes) -> Read<ImageEntry> {
        let source = self.shared()?;
        let scope = self.id(scopes.parts().0.len())?;
        let n = self.len(34)?;
        let mut tags = Vec::with_capacity(reserve(n));
        for _ in 0..n {
            let t: Box<str> = self.str()?.into();
            tags.push((t, self.digest()?));
        }
        let n = self.len(33)?;
        let mut digests = Vec::with_capacity(reserve(n));
        for _ in 0..n {
            digests.push(self.digest()?);
        }
        let n = self.len(4)?;
        let mut lifecycles = Vec::with_capacity(reserve(n));
        for _ in 0..n {
            let i = self.u32()?;
            if i as usize >= tags.len() + digests.len() {
                return Err(self.invalid("a lifecycle names no tag or digest of its image"));
            }
            let deprecated_at = self.opt_time()?;
            let sunset_at = self.opt_time()?;
            let replacement = if self.bool()? {
                Some(self.shared()?)
            } else {
                None
            };
            lifecycles.push((
                i,
                Lifecycle {
                    deprecated_at,
                    sunset_at,
                    replacement,
                },
            ));
        }
        let license = self.shared()?;
        let n = self.len(36)?;
        let mut scans = Vec::with_capacity(reserve(n));
        for _ in 0..n {
            scans.push(Scan {
                scanner: self.shared()?,
                version: self.shared()?,
                report: self.digest()?,
                worst_severity: self.severity()?,
            });
        }
        let approved_by = self.shared()?;
        let approved_at = self.i64()?;
        Ok(ImageEntry {
            source,
            scope_path: scopes.path(scope).clone(),
            scope,
            tags: tags.into_boxed_slice(),
            digests: digests.into_boxed_slice(),
            lifecycles: lifecycles.into_boxed_slice(),
            provenance: Provenance {
                license,
                scans: scans.into_boxed_slice(),
                approved_by,
                approved_at,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a compiled bundle held in memory.
    fn open(bytes: &[u8]) -> Result<Compiled, CompiledError> {
        read(bytes, u64::MAX)
    }
    use crate::policy::VerifiedBundle;
    use crate::policy::testutil::*;

    /// The format 1 example, the format 2 example, and the format 2 example with what the examples
    /// lack: a SHA-512 digest, times with an offset and fractions of a second.
    fn bundles() -> Vec<VerifiedBundle> {
        let edited = v2_bundle_with(|v| {
            v["issued_at"] = "2026-03-01T09:30:00.123456789+01:00".into();
            let image = v["images"][0].as_object_mut().unwrap();
            let digests = image.entry("digests").or_insert(serde_json::json!([]));
            digests
                .as_array_mut()
                .unwrap()
                .push(format!("sha512:{}", "ab".repeat(64)).into());
        });
        vec![example_bundle(), v2_bundle_with(|_| {}), edited]
    }

    #[test]
    fn a_compiled_bundle_reads_back_as_the_same_bundle() {
        for b in bundles() {
            let bytes = compile(&b, b.signed(), 7);
            let back = open(&bytes).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(back.signed, *b.signed());
            assert_eq!(back.json_modified, 7);
            assert!(back.bundle == *b, "format {} differs", b.format);
            // The same bundle always compiles to the same bytes.
            assert_eq!(compile(&back.bundle, &back.signed, 7), bytes);
        }
        let edited = &bundles()[2];
        assert_eq!(edited.issued_at.offset().whole_seconds(), 3600);
        assert_eq!(edited.issued_at.nanosecond(), 123_456_789);
        assert!(
            edited
                .images()
                .iter()
                .any(|e| e.digests().iter().any(|d| d.algorithm() == "sha512"))
        );
    }

    /// A reader that hands out at most `step` bytes per read.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_compiled_bundle_streamed_in_small_reads_reads_back_the_same() {
        let b = v2_bundle_with(|_| {});
        let bytes = compile(&b, b.signed(), 7);
        for step in [1, 2, 7, 100, 4096] {
            let back = read(
                Trickle {
                    bytes: &bytes,
                    step,
                },
                bytes.len() as u64,
            )
            .unwrap_or_else(|e| panic!("step {step}: {e}"));
            assert!(back.bundle == *b, "step {step}");
        }
        // The body over the limit is refused before it is read.
        let e = read(&bytes[..], 10).unwrap_err();
        assert!(e.to_string().contains("larger than the limit"), "{e}");
    }

    #[test]
    fn a_damaged_or_cut_compiled_bundle_is_refused_without_a_panic() {
        let b = v2_bundle_with(|_| {});
        let bytes = compile(&b, b.signed(), 7);
        for len in 0..bytes.len() {
            assert!(open(&bytes[..len]).is_err(), "cut at {len}");
        }
        // Past the versions, every change is caught by the checksum (or, in the lengths, first by
        // the length check).
        let versions_end = MAGIC.len() + 4 + 1 + BUILD.len();
        let lengths = versions_end + 64..versions_end + 64 + 8 + 16 + 8;
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x40;
            let e = open(&damaged).expect_err("damaged");
            if lengths.contains(&i) && matches!(e, CompiledError::Invalid { .. }) {
                continue;
            }
            if i >= versions_end {
                assert_eq!(e, CompiledError::Damaged, "byte {i}");
            }
        }
    }

    fn body_len(bytes: &[u8]) -> usize {
        let at = MAGIC.len() + 4 + 1 + BUILD.len() + 64 + 8 + 16;
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize
    }

    /// Content that passes the checksum but was not written by [`compile`] (a bug, or a forgery by
    /// someone who can write the state directory) is refused or read, but never panics.
    #[test]
    fn changed_content_with_a_matching_checksum_never_panics() {
        let b = v2_bundle_with(|_| {});
        let bytes = compile(&b, b.signed(), 7);
        let body_at = bytes.len() - body_len(&bytes);
        let mut refused = 0;
        for i in body_at..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut changed = bytes.clone();
                changed[i] ^= flip;
                let sum = checksum(&changed[..body_at - 32], &changed[body_at..]);
                changed[body_at - 32..body_at].copy_from_slice(&sum);
                refused += open(&changed).is_err() as usize;
            }
        }
        assert!(refused > 0, "no change was refused");
    }

    /// What `read` says of the body `write` encodes (it must refuse it).
    fn refusal<T: std::fmt::Debug>(
        write: impl FnOnce(&mut Writer),
        read: impl for<'a> FnOnce(&mut Reader<&'a [u8]>) -> Read<T>,
    ) -> String {
        let mut w = Writer::default();
        write(&mut w);
        let mut r = Reader::new(&w.out[..]);
        r.set_end_of_body(w.out.len() as u64);
        read(&mut r).expect_err("refused").to_string()
    }

    #[test]
    fn a_time_that_its_offset_moves_out_of_range_is_refused_without_a_panic() {
        let last = time::PrimitiveDateTime::MAX.assume_utc();
        let e = refusal(
            |w| {
                w.i64(last.unix_timestamp());
                w.varint(0);
                w.i64(3600);
            },
            |r| r.time(),
        );
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn a_rollout_delay_that_overflows_is_refused_without_a_panic() {
        let e = refusal(
            |w| {
                w.varint(u64::MAX);
                w.varint(u32::MAX as u64);
                w.varint(50);
            },
            |r| r.step(),
        );
        assert!(e.contains("nanoseconds"), "{e}");
    }

    #[test]
    fn a_scope_tree_without_an_organisation_is_refused() {
        let e = refusal(
            |w| {
                w.str("app");
                w.varint(0);
                w.varint(0);
            },
            |r| r.scopes(),
        );
        assert!(e.contains("no organisation"), "{e}");
    }

    #[test]
    fn a_compiled_bundle_of_another_version_is_not_read() {
        let b = example_bundle();
        let bytes = compile(&b, b.signed(), 7);
        let mut other_codec = bytes.clone();
        other_codec[MAGIC.len()] ^= 1;
        assert!(matches!(
            open(&other_codec),
            Err(CompiledError::OtherVersion { codec, .. }) if codec != CODEC_VERSION
        ));
        let mut other_build = bytes.clone();
        other_build[MAGIC.len() + 5] ^= 1;
        let e = open(&other_build).unwrap_err();
        assert!(
            matches!(&e, CompiledError::OtherVersion { build, .. } if build != BUILD),
            "{e}"
        );
        assert!(e.to_string().contains("another version"), "{e}");
        assert_eq!(open(b"{}").unwrap_err(), CompiledError::NotCompiled);
    }
}
