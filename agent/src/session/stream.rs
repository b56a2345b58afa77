//! One stream on a data connection: connect to the private service, answer the relay,
//! move the bytes, and report the final counts.
//!
//! Every socket the stream registers with the eBPF program is held by a
//! [`Registration`] guard, so a stream that fails or is cancelled at any point (a
//! black-holed `APP_HOST` whose connect never finishes, a relay that goes away) leaves
//! nothing behind in the program's map.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sluice_datapath::{self as datapath, PathKind, StreamEnd, StreamReport, Transfer};
use sluice_proto::wire::{self, AgentMsg, CounterSource, StreamOpen, StreamReply, StreamStat};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsStream;
use tracing::{Instrument, debug, info, warn};

use super::pool::{Pool, Tunnel};
use crate::meter::{Meter, Registration};

/// How long the agent waits for the private service to accept a connection.
pub const SERVICE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A framed stream's connection comes back to the pool when the stream ends, so it is
/// replaced only if the stream is still running after this long: short streams (a
/// connect, a query, a close) then cost no handshake, long ones still leave the pool
/// full for the next. A stream that took the last idle connection refills at once.
pub const REFILL_AFTER: Duration = Duration::from_millis(50);

/// A running stream's counts: from the eBPF program for its registered sockets, else
/// from the copy loop.
pub(super) struct ActiveStream {
    transfer: Transfer,
    /// The path the stream's bytes take.
    path: PathKind,
    /// The private-service socket (payload bytes of the stream).
    service: Option<Registration>,
    /// The tunnel socket (TLS bytes), registered for the connection's life (which may
    /// carry several streams), and its counts when this stream started.
    tunnel: Option<Arc<Registration>>,
    tunnel_base: (u64, u64),
    /// Bytes already added to the Prometheus counters.
    metered: Mutex<(u64, u64)>,
}

impl ActiveStream {
    /// (bytes in = to the service, bytes out = from the service) and who counted them.
    fn counts(&self) -> (u64, u64, CounterSource) {
        if let Some(c) = self.service.as_ref().and_then(Registration::counts) {
            return (c.sent, c.received, CounterSource::Ebpf);
        }
        let (plain_to_tunnel, tunnel_to_plain) = self.transfer.get();
        (tunnel_to_plain, plain_to_tunnel, CounterSource::Userspace)
    }

    fn stat_from(
        &self,
        stream_id: u64,
        closed: bool,
        counts: (u64, u64, CounterSource),
        tunnel: Option<(u64, u64)>,
    ) -> StreamStat {
        let (bytes_in, bytes_out, counter) = counts;
        let mut m = self.metered.lock();
        crate::metrics::bytes(bytes_in.saturating_sub(m.0), bytes_out.saturating_sub(m.1));
        *m = (bytes_in.max(m.0), bytes_out.max(m.1));
        StreamStat { stream_id, bytes_in, bytes_out, path: self.path, counter, closed, tunnel_bytes: tunnel }
    }

    /// Live stats (and their bytes into the metrics).
    pub(super) fn stat(&self, stream_id: u64) -> StreamStat {
        let tunnel = self.tunnel.as_ref().and_then(|r| r.counts()).map(|c| self.since_start_of((c.received, c.sent)));
        self.stat_from(stream_id, false, self.counts(), tunnel)
    }

    /// Tunnel (received, sent) bytes since this stream started.
    fn since_start_of(&self, (rx, tx): (u64, u64)) -> (u64, u64) {
        (rx.saturating_sub(self.tunnel_base.0), tx.saturating_sub(self.tunnel_base.1))
    }
}

