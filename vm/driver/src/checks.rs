//! The end-to-end checks, each a client talking to the [`Backend`] through the relay's
//! per-resource port: a bulk transfer both ways at once, a half-close, a reset from
//! each end, and what the metrics say about the data path.
//!
//! Every check is bounded: sockets have read and write timeouts ([`STALL`]), and the
//! bulk transfer has an overall deadline after which its socket is shut down.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::backend::{Backend, Header, Mode, STALL, reset};
use crate::metrics::Metrics;
use crate::payload::{self, End, MIB, Received, short};
use crate::stack::Stack;

/// Counter of streams opened, by `path`, on each side.
pub const RELAY_OPENED: &str = "sluice_relay_streams_opened_total";
pub const AGENT_OPENED: &str = "sluice_agent_streams_opened_total";
/// Payload bytes that passed through a user-space buffer, on each side.
pub const RELAY_COPIED: &str = "sluice_relay_userspace_copy_bytes_total";
pub const AGENT_COPIED: &str = "sluice_agent_userspace_copy_bytes_total";

const GIB: f64 = (1u64 << 30) as f64;

/// Hands out connection ids, so each check finds its own backend report.
pub struct Ids(u64);

impl Ids {
    pub fn new() -> Self {
        Ids(0)
    }

    fn next(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
}

fn connect(endpoint: &str) -> Result<TcpStream> {
    let sa: SocketAddr = endpoint.parse().with_context(|| format!("endpoint {endpoint:?} is not a numeric ip:port"))?;
    let s = TcpStream::connect_timeout(&sa, Duration::from_secs(30))
        .with_context(|| format!("connecting to the resource port {endpoint}"))?;
    s.set_read_timeout(Some(STALL))?;
    s.set_write_timeout(Some(STALL))?;
    Ok(s)
}

/// What one bulk transfer measured.
#[derive(Debug, Clone)]
pub struct Bulk {
    /// MiB moved in each direction.
    pub mib: u64,
    pub secs: f64,
    /// CPU seconds (user + system) the relay and the agent spent during the transfer.
    pub cpu_relay: f64,
    pub cpu_agent: f64,
    /// Growth of `*_userspace_copy_bytes_total` during the transfer (`None`: not exported).
    pub copied_relay: Option<f64>,
    pub copied_agent: Option<f64>,
    /// Streams opened during the transfer, by `path` label.
    pub paths_relay: BTreeMap<String, f64>,
    pub paths_agent: BTreeMap<String, f64>,
    /// Peak RSS of the relay and the agent so far, MiB.
    pub rss: (f64, f64),
}

impl Bulk {
    /// MiB/s in each direction (both run at the same time).
    pub fn mib_per_sec(&self) -> f64 {
        self.mib as f64 / self.secs
    }

    /// CPU seconds of relay + agent per GiB of payload (both directions counted).
    pub fn cpu_per_gib(&self) -> f64 {
        (self.cpu_relay + self.cpu_agent) / (2.0 * self.mib as f64 * MIB as f64 / GIB)
    }

    pub fn summary(&self) -> String {
        format!(
            "{} MiB each way in {:.1} s: {:.2} MiB/s per direction; relay+agent {:.1} CPU-s/GiB (relay {:.1} s, agent \
             {:.1} s); user-space copied: relay {}, agent {}; paths relay {}, agent {}; peak RSS relay {:.0} MiB, \
             agent {:.0} MiB",
            self.mib,
            self.secs,
            self.mib_per_sec(),
            self.cpu_per_gib(),
            self.cpu_relay,
            self.cpu_agent,
            bytes(self.copied_relay),
            bytes(self.copied_agent),
            paths(&self.paths_relay),
            paths(&self.paths_agent),
            self.rss.0,
            self.rss.1
        )
    }
}

/// A byte count for reports, `absent` when the metric is not exported.
pub fn bytes(b: Option<f64>) -> String {
    match b {
        None => "absent".into(),
        Some(b) if b >= MIB as f64 => format!("{:.1} MiB", b / MIB as f64),
        Some(b) => format!("{b:.0} B"),
    }
}

/// `{path=count, …}` for reports.
pub fn paths(p: &BTreeMap<String, f64>) -> String {
    let inner: Vec<String> =
        p.iter().map(|(k, v)| format!("{}={v}", if k.is_empty() { "(none)" } else { k })).collect();
    format!("{{{}}}", inner.join(", "))
}

/// `after - before` per label, dropping zeros.
fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v != 0.0)
        .collect()
}

