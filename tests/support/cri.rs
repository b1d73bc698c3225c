//! A CRI v1 client over a unix socket (what kubelet does), plus pod/container helpers for host-network
//! pods. Calls return `Result<_, tonic::Status>` so tests can assert on denials.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerEventResponse, ContainerMetadata, ContainerState,
    ContainerStatusRequest, ContainerStatusResponse, CreateContainerRequest, ExecSyncRequest,
    ExecSyncResponse, GetEventsRequest, Image, ImageFsInfoRequest, ImageFsInfoResponse, ImageSpec,
    ImageStatusRequest, ImageStatusResponse, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListContainersRequest, ListContainersResponse, ListImagesRequest, ListPodSandboxRequest,
    ListPodSandboxResponse, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    PullImageRequest, RemoveContainerRequest, RemoveImageRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StatusRequest, StatusResponse,
    StopPodSandboxRequest, VersionRequest, VersionResponse,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// A connected CRI client (runtime and image service on the same channel).
#[derive(Clone)]
pub struct Cri {
    pub socket: PathBuf,
    pub rt: RuntimeServiceClient<Channel>,
    pub img: ImageServiceClient<Channel>,
}

/// Connects a tonic channel to a unix socket (the URI is a placeholder; the connector dials `path`).
pub async fn channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    Endpoint::try_from("http://[::]:50051")?
        .timeout(Duration::from_secs(60))
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}