/// Connects to `target`, registering the socket with `meter` before the handshake so
/// every byte is counted. Returns the socket and its registration (None: count in user
/// space). Cancelling the future (a timeout) drops the registration with it.
pub async fn connect_metered(
    target: &str,
    meter: Option<&Arc<Meter>>,
) -> std::io::Result<(TcpStream, Option<Registration>)> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, format!("{target} resolves to no address"));
    for addr in tokio::net::lookup_host(target).await? {
        let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        let registration = meter.and_then(|m| m.register(sock.as_fd()));
        match sock.connect(addr).await {
            Ok(s) => return Ok((s, registration)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Waits (up to 10 s) until the peer has acknowledged everything queued on `fd`, so the
/// eBPF program has seen every byte the application wrote before the final read.
async fn drained(fd: &OwnedFd) {
    for i in 0..1000u64 {
        match crate::meter::unacked_bytes(fd.as_fd()) {
            Some(0) | None => return,
            Some(_) => tokio::time::sleep(Duration::from_millis(1 + i.min(9))).await,
        }
    }
}

/// Connects to the private service for a stream the relay opened, and moves its bytes.
/// Once the relay has its answer (accepted or refused), the pool is refilled; for a
/// framed stream only if it still runs after [`REFILL_AFTER`], since its connection
/// comes back: the return value, after a clean end, with where the next stream's
/// count of the tunnel's TLS bytes starts.
pub(super) async fn serve(
    pool: &Arc<Pool>,
    mut tls: Box<Tunnel>,
    tunnel_reg: Option<Arc<Registration>>,
    tunnel_from: TunnelBytes,
    open: StreamOpen,
) -> Option<(Box<Tunnel>, TunnelBytes)> {
    let target = pool.service.target();
    let connect = tokio::time::timeout(SERVICE_CONNECT_TIMEOUT, connect_metered(target, Some(&pool.meter))).await;
    let answered = || super::pool::refill(pool);
    let (service, service_reg) = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            crate::metrics::stream_failed("service_unreachable");
            let why = format!("cannot connect to the private service {target}: {e}");
            pool.service.record_error(why.clone());
            answered();
            return refuse(tls, why).await;
        }
        Err(_) => {
            crate::metrics::stream_failed("service_unreachable");
            let why = format!("connecting to the private service {target} timed out after {SERVICE_CONNECT_TIMEOUT:?}");
            pool.service.record_error(why.clone());
            answered();
            return refuse(tls, why).await;
        }
    };
    pool.service.record_ok();
    let _ = service.set_nodelay(true);
    // If this process dies mid-stream the service must see a reset, not a FIN that makes
    // a truncated upload look complete; a clean end disarms it (the data path does).
    datapath::reset_on_close(&service);
    // The stream's tunnel bytes start here, before the reply: the relay sends the
    // client's first bytes once it reads it, and the kernel may receive (and the eBPF
    // program count) them before this task runs again.
    let tunnel_base = match tunnel_from {
        TunnelBytes::Since(base) => base,
        TunnelBytes::Now => {
            tunnel_reg.as_deref().and_then(|r| r.split_counts(tls.get_ref().0.tcp().as_fd())).unwrap_or((0, 0))
        }
    };
    let replied = wire::write_frame(&mut *tls, &StreamReply::Accepted).await;
    // A framed stream that took the last idle connection refills at once too: the next
    // stream would otherwise wait for a handshake (a ramp of long streams).
    if !open.framed || replied.is_err() || pool.idle() == 0 {
        answered();
    }
    if let Err(e) = replied {
        debug!(error = %e, "the relay went away before the stream started");
        return None;
    }
    let prepared = if open.framed {
        Ok(pool.data_path.prepare_framed(TlsStream::Client(*tls)))
    } else {
        pool.data_path.prepare(TlsStream::Client(*tls), pool.relay_follows_key_updates)
    };
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => {
            crate::metrics::stream_failed("ktls");
            datapath::reset(&service);
            warn!(stream = open.stream_id, error = %e, "stream failed: the kernel refused the connection's TLS keys");
            return None;
        }
    };
    debug!(stream = open.stream_id, path = prepared.path().as_str(), "stream open");
    // Keep the sockets open past the copy loop until the kernel has sent everything, so
    // the final eBPF counts include the last bytes (closing them here, not in the loop).
    let keep = |fd: BorrowedFd<'_>, registered: bool| registered.then(|| fd.try_clone_to_owned().ok()).flatten();
    let service_fd = keep(service.as_fd(), service_reg.is_some());
    let tunnel_fd = keep(prepared.tunnel_tcp().as_fd(), tunnel_reg.is_some());
    let stream = Arc::new(ActiveStream {
        transfer: Transfer::default(),
        path: prepared.path(),
        service: service_reg,
        tunnel: tunnel_reg,
        tunnel_base,
        metered: Mutex::new((0, 0)),
    });
    pool.active.lock().insert(open.stream_id, stream.clone());
    crate::metrics::stream_opened(prepared.path().as_str());
    // On the heap, as `serve` itself is (`pool.rs`): an async fn's state keeps room for
    // every await point's locals, and a held stream pays for all of it. For the same
    // reason the report (it holds the connection) is unpacked here, before any await.
    let (path, end, reusable) = {
        let mut run = Box::pin(prepared.run(service, &stream.transfer, &pool.stop_streams));
        // (`timeout`, not `select!`: the macro keeps room for its output, the report.)
        let report = if open.framed {
            match tokio::time::timeout(REFILL_AFTER, &mut run).await {
                Ok(report) => report,
                Err(_) => {
                    answered();
                    run.await
                }
            }
        } else {
            run.await
        };
        let StreamReport { path, end, reusable } = report;
        let reusable = reusable.filter(|_| !pool.closed.is_cancelled()).and_then(|tls| match *tls {
            TlsStream::Client(tls) => Some(Box::new(tls)),
            TlsStream::Server(_) => None,
        });
        (path, end, reusable)
    };
    crate::metrics::userspace_copy(stream.transfer.copied());
    pool.active.lock().remove(&open.stream_id);
    match reusable {
        Some(tls) => {
            // The connection carries the next stream at once; the final counts follow
            // beside it (the service's last bytes may still await their ACK). Its TLS
            // bytes until now are this stream's.
            let at_end =
                stream.tunnel.as_deref().zip(tunnel_fd.as_ref()).and_then(|(r, fd)| r.split_counts(fd.as_fd()));
            let tunnel = at_end.map(|e| stream.since_start_of(e));
            let next = at_end.map_or(TunnelBytes::Now, TunnelBytes::Since);
            let (pool, counted) = (pool.clone(), pool.drain.enter());
            let id = open.stream_id;
            tokio::spawn(
                async move {
                    finish(&pool, &stream, id, path, end, service_fd, TunnelEnd::Reused(tunnel)).await;
                    drop(counted);
                }
                .in_current_span(),
            );
            Some((tls, next))
        }
        None => {
            finish(pool, &stream, open.stream_id, path, end, service_fd, TunnelEnd::Closing(tunnel_fd)).await;
            None
        }
    }
}