fn sub(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    Some(after? - before.unwrap_or(0.0))
}

/// What a bulk transfer's client threads report.
enum Done {
    Sent(std::io::Result<[u8; 32]>),
    Got(Received),
}

/// `mib` MiB client → backend and `mib` MiB backend → client at the same time on one
/// stream, SHA-256 compared at both ends, with CPU time and metrics around it.
pub fn bulk(stack: &Stack, backend: &mut Backend, ids: &mut Ids, mib: u64) -> Result<Bulk> {
    let n = mib * MIB;
    let (r0, a0) = (stack.relay_metrics()?, stack.agent_metrics()?);
    let cpu0 = stack.cpu_seconds()?;
    let t = transfer(stack, ids, mib, Mode::Bulk)?;
    let cpu1 = stack.cpu_seconds()?;
    let report = backend.report(t.id, Duration::from_secs(60))?;
    let sent = t
        .sent
        .with_context(|| format!("sending failed after {:.1} MiB\n{}", t.up as f64 / MIB as f64, stack.log_tails()))?;
    check_received("client → backend", &report.received, n, &sent)?;
    let (_, backend_sent) = report
        .sent
        .with_context(|| format!("the backend's sending failed: {}", report.send_error.clone().unwrap_or_default()))?;
    check_received("backend → client", &t.got, n, &backend_sent)?;

    let (r1, a1) = (stack.relay_metrics()?, stack.agent_metrics()?);
    Ok(Bulk {
        mib,
        secs: t.secs,
        cpu_relay: cpu1.0 - cpu0.0,
        cpu_agent: cpu1.1 - cpu0.1,
        copied_relay: sub(r0.sum(RELAY_COPIED), r1.sum(RELAY_COPIED)),
        copied_agent: sub(a0.sum(AGENT_COPIED), a1.sum(AGENT_COPIED)),
        paths_relay: delta(&r0.by_label(RELAY_OPENED, "path"), &r1.by_label(RELAY_OPENED, "path")),
        paths_agent: delta(&a0.by_label(AGENT_OPENED, "path"), &a1.by_label(AGENT_OPENED, "path")),
        rss: stack.peak_rss_mib(),
    })
}

/// What the client of one bulk-mode stream saw.
struct Transfer {
    /// The connection id (the backend's report is found by it).
    id: u64,
    secs: f64,
    /// The client's sending: the SHA-256 of what it wrote, or the error that stopped it.
    sent: std::io::Result<[u8; 32]>,
    /// Bytes the client's writer got through.
    up: u64,
    /// What the client's reader got and how its stream ended.
    got: Received,
}

