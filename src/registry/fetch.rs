//! A lean client for the few requests a node's bundle sync makes — HEAD a manifest, GET a manifest by
//! digest, GET a blob by digest — issued straight over the HTTP client, with every response verified.
//!
//! Why not [`super::Registry`] (`oci-client`): that client pings `/v2/` before every request to a
//! registry that issues no bearer token (anonymous access, or basic credentials), which doubles the
//! requests of thousands of nodes polling every minute; and its errors hide the `Retry-After` of a
//! 429 or 503. [`Fetcher`] learns how each registry wants to be authenticated from the challenge of
//! its first `401` (nothing is asked in advance), keeps bearer tokens for their lifetime, and reuses
//! connections, so a round at steady state is exactly one `HEAD` request.
//!
//! - Every manifest and blob is hashed as it arrives and compared with the digest asked for; reading
//!   stops at a size cap (and at the size the manifest announced), so an oversized or endless body
//!   costs at most the cap.
//! - TLS with the system roots plus an optional CA file; plain HTTP only for listed hosts.
//! - Every request has a timeout; throttling (429, 503) is reported with its `Retry-After`.
//! - Credentials never reach a log or an error message.
//! - Requests and bytes received are counted ([`FetchCounters`]), for metrics and the fleet benchmark.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use sha2::Digest as _;

use super::auth::{AuthFile, Credential};
use crate::policy::{Digest, Reference};

/// What went wrong with one request. Every variant names the URL (never credentials).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The HTTP client could not be built (TLS set-up, CA file).
    #[error("cannot set up the registry client: {0}")]
    Setup(String),
    /// No answer: connection refused, DNS, TLS handshake, timeout.
    #[error("{url}: no answer from the registry: {detail}")]
    Unreachable { url: String, detail: String },
    /// 429 Too Many Requests or 503 Service Unavailable.
    #[error("{url}: the registry is throttling (HTTP {status}){}", retry_after.map(|d| format!(", Retry-After {}s", d.as_secs())).unwrap_or_default())]
    Throttled {
        url: String,
        status: u16,
        retry_after: Option<Duration>,
    },
    /// 401/403 even with the configured credentials.
    #[error("{url}: the registry refused access (HTTP {status}){detail}; check the auth file")]
    Unauthorized {
        url: String,
        status: u16,
        detail: String,
    },
    /// 404: no such tag, manifest or blob.
    #[error("{url}: not found in the registry (HTTP 404)")]
    NotFound { url: String },
    /// Any other unexpected status.
    #[error("{url}: the registry answered HTTP {status}{detail}")]
    Status {
        url: String,
        status: u16,
        detail: String,
    },
    /// The bytes received do not have the digest asked for or announced.
    #[error("{url}: digest mismatch: {detail}")]
    DigestMismatch { url: String, detail: String },
    /// The body is larger than allowed.
    #[error("{url}: larger than the limit of {limit} bytes{}", size.map(|s| format!(" ({s} bytes)")).unwrap_or_default())]
    TooLarge {
        url: String,
        limit: u64,
        size: Option<u64>,
    },
    /// The answer is not what the distribution API specifies (a missing or invalid header).
    #[error("{url}: {detail}")]
    Protocol { url: String, detail: String },
}

impl FetchError {
    /// A short stable reason for metrics: `unreachable`, `throttled`, `unauthorized`, `not_found`,
    /// `http_status`, `digest_mismatch`, `too_large`, `protocol`, `setup`.
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::Setup(_) => "setup",
            FetchError::Unreachable { .. } => "unreachable",
            FetchError::Throttled { .. } => "throttled",
            FetchError::Unauthorized { .. } => "unauthorized",
            FetchError::NotFound { .. } => "not_found",
            FetchError::Status { .. } => "http_status",
            FetchError::DigestMismatch { .. } => "digest_mismatch",
            FetchError::TooLarge { .. } => "too_large",
            FetchError::Protocol { .. } => "protocol",
        }
    }

    /// How long the registry asked to be left alone, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// How to reach the registry.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Hosts (`host[:port]`) reached over plain HTTP instead of TLS.
    pub plain_http: Vec<String>,
    /// Credentials by registry.
    pub auth: AuthFile,
    /// Registry name → the `host[:port]` actually contacted.
    pub endpoints: BTreeMap<String, String>,
    /// PEM file of further CA certificates trusted for TLS (added to the system roots).
    pub ca_file: Option<PathBuf>,
    /// Timeout of each request, from sending it to the last byte of the body.
    pub timeout: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            plain_http: Vec::new(),
            auth: AuthFile::empty(),
            endpoints: BTreeMap::new(),
            ca_file: None,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Requests made and bytes received, shared by whoever wants to watch them.
