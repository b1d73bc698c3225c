//! Open client connections and the calls open on each: what the connection cap, the oldest-idle
//! eviction and the idle timeout need to know.
//!
//! Every accepted connection is admitted by the [`Registry`] (or refused) and gets a [`Conn`]
//! handle that leaves the registry when dropped. Every call on it holds a [`StreamGuard`] from the
//! moment its request arrives until both sides have ended it or it is reset, so a
//! connection with no guard alive has no open call: it is *idle*, since the moment its last call
//! ended.
//!
//! When `server.limits.max_connections` connections are being served, a newcomer makes room: the
//! connection idle for the longest is told to close ([`Conn::close_requested`]). Kubelet's own
//! connection is never idle for long (it relists every second), so it is the last to go. Only when no
//! connection is idle, or too many are still closing, is the newcomer refused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::node::config::Limits;
use crate::node::metrics::{ConnClose, Metrics};

/// Why a new connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The cap is reached and every connection has a call open.
    AllBusy { max: usize },
    /// The cap is reached and the connections already told to close have not gone yet.
    TooManyClosing { closing: usize },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::AllBusy { max } => write!(
                f,
                "pullgate serves at most {max} connections (server.limits.max_connections) and every one has a call open"
            ),
            Refused::TooManyClosing { closing } => write!(
                f,
                "pullgate is at its connection limit (server.limits.max_connections) and {closing} connections it closed to make room have not gone yet"
            ),
        }
    }
}

/// One client connection as the registry sees it.
pub struct ConnState {
    id: u64,
    epoch: Instant,
    open_streams: AtomicUsize,
    /// Milliseconds after `epoch` at which the last call ended (or the connection opened).
    idle_since_ms: AtomicU64,
    /// Set once pullgate decided to close it (idle timeout or eviction).
    closing: AtomicBool,
    /// Woken when the registry evicts it.
    evict: Notify,
}

impl ConnState {
    fn new(id: u64, epoch: Instant, now: Instant) -> Self {
        ConnState {
            id,
            epoch,
            open_streams: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(millis(epoch, now)),
            closing: AtomicBool::new(false),
            evict: Notify::new(),
        }
    }

    /// A call arrived; it counts as open until the guard is dropped.
    pub fn open_stream(self: &Arc<Self>) -> StreamGuard {
        self.open_streams.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }

    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::Acquire)
    }

    /// When the connection became idle; `None` while a call is open.
    pub fn idle_since(&self) -> Option<Instant> {
        if self.open_streams() > 0 {
            return None;
        }
        let ms = self.idle_since_ms.load(Ordering::Acquire);
        Some(self.epoch + Duration::from_millis(ms))
    }

    /// Resolves when the registry evicted this connection.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }
}

fn millis(epoch: Instant, now: Instant) -> u64 {
    now.saturating_duration_since(epoch).as_millis() as u64
}

/// Held by one call for as long as it is open.
pub struct StreamGuard(Arc<ConnState>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let c = &self.0;
        // Stamp the time before the count drops, so a reader never sees an idle connection with a
        // stale stamp.
        c.idle_since_ms
            .store(millis(c.epoch, Instant::now()), Ordering::Release);
        c.open_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connection that has been idle the longest, among those with no open call that are not
/// closing already.
pub fn oldest_idle<'a>(
    conns: impl IntoIterator<Item = &'a Arc<ConnState>>,
) -> Option<&'a Arc<ConnState>> {
    conns
        .into_iter()
        .filter(|c| !c.is_closing())
        .filter_map(|c| c.idle_since().map(|t| (t, c)))
        .min_by_key(|(t, c)| (*t, c.id))
        .map(|(_, c)| c)
}

struct Inner {
    conns: HashMap<u64, Arc<ConnState>>,
    /// How many of `conns` are closing.
    closing: usize,
}

/// Every connection being served, shared by the accept loop and the connections.
pub struct Registry {
    epoch: Instant,
    max: usize,
    /// How many connections told to close may still be open on top of `max`.
    reserve: usize,
    idle_timeout: Duration,
    next_id: AtomicU64,
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
}