/// `mib` MiB each way on one stream, the client's two directions on their own threads
/// (the writer half-closes when done); returns what the client saw, judging nothing.
/// With [`Mode::Bulk`] the backend sends while it reads, with [`Mode::HalfClose`] only
/// after it read the whole request and its EOF. Fails only if the transfer is not over
/// within the deadline (60 s + 1 s per MiB).
fn transfer(stack: &Stack, ids: &mut Ids, mib: u64, mode: Mode) -> Result<Transfer> {
    let n = mib * MIB;
    let id = ids.next();
    let header = Header { id, mode, up: n, down: n, seed: id };
    let start = Instant::now();

    let s = connect(&stack.endpoint)?;
    let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (tx, rx) = mpsc::channel();
    let (mut w, mut r) = (s.try_clone()?, s.try_clone()?);
    let (txw, upw) = (tx.clone(), up.clone());
    std::thread::spawn(move || {
        let sent = w.write_all(&header.encode()).and_then(|()| payload::send(&mut w, n, header.seed, &upw));
        let _ = w.shutdown(Shutdown::Write);
        let _ = txw.send(Done::Sent(sent));
    });
    let downr = down.clone();
    std::thread::spawn(move || {
        let _ = tx.send(Done::Got(payload::receive(&mut r, &downr)));
    });
    // At least 1 MiB/s per direction (a third of the emulated speed), as the host's VM
    // time limit assumes, so a stuck transfer is reported here before QEMU is killed.
    let deadline = start + Duration::from_secs(60 + mib);
    let (mut sent, mut got) = (None, None);
    while sent.is_none() || got.is_none() {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Done::Sent(x)) => sent = Some(x),
            Ok(Done::Got(x)) => got = Some(x),
            Err(_) => {
                let _ = s.shutdown(Shutdown::Both);
                bail!(
                    "not done after {:.0} s: sent {:.1} of {mib} MiB, received {:.1} of {mib} MiB\n{}",
                    start.elapsed().as_secs_f64(),
                    up.load(Ordering::Relaxed) as f64 / MIB as f64,
                    down.load(Ordering::Relaxed) as f64 / MIB as f64,
                    stack.log_tails()
                );
            }
        }
    }
    Ok(Transfer {
        id,
        secs: start.elapsed().as_secs_f64(),
        sent: sent.expect("set"),
        up: up.load(Ordering::Relaxed),
        got: got.expect("set"),
    })
}

/// The receiver got exactly `len` bytes with the sender's digest, then a clean EOF.
fn check_received(what: &str, got: &Received, len: u64, sent: &[u8; 32]) -> Result<()> {
    ensure!(
        matches!(got.end, End::Eof),
        "{what}: the stream ended with {} after {} of {len} bytes",
        got.end.describe(),
        got.bytes
    );
    ensure!(got.bytes == len, "{what}: {} bytes arrived, {len} were sent", got.bytes);
    ensure!(
        got.digest == *sent,
        "{what}: SHA-256 differs (sent {}…, received {}…): the bytes were altered",
        short(sent),
        short(&got.digest)
    );
    Ok(())
}

/// The client sends a request and half-closes; the backend must see EOF and still send
/// a reply the client reads whole, followed by EOF.
pub fn half_close(stack: &Stack, backend: &mut Backend, ids: &mut Ids) -> Result<String> {
    let (req, reply) = (256 * 1024u64, MIB);
    let id = ids.next();
    let header = Header { id, mode: Mode::HalfClose, up: req, down: reply, seed: id };
    let mut s = connect(&stack.endpoint)?;
    s.write_all(&header.encode())?;
    let sent = payload::send(&mut s, req, header.seed, &AtomicU64::new(0))?;
    s.shutdown(Shutdown::Write).context("half-closing the client socket")?;
    let got = payload::receive(&mut s, &AtomicU64::new(0));
    let report = backend.report(id, Duration::from_secs(60)).with_context(|| stack.log_tails())?;
    check_received("request (client → backend, then FIN)", &report.received, req, &sent)
        .with_context(|| stack.log_tails())?;
    let (_, reply_digest) = report.sent.with_context(|| {
        format!(
            "the backend saw the request's EOF but could not send its reply: {}",
            report.send_error.clone().unwrap_or_default()
        )
    })?;
    check_received("reply (backend → client after the client's FIN)", &got, reply, &reply_digest)
        .with_context(|| stack.log_tails())?;
    Ok(format!(
        "{} KiB request + FIN → backend saw EOF; its {} KiB reply arrived whole, then EOF",
        req / 1024,
        reply / 1024
    ))
}