#[derive(Debug, Default)]
pub struct FetchCounters {
    /// HEAD requests (manifests).
    pub heads: AtomicU64,
    /// GET requests (manifests, blobs, tokens).
    pub gets: AtomicU64,
    /// Body bytes received.
    pub bytes: AtomicU64,
}

impl FetchCounters {
    /// All requests so far.
    pub fn requests(&self) -> u64 {
        self.heads.load(Ordering::Relaxed) + self.gets.load(Ordering::Relaxed)
    }
}

/// The answer to a HEAD of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestHead {
    /// `Docker-Content-Digest`.
    pub digest: Digest,
    /// `Content-Length`, if sent.
    pub size: Option<u64>,
}

/// How a host wants to be authenticated, learnt from its first challenge.
#[derive(Debug, Clone)]
pub(super) enum HostAuth {
    /// HTTP basic credentials on every request.
    Basic,
    /// Bearer tokens from `realm`, per scope.
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// A bearer token and when it stops being used.
struct Token {
    value: String,
    until: Instant,
}

/// The client. Keep one per node: it holds the connection pool and the tokens.
pub struct Fetcher {
    http: reqwest::Client,
    plain_http: Vec<String>,
    auth: AuthFile,
    endpoints: BTreeMap<String, String>,
    hosts: Mutex<HashMap<String, HostAuth>>,
    /// Bearer tokens by (host, scope).
    tokens: Mutex<HashMap<(String, String), Token>>,
    counters: Arc<FetchCounters>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("plain_http", &self.plain_http)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// The manifest media types a bundle artifact may have.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json;q=0.5";

impl Fetcher {
    /// A client with `options`, counting into `counters`.
    pub fn new(options: FetchOptions, counters: Arc<FetchCounters>) -> Result<Fetcher, FetchError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("pullgate/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(2)
            .pool_idle_timeout(Duration::from_secs(600));
        if let Some(path) = &options.ca_file {
            builder = builder.tls_certs_merge(read_ca_file(path)?);
        }
        let http = builder
            .build()
            .map_err(|e| FetchError::Setup(error_chain(&e)))?;
        Ok(Fetcher {
            http,
            plain_http: options.plain_http,
            auth: options.auth,
            endpoints: options.endpoints,
            hosts: Mutex::default(),
            tokens: Mutex::default(),
            counters,
        })
    }

    /// The counters this client adds to.
    pub fn counters(&self) -> &Arc<FetchCounters> {
        &self.counters
    }

    /// HEADs the manifest `reference` names (tag or digest) and returns its `Docker-Content-Digest`.
    pub async fn head_manifest(&self, reference: &Reference) -> Result<ManifestHead, FetchError> {
        let target = match (reference.digest(), reference.tag()) {
            (Some(d), _) => d.to_string(),
            (None, t) => t
                .unwrap_or(crate::policy::reference::DEFAULT_TAG)
                .to_owned(),
        };
        let url = self.url(reference, "manifests", &target);
        let resp = self
            .send(reqwest::Method::HEAD, &url, reference, MANIFEST_ACCEPT)
            .await?;
        let header = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| FetchError::Protocol {
                url: url.clone(),
                detail: "the registry sent no Docker-Content-Digest header for the manifest".into(),
            })?;
        let digest = Digest::parse(header.trim()).map_err(|e| FetchError::Protocol {
            url: url.clone(),
            detail: format!("the registry sent an invalid Docker-Content-Digest: {e}"),
        })?;
        if let Some(asked) = reference.digest() {
            if *asked != digest {
                return Err(FetchError::DigestMismatch {
                    url,
                    detail: format!("asked for {asked}, the registry announced {digest}"),
                });
            }
        }
        Ok(ManifestHead {
            digest,
            size: resp.content_length(),
        })
    }

    /// GETs the manifest `digest` of `reference`'s repository, at most `limit` bytes, verified.
    pub async fn get_manifest(
        &self,
        reference: &Reference,
        digest: &Digest,
        limit: u64,
    ) -> Result<Bytes, FetchError> {
        let url = self.url(reference, "manifests", &digest.to_string());
        let resp = self
            .send(reqwest::Method::GET, &url, reference, MANIFEST_ACCEPT)
            .await?;
        self.read_verified(resp, &url, digest, None, limit).await
    }

