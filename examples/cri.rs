//! `cri`: a tiny CRI command-line client, for the demo and for poking at a running pullgate or containerd.
//!
//! It speaks CRI v1 over a unix socket, like kubelet does. Build with `cargo build --examples`, then e.g.:
//!
//! ```text
//! cri --socket /run/pullgate/pullgate.sock version
//! cri --socket /run/pullgate/pullgate.sock pull docker.io/library/busybox:1 --namespace team-a
//! cri --socket /run/pullgate/pullgate.sock images
//! cri --socket /run/pullgate/pullgate.sock image-status docker.io/library/busybox:1
//! cri --socket /run/pullgate/pullgate.sock run docker.io/library/busybox:1 -- /bin/echo hello
//! ```
//!
//! Exit status: 0 on success, 1 when the CRI call failed (the gRPC status code and message are printed on
//! stderr, e.g. `cri: PullImage: PERMISSION_DENIED: image … denied: …`), 2 on usage errors; `run` exits
//! with the container's exit code when the container ran.
//!
//! `run` does what kubelet does for a pod: PullImage (with the pod's sandbox config), ImageStatus to
//! learn the image ID, RunPodSandbox (host network, no hostname), CreateContainer with the image ID and
//! the name from the pod spec (`user_specified_image`), StartContainer, then ContainerStatus until it
//! exits; it removes the pod afterwards unless `--keep`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, CreateContainerRequest, ImageSpec,
    ImageStatusRequest, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, ListImagesRequest,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PullImageRequest,
    RemoveImageRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StatusRequest, StopPodSandboxRequest, VersionRequest,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// A tiny CRI client (CRI v1 over a unix socket).
#[derive(Debug, Parser)]
#[command(name = "cri")]
struct Cli {
    /// The CRI socket: pullgate's listen socket, or containerd's socket to bypass pullgate.
    #[arg(
        long,
        short = 's',
        env = "CRI_SOCKET",
        default_value = "/run/pullgate/pullgate.sock"
    )]
    socket: PathBuf,
    /// Deadline for each call, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// RuntimeService/Version.
    Version,
    /// RuntimeService/Status (runtime and network conditions).
    Status,
    /// ImageService/ListImages: one line per image (id, tags, digests).
    Images,
    /// ImageService/ImageStatus for REF; exit status 3 when the image is not present.
    ImageStatus { image: String },
    /// ImageService/PullImage of REF, on behalf of a pod in NAMESPACE.
    Pull {
        image: String,
        /// Kubernetes namespace of the (pretend) pod the pull is for.
        #[arg(long, default_value = "default")]
        namespace: String,
    },
    /// ImageService/RemoveImage of REF.
    RemoveImage { image: String },
    /// Pull IMAGE, run CMD in a host-network pod, wait for it, print its exit code, and clean up.
    Run {
        image: String,
        /// Kubernetes namespace of the pod.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Pod name.
        #[arg(long, default_value = "cri-example-run")]
        name: String,
        /// Leave the pod (and its exited container) in place instead of removing it.
        #[arg(long)]
        keep: bool,
        /// Command and arguments (after `--`); default: the image's entrypoint.
        #[arg(last = true)]
        command: Vec<String>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => eprintln!("cri: {}: {}", code_name(s.code()), s.message()),
                None => eprintln!("cri: {e:#}"),
            }
            ExitCode::from(1)
        }
    }
}

/// The canonical gRPC name of a status code (`PERMISSION_DENIED`).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

async fn connect(socket: &Path, timeout: Duration) -> anyhow::Result<Channel> {
    let path = socket.to_path_buf();
    // The URI is a placeholder: the connector below always dials the unix socket.
    let channel = Endpoint::try_from("http://[::]:50051")?
        .timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", socket.display()))?;
    Ok(channel)
}

fn pod_config(name: &str, namespace: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("cri-example-{name}-{}", std::process::id()),
            namespace: namespace.to_string(),
            attempt: 0,
        }),
        log_directory: String::new(),
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

