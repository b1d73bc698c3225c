//! Unary calls pullgate makes to containerd itself, over the same upstream connection as the traffic
//! it forwards: CRI `ImageStatus` to learn what image a container would run, CRI `Status` to read
//! containerd's CRI configuration (the sandbox image), and containerd's native `Images.Get` to check
//! that an image name's digest is really the digest of what the name points at.

use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::BodyExt;
use k8s_cri::v1 as cri;
use prost::Message;

use crate::proxy::grpc::{self, Code, FRAME_HEADER_LEN, MAX_MESSAGE_SIZE, Status};
use crate::proxy::{RequestBody, Upstream};

/// containerd namespace of the CRI plugin's images and containers.
pub const CRI_NAMESPACE: &str = "k8s.io";

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

/// Calls `path` on containerd with `req` and decodes the response.
pub async fn unary<Resp: Message + Default>(
    upstream: &Upstream,
    path: &str,
    req: &impl Message,
) -> Result<Resp, Status> {
    call(upstream, path, req, None)
        .await
        .map_err(CallError::status)
}

/// [`unary`] with an optional containerd namespace header, keeping containerd's status code.
pub async fn call<Resp: Message + Default>(
    upstream: &Upstream,
    path: &str,
    req: &impl Message,
    namespace: Option<&'static str>,
) -> Result<Resp, CallError> {
    let mut request = Request::post(format!("http://localhost{path}"))
        .body(RequestBody::Full(Some(grpc::frame(&req.encode_to_vec()))))
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
    let local = |code: Code, what: String| CallError::Local(Status::new(code, what));
    let collected =
        http_body_util::Limited::new(resp.into_body(), MAX_MESSAGE_SIZE + FRAME_HEADER_LEN)
            .collect()
            .await
            .map_err(|e| {
                local(
                    Code::Unavailable,
                    format!(
                        "pullgate: reading {path} from {} failed: {e}",
                        upstream.name()
                    ),
                )
            })?;
    if let Some(e) = collected.trailers().and_then(status_in) {
        return Err(e);
    }
    let body: Bytes = collected.to_bytes();
    let msg = grpc::single_message(&body)
        .map_err(|e| local(Code::Internal, format!("pullgate: {path} response: {e}")))?;
    Resp::decode(msg).map_err(|e| local(Code::Internal, format!("pullgate: {path} response: {e}")))
}

/// The target digest (of the manifest or index) of containerd's image record named exactly `name`
/// in the CRI namespace; `None` when no record has that name.
pub async fn record_target(upstream: &Upstream, name: &str) -> Result<Option<String>, Status> {
    use containerd_client::services::v1::{GetImageRequest, GetImageResponse};
    const NOT_FOUND: u32 = 5;
    let req = GetImageRequest {
        name: name.to_string(),
    };
    let path = "/containerd.services.images.v1.Images/Get";
    match call::<GetImageResponse>(upstream, path, &req, Some(CRI_NAMESPACE)).await {
        Ok(resp) => Ok(resp.image.and_then(|i| i.target).map(|t| t.digest)),
        Err(CallError::Upstream {
            code: NOT_FOUND, ..
        }) => Ok(None),
        Err(e) => Err(e.status()),
    }
}

/// Keeps the repo digests whose digest really is what their name points at.
///
/// CRI reports a repo digest for every image name: for a tag name it is derived from the record's
/// target (sound), but a name that *is* a digest reference is reported as written — and anyone with
/// access to containerd can create a record named `…@sha256:<approved>` that points at other content.
/// So each repo digest that is itself a record name must have that record's target as its digest.
pub async fn verified_repo_digests(
    upstream: &Upstream,
    repo_digests: Vec<String>,
) -> Result<Vec<String>, Status> {
    let mut kept = Vec::with_capacity(repo_digests.len());
    for rd in repo_digests {
        let Some((_, claimed)) = rd.rsplit_once('@') else {
            continue;
        };
        match record_target(upstream, &rd).await? {
            Some(target) if target != claimed => {
                tracing::warn!(name = %rd, target = %target, "ignoring an image name whose digest is not its target (forged name?)");
            }
            _ => kept.push(rd),
        }
    }
    Ok(kept)
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
