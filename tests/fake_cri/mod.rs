//! Fake CRI upstreams for in-process tests and benchmarks.
//!
//! - [`FakeCri`]: a real tonic server of `k8s-cri`'s `RuntimeService` and `ImageService` on a unix
//!   socket, with scripted behaviour: recorded pulls and request authorities, pod sandboxes
//!   ([`FakeCri::add_sandbox`], `PodSandboxStatus`, `RemovePodSandbox`), a controllable event
//!   stream, slow calls, errors with metadata.
//! - [`RawUpstream`]: a bare HTTP/2 server that records every request exactly (path, headers, body
//!   bytes, trailers) and answers with scripted raw bytes, for byte-for-byte checks that typed
//!   bindings cannot make (they drop unknown fields).
//! - [`raw_call`] and [`cri_channel`]: clients over a unix socket.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use k8s_cri::v1::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request as TReq, Response as TResp, Status};

/// What the fake CRI server observed.
#[derive(Default)]
pub struct Observed {
    pub pulls: Mutex<Vec<cri::PullImageRequest>>,
    /// Image references asked for by ImageStatus, RemoveImage, CreateContainer, in order.
    pub image_statuses: Mutex<Vec<String>>,
    pub removals: Mutex<Vec<String>>,
    pub creates: Mutex<Vec<cri::CreateContainerRequest>>,
    /// Images the fake knows, by every name or ID they are asked for with.
    pub images: Mutex<std::collections::HashMap<String, cri::Image>>,
    /// When set, `ImageStatus` finds only [`Observed::images`] (no canned images for other names).
    pub only_known_images: AtomicBool,
    /// How long each `ImageStatus` takes before it answers (none by default).
    pub image_status_delay: Mutex<Option<Duration>>,
    /// The sandbox image `Status(verbose)` reports.
    pub sandbox_image: Mutex<String>,
    /// containerd's content store (native API, namespace `k8s.io`): digest → bytes.
    pub content: Mutex<std::collections::HashMap<String, Vec<u8>>>,
    /// Namespaces `Content.Read` was asked in.
    pub content_namespaces: Mutex<Vec<String>>,
    /// When each `Content.Read` arrived, in order.
    pub content_read_at: Mutex<Vec<std::time::Instant>>,
    /// Digests whose `Content.Read` fails with `UNAVAILABLE`, as a containerd in trouble answers.
    pub content_failing: Mutex<std::collections::HashSet<String>>,
    /// How long each `Content.Read` that does not fail takes before it answers (none by default).
    pub content_delay: Mutex<Option<Duration>>,
    /// `Content.Read` calls being answered right now, and the most there have been at once.
    pub content_in_flight: AtomicUsize,
    pub content_most_in_flight: AtomicUsize,
    /// Bytes of content `Content.Read` has sent in all.
    pub content_bytes_sent: AtomicUsize,
    /// Pod sandboxes the fake knows (as `PodSandboxStatus` reports them), by ID. Like containerd's,
    /// the fake resolves a unique ID prefix to its sandbox ([`Observed::sandbox`]).
    pub sandboxes: Mutex<std::collections::HashMap<String, cri::PodSandboxStatus>>,
    /// Sandbox IDs asked for by `PodSandboxStatus`, in order.
    pub sandbox_statuses: Mutex<Vec<String>>,
    /// Sandbox IDs `RemovePodSandbox` was called with, in order.
    pub sandbox_removals: Mutex<Vec<String>>,
    /// Sandboxes `RunPodSandbox` created.
    pub sandboxes_run: AtomicUsize,
    pub calls: AtomicUsize,
    /// The `:authority` of every request that reached the server (`None`: the request had none).
    pub authorities: Mutex<Vec<Option<String>>>,
    /// Set when a slow call's handler was dropped before finishing (client cancel / deadline).
    pub cancelled: AtomicBool,
    /// Set when a slow call ran to completion.
    pub completed: AtomicBool,
    /// `ExecSync` calls that reached the fake.
    pub execs_started: std::sync::atomic::AtomicUsize,
}

