//! Connection-level flow control of a relayed connection, one [`ConnFlow`] per direction.
//!
//! The relay passes the peers' own windows: the receiver's WINDOW_UPDATEs go to the sender and
//! DATA frames pass unchanged, so the sender's idea of the receiver's window stays true. Three
//! things break that, and this module corrects them:
//!
//! - DATA kubelet sends on a stream pullgate answers itself (an intercepted call) never reaches
//!   containerd, which therefore never gives that room back. pullgate gives it back itself: a
//!   connection WINDOW_UPDATE to kubelet for every such byte (no state needed here).
//! - DATA pullgate sends kubelet for its own answers uses room in kubelet's window that containerd
//!   does not know about (and the request data pullgate sends containerd for an intercepted call
//!   it forwards, room in containerd's window that kubelet does not know about: the same
//!   correction in the other direction). kubelet's later WINDOW_UPDATEs give that room back; they are kept from
//!   containerd until the debt is repaid ([`ConnFlow::receiver_update`]). Until then containerd
//!   may believe kubelet has more room than it has, so its DATA waits in a queue while kubelet's
//!   real window is short of it ([`ConnFlow::relayed`]); what waits is bounded by the debt, since
//!   containerd never sends more than it believes there is room for.
//! - When containerd restarts, kubelet's connection stays and a new one to containerd replaces the
//!   old: each direction gets a new peer whose idea of the window differs from the other's
//!   ([`ConnFlow::new_receiver`], [`ConnFlow::new_sender`]). The difference becomes debt the same
//!   way, or is made up at once with a WINDOW_UPDATE to the peer who believes too little.
//!
//! Stream-level windows need no correction: a stream's windows are either the peers' own (relayed)
//! or pullgate's business alone — kubelet's for an answer pullgate sends ([`StreamWindow`]),
//! containerd's for a request pullgate sends (kept by the session).

use std::collections::VecDeque;

use bytes::Bytes;

/// Every connection window starts at 65,535 bytes (RFC 9113 §6.9.2); only WINDOW_UPDATE changes it.
pub const INITIAL_WINDOW: i64 = 65_535;
/// The largest a window may grow (RFC 9113 §6.9.1).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

/// A frame on its way to the receiver: DATA (counted by `len`, its payload with any padding) or, with
/// `len` 0, anything else that must keep its place behind DATA frames waiting in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub frame: Bytes,
    pub len: u32,
    /// pullgate's own answer rather than the sender's frame.
    pub own: bool,
}

/// What the peers did that the protocol forbids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error("{sent} bytes of DATA with only {room} bytes of room in the receiver's window")]
    UpstreamOverflow { sent: u32, room: i64 },
    #[error("a WINDOW_UPDATE grew a connection window past 2^31-1 bytes")]
    WindowOverflow,
}

/// The corrections for one direction of a relayed connection (see the module docs).
#[derive(Debug)]
pub struct ConnFlow {
    /// The receiver's connection window as it really is: the initial window, plus its
    /// WINDOW_UPDATEs, minus every DATA byte sent to it.
    real: i64,
    /// Bytes the sender believes the receiver has beyond its real room: pullgate's own DATA the
    /// receiver has not given back yet, or what a new peer's idea of the window is off by.
    debt: i64,
    /// Frames for the receiver waiting for room, in order.
    queue: VecDeque<Outgoing>,
    /// DATA bytes of the sender's frames in `queue` (pullgate's own are not counted: the sender's
    /// idea of the window does not know them).
    queued: i64,
    /// Bytes of every frame in `queue`, DATA or not (what waiting costs in memory).
    queued_bytes: usize,
}

impl Default for ConnFlow {
    fn default() -> Self {
        ConnFlow {
            real: INITIAL_WINDOW,
            debt: 0,
            queue: VecDeque::new(),
            queued: 0,
            queued_bytes: 0,
        }
    }
}

impl ConnFlow {
    /// The receiver gave `increment` bytes of room on the connection: first repays the debt, and
    /// returns the increment to pass on to the sender (0: send nothing), with the frames that now
    /// fit appended to `ready`, in order.
    pub fn receiver_update(
        &mut self,
        increment: u32,
        ready: &mut Vec<Outgoing>,
    ) -> Result<u32, FlowError> {
        let inc = i64::from(increment);
        if self.real + inc > MAX_WINDOW {
            return Err(FlowError::WindowOverflow);
        }
        self.real += inc;
        let repaid = inc.min(self.debt.max(0));
        self.debt -= repaid;
        self.release(ready);
        Ok((inc - repaid) as u32)
    }

