//! How the relay's listeners admit connections without letting peers exhaust it: a
//! [`Gate`] caps the connections a listener holds at once, an [`AcceptBackoff`] paces an
//! accept loop that hits an error (out of file descriptors) instead of spinning, a
//! [`Throttle`] keeps a flood from becoming one log line per connection, [`Watched`]
//! notices a connection on which nothing moves, and [`raise_fd_limit`] gives the relay
//! all the descriptors its host allows at start.
//!
//! The caps themselves are flags ([`crate::limits::Limits`]); this module only enforces.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::limits::Limits;

/// Caps the connections one listener (or one resource) holds at once.
#[derive(Clone)]
pub struct Gate {
    listener: &'static str,
    slots: Arc<Semaphore>,
}

/// One admitted connection; its slot is free again when this drops.
pub struct Slot {
    listener: &'static str,
    _permit: OwnedSemaphorePermit,
}

impl Gate {
    /// A gate for `cap` connections of `listener` (`admin`, `agent`, `resource`: the
    /// label of `sluice_relay_connections_active`).
    pub fn new(listener: &'static str, cap: u32) -> Gate {
        Gate { listener, slots: Arc::new(Semaphore::new(cap as usize)) }
    }

    /// A slot for one more connection, or `None` when all are taken.
    pub fn try_admit(&self) -> Option<Slot> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        crate::metrics::connections_active(self.listener, 1.0);
        Some(Slot { listener: self.listener, _permit: permit })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        crate::metrics::connections_active(self.listener, -1.0);
    }
}

/// Lets one log line through per period and counts the ones it held back.
pub struct Throttle {
    every: Duration,
    state: std::sync::Mutex<ThrottleState>,
}

struct ThrottleState {
    last: Option<std::time::Instant>,
    held_back: u64,
}

impl Throttle {
    /// At most one line per `every`.
    pub const fn new(every: Duration) -> Throttle {
        Throttle { every, state: std::sync::Mutex::new(ThrottleState { last: None, held_back: 0 }) }
    }

    /// `Some(n)` when a line is due now, `n` being the events held back since the last
    /// line; `None` (and one more held back) otherwise.
    pub fn due(&self) -> Option<u64> {
        self.due_at(std::time::Instant::now())
    }

    fn due_at(&self, now: std::time::Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.last.is_some_and(|last| now.saturating_duration_since(last) < self.every) {
            s.held_back += 1;
            return None;
        }
        s.last = Some(now);
        Some(std::mem::take(&mut s.held_back))
    }
}

/// How often a flood of refusals or accept errors is logged, per kind of listener.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Logs a refusal over a cap through `throttle`: what happened, how often, what to do.
pub fn log_refusal(throttle: &Throttle, what: &str, cap: u32, flag: &str) {
    if let Some(held_back) = throttle.due() {
        warn!(
            cap,
            refused_since_last_line = held_back,
            "{what}: {cap} are open (the cap, {flag}); new ones are closed at once. If this is not an attack, \
             raise {flag}; see sluice_relay_connections_refused_total"
        );
    }
}

/// The wait after a failed `accept`: 100 ms, doubling to 1 s, back to 100 ms after a
/// success. Errors such as "too many open files" repeat at once, so retrying without a
/// pause would spin a core and fill the log.
#[derive(Debug)]
pub struct AcceptBackoff {
    next: Duration,
}

impl AcceptBackoff {
    pub const FIRST: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(1);

    pub fn new() -> AcceptBackoff {
        AcceptBackoff { next: Self::FIRST }
    }

    /// The wait after one more failure.
    pub fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        wait
    }

    pub fn succeeded(&mut self) {
        self.next = Self::FIRST;
    }

    /// After a failed accept on `listener`: counts it, logs it through `throttle` with
    /// what to do, and waits the next backoff step.
    pub async fn after_error(&mut self, listener: &'static str, e: &std::io::Error, throttle: &Throttle) {
        crate::metrics::accept_failed(listener);
        let wait = self.failed();
        if let Some(held_back) = throttle.due() {
            warn!(listener, error = %e, failures_since_last_line = held_back, retry_in = ?wait,
                "accepting a connection failed: {}", accept_error_advice(e));
        }
        tokio::time::sleep(wait).await;
    }
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self::new()
    }
}

/// What an operator should do about an accept error, by its kind.
fn accept_error_advice(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EMFILE) => {
            "the relay is out of file descriptors; raise its limit (systemd LimitNOFILE=, docker --ulimit nofile=, \
             or ulimit -n) or lower --admin-max-connections, --agent-max-handshakes and --max-streams-per-resource; \
             the relay retries, backing off to 1 s"
        }
        Some(libc::ENFILE) => {
            "the host is out of file descriptors (sysctl fs.file-max); find the process holding them; the relay \
             retries, backing off to 1 s"
        }
        Some(libc::ENOBUFS) | Some(libc::ENOMEM) => {
            "the kernel is out of memory for sockets; the relay retries, backing off to 1 s"
        }
        _ => "the relay retries, backing off to 1 s",
    }
}