/// Where a stream's count of its tunnel's TLS bytes starts: the connection's counts when
/// the stream is accepted, or (on a reused connection) where the previous stream's
/// ended, so bytes the previous stream wrote and the kernel sent later are not counted
/// twice.
#[derive(Debug, Clone, Copy)]
pub(super) enum TunnelBytes {
    Now,
    Since((u64, u64)),
}

/// A stream's tunnel connection at its end: kept for the next stream (with this
/// stream's TLS byte counts, taken at its end), or closing (its descriptor held until
/// the kernel has sent everything, for the final eBPF counts).
enum TunnelEnd {
    Reused(Option<(u64, u64)>),
    Closing(Option<OwnedFd>),
}

/// Takes a finished stream's final counts (once its sockets have sent everything),
/// reports them to the relay, and logs how it ended.
async fn finish(
    pool: &Pool,
    stream: &ActiveStream,
    stream_id: u64,
    path: PathKind,
    end: StreamEnd,
    service_fd: Option<OwnedFd>,
    tunnel: TunnelEnd,
) {
    if matches!(end, StreamEnd::Clean) {
        if let Some(fd) = &service_fd {
            drained(fd).await;
        }
        if let TunnelEnd::Closing(Some(fd)) = &tunnel {
            drained(fd).await;
        }
    }
    let service_final = stream.service.as_ref().and_then(Registration::finish);
    let tunnel_final = match tunnel {
        TunnelEnd::Reused(counts) => counts,
        TunnelEnd::Closing(fd) => {
            let tunnel = stream.tunnel.as_deref();
            let counts = tunnel.zip(fd.as_ref()).and_then(|(r, fd)| r.split_counts(fd.as_fd()));
            tunnel.map(Registration::finish);
            counts.map(|c| stream.since_start_of(c))
        }
    };
    drop(service_fd);
    let counts = match service_final {
        Some(c) => (c.sent, c.received, CounterSource::Ebpf),
        None => {
            let (plain_to_tunnel, tunnel_to_plain) = stream.transfer.get();
            (tunnel_to_plain, plain_to_tunnel, CounterSource::Userspace)
        }
    };
    let last = stream.stat_from(stream_id, true, counts, tunnel_final);
    let _ = pool.control.send(AgentMsg::StreamStats { streams: vec![last.clone()] });
    let (bytes_in, bytes_out) = (last.bytes_in, last.bytes_out);
    let (copied_out, copied_in) = stream.transfer.get();
    match end {
        StreamEnd::Clean => {
            crate::metrics::stream_closed("clean");
            debug!(
                path = path.as_str(),
                bytes_in,
                bytes_out,
                copied_in,
                copied_out,
                counter = counter_label(last.counter),
                "stream closed"
            )
        }
        end => {
            crate::metrics::stream_closed(if matches!(end, StreamEnd::Cancelled) { "cancelled" } else { "aborted" });
            info!(path = path.as_str(), bytes_in, bytes_out, end = %end.describe(), "stream ended abnormally")
        }
    }
}