    /// GETs the blob `digest` of `reference`'s repository: exactly `size` bytes (as its descriptor
    /// says), at most `limit`, verified.
    pub async fn get_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: u64,
        limit: u64,
    ) -> Result<Bytes, FetchError> {
        let url = self.url(reference, "blobs", &digest.to_string());
        if size > limit {
            return Err(FetchError::TooLarge {
                url,
                limit,
                size: Some(size),
            });
        }
        let resp = self
            .send(reqwest::Method::GET, &url, reference, "*/*")
            .await?;
        self.read_verified(resp, &url, digest, Some(size), limit)
            .await
    }

    /// `scheme://host/v2/<repository>/<kind>/<target>`, addressed to the registry's endpoint.
    fn url(&self, r: &Reference, kind: &str, target: &str) -> String {
        let host = self.host(r.domain());
        let scheme = if self
            .plain_http
            .iter()
            .any(|h| *h == host || h == r.domain())
        {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{host}/v2/{}/{kind}/{target}", r.path())
    }

    fn host(&self, name: &str) -> String {
        self.endpoints
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_owned())
    }

    /// Sends one request, answering an authentication challenge once. Returns a 2xx response.
    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        r: &Reference,
        accept: &str,
    ) -> Result<reqwest::Response, FetchError> {
        let host = self.host(r.domain());
        let scope = format!("repository:{}:pull", r.path());
        let credential = self.auth.credential(r.domain());
        let mut challenged = false;
        loop {
            let mut req = self
                .http
                .request(method.clone(), url)
                .header(reqwest::header::ACCEPT, accept);
            req = match self.known_auth(&host) {
                Some(HostAuth::Basic) => match &credential {
                    Credential::Basic { username, password } => {
                        req.basic_auth(username, Some(password))
                    }
                    Credential::Anonymous => req,
                },
                Some(HostAuth::Bearer { .. }) => match self.token(&host, &scope) {
                    Some(t) => req.bearer_auth(t),
                    None => req,
                },
                None => req,
            };
            self.count(&method);
            let resp = req.send().await.map_err(|e| FetchError::Unreachable {
                url: url.to_owned(),
                detail: error_chain(&e),
            })?;
            let status = resp.status().as_u16();
            match status {
                200..=299 => return Ok(resp),
                401 if !challenged => {
                    challenged = true;
                    let challenge = resp
                        .headers()
                        .get(reqwest::header::WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    self.drain(resp).await;
                    match challenge.as_deref().map(parse_challenge) {
                        Some(Some(HostAuth::Basic)) => {
                            if credential == Credential::Anonymous {
                                return Err(unauthorized(
                                    url,
                                    401,
                                    "it asks for credentials and the auth file has none for this registry",
                                ));
                            }
                            self.remember(&host, HostAuth::Basic);
                        }
                        Some(Some(bearer @ HostAuth::Bearer { .. })) => {
                            self.remember(&host, bearer.clone());
                            self.fetch_token(&host, &bearer, &scope, &credential)
                                .await?;
                        }
                        _ => {
                            return Err(unauthorized(
                                url,
                                401,
                                "it sent no usable WWW-Authenticate challenge",
                            ));
                        }
                    }
                }
                401 | 403 => {
                    let detail = self.body_snippet(resp).await;
                    // A token may have been revoked early: ask for a new one next time.
                    self.forget_token(&host, &scope);
                    return Err(unauthorized(url, status, &detail));
                }
                404 => {
                    self.drain(resp).await;
                    return Err(FetchError::NotFound {
                        url: url.to_owned(),
                    });
                }
                429 | 503 => {
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
                    self.drain(resp).await;
                    return Err(FetchError::Throttled {
                        url: url.to_owned(),
                        status,
                        retry_after,
                    });
                }
                _ => {
                    let detail = self.body_snippet(resp).await;
                    return Err(FetchError::Status {
                        url: url.to_owned(),
                        status,
                        detail,
                    });
                }
            }
        }
    }

    fn count(&self, method: &reqwest::Method) {
        let c = if *method == reqwest::Method::HEAD {
            &self.counters.heads
        } else {
            &self.counters.gets
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn known_auth(&self, host: &str) -> Option<HostAuth> {
        self.hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(host)
            .cloned()
    }

    fn remember(&self, host: &str, how: HostAuth) {
        self.hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(host.to_owned(), how);
    }

    fn token(&self, host: &str, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens
            .get(&(host.to_owned(), scope.to_owned()))
            .filter(|t| t.until > Instant::now())
            .map(|t| t.value.clone())
    }

    fn forget_token(&self, host: &str, scope: &str) {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(host.to_owned(), scope.to_owned()));
    }

    /// Asks the token service of a bearer challenge for a pull token (with the basic credentials of
    /// the auth file, if any) and keeps it for its lifetime (less a margin).
    async fn fetch_token(
        &self,
        host: &str,
        how: &HostAuth,
        scope: &str,
        credential: &Credential,
    ) -> Result<(), FetchError> {
        let HostAuth::Bearer { realm, service } = how else {
            return Ok(());
        };
        let mut url = reqwest::Url::parse(realm).map_err(|e| FetchError::Protocol {
            url: realm.clone(),
            detail: format!("the registry's token realm is not a URL: {e}"),
        })?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let shown = format!(
            "{}://{}{}",
            url.scheme(),
            url.host_str().unwrap_or(""),
            url.path()
        );
        let realm_host = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or("")),
            None => url.host_str().unwrap_or("").to_owned(),
        };
        if url.scheme() == "http"
            && *credential != Credential::Anonymous
            && !self.plain_http.contains(&realm_host)
        {
            return Err(FetchError::Protocol {
                url: shown,
                detail: format!(
                    "the registry's token service is on plain HTTP and the credentials are not \
                     sent in clear text; list {realm_host} among the plain-HTTP hosts if that is \
                     intended"
                ),
            });
        }
        let mut req = self.http.get(url);
        if let Credential::Basic { username, password } = credential {
            req = req.basic_auth(username, Some(password));
        }
        self.count(&reqwest::Method::GET);
        let resp = req.send().await.map_err(|e| FetchError::Unreachable {
            url: shown.clone(),
            detail: error_chain(&e),
        })?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let detail = self.body_snippet(resp).await;
            return Err(unauthorized(&shown, status, &detail));
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let body = read_capped(resp, &shown, 64 * 1024, &self.counters).await?;
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| FetchError::Protocol {
            url: shown.clone(),
            detail: format!("the token service sent no token: {e}"),
        })?;
        let Some(value) = t.token.or(t.access_token).filter(|v| !v.is_empty()) else {
            return Err(FetchError::Protocol {
                url: shown,
                detail: "the token service sent an empty token".into(),
            });
        };
        // The distribution spec's default lifetime is 60 s; renew a little early.
        let life = Duration::from_secs(t.expires_in.unwrap_or(60).max(10));
        let until = Instant::now() + life - life / 10;
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((host.to_owned(), scope.to_owned()), Token { value, until });
        Ok(())
    }

    /// Reads a body (at most `limit` bytes, exactly `size` if given) and checks its digest.
    async fn read_verified(
        &self,
        resp: reqwest::Response,
        url: &str,
        digest: &Digest,
        size: Option<u64>,
        limit: u64,
    ) -> Result<Bytes, FetchError> {
        let cap = size.map_or(limit, |s| s.min(limit));
        if let Some(len) = resp.content_length() {
            if size.is_some_and(|s| s != len) {
                return Err(FetchError::DigestMismatch {
                    url: url.to_owned(),
                    detail: format!(
                        "the manifest gives its size as {} bytes, the registry sends {len}",
                        size.unwrap_or(0)
                    ),
                });
            }
            if len > limit {
                return Err(FetchError::TooLarge {
                    url: url.to_owned(),
                    limit,
                    size: Some(len),
                });
            }
        }
        let body = read_capped(resp, url, cap, &self.counters)
            .await
            .map_err(|e| match e {
                // Past the announced size is a mismatch; past the limit is too large.
                FetchError::TooLarge { .. } if size.is_some_and(|s| s < limit) => {
                    FetchError::DigestMismatch {
                        url: url.to_owned(),
                        detail: format!(
                            "the registry sends more than the {} bytes the manifest announces",
                            size.unwrap_or(0)
                        ),
                    }
                }
                other => other,
            })?;
        if size.is_some_and(|s| s != body.len() as u64) {
            return Err(FetchError::DigestMismatch {
                url: url.to_owned(),
                detail: format!(
                    "the manifest gives its size as {} bytes, the registry sent {}",
                    size.unwrap_or(0),
                    body.len()
                ),
            });
        }
        let got = match digest {
            Digest::Sha256(_) => Digest::sha256_of(&body),
            Digest::Sha512(_) => {
                let mut out = Box::new([0u8; 64]);
                out.copy_from_slice(&sha2::Sha512::digest(&body));
                Digest::Sha512(out)
            }
        };
        if got != *digest {
            return Err(FetchError::DigestMismatch {
                url: url.to_owned(),
                detail: format!("asked for {digest}, the bytes received hash to {got}"),
            });
        }
        Ok(body)
    }

    async fn drain(&self, resp: reqwest::Response) {
        let _ = read_capped(resp, "", 64 * 1024, &self.counters).await;
    }

    /// The start of an error body (registries explain refusals there), for messages.
    async fn body_snippet(&self, resp: reqwest::Response) -> String {
        match read_capped(resp, "", 4096, &self.counters).await {
            Ok(b) if !b.is_empty() => {
                let text: String = String::from_utf8_lossy(&b)
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(300)
                    .collect();
                format!(": {text}")
            }
            _ => String::new(),
        }
    }
}

