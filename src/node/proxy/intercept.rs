//! The intercept table: which CRI methods pullgate reads instead of blindly forwarding, and the
//! handler interface for them.
//!
//! A [`Handler`] gets the one request message of the call (unframed protobuf bytes, never decoded by
//! the proxy itself) and returns a [`Verdict`]: forward the original bytes, forward replacement bytes,
//! or answer with a status without asking containerd. Every method not in the table is forwarded
//! untouched, frame by frame.
//!
//! [`ImageLogger`] is the handler of the proxy alone: it decodes the request read-only with the
//! `k8s-cri` types, logs the image reference at debug level (never the credentials the request may
//! carry), and forwards the original bytes.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use k8s_cri::v1 as cri;
use prost::Message;

use super::grpc::{Code, Status};

/// CRI method paths pullgate needs to read.
pub mod methods {
    pub const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";
    pub const IMAGE_STATUS: &str = "/runtime.v1.ImageService/ImageStatus";
    pub const REMOVE_IMAGE: &str = "/runtime.v1.ImageService/RemoveImage";
    pub const LIST_IMAGES: &str = "/runtime.v1.ImageService/ListImages";
    pub const CREATE_CONTAINER: &str = "/runtime.v1.RuntimeService/CreateContainer";
    pub const RUN_POD_SANDBOX: &str = "/runtime.v1.RuntimeService/RunPodSandbox";
    pub const REMOVE_POD_SANDBOX: &str = "/runtime.v1.RuntimeService/RemovePodSandbox";

    /// The same methods in the older `runtime.v1alpha2` API, which containerd 1.6 and 1.7 still
    /// serve. Their messages carry the image and pod in the same fields, so they are enforced alike;
    /// left unintercepted they would be a way around every check.
    pub const V1ALPHA2: [(&str, &str); 7] = [
        ("/runtime.v1alpha2.ImageService/PullImage", PULL_IMAGE),
        ("/runtime.v1alpha2.ImageService/ImageStatus", IMAGE_STATUS),
        ("/runtime.v1alpha2.ImageService/RemoveImage", REMOVE_IMAGE),
        ("/runtime.v1alpha2.ImageService/ListImages", LIST_IMAGES),
        (
            "/runtime.v1alpha2.RuntimeService/CreateContainer",
            CREATE_CONTAINER,
        ),
        (
            "/runtime.v1alpha2.RuntimeService/RunPodSandbox",
            RUN_POD_SANDBOX,
        ),
        (
            "/runtime.v1alpha2.RuntimeService/RemovePodSandbox",
            REMOVE_POD_SANDBOX,
        ),
    ];

    /// The `runtime.v1` path for a `runtime.v1` or `runtime.v1alpha2` one; other paths unchanged.
    pub fn canonical(path: &str) -> &str {
        V1ALPHA2
            .iter()
            .find(|(old, _)| *old == path)
            .map_or(path, |(_, v1)| v1)
    }
}

/// One intercepted call as the handler sees it.
pub struct Call<'a> {
    /// The gRPC method path, e.g. `/runtime.v1.ImageService/PullImage`.
    pub method: &'a str,
    /// The request message: protobuf bytes without the 5-byte gRPC prefix.
    pub message: &'a Bytes,
    /// Work the handler leaves for once its verdict is carried out.
    pub afterwards: &'a mut Afterwards,
}

/// Work a handler leaves for once its verdict is carried out, done in order: right after a
/// forwarded call's request is handed to containerd's socket, while containerd works on it, or
/// right before pullgate's own answer — and in every case before the call's answer reaches the
/// client. The enforcer writes a decision's audit line so: off the call's path, still before its
/// answer. Work not run by then runs when this is dropped.
#[derive(Default)]
pub struct Afterwards(Vec<Box<dyn FnOnce() + Send>>);

impl Afterwards {
    pub fn push(&mut self, work: impl FnOnce() + Send + 'static) {
        self.0.push(Box::new(work));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Takes `other`'s work, to be done after this one's.
    pub fn append(&mut self, mut other: Afterwards) {
        self.0.append(&mut other.0);
    }

    /// Does the work, in the order it was left.
    pub fn run(self) {}
}

/// Work left is never lost: what was not run on purpose runs when it is dropped (a call whose
/// connection ended while it was decided, say).
impl Drop for Afterwards {
    fn drop(&mut self) {
        for work in self.0.drain(..) {
            work();
        }
    }
}

impl std::fmt::Debug for Afterwards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Afterwards({} left)", self.0.len())
    }
}

/// Edits the single response message of a forwarded unary call (unframed protobuf bytes in;
/// `Some(new bytes)` to replace it, `None` to keep it byte for byte).
pub type ResponseEdit = Box<dyn FnOnce(&[u8]) -> Option<Vec<u8>> + Send>;

