//! Bounds on the request bodies pullgate buffers: the intercepted calls, whose one message is read
//! whole before it is decided on.
//!
//! Three limits, each checked as early as it can be:
//! - **Per-method caps** ([`BodyLimits::cap`]): a CRI message that is always small gets a cap far
//!   below kubelet's 16 MiB, checked against the gRPC length prefix as soon as its 5 bytes arrive,
//!   before anything else is buffered.
//! - **A global byte budget** ([`BodyBudget`]): the announced length is reserved before the body is
//!   read, so all buffered bodies together never exceed `server.limits.body_budget`. A call that finds
//!   no room waits briefly, then is answered RESOURCE_EXHAUSTED. The reservation is released when
//!   the call no longer holds the bytes.
//! - **A read timeout**: a body that stops arriving is answered DEADLINE_EXCEEDED and its buffer and
//!   reservation are released.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::grpc::MAX_MESSAGE_SIZE;
use super::intercept::methods;
use crate::node::config::Limits;
use crate::node::metrics::Metrics;

/// The body limits of one proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyLimits {
    /// Largest `PullImage` message.
    pub pull_image: usize,
    /// Largest `CreateContainer` message, and largest `RunPodSandbox` message.
    pub create_container: usize,
    /// Largest message of the methods whose messages are always small: `ImageStatus`,
    /// `RemoveImage`, `ListImages`, `RemovePodSandbox`.
    pub small: usize,
    /// How long a whole body may take to arrive.
    pub read_timeout: Duration,
}

impl BodyLimits {
    pub fn from_config(limits: &Limits) -> Self {
        BodyLimits {
            pull_image: limits.max_pull_image_message,
            create_container: limits.max_create_container_message,
            small: limits.max_small_message,
            read_timeout: limits.body_read_timeout,
        }
    }

    /// The largest request message `method` (a `runtime.v1` or `runtime.v1alpha2` path) may carry,
    /// and the configuration key that sets it (`None`: kubelet's own limit, not configurable).
    ///
    /// Why the small caps are safe: an `ImageSpec` is an image reference plus annotations, and
    /// Kubernetes caps a pod's annotations at 256 KiB in total, so `ImageStatus`, `RemoveImage` and
    /// `ListImages` (a filter holding one `ImageSpec`) stay far below 1 MiB; `RemovePodSandbox`
    /// carries a sandbox ID. `PullImage` adds the
    /// registry credentials (tokens of a few KiB) and the pod's `sandbox_config` (labels, annotations,
    /// DNS, ports), which is bounded by the pod object, itself under etcd's 1.5 MiB request limit:
    /// 4 MiB leaves more than twice that. `CreateContainer` carries the container config (env,
    /// mounts, args, labels, annotations) and the pod's sandbox config, all bounded by the pod
    /// object (under etcd's 1.5 MiB) plus what kubelet adds (mounts, devices, the log path): 4 MiB
    /// by default, so that the 64 MiB budget holds sixteen at once rather than four.
    /// `RunPodSandbox` carries the pod's sandbox config alone, which `CreateContainer` carries too,
    /// so it shares that cap. Every other intercepted method keeps kubelet's 16 MiB.
    pub fn cap(&self, method: &str) -> (usize, Option<&'static str>) {
        match methods::canonical(method) {
            methods::PULL_IMAGE => (
                self.pull_image,
                Some("server.limits.max_pull_image_message"),
            ),
            methods::CREATE_CONTAINER | methods::RUN_POD_SANDBOX => (
                self.create_container,
                Some("server.limits.max_create_container_message"),
            ),
            methods::IMAGE_STATUS
            | methods::REMOVE_IMAGE
            | methods::LIST_IMAGES
            | methods::REMOVE_POD_SANDBOX => (self.small, Some("server.limits.max_small_message")),
            _ => (MAX_MESSAGE_SIZE, None),
        }
    }
}

impl Default for BodyLimits {
    fn default() -> Self {
        BodyLimits::from_config(&Limits::default())
    }
}

/// The global budget of buffered request-body bytes, shared by every connection.
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    total: usize,
    wait: Duration,
    metrics: Arc<Metrics>,
}

/// Bytes reserved in a [`BodyBudget`], given back when dropped.
#[must_use = "the bytes are given back as soon as the reservation is dropped"]
pub struct Reservation {
    _permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
    metrics: Arc<Metrics>,
}

impl Reservation {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.metrics.body_bytes_reserved(-(self.bytes as i64));
    }
}

/// No room in the budget within the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted {
    /// The budget.
    pub total: usize,
    /// What the call asked for.
    pub wanted: usize,
}

impl BodyBudget {
    /// A budget of `total` bytes; a reservation waits at most `wait` for room.
    pub fn new(total: usize, wait: Duration, metrics: Arc<Metrics>) -> Self {
        BodyBudget {
            permits: Arc::new(Semaphore::new(total)),
            total,
            wait,
            metrics,
        }
    }

