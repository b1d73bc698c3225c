//! Image references: parsing and normalisation following the distribution reference grammar.
//!
//! This module owns [`Reference`] (a fully normalised image reference), [`Digest`] (a content digest with
//! an exact-length sha256 or sha512 hex value) and [`ReferenceError`] (which part of a reference is wrong).
//!
//! The grammar is the one container tooling (docker, containerd, CRI-O) uses:
//!
//! ```text
//! reference := name [ ":" tag ] [ "@" digest ]
//! name      := [ domain "/" ] path-component ( "/" path-component )*
//! domain    := host [ ":" port ]          host := domain-name | "[" ipv6 "]"
//! path-component := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
//! tag       := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
//! digest    := "sha256:" 64 lowercase hex | "sha512:" 128 lowercase hex
//! ```
//!
//! Normalisation, as `ParseNormalizedNamed` does it: the first component is a registry only when it
//! contains `.` or `:`, is `localhost`, or has an upper-case letter; otherwise the registry is `docker.io`.
//! `index.docker.io` becomes `docker.io`; a single-component Docker Hub name gets `library/`; the tag
//! `latest` is added only when neither a tag nor a digest is given. A name (registry + `/` + path) is at
//! most 255 characters after normalisation.
//!
//! ```
//! use pullgate::policy::Reference;
//! let r = Reference::parse("nginx:1.25").unwrap();
//! assert_eq!(r.to_string(), "docker.io/library/nginx:1.25");
//! assert_eq!(r.domain(), "docker.io");
//! assert_eq!(r.path(), "library/nginx");
//! assert_eq!(r.familiar(), "nginx:1.25");
//! ```

use std::fmt;
use std::str::FromStr;

/// Registry used when a reference names none.
pub const DEFAULT_DOMAIN: &str = "docker.io";
/// The legacy Docker Hub host, normalised to [`DEFAULT_DOMAIN`].
pub const LEGACY_DEFAULT_DOMAIN: &str = "index.docker.io";
/// Tag used when a reference has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
/// Longest allowed name (registry + `/` + path), after normalisation.
pub const NAME_TOTAL_LENGTH_MAX: usize = 255;
/// Longest allowed tag.
pub const TAG_LENGTH_MAX: usize = 128;
/// Longest input accepted at all (a bound for hostile input; no valid reference comes close).
pub const INPUT_LENGTH_MAX: usize = 1024;

/// A content digest: `sha256:` + 64 lowercase hex digits, or `sha512:` + 128.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Digest {
    /// A SHA-256 digest.
    Sha256([u8; 32]),
    /// A SHA-512 digest.
    Sha512(Box<[u8; 64]>),
}

/// Why a digest string is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// No `:` between algorithm and hex value.
    #[error("digest \"{0}\" has no \"algorithm:\" prefix; write it as sha256:<64 hex digits>")]
    MissingAlgorithm(String),
    /// An algorithm other than sha256 or sha512.
    #[error("digest algorithm \"{0}\" is not supported; use sha256 or sha512")]
    UnsupportedAlgorithm(String),
    /// Wrong number of hex digits.
    #[error("{algorithm} digest must have exactly {expected} hex digits, found {found}")]
    WrongLength {
        algorithm: &'static str,
        expected: usize,
        found: usize,
    },
    /// A character that is not a lowercase hex digit.
    #[error("digest hex value contains {0:?}; only lowercase 0-9a-f are allowed")]
    BadHex(char),
}

impl Digest {
    /// Parses `sha256:<64 hex>` or `sha512:<128 hex>` (lowercase hex only, as go-digest requires).
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let Some((algo, hex)) = s.split_once(':') else {
            return Err(DigestError::MissingAlgorithm(truncate(s)));
        };
        match algo {
            "sha256" => {
                let mut out = [0u8; 32];
                decode_hex(hex, &mut out, "sha256")?;
                Ok(Digest::Sha256(out))
            }
            "sha512" => {
                let mut out = Box::new([0u8; 64]);
                decode_hex(hex, &mut out[..], "sha512")?;
                Ok(Digest::Sha512(out))
            }
            other => Err(DigestError::UnsupportedAlgorithm(truncate(other))),
        }
    }

    /// The algorithm name, `sha256` or `sha512`.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Digest::Sha256(_) => "sha256",
            Digest::Sha512(_) => "sha512",
        }
    }

    /// The raw digest bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Digest::Sha256(b) => b,
            Digest::Sha512(b) => &b[..],
        }
    }

    /// The SHA-256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest::Sha256(sha2::Sha256::digest(data).into())
    }
}