impl Cri {
    /// Connects to `socket`, retrying for up to 10 s while it is not there yet.
    pub async fn connect(socket: &Path) -> Cri {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match channel(socket).await {
                Ok(ch) => {
                    return Cri {
                        socket: socket.to_path_buf(),
                        rt: RuntimeServiceClient::new(ch.clone()),
                        img: ImageServiceClient::new(ch),
                    };
                }
                Err(e) if tokio::time::Instant::now() > deadline => {
                    panic!("cannot connect a CRI client to {}: {e:?}", socket.display())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub async fn version(&mut self) -> Result<VersionResponse, Status> {
        Ok(self
            .rt
            .version(VersionRequest {
                version: "v1".into(),
            })
            .await?
            .into_inner())
    }

    pub async fn status(&mut self) -> Result<StatusResponse, Status> {
        Ok(self
            .rt
            .status(StatusRequest { verbose: false })
            .await?
            .into_inner())
    }

    pub async fn list_images(&mut self) -> Result<Vec<Image>, Status> {
        Ok(self
            .img
            .list_images(ListImagesRequest { filter: None })
            .await?
            .into_inner()
            .images)
    }

    pub async fn image_status(&mut self, image: &str) -> Result<ImageStatusResponse, Status> {
        Ok(self
            .img
            .image_status(ImageStatusRequest {
                image: Some(image_spec(image)),
                verbose: false,
            })
            .await?
            .into_inner())
    }

    /// PullImage on behalf of a pod in `namespace`; returns the image ref (`sha256:<config digest>`).
    pub async fn pull(&mut self, image: &str, namespace: &str) -> Result<String, Status> {
        Ok(self
            .img
            .pull_image(PullImageRequest {
                image: Some(image_spec(image)),
                auth: None,
                sandbox_config: Some(host_pod_config("pull", namespace)),
            })
            .await?
            .into_inner()
            .image_ref)
    }

    pub async fn remove_image(&mut self, image: &str) -> Result<(), Status> {
        self.img
            .remove_image(RemoveImageRequest {
                image: Some(image_spec(image)),
            })
            .await?;
        Ok(())
    }

    /// Runs a host-network pod sandbox; returns its id.
    pub async fn run_pod(&mut self, config: &PodSandboxConfig) -> Result<String, Status> {
        Ok(self
            .rt
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await?
            .into_inner()
            .pod_sandbox_id)
    }

    /// CreateContainer in `pod` from `image` running `command` (empty: the image's default).
    pub async fn create_container(
        &mut self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String, Status> {
        Ok(self
            .rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.to_string(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: name.to_string(),
                        attempt: 0,
                    }),
                    image: Some(image_spec(image)),
                    command: command.iter().map(|s| s.to_string()).collect(),
                    labels: HashMap::new(),
                    ..Default::default()
                }),
                sandbox_config: Some(pod_config.clone()),
            })
            .await?
            .into_inner()
            .container_id)
    }

    /// CreateContainer as kubelet does it: `image` is the image ID (or reference) kubelet resolved
    /// with ImageStatus, `user_image` the name in the pod spec (`ImageSpec.user_specified_image`).
    pub async fn create_container_as_kubelet(
        &mut self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        name: &str,
        image: &str,
        user_image: &str,
        command: &[&str],
    ) -> Result<String, Status> {
        Ok(self
            .rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.to_string(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: name.to_string(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: image.to_string(),
                        user_specified_image: user_image.to_string(),
                        ..Default::default()
                    }),
                    command: command.iter().map(|s| s.to_string()).collect(),
                    labels: HashMap::new(),
                    ..Default::default()
                }),
                sandbox_config: Some(pod_config.clone()),
            })
            .await?
            .into_inner()
            .container_id)
    }

    /// StartContainer.
    pub async fn start_container(&mut self, container: &str) -> Result<(), Status> {
        self.rt
            .start_container(StartContainerRequest {
                container_id: container.to_string(),
            })
            .await?;
        Ok(())
    }

    /// ExecSync `cmd` in a running container.
    pub async fn exec_sync(
        &mut self,
        container: &str,
        cmd: &[&str],
    ) -> Result<ExecSyncResponse, Status> {
        Ok(self
            .rt
            .exec_sync(ExecSyncRequest {
                container_id: container.to_string(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 30,
            })
            .await?
            .into_inner())
    }

    pub async fn list_pod_sandbox(&mut self) -> Result<ListPodSandboxResponse, Status> {
        Ok(self
            .rt
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await?
            .into_inner())
    }

    pub async fn list_containers(&mut self) -> Result<ListContainersResponse, Status> {
        Ok(self
            .rt
            .list_containers(ListContainersRequest { filter: None })
            .await?
            .into_inner())
    }

    pub async fn image_fs_info(&mut self) -> Result<ImageFsInfoResponse, Status> {
        Ok(self
            .img
            .image_fs_info(ImageFsInfoRequest {})
            .await?
            .into_inner())
    }

    pub async fn container_status(
        &mut self,
        container: &str,
    ) -> Result<ContainerStatusResponse, Status> {
        Ok(self
            .rt
            .container_status(ContainerStatusRequest {
                container_id: container.to_string(),
                verbose: false,
            })
            .await?
            .into_inner())
    }

    /// Opens `GetContainerEvents`; the stream (or the status the call was refused with).
    pub async fn container_events(
        &mut self,
    ) -> Result<tonic::Streaming<ContainerEventResponse>, Status> {
        Ok(self
            .rt
            .get_container_events(GetEventsRequest {})
            .await?
            .into_inner())
    }

    /// Starts a created container and waits (up to `timeout`) for it to exit; returns its exit code.
    pub async fn start_and_wait(
        &mut self,
        container: &str,
        timeout: Duration,
    ) -> Result<i32, Status> {
        self.rt
            .start_container(StartContainerRequest {
                container_id: container.to_string(),
            })
            .await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self
                .rt
                .container_status(ContainerStatusRequest {
                    container_id: container.to_string(),
                    verbose: false,
                })
                .await?
                .into_inner()
                .status
                .ok_or_else(|| Status::internal("ContainerStatus returned no status"))?;
            if status.state == ContainerState::ContainerExited as i32 {
                return Ok(status.exit_code);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Status::deadline_exceeded(format!(
                    "container {container} still running after {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn remove_container(&mut self, container: &str) -> Result<(), Status> {
        self.rt
            .remove_container(RemoveContainerRequest {
                container_id: container.to_string(),
            })
            .await?;
        Ok(())
    }

    /// Stops and removes a pod sandbox (and so its containers).
    pub async fn remove_pod(&mut self, pod: &str) -> Result<(), Status> {
        self.rt
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.to_string(),
            })
            .await?;
        self.rt
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.to_string(),
            })
            .await?;
        Ok(())
    }

    /// Stops and removes every pod sandbox (best effort clean-up at the end of a test).
    pub async fn remove_all_pods(&mut self) {
        if let Ok(list) = self
            .rt
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await
        {
            for pod in list.into_inner().items {
                let _ = self.remove_pod(&pod.id).await;
            }
        }
    }

    /// Pull `image`, run a host-network pod with one container running `command`, wait for it to exit,
    /// clean up, and return the exit code.
    pub async fn run_to_exit(
        &mut self,
        name: &str,
        namespace: &str,
        image: &str,
        command: &[&str],
    ) -> Result<i32, Status> {
        self.pull(image, namespace).await?;
        let config = host_pod_config(name, namespace);
        let pod = self.run_pod(&config).await?;
        let result: Result<i32, Status> = async {
            let c = self
                .create_container(&pod, &config, "main", image, command)
                .await?;
            let code = self.start_and_wait(&c, Duration::from_secs(60)).await?;
            self.remove_container(&c).await?;
            Ok(code)
        }
        .await;
        let removed = self.remove_pod(&pod).await;
        let code = result?;
        removed?;
        Ok(code)
    }
}