    pub fn from_config(limits: &Limits, metrics: Arc<Metrics>) -> Self {
        BodyBudget::new(
            limits.body_budget as usize,
            limits.body_budget_wait,
            metrics,
        )
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes reserved right now.
    pub fn in_use(&self) -> usize {
        self.total - self.permits.available_permits()
    }

    /// Reserves `bytes`, waiting up to the configured wait for others to give bytes back. Waiters
    /// are served in order, so a large reservation is not starved by a stream of small ones.
    pub async fn reserve(&self, bytes: usize) -> Result<Reservation, Exhausted> {
        let exhausted = Exhausted {
            total: self.total,
            wanted: bytes,
        };
        if bytes == 0 {
            return Ok(self.reservation(None, 0));
        }
        let n = u32::try_from(bytes)
            .ok()
            .filter(|&n| n as usize <= self.total)
            .ok_or(exhausted)?;
        let permit = match self.permits.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) if self.wait.is_zero() => return Err(exhausted),
            Err(_) => {
                match tokio::time::timeout(self.wait, self.permits.clone().acquire_many_owned(n))
                    .await
                {
                    Ok(Ok(p)) => p,
                    _ => return Err(exhausted),
                }
            }
        };
        Ok(self.reservation(Some(permit), bytes))
    }

    fn reservation(&self, permit: Option<OwnedSemaphorePermit>, bytes: usize) -> Reservation {
        self.metrics.body_bytes_reserved(bytes as i64);
        Reservation {
            _permit: permit,
            bytes,
            metrics: self.metrics.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(total: usize, wait_ms: u64) -> BodyBudget {
        BodyBudget::new(
            total,
            Duration::from_millis(wait_ms),
            Arc::new(Metrics::default()),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn reservations_share_the_budget_and_give_it_back() {
        let b = budget(100, 50);
        let r1 = b.reserve(60).await.unwrap();
        let r2 = b.reserve(40).await.unwrap();
        assert_eq!(b.in_use(), 100);
        // Full: the next one waits the configured time, then gives up.
        let started = tokio::time::Instant::now();
        let e = b.reserve(1).await.err().expect("over budget");
        assert_eq!(
            e,
            Exhausted {
                total: 100,
                wanted: 1
            }
        );
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        drop(r1);
        assert_eq!(b.in_use(), 40);
        let r3 = b.reserve(60).await.unwrap();
        assert_eq!(r3.bytes(), 60);
        drop((r2, r3));
        assert_eq!(b.in_use(), 0);
        // More than the whole budget can never be had: refused without waiting.
        let started = tokio::time::Instant::now();
        assert!(b.reserve(101).await.is_err());
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_bytes_given_back_during_its_wait() {
        let b = Arc::new(budget(100, 1000));
        let held = b.reserve(100).await.unwrap();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.reserve(30).await.map(|r| r.bytes()) })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(held);
        assert_eq!(waiter.await.unwrap(), Ok(30));
        assert_eq!(b.in_use(), 0);
    }

    #[tokio::test]
    async fn no_wait_refuses_at_once() {
        let b = budget(10, 0);
        let _r = b.reserve(10).await.unwrap();
        assert!(b.reserve(1).await.is_err());
    }

    #[test]
    fn small_messages_have_small_caps() {
        let l = BodyLimits::default();
        assert_eq!(
            l.cap("/runtime.v1.ImageService/PullImage"),
            (4 << 20, Some("server.limits.max_pull_image_message"))
        );
        assert_eq!(l.cap("/runtime.v1alpha2.ImageService/PullImage").0, 4 << 20);
        for m in [
            "ImageService/ImageStatus",
            "ImageService/RemoveImage",
            "ImageService/ListImages",
            "RuntimeService/RemovePodSandbox",
        ] {
            let (cap, key) = l.cap(&format!("/runtime.v1.{m}"));
            assert_eq!(
                (cap, key),
                (1 << 20, Some("server.limits.max_small_message")),
                "{m}"
            );
        }
        assert_eq!(
            l.cap("/runtime.v1.RuntimeService/CreateContainer"),
            (4 << 20, Some("server.limits.max_create_container_message"))
        );
        for m in [
            "/runtime.v1.RuntimeService/RunPodSandbox",
            "/runtime.v1alpha2.RuntimeService/RunPodSandbox",
        ] {
            assert_eq!(
                l.cap(m),
                (4 << 20, Some("server.limits.max_create_container_message")),
                "{m}"
            );
        }
        assert_eq!(
            l.cap("/runtime.v1alpha2.RuntimeService/CreateContainer").0,
            4 << 20
        );
        assert_eq!(
            l.cap("/runtime.v1.RuntimeService/SomeFutureMethod"),
            (MAX_MESSAGE_SIZE, None)
        );
    }
}
