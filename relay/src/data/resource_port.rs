//! A resource's port on the relay: platform jobs connect here and each connection
//! becomes one stream through an agent of the resource.
//!
//! The port is bound when the resource's first agent session comes up. If another
//! process holds it, the relay does not give up: it retries with backoff (1 s doubling
//! to 30 s) until the port is free or the last session ends, and meanwhile the resource
//! is `PORT_BLOCKED` with the reason ([`crate::data::registry::PortState`]), so operators see
//! the truth instead of an `AVAILABLE` port that refuses every connection.
//!
//! A stream fails visibly, never silently: the client socket is armed to be reset if
//! the relay dies mid-stream ([`datapath::reset_on_close`]), and a stream whose agent
//! does not answer its open within `--stream-open-deadline-secs` (nor the ping sent with
//! it) moves to another agent of the resource before any client byte is read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sluice_datapath::{self as datapath, StreamEnd};
use sluice_proto::identity::SessionId;
use sluice_proto::wire::{self, StreamOpen, StreamReply};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::data::registry::{AgentSession, DataConn, NoDataConn, PortState};
use crate::relay::Relay;

/// How long a stream waits for an agent to offer a data connection.
const DATA_CONN_WAIT: Duration = Duration::from_secs(10);
/// How long a stream's open may take in all, from the first `StreamOpen` sent, across
/// every agent it is tried on (the agent connects to the private service, up to 10 s,
/// and answers).
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// Data connections found broken before a stream is refused.
const MAX_BROKEN: u32 = 4;

/// Starts a resource's port (called when its first agent session comes up): binds it,
/// retrying with backoff while another process holds it, then accepts until the
/// resource's last session ends (the registry aborts this task) or the relay stops.
/// At most `--max-streams-per-resource` streams are open at once (more clients get a
/// reset); a failed accept (out of file descriptors) is retried with backoff.
pub fn start(relay: Arc<Relay>, resource_id: String, resource_name: String, port: u16) {
    let addr = SocketAddr::new(relay.config.resource_bind, port);
    let task_relay = relay.clone();
    let rid = resource_id.clone();
    let task = tokio::spawn(
        async move {
            // Whatever ends this task (abort included), the port is no longer "blocked".
            let _gauge = BlockedGauge(rid.clone());
            let Some(listener) = bind_until_free(&task_relay, &rid, addr).await else { return };
            let cap = task_relay.config.limits.max_streams_per_resource;
            let gate = crate::admission::Gate::new("resource", cap);
            let mut backoff = crate::admission::AcceptBackoff::new();
            loop {
                let (client, peer) = tokio::select! {
                    a = listener.accept() => match a {
                        Ok(x) => x,
                        Err(e) => { backoff.after_error("resource", &e, &ACCEPT_ERRORS).await; continue }
                    },
                    _ = task_relay.shutdown.cancelled() => return,
                };
                backoff.succeeded();
                if task_relay.leases.is_leased_only(&rid) {
                    crate::data::lease_port::refuse(
                        &task_relay,
                        &client,
                        peer,
                        (&rid, &resource_name),
                        None,
                        crate::data::lease_port::Refusal::LeasedOnly,
                    );
                    continue;
                }
                let Some(slot) = gate.try_admit() else {
                    datapath::reset(&client);
                    crate::metrics::stream_failed(&rid, "limit");
                    if let Some(held_back) = STREAM_REFUSALS.due() {
                        warn!(cap, refused_since_last_line = held_back, client = %peer,
                            "stream refused: the resource has {cap} streams open (--max-streams-per-resource); \
                             the client got a reset. If this load is expected, raise --max-streams-per-resource");
                    }
                    continue;
                };
                let _ = client.set_nodelay(true);
                let relay = task_relay.clone();
                let rid = rid.clone();
                let name = resource_name.clone();
                let stream_id = relay.next_stream_id();
                tokio::spawn(
                    async move {
                        let _slot = slot;
                        forward(relay, rid, name, client, peer, stream_id, None).await
                    }
                    .instrument(info_span!("stream", id = stream_id, client = %peer)),
                );
            }
        }
        .instrument(info_span!(parent: None, "resource", id = %resource_id)),
    );
    relay.registry.set_listener(&resource_id, task.abort_handle());
}

static ACCEPT_ERRORS: crate::admission::Throttle = crate::admission::Throttle::new(crate::admission::LOG_EVERY);
static STREAM_REFUSALS: crate::admission::Throttle = crate::admission::Throttle::new(crate::admission::LOG_EVERY);

