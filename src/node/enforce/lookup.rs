//! Calls pullgate makes to containerd itself, over the same upstream connection as the traffic it
//! forwards: CRI `ImageStatus` to learn what image a container would run, CRI `PodSandboxStatus`
//! (`ListPodSandbox`: every pod) to learn which pod a container is created in, CRI `Status` to read
//! containerd's CRI configuration (the sandbox image), and containerd's native `Content.Read` to
//! prove from content — not from names — which manifests an image really belongs to.

use std::collections::HashMap;

use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::BodyExt;
use k8s_cri::v1 as cri;
use prost::Message;

use crate::node::proxy::grpc::{self, Code, FRAME_HEADER_LEN, MAX_MESSAGE_SIZE, Status};
use crate::node::proxy::{RequestBody, Upstream};

/// containerd namespace of the CRI plugin's images and containers.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// Largest manifest or index pullgate reads to verify an image.
const MAX_MANIFEST: usize = 4 * 1024 * 1024;
/// Most child manifests of an index pullgate looks at.
const MAX_INDEX_CHILDREN: usize = 64;
const NOT_FOUND: u32 = 5;

/// Why a call pullgate made to containerd failed.
#[derive(Debug)]
pub enum CallError {
    /// containerd answered with this non-zero gRPC status code.
    Upstream { code: u32, status: Status },
    /// The call did not get an answer (connection, framing, decoding).
    Local(Status),
}

impl CallError {
    pub fn status(self) -> Status {
        match self {
            CallError::Upstream { status, .. } | CallError::Local(status) => status,
        }
    }
}

/// Sends one request message to `path` and returns the response body (all its messages, framed),
/// after checking the gRPC status.
async fn call_raw(
    upstream: &Upstream,
    path: &str,
    req: &impl Message,
    namespace: Option<&'static str>,
) -> Result<Bytes, CallError> {
    let mut request = Request::post(format!("http://localhost{path}"))
        .body(RequestBody::full(grpc::frame(&req.encode_to_vec())))
        .expect("static request parts are valid");
    let h = request.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    h.insert(header::USER_AGENT, HeaderValue::from_static("pullgate"));
    if let Some(ns) = namespace {
        h.insert("containerd-namespace", HeaderValue::from_static(ns));
    }
    let resp = upstream
        .send(request)
        .await
        .map_err(|e| CallError::Local(e.status()))?;
    let status_in = |h: &http::HeaderMap| -> Option<CallError> {
        let code = h.get("grpc-status")?.to_str().ok()?.parse::<u32>().ok()?;
        (code != 0).then(|| {
            let msg = h
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            CallError::Upstream {
                code,
                status: Status::new(
                    Code::Internal,
                    format!("{path} failed upstream (code {code}): {msg}"),
                ),
            }
        })
    };
    if let Some(e) = status_in(resp.headers()) {
        return Err(e);
    }
    let collected =
        http_body_util::Limited::new(resp.into_body(), MAX_MESSAGE_SIZE + FRAME_HEADER_LEN)
            .collect()
            .await
            .map_err(|e| {
                CallError::Local(Status::new(
                    Code::Unavailable,
                    format!(
                        "pullgate: reading {path} from {} failed: {e}",
                        upstream.name()
                    ),
                ))
            })?;
    if let Some(e) = collected.trailers().and_then(status_in) {
        return Err(e);
    }
    Ok(collected.to_bytes())
}

fn malformed(path: &str, e: &dyn std::fmt::Display) -> CallError {
    CallError::Local(Status::new(
        Code::Internal,
        format!("pullgate: {path} response: {e}"),
    ))
}

/// A unary call: one request, one response message.
pub async fn call<Resp: Message + Default>(
    upstream: &Upstream,
    path: &str,
    req: &impl Message,
    namespace: Option<&'static str>,
) -> Result<Resp, CallError> {
    let body = call_raw(upstream, path, req, namespace).await?;
    let msg = grpc::single_message(&body).map_err(|e| malformed(path, &e))?;
    Resp::decode(msg).map_err(|e| malformed(path, &e))
}