impl Observed {
    /// The full ID of the sandbox `id` names, as containerd's truncated-ID index resolves it: the
    /// sandbox with exactly that ID, else the one sandbox whose ID starts with it.
    pub fn sandbox(&self, id: &str) -> Option<String> {
        let sandboxes = self.sandboxes.lock().unwrap();
        if sandboxes.contains_key(id) {
            return Some(id.to_string());
        }
        let mut matching = sandboxes
            .keys()
            .filter(|k| !id.is_empty() && k.starts_with(id));
        match (matching.next(), matching.next()) {
            (Some(k), None) => Some(k.clone()),
            _ => None,
        }
    }
}

/// Scripted CRI runtime + image service.
#[derive(Clone)]
pub struct FakeCri {
    pub observed: Arc<Observed>,
    /// Event source for GetContainerEvents: each subscriber gets a fresh receiver.
    events: Arc<Mutex<Option<mpsc::Receiver<cri::ContainerEventResponse>>>>,
}

/// A running fake server; dropping it does not stop it, [`FakeServer::stop`] does.
pub struct FakeServer {
    pub path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    /// Stops accepting and closes every connection.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.abort();
        let _ = (&mut self.task).await;
        let _ = std::fs::remove_file(&self.path);
    }
}

impl FakeCri {
    pub fn new() -> (Self, mpsc::Sender<cri::ContainerEventResponse>) {
        let (tx, rx) = mpsc::channel(64);
        (
            FakeCri {
                observed: Arc::default(),
                events: Arc::new(Mutex::new(Some(rx))),
            },
            tx,
        )
    }

    /// Makes the fake know pod sandbox `id`, recorded with `config`'s metadata and labels (what
    /// containerd's `PodSandboxStatus` reports for a sandbox run with that config).
    pub fn add_sandbox(&self, id: &str, config: &cri::PodSandboxConfig) {
        self.observed.sandboxes.lock().unwrap().insert(
            id.to_string(),
            cri::PodSandboxStatus {
                id: id.to_string(),
                metadata: config.metadata.clone(),
                state: cri::PodSandboxState::SandboxReady as i32,
                labels: config.labels.clone(),
                annotations: config.annotations.clone(),
                ..Default::default()
            },
        );
    }

