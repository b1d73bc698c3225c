//! Registry credentials from a Docker-style `config.json` (what `docker login`, `podman login
//! --authfile` and `skopeo login` write).
//!
//! Read: `auths.<registry>.auth` (base64 of `user:password`), `auths.<registry>.username` /
//! `password`, and `auths.<registry>.identitytoken` (an OAuth2 refresh token, sent as the password of
//! the special user `<token>`, the way the token services of registries that issue identity tokens
//! expect it). Credential helpers (`credsStore`, `credHelpers`) are not run: a registry that is only
//! served by a helper is reported when it is used, so the administrator knows to log in to a file.
//!
//! Secrets never reach a log: [`Credential`] has a `Debug` that prints the user name only.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

/// Why an auth file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file exists but cannot be read.
    #[error("cannot read the registry auth file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not JSON of the expected shape.
    #[error(
        "the registry auth file {} is not a Docker config.json: {why}; fix it or log in again (`docker login`, `skopeo login --authfile`)",
        path.display()
    )]
    Malformed { path: PathBuf, why: String },
    /// An entry's `auth` is not base64 of `user:password`.
    #[error(
        "the registry auth file {} has an unusable entry for {registry}: {why}; log in to {registry} again",
        path.display()
    )]
    Entry {
        path: PathBuf,
        registry: String,
        why: &'static str,
    },
}

/// How to authenticate to one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// No credentials: anonymous access.
    Anonymous,
    /// HTTP basic credentials (sent to the registry's token service, or to the registry itself).
    Basic { username: String, password: String },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Anonymous => f.write_str("Anonymous"),
            Credential::Basic { username, .. } => {
                write!(f, "Basic({username:?}, <redacted>)")
            }
        }
    }
}

/// The credentials of an auth file, by registry host (`registry.corp`, `localhost:5000`, `docker.io`).
#[derive(Clone, Default)]
pub struct AuthFile {
    /// Where they were read from (for messages), if anywhere.
    path: Option<PathBuf>,
    entries: BTreeMap<String, Credential>,
    /// Registries only a credential helper knows (reported when used).
    helpers: BTreeMap<String, String>,
}

