//! How many warm data connections the pool keeps: the relay's `pool_size` at rest,
//! more while streams arrive faster than the pool refills.
//!
//! A stream that finds the relay's pool empty waits for a whole TCP + TLS handshake;
//! the relay then asks for more with `OpenData`. Each such "ran dry" signal raises the
//! target by what was asked, so a burst of 16 concurrent clients finds 16 warm
//! connections from its second round on. The target falls back by one every
//! [`DECAY_EVERY`] without a dry signal, and connections above it are not replaced
//! when taken (and close after [`SURPLUS_IDLE`] unused), so a quiet agent returns to
//! its resting pool and memory. The target never exceeds [`MAX_TARGET`].

use std::time::{Duration, Instant};

/// The most warm connections one session keeps (as many as the relay parks).
pub const MAX_TARGET: u32 = 64;
/// A target above the resting size falls by one after this long without a dry signal.
pub const DECAY_EVERY: Duration = Duration::from_secs(10);
/// An idle connection above the target closes after waiting this long.
pub const SURPLUS_IDLE: Duration = Duration::from_secs(60);

/// The pool's current target size.
#[derive(Debug)]
pub struct PoolTarget {
    resting: u32,
    current: u32,
    /// When the target last changed (grew, or fell by one).
    changed: Instant,
}

impl PoolTarget {
    /// A target resting at `resting` (at least 1, at most [`MAX_TARGET`]).
    pub fn new(resting: u32, now: Instant) -> PoolTarget {
        let resting = resting.clamp(1, MAX_TARGET);
        PoolTarget { resting, current: resting, changed: now }
    }

    /// The relay ran out of idle connections and asked for `asked` more: raise the target.
    pub fn ran_dry(&mut self, asked: u32, now: Instant) {
        self.decay(now);
        self.current = self.current.saturating_add(asked.max(1)).min(MAX_TARGET);
        self.changed = now;
    }

    /// The target at `now`, after any decay due.
    pub fn current(&mut self, now: Instant) -> u32 {
        self.decay(now);
        self.current
    }

    fn decay(&mut self, now: Instant) {
        while self.current > self.resting && now.saturating_duration_since(self.changed) >= DECAY_EVERY {
            self.current -= 1;
            self.changed += DECAY_EVERY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rests_at_the_relays_size() {
        let t0 = Instant::now();
        let mut t = PoolTarget::new(4, t0);
        assert_eq!(t.current(t0 + Duration::from_secs(3600)), 4);
        assert_eq!(PoolTarget::new(0, t0).current(t0), 1, "at least one warm connection");
        assert_eq!(PoolTarget::new(1000, t0).current(t0), MAX_TARGET);
    }

    #[test]
    fn grows_by_what_the_relay_asked_for_up_to_the_cap() {
        let t0 = Instant::now();
        let mut t = PoolTarget::new(4, t0);
        for _ in 0..12 {
            t.ran_dry(1, t0);
        }
        assert_eq!(t.current(t0), 16, "a burst of 16 clients finds 16 next time");
        t.ran_dry(0, t0);
        assert_eq!(t.current(t0), 17, "a dry signal always counts");
        t.ran_dry(u32::MAX, t0);
        assert_eq!(t.current(t0), MAX_TARGET);
    }

    #[test]
    fn falls_back_one_step_per_quiet_period() {
        let t0 = Instant::now();
        let mut t = PoolTarget::new(4, t0);
        t.ran_dry(6, t0);
        assert_eq!(t.current(t0 + DECAY_EVERY - Duration::from_millis(1)), 10);
        assert_eq!(t.current(t0 + DECAY_EVERY), 9);
        assert_eq!(t.current(t0 + DECAY_EVERY * 3), 7);
        // A dry signal restarts the clock.
        t.ran_dry(1, t0 + DECAY_EVERY * 3);
        assert_eq!(t.current(t0 + DECAY_EVERY * 4 - Duration::from_millis(1)), 8);
        assert_eq!(t.current(t0 + DECAY_EVERY * 1000), 4, "never below the resting size");
    }
}