    /// Serves on a unix socket at `path` until stopped.
    pub fn serve(&self, path: &Path) -> FakeServer {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind fake CRI socket");
        let (stop_tx, stop_rx) = oneshot::channel();
        let svc = self.clone();
        let observed = self.observed.clone();
        let record = tower::ServiceBuilder::new().map_request(move |req: http::Request<_>| {
            let authority = req.uri().authority().map(|a| a.to_string());
            observed.authorities.lock().unwrap().push(authority);
            req
        });
        let task = tokio::spawn(async move {
            // containerd (grpc-go) accepts header lists of up to 16 MiB; tonic's default is 16 KiB.
            let _ = tonic::transport::Server::builder()
                .http2_max_header_list_size(1 << 20)
                .layer(record)
                .add_service(
                    RuntimeServiceServer::new(svc.clone())
                        .max_decoding_message_size(16 << 20)
                        .max_encoding_message_size(16 << 20),
                )
                .add_service(
                    ImageServiceServer::new(svc.clone())
                        .max_decoding_message_size(16 << 20)
                        .max_encoding_message_size(16 << 20),
                )
                .add_service(NativeContent(svc.observed.clone()))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        FakeServer {
            path: path.to_path_buf(),
            stop: Some(stop_tx),
            task,
        }
    }
}

/// Canned image the fake knows, so ImageStatus/ListImages have content.
pub fn fake_image(name: &str) -> cri::Image {
    cri::Image {
        id: format!("sha256:{}", "ab".repeat(32)),
        repo_tags: vec![name.to_string()],
        repo_digests: vec![format!("{name}@sha256:{}", "cd".repeat(32))],
        size: 4242,
        ..Default::default()
    }
}

type Res<T> = Result<TResp<T>, Status>;

fn unimplemented(method: &str) -> Status {
    Status::unimplemented(format!("fake: {method}"))
}

/// Sets `flag` when dropped unless disarmed: detects a handler future dropped mid-call.
struct DropFlag(Arc<Observed>, bool);
impl Drop for DropFlag {
    fn drop(&mut self) {
        if self.1 {
            self.0.cancelled.store(true, Ordering::SeqCst);
        }
    }
}

#[tonic::async_trait]
impl RuntimeService for FakeCri {
    async fn version(&self, r: TReq<cri::VersionRequest>) -> Res<cri::VersionResponse> {
        self.observed.calls.fetch_add(1, Ordering::Relaxed);
        Ok(TResp::new(cri::VersionResponse {
            version: r.into_inner().version,
            runtime_name: "fake-cri".into(),
            runtime_version: "1.0.0".into(),
            runtime_api_version: "v1".into(),
        }))
    }

    async fn list_containers(
        &self,
        _r: TReq<cri::ListContainersRequest>,
    ) -> Res<cri::ListContainersResponse> {
        Ok(TResp::new(cri::ListContainersResponse {
            containers: (0..3)
                .map(|i| cri::Container {
                    id: format!("c{i}"),
                    image_ref: format!("sha256:{i}"),
                    ..Default::default()
                })
                .collect(),
        }))
    }

    async fn status(&self, _r: TReq<cri::StatusRequest>) -> Res<cri::StatusResponse> {
        let sandbox = self.observed.sandbox_image.lock().unwrap().clone();
        let config = serde_json::json!({ "sandboxImage": sandbox }).to_string();
        Ok(TResp::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![cri::RuntimeCondition {
                    r#type: "RuntimeReady".into(),
                    status: true,
                    ..Default::default()
                }],
            }),
            info: [("config".to_string(), config)].into(),
            ..Default::default()
        }))
    }

    async fn remove_container(
        &self,
        r: TReq<cri::RemoveContainerRequest>,
    ) -> Res<cri::RemoveContainerResponse> {
        let id = r.into_inner().container_id;
        let mut s = Status::not_found(format!("container \"{id}\" not found: ünïcode & 100%"));
        s.metadata_mut()
            .insert("x-fake-detail", "removed-elsewhere".parse().unwrap());
        Err(s)
    }

    /// Sleeps `timeout` seconds (the request field), then answers; records cancellation.
    async fn exec_sync(&self, r: TReq<cri::ExecSyncRequest>) -> Res<cri::ExecSyncResponse> {
        let r = r.into_inner();
        self.observed.execs_started.fetch_add(1, Ordering::SeqCst);
        let mut flag = DropFlag(self.observed.clone(), true);
        tokio::time::sleep(Duration::from_millis(r.timeout as u64)).await;
        flag.1 = false;
        self.observed.completed.store(true, Ordering::SeqCst);
        Ok(TResp::new(cri::ExecSyncResponse {
            stdout: r.cmd.join(" ").into_bytes(),
            stderr: vec![],
            exit_code: 0,
        }))
    }

    type GetContainerEventsStream = Pin<
        Box<dyn tokio_stream::Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>,
    >;

    async fn get_container_events(
        &self,
        _r: TReq<cri::GetEventsRequest>,
    ) -> Res<Self::GetContainerEventsStream> {
        // The first subscriber gets the scripted events; later ones two canned events and the end.
        let Some(rx) = self.events.lock().unwrap().take() else {
            let canned = (0..2).map(|i| {
                Ok(cri::ContainerEventResponse {
                    container_id: format!("canned-{i}"),
                    ..Default::default()
                })
            });
            return Ok(TResp::new(Box::pin(tokio_stream::iter(canned))));
        };
        let s = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(TResp::new(Box::pin(tokio_stream::StreamExt::map(s, Ok))))
    }

    /// Records a sandbox with the request's config under a new 64-hex ID, as containerd does; a
    /// request without metadata is refused (containerd: "sandbox config must include metadata").
    async fn run_pod_sandbox(
        &self,
        r: TReq<cri::RunPodSandboxRequest>,
    ) -> Res<cri::RunPodSandboxResponse> {
        let config = r.into_inner().config.unwrap_or_default();
        if config.metadata.is_none() {
            return Err(Status::invalid_argument(
                "sandbox config must include metadata",
            ));
        }
        let n = self.observed.sandboxes_run.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:064x}", 0x5a4d_b0c5_u128 << 64 | n as u128);
        self.add_sandbox(&id, &config);
        Ok(TResp::new(cri::RunPodSandboxResponse {
            pod_sandbox_id: id,
        }))
    }
    async fn stop_pod_sandbox(
        &self,
        _r: TReq<cri::StopPodSandboxRequest>,
    ) -> Res<cri::StopPodSandboxResponse> {
        Err(unimplemented("stop_pod_sandbox"))
    }
    /// Forgets the sandbox (as containerd does, removing an unknown one succeeds).
    async fn remove_pod_sandbox(
        &self,
        r: TReq<cri::RemovePodSandboxRequest>,
    ) -> Res<cri::RemovePodSandboxResponse> {
        let id = r.into_inner().pod_sandbox_id;
        if let Some(full) = self.observed.sandbox(&id) {
            self.observed.sandboxes.lock().unwrap().remove(&full);
        }
        self.observed.sandbox_removals.lock().unwrap().push(id);
        Ok(TResp::new(cri::RemovePodSandboxResponse {}))
    }
    /// Answers from [`Observed::sandboxes`]; NOT_FOUND (as containerd) for any other ID.
    async fn pod_sandbox_status(
        &self,
        r: TReq<cri::PodSandboxStatusRequest>,
    ) -> Res<cri::PodSandboxStatusResponse> {
        let id = r.into_inner().pod_sandbox_id;
        self.observed.calls.fetch_add(1, Ordering::Relaxed);
        self.observed
            .sandbox_statuses
            .lock()
            .unwrap()
            .push(id.clone());
        let status = self
            .observed
            .sandbox(&id)
            .and_then(|full| self.observed.sandboxes.lock().unwrap().get(&full).cloned());
        match status {
            Some(status) => Ok(TResp::new(cri::PodSandboxStatusResponse {
                status: Some(status),
                ..Default::default()
            })),
            None => Err(Status::not_found(format!(
                "an error occurred when try to find sandbox: not found: {id}"
            ))),
        }
    }
    /// Every sandbox in [`Observed::sandboxes`] (filters are not applied).
    async fn list_pod_sandbox(
        &self,
        _r: TReq<cri::ListPodSandboxRequest>,
    ) -> Res<cri::ListPodSandboxResponse> {
        self.observed.calls.fetch_add(1, Ordering::Relaxed);
        let mut items: Vec<cri::PodSandbox> = self
            .observed
            .sandboxes
            .lock()
            .unwrap()
            .values()
            .map(|s| cri::PodSandbox {
                id: s.id.clone(),
                metadata: s.metadata.clone(),
                state: s.state,
                labels: s.labels.clone(),
                annotations: s.annotations.clone(),
                ..Default::default()
            })
            .collect();
        items.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(TResp::new(cri::ListPodSandboxResponse { items }))
    }
    async fn create_container(
        &self,
        r: TReq<cri::CreateContainerRequest>,
    ) -> Res<cri::CreateContainerResponse> {
        self.observed.creates.lock().unwrap().push(r.into_inner());
        Ok(TResp::new(cri::CreateContainerResponse {
            container_id: "created-1".into(),
        }))
    }
    async fn start_container(
        &self,
        _r: TReq<cri::StartContainerRequest>,
    ) -> Res<cri::StartContainerResponse> {
        Err(unimplemented("start_container"))
    }
    async fn stop_container(
        &self,
        _r: TReq<cri::StopContainerRequest>,
    ) -> Res<cri::StopContainerResponse> {
        Err(unimplemented("stop_container"))
    }
    async fn container_status(
        &self,
        _r: TReq<cri::ContainerStatusRequest>,
    ) -> Res<cri::ContainerStatusResponse> {
        Err(unimplemented("container_status"))
    }
    async fn update_container_resources(
        &self,
        _r: TReq<cri::UpdateContainerResourcesRequest>,
    ) -> Res<cri::UpdateContainerResourcesResponse> {
        Err(unimplemented("update_container_resources"))
    }
    async fn reopen_container_log(
        &self,
        _r: TReq<cri::ReopenContainerLogRequest>,
    ) -> Res<cri::ReopenContainerLogResponse> {
        Err(unimplemented("reopen_container_log"))
    }
    async fn exec(&self, _r: TReq<cri::ExecRequest>) -> Res<cri::ExecResponse> {
        Err(unimplemented("exec"))
    }
    async fn attach(&self, _r: TReq<cri::AttachRequest>) -> Res<cri::AttachResponse> {
        Err(unimplemented("attach"))
    }
    async fn port_forward(
        &self,
        _r: TReq<cri::PortForwardRequest>,
    ) -> Res<cri::PortForwardResponse> {
        Err(unimplemented("port_forward"))
    }
    async fn container_stats(
        &self,
        _r: TReq<cri::ContainerStatsRequest>,
    ) -> Res<cri::ContainerStatsResponse> {
        Err(unimplemented("container_stats"))
    }
    async fn list_container_stats(
        &self,
        _r: TReq<cri::ListContainerStatsRequest>,
    ) -> Res<cri::ListContainerStatsResponse> {
        Err(unimplemented("list_container_stats"))
    }
    async fn pod_sandbox_stats(
        &self,
        _r: TReq<cri::PodSandboxStatsRequest>,
    ) -> Res<cri::PodSandboxStatsResponse> {
        Err(unimplemented("pod_sandbox_stats"))
    }
    async fn list_pod_sandbox_stats(
        &self,
        _r: TReq<cri::ListPodSandboxStatsRequest>,
    ) -> Res<cri::ListPodSandboxStatsResponse> {
        Err(unimplemented("list_pod_sandbox_stats"))
    }
    async fn update_runtime_config(
        &self,
        _r: TReq<cri::UpdateRuntimeConfigRequest>,
    ) -> Res<cri::UpdateRuntimeConfigResponse> {
        Err(unimplemented("update_runtime_config"))
    }
    async fn checkpoint_container(
        &self,
        _r: TReq<cri::CheckpointContainerRequest>,
    ) -> Res<cri::CheckpointContainerResponse> {
        Err(unimplemented("checkpoint_container"))
    }
    async fn list_metric_descriptors(
        &self,
        _r: TReq<cri::ListMetricDescriptorsRequest>,
    ) -> Res<cri::ListMetricDescriptorsResponse> {
        Err(unimplemented("list_metric_descriptors"))
    }
    async fn list_pod_sandbox_metrics(
        &self,
        _r: TReq<cri::ListPodSandboxMetricsRequest>,
    ) -> Res<cri::ListPodSandboxMetricsResponse> {
        Err(unimplemented("list_pod_sandbox_metrics"))
    }
    async fn runtime_config(
        &self,
        _r: TReq<cri::RuntimeConfigRequest>,
    ) -> Res<cri::RuntimeConfigResponse> {
        Err(unimplemented("runtime_config"))
    }
}

