//! The sync's state as `pullgate status`, `/status`, `/readyz` and the admin API show it.

use std::time::Duration;

use time::OffsetDateTime;

use super::{SyncSettings, Synced};
use crate::policy::bundle::rfc3339;

/// A bundle waiting for this node's rollout wave: downloaded and verified (its signed schedule
/// says wait), or not downloaded yet (its manifest's unsigned hint says wait; `version`, `issuer`
/// and the wave are then as the manifest claims them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingView {
    pub downloaded: bool,
    pub version: u64,
    pub digest: String,
    pub issuer: String,
    pub wave_opens_at: OffsetDateTime,
    /// This node's position (0..=99) in the issuer's rollouts.
    pub position: u8,
    /// The rollout step (index) this node belongs to and its share of nodes.
    pub step: Option<(usize, u8)>,
}

/// A digest the node rejected and does not download again until `retry_after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedView {
    pub digest: String,
    pub reason: &'static str,
    pub message: String,
    pub retry_after: OffsetDateTime,
}

/// A snapshot of the sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStatus {
    pub source: String,
    pub interval: Duration,
    pub max_staleness: Duration,
    pub started_at: OffsetDateTime,
    pub last_round_at: Option<OffsetDateTime>,
    /// `unchanged`, `installed`, `pending`, `rejected`, `failed`, or `none` before the first round.
    pub last_result: &'static str,
    pub last_success_at: Option<OffsetDateTime>,
    /// Reason code and message of the last round that did not succeed (cleared by a success).
    pub last_error: Option<(&'static str, String)>,
    pub consecutive_failures: u32,
    /// Waiting longer than the interval because the registry failed.
    pub backing_off: bool,
    pub next_round_at: Option<OffsetDateTime>,
    /// What the channel's tag pointed at in the last round that reached the registry.
    pub channel_digest: Option<String>,
    /// The artifact last in sync with the installed bundle.
    pub synced_digest: Option<String>,
    pub synced_version: Option<u64>,
    pub pending: Option<PendingView>,
    pub rejected: Vec<RejectedView>,
}

impl SyncStatus {
    pub(super) fn new(
        settings: &SyncSettings,
        now: OffsetDateTime,
        synced: Option<&Synced>,
    ) -> SyncStatus {
        SyncStatus {
            source: settings.source.to_string(),
            interval: settings.interval,
            max_staleness: settings.max_staleness,
            started_at: now,
            last_round_at: None,
            last_result: "none",
            last_success_at: None,
            last_error: None,
            consecutive_failures: 0,
            backing_off: false,
            next_round_at: None,
            channel_digest: None,
            synced_digest: synced.map(|s| s.digest.clone()),
            synced_version: synced.and_then(|s| s.version),
            pending: None,
            rejected: Vec::new(),
        }
    }

    /// Whether no round has succeeded for `max_staleness` at `now` (counting from the start when
    /// none has yet).
    pub fn stale_at(&self, now: OffsetDateTime, max_staleness: Duration) -> bool {
        let since = self.last_success_at.unwrap_or(self.started_at);
        time::Duration::try_from(max_staleness).is_ok_and(|max| now - since > max)
    }

    /// Whether the sync is stale now (by its own staleness limit).
    pub fn stale(&self, now: OffsetDateTime) -> bool {
        self.stale_at(now, self.max_staleness)
    }

    /// One word for people: `ok`, `waiting_for_wave`, `backing_off`, `rejecting`, `starting`,
    /// or `stale`.
    pub fn state(&self, now: OffsetDateTime) -> &'static str {
        if self.stale(now) {
            "stale"
        } else if self.last_round_at.is_none() {
            "starting"
        } else if self.backing_off {
            "backing_off"
        } else if self.last_result == "rejected" {
            "rejecting"
        } else if self.pending.is_some() {
            "waiting_for_wave"
        } else {
            "ok"
        }
    }

    /// The `/readyz` reason when stale.
    pub fn stale_reason(&self, now: OffsetDateTime) -> Option<String> {
        if !self.stale(now) {
            return None;
        }
        Some(format!(
            "bundle sync from {} is stale: no round has succeeded since {} (sync.max_staleness {}){}",
            self.source,
            rfc3339(self.last_success_at.unwrap_or(self.started_at)),
            humantime::format_duration(self.max_staleness),
            self.last_error
                .as_ref()
                .map(|(r, m)| format!("; last error ({r}): {m}"))
                .unwrap_or_default()
        ))
    }

    /// The JSON object under `sync` in `/status`. `position` is this node's place (0..=99) in the
    /// rollouts of the bundle in force's issuer, if known.
    pub fn to_json(&self, now: OffsetDateTime, position: Option<u8>) -> serde_json::Value {
        let t = |x: Option<OffsetDateTime>| x.map(rfc3339);
        serde_json::json!({
            "source": self.source,
            "state": self.state(now),
            "stale": self.stale(now),
            "interval_seconds": self.interval.as_secs_f64(),
            "max_staleness_seconds": self.max_staleness.as_secs(),
            "started_at": rfc3339(self.started_at),
            "last_round_at": t(self.last_round_at),
            "last_result": self.last_result,
            "last_success_at": t(self.last_success_at),
            "last_error": self.last_error.as_ref().map(|(r, m)| serde_json::json!({"reason": r, "message": m})),
            "consecutive_failures": self.consecutive_failures,
            "next_round_at": t(self.next_round_at),
            "channel_digest": self.channel_digest,
            "synced": self.synced_digest.as_ref().map(|d| serde_json::json!({"digest": d, "version": self.synced_version})),
            "position": position,
            "pending": self.pending.as_ref().map(|p| serde_json::json!({
                "version": p.version,
                "downloaded": p.downloaded,
                "digest": p.digest,
                "issuer": p.issuer,
                "wave_opens_at": rfc3339(p.wave_opens_at),
                "position": p.position,
                "wave_step": p.step.map(|(i, _)| i + 1),
                "wave_percent": p.step.map(|(_, pct)| pct),
            })),
            "rejected": self.rejected.iter().map(|r| serde_json::json!({
                "digest": r.digest,
                "reason": r.reason,
                "message": r.message,
                "retry_after": rfc3339(r.retry_after),
            })).collect::<Vec<_>>(),
        })
    }
}