fn unauthorized(url: &str, status: u16, detail: &str) -> FetchError {
    FetchError::Unauthorized {
        url: url.to_owned(),
        status,
        detail: if detail.is_empty() || detail.starts_with(':') {
            detail.to_owned()
        } else {
            format!(": {detail}")
        },
    }
}

/// Reads a body up to `cap` bytes; more is [`FetchError::TooLarge`].
async fn read_capped(
    resp: reqwest::Response,
    url: &str,
    cap: u64,
    counters: &FetchCounters,
) -> Result<Bytes, FetchError> {
    let mut out = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| FetchError::Unreachable {
            url: url.to_owned(),
            detail: error_chain(&e),
        })?;
        counters
            .bytes
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        if out.len() as u64 + chunk.len() as u64 > cap {
            return Err(FetchError::TooLarge {
                url: url.to_owned(),
                limit: cap,
                size: None,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

fn read_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, FetchError> {
    let pem = std::fs::read(path).map_err(|e| {
        FetchError::Setup(format!("cannot read the CA file {}: {e}", path.display()))
    })?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        FetchError::Setup(format!(
            "the CA file {} is not PEM certificates: {}",
            path.display(),
            error_chain(&e)
        ))
    })?;
    if certs.is_empty() {
        return Err(FetchError::Setup(format!(
            "the CA file {} holds no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// An error with its causes, on one line (reqwest's own message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let c_s = c.to_string();
        if !s.contains(&c_s) {
            s.push_str(": ");
            s.push_str(&c_s);
        }
        cur = c.source();
    }
    s
}

/// `Retry-After`: delay-seconds, or an HTTP date (RFC 9110), relative to `now`. Longer than an hour
/// is taken as an hour: a registry cannot silence its nodes for longer with one answer.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    const MAX: Duration = Duration::from_secs(3600);
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX));
    }
    // IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`.
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let at = time::PrimitiveDateTime::parse(v, &format)
        .ok()?
        .assume_utc();
    let now = time::OffsetDateTime::from(now);
    let d = at - now;
    Some(if d.is_negative() {
        Duration::ZERO
    } else {
        Duration::try_from(d).unwrap_or(MAX).min(MAX)
    })
}

