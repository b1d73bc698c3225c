//! Connection-level flow control of a relayed kubelet connection.
//!
//! The relay passes the peers' own windows: kubelet's WINDOW_UPDATEs go to containerd and
//! containerd's to kubelet, and DATA frames pass unchanged, so each side's idea of the other's
//! window stays true. Two things break that, and this module corrects them:
//!
//! - DATA kubelet sends on a stream pullgate answers itself (an intercepted call) never reaches
//!   containerd, which therefore never gives that room back. pullgate gives it back itself: a
//!   connection WINDOW_UPDATE to kubelet for every such byte (no state needed here).
//! - DATA pullgate sends kubelet for its own answers uses room in kubelet's window that containerd
//!   does not know about. kubelet's later WINDOW_UPDATEs give that room back; they are kept from
//!   containerd until the debt is repaid ([`ConnFlow::kubelet_update`]). Until then containerd may
//!   believe kubelet has more room than it has, so its DATA waits in a queue while kubelet's real
//!   window is short of it ([`ConnFlow::upstream_data`]); what waits is bounded by the debt, since
//!   containerd never sends more than it believes there is room for.
//!
//! Stream-level windows need no correction: a stream is either relayed (the peers' own windows) or
//! answered by pullgate (kubelet's window for it is pullgate's business alone, see [`StreamWindow`]).

use std::collections::VecDeque;

use bytes::Bytes;

/// Every connection window starts at 65,535 bytes (RFC 9113 §6.9.2); only WINDOW_UPDATE changes it.
pub const INITIAL_WINDOW: i64 = 65_535;
/// The largest a window may grow (RFC 9113 §6.9.1).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

/// A frame on its way to kubelet: DATA (counted by `len`, its payload with any padding) or, with
/// `len` 0, anything else that must keep its place behind DATA frames waiting in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub frame: Bytes,
    pub len: u32,
    /// pullgate's own answer rather than containerd's frame.
    pub own: bool,
}

/// What the peers did that the protocol forbids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error(
        "containerd sent {sent} bytes of DATA with only {room} bytes of room in kubelet's window"
    )]
    UpstreamOverflow { sent: u32, room: i64 },
    #[error("a WINDOW_UPDATE grew kubelet's connection window past 2^31-1 bytes")]
    WindowOverflow,
}

/// The corrections for one kubelet connection (see the module docs).
#[derive(Debug)]
pub struct ConnFlow {
    /// kubelet's connection receive window as it really is: the initial window, plus its
    /// WINDOW_UPDATEs, minus every DATA byte sent to it.
    real: i64,
    /// Bytes of pullgate's own DATA that kubelet's WINDOW_UPDATEs have not given back yet.
    debt: i64,
    /// Frames for kubelet waiting for room, in order.
    queue: VecDeque<Outgoing>,
    /// DATA bytes in `queue`.
    queued: i64,
}

impl Default for ConnFlow {
    fn default() -> Self {
        ConnFlow {
            real: INITIAL_WINDOW,
            debt: 0,
            queue: VecDeque::new(),
            queued: 0,
        }
    }
}

impl ConnFlow {
    /// kubelet gave `increment` bytes of room on the connection: first repays pullgate's debt,
    /// and returns the increment to pass on to containerd (0: send nothing), with the frames that
    /// now fit appended to `ready`, in order.
    pub fn kubelet_update(
        &mut self,
        increment: u32,
        ready: &mut Vec<Outgoing>,
    ) -> Result<u32, FlowError> {
        let inc = i64::from(increment);
        if self.real + inc > MAX_WINDOW {
            return Err(FlowError::WindowOverflow);
        }
        self.real += inc;
        let repaid = inc.min(self.debt);
        self.debt -= repaid;
        self.release(ready);
        Ok((inc - repaid) as u32)
    }