/// The backend resets the connection mid-stream: the client must see an error, not a
/// clean EOF.
pub fn abort_backend(stack: &Stack, backend: &mut Backend, ids: &mut Ids) -> Result<String> {
    let (before_reset, down) = (512 * 1024u64, 256 * 1024u64);
    let id = ids.next();
    let header = Header { id, mode: Mode::BackendAbort, up: before_reset, down, seed: id };
    let s = connect(&stack.endpoint)?;
    let mut w = s.try_clone()?;
    // The client sends what the backend reads and no more. A socket reports a received
    // reset once (the pending error is cleared by the first call that sees it, then
    // reads return 0): a writer still sending would take the ECONNRESET and leave the
    // reader an EOF that looks like a clean end.
    let writer = std::thread::spawn(move || {
        w.write_all(&header.encode())
            .and_then(|()| payload::send(&mut w, before_reset, header.seed, &AtomicU64::new(0)))
    });
    let got = payload::receive(&mut (&s), &AtomicU64::new(0));
    let _ = s.shutdown(Shutdown::Both); // unblocks the writer if the stream did not reset
    let writer = writer.join().map_err(|_| anyhow::anyhow!("client writer panicked"))?;
    let report = backend.report(id, Duration::from_secs(60))?;
    ensure!(
        report.received.bytes == before_reset,
        "the backend read {} bytes before resetting, wanted {before_reset}",
        report.received.bytes
    );
    match got.end {
        End::Error(e) => Ok(format!(
            "backend read {} KiB, sent {} KiB, reset → client got {:?} after {} KiB (its writer: {})",
            before_reset / 1024,
            down / 1024,
            e.kind(),
            got.bytes / 1024,
            writer.err().map_or("finished".into(), |e| format!("{:?}", e.kind()))
        )),
        End::Eof => bail!(
            "the client saw a clean EOF after {} KiB although the backend reset the connection: the abort \
             reached the client as a FIN (it must be a reset)\n{}",
            got.bytes / 1024,
            stack.log_tails()
        ),
        End::Stalled => bail!(
            "the client saw neither an error nor EOF within {} s after the backend reset\n{}",
            STALL.as_secs(),
            stack.log_tails()
        ),
    }
}

/// The client resets its connection mid-stream: the backend must see an error, not a
/// clean EOF.
pub fn abort_client(stack: &Stack, backend: &mut Backend, ids: &mut Ids) -> Result<String> {
    let sent = 256 * 1024u64;
    let id = ids.next();
    let header = Header { id, mode: Mode::ClientAbort, up: 0, down: 0, seed: id };
    let mut s = connect(&stack.endpoint)?;
    s.write_all(&header.encode())?;
    let mut ready = [0u8; 1];
    s.read_exact(&mut ready).with_context(|| format!("waiting for the backend's ready byte\n{}", stack.log_tails()))?;
    ensure!(ready == *b"R", "the backend sent {ready:?} instead of its ready byte");
    payload::send(&mut s, sent, header.seed, &AtomicU64::new(0))?;
    reset(s);
    let report = backend.report(id, STALL + Duration::from_secs(30))?;
    match report.received.end {
        End::Error(e) => Ok(format!(
            "client sent {} KiB, reset → backend got {:?} after {} KiB",
            sent / 1024,
            e.kind(),
            report.received.bytes / 1024
        )),
        End::Eof => bail!(
            "the backend saw a clean EOF after {} KiB although the client reset its connection: the abort reached \
             the backend as a FIN (it must be a reset)\n{}",
            report.received.bytes / 1024,
            stack.log_tails()
        ),
        End::Stalled => bail!(
            "the backend saw neither an error nor EOF within {} s after the client reset\n{}",
            STALL.as_secs(),
            stack.log_tails()
        ),
    }
}