/// [`call`] without a namespace, with errors as statuses.
pub async fn unary<Resp: Message + Default>(
    upstream: &Upstream,
    path: &str,
    req: &impl Message,
) -> Result<Resp, Status> {
    call(upstream, path, req, None)
        .await
        .map_err(CallError::status)
}

/// Splits a response body into its (uncompressed) messages.
fn messages(body: &Bytes) -> Result<Vec<Bytes>, grpc::FrameError> {
    let mut out = Vec::new();
    let mut rest = body.clone();
    while !rest.is_empty() {
        if rest.len() < FRAME_HEADER_LEN {
            return Err(grpc::FrameError::Truncated(rest.len()));
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let end = FRAME_HEADER_LEN + len;
        if rest.len() < end {
            return Err(grpc::FrameError::LengthMismatch {
                announced: len,
                actual: rest.len() - FRAME_HEADER_LEN,
            });
        }
        out.push(grpc::single_message(&rest.slice(..end))?);
        rest = rest.slice(end..);
    }
    Ok(out)
}

/// The bytes of manifest or index `digest` from containerd's content store (which verifies
/// digests on write, so these are the bytes that hash to `digest`); `None` if the store does not
/// have it. At most one byte more than a manifest can be is asked for, so content that is not a
/// manifest (a layer an index names, say) costs no more than that to find out.
pub async fn read_content(upstream: &Upstream, digest: &str) -> Result<Option<Vec<u8>>, Status> {
    use containerd_client::services::v1::{ReadContentRequest, ReadContentResponse};
    let path = "/containerd.services.content.v1.Content/Read";
    let req = ReadContentRequest {
        digest: digest.to_string(),
        offset: 0,
        // containerd reads `size` bytes, or to the end of the blob when it is shorter.
        size: MAX_MANIFEST as i64 + 1,
    };
    let body = match call_raw(upstream, path, &req, Some(CRI_NAMESPACE)).await {
        Ok(b) => b,
        Err(CallError::Upstream {
            code: NOT_FOUND, ..
        }) => return Ok(None),
        Err(e) => return Err(e.status()),
    };
    let mut data = Vec::new();
    for m in messages(&body).map_err(|e| malformed(path, &e).status())? {
        let chunk = ReadContentResponse::decode(m).map_err(|e| malformed(path, &e).status())?;
        data.extend_from_slice(&chunk.data);
        if data.len() > MAX_MANIFEST {
            return Err(Status::new(
                Code::Internal,
                format!("pullgate: content {digest} is larger than a manifest can be"),
            ));
        }
    }
    Ok(Some(data))
}

/// Child manifests of an index read at once, once the node's own platform has proven nothing.
const INDEX_READS_AT_ONCE: usize = 8;

/// The node's architecture as OCI platforms name it (`GOARCH`): the platform containerd pulls an
/// index's image for (pullgate runs on the node, built for its architecture).
pub const NODE_ARCH: &str = {
    let little = cfg!(target_endian = "little");
    match std::env::consts::ARCH.as_bytes() {
        b"x86_64" => "amd64",
        b"aarch64" => "arm64",
        b"x86" => "386",
        b"powerpc64" if little => "ppc64le",
        b"mips64" if little => "mips64le",
        b"mips" if little => "mipsle",
        b"loongarch64" => "loong64",
        _ => std::env::consts::ARCH,
    }
};

/// What a manifest or index says about itself.
enum Manifest {
    /// An image manifest and the digest of its config (the image ID).
    Image {
        config: String,
    },
    /// An index (manifest list): the digests of its child manifests, those for the node's platform
    /// (`linux` on [`NODE_ARCH`]) first, and how many those are; none that the index itself says is
    /// larger than a manifest can be.
    Index {
        children: Vec<String>,
        ours: usize,
    },
    Other,
}

fn parse_manifest(bytes: &[u8]) -> Manifest {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Manifest::Other;
    };
    if let Some(config) = v["config"]["digest"].as_str() {
        return Manifest::Image {
            config: config.to_string(),
        };
    }
    let Some(list) = v["manifests"].as_array() else {
        return Manifest::Other;
    };
    let node_platform = |m: &serde_json::Value| {
        m["platform"]["os"] == "linux" && m["platform"]["architecture"] == NODE_ARCH
    };
    let digest = |m: &serde_json::Value| m["digest"].as_str().map(str::to_string);
    let list = list.iter().filter(|m| {
        m["size"]
            .as_u64()
            .is_none_or(|size| size <= MAX_MANIFEST as u64)
    });
    let mut children: Vec<String> = list
        .clone()
        .filter(|m| node_platform(m))
        .filter_map(digest)
        .take(MAX_INDEX_CHILDREN)
        .collect();
    let ours = children.len();
    children.extend(
        list.filter(|m| !node_platform(m))
            .filter_map(digest)
            .take(MAX_INDEX_CHILDREN - ours),
    );
    Manifest::Index { children, ours }
}

