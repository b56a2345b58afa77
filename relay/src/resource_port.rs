//! A resource's port on the relay: platform jobs connect here and each connection
//! becomes one stream through an agent of the resource.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sluice_proto::datapath::{self, StreamEnd};
use sluice_proto::wire::{self, StreamOpen, StreamReply};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsStream;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::registry::NoDataConn;
use crate::relay::Relay;

/// How long a stream waits for an agent to offer a data connection.
const DATA_CONN_WAIT: Duration = Duration::from_secs(10);
/// How long the agent may take to connect to the private service and answer.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

/// Starts listening on a resource's port (called when its first agent session comes up).
pub fn start(relay: Arc<Relay>, resource_id: String, resource_name: String, port: u16) {
    let addr = SocketAddr::new(relay.config.resource_bind, port);
    let task_relay = relay.clone();
    let rid = resource_id.clone();
    let task = tokio::spawn(
        async move {
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    return error!(%addr, error = %e, "cannot listen on the resource's port: platform jobs cannot reach it \
                        until the port is free (another process holds it?)");
                }
            };
            info!(%addr, "resource port listening");
            loop {
                let (client, peer) = tokio::select! {
                    a = listener.accept() => match a {
                        Ok(x) => x,
                        Err(e) => { warn!(error = %e, "accept failed"); tokio::time::sleep(Duration::from_millis(50)).await; continue }
                    },
                    _ = task_relay.shutdown.cancelled() => return,
                };
                let _ = client.set_nodelay(true);
                let relay = task_relay.clone();
                let rid = rid.clone();
                let name = resource_name.clone();
                let stream_id = relay.next_stream_id();
                tokio::spawn(
                    forward(relay, rid, name, client, peer, stream_id).instrument(info_span!("stream", id = stream_id, client = %peer)),
                );
            }
        }
        .instrument(info_span!(parent: None, "resource", id = %resource_id)),
    );
    relay.registry.set_listener(&resource_id, task.abort_handle());
}

/// Carries one platform connection through an agent.
async fn forward(
    relay: Arc<Relay>,
    resource_id: String,
    resource_name: String,
    client: TcpStream,
    peer: SocketAddr,
    stream_id: u64,
) {
    let started = Instant::now();
    // A pooled data connection may have died while idle; such a failure happens before
    // any client byte is read, so trying the next one is safe.
    let mut last_err = String::new();
    for _attempt in 0..4 {
        let (session, mut conn) = match relay.registry.take_data_conn(&resource_id, DATA_CONN_WAIT).await {
            Ok(x) => x,
            Err(e) => {
                crate::metrics::stream_failed(
                    &resource_id,
                    if matches!(e, NoDataConn::NoAgent) { "no_agent" } else { "timeout" },
                );
                warn!(reason = %e, "stream refused: no path to the private service");
                datapath::reset(&client);
                return;
            }
        };
        let open = StreamOpen { stream_id, client_addr: peer.to_string() };
        let reply = tokio::time::timeout(OPEN_TIMEOUT, async {
            wire::write_frame(&mut conn, &open).await?;
            wire::read_frame::<_, StreamReply>(&mut conn).await
        })
        .await;
        match reply {
            Ok(Ok(StreamReply::Accepted)) => {
                let prepared = match relay.data_path.prepare(TlsStream::Server(conn)) {
                    Ok(p) => p,
                    Err(e) => {
                        crate::metrics::stream_failed(&resource_id, "ktls");
                        warn!(agent = %session.agent_id, error = %e, "stream failed: the kernel refused the connection's TLS keys");
                        datapath::reset(&client);
                        return;
                    }
                };
                session.active_streams.fetch_add(1, Ordering::Relaxed);
                let live =
                    relay.streams.open(stream_id, &resource_id, &resource_name, &session.agent_id, &peer.to_string());
                crate::metrics::stream_opened(&resource_id, prepared.path().as_str());
                let report = prepared.run(client, &live.transfer, &session.revoked).await;
                session.active_streams.fetch_sub(1, Ordering::Relaxed);
                relay.streams.close(stream_id);
                let (up, down) = live.transfer.get();
                let copied = live.transfer.copied();
                crate::metrics::stream_closed(&resource_id, report.end.label());
                crate::metrics::userspace_copy(copied);
                if matches!(report.end, StreamEnd::Clean) {
                    debug!(agent = %session.agent_id, path = report.path.as_str(), bytes_in = up, bytes_out = down,
                        copied, secs = started.elapsed().as_secs_f64(), "stream closed");
                } else {
                    info!(agent = %session.agent_id, path = report.path.as_str(), bytes_in = up, bytes_out = down,
                        end = %report.end.describe(), "stream ended abnormally");
                }
                return;
            }
            Ok(Ok(StreamReply::Refused { reason })) => {
                crate::metrics::stream_failed(&resource_id, "refused");
                info!(agent = %session.agent_id, %reason, "private service refused the stream");
                datapath::reset(&client);
                return;
            }
            Ok(Err(e)) => last_err = e.to_string(),
            Err(_) => {
                // The agent may still be connecting: retrying could open the service twice.
                crate::metrics::stream_failed(&resource_id, "timeout");
                warn!(agent = %session.agent_id, "stream refused: the agent did not answer within {OPEN_TIMEOUT:?}");
                datapath::reset(&client);
                return;
            }
        }
        debug!(error = %last_err, "stale data connection; trying another");
    }
    crate::metrics::stream_failed(&resource_id, "stale");
    warn!(error = %last_err, "stream refused: every data connection tried failed");
    datapath::reset(&client);
}
