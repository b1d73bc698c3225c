//! Rollout waves of a format 2 bundle: parsing and validation of `rollout`, and [`wave`], the pure
//! function the node's bundle sync uses to decide whether this node takes a bundle up yet.
//!
//! A node's position (0..=99) is the first 8 bytes of SHA-256(`pullgate-rollout-v1\0` ‖ issuer ‖ `\0`
//! ‖ seed), big-endian, modulo 100. It depends on the node's stable seed and the bundle's issuer, not on
//! the version, so the same nodes are the canaries of every bundle an issuer publishes (they can be
//! watched, and a bad bundle always meets the same small set first). The issuer keeps this placement
//! independent of other hash-based bucketing of the same seed. Its wave is the first step whose
//! `percent` exceeds the position; it opens `after` the bundle's `issued_at`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use time::OffsetDateTime;

use super::bundle::Bundle;

/// Domain separation of the position hash.
const CONTEXT: &[u8] = b"pullgate-rollout-v1\0";

/// One step as written.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStep {
    after: String,
    percent: u32,
}

/// One step: from `after` past `issued_at`, nodes at positions below `percent` take the bundle up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Delay after the bundle's `issued_at`.
    pub after: Duration,
    /// Share of nodes (1..=100) that have the bundle from then on.
    pub percent: u8,
}

/// Whether a node takes a bundle up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wave {
    /// The node's wave is open: install the bundle.
    Open,
    /// Not yet: the node's wave opens at this time.
    OpensAt(OffsetDateTime),
}

impl RawStep {
    /// `step` as written in a bundle (and in a bundle artifact's annotations).
    pub(crate) fn of(step: &Step) -> RawStep {
        RawStep {
            after: humantime::format_duration(step.after).to_string(),
            percent: u32::from(step.percent),
        }
    }
}

/// Validates `rollout`: at least one step, `after` strictly increasing, `percent` 1..=100 strictly
/// increasing, the last 100, and the last step before the bundle expires (`lifetime`).
pub(crate) fn parse(raw: Vec<RawStep>, lifetime: time::Duration) -> Result<Box<[Step]>, String> {
    if raw.is_empty() {
        return Err(
            "rollout is empty; leave it out to give the bundle to every node at once, or end it with percent 100"
                .into(),
        );
    }
    let mut steps: Vec<Step> = Vec::with_capacity(raw.len());
    for (i, s) in raw.into_iter().enumerate() {
        let after = humantime::parse_duration(s.after.trim()).map_err(|e| {
            format!(
                "rollout[{i}].after \"{}\" is not a duration ({e}); write e.g. \"0s\", \"30m\", \"6h\", \"2d\"",
                s.after.chars().take(40).collect::<String>()
            )
        })?;
        if s.percent == 0 || s.percent > 100 {
            return Err(format!(
                "rollout[{i}].percent is {}; it must be 1..=100",
                s.percent
            ));
        }
        if let Some(prev) = steps.last() {
            if after <= prev.after {
                return Err(format!(
                    "rollout[{i}].after ({}) is not after rollout[{}].after ({}); steps must be in strictly increasing time",
                    humantime::format_duration(after),
                    i - 1,
                    humantime::format_duration(prev.after)
                ));
            }
            if s.percent as u8 <= prev.percent {
                return Err(format!(
                    "rollout[{i}].percent ({}) is not above rollout[{}].percent ({}); each step must reach more nodes",
                    s.percent,
                    i - 1,
                    prev.percent
                ));
            }
        }
        steps.push(Step {
            after,
            percent: s.percent as u8,
        });
    }
    let last = steps[steps.len() - 1];
    if last.percent != 100 {
        return Err(format!(
            "the last rollout step reaches {}% of nodes; it must be 100 so every node gets the bundle",
            last.percent
        ));
    }
    if time::Duration::try_from(last.after).map_or(true, |a| a >= lifetime) {
        return Err(format!(
            "the last rollout step starts {} after issued_at, when the bundle has expired; shorten the rollout or extend expires_at",
            humantime::format_duration(last.after)
        ));
    }
    Ok(steps.into_boxed_slice())
}

/// The position (0..=99) of the node with `seed` in the rollouts of `issuer`.
pub fn position(issuer: &str, seed: &[u8]) -> u8 {
    let mut h = sha2::Sha256::new();
    h.update(CONTEXT);
    h.update(issuer.as_bytes());
    h.update([0]);
    h.update(seed);
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(first) % 100) as u8
}