async fn refuse(mut tls: Box<Tunnel>, reason: String) -> Option<(Box<Tunnel>, TunnelBytes)> {
    warn!(%reason, "stream refused");
    let _ = wire::write_frame(&mut *tls, &StreamReply::Refused { reason }).await;
    let _ = tls.shutdown().await;
    None
}

/// How a stream's byte counter is named in logs (as on the wire and in the admin API).
fn counter_label(counter: CounterSource) -> &'static str {
    match counter {
        CounterSource::Ebpf => "ebpf",
        CounterSource::Userspace => "userspace",
        CounterSource::Other => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::CounterMode;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// A black-holed service: its accept queue is full, so a further connect waits in
    /// SYN_SENT until cancelled. The socket registered for it must leave the eBPF map.
    #[tokio::test]
    async fn a_cancelled_connect_leaves_no_map_entry() {
        let (meter, why) = Meter::start(CounterMode::Auto);
        let meter = Arc::new(meter);
        if meter.source() != CounterSource::Ebpf {
            assert!(!(is_root() && cfg!(sluice_ebpf)), "as root the agent must load its eBPF program: {why:?}");
            return eprintln!("skipped: no eBPF here ({why:?})");
        }
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        listener.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let _fill: Vec<_> = (0..3)
            .filter_map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
            .collect();
        let before = meter.entries();
        let target = addr.to_string();
        let pending = tokio::time::timeout(Duration::from_millis(300), connect_metered(&target, Some(&meter)));
        assert!(pending.await.is_err(), "the connect should still be waiting on the full accept queue");
        assert_eq!(meter.entries(), before, "the cancelled connect's registration left the map");

        // And a registration that completes is removed by `finish`, once.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (_s, reg) = connect_metered(&l.local_addr().unwrap().to_string(), Some(&meter)).await.unwrap();
        let reg = reg.expect("registered with eBPF");
        assert_eq!(meter.entries(), before + 1);
        assert!(reg.finish().is_some());
        assert!(reg.finish().is_none(), "finished once");
        assert_eq!(meter.entries(), before);
    }
}
