//! Manifest existence checks (`HEAD /v2/<name>/manifests/<digest>`), many at a time, without asking
//! the registry how to authenticate before every one.
//!
//! `oci-client` (0.18) caches bearer tokens, but not the answer "this registry needs no token": to a
//! registry whose `/v2/` answers without a challenge it sends that ping again before every request,
//! which doubled the requests of `bundle build --check-mirror` (20,000 for 10,000 manifests). This
//! module asks each registry once ([`Heads::access`]) and then, for a registry that is open or asks for
//! HTTP Basic credentials, sends the HEAD requests itself with the HTTP client `oci-client` is built on
//! (`reqwest`, no other dependency). A registry that answers with a bearer-token challenge keeps going
//! through `oci-client`, which implements the token protocol (one token per repository); so does every
//! request that the direct path cannot settle (a 401 or 403, a failed ping).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

use super::fetch::{HostAuth, parse_challenge};
use super::{ACCEPTED_MANIFESTS, Credential, RegistryError};
use crate::policy::Digest;

/// How a registry answered `GET /v2/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// 200 without a challenge: no credentials needed.
    Open,
    /// 401 with a `Basic` challenge: the auth file's user and password on every request.
    Basic,
    /// Anything else (a bearer-token challenge, an error): left to `oci-client`.
    Client,
}

/// The outcome of a direct HEAD.
pub(super) enum Head {
    /// The manifest is there (and the registry's digest header, if any, matches).
    Present,
    /// 404.
    Missing,
    /// The direct path cannot tell (401, 403): ask through `oci-client`.
    Ask,
}

/// The HTTP client for direct HEADs and what each registry answered to its ping.
pub(super) struct Heads {
    http: reqwest::Client,
    plain_http: Vec<String>,
    access: Mutex<HashMap<String, Arc<OnceCell<Access>>>>,
}

impl Heads {
    pub(super) fn new(
        plain_http: Vec<String>,
        user_agent: &'static str,
        connect_timeout: std::time::Duration,
        read_timeout: std::time::Duration,
    ) -> Result<Heads, RegistryError> {
        let http = reqwest::Client::builder()
            .user_agent(user_agent)
            .connect_timeout(connect_timeout)
            .read_timeout(read_timeout)
            .build()
            .map_err(|e| RegistryError::Setup(e.to_string()))?;
        Ok(Heads {
            http,
            plain_http,
            access: Mutex::default(),
        })
    }

    fn url(&self, host: &str, path: &str) -> String {
        let scheme = if self.plain_http.iter().any(|h| h == host) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{host}{path}")
    }

    /// How `host` wants to be asked: one ping per registry and [`Heads`], shared by concurrent callers.
    pub(super) async fn access(&self, host: &str) -> Access {
        let cell = {
            let mut map = self.access.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(host.to_owned()).or_default().clone()
        };
        *cell
            .get_or_init(|| async {
                let Ok(res) = self.http.get(self.url(host, "/v2/")).send().await else {
                    return Access::Client;
                };
                let challenge = res
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .map(|v| v.to_str().ok().and_then(parse_challenge));
                match (res.status().as_u16(), challenge) {
                    (200..=299, None) => Access::Open,
                    (401, Some(Some(HostAuth::Basic))) => Access::Basic,
                    _ => Access::Client,
                }
            })
            .await
    }

    /// `HEAD` of `repository@digest` in `host`, with `credential` when `access` is [`Access::Basic`].
    pub(super) async fn head(
        &self,
        access: Access,
        credential: Credential,
        host: &str,
        repository: &str,
        digest: &Digest,
        shown: &str,
    ) -> Result<Head, RegistryError> {
        let mut req = self
            .http
            .head(self.url(host, &format!("/v2/{repository}/manifests/{digest}")))
            .header(reqwest::header::ACCEPT, ACCEPTED_MANIFESTS.join(", "));
        if access == Access::Basic {
            if let Credential::Basic { username, password } = credential {
                req = req.basic_auth(username, Some(password));
            }
        }
        let res = req.send().await.map_err(|e| RegistryError::Request {
            reference: shown.to_owned(),
            what: "checking the manifest",
            detail: e.without_url().to_string(),
        })?;
        match res.status().as_u16() {
            200..=299 => {
                let announced = res
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .map(Digest::parse);
                match announced {
                    Some(Ok(d)) if d.algorithm() == digest.algorithm() && d != *digest => {
                        Err(RegistryError::DigestMismatch {
                            reference: shown.to_owned(),
                            detail: format!("asked for {digest}, the registry announced {d}"),
                        })
                    }
                    _ => Ok(Head::Present),
                }
            }
            404 => Ok(Head::Missing),
            401 | 403 => Ok(Head::Ask),
            code => Err(RegistryError::Request {
                reference: shown.to_owned(),
                what: "checking the manifest",
                detail: format!("the registry answered {code}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

    use crate::policy::Digest;
    use crate::registry::{AuthFile, Registry, RegistryOptions};

    /// A registry that asks for HTTP Basic credentials (`u:p`) and has one manifest; answers every
    /// request on its own connection and records the request lines with their credentials' presence.
    async fn basic_registry(
        present: Digest,
    ) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            // "u:p" in base64.
            let good = "authorization: basic dtpw";
            while let Ok((sock, _)) = listener.accept().await {
                let (log, present) = (log.clone(), present.clone());
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut lines = BufReader::new(r).lines();
                    loop {
                        let Ok(Some(request)) = lines.next_line().await else {
                            return;
                        };
                        let mut authorized = false;
                        while let Ok(Some(h)) = lines.next_line().await {
                            if h.is_empty() {
                                break;
                            }
                            authorized |= h.to_ascii_lowercase() == good;
                        }
                        log.lock()
                            .unwrap()
                            .push(format!("{request} auth={authorized}"));
                        let status = if !authorized {
                            "401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"test\""
                        } else if request.contains(&present.to_string())
                            || request.starts_with("GET /v2/ ")
                        {
                            "200 OK"
                        } else {
                            "404 Not Found"
                        };
                        let reply = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                        if w.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (host, seen)
    }

    #[tokio::test]
    async fn a_basic_registry_is_asked_once_then_sent_credentials_with_every_head() {
        let present = Digest::Sha256([1; 32]);
        let (host, seen) = basic_registry(present.clone()).await;
        let auth = AuthFile::parse(
            format!(r#"{{"auths":{{"{host}":{{"auth":"dTpw"}}}}}}"#).as_bytes(),
            Path::new("config.json"),
        )
        .unwrap();
        let reg = Registry::new(RegistryOptions {
            plain_http: vec![host.clone()],
            auth,
            ..Default::default()
        })
        .unwrap();
        let missing = Digest::Sha256([2; 32]);
        for (d, want) in [(&present, true), (&missing, false), (&present, true)] {
            assert_eq!(
                reg.manifest_exists(&host, "approved/x", d).await.unwrap(),
                want
            );
        }
        let seen = seen.lock().unwrap().clone();
        let head = |d: &Digest| format!("HEAD /v2/approved/x/manifests/{d} HTTP/1.1 auth=true");
        assert_eq!(
            seen,
            [
                "GET /v2/ HTTP/1.1 auth=false".to_owned(),
                head(&present),
                head(&missing),
                head(&present)
            ]
        );
    }
}
