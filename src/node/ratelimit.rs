//! Rate limiting for log lines that a client (or a broken peer) can cause at any rate.
//!
//! A [`LogLimit`] lets one line per key through every interval and counts the lines it held back, so
//! the next line that gets through can say how many were suppressed ("(K more since)"). Counters and
//! metrics are never rate limited: only the log is.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One line per key per interval; the rest are counted, not logged.
pub struct LogLimit {
    every: Duration,
    /// Per key: when a line was last let through, and how many were held back since.
    slots: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl LogLimit {
    pub fn new(every: Duration) -> Self {
        LogLimit {
            every,
            slots: Mutex::default(),
        }
    }

    /// Whether a line for `key` may be logged now: `Some(n)` with the number of lines held back since
    /// the last one let through, `None` to stay quiet.
    pub fn check(&self, key: &'static str) -> Option<u64> {
        self.check_at(key, Instant::now())
    }

    /// [`LogLimit::check`] at a given time (for tests).
    pub fn check_at(&self, key: &'static str, now: Instant) -> Option<u64> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match slots.get_mut(key) {
            Some((last, held)) if now.saturating_duration_since(*last) < self.every => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                *last = now;
                Some(std::mem::take(held))
            }
            None => {
                slots.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// ` (N more since the last report)` when lines were held back, else nothing: for the end of a
/// rate-limited log message.
pub fn held_back(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more since the last report)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_key_per_interval_with_a_count_of_the_rest() {
        let limit = LogLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limit.check_at("a", t0), Some(0));
        assert_eq!(limit.check_at("a", t0 + Duration::from_secs(1)), None);
        assert_eq!(limit.check_at("a", t0 + Duration::from_secs(2)), None);
        // Another key has its own budget.
        assert_eq!(limit.check_at("b", t0 + Duration::from_secs(2)), Some(0));
        assert_eq!(limit.check_at("a", t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(limit.check_at("a", t0 + Duration::from_secs(11)), None);
        assert_eq!(limit.check_at("a", t0 + Duration::from_secs(21)), Some(1));
        assert_eq!(held_back(0), "");
        assert_eq!(held_back(3), " (3 more since the last report)");
    }
}