fn truncate(s: &str) -> String {
    if s.len() <= 80 {
        return s.to_owned();
    }
    let mut end = 80;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn decode_hex(hex: &str, out: &mut [u8], algorithm: &'static str) -> Result<(), DigestError> {
    // Fast path: right length and only lowercase hex digits, decoded in one pass over the bytes.
    let b = hex.as_bytes();
    if b.len() == out.len() * 2 {
        let mut bad = 0u8;
        for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
            let (hi, lo) = (HEX_VALUE[pair[0] as usize], HEX_VALUE[pair[1] as usize]);
            bad |= hi | lo;
            *o = (hi << 4) | (lo & 15);
        }
        if bad & 0x80 == 0 {
            return Ok(());
        }
    }
    // Slow path: find the exact error (first bad character, then the length).
    if let Some(c) = hex.chars().find(|c| !matches!(c, '0'..='9' | 'a'..='f')) {
        return Err(DigestError::BadHex(c));
    }
    // Only lowercase hex digits, so the fast path failed on the length.
    Err(DigestError::WrongLength {
        algorithm,
        expected: out.len() * 2,
        found: hex.len(),
    })
}

/// Value of each lowercase hex digit; 0x80 marks every other byte.
static HEX_VALUE: [u8; 256] = {
    let mut t = [0x80u8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let bytes = self.bytes();
        let mut buf = [0u8; 128];
        for (i, b) in bytes.iter().enumerate() {
            buf[2 * i] = HEX[(b >> 4) as usize];
            buf[2 * i + 1] = HEX[(b & 15) as usize];
        }
        // The buffer holds only ASCII hex digits.
        let hex = std::str::from_utf8(&buf[..bytes.len() * 2]).map_err(|_| fmt::Error)?;
        // Plain writes: a digest is formatted on every decided call, and `write!` costs more than
        // the hex conversion.
        f.write_str(self.algorithm())?;
        f.write_str(":")?;
        f.write_str(hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

/// A parsed, fully normalised image reference.
///
/// Invariants: the registry is explicit (`docker.io` when omitted), Docker Hub single-component names
/// carry `library/`, and at least one of tag and digest is present.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `domain/path`, the canonical repository name.
    name: String,
    /// Length of the domain prefix of `name`.
    domain_len: usize,
    tag: Option<String>,
    digest: Option<Digest>,
}

/// An invalid image reference: the input, and which part is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference \"{input}\": {kind}")]
pub struct ReferenceError {
    /// The reference as given (truncated if very long).
    pub input: String,
    /// What is wrong with it.
    pub kind: ReferenceErrorKind,
}

/// Which part of a reference is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceErrorKind {
    /// The empty string.
    #[error("the reference is empty; give an image such as registry.example/team/app:1.0")]
    Empty,
    /// Far longer than any valid reference.
    #[error("the reference is {0} bytes long, more than the {INPUT_LENGTH_MAX} accepted")]
    TooLong(usize),
    /// A bare 64-hex-digit string, i.e. an image ID.
    #[error(
        "a 64-hex-digit string is an image ID, not a reference; use repository@sha256:<id> instead"
    )]
    LooksLikeImageId,
    /// The registry host or port is malformed.
    #[error("registry \"{domain}\" is invalid: {why}")]
    Domain { domain: String, why: &'static str },
    /// A path component is malformed.
    #[error(
        "repository path component \"{component}\" is invalid: {why} (components are lowercase letters and digits, separated by '.', '_', '__' or dashes)"
    )]
    PathComponent {
        component: String,
        why: &'static str,
    },
    /// The normalised name is longer than 255 characters.
    #[error(
        "repository name is {0} characters long after normalisation; the limit is {NAME_TOTAL_LENGTH_MAX}"
    )]
    NameTooLong(usize),
    /// The tag is malformed.
    #[error("tag \"{tag}\" is invalid: {why}")]
    Tag { tag: String, why: &'static str },
    /// The digest is malformed.
    #[error("digest is invalid: {0}")]
    Digest(#[from] DigestError),
}

impl Reference {
    /// Parses and normalises an image reference. See the module documentation for the grammar.
    pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
        parse_inner(input).map_err(|kind| ReferenceError {
            input: truncate(input),
            kind,
        })
    }

    /// The registry host, with its port if any (e.g. `docker.io`, `localhost:5000`, `[::1]:5000`).
    pub fn domain(&self) -> &str {
        &self.name[..self.domain_len]
    }

    /// The repository path inside the registry (e.g. `library/nginx`).
    pub fn path(&self) -> &str {
        &self.name[self.domain_len + 1..]
    }

    /// The canonical repository name, `domain/path` (e.g. `docker.io/library/nginx`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tag, if any (`latest` when the input had neither tag nor digest).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if any.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The same repository pinned to `digest`, without a tag.
    pub fn with_digest_only(&self, digest: Digest) -> Reference {
        Reference {
            name: self.name.clone(),
            domain_len: self.domain_len,
            tag: None,
            digest: Some(digest),
        }
    }

    /// The short form people type: `nginx:1.25` for `docker.io/library/nginx:1.25`,
    /// `user/app` for Docker Hub user repositories; other registries are shown in full.
    pub fn familiar(&self) -> String {
        let mut out = String::new();
        if self.domain() == DEFAULT_DOMAIN {
            let path = self.path();
            let short = path
                .strip_prefix("library/")
                .filter(|p| !p.contains('/'))
                .unwrap_or(path);
            // The short form must not make the first path component look like a registry.
            let looks_like_domain = short
                .split_once('/')
                .is_some_and(|(first, _)| first.contains(['.', ':']) || first == "localhost");
            if looks_like_domain {
                out.push_str(&self.name);
            } else {
                out.push_str(short);
            }
        } else {
            out.push_str(&self.name);
        }
        self.push_suffix(&mut out);
        out
    }

    fn push_suffix(&self, out: &mut String) {
        if let Some(t) = &self.tag {
            out.push(':');
            out.push_str(t);
        }
        if let Some(d) = &self.digest {
            out.push('@');
            out.push_str(&d.to_string());
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if let Some(t) = &self.tag {
            f.write_str(":")?;
            f.write_str(t)?;
        }
        if let Some(d) = &self.digest {
            f.write_str("@")?;
            fmt::Display::fmt(d, f)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reference({self})")
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

fn parse_inner(input: &str) -> Result<Reference, ReferenceErrorKind> {
    use ReferenceErrorKind as K;
    if input.is_empty() {
        return Err(K::Empty);
    }
    if input.len() > INPUT_LENGTH_MAX {
        return Err(K::TooLong(input.len()));
    }
    if input.len() == 64
        && input
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(K::LooksLikeImageId);
    }
    let (name_tag, digest) = match input.as_bytes().iter().position(|&b| b == b'@') {
        Some(at) => (&input[..at], Some(Digest::parse(&input[at + 1..])?)),
        None => (input, None),
    };
    let last_slash = name_tag.as_bytes().iter().rposition(|&b| b == b'/');
    let (name, tag) = match name_tag.as_bytes().iter().rposition(|&b| b == b':') {
        Some(colon) if last_slash.is_none_or(|s| colon > s) => {
            (&name_tag[..colon], Some(&name_tag[colon + 1..]))
        }
        _ => (name_tag, None),
    };
    if let Some(t) = tag {
        validate_tag(t)?;
    }
    let (domain, remainder) = split_domain(name);
    validate_domain(domain)?;
    validate_path(remainder)?;
    let library = domain == DEFAULT_DOMAIN && !remainder.contains('/');
    let mut full = String::with_capacity(domain.len() + 9 + remainder.len());
    full.push_str(domain);
    full.push('/');
    if library {
        full.push_str("library/");
    }
    full.push_str(remainder);
    if full.len() > NAME_TOTAL_LENGTH_MAX {
        return Err(K::NameTooLong(full.len()));
    }
    let tag = match (tag, &digest) {
        (Some(t), _) => Some(t.to_owned()),
        (None, None) => Some(DEFAULT_TAG.to_owned()),
        (None, Some(_)) => None,
    };
    Ok(Reference {
        name: full,
        domain_len: domain.len(),
        tag,
        digest,
    })
}

/// Splits the registry off a name the way ParseNormalizedNamed does: `(registry, the rest)`, the
/// registry normalised (`docker.io` when none is named, `index.docker.io` becomes `docker.io`).
/// Byte scans: this runs several times on every decided call.
fn split_domain(name: &str) -> (&str, &str) {
    let (domain, remainder) = match name.as_bytes().iter().position(|&b| b == b'/') {
        Some(slash)
            if name.as_bytes()[..slash]
                .iter()
                .any(|&b| b == b'.' || b == b':' || b.is_ascii_uppercase())
                || &name[..slash] == "localhost" =>
        {
            (&name[..slash], &name[slash + 1..])
        }
        _ => (DEFAULT_DOMAIN, name),
    };
    if domain == LEGACY_DEFAULT_DOMAIN {
        (DEFAULT_DOMAIN, remainder)
    } else {
        (domain, remainder)
    }
}

/// The registry a reference names, as [`Reference::domain`] gives it for a valid reference, without
/// parsing the rest (a tag or digest holds no `/`).
pub fn domain_of(reference: &str) -> &str {
    split_domain(reference).0
}

/// True when `tag` is a valid tag.
pub(crate) fn is_valid_tag(tag: &str) -> bool {
    validate_tag(tag).is_ok()
}

fn validate_tag(tag: &str) -> Result<(), ReferenceErrorKind> {
    let err = |why| {
        Err(ReferenceErrorKind::Tag {
            tag: truncate(tag),
            why,
        })
    };
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    match bytes.first() {
        None => return err("it is empty; remove the ':' or give a tag"),
        Some(&b) if !word(b) => return err("it must start with a letter, digit or '_'"),
        _ => {}
    }
    if bytes.len() > TAG_LENGTH_MAX {
        return err("it is longer than 128 characters");
    }
    if !bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-') {
        return err("only letters, digits, '_', '.' and '-' are allowed");
    }
    Ok(())
}

fn validate_domain(domain: &str) -> Result<(), ReferenceErrorKind> {
    let err = |why| {
        Err(ReferenceErrorKind::Domain {
            domain: truncate(domain),
            why,
        })
    };
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        let Some(close) = rest.find(']') else {
            return err("an IPv6 address must be closed with ']'");
        };
        let addr = &rest[..close];
        if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return err("an IPv6 address in brackets may contain only hex digits and ':'");
        }
        match &rest[close + 1..] {
            "" => (None, None),
            p => match p.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return err("only ':port' may follow an IPv6 address"),
            },
        }
    } else {
        match domain.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(domain), None),
        }
    };
    if let Some(host) = host {
        if host.is_empty() {
            return err("the host name is empty");
        }
        for b in host.as_bytes().split(|&c| c == b'.') {
            if b.is_empty() {
                return err("a host name label is empty (two dots, or a leading or trailing dot)");
            }
            if !b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-') {
                return err("host name labels may contain only letters, digits and '-'");
            }
            if b[0] == b'-' || b[b.len() - 1] == b'-' {
                return err("a host name label may not start or end with '-'");
            }
        }
    }
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return err("the port must be decimal digits");
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), ReferenceErrorKind> {
    let mut start = 0;
    for component in path.as_bytes().split(|&b| b == b'/') {
        let end = start + component.len();
        validate_component(&path[start..end]).map_err(|why| ReferenceErrorKind::PathComponent {
            component: truncate(&path[start..end]),
            why,
        })?;
        start = end + 1;
    }
    Ok(())
}