/// First wait before binding a blocked port again; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between two attempts to bind a blocked port.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Sets `sluice_relay_resource_port_blocked` back to 0 when the port task ends.
struct BlockedGauge(String);

impl Drop for BlockedGauge {
    fn drop(&mut self) {
        crate::metrics::port_blocked(&self.0, false);
    }
}

/// What happened while binding a resource's port.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BindEvent {
    /// An attempt failed (every one: for the failure counter).
    Failed,
    /// The port is blocked for a new reason (once per change of state: log and show it).
    Blocked(String),
    /// The port listens, after `failures` failed attempts.
    Listening { failures: u32 },
}

/// Binds the resource's port and reports to the registry, the metrics and the log.
async fn bind_until_free(relay: &Relay, resource_id: &str, addr: SocketAddr) -> Option<TcpListener> {
    let blocked_since = Instant::now();
    bind_with_retry(addr, &relay.shutdown, |event| match event {
        BindEvent::Failed => crate::metrics::port_bind_failed(resource_id),
        BindEvent::Blocked(reason) => {
            error!(%addr, %reason, "cannot listen on the resource's port: platform jobs cannot reach the resource \
                until it is free (`sluice resources list` shows PORT_BLOCKED)");
            crate::metrics::port_blocked(resource_id, true);
            relay.registry.set_port_state(resource_id, PortState::Blocked(reason));
        }
        BindEvent::Listening { failures } => {
            // Logged and counted before the state that the admin API shows changes.
            if failures == 0 {
                info!(%addr, "resource port listening");
            } else {
                info!(%addr, failed_attempts = failures, blocked_for = ?blocked_since.elapsed(),
                    "resource port listening at last: platform jobs can connect again");
            }
            crate::metrics::port_blocked(resource_id, false);
            relay.registry.set_port_state(resource_id, PortState::Listening);
        }
    })
    .await
}

/// Binds `addr`, retrying with backoff until it is free; `None` if `shutdown` fires
/// first. Reports through `report`, each new reason for failing once.
async fn bind_with_retry(
    addr: SocketAddr,
    shutdown: &CancellationToken,
    mut report: impl FnMut(BindEvent),
) -> Option<TcpListener> {
    let mut retry = BindRetry::default();
    loop {
        let e = match TcpListener::bind(addr).await {
            Ok(listener) => {
                report(BindEvent::Listening { failures: retry.failures });
                return Some(listener);
            }
            Err(e) => e,
        };
        report(BindEvent::Failed);
        let (news, wait) = retry.failed(blocked_reason(addr, &e));
        match news {
            Some(reason) => report(BindEvent::Blocked(reason)),
            None => debug!(%addr, error = %e, retry_in = ?wait, "resource port still blocked"),
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return None,
        }
    }
}

/// The retry schedule of a blocked port, without I/O: how long to wait after each
/// failure, and whether the failure is news (a new reason) worth logging.
#[derive(Debug, Default)]
struct BindRetry {
    failures: u32,
    reported: Option<String>,
}

impl BindRetry {
    /// Records a failed bind: the reason if it differs from the last one reported, and
    /// the wait before the next attempt (1 s, 2 s, 4 s … capped at 30 s).
    fn failed(&mut self, reason: String) -> (Option<String>, Duration) {
        self.failures += 1;
        let wait = RETRY_FIRST.saturating_mul(1 << (self.failures - 1).min(16)).min(RETRY_MAX);
        if self.reported.as_ref() == Some(&reason) {
            return (None, wait);
        }
        self.reported = Some(reason.clone());
        (Some(reason), wait)
    }
}

/// What an operator reads about a port that cannot be bound: what happened, why, and
/// what to do. Classified by the error's kind, never by its text.
fn blocked_reason(addr: SocketAddr, e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    let why = match e.kind() {
        ErrorKind::AddrInUse => {
            format!("another process holds the port (`ss -ltnp 'sport = :{}'` shows which); free it", addr.port())
        }
        ErrorKind::PermissionDenied => {
            "the relay may not bind this port (below 1024 needs CAP_NET_BIND_SERVICE); use --resource-ports of \
             1024 or more"
                .to_owned()
        }
        ErrorKind::AddrNotAvailable => {
            "--resource-bind is not an address of this host; fix it and restart the relay".to_owned()
        }
        _ => "see the relay's log".to_owned(),
    };
    format!("{addr}: {e} — {why}; the relay retries, at least every {} s", RETRY_MAX.as_secs())
}

