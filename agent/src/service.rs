//! Is the private service up? The agent's view of `APP_HOST:APP_PORT`, reported to the
//! relay so operators can tell "agent connected, service reachable" from "agent
//! connected, service refusing".
//!
//! Two sources feed one [`ServiceHealth`]: every stream's connect to the service (free:
//! it happens anyway), and a cheap TCP connect probe at start and then every
//! `SLUICE_SERVICE_CHECK_SECS` (default 30 s) — skipped while streams prove the service
//! up, so a busy database sees no extra connections. The probe opens and closes a TCP
//! connection without sending a byte, bounded by a 5 s timeout.

use std::time::Duration;

use tokio::time::Instant;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the agent knows about the service now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceState {
    /// `None` until the first connection attempt finished.
    pub reachable: Option<bool>,
    /// The last connection error while unreachable.
    pub error: Option<String>,
}

/// The service's reachability, shared by the probe, the streams and the control sessions.
pub struct ServiceHealth {
    target: String,
    state: watch::Sender<ServiceState>,
    last_ok: Mutex<Option<Instant>>,
}

impl ServiceHealth {
    pub fn new(target: String) -> Self {
        ServiceHealth { target, state: watch::Sender::new(ServiceState::default()), last_ok: Mutex::new(None) }
    }

    /// `host:port` of the service.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Follows changes (control sessions report each one to the relay).
    pub fn subscribe(&self) -> watch::Receiver<ServiceState> {
        self.state.subscribe()
    }

    #[cfg(test)]
    pub fn current(&self) -> ServiceState {
        self.state.borrow().clone()
    }

    /// A connection to the service succeeded.
    pub fn record_ok(&self) {
        *self.last_ok.lock() = Some(Instant::now());
        self.state.send_if_modified(|s| {
            if s.reachable == Some(true) {
                return false;
            }
            info!(service = %self.target, "the private service accepts connections");
            *s = ServiceState { reachable: Some(true), error: None };
            true
        });
    }

    /// A connection to the service failed with `error`.
    pub fn record_error(&self, error: String) {
        self.state.send_if_modified(|s| {
            let was = s.reachable;
            if was == Some(false) && s.error.as_deref() == Some(error.as_str()) {
                return false;
            }
            if was != Some(false) {
                warn!(service = %self.target, %error, "the private service does not accept connections");
            }
            *s = ServiceState { reachable: Some(false), error: Some(error.clone()) };
            true
        });
    }

    /// Whether a stream proved the service up within `within`.
    fn recently_ok(&self, within: Duration) -> bool {
        self.last_ok.lock().is_some_and(|t| t.elapsed() < within)
    }

    /// One probe: open a TCP connection and close it.
    pub async fn probe(&self) {
        match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(&self.target)).await {
            Ok(Ok(_)) => self.record_ok(),
            Ok(Err(e)) => self.record_error(format!("cannot connect to {}: {e}", self.target)),
            Err(_) => self.record_error(format!("connecting to {} timed out after {PROBE_TIMEOUT:?}", self.target)),
        }
    }

    /// Probes at start, then every `interval` unless streams showed the service up
    /// meanwhile; `None` probes only at start. Ends with `stop`.
    pub async fn watch(&self, interval: Option<Duration>, stop: CancellationToken) {
        self.probe().await;
        let Some(interval) = interval else { return };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.cancelled() => return,
            }
            if !self.recently_ok(interval) {
                self.probe().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probe_sees_a_listener_come_and_go() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = ServiceHealth::new(addr.to_string());
        let mut rx = h.subscribe();
        assert_eq!(h.current().reachable, None);
        h.probe().await;
        assert_eq!(h.current(), ServiceState { reachable: Some(true), error: None });
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        drop(l);
        h.probe().await;
        let s = h.current();
        assert_eq!(s.reachable, Some(false));
        assert!(s.error.unwrap().contains("refused"), "names the error");
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        // The same error again is no change: nothing new to report.
        h.probe().await;
        assert!(!rx.has_changed().unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn streams_that_prove_the_service_up_spare_the_probe() {
        let h = ServiceHealth::new("127.0.0.1:9".into());
        h.record_ok();
        assert!(h.recently_ok(Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(!h.recently_ok(Duration::from_secs(30)));
        h.record_error("x".into());
        assert_eq!(h.current().reachable, Some(false));
    }
}