/// Parses a `WWW-Authenticate` challenge: `Basic realm="…"` or
/// `Bearer realm="…",service="…",scope="…"`.
pub(super) fn parse_challenge(value: &str) -> Option<HostAuth> {
    let v = value.trim();
    let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(HostAuth::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let realm = params.get("realm")?.clone();
    if !(realm.starts_with("https://") || realm.starts_with("http://")) {
        return None;
    }
    Some(HostAuth::Bearer {
        realm,
        service: params.get("service").cloned(),
    })
}

/// `k="v", k2=v2` → map (quoted strings may contain commas).
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, tail) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"').unwrap_or(q.len());
            (&q[..end], q.get(end + 1..).unwrap_or(""))
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        out.insert(key, value.to_owned());
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";

    /// A loopback HTTP/1.1 server that wants `want` in the Authorization header of registry
    /// requests: without it, 401 with `challenge` (`{port}` is replaced by its own port); `/token`
    /// answers a bearer token to alice's basic credentials. Returns its port and the request lines
    /// it saw.
    async fn guarded(
        challenge: &'static str,
        want: &'static str,
    ) -> (u16, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut c, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 2048];
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match c.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end);
                        let line = head.lines().next().unwrap_or("").to_owned();
                        log.lock().unwrap().push(line.clone());
                        let auth = head
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("authorization: ")
                                    .or_else(|| l.strip_prefix("Authorization: "))
                            })
                            .unwrap_or("");
                        let resp = if line.starts_with("GET /token") && auth == "Basic YWxpY2U6cHc="
                        {
                            let body = r#"{"token":"tok-1","expires_in":300}"#;
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            )
                        } else if auth == want {
                            format!(
                                "HTTP/1.1 200 OK\r\nDocker-Content-Digest: {DIGEST}\r\nContent-Length: 0\r\n\r\n"
                            )
                        } else {
                            let ch = challenge.replace("{port}", &port.to_string());
                            format!(
                                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: {ch}\r\nContent-Length: 0\r\n\r\n"
                            )
                        };
                        if c.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, seen)
    }

    /// A [`guarded`] server and a client of it for the bundles channel, with alice's credentials
    /// for it in the auth file if `alice`; returns the client, the reference and the request lines.
    async fn client_of_guarded(
        challenge: &'static str,
        want: &'static str,
        alice: bool,
    ) -> (Fetcher, Reference, Arc<Mutex<Vec<String>>>) {
        let (port, seen) = guarded(challenge, want).await;
        let host = format!("127.0.0.1:{port}");
        let auth = if alice {
            format!(r#"{{"auths": {{"{host}": {{"username": "alice", "password": "pw"}}}}}}"#)
        } else {
            r#"{"auths": {}}"#.to_owned()
        };
        let fetcher = Fetcher::new(
            FetchOptions {
                plain_http: vec![host.clone()],
                auth: AuthFile::parse(auth.as_bytes(), Path::new("auth.json")).unwrap(),
                ..Default::default()
            },
            Arc::default(),
        )
        .unwrap();
        let r = Reference::parse(&format!("{host}/pullgate/bundles:prod")).unwrap();
        (fetcher, r, seen)
    }

    #[tokio::test]
    async fn credentials_only_when_challenged_and_then_without_a_second_request() {
        // Basic: the first round is challenged once; later rounds are one request each.
        let (f, r, seen) =
            client_of_guarded(r#"Basic realm="r""#, "Basic YWxpY2U6cHc=", true).await;
        for _ in 0..3 {
            assert_eq!(
                f.head_manifest(&r).await.unwrap().digest.to_string(),
                DIGEST
            );
        }
        assert_eq!(seen.lock().unwrap().len(), 4, "{:?}", seen.lock().unwrap());
        assert_eq!(f.counters().requests(), 4);

        // Bearer: 401, a token from the realm (with the basic credentials), then the token is kept.
        let (f, r, seen) = client_of_guarded(
            r#"Bearer realm="http://127.0.0.1:{port}/token",service="registry""#,
            "Bearer tok-1",
            true,
        )
        .await;
        for _ in 0..3 {
            f.head_manifest(&r).await.unwrap();
        }
        let lines = seen.lock().unwrap().clone();
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert!(
            lines[1].starts_with(
                "GET /token?service=registry&scope=repository%3Apullgate%2Fbundles%3Apull"
            ),
            "{lines:?}"
        );

        // A token service on plain HTTP that is not listed as such gets no credentials.
        let (f, r, seen) = client_of_guarded(
            r#"Bearer realm="http://localhost:{port}/token",service="registry""#,
            "Bearer tok-1",
            true,
        )
        .await;
        let e = f.head_manifest(&r).await.unwrap_err();
        assert_eq!(e.reason(), "protocol", "{e}");
        assert!(e.to_string().contains("plain HTTP"), "{e}");
        assert_eq!(seen.lock().unwrap().len(), 1, "{:?}", seen.lock().unwrap());

        // No credentials for a registry that asks for them: refused, with a clear message.
        let (f, r, _) = client_of_guarded(r#"Basic realm="r""#, "Basic YWxpY2U6cHc=", false).await;
        let e = f.head_manifest(&r).await.unwrap_err();
        assert_eq!(e.reason(), "unauthorized");
        assert!(e.to_string().contains("has none for this registry"), "{e}");
        assert!(!e.to_string().contains("pw"));
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date_and_capped() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("999999", now),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn challenges_of_both_schemes() {
        match parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        ) {
            Some(HostAuth::Bearer { realm, service }) => {
                assert_eq!(realm, "https://auth.example/token");
                assert_eq!(service.as_deref(), Some("registry.example"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(HostAuth::Basic)
        ));
        assert!(parse_challenge("Negotiate abc").is_none());
        assert!(
            parse_challenge(r#"Bearer service="x""#).is_none(),
            "no realm"
        );
        assert!(
            parse_challenge(r#"Bearer realm="file:///etc/passwd""#).is_none(),
            "only http(s) realms"
        );
    }
}