/// Carries one platform connection through an agent. `lease`: the lease it came in
/// under (its id, for the audit trail) and its cut, which ends the stream when
/// cancelled, as a revocation of the agent does.
pub(crate) async fn forward(
    relay: Arc<Relay>,
    resource_id: String,
    resource_name: String,
    client: TcpStream,
    peer: SocketAddr,
    stream_id: u64,
    lease: Option<(String, CancellationToken)>,
) {
    let (lease_id, cut) = lease.map_or((None, None), |(id, cut)| (Some(id), Some(cut)));
    let started = Instant::now();
    // Should the relay die mid-stream, the kernel resets the client instead of ending
    // its stream with a FIN that would make a truncated download look complete; the
    // data path disarms this on a clean end.
    datapath::reset_on_close(&client);
    // Opening a stream (choosing an agent, waiting for its answer) runs on the heap: a
    // held stream's task keeps only what the copy needs (`PreparedStream::run` is boxed
    // inside too), not room for the open's state.
    let client_addr = peer.to_string();
    let opening = open_stream(&relay, &resource_id, stream_id, &client_addr, &client);
    let (session, conn, framed, first) = match Box::pin(opening).await {
        Ok(x) => x,
        Err(failed) => {
            crate::metrics::stream_failed(&resource_id, failed.reason);
            if failed.reason == "refused" {
                info!(reason = %failed.why, "private service refused the stream");
            } else {
                warn!(reason = %failed.why, "stream refused: no path to the private service");
            }
            datapath::reset(&client);
            return;
        }
    };
    let prepared = if framed {
        Ok(relay.data_path.prepare_framed(TlsStream::Server(conn)))
    } else {
        relay.data_path.prepare(TlsStream::Server(conn), session.info.capabilities.key_updates)
    };
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => {
            crate::metrics::stream_failed(&resource_id, "ktls");
            warn!(agent = %session.agent_id, error = %e, "stream failed: the kernel refused the connection's TLS keys");
            datapath::reset(&client);
            return;
        }
    };
    session.active_streams.fetch_add(1, Ordering::Relaxed);
    let live = relay.streams.open(stream_id, &resource_id, &resource_name, &session.agent_id, &peer.to_string());
    // The client's first bytes, written by `open_stream` (with the open or after it).
    if first.bytes > 0 {
        if first.early {
            crate::metrics::first_bytes_with_open(&resource_id);
        }
        live.transfer.plain_to_tunnel.fetch_add(first.bytes as u64, Ordering::Relaxed);
        live.transfer.copied.fetch_add(first.bytes as u64, Ordering::Relaxed);
    }
    crate::metrics::stream_opened(&resource_id, prepared.path().as_str());
    let stop = session.revoked.child_token();
    let watch = cut.map(|cut| {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = cut.cancelled() => stop.cancel(),
                _ = stop.cancelled() => {}
            }
        })
    });
    let report = prepared.run(client, &live.transfer, &stop).await;
    if let Some(w) = watch {
        w.abort();
    }
    session.active_streams.fetch_sub(1, Ordering::Relaxed);
    // Both ends saw the other's end of a framed stream: its connection waits for the
    // next one, unless the stream was cut or the session's pool is full or closed.
    if let Some(conn) = report.reusable
        && let TlsStream::Server(conn) = *conn
        && !stop.is_cancelled()
        && session.park(conn)
    {
        crate::metrics::data_reused(&resource_id);
    }
    relay.streams.close(stream_id);
    let (up, down) = live.transfer.get();
    let copied = live.transfer.copied();
    crate::metrics::stream_closed(&resource_id, report.end.label());
    crate::metrics::userspace_copy(copied);
    let ended_at_ms = crate::audit::now_ms();
    relay.audit.stream(crate::state::store::StreamRecord {
        resource_id: resource_id.clone(),
        resource_name: resource_name.clone(),
        agent_id: session.agent_id.to_string(),
        client_addr: peer.to_string(),
        started_at_ms: ended_at_ms.saturating_sub(started.elapsed().as_millis() as u64),
        ended_at_ms,
        bytes_in: up,
        bytes_out: down,
        end: report.end.label().to_owned(),
        end_detail: report.end.describe(),
        path: report.path.as_str().to_owned(),
        lease_id,
    });
    if matches!(report.end, StreamEnd::Clean) {
        debug!(agent = %session.agent_id, path = report.path.as_str(), bytes_in = up, bytes_out = down,
            copied, secs = started.elapsed().as_secs_f64(), "stream closed");
    } else {
        info!(agent = %session.agent_id, path = report.path.as_str(), bytes_in = up, bytes_out = down,
            end = %report.end.describe(), "stream ended abnormally");
    }
}

/// Why a stream could not be opened (its client is reset): the metric label
/// (`sluice_relay_streams_failed_total{reason}`) and what happened.
struct OpenFailed {
    reason: &'static str,
    why: String,
}

