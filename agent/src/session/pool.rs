//! The session's pool of data connections: idle, handshaken mTLS connections parked at
//! the relay, each waiting for one [`StreamOpen`]; one taken is replaced once its stream
//! is answered, while the pool is below its [`PoolTarget`] (see [`super::demand`]).
//!
//! The pool knows only what it needs: where the relay is ([`RelayTarget`]), the
//! private service (through [`ServiceHealth`]), the meter and the data path.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use sluice_datapath::{self as datapath, DataPath, TrafficSecrets, TunnelSocket};
use sluice_proto::wire::{self, AgentMsg, DataHello, PROTOCOL_VERSION, StreamOpen, StreamStat};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span};

use super::demand::{PoolTarget, SURPLUS_IDLE};
use super::stream::{self, ActiveStream};
use crate::meter::{Meter, Registration};
use crate::service::ServiceHealth;

/// A TLS connection to the relay (control or data).
pub type Tunnel = tokio_rustls::client::TlsStream<TunnelSocket>;

/// How long the TLS handshake with the relay may take (enrollment's too).
pub(crate) const RELAY_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the relay is: its `host:port`, the name its certificate must carry, and the
/// proxy to reach it through (`NO_PROXY` is checked at each dial).
#[derive(Debug, Clone)]
pub struct RelayTarget {
    pub authority: String,
    pub server_name: ServerName<'static>,
    pub proxy: Option<crate::egress::Proxy>,
}

/// Dials the relay (through the proxy, if any: [`crate::egress`]) and completes the TLS
/// handshake with `connector`, end to end with the relay. With a `meter` the
/// socket is registered before connecting (for a data connection's TLS byte counts); the
/// registration dies with the connection on every failure path.
pub async fn dial(
    relay: &RelayTarget,
    connector: &TlsConnector,
    meter: Option<&Arc<Meter>>,
    secrets: Option<Arc<TrafficSecrets>>,
) -> Result<(Tunnel, Option<Registration>), String> {
    let authority = &relay.authority;
    let (tcp, registration) = crate::egress::connect_relay_metered(authority, relay.proxy.as_ref(), meter)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    datapath::tune_tunnel_socket(&tcp);
    let tls = tokio::time::timeout(
        RELAY_HANDSHAKE_TIMEOUT,
        connector.connect(
            relay.server_name.clone(),
            match secrets {
                Some(s) => TunnelSocket::with_traffic_secrets(tcp, s),
                None => TunnelSocket::new(tcp),
            },
        ),
    )
    .await
    .map_err(|_| format!("TLS handshake with the relay at {authority} timed out"))?
    .map_err(|e| {
        crate::metrics::handshake_failed();
        format!("TLS handshake with the relay at {authority} failed: {e}")
    })?;
    Ok((tls, registration))
}

/// What data connections share.
pub(super) struct Pool {
    pub(super) relay: RelayTarget,
    /// Swapped for one with the new certificate when it is renewed.
    pub(super) connector: Mutex<TlsConnector>,
    /// The private service and its reachability, fed by every stream's connect.
    pub(super) service: Arc<ServiceHealth>,
    /// How streams move bytes.
    pub(super) data_path: Arc<DataPath>,
    /// The relay announced that its data connections follow TLS key updates.
    pub(super) relay_follows_key_updates: bool,
    pub(super) session_id: sluice_proto::identity::SessionId,
    /// How many warm connections to keep (grows while the relay's pool runs dry).
    pub(super) target: Mutex<PoolTarget>,
    pub(super) idle: AtomicU32,
    pub(super) connecting: AtomicU32,
    /// Cancelled when the session ends: idle connections close; streams continue.
    pub(super) closed: CancellationToken,
    /// Cancelled when the agent's drain ends or the certificate is revoked: streams are cut too.
    pub(super) stop_streams: CancellationToken,
    /// Counts the streams under way, for the agent's drain.
    pub(super) drain: crate::drain::Drain,
    /// Messages to the relay (stream stats).
    pub(super) control: mpsc::UnboundedSender<AgentMsg>,
    /// Running streams, for the periodic stats.
    pub(super) active: Mutex<HashMap<u64, Arc<ActiveStream>>>,
    pub(super) meter: Arc<Meter>,
}

impl Pool {
    /// Stats of every running stream (and their bytes into the metrics).
    pub(super) fn stats(&self) -> Vec<StreamStat> {
        self.active.lock().iter().map(|(id, s)| s.stat(*id)).collect()
    }

    pub(super) fn idle(&self) -> u32 {
        self.idle.load(Ordering::Relaxed)
    }

    /// How many warm connections the pool keeps now.
    pub(super) fn target(&self) -> u32 {
        self.target.lock().current(Instant::now())
    }

    /// Counts one idle connection out if the pool holds more than its target; true if
    /// the caller's connection is the one to close.
    fn leave_if_surplus(&self) -> bool {
        let target = self.target();
        self.idle.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |i| (i > target).then(|| i - 1)).is_ok()
    }
}

/// Opens data connections until idle + connecting reaches the pool target.
pub(super) fn refill(pool: &Arc<Pool>) {
    let target = pool.target();
    while !pool.closed.is_cancelled()
        && pool.idle.load(Ordering::Relaxed) + pool.connecting.load(Ordering::Relaxed) < target
    {
        spawn_data_conn(pool);
    }
}

/// Opens one data connection in the background; it waits idle for a stream, serves it,
/// and is replaced as soon as it is taken. A framed stream that ends cleanly hands the
/// connection back, and it waits for the next stream (no new handshake).
pub(super) fn spawn_data_conn(pool: &Arc<Pool>) {
    pool.connecting.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(data_conn_task(pool.clone()));
}

