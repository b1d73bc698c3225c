//! Rate-limited logging: at most one line per key per interval, each saying how many were
//! suppressed since the last, so a fault that repeats every few milliseconds (an `accept` that keeps
//! failing, a flood of refused connections) cannot flood the journal.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Decides which occurrences of an event get logged.
pub struct LogLimiter {
    interval: Duration,
    keys: Mutex<HashMap<&'static str, Slot>>,
}

struct Slot {
    /// When the last line for this key was written.
    logged: Instant,
    /// Occurrences since then that were not logged.
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        LogLimiter {
            interval,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// An occurrence of `key` now: `Some(suppressed)` if it should be logged (with the number of
    /// occurrences dropped since the last logged one), `None` if it is to be dropped.
    pub fn check(&self, key: &'static str) -> Option<u64> {
        self.check_at(key, Instant::now())
    }

    /// [`LogLimiter::check`] at a given time.
    pub fn check_at(&self, key: &'static str, now: Instant) -> Option<u64> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        match keys.get_mut(key) {
            Some(slot) if now.saturating_duration_since(slot.logged) < self.interval => {
                slot.suppressed += 1;
                None
            }
            Some(slot) => {
                let suppressed = slot.suppressed;
                *slot = Slot {
                    logged: now,
                    suppressed: 0,
                };
                Some(suppressed)
            }
            None => {
                keys.insert(
                    key,
                    Slot {
                        logged: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_key_per_interval_with_the_suppressed_count() {
        let l = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.check_at("accept", t0), Some(0));
        for ms in [50, 100, 9_999] {
            assert_eq!(l.check_at("accept", t0 + Duration::from_millis(ms)), None);
        }
        // Another key has its own budget.
        assert_eq!(
            l.check_at("refused", t0 + Duration::from_millis(1)),
            Some(0)
        );
        assert_eq!(l.check_at("accept", t0 + Duration::from_secs(10)), Some(3));
        assert_eq!(l.check_at("accept", t0 + Duration::from_secs(11)), None);
        assert_eq!(l.check_at("accept", t0 + Duration::from_secs(21)), Some(1));
    }
}