/// How one try to open a stream on one data connection ended.
#[derive(Debug)]
enum Attempt {
    /// The agent connected to the private service: the stream runs on this connection.
    Accepted,
    /// The agent could not reach the private service.
    Refused(String),
    /// The connection failed before an answer (a pooled connection that died while
    /// idle, or the agent's session ended): nothing reached the service.
    Broken(String),
    /// The connection failed before an answer, after the client's first bytes went
    /// with the open: the agent may have delivered them, so the stream cannot be
    /// retried elsewhere.
    Lost(String),
    /// The agent answered neither the open nor the ping sent with it within the
    /// stream-open deadline, and another agent of the resource answers: try that one.
    Stalled,
    /// No answer within [`OPEN_TIMEOUT`].
    TimedOut,
}

/// Opens a stream on a data connection of an agent of the resource: sends
/// `StreamOpen` and waits for the agent's answer. A data connection that turns out
/// dead, or an agent that stalls, costs a retry on another one: no client byte has been
/// read yet, so nothing reached the private service, and dropping the connection
/// cancels the stalled agent's attempt should it wake. [`OPEN_TIMEOUT`] bounds the
/// whole, from the first `StreamOpen` sent. Returns the agent, the connection, whether
/// the stream is framed (its connection reusable), and the client's bytes it read.
///
/// The client's first bytes go with the open ([`FirstBytes`]) when the stream cannot
/// move anyway: it is framed, the client has sent them already, and no other agent of
/// the resource answers. The agent writes them to the service as soon as it is
/// connected, a round trip sooner than after its answer. Such an attempt never moves to
/// another agent and is retried on another connection only after a clean close before
/// any answer (the agent had not taken the stream): that is how the bytes reach the
/// service at most once.
async fn open_stream(
    relay: &Relay,
    resource_id: &str,
    stream_id: u64,
    client_addr: &str,
    client: &TcpStream,
) -> Result<(Arc<AgentSession>, DataConn, bool, FirstSent), OpenFailed> {
    let deadline = relay.config.limits.stream_open_deadline;
    let first = std::sync::Mutex::new(FirstBytes::default());
    let mut give_up: Option<tokio::time::Instant> = None;
    let mut avoid: Option<SessionId> = None;
    let mut broken = 0;
    loop {
        let wait = match give_up {
            None => DATA_CONN_WAIT,
            Some(t) => DATA_CONN_WAIT.min(t.saturating_duration_since(tokio::time::Instant::now())),
        };
        let max_per_agent = relay.config.limits.max_streams_per_agent as usize;
        let (session, mut conn) =
            relay.registry.take_data_conn(resource_id, wait, avoid.as_ref(), max_per_agent).await.map_err(|e| {
                OpenFailed {
                    reason: match e {
                        NoDataConn::NoAgent => "no_agent",
                        NoDataConn::Timeout(_) => "timeout",
                        NoDataConn::Busy(_) => "limit",
                    },
                    why: e.to_string(),
                }
            })?;
        let until = *give_up.get_or_insert_with(|| tokio::time::Instant::now() + OPEN_TIMEOUT);
        let framed = relay.frames_streams_for(&session.info.capabilities);
        let open = StreamOpen { stream_id, client_addr: client_addr.to_owned(), framed };
        // Early bytes only where the stream could not move anyway.
        let early = (framed && !relay.registry.has_answering_other(resource_id, &session.id)).then_some(client);
        match attempt(relay, &session, &mut conn, &open, &first, early, deadline, until).await {
            Attempt::Accepted => {
                let f = std::mem::take(&mut *lock(&first));
                if !f.sent && !f.bytes.is_empty() {
                    // Read for an attempt that closed cleanly, and not sent early on
                    // this one: they follow the answer, as any client byte does. Flushed
                    // before the data path may hand the connection to kernel TLS.
                    let out = if framed {
                        [&wire::frame_header(f.bytes.len() as u32)[..], &f.bytes].concat()
                    } else {
                        f.bytes.clone()
                    };
                    let written = async { conn.write_all(&out).await.and(conn.flush().await) };
                    if let Err(e) = written.await {
                        return Err(OpenFailed { reason: "stale", why: format!("the data connection failed: {e}") });
                    }
                }
                return Ok((session, conn, framed, FirstSent { bytes: f.bytes.len(), early: f.sent }));
            }
            Attempt::Refused(reason) => return Err(OpenFailed { reason: "refused", why: reason }),
            Attempt::Lost(e) => {
                return Err(OpenFailed {
                    reason: "stale",
                    why: format!("the data connection failed after the client's first bytes went out: {e}"),
                });
            }
            Attempt::TimedOut => {
                return Err(OpenFailed {
                    reason: "timeout",
                    why: format!("agent {} did not answer within {OPEN_TIMEOUT:?}", session.agent_id),
                });
            }
            Attempt::Broken(e) => {
                broken += 1;
                if broken >= MAX_BROKEN {
                    return Err(OpenFailed {
                        reason: "stale",
                        why: format!("every data connection tried failed; the last: {e}"),
                    });
                }
                debug!(agent = %session.agent_id, error = %e, "stale data connection; trying another");
            }
            Attempt::Stalled => {
                crate::metrics::stream_moved(resource_id);
                info!(stalled_agent = %session.agent_id, "moving the stream to another agent of the resource");
                avoid = Some(session.id.clone());
            }
        }
        // `conn` is dropped here: the agent, should it wake, finds the stream gone.
    }
}

