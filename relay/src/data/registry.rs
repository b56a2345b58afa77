//! The relay's live view of connected agents: which [`AgentSession`]s serve which
//! resource, their pools of idle data connections, and each resource's listener and
//! port state.
//!
//! A resource's port listens exactly while at least one agent session of it is up, so a
//! platform job connecting to a resource with no agent gets "connection refused" at once
//! instead of hanging. When the port cannot be bound (another process holds it), its
//! [`PortState`] says why, so `sluice resources list` shows `PORT_BLOCKED` instead of a
//! false `AVAILABLE`; the state is forgotten with the resource's last session.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sluice_proto::identity::{AgentId, ResourceId, SessionId};
use sluice_proto::wire::{RejectCode, Rejection, RelayMsg};
use tokio::sync::{Notify, mpsc};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

/// A data connection from an agent, handshaken and bound to its session, waiting for a stream.
pub type DataConn = tokio_rustls::server::TlsStream<sluice_datapath::TunnelSocket>;

/// Idle data connections a session may park at the relay; more are closed on arrival.
const MAX_IDLE_PER_SESSION: usize = 64;

/// What an agent said about itself when its session started, and where it came from.
#[derive(Debug, Clone, Default)]
pub struct SessionInfo {
    pub hostname: String,
    pub agent_version: String,
    pub peer: Option<std::net::SocketAddr>,
    pub capabilities: sluice_proto::wire::Capabilities,
}

/// The private service as the agent last reported it (`None`: not reported yet, e.g. an
/// older agent).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceReport {
    pub reachable: Option<bool>,
    /// The last connection error the agent saw, when not reachable.
    pub error: Option<String>,
    /// When the report arrived (seconds since the epoch).
    pub at: u64,
}

/// One connected agent's control session and its idle data connections.
pub struct AgentSession {
    pub id: SessionId,
    pub agent_id: AgentId,
    pub resource_id: ResourceId,
    pub generation: u64,
    pub hostname: String,
    pub info: SessionInfo,
    /// When the session came up (seconds since the epoch).
    pub connected_at: u64,
    /// The private service's reachability as the agent reports it.
    pub service: Mutex<ServiceReport>,
    pub started: Instant,
    pool: Mutex<VecDeque<DataConn>>,
    pool_ready: Notify,
    control: mpsc::UnboundedSender<RelayMsg>,
    /// Cancelled when the session ends for any reason.
    pub closed: CancellationToken,
    /// Cancelled when the agent's credentials are revoked: its streams are cut too.
    pub revoked: CancellationToken,
    pub active_streams: AtomicUsize,
}

impl AgentSession {
    pub fn new(
        id: SessionId,
        agent_id: AgentId,
        resource_id: ResourceId,
        generation: u64,
        info: SessionInfo,
        control: mpsc::UnboundedSender<RelayMsg>,
    ) -> Self {
        AgentSession {
            id,
            agent_id,
            resource_id,
            generation,
            hostname: info.hostname.clone(),
            info,
            connected_at: sluice_proto::identity::unix_now(),
            service: Mutex::new(ServiceReport::default()),
            started: Instant::now(),
            pool: Mutex::new(VecDeque::new()),
            pool_ready: Notify::new(),
            control,
            closed: CancellationToken::new(),
            revoked: CancellationToken::new(),
            active_streams: AtomicUsize::new(0),
        }
    }

    /// Parks an idle data connection; closes it instead (false) if the pool is full or
    /// the session is over.
    pub fn park(&self, conn: DataConn) -> bool {
        let mut pool = self.pool.lock();
        if pool.len() >= MAX_IDLE_PER_SESSION || self.closed.is_cancelled() {
            return false;
        }
        pool.push_back(conn);
        drop(pool);
        self.pool_ready.notify_one();
        true
    }

    fn take(&self) -> Option<DataConn> {
        self.pool.lock().pop_front()
    }

    /// Sends a control message; false if the session's writer is gone.
    pub fn send(&self, msg: RelayMsg) -> bool {
        self.control.send(msg).is_ok()
    }

    /// Ends the session (and drops its idle data connections).
    pub fn close(&self) {
        self.closed.cancel();
        self.pool.lock().clear();
    }
}

/// Whether a resource's port listens (kept while the resource has a live session).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PortState {
    /// Not tried yet (the first bind is under way).
    #[default]
    Binding,
    /// Listening: platform jobs can connect.
    Listening,
    /// Binding failed; the relay retries. The text says what happened and what to do.
    Blocked(String),
}

/// A resource's live state: its agent sessions and, while any is up, its listener.
#[derive(Default)]
struct ResourceLive {
    sessions: Vec<Arc<AgentSession>>,
    listener: Option<AbortHandle>,
    port: PortState,
}

/// Why no data connection could be had for a stream.
#[derive(Debug, thiserror::Error)]
pub enum NoDataConn {
    #[error("no agent of this resource is connected")]
    NoAgent,
    #[error("no agent offered a data connection within {0:?}")]
    Timeout(Duration),
}

/// All live sessions, by resource and by session id.
#[derive(Default)]
pub struct Registry {
    resources: Mutex<HashMap<ResourceId, ResourceLive>>,
    sessions: Mutex<HashMap<SessionId, Arc<AgentSession>>>,
    round_robin: AtomicU64,
}

impl Registry {
    /// Adds a session. Returns true if it is the resource's first (its listener must start).
    pub fn add(&self, s: Arc<AgentSession>) -> bool {
        self.sessions.lock().insert(s.id.clone(), s.clone());
        let mut res = self.resources.lock();
        let live = res.entry(s.resource_id.clone()).or_default();
        live.sessions.push(s);
        live.sessions.len() == 1 && live.listener.is_none()
    }

