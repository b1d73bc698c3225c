//! The operator endpoint, apart from the CRI data path: `/metrics` (Prometheus text), `/healthz`
//! (the process answers), `/readyz` (containerd answers and a valid bundle is in force) and
//! `/status` (JSON for `pullgate status`). Loopback by default; read-only.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::node::Node;

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

async fn route(
    node: Arc<Node>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET is served here\n",
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                node.metrics_text(now),
            )
        }
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" => match node.ready().await {
            Ok(()) => reply(StatusCode::OK, TEXT, "ready\n"),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {why}\n"),
            ),
        },
        "/status" => reply(
            StatusCode::OK,
            "application/json",
            node.status_json().to_string(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "pullgate serves /metrics, /healthz, /readyz and /status\n",
        ),
    })
}

/// Clients served at once (scrapers, `pullgate status`); more wait in the listen backlog. Any local
/// process can connect to loopback, so this keeps them from holding the daemon's file descriptors.
const MAX_CLIENTS: usize = 16;
/// How long one client connection may stay open.
const CLIENT_TIME: Duration = Duration::from_secs(30);

/// Serves the endpoint on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, node: Arc<Node>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors or similar: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let node = node.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| route(node.clone(), req));
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CLIENT_TIME, conn).await;
            drop(slot);
        });
    }
}