/// Sends `open` on `conn` and waits for the answer: until `deadline` while the agent
/// may be stalled (probed with a ping at half the deadline), then — if it answered the ping sent with the open (it is alive; its
/// service is slow) or no other agent answers — until `give_up`.
///
/// With `early` (the client), the client's first bytes go to the agent without waiting
/// for its answer: with the open when they are there already, else as soon as they
/// arrive while the answer is awaited ([`exchange`]).
#[allow(clippy::too_many_arguments)]
async fn attempt(
    relay: &Relay,
    session: &AgentSession,
    conn: &mut DataConn,
    open: &StreamOpen,
    first: &std::sync::Mutex<FirstBytes>,
    early: Option<&TcpStream>,
    deadline: Duration,
    give_up: tokio::time::Instant,
) -> Attempt {
    let exchange = exchange(conn, open, first, early);
    let sent_early = || lock(first).sent;
    tokio::pin!(exchange);
    // The liveness probe (a ping on the control session) goes out only when the answer
    // is late, at half the deadline: a live agent answers a ping within milliseconds,
    // so by the deadline it has been heard from unless it is stalled. Streams answered
    // in time — nearly all — cost no control message on either end.
    let now = tokio::time::Instant::now();
    let first = (now + deadline).min(give_up);
    let probe_at = (now + deadline / 2).min(first);
    let reply = tokio::select! {
        r = &mut exchange => r,
        _ = tokio::time::sleep_until(probe_at) => {
            let probe = session.probe();
            tokio::select! {
                r = &mut exchange => r,
                _ = tokio::time::sleep_until(first) => {
                    if !session.answered_since(probe) {
                        session.mark_stalled(deadline);
                        // With the client's first bytes out, the stream stays: should
                        // this agent wake, it would deliver them.
                        if !sent_early() && relay.registry.has_answering_other(&session.resource_id, &session.id) {
                            return Attempt::Stalled;
                        }
                    }
                    tokio::select! {
                        r = &mut exchange => r,
                        _ = tokio::time::sleep_until(give_up) => return Attempt::TimedOut,
                        _ = session.closed.cancelled() => return Attempt::Broken("the agent's session ended".into()),
                    }
                }
            }
        }
    };
    judge(reply, sent_early())
}

/// What the agent's answer (or the failure to get one) makes of an attempt, given
/// whether the client's first bytes went out before it.
fn judge(reply: Result<StreamReply, wire::WireError>, sent_early: bool) -> Attempt {
    match reply {
        Ok(StreamReply::Accepted) => Attempt::Accepted,
        Ok(StreamReply::Refused { reason }) => Attempt::Refused(reason),
        // A clean close (TLS close_notify) before any answer: the agent closed the
        // connection without taking the stream (an idle connection it let go, a
        // session that was ending), so it delivered nothing.
        Err(e @ wire::WireError::Closed) => Attempt::Broken(e.to_string()),
        Err(e) if !sent_early => Attempt::Broken(e.to_string()),
        // Any other failure after the bytes went out: the agent may have delivered them.
        Err(e) => Attempt::Lost(e.to_string()),
    }
}