/// The config of child manifest `child` of an index; `None` when it is not an image manifest, or
/// the content store does not hold it (containerd pulls only the node's platform of an index).
async fn child_config(upstream: &Upstream, child: &str) -> Result<Option<String>, Status> {
    Ok(read_content(upstream, child)
        .await?
        .and_then(|bytes| match parse_manifest(&bytes) {
            Manifest::Image { config } => Some(config),
            _ => None,
        }))
}

/// Whether child manifest `child` of an index has `image_id` as its config ([`child_config`]).
async fn child_describes(upstream: &Upstream, child: &str, image_id: &str) -> Result<bool, Status> {
    Ok(child_config(upstream, child)
        .await?
        .is_some_and(|c| c == image_id))
}

/// Whether one of an index's `children` describes `image_id`. The node's platform comes first, one
/// read at a time: containerd pulled that child for this node, so one read usually settles it. The
/// others (another platform, attestations) are then read [`INDEX_READS_AT_ONCE`] at a time, so an
/// image pulled for another platform costs about one more round trip, not one per child. A read
/// that fails starts no more: a child already being read that describes the image still proves it
/// (a proof stands on its own content), otherwise that failure is the answer.
async fn index_describes(
    upstream: &Upstream,
    children: &[String],
    ours: usize,
    image_id: &str,
) -> Result<bool, Status> {
    use futures_util::StreamExt;
    use futures_util::stream::FuturesUnordered;

    let (ours, others) = children.split_at(ours);
    for child in ours {
        if child_describes(upstream, child, image_id).await? {
            return Ok(true);
        }
    }
    let mut waiting = others.iter();
    let mut reads: FuturesUnordered<_> = waiting
        .by_ref()
        .take(INDEX_READS_AT_ONCE)
        .map(|child| child_describes(upstream, child, image_id))
        .collect();
    let mut failed = None;
    while let Some(read) = reads.next().await {
        match read {
            Ok(true) => return Ok(true),
            Ok(false) => {}
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
        if failed.is_none()
            && let Some(child) = waiting.next()
        {
            reads.push(child_describes(upstream, child, image_id));
        }
    }
    failed.map_or(Ok(false), Err)
}

/// Whether content `digest` — an image manifest, or an index one of whose child manifests — has
/// `image_id` as its config: the proof that `digest` describes this image.
async fn describes(
    upstream: &Upstream,
    digest: &str,
    image_id: &str,
    seen: &mut HashMap<String, bool>,
) -> Result<bool, Status> {
    if let Some(known) = seen.get(digest) {
        return Ok(*known);
    }
    let verdict = match read_content(upstream, digest).await? {
        None => false,
        Some(bytes) => match parse_manifest(&bytes) {
            Manifest::Image { config } => config == image_id,
            Manifest::Index { children, ours } => {
                index_describes(upstream, &children, ours, image_id).await?
            }
            Manifest::Other => false,
        },
    };
    seen.insert(digest.to_string(), verdict);
    Ok(verdict)
}

/// Whether containerd's content store holds manifest (or index) `digest` describing image
/// `image_id` (see [`verified_repo_digests`] for why this proof cannot be forged).
pub async fn content_describes(
    upstream: &Upstream,
    digest: &str,
    image_id: &str,
) -> Result<bool, Status> {
    describes(upstream, digest, image_id, &mut HashMap::new()).await
}

/// The image IDs content `digest` describes, read before the image it should describe is known:
/// the config of an image manifest, or of an index's children for the node's platform (the
/// children containerd pulls); none when containerd does not hold `digest`. The image then proven
/// is one of these, exactly as [`content_describes`] would find it.
pub async fn configs_described(upstream: &Upstream, digest: &str) -> Result<Vec<String>, Status> {
    let Some(bytes) = read_content(upstream, digest).await? else {
        return Ok(Vec::new());
    };
    Ok(match parse_manifest(&bytes) {
        Manifest::Image { config } => vec![config],
        Manifest::Index { children, ours } => {
            let mut configs = Vec::with_capacity(ours);
            for child in &children[..ours] {
                configs.extend(child_config(upstream, child).await?);
            }
            configs
        }
        Manifest::Other => Vec::new(),
    })
}

/// Keeps the repo digests that provably belong to image `image_id`.
///
/// CRI's repo digests come from image *names*, and anyone with access to containerd can give any
/// content any name — including `…@sha256:<an approved digest>`. Names are therefore never trusted:
/// a repo digest `R@D` is kept only if containerd's content store holds `D` and `D` is the manifest of
/// this image (its config digest is the image ID), or an index that lists such a manifest. Content is
/// addressed by digest, so this cannot be forged.
pub async fn verified_repo_digests(
    upstream: &Upstream,
    image_id: &str,
    repo_digests: Vec<String>,
) -> Result<Vec<String>, Status> {
    let mut seen = HashMap::new();
    let mut kept = Vec::with_capacity(repo_digests.len());
    for rd in repo_digests {
        let Some((_, digest)) = rd.rsplit_once('@') else {
            continue;
        };
        if describes(upstream, digest, image_id, &mut seen).await? {
            kept.push(rd);
        } else {
            tracing::warn!(repo_digest = ?rd, image_id, "ignoring a repo digest that does not describe the image (forged name?)");
        }
    }
    Ok(kept)
}

/// The repo digests that the content of the image `image` names (an image ID or a reference)
/// proves: none if containerd does not have it, or resolves an image ID to another image.
pub async fn proven_digests(upstream: &Upstream, image: &str) -> Result<Vec<String>, Status> {
    match image_status(upstream, image).await? {
        Some(img) if img.id == image || !super::names::is_image_id(image) => {
            verified_repo_digests(upstream, &img.id, img.repo_digests).await
        }
        _ => Ok(Vec::new()),
    }
}

/// Every pod sandbox containerd holds (`ListPodSandbox`), as it recorded them.
pub async fn pod_sandboxes(upstream: &Upstream) -> Result<Vec<cri::PodSandbox>, Status> {
    let pods: cri::ListPodSandboxResponse = unary(
        upstream,
        "/runtime.v1.RuntimeService/ListPodSandbox",
        &cri::ListPodSandboxRequest { filter: None },
    )
    .await?;
    Ok(pods.items)
}

/// The image a reference or ID names in containerd: `None` if it is not there.
pub async fn image_status(upstream: &Upstream, image: &str) -> Result<Option<cri::Image>, Status> {
    let req = cri::ImageStatusRequest {
        image: Some(cri::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        verbose: false,
    };
    let resp: cri::ImageStatusResponse =
        unary(upstream, "/runtime.v1.ImageService/ImageStatus", &req).await?;
    Ok(resp.image)
}

/// The pod sandbox `id` as containerd recorded it: `None` if containerd does not know it.
pub async fn pod_sandbox_status(
    upstream: &Upstream,
    id: &str,
) -> Result<Option<cri::PodSandboxStatus>, Status> {
    let req = cri::PodSandboxStatusRequest {
        pod_sandbox_id: id.to_string(),
        verbose: false,
    };
    match call::<cri::PodSandboxStatusResponse>(
        upstream,
        "/runtime.v1.RuntimeService/PodSandboxStatus",
        &req,
        None,
    )
    .await
    {
        Ok(resp) => Ok(resp.status),
        Err(CallError::Upstream {
            code: NOT_FOUND, ..
        }) => Ok(None),
        Err(e) => Err(e.status()),
    }
}

/// containerd's configured sandbox (pause) image, from `Status(verbose)`'s `config` JSON.
pub async fn sandbox_image(upstream: &Upstream) -> Result<Option<String>, Status> {
    let resp: cri::StatusResponse = unary(
        upstream,
        "/runtime.v1.RuntimeService/Status",
        &cri::StatusRequest { verbose: true },
    )
    .await?;
    Ok(resp
        .info
        .get("config")
        .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok())
        .and_then(|v| {
            v.get("sandboxImage")
                .and_then(|s| s.as_str())
                .map(str::to_string)
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_and_indexes_are_told_apart() {
        let m = br#"{"schemaVersion":2,"config":{"digest":"sha256:c0"},"layers":[]}"#;
        assert!(matches!(parse_manifest(m), Manifest::Image { config } if config == "sha256:c0"));
        let i = br#"{"schemaVersion":2,"manifests":[{"digest":"sha256:a"},{"digest":"sha256:b"}]}"#;
        assert!(
            matches!(parse_manifest(i), Manifest::Index { children, ours: 0 } if children == ["sha256:a", "sha256:b"])
        );
        assert!(matches!(parse_manifest(b"not json"), Manifest::Other));
        assert!(matches!(parse_manifest(b"{}"), Manifest::Other));
    }

    #[test]
    fn an_index_lists_the_nodes_platform_first() {
        let other = if NODE_ARCH == "s390x" {
            "amd64"
        } else {
            "s390x"
        };
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [
            {"digest": "sha256:other", "platform": {"os": "linux", "architecture": other}},
            {"digest": "sha256:attestation", "platform": {"os": "unknown", "architecture": "unknown"}},
            {"digest": "sha256:windows", "platform": {"os": "windows", "architecture": NODE_ARCH}},
            {"digest": "sha256:ours", "platform": {"os": "linux", "architecture": NODE_ARCH, "variant": "v8"}},
            {"digest": "sha256:bare"},
        ]});
        let Manifest::Index { children, ours } = parse_manifest(index.to_string().as_bytes())
        else {
            panic!("an index");
        };
        assert_eq!(ours, 1);
        assert_eq!(
            children,
            [
                "sha256:ours",
                "sha256:other",
                "sha256:attestation",
                "sha256:windows",
                "sha256:bare"
            ]
        );
        // At most MAX_INDEX_CHILDREN, the node's platform kept however late it is listed.
        let mut many: Vec<_> = (0..100)
            .map(|i| serde_json::json!({"digest": format!("sha256:{i}"), "platform": {"os": "linux", "architecture": other}}))
            .collect();
        many.push(serde_json::json!({"digest": "sha256:ours", "platform": {"os": "linux", "architecture": NODE_ARCH}}));
        let index = serde_json::json!({"manifests": many});
        let Manifest::Index { children, ours } = parse_manifest(index.to_string().as_bytes())
        else {
            panic!("an index");
        };
        assert_eq!(
            (children.len(), ours, children[0].as_str()),
            (MAX_INDEX_CHILDREN, 1, "sha256:ours")
        );
        assert!(
            !matches!(NODE_ARCH, "x86_64" | "aarch64"),
            "GOARCH names, not Rust's"
        );
        // A child the index says is larger than a manifest can be is never read.
        let index = serde_json::json!({"manifests": [
            {"digest": "sha256:layer", "size": MAX_MANIFEST + 1, "platform": {"os": "linux", "architecture": NODE_ARCH}},
            {"digest": "sha256:small", "size": 500},
        ]});
        assert!(matches!(
            parse_manifest(index.to_string().as_bytes()),
            Manifest::Index { children, ours: 0 } if children == ["sha256:small"]
        ));
    }

    #[test]
    fn streamed_messages_are_split() {
        let mut body = grpc::frame(b"one").to_vec();
        body.extend_from_slice(&grpc::frame(b""));
        body.extend_from_slice(&grpc::frame(b"three"));
        let parts = messages(&Bytes::from(body)).unwrap();
        assert_eq!(
            parts,
            vec![
                Bytes::from_static(b"one"),
                Bytes::new(),
                Bytes::from_static(b"three")
            ]
        );
        assert!(messages(&Bytes::from_static(b"\0\0\0\0\x05ab")).is_err());
    }
}