    /// containerd's frame for kubelet: appended to `ready` if it may go now, queued otherwise.
    pub fn upstream_data(
        &mut self,
        frame: Bytes,
        len: u32,
        ready: &mut Vec<Outgoing>,
    ) -> Result<(), FlowError> {
        // What containerd believes is left: the real window and the debt, less what already waits.
        let room = self.real + self.debt - self.queued;
        if i64::from(len) > room {
            return Err(FlowError::UpstreamOverflow { sent: len, room });
        }
        self.push(
            Outgoing {
                frame,
                len,
                own: false,
            },
            ready,
        );
        Ok(())
    }

    /// pullgate's own frame for kubelet (an answer it makes itself): appended to `ready` if it may
    /// go now, queued otherwise. Its DATA becomes debt once sent.
    pub fn own_data(&mut self, frame: Bytes, len: u32, ready: &mut Vec<Outgoing>) {
        self.push(
            Outgoing {
                frame,
                len,
                own: true,
            },
            ready,
        );
    }

    /// kubelet's real connection window.
    pub fn window(&self) -> i64 {
        self.real
    }

    /// Bytes of pullgate's own DATA kubelet has not given back yet.
    pub fn debt(&self) -> i64 {
        self.debt
    }

    /// DATA bytes waiting for room.
    pub fn queued(&self) -> i64 {
        self.queued
    }

    fn push(&mut self, out: Outgoing, ready: &mut Vec<Outgoing>) {
        self.queued += i64::from(out.len);
        self.queue.push_back(out);
        self.release(ready);
    }

    /// Sends, in order, every waiting frame that fits.
    fn release(&mut self, ready: &mut Vec<Outgoing>) {
        while let Some(next) = self.queue.front() {
            let len = i64::from(next.len);
            if len > self.real {
                return;
            }
            self.real -= len;
            self.queued -= len;
            if next.own {
                self.debt += len;
            }
            ready.extend(self.queue.pop_front());
        }
    }
}

/// kubelet's receive window for one stream pullgate answers itself: the initial window from
/// kubelet's SETTINGS, plus its WINDOW_UPDATEs for the stream (which containerd never sees), less
/// what pullgate sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamWindow(i64);

impl StreamWindow {
    pub fn new(initial: u32) -> Self {
        StreamWindow(i64::from(initial))
    }

    /// How many of `wanted` bytes may be sent now; they are taken from the window.
    pub fn take(&mut self, wanted: usize) -> usize {
        let n = (wanted as i64).min(self.0.max(0));
        self.0 -= n;
        n as usize
    }

    /// A WINDOW_UPDATE for the stream.
    pub fn grow(&mut self, increment: u32) -> Result<(), FlowError> {
        if self.0 + i64::from(increment) > MAX_WINDOW {
            return Err(FlowError::WindowOverflow);
        }
        self.0 += i64::from(increment);
        Ok(())
    }