#[tonic::async_trait]
impl ImageService for FakeCri {
    async fn list_images(&self, _r: TReq<cri::ListImagesRequest>) -> Res<cri::ListImagesResponse> {
        let known: Vec<cri::Image> = {
            let mut v: Vec<cri::Image> = self
                .observed
                .images
                .lock()
                .unwrap()
                .values()
                .cloned()
                .collect();
            v.sort_by(|a, b| a.id.cmp(&b.id));
            v.dedup_by(|a, b| a.id == b.id);
            v
        };
        let images = if known.is_empty() {
            vec![
                fake_image("docker.io/library/busybox:1.36"),
                fake_image("docker.io/library/nginx:1.25"),
            ]
        } else {
            known
        };
        Ok(TResp::new(cri::ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        r: TReq<cri::ImageStatusRequest>,
    ) -> Res<cri::ImageStatusResponse> {
        let name = r.into_inner().image.map(|i| i.image).unwrap_or_default();
        self.observed.calls.fetch_add(1, Ordering::Relaxed);
        self.observed
            .image_statuses
            .lock()
            .unwrap()
            .push(name.clone());
        let delay = *self.observed.image_status_delay.lock().unwrap();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        if let Some(img) = self.observed.images.lock().unwrap().get(&name).cloned() {
            return Ok(TResp::new(cri::ImageStatusResponse {
                image: Some(img),
                info: Default::default(),
            }));
        }
        let known = !self.observed.only_known_images.load(Ordering::Relaxed)
            && !name.starts_with("missing")
            && !name.contains("@sha256:")
            && !name.starts_with("registry.corp");
        Ok(TResp::new(cri::ImageStatusResponse {
            image: known.then(|| fake_image(&name)),
            info: Default::default(),
        }))
    }

    async fn pull_image(&self, r: TReq<cri::PullImageRequest>) -> Res<cri::PullImageResponse> {
        let r = r.into_inner();
        let image = r
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        self.observed.pulls.lock().unwrap().push(r);
        // The ID of an image the fake knows under the pulled name, as containerd answers.
        let known = self.observed.images.lock().unwrap().get(&image).cloned();
        Ok(TResp::new(cri::PullImageResponse {
            image_ref: known.map_or_else(|| format!("sha256:pulled-{image}"), |i| i.id),
        }))
    }

    async fn remove_image(
        &self,
        r: TReq<cri::RemoveImageRequest>,
    ) -> Res<cri::RemoveImageResponse> {
        let name = r.into_inner().image.map(|i| i.image).unwrap_or_default();
        self.observed.removals.lock().unwrap().push(name);
        Ok(TResp::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _r: TReq<cri::ImageFsInfoRequest>,
    ) -> Res<cri::ImageFsInfoResponse> {
        Ok(TResp::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![cri::FilesystemUsage {
                timestamp: 7,
                fs_id: Some(cri::FilesystemIdentifier {
                    mountpoint: "/var/lib/fake".into(),
                }),
                used_bytes: Some(cri::UInt64Value { value: 1 << 30 }),
                inodes_used: Some(cri::UInt64Value { value: 99 }),
            }],
            container_filesystems: vec![],
        }))
    }
}

/// A tonic channel over a unix socket (the way kubelet and crictl connect).
pub async fn cri_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect over unix socket")
}