    /// Records the task serving the resource's port, so it can be stopped with the last session.
    pub fn set_listener(&self, resource_id: &str, handle: AbortHandle) {
        let mut res = self.resources.lock();
        match res.get_mut(resource_id) {
            Some(live) if !live.sessions.is_empty() => live.listener = Some(handle),
            _ => handle.abort(), // the last session went away meanwhile
        }
    }

    /// Records whether the resource's port listens; ignored once its last session is gone.
    pub fn set_port_state(&self, resource_id: &str, state: PortState) {
        if let Some(live) = self.resources.lock().get_mut(resource_id) {
            live.port = state;
        }
    }

    /// The port state of a resource with a live session (`None` without one).
    pub fn port_state(&self, resource_id: &str) -> Option<PortState> {
        self.resources.lock().get(resource_id).map(|l| l.port.clone())
    }

    /// Removes a session and closes it; stops the resource's listener with its last session.
    pub fn remove(&self, s: &AgentSession) {
        s.close();
        self.sessions.lock().remove(&s.id);
        let mut res = self.resources.lock();
        if let Some(live) = res.get_mut(&s.resource_id) {
            live.sessions.retain(|x| x.id != s.id);
            if live.sessions.is_empty() {
                if let Some(l) = live.listener.take() {
                    l.abort();
                }
                res.remove(&s.resource_id);
            }
        }
    }

    pub fn session(&self, id: &str) -> Option<Arc<AgentSession>> {
        self.sessions.lock().get(id).cloned()
    }

    /// Every live session, oldest first.
    pub fn all_sessions(&self) -> Vec<Arc<AgentSession>> {
        let mut all: Vec<_> = self.sessions.lock().values().cloned().collect();
        all.sort_by_key(|s| s.started);
        all
    }

    /// Other live sessions of the same agent identity (a copied STATE_DIR, or a second
    /// process started with the same state).
    pub fn twins_of(&self, s: &AgentSession) -> Vec<Arc<AgentSession>> {
        self.sessions.lock().values().filter(|x| x.agent_id == s.agent_id && x.id != s.id).cloned().collect()
    }

    pub fn sessions_of(&self, resource_id: &str) -> Vec<Arc<AgentSession>> {
        self.resources.lock().get(resource_id).map(|l| l.sessions.clone()).unwrap_or_default()
    }

    /// Cuts off every session of `resource_id` whose generation is below `min_generation`
    /// (all of them for `None`, when the resource is deleted), including their streams.
    pub fn revoke(&self, resource_id: &str, min_generation: Option<u64>, why: &str) -> usize {
        let victims: Vec<_> = self
            .sessions_of(resource_id)
            .into_iter()
            .filter(|s| min_generation.is_none_or(|g| s.generation < g))
            .collect();
        for s in &victims {
            s.send(RelayMsg::Rejected(Rejection { code: RejectCode::RevokedCertificate, message: why.to_owned() }));
            s.revoked.cancel();
            self.remove(s);
        }
        victims.len()
    }

    /// Takes an idle data connection of some live session of the resource, spreading
    /// streams across agents; asks an agent for more and waits when none is idle.
    pub async fn take_data_conn(
        &self,
        resource_id: &str,
        wait: Duration,
    ) -> Result<(Arc<AgentSession>, DataConn), NoDataConn> {
        let deadline = Instant::now() + wait;
        loop {
            let sessions = self.sessions_of(resource_id);
            if sessions.is_empty() {
                return Err(NoDataConn::NoAgent);
            }
            let start = self.round_robin.fetch_add(1, Ordering::Relaxed) as usize;
            let n = sessions.len();
            for i in 0..n {
                let s = &sessions[(start + i) % n];
                if let Some(c) = s.take() {
                    return Ok((s.clone(), c));
                }
            }
            // None idle: ask one agent (in turn) for a connection and wait for any to arrive.
            let s = sessions[start % n].clone();
            let notified = s.pool_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(c) = s.take() {
                return Ok((s.clone(), c));
            }
            s.send(RelayMsg::OpenData { count: 1 });
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NoDataConn::Timeout(wait));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = s.closed.cancelled() => {}
                _ = tokio::time::sleep(left.min(Duration::from_millis(500))) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str, resource: &str) -> Arc<AgentSession> {
        let (tx, _rx) = mpsc::unbounded_channel();
        Arc::new(AgentSession::new(
            id.into(),
            format!("agt_{id}").into(),
            resource.into(),
            1,
            SessionInfo { hostname: "host".into(), ..Default::default() },
            tx,
        ))
    }

    #[test]
    fn port_state_lives_and_dies_with_the_resources_sessions() {
        let reg = Registry::default();
        let (a, b) = (session("a", "res_1"), session("b", "res_1"));
        assert!(reg.add(a.clone()), "the first session starts the port");
        assert!(!reg.add(b.clone()));
        assert_eq!(reg.port_state("res_1"), Some(PortState::Binding));
        reg.set_port_state("res_1", PortState::Blocked("in use".into()));
        reg.remove(&a);
        assert_eq!(reg.port_state("res_1"), Some(PortState::Blocked("in use".into())), "one session is left");
        reg.remove(&b);
        assert_eq!(reg.port_state("res_1"), None, "forgotten with the last session");
        reg.set_port_state("res_1", PortState::Listening);
        assert_eq!(reg.port_state("res_1"), None, "a late report of a stopped port task is ignored");
    }
}