/// Writes `open` on `conn` and reads the agent's answer. With `early`, the client's
/// first bytes go out as the stream's first chunk without waiting for the answer:
/// behind the open in the same write when the client has sent them already, else as
/// soon as they arrive while the answer is awaited. A client that waits for the
/// service to speak first sends nothing, and its stream opens as without `early`.
///
/// Waiting for the answer and for the client at once is safe: the answer is one frame
/// in one TLS record, so the read either has not started (dropping it loses nothing)
/// or completes without waiting.
async fn exchange<C: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut C,
    open: &StreamOpen,
    first: &std::sync::Mutex<FirstBytes>,
    early: Option<&TcpStream>,
) -> Result<StreamReply, wire::WireError> {
    let mut out = wire::encode_frame(open)?;
    lock(first).sent = false;
    if let Some(client) = early {
        let mut f = lock(first);
        if !f.read {
            f.read_from(client);
        }
        if !f.bytes.is_empty() {
            out.extend_from_slice(&wire::frame_header(f.bytes.len() as u32));
            out.extend_from_slice(&f.bytes);
            f.sent = true;
        }
    }
    conn.write_all(&out).await?;
    conn.flush().await?;
    if let Some(client) = early.filter(|_| !lock(first).read) {
        tokio::select! {
            biased;
            reply = wire::read_frame::<_, StreamReply>(&mut *conn) => return reply,
            _ = client.readable() => {}
        }
        let chunk = {
            let mut f = lock(first);
            f.read_from(client);
            f.sent = !f.bytes.is_empty();
            f.sent.then(|| [&wire::frame_header(f.bytes.len() as u32)[..], &f.bytes].concat())
        };
        if let Some(chunk) = chunk {
            conn.write_all(&chunk).await?;
            conn.flush().await?;
        }
    }
    wire::read_frame::<_, StreamReply>(&mut *conn).await
}

fn lock(first: &std::sync::Mutex<FirstBytes>) -> std::sync::MutexGuard<'_, FirstBytes> {
    first.lock().unwrap_or_else(|p| p.into_inner())
}

/// The client's first bytes that `open_stream` wrote: how many, and whether they went
/// before the agent's answer.
struct FirstSent {
    bytes: usize,
    early: bool,
}

/// The client's first bytes, read (at most once per stream) to go with the open.
#[derive(Default)]
struct FirstBytes {
    /// The client's socket was read (with data, or found empty when readable).
    read: bool,
    bytes: Vec<u8>,
    /// `bytes` went to an agent before its answer.
    sent: bool,
}

impl FirstBytes {
    /// The most read: what a client sends before any answer (a database's startup
    /// message, a TLS ClientHello, a request) fits.
    const MAX: usize = 16 * 1024;

    /// Takes what the client has sent so far, without waiting: a client that waits for
    /// the service to speak first (SMTP, MySQL, SSH) has sent nothing.
    fn read_from(&mut self, client: &TcpStream) {
        let mut buf = [0u8; Self::MAX];
        match client.try_read(&mut buf) {
            Ok(n) => {
                self.read = true;
                self.bytes = buf[..n].to_vec();
            }
            // Nothing yet: wait for the client (`exchange`).
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            // An error the stream's copy meets again.
            Err(_) => self.read = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::type_complexity)]
    fn future_size<F: FnOnce(A, B, C, D, E, G, H) -> R, A, B, C, D, E, G, H, R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every held stream keeps its `forward` future for its life: with the stream's
    /// opening (2 KiB) inline it was 2.5 KiB, twice over in the task that ran it.
    #[test]
    fn a_held_streams_future_stays_small() {
        let size = future_size::<
            _,
            Arc<Relay>,
            String,
            String,
            TcpStream,
            SocketAddr,
            u64,
            Option<(String, CancellationToken)>,
            _,
        >(&forward);
        assert!(size <= 1024, "a stream's forward future is {size} bytes");
    }

