//! The relay's live view of connected agents: which [`AgentSession`]s serve which
//! resource, their pools of idle data connections, and each resource's listener and
//! port state.
//!
//! A resource's port listens exactly while at least one agent session of it is up, so a
//! platform job connecting to a resource with no agent gets "connection refused" at once
//! instead of hanging. When the port cannot be bound (another process holds it), its
//! [`PortState`] says why, so `sluice resources list` shows `PORT_BLOCKED` instead of a
//! false `AVAILABLE`; the state is forgotten with the resource's last session.
//!
//! A session whose agent stalls (stopped, frozen, cut off while its TCP connections stay
//! open) is marked so by the stream that found it out ([`Liveness`]): it gets no new
//! streams while another session of the resource answers, until any frame from it
//! proves it alive again — long before the heartbeat would declare it dead.

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
use tracing::{debug, info, warn};

/// A data connection from an agent, handshaken and bound to its session, waiting for a stream.
pub type DataConn = tokio_rustls::server::TlsStream<sluice_datapath::TunnelSocket>;

/// Idle data connections a session may park at the relay; more are closed on arrival.
const MAX_IDLE_PER_SESSION: usize = 64;

/// The `seq` of the pings sent to probe an agent slow to answer a stream's open (the heartbeat's
/// own pings count from 1); the agent's answer counts as any frame does.
const PROBE_SEQ: u64 = 0;

/// What the relay knows of whether an agent answers, without I/O: when it was last
/// heard on its control session (any frame), the probe (ping) sent when a stream's open
/// last waited half its deadline, and whether it is marked stalled — it left a stream's open and that probe
/// unanswered past the stream-open deadline.
#[derive(Debug, Clone)]
pub struct Liveness {
    last_heard: Instant,
    probe_sent: Option<Instant>,
    stalled_since: Option<Instant>,
}

impl Liveness {
    /// A session that came up at `now` (its hello was just heard).
    pub fn new(now: Instant) -> Self {
        Liveness { last_heard: now, probe_sent: None, stalled_since: None }
    }

    /// A frame arrived at `now`; true if it ends a stall (the agent answers again).
    pub fn heard(&mut self, now: Instant) -> bool {
        self.last_heard = self.last_heard.max(now);
        match self.stalled_since {
            Some(since) if now >= since => {
                self.stalled_since = None;
                true
            }
            _ => false,
        }
    }

    /// The probe a stream opened at `now` relies on: the one still unanswered if there
    /// is one, else a new one (`true`: send a ping now). One ping in flight at most, so a
    /// burst of streams costs one ping.
    pub fn probe(&mut self, now: Instant) -> (Instant, bool) {
        match self.probe_sent {
            Some(sent) if sent > self.last_heard => (sent, false),
            _ => {
                self.probe_sent = Some(now);
                (now, true)
            }
        }
    }

    /// Whether the agent said anything at or after `since`.
    pub fn heard_since(&self, since: Instant) -> bool {
        self.last_heard >= since
    }

