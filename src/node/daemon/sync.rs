//! The registry sync in the daemon: the node as the sync's [`SyncTarget`] (its bundle store, trust,
//! policy state and audit log), and the task that runs the rounds.

use std::path::Path;
use std::sync::Arc;

use time::OffsetDateTime;

use super::node::Node;
use crate::node::enforce::store::StoreError;
use crate::node::sync::{self, SetupError, SyncSettings, SyncTarget, Syncer, SystemClock};
use crate::policy::{Digest, VerifiedBundle};
use crate::registry::Fetcher;

impl SyncTarget for Node {
    fn verify(
        &self,
        bundle: &[u8],
        signatures: &[u8],
        now: OffsetDateTime,
        origin: &str,
    ) -> Result<VerifiedBundle, StoreError> {
        let t = self.trust_to_verify()?;
        self.store
            .verify_new(bundle, signatures, &t, now, Path::new(origin))
    }

    fn install(
        &self,
        bundle: &[u8],
        signatures: &[u8],
        now: OffsetDateTime,
        origin: &str,
    ) -> Result<Arc<VerifiedBundle>, StoreError> {
        self.install_bytes(bundle, signatures, now, origin)
    }

    fn installed_digest(&self) -> Option<Digest> {
        sync::installed_digest(&self.store)
    }

    fn state_dir(&self) -> &Path {
        self.store.dir()
    }

    fn rejected(&self, origin: &str, error: &StoreError) {
        self.reject_bundle(origin, error);
    }
}

/// Starts the registry sync of `[sync]`, if configured. A seed or auth file that cannot be read is
/// an error: a node told to sync must not run silently without it.
pub fn start(node: &Arc<Node>) -> Result<(), SetupError> {
    let Some(config) = &node.config.sync else {
        return Ok(());
    };
    let (settings, options) = SyncSettings::from_config(config)?;
    let fetcher =
        Fetcher::new(options, node.metrics.sync.requests.clone()).map_err(SetupError::Client)?;
    tracing::info!(
        source = %settings.source,
        interval = %humantime::format_duration(settings.interval),
        position_hint = "pullgate status shows this node's rollout position",
        "bundle sync from the registry"
    );
    let target: Arc<dyn SyncTarget> = node.clone();
    let syncer = Syncer::new(
        settings,
        fetcher,
        target,
        Arc::new(SystemClock),
        node.metrics.sync.clone(),
    );
    let _ = node.sync.set(syncer.handle());
    tokio::spawn(syncer.run(std::future::pending()));
    Ok(())
}