    /// A platform job's connection as the relay holds it (`relay_side`) and the job's end.
    async fn client_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let job = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (relay_side, _) = listener.accept().await.unwrap();
        (relay_side, job)
    }

    fn open() -> StreamOpen {
        StreamOpen { stream_id: 7, client_addr: "127.0.0.1:1".into(), framed: true }
    }

    /// The agent's side: one stream chunk (length prefix, bytes).
    async fn read_chunk(agent: &mut tokio::io::DuplexStream) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut len = [0u8; wire::FRAME_HEADER_LEN];
        agent.read_exact(&mut len).await.unwrap();
        let mut bytes = vec![0u8; u32::from_be_bytes(len) as usize];
        agent.read_exact(&mut bytes).await.unwrap();
        bytes
    }

    /// What the client sent before the open goes with it: the agent has the bytes
    /// before it answers.
    #[tokio::test]
    async fn first_bytes_already_sent_go_with_the_open() {
        let (relay_side, mut job) = client_pair().await;
        job.write_all(b"startup message").await.unwrap();
        relay_side.readable().await.unwrap();
        let (mut conn, mut agent) = tokio::io::duplex(64 * 1024);
        let first = std::sync::Mutex::new(FirstBytes::default());
        let o = open();
        let agent_side = async {
            let got: StreamOpen = wire::read_frame(&mut agent).await.unwrap();
            assert_eq!(got.stream_id, 7);
            assert_eq!(read_chunk(&mut agent).await, b"startup message");
            wire::write_frame(&mut agent, &StreamReply::Accepted).await.unwrap();
        };
        let (reply, ()) = tokio::join!(exchange(&mut conn, &o, &first, Some(&relay_side)), agent_side);
        assert!(matches!(reply, Ok(StreamReply::Accepted)));
        let f = lock(&first);
        assert!(f.read && f.sent && f.bytes == b"startup message");
    }

    /// Bytes that arrive while the answer is awaited follow the open at once.
    #[tokio::test]
    async fn first_bytes_that_arrive_while_waiting_follow_the_open() {
        let (relay_side, mut job) = client_pair().await;
        let (mut conn, mut agent) = tokio::io::duplex(64 * 1024);
        let first = std::sync::Mutex::new(FirstBytes::default());
        let o = open();
        let agent_side = async {
            let _: StreamOpen = wire::read_frame(&mut agent).await.unwrap();
            job.write_all(b"GET / HTTP/1.1").await.unwrap();
            assert_eq!(read_chunk(&mut agent).await, b"GET / HTTP/1.1", "sent before the agent answered");
            wire::write_frame(&mut agent, &StreamReply::Accepted).await.unwrap();
        };
        let (reply, ()) = tokio::join!(exchange(&mut conn, &o, &first, Some(&relay_side)), agent_side);
        assert!(matches!(reply, Ok(StreamReply::Accepted)));
        assert!(lock(&first).sent);
    }

    /// A client that waits for the service to speak first (SSH, SMTP, MySQL): the open
    /// goes alone and nothing of the client's is read.
    #[tokio::test]
    async fn a_silent_client_opens_as_without_early_bytes() {
        let (relay_side, _job) = client_pair().await;
        let (mut conn, mut agent) = tokio::io::duplex(64 * 1024);
        let first = std::sync::Mutex::new(FirstBytes::default());
        let o = open();
        let agent_side = async {
            let _: StreamOpen = wire::read_frame(&mut agent).await.unwrap();
            wire::write_frame(&mut agent, &StreamReply::Refused { reason: "connection refused".into() }).await.unwrap();
        };
        let (reply, ()) = tokio::join!(exchange(&mut conn, &o, &first, Some(&relay_side)), agent_side);
        assert!(matches!(reply, Ok(StreamReply::Refused { .. })));
        let f = lock(&first);
        assert!(!f.read && !f.sent && f.bytes.is_empty());
    }

    /// An agent that closes cleanly without answering took nothing: the retry sends the
    /// same bytes once more, on the new connection only, and reads no more of the
    /// client's. Without `early` (another agent answers) they wait for the answer.
    #[tokio::test]
    async fn bytes_of_a_cleanly_closed_attempt_go_once_on_the_retry() {
        let (relay_side, mut job) = client_pair().await;
        job.write_all(b"hello").await.unwrap();
        relay_side.readable().await.unwrap();
        let first = std::sync::Mutex::new(FirstBytes::default());
        let o = open();

        let (mut conn, mut agent) = tokio::io::duplex(64 * 1024);
        let closing_agent = async move {
            let _: StreamOpen = wire::read_frame(&mut agent).await.unwrap();
            assert_eq!(read_chunk(&mut agent).await, b"hello");
            drop(agent); // a clean close, no answer
        };
        let (reply, ()) = tokio::join!(exchange(&mut conn, &o, &first, Some(&relay_side)), closing_agent);
        assert!(matches!(judge(reply, lock(&first).sent), Attempt::Broken(_)), "retryable");

        job.write_all(b" world").await.unwrap(); // the stream's copy reads this later
        let (mut conn, mut agent) = tokio::io::duplex(64 * 1024);
        let agent_side = async {
            let _: StreamOpen = wire::read_frame(&mut agent).await.unwrap();
            assert_eq!(read_chunk(&mut agent).await, b"hello", "the same bytes, not re-read");
            wire::write_frame(&mut agent, &StreamReply::Accepted).await.unwrap();
        };
        let (reply, ()) = tokio::join!(exchange(&mut conn, &o, &first, Some(&relay_side)), agent_side);
        assert!(matches!(reply, Ok(StreamReply::Accepted)));
        assert!(lock(&first).sent);

        // The same retry where the stream may still move: nothing goes before the answer.
        let (mut conn, mut agent) = tokio::io::duplex(64 * 1024);
        let agent_side = async {
            let _: StreamOpen = wire::read_frame(&mut agent).await.unwrap();
            wire::write_frame(&mut agent, &StreamReply::Accepted).await.unwrap();
        };
        let (reply, ()) = tokio::join!(exchange(&mut conn, &o, &first, None), agent_side);
        assert!(matches!(reply, Ok(StreamReply::Accepted)));
        {
            let f = lock(&first);
            assert!(!f.sent && f.bytes == b"hello", "kept for after the answer");
        }
        let mut rest = [0u8; 16];
        relay_side.readable().await.unwrap();
        let n = relay_side.try_read(&mut rest).unwrap();
        assert_eq!(&rest[..n], b" world", "the client's later bytes were left for the copy");
    }

    /// Only a clean close keeps an attempt whose first bytes went out retryable.
    #[test]
    fn an_attempt_after_early_bytes_is_lost_unless_the_agent_closed_cleanly() {
        let io = || Err(wire::WireError::Io(std::io::ErrorKind::ConnectionReset.into()));
        assert!(matches!(judge(io(), false), Attempt::Broken(_)));
        assert!(matches!(judge(io(), true), Attempt::Lost(_)));
        assert!(matches!(judge(Err(wire::WireError::Truncated), true), Attempt::Lost(_)));
        assert!(matches!(judge(Err(wire::WireError::Closed), true), Attempt::Broken(_)));
        assert!(matches!(judge(Err(wire::WireError::Closed), false), Attempt::Broken(_)));
        assert!(matches!(judge(Ok(StreamReply::Accepted), true), Attempt::Accepted));
        assert!(
            matches!(judge(Ok(StreamReply::Refused { reason: "no".into() }), true), Attempt::Refused(r) if r == "no")
        );
    }

    #[test]
    fn retries_back_off_to_thirty_seconds() {
        let mut r = BindRetry::default();
        let waits: Vec<u64> = (0..8).map(|_| r.failed("same".into()).1.as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        for _ in 0..100 {
            assert_eq!(r.failed("same".into()).1, RETRY_MAX, "no overflow after many failures");
        }
    }

    #[test]
    fn each_reason_is_reported_once() {
        let mut r = BindRetry::default();
        assert_eq!(r.failed("in use".into()).0.as_deref(), Some("in use"));
        assert_eq!(r.failed("in use".into()).0, None);
        assert_eq!(r.failed("in use".into()).0, None);
        assert_eq!(r.failed("denied".into()).0.as_deref(), Some("denied"), "a new reason is news");
        assert_eq!(r.failed("in use".into()).0.as_deref(), Some("in use"));
    }

    #[test]
    fn blocked_reason_says_what_to_do() {
        let addr: SocketAddr = "127.0.0.1:20001".parse().unwrap();
        let e = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let reason = blocked_reason(addr, &e);
        assert!(reason.starts_with("127.0.0.1:20001: "), "{reason}");
        assert!(reason.contains("another process holds the port"), "{reason}");
        assert!(reason.contains("sport = :20001"), "{reason}");
        assert!(reason.contains("retries"), "{reason}");
        let denied = blocked_reason(addr, &std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(denied.contains("CAP_NET_BIND_SERVICE"), "{denied}");
    }

    /// The real loop against a real squatter, with paused time: one report, backoff
    /// 1 + 2 + 4 s, then the port is bound as soon as it is free.
    #[tokio::test(start_paused = true)]
    async fn binds_once_the_squatter_leaves() {
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = squatter.local_addr().unwrap();
        let mut squatter = Some(squatter);
        let started = tokio::time::Instant::now();
        let mut events = Vec::new();
        let listener = bind_with_retry(addr, &CancellationToken::new(), |e| {
            if events.iter().filter(|e| **e == BindEvent::Failed).count() == 2 && e == BindEvent::Failed {
                drop(squatter.take()); // the third failure is the last
            }
            events.push(e);
        })
        .await
        .unwrap();
        assert_eq!(listener.local_addr().unwrap(), addr);
        assert_eq!(started.elapsed(), Duration::from_secs(1 + 2 + 4));
        assert_eq!(events.len(), 5, "{events:?}");
        assert!(matches!(&events[1], BindEvent::Blocked(r) if r.contains("already in use")), "{events:?}");
        assert_eq!(events.iter().filter(|e| matches!(e, BindEvent::Blocked(_))).count(), 1, "reported once");
        assert_eq!(events.last(), Some(&BindEvent::Listening { failures: 3 }));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_the_retries() {
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(100)).await;
            stop.cancel();
        });
        let got = bind_with_retry(squatter.local_addr().unwrap(), &shutdown, |_| {}).await;
        assert!(got.is_none());
    }
}