    /// Marks the agent stalled at `now`; true if it was not already.
    pub fn stall(&mut self, now: Instant) -> bool {
        let news = self.stalled_since.is_none();
        self.stalled_since.get_or_insert(now);
        news
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled_since.is_some()
    }
}

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
    /// Whether the agent answers (fed by the control session's reader).
    liveness: Mutex<Liveness>,
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
            liveness: Mutex::new(Liveness::new(Instant::now())),
        }
    }

    /// A frame arrived on the control session: the agent is alive (and takes new streams
    /// again if it was marked stalled).
    pub fn heard(&self) {
        if self.liveness.lock().heard(Instant::now()) {
            info!(agent = %self.agent_id, session = %self.id, "the stalled agent answers again: it takes new streams again");
        }
    }

    /// Called when a stream's open has waited half its deadline for this agent: makes
    /// sure a ping is on its way and returns when it was sent. If the agent has said nothing since
    /// ([`AgentSession::answered_since`]) when the open's deadline passes, it is stalled.
    pub fn probe(&self) -> Instant {
        let (sent, send_now) = self.liveness.lock().probe(Instant::now());
        if send_now {
            crate::metrics::stream_probe(&self.resource_id);
            self.send(RelayMsg::Ping { seq: PROBE_SEQ });
        }
        sent
    }

    /// Whether the agent said anything on its control session at or after `since`.
    pub fn answered_since(&self, since: Instant) -> bool {
        self.liveness.lock().heard_since(since)
    }

    /// Marks the agent stalled: while another session of its resource answers, it gets
    /// no new streams, until it is heard from again. Logs the first mark.
    pub fn mark_stalled(&self, waited: Duration) {
        if self.liveness.lock().stall(Instant::now()) {
            crate::metrics::agent_stalled(&self.resource_id);
            warn!(agent = %self.agent_id, session = %self.id, hostname = %self.hostname, ?waited,
                "the agent answers neither a new stream nor a ping: it may be stopped, frozen or cut off; \
                 new streams go to the resource's other agents until it answers again (it is declared dead \
                 if it stays silent for three heartbeats)");
        }
    }

    /// True while the agent is marked stalled.
    pub fn is_stalled(&self) -> bool {
        self.liveness.lock().is_stalled()
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

    /// The oldest idle connection still open; ones the agent closed while they waited
    /// (it trims its surplus after a burst) are dropped on the way.
    fn take(&self) -> Option<DataConn> {
        let mut pool = self.pool.lock();
        while let Some(conn) = pool.pop_front() {
            if !sluice_datapath::idle_connection_gone(conn.get_ref().0.tcp()) {
                return Some(conn);
            }
            debug!(session = %self.id, "an idle data connection was closed by the agent; dropped");
        }
        None
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
    #[error("every agent of this resource carries {0} streams, the relay's limit (--max-streams-per-agent)")]
    Busy(usize),
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

    /// Whether the resource has a session other than `than` that is not marked stalled:
    /// somewhere a stream can move to.
    pub fn has_answering_other(&self, resource_id: &str, than: &SessionId) -> bool {
        self.sessions_of(resource_id).iter().any(|s| s.id != *than && !s.is_stalled())
    }

    /// The sessions a new stream may go to: all but `avoid`, and of those only the ones
    /// not marked stalled while any such is left (a resource whose agents all look
    /// stalled still gets its streams tried).
    fn candidates(
        &self,
        resource_id: &str,
        avoid: Option<&SessionId>,
        max_per_session: usize,
    ) -> Result<Vec<Arc<AgentSession>>, NoDataConn> {
        let mut sessions = self.sessions_of(resource_id);
        sessions.retain(|s| Some(&s.id) != avoid);
        if sessions.is_empty() {
            return Err(NoDataConn::NoAgent);
        }
        sessions.retain(|s| s.active_streams.load(Ordering::Relaxed) < max_per_session);
        if sessions.is_empty() {
            return Err(NoDataConn::Busy(max_per_session));
        }
        if sessions.iter().any(|s| !s.is_stalled()) {
            sessions.retain(|s| !s.is_stalled());
        }
        Ok(sessions)
    }

    /// Takes an idle data connection of some live session of the resource (never of
    /// `avoid`, preferring agents not marked stalled, only agents carrying fewer than
    /// `max_per_session` streams), from the agent with the fewest active streams first;
    /// asks an agent for more and waits when none is idle.
    pub async fn take_data_conn(
        &self,
        resource_id: &str,
        wait: Duration,
        avoid: Option<&SessionId>,
        max_per_session: usize,
    ) -> Result<(Arc<AgentSession>, DataConn), NoDataConn> {
        let deadline = Instant::now() + wait;
        loop {
            let sessions = least_active_first(
                self.candidates(resource_id, avoid, max_per_session)?,
                self.round_robin.fetch_add(1, Ordering::Relaxed) as usize,
            );
            for s in &sessions {
                if let Some(c) = s.take() {
                    return Ok((s.clone(), c));
                }
            }
            // None idle: ask the least busy agent for a connection and wait for any to arrive.
            let s = sessions[0].clone();
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

/// `sessions` ordered by active streams, fewest first; sessions with equal counts take
/// turns (rotated by `turn`), so an idle group still spreads its streams.
fn least_active_first(mut sessions: Vec<Arc<AgentSession>>, turn: usize) -> Vec<Arc<AgentSession>> {
    let n = sessions.len();
    if n > 1 {
        sessions.rotate_left(turn % n);
    }
    sessions.sort_by_key(|s| s.active_streams.load(Ordering::Relaxed));
    sessions
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
    fn new_streams_go_to_the_agent_with_the_fewest_and_ties_take_turns() {
        let (a, b, c) = (session("a", "res"), session("b", "res"), session("c", "res"));
        a.active_streams.store(5, Ordering::Relaxed);
        b.active_streams.store(1, Ordering::Relaxed);
        c.active_streams.store(3, Ordering::Relaxed);
        let ids = |v: Vec<Arc<AgentSession>>| v.iter().map(|s| s.id.to_string()).collect::<Vec<_>>();
        for turn in 0..3 {
            assert_eq!(ids(least_active_first(vec![a.clone(), b.clone(), c.clone()], turn)), ["b", "c", "a"]);
        }
        b.active_streams.store(0, Ordering::Relaxed);
        c.active_streams.store(0, Ordering::Relaxed);
        let firsts: std::collections::HashSet<_> =
            (0..4).map(|t| ids(least_active_first(vec![a.clone(), b.clone(), c.clone()], t))[0].clone()).collect();
        assert_eq!(firsts, ["b".to_owned(), "c".to_owned()].into(), "idle agents take turns");
    }

    #[test]
    fn agents_at_their_stream_limit_get_no_new_streams() {
        let r = Registry::default();
        let (a, b) = (session("a", "res"), session("b", "res"));
        r.add(a.clone());
        r.add(b.clone());
        a.active_streams.store(2, Ordering::Relaxed);
        let ids = |v: Vec<Arc<AgentSession>>| v.iter().map(|s| s.id.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(r.candidates("res", None, 2).unwrap()), ["b"], "a is full");
        b.active_streams.store(2, Ordering::Relaxed);
        assert!(matches!(r.candidates("res", None, 2), Err(NoDataConn::Busy(2))), "both full");
        assert!(matches!(r.candidates("other", None, 2), Err(NoDataConn::NoAgent)));
        assert_eq!(ids(r.candidates("res", None, 3).unwrap()).len(), 2);
    }

    #[test]
    fn one_probe_in_flight_and_a_stall_ends_when_the_agent_is_heard() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut l = Liveness::new(t0);
        assert_eq!(l.probe(s(1)), (s(1), true), "a stream opens: a ping goes out");
        assert_eq!(l.probe(s(2)), (s(1), false), "unanswered: the next stream relies on the same ping");
        assert!(!l.heard_since(s(1)));
        l.heard(s(1)); // the answer, in the same instant
        assert!(l.heard_since(s(1)));
        assert_eq!(l.probe(s(3)), (s(3), true), "answered: a new stream sends a new ping");
        assert!(l.stall(s(6)), "silent past the deadline: stalled");
        assert!(!l.stall(s(7)), "already stalled: no news");
        assert!(l.is_stalled());
        assert!(!l.heard(s(5)), "a late report of an earlier frame proves nothing");
        assert!(l.is_stalled());
        assert!(l.heard(s(8)), "any frame after the stall ends it");
        assert!(!l.is_stalled());
    }

    #[test]
    fn stalled_sessions_get_no_new_streams_while_another_answers() {
        let reg = Registry::default();
        let (a, b) = (session("a", "res_1"), session("b", "res_1"));
        reg.add(a.clone());
        reg.add(b.clone());
        let ids = |v: Vec<Arc<AgentSession>>| v.iter().map(|s| s.id.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(reg.candidates("res_1", None, usize::MAX).unwrap()), ["a", "b"]);
        assert!(reg.has_answering_other("res_1", &a.id));
        a.mark_stalled(Duration::from_secs(3));
        assert_eq!(ids(reg.candidates("res_1", None, usize::MAX).unwrap()), ["b"], "the stalled agent is skipped");
        assert!(!reg.has_answering_other("res_1", &b.id), "b has nowhere to move its streams");
        b.mark_stalled(Duration::from_secs(3));
        assert_eq!(
            ids(reg.candidates("res_1", None, usize::MAX).unwrap()),
            ["a", "b"],
            "all stalled: all are still tried"
        );
        assert_eq!(
            ids(reg.candidates("res_1", Some(&b.id), usize::MAX).unwrap()),
            ["a"],
            "never the one a stream just left"
        );
        a.heard();
        assert!(!a.is_stalled(), "a frame from the agent clears the mark");
        assert_eq!(ids(reg.candidates("res_1", None, usize::MAX).unwrap()), ["a"]);
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