impl Registry {
    pub fn new(limits: &Limits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Registry {
            epoch: Instant::now(),
            max: limits.max_connections,
            reserve: Registry::reserve_for(limits.max_connections),
            idle_timeout: limits.idle_timeout,
            next_id: AtomicU64::new(1),
            inner: Mutex::new(Inner {
                conns: HashMap::new(),
                closing: 0,
            }),
            metrics,
        })
    }

    /// Connections that may still be closing on top of `max`: a quarter of it, at least 8. With
    /// them, pullgate holds at most `max + reserve` client sockets.
    pub fn reserve_for(max: usize) -> usize {
        (max / 4).max(8)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new connection, telling the oldest idle one to close if the cap is reached.
    pub fn admit(self: &Arc<Self>) -> Result<Conn, Refused> {
        let mut inner = self.lock();
        if inner.conns.len() - inner.closing >= self.max {
            if inner.closing >= self.reserve {
                return Err(Refused::TooManyClosing {
                    closing: inner.closing,
                });
            }
            if !self.evict_locked(&mut inner) {
                return Err(Refused::AllBusy { max: self.max });
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState::new(id, self.epoch, Instant::now()));
        inner.conns.insert(id, state.clone());
        self.metrics.connections_open(1);
        Ok(Conn {
            state,
            registry: self.clone(),
        })
    }

    /// Tells the connection idle for the longest to close (e.g. when out of file descriptors);
    /// whether there was one.
    pub fn evict_oldest_idle(&self) -> bool {
        let mut inner = self.lock();
        self.evict_locked(&mut inner)
    }

    fn evict_locked(&self, inner: &mut Inner) -> bool {
        let Some(victim) = oldest_idle(inner.conns.values()).cloned() else {
            return false;
        };
        self.mark_closing(inner, &victim, ConnClose::Evicted);
        victim.evict.notify_one();
        tracing::debug!(
            connection = victim.id,
            "closing the connection idle for the longest to make room"
        );
        true
    }

    fn mark_closing(&self, inner: &mut Inner, conn: &ConnState, why: ConnClose) -> bool {
        if conn.closing.swap(true, Ordering::AcqRel) {
            return false;
        }
        inner.closing += 1;
        self.metrics.connection_closed(why);
        true
    }

    /// Connections being served (including those closing).
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn remove(&self, conn: &ConnState) {
        let mut inner = self.lock();
        if inner.conns.remove(&conn.id).is_some() {
            if conn.is_closing() {
                inner.closing -= 1;
            }
            self.metrics.connections_open(-1);
        }
    }
}

/// An admitted connection; leaves the registry when dropped.
pub struct Conn {
    state: Arc<ConnState>,
    registry: Arc<Registry>,
}

impl Conn {
    pub fn state(&self) -> &Arc<ConnState> {
        &self.state
    }

    pub fn idle_timeout(&self) -> Duration {
        self.registry.idle_timeout
    }

    /// Resolves when the registry evicted this connection.
    pub async fn close_requested(&self) {
        self.state.evicted().await
    }

    /// When the idle timeout closes this connection if no call opens before; `None` while a call
    /// is open or once it is closing.
    pub fn idle_deadline(&self) -> Option<Instant> {
        if self.state.is_closing() {
            return None;
        }
        self.state
            .idle_since()
            .map(|t| t + self.registry.idle_timeout)
    }

    /// Marks the connection as closing because it was idle too long; false if it was closing already.
    pub fn close_idle(&self) -> bool {
        let mut inner = self.registry.lock();
        self.registry
            .mark_closing(&mut inner, &self.state, ConnClose::IdleTimeout)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.registry.remove(&self.state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(max: usize) -> Arc<Registry> {
        let limits = Limits {
            max_connections: max,
            ..Limits::default()
        };
        Registry::new(&limits, Arc::new(Metrics::default()))
    }

    #[tokio::test(start_paused = true)]
    async fn streams_are_counted_until_their_guards_drop() {
        let r = registry(4);
        let c = r.admit().unwrap();
        let opened = Instant::now();
        assert_eq!(c.state().idle_since(), Some(opened));
        tokio::time::advance(Duration::from_secs(3)).await;
        let g1 = c.state().open_stream();
        let g2 = c.state().open_stream();
        assert_eq!(c.state().idle_since(), None);
        assert_eq!(c.idle_deadline(), None);
        drop(g1);
        assert_eq!(c.state().open_streams(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(g2);
        assert_eq!(
            c.state().idle_since(),
            Some(opened + Duration::from_secs(5)),
            "idle since its last call ended"
        );
        assert_eq!(
            c.idle_deadline(),
            Some(opened + Duration::from_secs(5) + Limits::default().idle_timeout)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_connection_idle_for_the_longest_is_chosen() {
        let r = registry(100);
        let a = r.admit().unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let b = r.admit().unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let c = r.admit().unwrap();
        let all = [a.state().clone(), b.state().clone(), c.state().clone()];
        assert_eq!(oldest_idle(&all).unwrap().id, a.state().id);
        // A busy connection is never chosen, however old.
        let busy = a.state().open_stream();
        assert_eq!(oldest_idle(&all).unwrap().id, b.state().id);
        // A call on b that ended just now makes c the longest idle.
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(b.state().open_stream());
        assert_eq!(oldest_idle(&all).unwrap().id, c.state().id);
        // Closing connections are not chosen again.
        assert!(c.close_idle());
        assert!(!c.close_idle());
        assert_eq!(oldest_idle(&all).unwrap().id, b.state().id);
        // a's call ends after b's: b stays the longest idle.
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(busy);
        assert_eq!(oldest_idle(&all).unwrap().id, b.state().id);
        assert!(b.close_idle());
        assert_eq!(oldest_idle(&all).unwrap().id, a.state().id);
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_oldest_idle_makes_room() {
        let r = registry(2);
        let a = r.admit().unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let b = r.admit().unwrap();
        let _busy_b = b.state().open_stream();
        tokio::time::advance(Duration::from_secs(1)).await;
        // Full: a (idle) is told to close, the newcomer is admitted.
        let c = r.admit().expect("room is made");
        assert!(a.state().is_closing());
        tokio::time::timeout(Duration::from_millis(1), a.close_requested())
            .await
            .expect("a was told to close");
        assert!(!b.state().is_closing());
        assert_eq!(r.len(), 3, "a is still open while it closes");
        // Now b is busy and c has a call: nothing to evict, the next one is refused.
        let _busy_c = c.state().open_stream();
        assert_eq!(r.admit().err(), Some(Refused::AllBusy { max: 2 }));
        drop(a);
        assert_eq!(r.len(), 2);
        assert_eq!(r.admit().err(), Some(Refused::AllBusy { max: 2 }));
    }

    #[tokio::test(start_paused = true)]
    async fn connections_still_closing_are_bounded() {
        let r = registry(1);
        let reserve = Registry::reserve_for(1);
        let mut kept = vec![r.admit().unwrap()];
        // Each newcomer evicts the previous (idle) one, which lingers (never closes).
        for _ in 0..reserve {
            tokio::time::advance(Duration::from_millis(10)).await;
            kept.push(r.admit().expect("evicts the idle one"));
        }
        assert_eq!(
            r.admit().err(),
            Some(Refused::TooManyClosing { closing: reserve })
        );
        // One of them goes away: room again.
        kept.remove(0);
        assert!(r.admit().is_ok());
    }
}