/// The step (index and step) of `bundle`'s rollout the node with `seed` belongs to, and when it
/// opens; `None` for a bundle without `rollout`.
pub fn node_step(bundle: &Bundle, seed: &[u8]) -> Option<(usize, Step, OffsetDateTime)> {
    let steps = bundle.rollout()?;
    step_in(steps, &bundle.issuer, bundle.issued_at, seed)
}

/// The step (index and step) of `steps`, a schedule of `issuer` relative to `issued_at`, the node
/// with `seed` belongs to, and when it opens; `None` for an empty schedule.
pub fn step_in(
    steps: &[Step],
    issuer: &str,
    issued_at: OffsetDateTime,
    seed: &[u8],
) -> Option<(usize, Step, OffsetDateTime)> {
    let pos = position(issuer, seed);
    // A validated schedule ends at 100%, above every position, so a step is always found.
    let index = steps
        .iter()
        .position(|s| s.percent > pos)
        .unwrap_or(steps.len().checked_sub(1)?);
    let step = steps[index];
    let opens = issued_at
        .checked_add(time::Duration::try_from(step.after).unwrap_or(time::Duration::MAX))
        .unwrap_or(time::PrimitiveDateTime::MAX.assume_utc());
    Some((index, step, opens))
}

/// Whether the node with `seed` takes `bundle` up at `now`, or when it will. A bundle without
/// `rollout` is open to every node.
pub fn wave(bundle: &Bundle, seed: &[u8], now: OffsetDateTime) -> Wave {
    wave_of(node_step(bundle, seed), now)
}

/// Whether a node whose step is `step` ([`node_step`], [`step_in`]) is in an open wave at `now`.
pub fn wave_of(step: Option<(usize, Step, OffsetDateTime)>, now: OffsetDateTime) -> Wave {
    match step {
        Some((_, _, opens)) if now < opens => Wave::OpensAt(opens),
        _ => Wave::Open,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(json: &str) -> Result<Box<[Step]>, String> {
        parse(
            serde_json::from_str(json).unwrap(),
            time::Duration::days(30),
        )
    }

    #[test]
    fn steps_are_validated() {
        let ok = steps(r#"[{"after": "0s", "percent": 1}, {"after": "1h", "percent": 10}, {"after": "6h", "percent": 100}]"#)
            .unwrap();
        assert_eq!(ok.len(), 3);
        assert_eq!(ok[1].after, Duration::from_secs(3600));
        for (json, want) in [
            ("[]", "empty"),
            (r#"[{"after": "soon", "percent": 100}]"#, "not a duration"),
            (
                r#"[{"after": "0s", "percent": 0}, {"after": "1h", "percent": 100}]"#,
                "1..=100",
            ),
            (r#"[{"after": "0s", "percent": 101}]"#, "1..=100"),
            (
                r#"[{"after": "1h", "percent": 10}, {"after": "1h", "percent": 100}]"#,
                "strictly increasing time",
            ),
            (
                r#"[{"after": "2h", "percent": 10}, {"after": "1h", "percent": 100}]"#,
                "strictly increasing time",
            ),
            (
                r#"[{"after": "0s", "percent": 50}, {"after": "1h", "percent": 50}]"#,
                "reach more nodes",
            ),
            (
                r#"[{"after": "0s", "percent": 10}, {"after": "1h", "percent": 90}]"#,
                "must be 100",
            ),
            (r#"[{"after": "31d", "percent": 100}]"#, "has expired"),
        ] {
            let e = steps(json).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn positions_are_stable_spread_and_depend_on_the_issuer() {
        assert_eq!(position("team", b"node-1"), position("team", b"node-1"));
        let mut counts = [0u32; 100];
        for i in 0..10_000u32 {
            counts[position("team", &i.to_be_bytes()) as usize] += 1;
        }
        // 100 per bucket expected; every bucket is used and none holds three times its share.
        assert!(counts.iter().all(|&c| c > 30 && c < 300), "{counts:?}");
        let differ = (0..100u32)
            .filter(|i| position("a", &i.to_be_bytes()) != position("b", &i.to_be_bytes()))
            .count();
        assert!(differ > 80, "{differ}");
    }
}