/// The control session the relay and agent started with is still the only one: neither
/// side ended it (a heartbeat declaring the peer dead, a failed read or write) during
/// `during`. With `--heartbeat-secs 1` a control session starved of CPU for 3 s by the
/// data path fails this.
pub fn heartbeat(stack: &Stack, during: &str) -> Result<String> {
    let ends = stack.session_ends();
    ensure!(
        ends.is_empty(),
        "the control session ended during {during} (heartbeat every {} s, dead after {} s of silence):\n{}",
        stack.heartbeat_secs,
        3 * stack.heartbeat_secs,
        ends.join("\n")
    );
    Ok(format!(
        "one control session throughout {during}, heartbeat every {} s (a silent peer is dead after {} s)",
        stack.heartbeat_secs,
        3 * stack.heartbeat_secs
    ))
}

/// Which `path` labels a check accepts.
#[derive(Debug, Clone, Copy)]
pub enum Want<'a> {
    /// Any kernel-TLS path (`ktls_*`): the default engine, whichever it is.
    AnyKtls,
    /// Exactly this label (a forced engine, or `userspace`).
    Exactly(&'a str),
}

impl Want<'_> {
    fn accepts(&self, path: &str) -> bool {
        match self {
            Want::AnyKtls => path.starts_with("ktls_"),
            Want::Exactly(p) => path == *p,
        }
    }

    fn describe(&self) -> String {
        match self {
            Want::AnyKtls => "a ktls_* path".into(),
            Want::Exactly(p) => format!("path {p}"),
        }
    }
}

/// Every stream counted in `relay`/`agent` (streams opened, by `path`) went through a
/// path `want` accepts, on both sides, and at least one stream was counted on each.
pub fn check_paths(relay: &BTreeMap<String, f64>, agent: &BTreeMap<String, f64>, want: Want) -> Result<()> {
    check_paths_each(relay, want, agent, want)
}

/// [`check_paths`] with a different expectation per side (the `rekey` checks run one
/// end on user space and the other on kTLS).
pub fn check_paths_each(
    relay: &BTreeMap<String, f64>,
    want_relay: Want,
    agent: &BTreeMap<String, f64>,
    want_agent: Want,
) -> Result<()> {
    let bad = |m: &BTreeMap<String, f64>, want: Want| m.iter().any(|(p, n)| *n > 0.0 && !want.accepts(p));
    let count = |m: &BTreeMap<String, f64>| m.values().sum::<f64>();
    if count(relay) == 0.0 || count(agent) == 0.0 || bad(relay, want_relay) || bad(agent, want_agent) {
        let want = if want_relay.describe() == want_agent.describe() {
            format!("{} on both sides", want_relay.describe())
        } else {
            format!("{} on the relay and {} on the agent", want_relay.describe(), want_agent.describe())
        };
        bail!("streams by path: relay {}, agent {}; want every stream on {want}", paths(relay), paths(agent));
    }
    Ok(())
}

/// The `path` check over whole-process metrics: every stream on a kTLS path on both
/// sides, and no payload byte copied through user space (unless the copy engine ran).
pub fn path(relay: &Metrics, agent: &Metrics, want: Want) -> Result<String> {
    let (rp, ap) = (relay.by_label(RELAY_OPENED, "path"), agent.by_label(AGENT_OPENED, "path"));
    check_paths(&rp, &ap, want).context(
        "the data path is not kernel TLS (binaries without the kTLS data path, or kTLS refused: see the data-path \
         INFO lines above)",
    )?;
    let (rc, ac) = (relay.sum(RELAY_COPIED), agent.sum(AGENT_COPIED));
    let copy_engine = rp.contains_key("ktls_copy") || ap.contains_key("ktls_copy");
    match (rc, ac) {
        (Some(r), Some(a)) if (r == 0.0 && a == 0.0) || copy_engine => {}
        (Some(_), Some(_)) => bail!(
            "user-space copied bytes: relay {}, agent {}; want 0 on both (payload must not pass through user space \
             on a splice path)",
            bytes(rc),
            bytes(ac)
        ),
        _ => bail!(
            "{RELAY_COPIED} is {} and {AGENT_COPIED} is {}: both must be exported (register them at start, at 0)",
            bytes(rc),
            bytes(ac)
        ),
    }
    Ok(format!(
        "streams by path: relay {}, agent {}; user-space copied bytes: relay {}, agent {}",
        paths(&rp),
        paths(&ap),
        bytes(rc),
        bytes(ac)
    ))
}