    /// kubelet changed SETTINGS_INITIAL_WINDOW_SIZE: every open stream's window moves by the
    /// difference (RFC 9113 §6.9.2), possibly below zero.
    pub fn resize(&mut self, old_initial: u32, new_initial: u32) {
        self.0 += i64::from(new_initial) - i64::from(old_initial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8) -> Bytes {
        Bytes::from(vec![tag])
    }

    fn tags(ready: &mut Vec<Outgoing>) -> Vec<u8> {
        ready.drain(..).map(|o| o.frame[0]).collect()
    }

    #[test]
    fn relayed_data_passes_while_the_window_has_room_and_updates_pass_whole() {
        let mut f = ConnFlow::default();
        let mut ready = Vec::new();
        f.upstream_data(frame(1), 65_535, &mut ready).unwrap();
        assert_eq!(tags(&mut ready), [1]);
        assert_eq!(f.window(), 0);
        // Without any answer of pullgate's own, kubelet's updates go to containerd unchanged.
        assert_eq!(f.kubelet_update(1000, &mut ready).unwrap(), 1000);
        assert_eq!(f.window(), 1000);
    }

    #[test]
    fn kubelet_updates_repay_pullgates_answers_before_containerd_sees_them() {
        let mut f = ConnFlow::default();
        let mut ready = Vec::new();
        f.own_data(frame(1), 100, &mut ready);
        assert_eq!(tags(&mut ready), [1]);
        assert_eq!(f.debt(), 100);
        // kubelet gives back 60, then 60: containerd gets nothing, then 20.
        assert_eq!(f.kubelet_update(60, &mut ready).unwrap(), 0);
        assert_eq!(f.kubelet_update(60, &mut ready).unwrap(), 20);
        assert_eq!(f.debt(), 0);
        assert_eq!(f.window(), INITIAL_WINDOW + 20);
    }

    #[test]
    fn containerds_data_waits_while_pullgates_answers_hold_kubelets_room() {
        let mut f = ConnFlow::default();
        let mut ready = Vec::new();
        f.own_data(frame(1), 1_000, &mut ready);
        // containerd believes the whole initial window is free and fills it.
        f.upstream_data(frame(2), 64_535, &mut ready).unwrap();
        f.upstream_data(frame(3), 1_000, &mut ready).unwrap();
        assert_eq!(tags(&mut ready), [1, 2]);
        assert_eq!(f.queued(), 1_000);
        // A non-DATA frame behind the waiting one keeps its place.
        f.upstream_data(frame(4), 0, &mut ready).unwrap();
        assert!(ready.is_empty());
        // More than containerd's idea of the room is a violation, not a longer queue.
        assert_eq!(
            f.upstream_data(frame(5), 1, &mut ready),
            Err(FlowError::UpstreamOverflow { sent: 1, room: 0 })
        );
        // kubelet gives back what it read: the debt first, and the waiting frames go out in order.
        assert_eq!(f.kubelet_update(66_000, &mut ready).unwrap(), 65_000);
        assert_eq!(tags(&mut ready), [3, 4]);
        assert_eq!(f.queued(), 0);
        assert_eq!(f.debt(), 0);
        assert_eq!(f.window(), 66_000 - 1_000);
    }

    #[test]
    fn own_answers_wait_for_room_and_only_become_debt_when_sent() {
        let mut f = ConnFlow::default();
        let mut ready = Vec::new();
        f.upstream_data(frame(1), 65_535, &mut ready).unwrap();
        f.own_data(frame(2), 10, &mut ready);
        assert_eq!(tags(&mut ready), [1]);
        assert_eq!(f.debt(), 0);
        // Room that kubelet gives while pullgate owes nothing is containerd's as well.
        assert_eq!(f.kubelet_update(10, &mut ready).unwrap(), 10);
        assert_eq!(tags(&mut ready), [2]);
        assert_eq!(f.debt(), 10);
        assert_eq!(f.window(), 0);
    }

    #[test]
    fn windows_never_grow_past_the_protocol_limit() {
        let mut f = ConnFlow::default();
        let mut ready = Vec::new();
        let inc = (MAX_WINDOW - INITIAL_WINDOW) as u32;
        assert_eq!(f.kubelet_update(inc, &mut ready).unwrap(), inc);
        assert_eq!(
            f.kubelet_update(1, &mut ready),
            Err(FlowError::WindowOverflow)
        );
        let mut s = StreamWindow::new(MAX_WINDOW as u32);
        assert_eq!(s.grow(1), Err(FlowError::WindowOverflow));
    }

    #[test]
    fn a_streams_window_limits_pullgates_answer_and_follows_settings() {
        let mut s = StreamWindow::new(100);
        assert_eq!(s.take(150), 100);
        assert_eq!(s.take(10), 0);
        s.grow(30).unwrap();
        assert_eq!(s.take(50), 30);
        // SETTINGS shrinking the initial window can leave a stream below zero.
        s.resize(100, 50);
        assert_eq!(s.take(1), 0);
        s.grow(60).unwrap();
        assert_eq!(s.take(100), 10);
    }
}