impl fmt::Debug for AuthFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthFile")
            .field("path", &self.path)
            .field("registries", &self.entries.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    auths: BTreeMap<String, RawAuth>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

impl AuthFile {
    /// No credentials at all.
    pub fn empty() -> AuthFile {
        AuthFile::default()
    }

    /// The default auth file: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`. A missing
    /// file means no credentials.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
            return Some(PathBuf::from(dir).join("config.json"));
        }
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".docker").join("config.json"))
    }

    /// Reads `path`; with `required` false a missing file is no credentials.
    pub fn load(path: &Path, required: bool) -> Result<AuthFile, AuthError> {
        match std::fs::read(path) {
            Ok(bytes) => AuthFile::parse(&bytes, path),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(AuthFile {
                path: Some(path.to_owned()),
                ..AuthFile::default()
            }),
            Err(source) => Err(AuthError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Parses the bytes of a config.json read from `path`.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<AuthFile, AuthError> {
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| AuthError::Malformed {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        let mut out = AuthFile {
            path: Some(path.to_owned()),
            ..AuthFile::default()
        };
        for (key, entry) in raw.auths {
            let host = normalise_host(&key);
            let entry_error = |why| AuthError::Entry {
                path: path.to_owned(),
                registry: host.clone(),
                why,
            };
            let (mut username, mut password) = (entry.username, entry.password);
            if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| entry_error("`auth` is not base64"))?;
                let decoded = String::from_utf8(decoded)
                    .map_err(|_| entry_error("`auth` does not decode to text"))?;
                let (u, p) = decoded
                    .split_once(':')
                    .ok_or_else(|| entry_error("`auth` is not base64 of user:password"))?;
                username = Some(u.to_owned());
                password = Some(p.to_owned());
            }
            let credential = match (entry.identitytoken.filter(|t| !t.is_empty()), username) {
                (Some(token), _) => Credential::Basic {
                    username: "<token>".into(),
                    password: token,
                },
                (None, Some(username)) if !username.is_empty() => Credential::Basic {
                    username,
                    password: password.unwrap_or_default(),
                },
                _ => continue,
            };
            out.entries.insert(host, credential);
        }
        for (key, helper) in raw.cred_helpers {
            out.helpers.insert(normalise_host(&key), helper);
        }
        if let Some(store) = raw.creds_store.filter(|s| !s.is_empty()) {
            out.helpers.insert("*".into(), store);
        }
        Ok(out)
    }

    /// The credential for `host` (as in an image reference: `docker.io`, `registry.corp:5000`).
    pub fn credential(&self, host: &str) -> Credential {
        let host = normalise_host(host);
        self.entries
            .get(&host)
            .cloned()
            .unwrap_or(Credential::Anonymous)
    }

    /// A note for error messages when `host` has no credential in the file but a credential helper
    /// would have served it.
    pub fn helper_note(&self, host: &str) -> Option<String> {
        let host = normalise_host(host);
        if self.entries.contains_key(&host) {
            return None;
        }
        let helper = self.helpers.get(&host).or_else(|| self.helpers.get("*"))?;
        Some(format!(
            "credentials for {host} are kept by the credential helper `docker-credential-{helper}`, which pullgate does not run; log in with `skopeo login --authfile FILE {host}` and pass --authfile FILE"
        ))
    }

    /// Where the credentials were read from.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `https://registry.corp:5000/` → `registry.corp:5000`.
fn normalise_host(key: &str) -> String {
    let key = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = key.split('/').next().unwrap_or(key).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<AuthFile, AuthError> {
        AuthFile::parse(json.as_bytes(), Path::new("config.json"))
    }

    #[test]
    fn reads_auth_identity_token_and_docker_hub_key() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cret:with:colons");
        let f = parse(&format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{b64}"}},
                "registry.corp:5000": {{"auth": "", "identitytoken": "refresh-me"}},
                "https://quay.io": {{"username": "bob", "password": "pw"}},
                "empty.example": {{}}
            }}}}"#
        ))
        .unwrap();
        assert_eq!(
            f.credential("docker.io"),
            Credential::Basic {
                username: "alice".into(),
                password: "s3cret:with:colons".into()
            }
        );
        assert_eq!(
            f.credential("registry.corp:5000"),
            Credential::Basic {
                username: "<token>".into(),
                password: "refresh-me".into()
            }
        );
        assert_eq!(
            f.credential("quay.io"),
            Credential::Basic {
                username: "bob".into(),
                password: "pw".into()
            }
        );
        assert_eq!(f.credential("empty.example"), Credential::Anonymous);
        assert_eq!(f.credential("ghcr.io"), Credential::Anonymous);
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:hunter2");
        let f = parse(&format!(
            r#"{{"auths": {{"r.example": {{"auth": "{b64}"}}}}}}"#
        ))
        .unwrap();
        let all = format!("{f:?} {:?}", f.credential("r.example"));
        assert!(!all.contains("hunter2"), "{all}");
        assert!(!all.contains(&b64), "{all}");
        assert!(all.contains("alice"), "{all}");
    }

    #[test]
    fn bad_entries_name_the_registry() {
        let e = parse(r#"{"auths": {"r.example": {"auth": "%%%"}}}"#)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("r.example") && e.contains("base64"), "{e}");
        let e = parse("[1]").err().unwrap().to_string();
        assert!(e.contains("not a Docker config.json"), "{e}");
    }

    #[test]
    fn helpers_are_named_not_run() {
        let f = parse(r#"{"auths": {}, "credHelpers": {"gcr.io": "gcloud"}}"#).unwrap();
        let note = f.helper_note("gcr.io").unwrap();
        assert!(note.contains("docker-credential-gcloud"), "{note}");
        assert!(f.helper_note("quay.io").is_none());
    }
}