/// Key updates the kernel-TLS path followed and sent, by `direction`, on each side.
pub const RELAY_KEY_UPDATES: &str = "sluice_relay_tls_key_updates_total";
pub const AGENT_KEY_UPDATES: &str = "sluice_agent_tls_key_updates_total";

/// Which end of the tunnel runs kTLS while the other runs rustls with a lowered
/// KeyUpdate interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KtlsEnd {
    Relay,
    Agent,
}

impl KtlsEnd {
    pub fn name(self) -> &'static str {
        match self {
            KtlsEnd::Relay => "relay",
            KtlsEnd::Agent => "agent",
        }
    }

    fn metric(self) -> &'static str {
        match self {
            KtlsEnd::Relay => RELAY_KEY_UPDATES,
            KtlsEnd::Agent => AGENT_KEY_UPDATES,
        }
    }
}

/// `received` and `sent` of a key-update counter (`None`: the metric is not exported).
pub fn key_updates(m: &Metrics, metric: &str) -> Option<(f64, f64)> {
    m.sum(metric)?;
    let by = m.by_label(metric, "direction");
    Some((by.get("received").copied().unwrap_or(0.0), by.get("sent").copied().unwrap_or(0.0)))
}

/// The `rekey_*` checks on a kernel that takes new kTLS keys (>= 6.14): the stack runs
/// `ktls_end` on kTLS and the other end on rustls sending a KeyUpdate every few hundred
/// records. A bulk transfer both ways must arrive exactly, every stream of `ktls_end`
/// must be on kTLS (the other end's on user space), and `ktls_end`'s key-update counter
/// must show at least `min_received` KeyUpdates followed and `min_sent` sent in answer.
pub fn rekey_followed(
    stack: &Stack,
    backend: &mut Backend,
    ids: &mut Ids,
    mib: u64,
    ktls_end: KtlsEnd,
    min_received: f64,
    min_sent: f64,
) -> Result<String> {
    let b = bulk(stack, backend, ids, mib)?;
    let (want_relay, want_agent) = match ktls_end {
        KtlsEnd::Relay => (Want::AnyKtls, Want::Exactly("userspace")),
        KtlsEnd::Agent => (Want::Exactly("userspace"), Want::AnyKtls),
    };
    check_paths_each(&b.paths_relay, want_relay, &b.paths_agent, want_agent).with_context(|| {
        format!(
            "the {} must follow the KeyUpdates on kTLS while its peer runs rustls; {}",
            ktls_end.name(),
            b.summary()
        )
    })?;
    let m = match ktls_end {
        KtlsEnd::Relay => stack.relay_metrics()?,
        KtlsEnd::Agent => stack.agent_metrics()?,
    };
    let metric = ktls_end.metric();
    let (received, sent) = key_updates(&m, metric).with_context(|| {
        format!(
            "the {} does not export {metric} (binaries without the KeyUpdate support?); transfer: {}",
            ktls_end.name(),
            b.summary()
        )
    })?;
    ensure!(
        received >= min_received && sent >= min_sent,
        "{metric}: received {received}, sent {sent}; want received >= {min_received} (KeyUpdates from the rustls \
         peer followed on kTLS) and sent >= {min_sent} (answered with the {}'s own KeyUpdate)\n{}",
        ktls_end.name(),
        stack.log_tails()
    );
    Ok(format!("{metric}{{direction=received}} {received}, {{direction=sent}} {sent}; {}", b.summary()))
}

