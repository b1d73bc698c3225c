//! The containerd event watcher: nothing enters containerd's image store past pullgate unseen.
//!
//! It subscribes to containerd's event stream (`Events.Subscribe`, every namespace) and, for every
//! image that is created or re-pointed, decides a class:
//!
//! - `unapproved`: its target digest (the manifest or index containerd resolves the image to —
//!   content-addressed, unlike its name) is not approved by the bundle in force for any scope (no
//!   pod is attached to an image in the store; the start decides which pod may run it), or
//!   containerd's content store does not even hold it;
//! - `out_of_band`: approved content that did not come through a pull pullgate forwarded (the
//!   enforcer notes every forwarded pull in the [`PullLedger`]): `ctr pull`, `ctr import`,
//!   `nerdctl`, a CRI client talking to containerd's own socket, another namespace;
//! - `approved`: approved content pulled through pullgate (or containerd's own pull of its
//!   configured sandbox image). A pull explains the content it brought, not its name (see
//!   [`PullLedger::explain`]).
//!
//! A name re-pointed at other content is classified again; content whose last name is deleted is
//! forgotten, so it is a new arrival, reported again, if it comes back.
//!
//! Approved content CRI's plugin takes in after the start-up scan (its image-ID name appears in CRI's
//! namespace) is handed to the enforcer through [`Watch::learn`], to be proven from content before
//! its first start; what was there at start the enforcer proves itself.
//!
//! An image that is not approved and was not a pull pullgate forwarded in warn mode (already
//! audited as a `warn` decision) gets an `out_of_band_image` audit record, a count in
//! `pullgate_out_of_band_total{kind="image"}` and a warning in the log as soon as its event
//! arrives; with `lockdown.remove_out_of_band` (enforce mode only) it is removed from CRI's
//! namespace unless a container uses it. A snapshot committed outside an unpack is reported the
//! same way (`out_of_band_snapshot`). `pullgate_node_images{class}` counts distinct images
//! (namespace, target digest) by their worst class.
//!
//! At start every image present is classified (`detected: startup`; pullgate's own past pulls are
//! unknown then, so an approved image counts as pulled through pullgate when it is in CRI's
//! namespace under the private registry's name). When the stream breaks (containerd restarts)
//! the watcher reconnects with a backoff, reports the gap (log, `pullgate_lockdown_event_gaps_total`,
//! an `event_gap` audit record) and re-reads every image, so what arrived in the gap is classified
//! too (`detected: resync`).
//!
//! It talks to containerd's native API over a tonic channel of its own (containerd-client), not the
//! proxy's upstream connection: the subscription is a long-lived stream that must be re-established
//! on its own schedule, calls need arbitrary namespaces, and its failures must not count against the
//! connection kubelet's calls use.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_client::services::v1 as api;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{self, Code, Request};
use prost::Message;
use time::OffsetDateTime;

use crate::node::audit::{AuditLog, LockdownRecord};
use crate::node::config::NodeMode;
use crate::node::enforce::PolicyState;
use crate::node::enforce::ledger::{PullLedger, is_id_alias};
use crate::node::enforce::lookup::CRI_NAMESPACE;
use crate::node::metrics::Metrics;
use crate::policy::{self, Digest, ImageRequest, Reference, VerifiedBundle};

/// Topic of the marker event the watcher publishes to prove its subscription is live.
const MARKER_TOPIC: &str = "/pullgate/watch";
/// Namespace the marker is published in (containerd requires one; nothing is stored).
const MARKER_NAMESPACE: &str = "pullgate";
/// The label containerd's unpacker puts on every snapshot it commits (value: the snapshot's name,
/// the layer chain ID).
const SNAPSHOT_REF_LABEL: &str = "containerd.io/snapshot.ref";
/// Most recent findings kept for `/status`.
const RECENT: usize = 20;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The class of an image in containerd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Approved = 0,
    OutOfBand = 1,
    Unapproved = 2,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        crate::node::metrics::IMAGE_CLASSES[self as usize]
    }
}

/// How an image came to be classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detected {
    Event,
    Startup,
    Resync,
}

