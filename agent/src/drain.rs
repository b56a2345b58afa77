//! A graceful stop: on SIGTERM the agent ends its control session (the relay stops
//! choosing it and, with no other agent, closes the resource's port), closes its idle
//! data connections, and lets the streams under way finish for up to
//! `SLUICE_DRAIN_TIMEOUT_SECS` before cutting them.
//!
//! [`Drain`] is what the sessions share for that: the count of streams under way (over
//! every session, old ones included) and the token that cuts them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The streams under way and the switch that cuts them.
#[derive(Debug, Default, Clone)]
pub struct Drain {
    streams: Arc<Count>,
    /// Cancelled when the drain ends (or the agent stops for good): running streams are cut.
    pub cut: CancellationToken,
}

#[derive(Debug, Default)]
struct Count {
    n: AtomicUsize,
    changed: Notify,
}

/// One stream under way; dropping it ends its count.
#[must_use]
pub struct Counted(Arc<Count>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.n.fetch_sub(1, Ordering::Relaxed);
        self.0.changed.notify_waiters();
    }
}

impl Drain {
    /// Counts a stream from now until the guard drops.
    pub fn enter(&self) -> Counted {
        self.streams.n.fetch_add(1, Ordering::Relaxed);
        Counted(self.streams.clone())
    }

    /// Streams under way now.
    pub fn active(&self) -> usize {
        self.streams.n.load(Ordering::Relaxed)
    }

    /// Waits up to `deadline` for every stream to finish, logging what it does, then
    /// cuts what still runs. Returns how many streams were cut.
    pub async fn run(&self, deadline: Duration) -> usize {
        let active = self.active();
        if active > 0 {
            info!(
                active,
                "draining: {active} stream(s) active, waiting up to {} s for them to finish (no new streams: the \
                 session with the relay is closed); a second SIGTERM or Ctrl-C exits at once",
                deadline.as_secs()
            );
        }
        let started = tokio::time::Instant::now();
        let all_done = async {
            loop {
                let changed = self.streams.changed.notified();
                if self.active() == 0 {
                    return;
                }
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {
                        let left = deadline.saturating_sub(started.elapsed()).as_secs();
                        info!(active = self.active(), "draining: {} stream(s) still active, {left} s left", self.active());
                    }
                }
            }
        };
        let cut = match tokio::time::timeout(deadline, all_done).await {
            Ok(()) if active > 0 => {
                info!(secs = started.elapsed().as_secs_f64(), "drained: every stream finished; exiting");
                0
            }
            Ok(()) => 0,
            Err(_) => {
                let left = self.active();
                warn!(
                    active = left,
                    "drain deadline (SLUICE_DRAIN_TIMEOUT_SECS={}) reached: cutting {left} stream(s) still running",
                    deadline.as_secs()
                );
                left
            }
        };
        self.cut.cancel();
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_the_last_stream_then_cuts_at_the_deadline() {
        let drain = Drain::default();
        assert_eq!(drain.run(Duration::from_secs(30)).await, 0, "nothing to wait for");
        assert!(drain.cut.is_cancelled());

        let drain = Drain::default();
        let a = drain.enter();
        let b = drain.enter();
        assert_eq!(drain.active(), 2);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(a);
            tokio::time::sleep(Duration::from_secs(4)).await;
            drop(b);
        });
        let started = tokio::time::Instant::now();
        assert_eq!(drain.run(Duration::from_secs(30)).await, 0);
        assert_eq!(started.elapsed(), Duration::from_secs(7), "ends with the last stream");

        let drain = Drain::default();
        let _stuck = drain.enter();
        let started = tokio::time::Instant::now();
        assert_eq!(drain.run(Duration::from_secs(30)).await, 1, "one stream cut");
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert!(drain.cut.is_cancelled());
    }
}