/// A connection that records when a byte last moved either way.
pub struct Watched<T> {
    inner: T,
    activity: Activity,
}

/// When a [`Watched`] connection last moved a byte.
#[derive(Clone)]
pub struct Activity {
    born: Instant,
    /// Milliseconds after `born`.
    last: Arc<AtomicU64>,
}

impl<T> Watched<T> {
    pub fn new(inner: T) -> (Watched<T>, Activity) {
        let activity = Activity { born: Instant::now(), last: Arc::new(AtomicU64::new(0)) };
        (Watched { inner, activity: activity.clone() }, activity)
    }
}

impl Activity {
    fn touch(&self) {
        self.last.store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Completes once nothing has moved for `limit`.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let deadline = self.born + Duration::from_millis(self.last.load(Ordering::Relaxed)) + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The process's descriptor limit, before and after [`raise_fd_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (as most servers do: the soft
/// default, often 1024, is for programs that use `select`).
pub fn raise_fd_limit() -> std::io::Result<FdLimit> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let soft_before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct we own; raising soft up to hard needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok(FdLimit { soft_before, soft: lim.rlim_cur, hard: lim.rlim_max })
}

/// At start: raises the descriptor limit, logs it, and warns when the caps in `limits`
/// with `resources` resources could need more descriptors than the limit allows.
pub fn reserve_descriptors(limits: &Limits, resources: usize) {
    let budget = limits.fd_budget(resources);
    match raise_fd_limit() {
        Ok(lim) => {
            info!(
                soft = lim.soft,
                hard = lim.hard,
                raised_from = lim.soft_before,
                caps_need = budget,
                "file descriptor limit (RLIMIT_NOFILE)"
            );
            if let Some(advice) = budget_advice(budget, lim.soft) {
                warn!(limit = lim.soft, caps_need = budget, resources, "{advice}");
            }
        }
        Err(e) => warn!(error = %e, "could not read or raise the file descriptor limit (RLIMIT_NOFILE)"),
    }
}

/// What to say when the caps need more descriptors than `limit`; `None` when they fit.
fn budget_advice(budget: u64, limit: u64) -> Option<String> {
    (budget > limit).then(|| {
        format!(
            "the connection caps could need {budget} file descriptors but the relay may open {limit}: at the caps, \
             accepts would fail with \"too many open files\"; raise the limit (systemd LimitNOFILE=, docker \
             --ulimit nofile=, ulimit -n) or lower --admin-max-connections, --agent-max-handshakes or \
             --max-streams-per-resource"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_one_second_and_resets() {
        let mut b = AcceptBackoff::new();
        let waits: Vec<u64> = (0..7).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_millis(100));
    }

    #[test]
    fn throttle_lets_one_line_through_per_period_and_counts_the_rest() {
        let t = Throttle::new(Duration::from_secs(10));
        let t0 = std::time::Instant::now();
        assert_eq!(t.due_at(t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(t.due_at(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(t.due_at(t0 + Duration::from_secs(10)), Some(1000), "the next line says how many were held back");
        assert_eq!(t.due_at(t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn gate_admits_up_to_its_cap() {
        let g = Gate::new("test", 2);
        let a = g.try_admit().unwrap();
        let _b = g.try_admit().unwrap();
        assert!(g.try_admit().is_none());
        drop(a);
        assert!(g.try_admit().is_some(), "a slot is free again when its connection ends");
    }

    #[test]
    fn accept_errors_say_what_to_do() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert!(accept_error_advice(&emfile).contains("LimitNOFILE"));
        let enfile = std::io::Error::from_raw_os_error(libc::ENFILE);
        assert!(accept_error_advice(&enfile).contains("fs.file-max"));
    }

    #[test]
    fn budget_over_the_limit_is_explained() {
        assert_eq!(budget_advice(1000, 1024), None);
        let advice = budget_advice(5000, 1024).unwrap();
        assert!(advice.contains("5000") && advice.contains("1024") && advice.contains("LimitNOFILE"), "{advice}");
    }

    #[test]
    fn raising_the_limit_keeps_it_within_the_hard_limit() {
        let lim = raise_fd_limit().unwrap();
        assert_eq!(lim.soft, lim.hard);
        assert!(lim.soft >= lim.soft_before);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_is_measured_from_the_last_byte() {
        let (a, mut b) = tokio::io::duplex(64);
        let (mut a, activity) = Watched::new(a);
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(5)).await;
        b.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        a.read_exact(&mut one).await.unwrap();
        activity.idle_for(Duration::from_secs(10)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(15));
    }
}
