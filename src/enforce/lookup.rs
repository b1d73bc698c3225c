//! Unary CRI calls pullgate makes to containerd itself, over the same upstream connection as the
//! traffic it forwards: `ImageStatus` to learn what image a container would run, and `Status` to read
//! containerd's CRI configuration (the sandbox image).

use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::BodyExt;
use k8s_cri::v1 as cri;
use prost::Message;

use crate::proxy::grpc::{self, Code, FRAME_HEADER_LEN, MAX_MESSAGE_SIZE, Status};
use crate::proxy::{RequestBody, Upstream};

/// Calls `path` on containerd with `req` and decodes the response.
pub async fn unary<Resp: Message + Default>(
    upstream: &Upstream,
    path: &str,
    req: &impl Message,
) -> Result<Resp, Status> {
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
    let resp = upstream.send(request).await.map_err(|e| e.status())?;
    let status_in = |h: &http::HeaderMap| -> Option<Status> {
        let code = h.get("grpc-status")?.to_str().ok()?.parse::<u32>().ok()?;
        (code != 0).then(|| {
            let msg = h
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            Status::new(
                Code::Internal,
                format!("{path} failed upstream (code {code}): {msg}"),
            )
        })
    };
    if let Some(s) = status_in(resp.headers()) {
        return Err(s);
    }
    let collected =
        http_body_util::Limited::new(resp.into_body(), MAX_MESSAGE_SIZE + FRAME_HEADER_LEN)
            .collect()
            .await
            .map_err(|e| {
                Status::new(
                    Code::Unavailable,
                    format!(
                        "pullgate: reading {path} from {} failed: {e}",
                        upstream.name()
                    ),
                )
            })?;
    if let Some(s) = collected.trailers().and_then(status_in) {
        return Err(s);
    }
    let body: Bytes = collected.to_bytes();
    let msg = grpc::single_message(&body)
        .map_err(|e| Status::new(Code::Internal, format!("pullgate: {path} response: {e}")))?;
    Resp::decode(msg)
        .map_err(|e| Status::new(Code::Internal, format!("pullgate: {path} response: {e}")))
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