/// A data connection's life: opened, idle until a stream comes, serving it, and idle
/// again if the stream hands it back. Every connection, idle or carrying a stream, is
/// one such task, so its future is kept small: the dial and the stream run in futures
/// of their own on the heap, and the connection itself is boxed.
async fn data_conn_task(pool: Arc<Pool>) {
    let conn = Box::pin(data_conn(&pool)).await;
    pool.connecting.fetch_sub(1, Ordering::Relaxed);
    let Ok((tls, registration, mut tunnel_from)) =
        conn.inspect_err(|e| debug!(error = %e, "opening a data connection failed"))
    else {
        // Try again a little later, unless the session is over.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => refill(&pool),
            _ = pool.closed.cancelled() => {}
        }
        return;
    };
    // Boxed, like the stream future below: an idle connection's task stays small, and
    // moving the connection into and out of a stream copies a pointer.
    let mut tls = Box::new(tls);
    let registration = registration.map(Arc::new);
    loop {
        let idle = pool.idle.fetch_add(1, Ordering::Relaxed) + 1;
        if crate::startup_code::pending() && idle >= pool.target() {
            // The first full pool: start-up is over.
            crate::startup_code::agent_is_up();
        }
        let open = {
            let read = wire::read_frame::<_, StreamOpen>(&mut *tls);
            tokio::pin!(read);
            loop {
                tokio::select! {
                    o = &mut read => break o,
                    _ = pool.closed.cancelled() => {
                        pool.idle.fetch_sub(1, Ordering::Relaxed);
                        return;
                    }
                    // Left over from a burst: close it (the relay drops closed idle
                    // connections before handing one out).
                    _ = tokio::time::sleep(SURPLUS_IDLE) => {
                        if pool.leave_if_surplus() {
                            debug!("surplus idle data connection closed");
                            return;
                        }
                    }
                }
            }
        };
        pool.idle.fetch_sub(1, Ordering::Relaxed);
        match open {
            Ok(open) if pool.closed.is_cancelled() => {
                // The session ended (a drain, a lost relay) as the stream arrived: no
                // new streams now. A clean close (TLS close_notify) without a reply
                // tells the relay the stream was not taken, so it may try another
                // agent, even with the client's first bytes already sent.
                let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
                return debug!(stream = open.stream_id, "stream refused: the session is over");
            }
            Ok(open) => {
                // The replacement connection is opened once this stream has its answer
                // (in `stream::serve`): its TLS handshake then does not compete for the
                // CPU with the service connect the client is waiting for.
                let span = info_span!("stream", id = open.stream_id, client = %open.client_addr);
                let _counted = pool.drain.enter();
                let serve = Box::pin(stream::serve(&pool, tls, registration.clone(), tunnel_from, open));
                match serve.instrument(span).await {
                    Some(reused) => (tls, tunnel_from) = reused,
                    None => return,
                }
            }
            Err(e) => {
                // The relay closed an idle connection (its pool was full, or it restarted).
                debug!(error = %e, "idle data connection closed by the relay");
                drop(registration);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => refill(&pool),
                    _ = pool.closed.cancelled() => {}
                }
                return;
            }
        }
    }
}

/// A new data connection, its registration with the byte meter, and where its first
/// stream's count of TLS bytes starts.
async fn data_conn(pool: &Pool) -> Result<(Tunnel, Option<Registration>, stream::TunnelBytes), String> {
    // A copy of the configuration per connection, whose `key_log` records this
    // connection's traffic secrets: a kernel-TLS stream needs them to follow key updates.
    let secrets = Arc::new(TrafficSecrets::default());
    let connector = {
        let mut config = (**pool.connector.lock().config()).clone();
        config.key_log = secrets.clone();
        TlsConnector::from(Arc::new(config))
    };
    let (mut tls, registration) = dial(&pool.relay, &connector, Some(&pool.meter), Some(secrets)).await?;
    // The first stream's tunnel bytes start before the hello: once the relay has it, it
    // may send an open with the client's first bytes right behind it at any moment.
    let counted = registration.as_ref().and_then(|r| r.split_counts(tls.get_ref().0.tcp().as_fd()));
    let tunnel_from = counted.map_or(stream::TunnelBytes::Now, stream::TunnelBytes::Since);
    let hello = DataHello { version: PROTOCOL_VERSION, session_id: pool.session_id.clone() };
    wire::write_frame(&mut tls, &hello).await.map_err(|e| format!("sending the data hello: {e}"))?;
    Ok((tls, registration, tunnel_from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::stream::{self, TunnelBytes};

    /// The size of the future `f` returns, without calling it.
    fn future_size<F: FnOnce(A) -> R, A, R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }

    fn future_size5<F: FnOnce(A, B, C, D, E) -> R, A, B, C, D, E, R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every data connection is a task, and a held stream also keeps its `serve` future:
    /// with the connection, the stream and both data paths' copy loops inline the task
    /// was 11 KiB, idle or not, most of a held stream's cost (docs/benchmarks.md). Now
    /// each part is on the heap, sized for what it holds (`sluice_datapath`'s own test
    /// bounds the copy loops).
    #[test]
    fn a_connection_task_and_its_stream_future_stay_small() {
        let task = future_size(&data_conn_task);
        let serve =
            future_size5::<_, &'static Arc<Pool>, Box<Tunnel>, Option<Arc<Registration>>, TunnelBytes, StreamOpen, _>(
                &stream::serve,
            );
        assert!(task <= 1024, "a data connection's task future is {task} bytes");
        assert!(serve <= 1536, "a stream's serve future is {serve} bytes");
    }
}