/// What to do with an intercepted call.
pub enum Verdict {
    /// Forward the original request bytes unchanged.
    Forward,
    /// Forward this message instead (unframed protobuf bytes).
    Replace(Bytes),
    /// Forward (the original request, or this replacement) and edit the response message on its way
    /// back. Only for unary methods: the response is read whole.
    Rewrite {
        request: Option<Bytes>,
        response: ResponseEdit,
    },
    /// Do not ask containerd; answer the client with this status.
    Respond(Status),
}

impl std::fmt::Debug for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Forward => f.write_str("Forward"),
            Verdict::Replace(b) => write!(f, "Replace({} bytes)", b.len()),
            Verdict::Rewrite { request, .. } => write!(
                f,
                "Rewrite {{ request: {:?} bytes, response: <edit> }}",
                request.as_ref().map(Bytes::len)
            ),
            Verdict::Respond(s) => write!(f, "Respond({s:?})"),
        }
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Reads an intercepted call and decides what happens to it.
pub trait Handler: Send + Sync + 'static {
    fn handle<'a>(&'a self, call: Call<'a>) -> BoxFuture<'a, Verdict>;
}

/// Method path → handler. Lookups happen on every call, so this is a plain hash map built once.
#[derive(Clone, Default)]
pub struct InterceptTable {
    handlers: HashMap<Box<str>, Arc<dyn Handler>>,
}

impl InterceptTable {
    /// A table that forwards everything.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The proxy's own table: image-carrying methods go to [`ImageLogger`].
    pub fn logging() -> Self {
        let mut t = Self::empty();
        t.route(
            &[
                methods::PULL_IMAGE,
                methods::IMAGE_STATUS,
                methods::REMOVE_IMAGE,
                methods::CREATE_CONTAINER,
            ],
            &(Arc::new(ImageLogger) as Arc<dyn Handler>),
        );
        t
    }

    pub fn insert(&mut self, method: &str, handler: Arc<dyn Handler>) {
        self.handlers.insert(method.into(), handler);
    }

    /// Routes each `runtime.v1` method to `handler`, and its `runtime.v1alpha2` twin too: containerd
    /// 1.6 serves both, so a handler on one alone would have a way around it.
    pub fn route(&mut self, v1_methods: &[&str], handler: &Arc<dyn Handler>) {
        for &m in v1_methods {
            self.insert(m, handler.clone());
            if let Some((old, _)) = methods::V1ALPHA2.iter().find(|(_, v1)| *v1 == m) {
                self.insert(old, handler.clone());
            }
        }
    }

    #[inline]
    pub fn get(&self, method: &str) -> Option<&Arc<dyn Handler>> {
        if self.handlers.is_empty() {
            return None;
        }
        self.handlers.get(method)
    }

    pub fn methods(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(|k| &**k)
    }
}

/// The image reference and pod an image-carrying CRI request names, decoded read-only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageCall {
    pub image: String,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
}

/// Decodes the image reference (and the pod, where the request carries one) from an intercepted
/// request. `None` for methods that carry no image. Credentials in `PullImageRequest.auth` are
/// decoded by prost but never leave this function.
pub fn image_call(method: &str, message: &[u8]) -> Option<Result<ImageCall, prost::DecodeError>> {
    fn pod(cfg: Option<&cri::PodSandboxConfig>) -> (Option<String>, Option<String>) {
        match cfg.and_then(|c| c.metadata.as_ref()) {
            Some(m) => (Some(m.namespace.clone()), Some(m.name.clone())),
            None => (None, None),
        }
    }
    let image = |spec: Option<cri::ImageSpec>| spec.map(|s| s.image).unwrap_or_default();
    Some(match methods::canonical(method) {
        methods::PULL_IMAGE => cri::PullImageRequest::decode(message).map(|r| {
            let (pod_namespace, pod_name) = pod(r.sandbox_config.as_ref());
            ImageCall {
                image: image(r.image),
                pod_namespace,
                pod_name,
            }
        }),
        methods::IMAGE_STATUS => cri::ImageStatusRequest::decode(message).map(|r| ImageCall {
            image: image(r.image),
            ..Default::default()
        }),
        methods::REMOVE_IMAGE => cri::RemoveImageRequest::decode(message).map(|r| ImageCall {
            image: image(r.image),
            ..Default::default()
        }),
        methods::CREATE_CONTAINER => cri::CreateContainerRequest::decode(message).map(|r| {
            let (pod_namespace, pod_name) = pod(r.sandbox_config.as_ref());
            ImageCall {
                image: image(r.config.and_then(|c| c.image)),
                pod_namespace,
                pod_name,
            }
        }),
        _ => return None,
    })
}

/// Logs the image reference of image-carrying calls at debug level and forwards them unchanged.
pub struct ImageLogger;