fn validate_component(c: &str) -> Result<(), &'static str> {
    let b = c.as_bytes();
    if b.is_empty() {
        return Err("it is empty (a leading, trailing or doubled '/')");
    }
    if b.iter().any(|c| c.is_ascii_uppercase()) {
        return Err("it contains upper-case letters; repository names must be lowercase");
    }
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return Err("it must start and end with a letter or digit");
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return Err("it contains a character other than a-z, 0-9, '.', '_' and '-'"),
        }
        if i < b.len() && !alnum(b[i]) {
            return Err("it has a separator that is not '.', '_', '__' or a run of '-'");
        }
    }
    Ok(())
}

/// True when `path` equals `prefix` or starts with `prefix` followed by `/` (whole components only).
pub(crate) fn path_has_prefix(path: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || (path.len() >= prefix.len()
            && path.starts_with(prefix)
            && (path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H64: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn ok(input: &str, want: &str) {
        match Reference::parse(input) {
            Ok(r) => assert_eq!(r.to_string(), want, "input {input:?}"),
            Err(e) => panic!("{input:?} should parse as {want:?}: {e}"),
        }
    }

    fn bad(input: &str, part: &str) {
        match Reference::parse(input) {
            Ok(r) => panic!("{input:?} should be rejected, parsed as {r}"),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(part),
                    "error for {input:?} should mention {part:?}: {msg}"
                );
            }
        }
    }

    #[test]
    fn valid_references_table() {
        let d = format!("sha256:{H64}");
        let d512 = format!("sha512:{H64}{H64}");
        let cases: Vec<(String, String)> = vec![
            ("nginx".into(), "docker.io/library/nginx:latest".into()),
            ("nginx:1.25".into(), "docker.io/library/nginx:1.25".into()),
            (
                "library/nginx".into(),
                "docker.io/library/nginx:latest".into(),
            ),
            (
                "docker.io/nginx".into(),
                "docker.io/library/nginx:latest".into(),
            ),
            (
                "docker.io/library/nginx:1.25".into(),
                "docker.io/library/nginx:1.25".into(),
            ),
            (
                "index.docker.io/nginx".into(),
                "docker.io/library/nginx:latest".into(),
            ),
            (
                "index.docker.io/library/nginx:1".into(),
                "docker.io/library/nginx:1".into(),
            ),
            ("bitnami/redis:7".into(), "docker.io/bitnami/redis:7".into()),
            (
                "docker.io/bitnami/redis".into(),
                "docker.io/bitnami/redis:latest".into(),
            ),
            ("a/b/c/d".into(), "docker.io/a/b/c/d:latest".into()),
            (
                "registry.k8s.io/pause:3.9".into(),
                "registry.k8s.io/pause:3.9".into(),
            ),
            (
                "ghcr.io/org/tool:v1.2.3".into(),
                "ghcr.io/org/tool:v1.2.3".into(),
            ),
            ("localhost/foo".into(), "localhost/foo:latest".into()),
            (
                "localhost:5000/foo/bar:tag".into(),
                "localhost:5000/foo/bar:tag".into(),
            ),
            (
                "localhost:5000".into(),
                "docker.io/library/localhost:5000".into(),
            ),
            (
                "registry.corp:443/apps/x".into(),
                "registry.corp:443/apps/x:latest".into(),
            ),
            ("127.0.0.1:5000/x:1".into(), "127.0.0.1:5000/x:1".into()),
            ("[::1]/x".into(), "[::1]/x:latest".into()),
            ("[::1]:5000/x:y".into(), "[::1]:5000/x:y".into()),
            (
                "[2001:db8::1]:443/team/app".into(),
                "[2001:db8::1]:443/team/app:latest".into(),
            ),
            ("Foo/bar".into(), "Foo/bar:latest".into()),
            ("REGISTRY.CORP/x".into(), "REGISTRY.CORP/x:latest".into()),
            (
                "reg-1.example.com/a".into(),
                "reg-1.example.com/a:latest".into(),
            ),
            ("registry:5000/a".into(), "registry:5000/a:latest".into()),
            ("a.b.c.d.e/f".into(), "a.b.c.d.e/f:latest".into()),
            ("foo_bar".into(), "docker.io/library/foo_bar:latest".into()),
            (
                "foo__bar".into(),
                "docker.io/library/foo__bar:latest".into(),
            ),
            ("foo.bar".into(), "docker.io/library/foo.bar:latest".into()),
            ("foo-bar".into(), "docker.io/library/foo-bar:latest".into()),
            (
                "foo---bar".into(),
                "docker.io/library/foo---bar:latest".into(),
            ),
            (
                "a1/b2.c3_d4__e5-f6".into(),
                "docker.io/a1/b2.c3_d4__e5-f6:latest".into(),
            ),
            ("x:_tag".into(), "docker.io/library/x:_tag".into()),
            (
                "x:Tag.With-Caps_9".into(),
                "docker.io/library/x:Tag.With-Caps_9".into(),
            ),
            (
                format!("x:{}", "a".repeat(128)),
                format!("docker.io/library/x:{}", "a".repeat(128)),
            ),
            (format!("nginx@{d}"), format!("docker.io/library/nginx@{d}")),
            (
                format!("nginx:1.25@{d}"),
                format!("docker.io/library/nginx:1.25@{d}"),
            ),
            (
                format!("registry.corp/approved/library/nginx@{d}"),
                format!("registry.corp/approved/library/nginx@{d}"),
            ),
            (
                format!("localhost:5000/x@{d512}"),
                format!("localhost:5000/x@{d512}"),
            ),
            (
                format!("[fe80::1]:5000/x:t@{d}"),
                format!("[fe80::1]:5000/x:t@{d}"),
            ),
            (
                format!("docker.io/u/{}", "a".repeat(243)),
                format!("docker.io/u/{}:latest", "a".repeat(243)),
            ),
            ("a.b/c".into(), "a.b/c:latest".into()),
            ("docker.io/a.b/c".into(), "docker.io/a.b/c:latest".into()),
            ("0".into(), "docker.io/library/0:latest".into()),
            (
                format!("{}x", &H64[..63]),
                format!("docker.io/library/{}x:latest", &H64[..63]),
            ),
        ];
        assert!(cases.len() >= 40);
        for (input, want) in &cases {
            ok(input, want);
            let r = Reference::parse(input).unwrap();
            assert_eq!(domain_of(input), r.domain(), "domain_of({input:?})");
        }
    }

    #[test]
    fn invalid_references_table() {
        let d = format!("sha256:{H64}");
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "empty"),
            (H64.into(), "image ID"),
            ("NGINX".into(), "lowercase"),
            ("docker.io/Library/nginx".into(), "lowercase"),
            ("nginx:".into(), "tag \"\""),
            ("nginx:-1".into(), "must start"),
            ("nginx:.x".into(), "must start"),
            ("nginx:a+b".into(), "only letters"),
            (format!("x:{}", "a".repeat(129)), "longer than 128"),
            ("nginx@".into(), "algorithm"),
            ("nginx@sha256".into(), "algorithm"),
            ("nginx@sha256:abc".into(), "exactly 64"),
            (format!("nginx@sha256:{H64}0"), "exactly 64"),
            (format!("nginx@sha256:{}", H64.to_uppercase()), "lowercase"),
            (format!("nginx@sha512:{H64}"), "exactly 128"),
            (format!("nginx@md5:{H64}"), "not supported"),
            (format!("nginx@sha384:{H64}"), "not supported"),
            (format!("nginx@{d}@{d}"), "lowercase 0-9a-f"),
            ("/nginx".into(), "empty"),
            ("nginx/".into(), "empty"),
            ("a//b".into(), "empty"),
            ("registry.corp/".into(), "empty"),
            ("-nginx".into(), "start and end"),
            ("nginx-".into(), "start and end"),
            ("foo___bar".into(), "separator"),
            ("foo._bar".into(), "separator"),
            ("foo.-bar".into(), "separator"),
            ("foo bar".into(), "character other"),
            ("foo/bar baz".into(), "character other"),
            ("reg..corp/x".into(), "label is empty"),
            (".reg/x".into(), "label is empty"),
            ("reg-.corp/x".into(), "start or end with '-'"),
            ("reg_corp.io/x".into(), "letters, digits and '-'"),
            ("localhost:/x".into(), "port"),
            ("localhost:abc/x".into(), "port"),
            ("[::1/x".into(), "closed"),
            ("[]/x".into(), "\"[]\""),
            ("[::g]/x".into(), "IPv6"),
            ("[::1]x/x".into(), "only ':port'"),
            (":tag".into(), "empty"),
            ("@sha256:".into(), "exactly 64"),
            (format!("docker.io/u/{}", "a".repeat(244)), "255"),
            (format!("docker.io/{}", "a".repeat(240)), "255"),
            (format!("{}/x", "a.".repeat(200)), "label is empty"),
            ("x".repeat(2000), "1024"),
            ("nginx:1.25:1.26".into(), "character other"),
            ("ubuntu:22.04 ".into(), "only letters"),
            ("é/x".into(), "start and end"),
            ("docker.io/library/nginx@sha256:".into(), "exactly 64"),
        ];
        assert!(cases.len() >= 40);
        for (input, part) in &cases {
            bad(input, part);
        }
    }

    #[test]
    fn accessors_and_familiar_form() {
        let r = Reference::parse("localhost:5000/team/app:1.0").unwrap();
        assert_eq!(
            (r.domain(), r.path(), r.tag()),
            ("localhost:5000", "team/app", Some("1.0"))
        );
        assert_eq!(r.familiar(), "localhost:5000/team/app:1.0");
        let r = Reference::parse("bitnami/redis").unwrap();
        assert_eq!(r.familiar(), "bitnami/redis:latest");
        let d = format!("sha256:{H64}");
        let r = Reference::parse(&format!("nginx@{d}")).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().unwrap().to_string(), d);
        assert_eq!(r.familiar(), format!("nginx@{d}"));
    }

    #[test]
    fn whole_component_prefixes() {
        assert!(path_has_prefix("apps/payments/api", "apps/payments"));
        assert!(path_has_prefix("apps/payments", "apps/payments"));
        assert!(!path_has_prefix("apps/payments-evil/api", "apps/payments"));
        assert!(!path_has_prefix("apps/pay", "apps/payments"));
        assert!(path_has_prefix("anything", ""));
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn component() -> impl Strategy<Value = String> {
            "[a-z0-9]{1,5}((\\.|_|__|-{1,3})[a-z0-9]{1,5}){0,2}"
        }

        fn reference() -> impl Strategy<Value = String> {
            let domain = prop_oneof![
                Just(String::new()),
                Just("docker.io/".to_owned()),
                Just("index.docker.io/".to_owned()),
                Just("localhost/".to_owned()),
                Just("localhost:5000/".to_owned()),
                Just("[::1]:5000/".to_owned()),
                "[a-z][a-z0-9-]{0,6}[a-z0-9]\\.[a-z]{2,4}(:[0-9]{1,5})?/",
            ];
            let tag = prop_oneof![
                Just(String::new()),
                "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}".prop_map(|t| format!(":{t}"))
            ];
            let digest = prop_oneof![
                Just(String::new()),
                "[0-9a-f]{64}".prop_map(|h| format!("@sha256:{h}")),
                "[0-9a-f]{128}".prop_map(|h| format!("@sha512:{h}")),
            ];
            (
                domain,
                component(),
                proptest::collection::vec(component(), 0..3),
                tag,
                digest,
            )
                .prop_map(|(d, first, rest, t, g)| {
                    // Without a registry, a first component with '.' would itself be read as a registry.
                    let first = if d.is_empty() {
                        first.replace('.', "_")
                    } else {
                        first
                    };
                    let mut path = vec![first];
                    path.extend(rest);
                    format!("{d}{}{t}{g}", path.join("/"))
                })
        }

        proptest! {
            #[test]
            fn normalise_is_idempotent_and_display_roundtrips(s in reference()) {
                let r = Reference::parse(&s).unwrap();
                let shown = r.to_string();
                let again = Reference::parse(&shown).unwrap();
                prop_assert_eq!(&again, &r);
                prop_assert_eq!(again.to_string(), shown);
                let familiar = Reference::parse(&r.familiar()).unwrap();
                prop_assert_eq!(familiar, r);
            }

            #[test]
            fn arbitrary_input_never_panics_and_valid_output_roundtrips(s in "\\PC{0,80}") {
                if let Ok(r) = Reference::parse(&s) {
                    prop_assert_eq!(Reference::parse(&r.to_string()).unwrap(), r);
                }
            }
        }
    }
}