pub fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

/// A pod sandbox config for a host-network pod (network = NODE, empty hostname: the pod never gets an
/// IP of its own and nobody contacts it).
pub fn host_pod_config(name: &str, namespace: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("{namespace}-{name}-{}", std::process::id()),
            namespace: namespace.to_string(),
            attempt: 0,
        }),
        hostname: String::new(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Pod as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// ListImages results in a canonical order (by id), for set-like comparisons.
pub fn sorted_images(mut images: Vec<Image>) -> Vec<Image> {
    for i in &mut images {
        i.repo_tags.sort();
        i.repo_digests.sort();
    }
    images.sort_by(|a, b| a.id.cmp(&b.id));
    images
}

/// The stack's logs are printed by `Stack`'s `Drop` when a test fails.
pub fn must<T>(what: &str, r: Result<T, Status>) -> T {
    r.unwrap_or_else(|s| panic!("{what}: {:?}: {}", s.code(), s.message()))
}

/// Asserts `r` failed with `code` and a message containing every one of `needles`; returns the message.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, Status>,
    code: Code,
    needles: &[&str],
) -> String {
    let s = match r {
        Ok(v) => panic!("{what}: expected {code:?}, but the call succeeded: {v:?}"),
        Err(s) => s,
    };
    assert_eq!(
        s.code(),
        code,
        "{what}: wrong status code (message: {})",
        s.message()
    );
    for n in needles {
        assert!(
            s.message().contains(n),
            "{what}: message lacks {n:?}: {}",
            s.message()
        );
    }
    s.message().to_string()
}

/// Runs a host-network pod in `ns` with one container created as kubelet does (image ID from
/// ImageStatus, the pod spec's name as `user_specified_image`), waits for it to exit, cleans up;
/// returns the container's exit code.
pub async fn run_as_kubelet(
    cri: &mut Cri,
    pod_name: &str,
    ns: &str,
    user_image: &str,
    command: &[&str],
) -> Result<i32, Status> {
    let status = cri.image_status(user_image).await?;
    let id = status
        .image
        .ok_or_else(|| Status::not_found(format!("ImageStatus({user_image}) found nothing")))?
        .id;
    let cfg = host_pod_config(pod_name, ns);
    let pod = cri.run_pod(&cfg).await?;
    let result = async {
        let c = cri
            .create_container_as_kubelet(&pod, &cfg, "main", &id, user_image, command)
            .await?;
        cri.start_and_wait(&c, Duration::from_secs(60)).await
    }
    .await;
    let _ = cri.remove_pod(&pod).await;
    result
}