pub fn runtime_client(ch: Channel) -> cri::runtime_service_client::RuntimeServiceClient<Channel> {
    cri::runtime_service_client::RuntimeServiceClient::new(ch)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20)
}

pub fn image_client(ch: Channel) -> cri::image_service_client::ImageServiceClient<Channel> {
    cri::image_service_client::ImageServiceClient::new(ch)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20)
}

/// One request exactly as the raw upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
    /// The length of every DATA frame as it arrived, empty ones (END_STREAM carriers) included.
    pub data_frames: Vec<usize>,
}

/// The scripted answer of the raw upstream.
#[derive(Clone)]
pub struct Script {
    pub headers: HeaderMap,
    /// Body chunks, each sent as its own DATA frame.
    pub chunks: Vec<Bytes>,
    /// Trailers; `None` with empty `chunks` gives a trailers-only answer carried in `headers`.
    pub trailers: Option<HeaderMap>,
    /// When set, echo the request body back instead of `chunks`.
    pub echo: bool,
}

impl Script {
    /// A gRPC echo: `content-type: application/grpc`, the request body back, `grpc-status: 0`.
    pub fn grpc_echo() -> Script {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/grpc".parse().unwrap());
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        Script {
            headers,
            chunks: Vec::new(),
            trailers: Some(trailers),
            echo: true,
        }
    }
}