impl Handler for ImageLogger {
    fn handle<'a>(&'a self, call: Call<'a>) -> BoxFuture<'a, Verdict> {
        let verdict = match image_call(call.method, call.message) {
            None => Verdict::Forward,
            Some(Ok(c)) => {
                tracing::debug!(
                    method = call.method,
                    image = ?c.image,
                    pod_namespace = ?c.pod_namespace.as_deref().unwrap_or(""),
                    pod_name = ?c.pod_name.as_deref().unwrap_or(""),
                    "image call"
                );
                Verdict::Forward
            }
            Some(Err(e)) => Verdict::Respond(Status::new(
                Code::InvalidArgument,
                format!(
                    "pullgate: {}: the request message is not a valid {} protobuf: {e}",
                    call.method,
                    call.method.rsplit('/').next().unwrap_or("CRI")
                ),
            )),
        };
        Box::pin(std::future::ready(verdict))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_left_for_afterwards_runs_once_in_order_even_if_only_dropped() {
        let done = Arc::new(std::sync::Mutex::new(Vec::new()));
        let left = |n| {
            let mut a = Afterwards::default();
            for i in 0..3 {
                let done = done.clone();
                a.push(move || done.lock().unwrap().push((n, i)));
            }
            a
        };
        left(1).run();
        drop(left(2));
        let mut taken = left(3);
        // What the relay does with a forwarded call's work: taken out, the rest dropped empty.
        let moved = std::mem::take(&mut taken);
        drop(taken);
        assert_eq!(done.lock().unwrap().len(), 6);
        moved.run();
        let want: Vec<(i32, i32)> = (1..=3).flat_map(|n| (0..3).map(move |i| (n, i))).collect();
        assert_eq!(*done.lock().unwrap(), want);
    }

    fn call_with(method: &'static str, message: Bytes) -> Verdict {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(ImageLogger.handle(Call {
            afterwards: &mut Afterwards::default(),
            method,
            message: &message,
        }))
    }

    #[test]
    fn logging_table_routes_image_methods_only() {
        let t = InterceptTable::logging();
        for m in [
            methods::PULL_IMAGE,
            methods::IMAGE_STATUS,
            methods::REMOVE_IMAGE,
            methods::CREATE_CONTAINER,
        ] {
            assert!(t.get(m).is_some(), "{m}");
        }
        for m in [
            "/runtime.v1.RuntimeService/Version",
            "/runtime.v1.ImageService/ListImages",
            "/runtime.v1.ImageService/PullImage/",
            "/runtime.v1alpha2.ImageService/ListImages",
            "",
        ] {
            assert!(t.get(m).is_none(), "{m}");
        }
        // The older API's image methods are routed like v1's.
        assert!(t.get("/runtime.v1alpha2.ImageService/PullImage").is_some());
        assert!(
            t.get("/runtime.v1alpha2.RuntimeService/CreateContainer")
                .is_some()
        );
        assert_eq!(
            methods::canonical("/runtime.v1alpha2.ImageService/PullImage"),
            methods::PULL_IMAGE
        );
        assert_eq!(methods::canonical("/x.Y/Z"), "/x.Y/Z");
        assert!(InterceptTable::empty().get(methods::PULL_IMAGE).is_none());
    }

    #[test]
    fn image_calls_decode_reference_and_pod() {
        let req = cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: "nginx:1.25".into(),
                ..Default::default()
            }),
            auth: Some(cri::AuthConfig {
                password: "hunter2".into(),
                ..Default::default()
            }),
            sandbox_config: Some(cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: "web".into(),
                    namespace: "shop".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let c = image_call(methods::PULL_IMAGE, &req.encode_to_vec())
            .unwrap()
            .unwrap();
        assert_eq!(
            c,
            ImageCall {
                image: "nginx:1.25".into(),
                pod_namespace: Some("shop".into()),
                pod_name: Some("web".into()),
            }
        );
        assert!(!format!("{c:?}").contains("hunter2"));

        let create = cri::CreateContainerRequest {
            config: Some(cri::ContainerConfig {
                image: Some(cri::ImageSpec {
                    image: "sha256:abc".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = image_call(methods::CREATE_CONTAINER, &create.encode_to_vec())
            .unwrap()
            .unwrap();
        assert_eq!(c.image, "sha256:abc");
        assert!(image_call("/runtime.v1.RuntimeService/Version", b"").is_none());
    }

    #[test]
    fn logger_forwards_valid_and_rejects_garbage() {
        let ok = cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: "busybox".into(),
                ..Default::default()
            }),
            verbose: false,
        };
        assert!(matches!(
            call_with(methods::IMAGE_STATUS, ok.encode_to_vec().into()),
            Verdict::Forward
        ));
        match call_with(methods::PULL_IMAGE, Bytes::from_static(b"\x0a\x05ab")) {
            Verdict::Respond(s) => {
                assert_eq!(s.code, Code::InvalidArgument);
                assert!(s.message.contains("PullImage"), "{}", s.message);
            }
            v => panic!("expected a status, got {v:?}"),
        }
    }
}