/// The `rekey_both_ktls` check on a kernel that takes new kTLS keys: relay and agent both
/// on kTLS with a lowered record budget per key, so each kernel-TLS send direction
/// updates its own key (both ends announced that they follow key updates) and each
/// receive side follows the other's. A bulk transfer both ways must arrive exactly, on
/// kTLS at both ends, and each end's counter must show at least `min` updates sent and
/// `min` received.
pub fn rekey_both_ktls(stack: &Stack, backend: &mut Backend, ids: &mut Ids, mib: u64, min: f64) -> Result<String> {
    let b = bulk(stack, backend, ids, mib)?;
    check_paths_each(&b.paths_relay, Want::AnyKtls, &b.paths_agent, Want::AnyKtls)
        .with_context(|| format!("relay and agent must both run kTLS; {}", b.summary()))?;
    let mut seen = Vec::new();
    for end in [KtlsEnd::Relay, KtlsEnd::Agent] {
        let m = match end {
            KtlsEnd::Relay => stack.relay_metrics()?,
            KtlsEnd::Agent => stack.agent_metrics()?,
        };
        let metric = end.metric();
        let (received, sent) =
            key_updates(&m, metric).with_context(|| format!("the {} does not export {metric}", end.name()))?;
        ensure!(
            received >= min && sent >= min,
            "{metric}: received {received}, sent {sent}; want both >= {min} (each kTLS sender updates its own key \
             after the lowered record budget, each receiver follows)\n{}",
            stack.log_tails()
        );
        seen.push(format!("{metric}{{direction=received}} {received}, {{direction=sent}} {sent}"));
    }
    Ok(format!("{}; {}", seen.join("; "), b.summary()))
}

/// How the client's side of a transfer that had to be aborted ended.
#[derive(Debug, PartialEq, Eq)]
pub enum AbortSeen {
    /// An error (reset) reached the client's reader or writer: the abort is visible.
    Error,
    /// Everything arrived and ended cleanly: nothing was aborted.
    Completed,
    /// The reader got a clean EOF before all bytes and the writer no error: silent
    /// truncation.
    Truncated,
    /// The reader timed out.
    Stalled,
}

/// Judges a transfer whose stream must be aborted. A socket reports a received reset
/// once, to whichever call sees it first, so an error at the reader *or* the writer
/// counts; a short clean EOF with a writer that saw no error is truncation.
pub fn judge_abort(reader: &End, reader_bytes: u64, writer_failed: bool, len: u64) -> AbortSeen {
    match reader {
        End::Error(_) => AbortSeen::Error,
        End::Stalled => AbortSeen::Stalled,
        End::Eof if writer_failed => AbortSeen::Error,
        End::Eof if reader_bytes >= len => AbortSeen::Completed,
        End::Eof => AbortSeen::Truncated,
    }
}