fn image_spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let timeout = Duration::from_secs(cli.timeout);
    let channel = connect(&cli.socket, timeout).await?;
    let mut rt = RuntimeServiceClient::new(channel.clone());
    let mut img = ImageServiceClient::new(channel);
    match cli.command {
        Cmd::Version => {
            let v = rt
                .version(VersionRequest {
                    version: "v1".into(),
                })
                .await?
                .into_inner();
            println!(
                "runtime: {} {} (CRI {}, api {})",
                v.runtime_name, v.runtime_version, v.runtime_api_version, v.version
            );
        }
        Cmd::Status => {
            let s = rt
                .status(StatusRequest { verbose: false })
                .await?
                .into_inner();
            for c in s.status.map(|s| s.conditions).unwrap_or_default() {
                println!("{}={} {} {}", c.r#type, c.status, c.reason, c.message);
            }
        }
        Cmd::Images => {
            let list = img
                .list_images(ListImagesRequest { filter: None })
                .await?
                .into_inner();
            for i in list.images {
                println!(
                    "{}  tags=[{}]  digests=[{}]  size={}",
                    short_id(&i.id),
                    i.repo_tags.join(","),
                    i.repo_digests.join(","),
                    i.size
                );
            }
        }
        Cmd::ImageStatus { image } => {
            let s = img
                .image_status(ImageStatusRequest {
                    image: image_spec(&image),
                    verbose: false,
                })
                .await?
                .into_inner();
            match s.image {
                Some(i) => println!(
                    "present: id={} tags=[{}] digests=[{}]",
                    i.id,
                    i.repo_tags.join(","),
                    i.repo_digests.join(",")
                ),
                None => {
                    println!("absent: {image}");
                    return Ok(ExitCode::from(3));
                }
            }
        }
        Cmd::Pull { image, namespace } => {
            let r = img
                .pull_image(PullImageRequest {
                    image: image_spec(&image),
                    auth: None,
                    sandbox_config: Some(pod_config("cri-example-pull", &namespace)),
                })
                .await
                .map_err(|s| call_error("PullImage", s))?
                .into_inner();
            println!("pulled {image} -> {}", r.image_ref);
        }
        Cmd::RemoveImage { image } => {
            img.remove_image(RemoveImageRequest {
                image: image_spec(&image),
            })
            .await?;
            println!("removed {image}");
        }
        Cmd::Run {
            image,
            namespace,
            name,
            keep,
            command,
        } => {
            let code =
                run_once(&mut rt, &mut img, &image, &namespace, &name, keep, command).await?;
            println!("exit code: {code}");
            return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

async fn run_once(
    rt: &mut RuntimeServiceClient<Channel>,
    img: &mut ImageServiceClient<Channel>,
    image: &str,
    namespace: &str,
    name: &str,
    keep: bool,
    command: Vec<String>,
) -> anyhow::Result<i32> {
    let config = pod_config(name, namespace);
    let pulled = img
        .pull_image(PullImageRequest {
            image: image_spec(image),
            auth: None,
            sandbox_config: Some(config.clone()),
        })
        .await
        .map_err(|s| call_error("PullImage", s))?
        .into_inner();
    println!("PullImage {image} -> {}", pulled.image_ref);
    // kubelet looks the image up by the name in the pod spec and creates the container from its ID.
    let found = img
        .image_status(ImageStatusRequest {
            image: image_spec(image),
            verbose: false,
        })
        .await
        .map_err(|s| call_error("ImageStatus", s))?
        .into_inner()
        .image
        .ok_or_else(|| anyhow::anyhow!("ImageStatus({image}) found nothing after the pull"))?;
    println!(
        "ImageStatus {image} -> {} [{}]",
        short_id(&found.id),
        found.repo_digests.join(",")
    );
    let pod = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .map_err(|s| call_error("RunPodSandbox", s))?
        .into_inner()
        .pod_sandbox_id;
    println!(
        "RunPodSandbox {namespace}/{name} (host network) -> {}",
        short_id(&pod)
    );
    let result = run_in_pod(rt, &pod, &config, &found.id, image, command).await;
    if !keep {
        // Best-effort clean-up, whatever happened inside.
        let _ = rt
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await;
        let _ = rt
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod,
            })
            .await;
    }
    result
}

/// Keeps the status (for `main`'s message) and says which call it came from.
fn call_error(call: &'static str, s: tonic::Status) -> anyhow::Error {
    let msg = format!("{call}: {}", s.message());
    anyhow::Error::new(tonic::Status::new(s.code(), msg))
}

async fn run_in_pod(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    config: &PodSandboxConfig,
    image_id: &str,
    user_image: &str,
    command: Vec<String>,
) -> anyhow::Result<i32> {
    let created = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.to_string(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "main".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: image_id.to_string(),
                    user_specified_image: user_image.to_string(),
                    ..Default::default()
                }),
                command,
                labels: HashMap::new(),
                ..Default::default()
            }),
            sandbox_config: Some(config.clone()),
        })
        .await
        .map_err(|s| call_error("CreateContainer", s))?
        .into_inner()
        .container_id;
    println!("CreateContainer main -> {}", short_id(&created));
    rt.start_container(StartContainerRequest {
        container_id: created.clone(),
    })
    .await
    .map_err(|s| call_error("StartContainer", s))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let code = loop {
        let status = rt
            .container_status(k8s_cri::v1::ContainerStatusRequest {
                container_id: created.clone(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .ok_or_else(|| anyhow::anyhow!("ContainerStatus returned no status"))?;
        if status.state == ContainerState::ContainerExited as i32 {
            break status.exit_code;
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("container did not exit within 60s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Ok(code)
}