impl Detected {
    fn as_str(self) -> &'static str {
        match self {
            Detected::Event => "event",
            Detected::Startup => "startup",
            Detected::Resync => "resync",
        }
    }
}

/// What `/status` shows of the watcher.
#[derive(Debug, Default)]
pub struct WatchStatus {
    inner: Mutex<StatusInner>,
}

#[derive(Debug, Default)]
struct StatusInner {
    running: bool,
    connected: bool,
    classified: bool,
    images: [u64; 3],
    gaps: u64,
    last_gap: Option<(String, String)>,
    recent: VecDeque<LockdownRecord>,
}

impl WatchStatus {
    fn update(&self, f: impl FnOnce(&mut StatusInner)) {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The watcher's state as JSON (`null` when it does not run).
    pub fn json(&self) -> serde_json::Value {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !s.running {
            return serde_json::Value::Null;
        }
        serde_json::json!({
            "connected": s.connected,
            "images": if s.classified {
                serde_json::json!({
                    "approved": s.images[0],
                    "out_of_band": s.images[1],
                    "unapproved": s.images[2],
                })
            } else {
                serde_json::Value::Null
            },
            "event_gaps": s.gaps,
            "last_gap": s.last_gap.as_ref().map(|(from, to)| serde_json::json!({"from": from, "to": to})),
            "recent": s.recent.iter().collect::<Vec<_>>(),
        })
    }
}

/// One image name the watcher knows.
#[derive(Debug, Clone)]
struct Known {
    target: String,
    class: Class,
    /// CRI's image-ID alias (`sha256:<config digest>`): it says nothing about how the image came.
    alias: bool,
}

/// What the watcher works with.
pub struct Watch {
    /// containerd's socket.
    pub socket: PathBuf,
    pub state: Arc<PolicyState>,
    /// The pulls the enforcer forwarded.
    pub pulls: Arc<PullLedger>,
    pub metrics: Arc<Metrics>,
    pub audit: Option<Arc<AuditLog>>,
    /// `lockdown.remove_out_of_band`.
    pub remove: bool,
    pub status: Arc<WatchStatus>,
    /// Where the IDs of approved images that arrive in CRI's namespace go, to be proven from content
    /// before their first container start (full or absent: left to the start).
    pub learn: Option<tokio::sync::mpsc::Sender<String>>,
}

/// The watcher: construct with [`Watcher::new`], then [`Watcher::run`] it as a task.
pub struct Watcher {
    w: Watch,
    known: HashMap<(String, String), Known>,
    /// (namespace, target) already reported, so one `ctr pull` (a name, CRI's ID alias, a label
    /// update) is one record.
    reported: HashSet<(String, String)>,
    /// (namespace, target) removed: CRI may still add its ID alias afterwards.
    removed: HashSet<(String, String)>,
    approved_digests: Option<(u64, Arc<HashSet<Digest>>)>,
    sandbox_image: Option<String>,
}

/// containerd's native API over one channel.
struct Api {
    ch: Channel,
}

fn req<T>(namespace: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    if let Ok(v) = namespace.parse() {
        r.metadata_mut().insert("containerd-namespace", v);
    }
    r
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Whether a committed snapshot looks like an unpack: containerd 1.6's unpacker (CRI's and ctr's
/// alike) commits a layer under its chain ID (`sha256:<64 hex>`) from an active snapshot keyed
/// `extract-<unique> <chain ID>`. CRI's pulls also label it `containerd.io/snapshot.ref`, ctr's do
/// not, so the label is not required. Both marks can be forged through containerd's API: this tells
/// a hand-made commit (`ctr snapshots commit`) from an unpack, not a deliberate forgery.
pub fn looks_unpacked(key: &str, name: &str) -> bool {
    is_id_alias(name)
        && key.starts_with("extract-")
        && key.strip_suffix(name).is_some_and(|k| k.ends_with(' '))
}

impl Api {
    async fn namespaces(&self) -> Result<Vec<String>, tonic::Status> {
        let mut c = api::namespaces_client::NamespacesClient::new(self.ch.clone());
        let r = c
            .list(api::ListNamespacesRequest::default())
            .await?
            .into_inner();
        Ok(r.namespaces.into_iter().map(|n| n.name).collect())
    }

    async fn images(&self, ns: &str) -> Result<Vec<api::Image>, tonic::Status> {
        let mut c = api::images_client::ImagesClient::new(self.ch.clone());
        Ok(c.list(req(ns, api::ListImagesRequest::default()))
            .await?
            .into_inner()
            .images)
    }

    async fn image(&self, ns: &str, name: &str) -> Result<Option<api::Image>, tonic::Status> {
        let mut c = api::images_client::ImagesClient::new(self.ch.clone());
        match c
            .get(req(
                ns,
                api::GetImageRequest {
                    name: name.to_string(),
                },
            ))
            .await
        {
            Ok(r) => Ok(r.into_inner().image),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }

    async fn has_content(&self, ns: &str, digest: &str) -> Result<bool, tonic::Status> {
        let mut c = api::content_client::ContentClient::new(self.ch.clone());
        match c
            .info(req(
                ns,
                api::InfoRequest {
                    digest: digest.to_string(),
                },
            ))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(s),
        }
    }

    /// The image names the namespace's containers were created from.
    async fn container_images(&self, ns: &str) -> Result<Vec<String>, tonic::Status> {
        let mut c = api::containers_client::ContainersClient::new(self.ch.clone());
        Ok(c.list(req(ns, api::ListContainersRequest::default()))
            .await?
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.image)
            .collect())
    }

    async fn delete_image(&self, ns: &str, name: &str) -> Result<(), tonic::Status> {
        let mut c = api::images_client::ImagesClient::new(self.ch.clone());
        match c
            .delete(req(
                ns,
                api::DeleteImageRequest {
                    name: name.to_string(),
                    sync: false,
                    target: None,
                },
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(s),
        }
    }

    /// The committed snapshot `name`'s labels, from whichever snapshotter holds it.
    async fn snapshot_labels(
        &self,
        ns: &str,
        snapshotter: &str,
        name: &str,
    ) -> Result<Option<(String, HashMap<String, String>)>, tonic::Status> {
        let candidates = if snapshotter.is_empty() {
            self.snapshotters().await?
        } else {
            vec![snapshotter.to_string()]
        };
        let mut c = SnapshotsClient::new(self.ch.clone());
        for s in candidates {
            let stat = c
                .stat(req(
                    ns,
                    api::snapshots::StatSnapshotRequest {
                        snapshotter: s.clone(),
                        key: name.to_string(),
                    },
                ))
                .await;
            match stat {
                Ok(r) => {
                    if let Some(info) = r.into_inner().info {
                        return Ok(Some((s, info.labels)));
                    }
                }
                Err(e) if matches!(e.code(), Code::NotFound | Code::InvalidArgument) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// The snapshotters that loaded.
    async fn snapshotters(&self) -> Result<Vec<String>, tonic::Status> {
        let mut c = api::introspection_client::IntrospectionClient::new(self.ch.clone());
        let r = c
            .plugins(api::PluginsRequest {
                filters: vec!["type==io.containerd.snapshotter.v1".into()],
            })
            .await?
            .into_inner();
        Ok(r.plugins
            .into_iter()
            .filter(|p| p.init_err.is_none())
            .map(|p| p.id)
            .collect())
    }

    /// containerd's configured sandbox image (CRI `Status`), which containerd pulls itself.
    async fn sandbox_image(&self) -> Option<String> {
        let mut c = k8s_cri::v1::runtime_service_client::RuntimeServiceClient::new(self.ch.clone());
        let r = c
            .status(k8s_cri::v1::StatusRequest { verbose: true })
            .await
            .ok()?
            .into_inner();
        let v: serde_json::Value = serde_json::from_str(r.info.get("config")?).ok()?;
        v.get("sandboxImage")?.as_str().map(str::to_string)
    }

    async fn publish_marker(&self) -> Result<(), tonic::Status> {
        let mut c = api::events_client::EventsClient::new(self.ch.clone());
        let mut marker = api::PublishRequest {
            topic: MARKER_TOPIC.into(),
            event: Some(Default::default()),
        };
        if let Some(any) = marker.event.as_mut() {
            any.type_url = "type.googleapis.com/google.protobuf.Empty".into();
        }
        c.publish(req(MARKER_NAMESPACE, marker)).await.map(|_| ())
    }
}

/// Why a subscription ended.
enum Ended {
    /// Never got going (containerd not there, subscription refused).
    NotConnected(String),
    /// Was live, then broke.
    Lost(String),
}

impl Watcher {
    pub fn new(w: Watch) -> Watcher {
        Watcher {
            w,
            known: HashMap::new(),
            reported: HashSet::new(),
            removed: HashSet::new(),
            approved_digests: None,
            sandbox_image: None,
        }
    }

    /// Watches until the task is dropped: subscribes, classifies, follows events; reconnects and
    /// reports the gap when the stream breaks.
    pub async fn run(mut self) {
        self.w.status.update(|s| s.running = true);
        self.w.metrics.set_watcher_up(false);
        let mut gap_from: Option<String> = None;
        let mut classified = false;
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.session(&mut classified, &mut gap_from).await {
                Ended::NotConnected(why) => {
                    tracing::debug!(socket = %self.w.socket.display(), error = %why, "cannot subscribe to containerd's events yet");
                }
                Ended::Lost(why) => {
                    backoff = Duration::from_millis(200);
                    gap_from = Some(now_rfc3339());
                    self.w.metrics.set_watcher_up(false);
                    self.w.status.update(|s| s.connected = false);
                    tracing::warn!(socket = %self.w.socket.display(), error = %why, "lost containerd's event stream; reconnecting (images that arrive meanwhile are classified once it is back)");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One subscription: connect, subscribe, prove it live, (re)classify, then follow events.
    async fn session(&mut self, classified: &mut bool, gap_from: &mut Option<String>) -> Ended {
        let ch = match containerd_client::connect(&self.w.socket).await {
            Ok(c) => c,
            Err(e) => return Ended::NotConnected(e.to_string()),
        };
        let api = Api { ch };
        let mut events = api::events_client::EventsClient::new(api.ch.clone());
        let filters = vec![
            "topic~=\"^/images/\"".to_string(),
            "topic~=\"^/snapshot/\"".to_string(),
            format!("topic==\"{MARKER_TOPIC}\""),
        ];
        // containerd sends the stream's headers with its first event, so the call only returns
        // once an event arrives: publish a marker until it does, which also proves the
        // subscription is registered before anything is listed.
        let subscribe = events.subscribe(api::SubscribeRequest { filters });
        tokio::pin!(subscribe);
        let mut stream = None;
        for _ in 0..50 {
            tokio::select! {
                r = &mut subscribe => {
                    match r {
                        Ok(s) => stream = Some(s.into_inner()),
                        Err(e) => return Ended::NotConnected(e.to_string()),
                    }
                    break;
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if let Err(e) = api.publish_marker().await {
                        return Ended::NotConnected(format!("publishing the marker event failed: {e}"));
                    }
                }
            }
        }
        let Some(mut stream) = stream else {
            return Ended::NotConnected("containerd never answered the subscription".into());
        };
        self.w.metrics.set_watcher_up(true);
        self.w.status.update(|s| s.connected = true);
        self.sandbox_image = api.sandbox_image().await;
        let detected = if *classified {
            Detected::Resync
        } else {
            Detected::Startup
        };
        if let Some(from) = gap_from.take() {
            self.report_gap(from);
        }
        if let Err(e) = self.classify_all(&api, detected).await {
            return Ended::Lost(format!("listing images failed: {e}"));
        }
        *classified = true;
        tracing::info!(socket = %self.w.socket.display(), "watching containerd's events for images that arrive past pullgate");
        loop {
            match stream.message().await {
                Ok(Some(env)) => {
                    if let Err(e) = self.event(&api, env).await {
                        tracing::warn!(error = %e, "cannot look an event's subject up in containerd");
                    }
                }
                Ok(None) => return Ended::Lost("containerd closed the event stream".into()),
                Err(e) => return Ended::Lost(e.to_string()),
            }
        }
    }

    fn report_gap(&mut self, from: String) {
        let to = now_rfc3339();
        self.w.metrics.event_gap();
        tracing::warn!(gap_from = %from, gap_to = %to, "containerd's event stream had a gap; re-reading every image to classify what arrived meanwhile");
        self.w.status.update(|s| {
            s.gaps += 1;
            s.last_gap = Some((from.clone(), to.clone()));
        });
        self.audit(LockdownRecord {
            time: to.clone(),
            kind: "event_gap",
            message: format!(
                "containerd's event stream was lost from {from} to {to}; every image was re-read and classified after it"
            ),
            gap_from: Some(from),
            gap_to: Some(to),
            ..Default::default()
        });
    }

    fn audit(&self, rec: LockdownRecord) {
        if let Some(a) = &self.w.audit {
            if let Err(e) = a.record_lockdown(&rec) {
                self.w.metrics.audit_error();
                tracing::error!(path = %a.path().display(), error = %e, "cannot write the audit log");
            }
        }
        self.w.status.update(|s| {
            if s.recent.len() >= RECENT {
                s.recent.pop_front();
            }
            s.recent.push_back(rec);
        });
    }

    /// Lists every image of every namespace, classifies what is new or changed, forgets what went.
    async fn classify_all(&mut self, api: &Api, detected: Detected) -> Result<(), tonic::Status> {
        let mut present = HashSet::new();
        for ns in api.namespaces().await? {
            let mut images = api.images(&ns).await?;
            // CRI's ID aliases last: an alias is as approved as the other names of its content.
            images.sort_by_key(|i| is_id_alias(&i.name));
            for img in images {
                let Some(target) = img.target.as_ref().map(|t| t.digest.clone()) else {
                    continue;
                };
                present.insert((ns.clone(), img.name.clone()));
                self.image(api, &ns, &img.name, target, detected).await?;
            }
        }
        let gone: Vec<(String, String)> = self
            .known
            .keys()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        for (ns, name) in gone {
            self.forget(&ns, &name);
        }
        self.publish_counts();
        Ok(())
    }

    async fn event(
        &mut self,
        api: &Api,
        env: containerd_client::types::Envelope,
    ) -> Result<(), tonic::Status> {
        let value = env.event.map(|a| a.value).unwrap_or_default();
        let ns = env.namespace;
        match env.topic.as_str() {
            "/images/create" | "/images/update" => {
                let name = api::ImageCreate::decode(value.as_slice())
                    .map(|e| e.name)
                    .unwrap_or_default();
                match api.image(&ns, &name).await? {
                    Some(img) => {
                        if let Some(t) = img.target {
                            self.image(api, &ns, &name, t.digest, Detected::Event)
                                .await?;
                        }
                    }
                    None => {
                        self.forget(&ns, &name);
                    }
                }
                self.publish_counts();
            }
            "/images/delete" => {
                let name = api::ImageDelete::decode(value.as_slice())
                    .map(|e| e.name)
                    .unwrap_or_default();
                self.forget(&ns, &name);
                self.publish_counts();
            }
            "/snapshot/commit" => {
                if let Ok(c) = containerd_client::events::SnapshotCommit::decode(value.as_slice()) {
                    self.commit(api, &ns, c).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A snapshot commit: fine if it carries the unpacker's marks, reported otherwise.
    async fn commit(
        &mut self,
        api: &Api,
        ns: &str,
        c: containerd_client::events::SnapshotCommit,
    ) -> Result<(), tonic::Status> {
        let found = api.snapshot_labels(ns, &c.snapshotter, &c.name).await?;
        let (snapshotter, labels) =
            found.unwrap_or_else(|| (c.snapshotter.clone(), HashMap::new()));
        if looks_unpacked(&c.key, &c.name) {
            return Ok(());
        }
        self.w.metrics.out_of_band(1);
        tracing::warn!(namespace = %ns, snapshot = ?c.name, key = ?c.key, snapshotter = %snapshotter, "a snapshot was committed outside an image unpack (planted snapshot?)");
        self.audit(LockdownRecord {
            time: now_rfc3339(),
            kind: "out_of_band_snapshot",
            namespace: Some(ns.to_string()),
            name: Some(c.name.clone()),
            message: format!(
                "snapshot {:?} was committed from {:?}{}: containerd's unpacker commits a layer's chain ID (sha256:…) from a key `extract-<unique> <chain ID>`, so this was made by hand, not unpacked from an image's layers",
                c.name,
                c.key,
                match labels.get(SNAPSHOT_REF_LABEL) {
                    Some(r) => format!(" (labelled {SNAPSHOT_REF_LABEL}={r})"),
                    None => String::new(),
                }
            ),
            detected: Some(Detected::Event.as_str()),
            action: Some("reported"),
            snapshotter: Some(snapshotter).filter(|s| !s.is_empty()),
            snapshot_key: Some(c.key),
            ..Default::default()
        });
        Ok(())
    }

    /// The digests the bundle in force approves (any scope), cached per bundle version.
    fn approved_set(&mut self, b: &VerifiedBundle) -> Arc<HashSet<Digest>> {
        if let Some((v, set)) = &self.approved_digests {
            if *v == b.version {
                return set.clone();
            }
        }
        let set: HashSet<Digest> = b
            .images()
            .iter()
            .flat_map(|e| {
                e.digests()
                    .iter()
                    .cloned()
                    .chain(e.tags().iter().map(|(_, d)| d.clone()))
            })
            .collect();
        let set = Arc::new(set);
        self.approved_digests = Some((b.version, set.clone()));
        set
    }

    /// Whether `target` is approved content for image `name`; `Err` says why not.
    async fn approval(
        &mut self,
        api: &Api,
        ns: &str,
        name: &str,
        target: &str,
    ) -> Result<Result<u64, String>, tonic::Status> {
        let now = OffsetDateTime::now_utc();
        let b = match self.w.state.usable(now) {
            Ok(b) => b,
            Err(why) => return Ok(Err(format!("no usable bundle: {why}"))),
        };
        if !api.has_content(ns, target).await? {
            return Ok(Err(format!(
                "its target {target} is not in containerd's content store: the image record points at nothing that could be verified"
            )));
        }
        let by_digest = Digest::parse(target).is_ok_and(|d| self.approved_set(&b).contains(&d));
        // First-party images allowed by a prefix are approved by name in the private registry. There
        // is no pod here: approved for any scope is approved (the start decides which pod may run it).
        // CRI's ID alias names no repository: it is as approved as the other names of its content.
        let by_rule = || {
            if is_id_alias(name) {
                self.known.iter().any(|((n, _), k)| {
                    n == ns && k.target == target && !k.alias && k.class != Class::Unapproved
                })
            } else {
                Reference::parse(name).is_ok_and(|r| {
                    let rd = format!("{}/{}@{target}", r.domain(), r.path());
                    policy::decide_for_any_scope(
                        &ImageRequest::RepoDigests {
                            image: name,
                            repo_digests: std::slice::from_ref(&rd),
                        },
                        &b,
                        now,
                    )
                    .is_some()
                })
            }
        };
        // One decision per scope: only asked when the digest is not approved anyway.
        if by_digest || by_rule() {
            Ok(Ok(b.version))
        } else {
            Ok(Err(format!(
                "its digest {target} is not approved by bundle v{}",
                b.version
            )))
        }
    }

    /// Classifies one image name and reports or removes it as needed.
    async fn image(
        &mut self,
        api: &Api,
        ns: &str,
        name: &str,
        target: String,
        detected: Detected,
    ) -> Result<(), tonic::Status> {
        let key = (ns.to_string(), name.to_string());
        // Asked on every event, so a pull by tag is bound to the content it brought even when it
        // changed nothing (a re-pull of the same content).
        let forwarded = if ns == CRI_NAMESPACE {
            self.w.pulls.explain(name, &target)
        } else {
            None
        };
        let previous = match self.known.get(&key) {
            Some(k) if k.target == target => return Ok(()),
            Some(k) => Some(k.target.clone()),
            None => None,
        };
        let alias = ns == CRI_NAMESPACE && is_id_alias(name);
        let target_key = (ns.to_string(), target.clone());
        let approval = self.approval(api, ns, name, &target).await?;
        let (class, why) = match &approval {
            Err(why) => (Class::Unapproved, why.clone()),
            Ok(_) if alias || forwarded.is_some() => (Class::Approved, String::new()),
            Ok(_) if ns == CRI_NAMESPACE && self.sandbox_image.as_deref() == Some(name) => {
                (Class::Approved, String::new())
            }
            Ok(_) if detected == Detected::Startup && ns == CRI_NAMESPACE && self.in_private_registry(name) => {
                (Class::Approved, String::new())
            }
            Ok(_) if ns != CRI_NAMESPACE => (
                Class::OutOfBand,
                format!("it is in containerd namespace {ns:?}, not CRI's {CRI_NAMESPACE:?}: pullgate never pulls there"),
            ),
            Ok(_) if detected == Detected::Startup => (
                Class::OutOfBand,
                "it is not named after the private registry, where every pull through pullgate goes".into(),
            ),
            Ok(_) => (
                Class::OutOfBand,
                "no pull of it went through pullgate".into(),
            ),
        };
        self.known.insert(
            key,
            Known {
                target: target.clone(),
                class,
                alias,
            },
        );
        if let Some(previous) = previous {
            self.forget_if_unnamed(ns, &previous);
        }
        // CRI's ID alias names an image CRI knows: approved content that arrives is proven for its
        // first start now, whichever way it came (the start would prove it the same way). What was
        // there at start the enforcer proves itself.
        if alias
            && detected != Detected::Startup
            && approval.is_ok()
            && !self.removed.contains(&target_key)
        {
            if let Some(learn) = &self.w.learn {
                let _ = learn.try_send(name.to_string());
            }
        }
        // A pull pullgate forwarded in warn mode was audited as a `warn` decision already.
        let warned_pull = forwarded.as_ref().is_some_and(|p| !p.allowed);
        if class == Class::Approved || warned_pull {
            return Ok(());
        }
        let enforce = self.w.state.mode() == NodeMode::Enforce;
        let removing = self.w.remove && enforce && ns == CRI_NAMESPACE;
        if self.reported.contains(&target_key) {
            // A name of an image already reported and removed: CRI's ID alias, or the name itself
            // re-created by CRI's plugin, which read the image just before it was removed.
            if removing && self.removed.contains(&target_key) {
                if alias {
                    self.remove_rest(api, ns, &target).await;
                } else {
                    let action = self.remove(api, ns, name, &target).await;
                    tracing::info!(namespace = %ns, image = ?name, action, "an out-of-band image that was removed came back");
                }
            }
            return Ok(());
        }
        self.reported.insert(target_key.clone());
        let action = if removing {
            self.remove(api, ns, name, &target).await
        } else {
            "reported"
        };
        self.w.metrics.out_of_band(0);
        let message = format!(
            "image {name:?} (namespace {ns}, digest {target}) is {}: {why}",
            match class {
                Class::Unapproved => "not approved",
                _ => "approved content that entered containerd past pullgate",
            }
        );
        tracing::warn!(namespace = %ns, image = ?name, digest = %target, class = class.as_str(), detected = detected.as_str(), action, "{message}");
        self.audit(LockdownRecord {
            time: now_rfc3339(),
            kind: "out_of_band_image",
            namespace: Some(ns.to_string()),
            name: Some(name.to_string()),
            digests: vec![target],
            class: Some(class.as_str()),
            message,
            detected: Some(detected.as_str()),
            action: Some(action),
            bundle_version: approval
                .ok()
                .or_else(|| self.w.state.current().map(|b| b.version)),
            ..Default::default()
        });
        Ok(())
    }

    /// Forgets an image name that is gone.
    fn forget(&mut self, ns: &str, name: &str) {
        if let Some(k) = self.known.remove(&(ns.to_string(), name.to_string())) {
            self.forget_if_unnamed(ns, &k.target);
        }
    }

    /// Once no name is left for `target`, it is gone from the namespace: the next time it arrives
    /// it is a new arrival, reported again. Content the watcher removed itself stays remembered
    /// (CRI may re-create a name of it right after; it is removed again).
    fn forget_if_unnamed(&mut self, ns: &str, target: &str) {
        let key = (ns.to_string(), target.to_string());
        if !self.removed.contains(&key)
            && !self
                .known
                .iter()
                .any(|((n, _), k)| n == ns && k.target == target)
        {
            self.reported.remove(&key);
        }
    }

    fn in_private_registry(&self, name: &str) -> bool {
        let Some(b) = self.w.state.current() else {
            return false;
        };
        Reference::parse(name).is_ok_and(|r| r.domain() == b.private_registry)
    }

    /// Removes an out-of-band image from CRI's namespace unless a container uses it; returns the
    /// audit action.
    async fn remove(&mut self, api: &Api, ns: &str, name: &str, target: &str) -> &'static str {
        let in_use = match api.container_images(ns).await {
            Ok(images) => {
                let mut used = false;
                for image in images {
                    if image == name {
                        used = true;
                        break;
                    }
                    let t = match self.known.get(&(ns.to_string(), image.clone())) {
                        Some(k) => Some(k.target.clone()),
                        None => api
                            .image(ns, &image)
                            .await
                            .ok()
                            .flatten()
                            .and_then(|i| i.target.map(|t| t.digest)),
                    };
                    if t.as_deref() == Some(target) {
                        used = true;
                        break;
                    }
                }
                used
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot list containers; not removing the out-of-band image");
                self.w.metrics.out_of_band_removal("failed");
                return "remove_failed";
            }
        };
        if in_use {
            self.w.metrics.out_of_band_removal("in_use");
            return "kept_in_use";
        }
        match api.delete_image(ns, name).await {
            Ok(()) => {
                self.removed.insert((ns.to_string(), target.to_string()));
                self.forget(ns, name);
                self.remove_rest(api, ns, target).await;
                self.w.metrics.out_of_band_removal("removed");
                "removed"
            }
            Err(e) => {
                tracing::error!(image = ?name, error = %e, "cannot remove the out-of-band image");
                self.w.metrics.out_of_band_removal("failed");
                "remove_failed"
            }
        }
    }

    /// Removes CRI's ID aliases of `target` once no other name of it is left.
    async fn remove_rest(&mut self, api: &Api, ns: &str, target: &str) {
        let names: Vec<(String, bool)> = self
            .known
            .iter()
            .filter(|((n, _), k)| n == ns && k.target == target)
            .map(|((_, name), k)| (name.clone(), k.alias))
            .collect();
        if names.iter().any(|(_, alias)| !alias) {
            return;
        }
        for (name, _) in names {
            if api.delete_image(ns, &name).await.is_ok() {
                self.forget(ns, &name);
            }
        }
    }

    /// Exports the counts of distinct images (namespace, target) by their worst class.
    fn publish_counts(&self) {
        let mut by_image: HashMap<(&str, &str), Class> = HashMap::new();
        for ((ns, _), k) in &self.known {
            let e = by_image
                .entry((ns.as_str(), k.target.as_str()))
                .or_insert(k.class);
            if k.class > *e {
                *e = k.class;
            }
        }
        let mut counts = [0u64; 3];
        for class in by_image.values() {
            counts[*class as usize] += 1;
        }
        self.w.metrics.set_node_images(counts);
        self.w.status.update(|s| {
            s.classified = true;
            s.images = counts;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_marks_are_recognised() {
        let name = "sha256:ae19675339ff56e67e17791166c06a65eba138ae2485bb08f3311b995a18ada8";
        // What containerd 1.6's unpacker committed in a CRI pull and a ctr pull on this machine.
        assert!(looks_unpacked(
            &format!("extract-377459914-aPZ4 {name}"),
            name
        ));
        // `ctr snapshots prepare/commit`: any key, any name.
        assert!(!looks_unpacked("planted-active", "planted"));
        assert!(!looks_unpacked("planted-active", name));
        assert!(!looks_unpacked(&format!("extract-1-x{name}"), name));
        assert!(!looks_unpacked(
            &format!("extract-1-x {name}"),
            "sha256:other"
        ));
        assert!(!looks_unpacked("extract-1-x planted", "planted"));
    }

    #[test]
    fn status_json_counts_and_recent() {
        let s = WatchStatus::default();
        assert!(s.json().is_null(), "not running: null");
        s.update(|i| {
            i.running = true;
            i.connected = true;
            i.classified = true;
            i.images = [3, 1, 2];
        });
        let j = s.json();
        assert_eq!(j["images"]["out_of_band"], 1);
        assert_eq!(j["images"]["unapproved"], 2);
        assert_eq!(j["connected"], true);
    }
}