/// `rekey_unsupported`, on a kernel whose kTLS cannot follow a KeyUpdate (< 6.14): the
/// relay runs rustls with a KeyUpdate every few hundred records, the agent kTLS. The
/// client sends a `mib` MiB request and half-closes; the backend would send its `mib`
/// MiB reply only after the whole request (half-close mode), so the client is still
/// waiting for it when the KeyUpdate in the request aborts the stream. (With both
/// directions at once, the reply could be complete and the client done before the
/// abort, leaving it nothing to observe.) The stream must abort — an error (reset) at
/// the client and at the backend, never a clean shorter EOF — and the agent's log must
/// say why (a line containing `KeyUpdate`).
pub fn rekey_unsupported(stack: &Stack, backend: &mut Backend, ids: &mut Ids, mib: u64) -> Result<String> {
    let n = mib * MIB;
    let t = transfer(stack, ids, mib, Mode::HalfClose)?;
    let writer_error = t.sent.as_ref().err().map(|e| format!("{:?} ({e})", e.kind()));
    let report = backend.report(t.id, Duration::from_secs(30));
    let backend_view = match &report {
        Ok(r) => format!(
            "backend read {:.1} of {mib} MiB, then {}; its sending: {}",
            r.received.bytes as f64 / MIB as f64,
            r.received.end.describe(),
            r.send_error.as_deref().unwrap_or("no error")
        ),
        Err(e) => format!("no backend report ({e:#})"),
    };
    let client_view = format!(
        "client sent {:.1} of {mib} MiB ({}), received {:.1} of {mib} MiB, then {}",
        t.up as f64 / MIB as f64,
        writer_error.as_deref().unwrap_or("no error"),
        t.got.bytes as f64 / MIB as f64,
        t.got.end.describe()
    );
    let views = format!("{client_view}; {backend_view}");
    // Both ends of the tunnel must see the abort: the client, and the backend behind
    // the agent (an abort resets both sockets; a clean short EOF is truncation).
    let judged = [
        ("client", judge_abort(&t.got.end, t.got.bytes, writer_error.is_some(), n)),
        (
            "backend",
            match &report {
                Ok(r) => judge_abort(&r.received.end, r.received.bytes, r.send_error.is_some(), n),
                Err(_) => AbortSeen::Stalled,
            },
        ),
    ];
    for (who, seen) in judged {
        match seen {
            AbortSeen::Error => {}
            AbortSeen::Completed => bail!(
                "the {who}'s side completed although the relay sent KeyUpdates to a kTLS agent on a kernel that \
                 cannot follow them: {views}\n{}",
                stack.log_tails()
            ),
            AbortSeen::Truncated => bail!(
                "silent truncation: the {who} got a clean EOF before all bytes and no error: {views}\n{}",
                stack.log_tails()
            ),
            AbortSeen::Stalled => bail!("the {who}'s side stalled: {views}\n{}", stack.log_tails()),
        }
    }
    // The abort is logged when the agent's data path sees the KeyUpdate; give the log a
    // moment to reach the file.
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let text = std::fs::read_to_string(&stack.agent_log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("KeyUpdate")) {
            break l.trim().to_string();
        }
        if Instant::now() > deadline {
            bail!(
                "the stream aborted ({views}) but no line of the agent's log {} contains \
                 \"KeyUpdate\"\n{}",
                stack.agent_log.display(),
                stack.log_tails()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    Ok(format!("aborted as it must on this kernel: {views}; agent log: {line}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abort_judgement() {
        let err = || End::Error(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(judge_abort(&err(), 10, false, 100), AbortSeen::Error);
        assert_eq!(judge_abort(&End::Eof, 10, true, 100), AbortSeen::Error, "the writer took the reset");
        assert_eq!(judge_abort(&End::Eof, 10, false, 100), AbortSeen::Truncated);
        assert_eq!(judge_abort(&End::Eof, 100, false, 100), AbortSeen::Completed);
        assert_eq!(judge_abort(&End::Stalled, 10, false, 100), AbortSeen::Stalled);
    }

    #[test]
    fn key_update_counters() {
        let m = crate::metrics::parse(
            "sluice_agent_tls_key_updates_total{direction=\"received\"} 4\n\
             sluice_agent_tls_key_updates_total{direction=\"sent\"} 1\n",
        );
        assert_eq!(key_updates(&m, AGENT_KEY_UPDATES), Some((4.0, 1.0)));
        assert_eq!(key_updates(&m, RELAY_KEY_UPDATES), None);
        let only_received = crate::metrics::parse("sluice_relay_tls_key_updates_total{direction=\"received\"} 2\n");
        assert_eq!(key_updates(&only_received, RELAY_KEY_UPDATES), Some((2.0, 0.0)));
    }

    #[test]
    fn paths_per_side() {
        let m = |p: &str| BTreeMap::from([(p.to_string(), 1.0)]);
        check_paths_each(&m("userspace"), Want::Exactly("userspace"), &m("ktls_splice"), Want::AnyKtls).unwrap();
        let e =
            check_paths_each(&m("userspace"), Want::Exactly("userspace"), &m("userspace"), Want::AnyKtls).unwrap_err();
        assert!(e.to_string().contains("path userspace on the relay and a ktls_* path on the agent"), "{e}");
        check_paths(&m("ktls_splice"), &m("ktls_splice"), Want::AnyKtls).unwrap();
    }
}
