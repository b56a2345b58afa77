//! The control session's liveness rule, without I/O: when to ping next and when the peer
//! is dead. Relay and agent run the same rule ([`Heartbeat`]); their loops only do what it
//! says.
//!
//! Each side pings every `interval`; any frame from the peer proves it alive; a peer not
//! heard from for [`MISSED_BEATS`] intervals is declared dead.
//!
//! Silence is counted only while this side was running. When the rule's own wake-up
//! comes late (the process or its runtime was starved of CPU: a loaded host, a paused
//! VM, a busy worker), the peer's frames of that time may be waiting unread in the
//! socket, so the time this side overslept is not held against the peer: the deadline
//! moves on by as much ([`Heartbeat::poll`]). A dead peer is therefore declared after
//! `MISSED_BEATS` intervals of silence plus however long this side itself could not
//! run; a peer that is really gone is still found, once this side runs again.

use std::time::Duration;

use tokio::time::Instant;

/// How many heartbeat intervals of silence make the peer dead.
pub const MISSED_BEATS: u32 = 3;

/// One side's view of a control session's liveness.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    interval: Duration,
    last_heard: Instant,
    next_ping: Instant,
    /// When the last [`Beat::WaitUntil`] asked to be woken: a later poll shows how long
    /// this side overslept.
    wake_at: Option<Instant>,
    /// Time this side overslept its wake-ups in total, not counted as silence.
    overslept: Duration,
}

/// What the session loop should do at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Nothing yet: wake again at this instant.
    WaitUntil(Instant),
    /// Send a ping now (then call [`Heartbeat::pinged`]).
    Ping,
    /// The peer has been silent for `MISSED_BEATS` intervals: end the session.
    Dead { silent_for: Duration },
}

impl Heartbeat {
    /// Starts at `now`: the peer counts as just heard, the first ping is due one interval on.
    pub fn new(interval: Duration, now: Instant) -> Self {
        let interval = interval.max(Duration::from_millis(1));
        Heartbeat { interval, last_heard: now, next_ping: now + interval, wake_at: None, overslept: Duration::ZERO }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How long a silent peer lives.
    pub fn dead_after(&self) -> Duration {
        self.interval * MISSED_BEATS
    }

    /// A frame arrived from the peer.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
    }

    /// A ping was sent at `now`.
    pub fn pinged(&mut self, now: Instant) {
        self.next_ping = now + self.interval;
    }

    /// When the peer is declared dead unless heard from before.
    pub fn deadline(&self) -> Instant {
        self.last_heard + self.dead_after()
    }

    /// Whether the peer is dead at `now`.
    pub fn is_dead(&self, now: Instant) -> bool {
        now >= self.deadline()
    }

    /// Total time this side woke later than it asked to (starved of CPU), which was not
    /// counted as the peer's silence.
    pub fn overslept(&self) -> Duration {
        self.overslept
    }

    /// What to do at `now`: declare the peer dead, ping, or wait until the next event.
    ///
    /// If `now` is later than the wake-up the previous call asked for, this side was not
    /// running in between: the difference is added to the time the peer was last heard
    /// (never past `now`), so a stall here does not make a live peer look dead, and a
    /// ping is due at once.
    pub fn poll(&mut self, now: Instant) -> Beat {
        if let Some(wake_at) = self.wake_at.take() {
            let late = now.saturating_duration_since(wake_at);
            if late > Duration::ZERO {
                self.overslept += late;
                self.last_heard = (self.last_heard + late).min(now).max(self.last_heard);
            }
        }
        if self.is_dead(now) {
            return Beat::Dead { silent_for: now - self.last_heard };
        }
        if now >= self.next_ping {
            return Beat::Ping;
        }
        let wake_at = self.next_ping.min(self.deadline());
        self.wake_at = Some(wake_at);
        Beat::WaitUntil(wake_at)
    }