/// A bare HTTP/2 upstream that records requests byte for byte.
pub struct RawUpstream {
    pub recorded: Arc<Mutex<Vec<Recorded>>>,
    /// Requests whose headers arrived, complete or not.
    pub heads: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    pub fn serve(path: &Path, script: Script) -> RawUpstream {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        let recorded: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let heads: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let rec = recorded.clone();
        let seen = heads.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let rec = rec.clone();
                let seen = seen.clone();
                let script = script.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let rec = rec.clone();
                        let script = script.clone();
                        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        async move {
                            let (parts, mut body) = req.into_parts();
                            let (mut data, mut trailers, mut data_frames) =
                                (Vec::new(), None, Vec::new());
                            while let Some(frame) = body.frame().await {
                                let Ok(frame) = frame else {
                                    // The client gave the request up (reset): nothing to record.
                                    let none: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
                                        Vec::new();
                                    return Ok(Response::new(StreamBody::new(tokio_stream::iter(
                                        none,
                                    ))));
                                };
                                match frame.into_data() {
                                    Ok(d) => {
                                        data_frames.push(d.len());
                                        data.extend_from_slice(&d);
                                    }
                                    Err(f) => trailers = f.into_trailers().ok(),
                                }
                            }
                            let body = Bytes::from(data);
                            rec.lock().unwrap().push(Recorded {
                                uri: parts.uri,
                                headers: parts.headers,
                                body: body.clone(),
                                trailers,
                                data_frames,
                            });
                            let chunks = if script.echo {
                                vec![body]
                            } else {
                                script.chunks.clone()
                            };
                            let mut frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
                                chunks.into_iter().map(|c| Ok(Frame::data(c))).collect();
                            if let Some(t) = script.trailers.clone() {
                                frames.push(Ok(Frame::trailers(t)));
                            }
                            let mut resp =
                                Response::new(StreamBody::new(tokio_stream::iter(frames)));
                            *resp.headers_mut() = script.headers.clone();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    b.auto_date_header(false).max_header_list_size(1 << 20);
                    let _ = b.serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        RawUpstream {
            recorded,
            heads,
            task,
        }
    }
}

/// What a raw client received.
#[derive(Debug)]
pub struct RawResponse {
    pub status: http::StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

/// Sends one HTTP/2 request with exactly these headers and body over a unix socket.
pub async fn raw_call(path: &Path, uri: &str, headers: HeaderMap, body: Bytes) -> RawResponse {
    let stream = UnixStream::connect(path).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    let mut req = Request::post(uri).body(Full::new(body)).unwrap();
    *req.headers_mut() = headers;
    let resp = send.send_request(req).await.expect("send");
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("collect response");
    RawResponse {
        status: parts.status,
        headers: parts.headers,
        trailers: collected.trailers().cloned(),
        body: collected.to_bytes(),
    }
}

/// Standard gRPC request headers as grpc-go sends them.
pub fn grpc_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("content-type", "application/grpc".parse().unwrap());
    h.insert("te", "trailers".parse().unwrap());
    h.insert("user-agent", "grpc-go/1.60.0".parse().unwrap());
    h
}

/// Frames one message with the 5-byte gRPC prefix.
pub fn frame(msg: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(msg.len() + 5);
    v.push(0);
    v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    v.extend_from_slice(msg);
    v.into()
}

/// containerd's native `containerd.services.content.v1.Content` service, `Read` only, answering from
/// [`Observed::content`] (containerd-client generates no server code, so this is written by hand).
#[derive(Clone)]
pub struct NativeContent(Arc<Observed>);

impl tonic::server::NamedService for NativeContent {
    const NAME: &'static str = "containerd.services.content.v1.Content";
}

type BoxFut<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;
type ContentStream = Pin<
    Box<
        dyn tokio_stream::Stream<
                Item = Result<containerd_client::services::v1::ReadContentResponse, Status>,
            > + Send,
    >,
>;

struct ReadContent(Arc<Observed>);

impl tonic::server::ServerStreamingService<containerd_client::services::v1::ReadContentRequest>
    for ReadContent
{
    type Response = containerd_client::services::v1::ReadContentResponse;
    type ResponseStream = ContentStream;
    type Future = BoxFut<Result<TResp<ContentStream>, Status>>;

    fn call(
        &mut self,
        req: TReq<containerd_client::services::v1::ReadContentRequest>,
    ) -> Self::Future {
        let observed = self.0.clone();
        Box::pin(async move {
            let ns = req
                .metadata()
                .get("containerd-namespace")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            observed.content_namespaces.lock().unwrap().push(ns);
            observed
                .content_read_at
                .lock()
                .unwrap()
                .push(std::time::Instant::now());
            let req = req.into_inner();
            let digest = req.digest;
            // A failing read fails at once, before the delay.
            if observed.content_failing.lock().unwrap().contains(&digest) {
                return Err(Status::unavailable(format!(
                    "content digest {digest}: failing"
                )));
            }
            let now = observed.content_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            observed
                .content_most_in_flight
                .fetch_max(now, Ordering::SeqCst);
            let delay = *observed.content_delay.lock().unwrap();
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            observed.content_in_flight.fetch_sub(1, Ordering::SeqCst);
            let data = observed.content.lock().unwrap().get(&digest).cloned();
            let mut data = data
                .ok_or_else(|| Status::not_found(format!("content digest {digest}: not found")))?;
            // As containerd: `size` bytes, or to the end of the blob when it is shorter or 0.
            if req.size > 0 {
                data.truncate(req.size as usize);
            }
            observed
                .content_bytes_sent
                .fetch_add(data.len(), Ordering::SeqCst);
            // Two chunks, as containerd streams large content.
            let mid = data.len() / 2;
            let chunks = vec![
                Ok(containerd_client::services::v1::ReadContentResponse {
                    offset: 0,
                    data: data[..mid].to_vec(),
                }),
                Ok(containerd_client::services::v1::ReadContentResponse {
                    offset: mid as i64,
                    data: data[mid..].to_vec(),
                }),
            ];
            Ok(TResp::new(
                Box::pin(tokio_stream::iter(chunks)) as ContentStream
            ))
        })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for NativeContent {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFut<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let observed = self.0.clone();
        Box::pin(async move {
            if req.uri().path() != "/containerd.services.content.v1.Content/Read" {
                return Ok(Status::unimplemented("fake: only Content.Read").into_http());
            }
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.server_streaming(ReadContent(observed), req).await)
        })
    }
}

/// Waits (at most 10 s) until `n` `ExecSync` calls have reached the fake.
pub async fn wait_execs(observed: &Observed, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while observed.execs_started.load(Ordering::SeqCst) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{n} ExecSync calls never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Puts an OCI index into the fake content store under `digest`, listing `children` (a child's
/// digest, and its platform's `os` and `architecture` when it has one) in that order.
pub fn put_index(observed: &Observed, digest: &str, children: &[(String, Option<(&str, &str)>)]) {
    let manifests: Vec<_> = children
        .iter()
        .map(|(child, platform)| {
            let mut m = serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": child,
                "size": 1,
            });
            if let Some((os, arch)) = platform {
                m["platform"] = serde_json::json!({"os": os, "architecture": arch});
            }
            m
        })
        .collect();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    observed
        .content
        .lock()
        .unwrap()
        .insert(digest.to_string(), index.to_string().into_bytes());
}

/// Puts an image manifest with config `image_id` into the fake content store under `digest`.
pub fn put_manifest(observed: &Observed, digest: &str, image_id: &str) {
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": image_id, "size": 1},
        "layers": [],
    });
    observed
        .content
        .lock()
        .unwrap()
        .insert(digest.to_string(), manifest.to_string().into_bytes());
}