    /// The sender's frame for the receiver: appended to `ready` if it may go now, queued otherwise.
    pub fn relayed(
        &mut self,
        frame: Bytes,
        len: u32,
        ready: &mut Vec<Outgoing>,
    ) -> Result<(), FlowError> {
        // What the sender believes is left: the real window and the debt, less what already waits.
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

    /// pullgate's own frame for the receiver (an answer it makes itself): appended to `ready` if it may
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

    /// Forgets the frames waiting for a receiver that is gone, keeping the sender's idea of the
    /// window (the bytes it sent are lost with the receiver, not given back).
    pub fn clear(&mut self) {
        // Only the sender's frames are lost; pullgate's own were never counted against it.
        self.debt -= self.queued;
        self.queue.clear();
        self.queued = 0;
        self.queued_bytes = 0;
    }

    /// A new receiver with `real` bytes of room, the sender unchanged. Returns the room to give
    /// the sender at once if it believes less than that (0: nothing to send).
    pub fn new_receiver(&mut self, real: i64) -> u32 {
        let belief = self.real + self.debt - self.queued;
        self.real = real;
        self.settle(belief)
    }

    /// A new sender that believes the receiver has `belief` bytes of room, the receiver
    /// unchanged. Returns the room to give the new sender at once if it believes less than the
    /// receiver has.
    pub fn new_sender(&mut self, belief: i64) -> u32 {
        self.settle(belief)
    }

    /// Sets the debt so the sender's idea of the room, `belief`, holds.
    fn settle(&mut self, belief: i64) -> u32 {
        self.debt = belief - self.real + self.queued;
        if self.debt >= 0 {
            return 0;
        }
        let short = (-self.debt).min(MAX_WINDOW);
        self.debt = 0;
        short as u32
    }

    /// The receiver's real connection window.
    pub fn window(&self) -> i64 {
        self.real
    }

    /// Bytes the sender believes there is room for beyond the real window.
    pub fn debt(&self) -> i64 {
        self.debt
    }

    /// DATA bytes waiting for room.
    pub fn queued(&self) -> i64 {
        self.queued
    }

    /// Bytes of every frame waiting, DATA or not.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    fn push(&mut self, out: Outgoing, ready: &mut Vec<Outgoing>) {
        if !out.own {
            self.queued += i64::from(out.len);
        }
        self.queued_bytes += out.frame.len();
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
            self.queued_bytes -= next.frame.len();
            if next.own {
                self.debt += len;
            } else {
                self.queued -= len;
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

    /// The room left (below zero after kubelet shrank its initial window).
    pub fn available(&self) -> i64 {
        self.0
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
        f.relayed(frame(1), 65_535, &mut ready).unwrap();
        assert_eq!(tags(&mut ready), [1]);
        assert_eq!(f.window(), 0);
        // Without any answer of pullgate's own, kubelet's updates go to containerd unchanged.
        assert_eq!(f.receiver_update(1000, &mut ready).unwrap(), 1000);
        assert_eq!(f.window(), 1000);
    }

    #[test]
    fn receiver_updates_repay_pullgates_answers_before_containerd_sees_them() {
        let mut f = ConnFlow::default();
        let mut ready = Vec::new();
        f.own_data(frame(1), 100, &mut ready);
        assert_eq!(tags(&mut ready), [1]);
        assert_eq!(f.debt(), 100);
        // kubelet gives back 60, then 60: containerd gets nothing, then 20.
        assert_eq!(f.receiver_update(60, &mut ready).unwrap(), 0);
        assert_eq!(f.receiver_update(60, &mut ready).unwrap(), 20);
        assert_eq!(f.debt(), 0);
        assert_eq!(f.window(), INITIAL_WINDOW + 20);
    }

    #[test]
    fn containerds_data_waits_while_pullgates_answers_hold_kubelets_room() {
        let mut f = ConnFlow::default();
        let mut ready = Vec::new();
        f.own_data(frame(1), 1_000, &mut ready);
        // containerd believes the whole initial window is free and fills it.
        f.relayed(frame(2), 64_535, &mut ready).unwrap();
        f.relayed(frame(3), 1_000, &mut ready).unwrap();
        assert_eq!(tags(&mut ready), [1, 2]);
        assert_eq!(f.queued(), 1_000);
        // A non-DATA frame behind the waiting one keeps its place.
        f.relayed(frame(4), 0, &mut ready).unwrap();
        assert!(ready.is_empty());
        // More than containerd's idea of the room is a violation, not a longer queue.
        assert_eq!(
            f.relayed(frame(5), 1, &mut ready),
            Err(FlowError::UpstreamOverflow { sent: 1, room: 0 })
        );
        // kubelet gives back what it read: the debt first, and the waiting frames go out in order.
        assert_eq!(f.receiver_update(66_000, &mut ready).unwrap(), 65_000);
        assert_eq!(tags(&mut ready), [3, 4]);
        assert_eq!(f.queued(), 0);
        assert_eq!(f.debt(), 0);
        assert_eq!(f.window(), 66_000 - 1_000);
    }

    #[test]
    fn own_answers_wait_for_room_and_only_become_debt_when_sent() {
        let mut f = ConnFlow::default();
        let mut ready = Vec::new();
        f.relayed(frame(1), 65_535, &mut ready).unwrap();
        f.own_data(frame(2), 10, &mut ready);
        assert_eq!(tags(&mut ready), [1]);
        assert_eq!(f.debt(), 0);
        // Room that kubelet gives while pullgate owes nothing is containerd's as well.
        assert_eq!(f.receiver_update(10, &mut ready).unwrap(), 10);
        assert_eq!(tags(&mut ready), [2]);
        assert_eq!(f.debt(), 10);
        assert_eq!(f.window(), 0);
    }

    #[test]
    fn pullgates_own_waiting_answers_do_not_shrink_what_the_sender_may_send() {
        let mut f = ConnFlow::default();
        let mut ready = Vec::new();
        // kubelet's window is full of pullgate's own answer, more of which waits.
        f.own_data(frame(1), 65_535, &mut ready);
        f.own_data(frame(2), 1_000, &mut ready);
        assert_eq!(tags(&mut ready), [1]);
        // containerd knows nothing of them: it may still send its whole window, which waits too.
        f.relayed(frame(3), 65_535, &mut ready).unwrap();
        assert!(ready.is_empty());
        // kubelet's updates release the waiting frames in order; containerd gets what is not debt.
        assert_eq!(
            f.receiver_update(200_000, &mut ready).unwrap(),
            200_000 - 65_535
        );
        assert_eq!(tags(&mut ready), [2, 3]);
    }

    #[test]
    fn a_new_peer_settles_the_difference_as_debt_or_an_update() {
        // kubelet sent 51,000 bytes containerd never gave back before it went away: kubelet
        // believes 14,535 bytes are left.
        let mut f = ConnFlow::default();
        let mut ready = Vec::new();
        f.relayed(frame(1), 50_000, &mut ready).unwrap();
        f.receiver_update(0, &mut ready).unwrap();
        ready.clear();
        f.relayed(frame(2), 1_000, &mut ready).unwrap();
        assert_eq!(tags(&mut ready), [2]);
        f.clear();
        // A new containerd has 65,535: kubelet is given the 51,000 it believes it lacks.
        assert_eq!(f.new_receiver(INITIAL_WINDOW), 51_000);
        assert_eq!(f.window(), INITIAL_WINDOW);
        assert_eq!(f.debt(), 0);

        // The other way: kubelet's real window is 10,000, a new containerd believes 65,535: it may
        // send that much, and what does not fit waits until kubelet gives room.
        let mut f = ConnFlow::default();
        f.relayed(frame(1), 55_535, &mut ready).unwrap();
        ready.clear();
        assert_eq!(f.new_sender(INITIAL_WINDOW), 0);
        assert_eq!(f.debt(), 55_535);
        f.relayed(frame(3), 20_000, &mut ready).unwrap();
        assert!(ready.is_empty());
        assert_eq!(f.receiver_update(10_000, &mut ready).unwrap(), 0);
        assert_eq!(tags(&mut ready), [3]);
        // A new sender believing less than there is gets the rest at once.
        let mut f = ConnFlow::default();
        assert_eq!(f.new_sender(1_000), 64_535);
    }

    #[test]
    fn windows_never_grow_past_the_protocol_limit() {
        let mut f = ConnFlow::default();
        let mut ready = Vec::new();
        let inc = (MAX_WINDOW - INITIAL_WINDOW) as u32;
        assert_eq!(f.receiver_update(inc, &mut ready).unwrap(), inc);
        assert_eq!(
            f.receiver_update(1, &mut ready),
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