    /// Runs the rule until the peer is dead: sends a ping through `ping` whenever one is
    /// due (`ping` returns false when the session cannot send any more, which ends the
    /// wait too). `heartbeat` is shared with the reader, which calls [`Heartbeat::heard`].
    pub async fn run(heartbeat: &parking_lot::Mutex<Heartbeat>, mut ping: impl FnMut() -> bool) -> Option<Duration> {
        loop {
            let now = Instant::now();
            let beat = heartbeat.lock().poll(now);
            match beat {
                Beat::Dead { silent_for } => return Some(silent_for),
                Beat::Ping => {
                    if !ping() {
                        return None;
                    }
                    heartbeat.lock().pinged(now);
                }
                Beat::WaitUntil(t) => tokio::time::sleep_until(t).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn pings_every_interval_and_declares_a_silent_peer_dead_after_three() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(S, t0);
        assert_eq!(hb.poll(t0), Beat::WaitUntil(t0 + S));
        assert_eq!(hb.poll(t0 + S), Beat::Ping);
        hb.pinged(t0 + S);
        assert_eq!(hb.poll(t0 + S), Beat::WaitUntil(t0 + 2 * S));
        assert_eq!(hb.poll(t0 + 2 * S), Beat::Ping);
        hb.pinged(t0 + 2 * S);
        assert_eq!(hb.poll(t0 + 2 * S), Beat::WaitUntil(t0 + 3 * S));
        assert!(!hb.is_dead(t0 + 3 * S - Duration::from_millis(1)));
        assert_eq!(hb.poll(t0 + 3 * S), Beat::Dead { silent_for: 3 * S });
    }

    #[tokio::test(start_paused = true)]
    async fn time_this_side_overslept_is_not_the_peers_silence() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(S, t0);
        assert_eq!(hb.poll(t0), Beat::WaitUntil(t0 + S));
        // Asked to wake at 1 s, woken at 10 s: a starved runtime, not a silent peer (its
        // pings may be sitting unread in the socket). Ping now; the reader gets its turn.
        assert_eq!(hb.poll(t0 + 10 * S), Beat::Ping);
        assert_eq!(hb.overslept(), 9 * S);
        hb.pinged(t0 + 10 * S);
        assert_eq!(hb.deadline(), t0 + 12 * S, "3 s of silence counted from 9 s (0 s + 9 s overslept)");
        // A frame read right after the stall proves the peer alive as usual.
        hb.heard(t0 + 10 * S);
        assert_eq!(hb.poll(t0 + 10 * S), Beat::WaitUntil(t0 + 11 * S));
        // A peer that really went silent is still declared dead, 3 s of running later.
        hb.pinged(t0 + 11 * S);
        assert_eq!(hb.poll(t0 + 11 * S), Beat::WaitUntil(t0 + 12 * S));
        hb.pinged(t0 + 12 * S);
        assert_eq!(hb.poll(t0 + 12 * S), Beat::WaitUntil(t0 + 13 * S));
        assert_eq!(hb.poll(t0 + 13 * S), Beat::Dead { silent_for: 3 * S });
    }

    #[tokio::test(start_paused = true)]
    async fn waking_on_time_counts_every_second_of_silence() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(S, t0);
        for i in 1..3 {
            assert_eq!(hb.poll(t0 + (i - 1) * S), Beat::WaitUntil(t0 + i * S));
            assert_eq!(hb.poll(t0 + i * S), Beat::Ping);
            hb.pinged(t0 + i * S);
        }
        assert_eq!(hb.poll(t0 + 2 * S), Beat::WaitUntil(t0 + 3 * S));
        assert_eq!(hb.poll(t0 + 3 * S), Beat::Dead { silent_for: 3 * S });
        assert_eq!(hb.overslept(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn any_frame_from_the_peer_moves_the_deadline() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(S, t0);
        hb.heard(t0 + 2 * S);
        assert_eq!(hb.deadline(), t0 + 5 * S);
        assert!(!hb.is_dead(t0 + 4 * S));
        // A late report of an earlier frame never moves the deadline back.
        hb.heard(t0 + S);
        assert_eq!(hb.deadline(), t0 + 5 * S);
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_pings_on_time_and_ends_when_the_peer_goes_silent() {
        let hb = parking_lot::Mutex::new(Heartbeat::new(S, Instant::now()));
        let start = Instant::now();
        let mut pings = Vec::new();
        let silent = Heartbeat::run(&hb, || {
            pings.push(Instant::now() - start);
            true
        })
        .await;
        assert_eq!(silent, Some(3 * S));
        assert_eq!(pings, vec![S, 2 * S], "one ping per interval until declared dead at 3 s");
        assert_eq!(Instant::now() - start, 3 * S);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_keeps_talking_lives() {
        let hb = parking_lot::Mutex::new(Heartbeat::new(S, Instant::now()));
        let talker = async {
            for _ in 0..10 {
                tokio::time::sleep(2 * S).await;
                hb.lock().heard(Instant::now());
            }
        };
        tokio::select! {
            _ = talker => {}
            r = Heartbeat::run(&hb, || true) => panic!("declared dead after {r:?}"),
        }
    }
}
