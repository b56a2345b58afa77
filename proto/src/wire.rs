//! The wire protocol between agent and relay: every message, and how it is framed.
//!
//! All agent traffic arrives on one relay port. TLS ALPN says what a connection is:
//!
//! | ALPN                | TLS              | carries                                             |
//! |---------------------|------------------|-----------------------------------------------------|
//! | [`ALPN_ENROLL`]     | server-auth only | one [`EnrollRequest`] → one [`EnrollResponse`]     |
//! | [`ALPN_CONTROL`]    | mutual           | [`AgentMsg`] ⇄ [`RelayMsg`] for the agent's session |
//! | [`ALPN_DATA`]       | mutual           | [`DataHello`], then one [`StreamOpen`] + [`StreamReply`], then raw stream bytes |
//!
//! Messages are framed as a 4-byte big-endian length followed by that many bytes of
//! JSON. Frames are small and rare (the payload of a stream is never framed), so a
//! self-describing encoding costs nothing measurable and keeps the protocol easy to
//! read in a capture and to extend: unknown fields are ignored, and every message
//! family carries [`PROTOCOL_VERSION`] in its opening message.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::identity::{AgentId, ResourceId, SessionId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Version of this protocol. A relay refuses an agent whose version it does not speak.
pub const PROTOCOL_VERSION: u32 = 1;

/// Why a relay refuses an agent speaking protocol `agent_version`, and which side to
/// upgrade: relays are upgraded first (docs/operations.md), so an agent newer than its
/// relay means the relay is behind.
pub fn version_refusal(agent_version: u32) -> String {
    let what =
        format!("agent protocol version {agent_version} is not supported by this relay (it speaks {PROTOCOL_VERSION})");
    if agent_version > PROTOCOL_VERSION {
        format!(
            "{what}: the agent is newer than the relay; upgrade the relay first (relays before agents), \
             or run an agent release that speaks protocol {PROTOCOL_VERSION}"
        )
    } else {
        format!("{what}: the agent is older than the relay; upgrade the agent")
    }
}
/// ALPN of an enrollment connection (server-authenticated TLS, no client certificate).
pub const ALPN_ENROLL: &[u8] = b"sluice-enroll/1";
/// ALPN of an agent's control session (mutual TLS).
pub const ALPN_CONTROL: &[u8] = b"sluice-control/1";
/// ALPN of a data connection: one stream's bytes once opened (mutual TLS).
pub const ALPN_DATA: &[u8] = b"sluice-data/1";
/// Largest frame either side accepts; anything larger is a protocol error.
pub const MAX_FRAME: usize = 1 << 20;
/// Largest frame from a peer that has not authenticated yet: an enrollment request (a
/// JWT, a CSR and two short strings fit in a few KiB).
pub const MAX_UNAUTHENTICATED_FRAME: usize = 64 << 10;
/// A frame's body buffer starts at most this big and grows only as bytes arrive, so a
/// peer that declares a large frame and stalls costs next to nothing.
const FIRST_BODY_CHUNK: usize = 8 << 10;

/// Why reading or writing a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed the connection cleanly between frames.
    #[error("connection closed by peer")]
    Closed,
    /// The connection ended inside a frame (its length prefix or its body): the peer
    /// went away mid-message, which is not a clean close.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The transport failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer declared a frame larger than the limit for this connection.
    #[error("frame of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge { len: usize, limit: usize },
    /// The frame was not the JSON of the expected message.
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Writes one message as a frame and flushes it.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), WireError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let frame = encode_frame(msg)?;
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

/// One message as a frame's bytes (length, then JSON body), for a caller that sends
/// more in the same write.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(WireError::TooLarge { len: body.len(), limit: MAX_FRAME });
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Reads one frame and decodes it as `T`. Reads exactly the frame's bytes and no more,
/// so a data connection can switch to raw stream bytes right after its last frame.
///
/// End of stream before the frame's first byte is [`WireError::Closed`]; anywhere
/// later it is [`WireError::Truncated`]. The body buffer is allocated only once the
/// length is known to be at most [`MAX_FRAME`], and it grows as the body's bytes arrive.
pub async fn read_frame<R, T>(r: &mut R) -> Result<T, WireError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_limited(r, MAX_FRAME).await
}

/// [`read_frame`] with a smaller limit, for peers that have not authenticated yet
/// ([`MAX_UNAUTHENTICATED_FRAME`]).
pub async fn read_frame_limited<R, T>(r: &mut R, limit: usize) -> Result<T, WireError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    if r.read(&mut len[..1]).await? == 0 {
        return Err(WireError::Closed);
    }
    read_all(r, &mut len[1..]).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit.min(MAX_FRAME) {
        return Err(WireError::TooLarge { len, limit: limit.min(MAX_FRAME) });
    }
    let mut body = Vec::with_capacity(len.min(FIRST_BODY_CHUNK));
    read_body(r, len, &mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

/// Reads exactly `len` bytes into `body`, growing it as they arrive (never past what the
/// peer actually sent, give or take the vector's doubling).
async fn read_body<R: AsyncRead + Unpin>(r: &mut R, len: usize, body: &mut Vec<u8>) -> Result<(), WireError> {
    let got = r.take(len as u64).read_to_end(body).await?;
    if got < len {
        return Err(WireError::Truncated);
    }
    Ok(())
}

/// `read_exact` inside a frame, where end of stream means [`WireError::Truncated`].
async fn read_all<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), WireError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(WireError::Truncated),
        Err(e) => Err(e.into()),
    }
}

// === Enrollment ===

/// Sent by a new agent: "here is my registration JWT and a CSR for my locally made key".
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EnrollRequest {
    pub version: u32,
    /// The registration JWT the operator handed to the customer.
    pub jwt: String,
    /// The resource name (`NAME`); agents of one customer with the same name form a group.
    pub name: String,
    /// PEM certificate signing request for the agent's key (the key never leaves the host).
    pub csr_pem: String,
    pub agent_version: String,
    pub hostname: String,
}

/// The relay's answer to an [`EnrollRequest`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EnrollResponse {
    Enrolled(Enrollment),
    Rejected(Rejection),
}

/// A successful enrollment: the agent's identity and client certificate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Enrollment {
    pub resource_id: ResourceId,
    pub resource_name: String,
    pub customer_id: Option<String>,
    pub agent_id: AgentId,
    /// Key generation of the resource; a rotation makes certificates of older ones invalid.
    pub generation: u64,
    /// The client certificate (PEM) for the key of the CSR.
    pub cert_pem: String,
    /// The relay's CA certificate (PEM); the agent trusts only this for the relay.
    pub ca_pem: String,
}

/// Why the relay refused a request. Everything but [`RejectCode::Internal`] and
/// [`RejectCode::Unavailable`] is permanent: retrying the same request cannot succeed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// The JWT is malformed or its signature does not verify with this relay's key.
    InvalidToken,
    /// The JWT has expired.
    ExpiredToken,
    /// The JWT was revoked (a rotation of its resource, or the resource was deleted).
    RevokedToken,
    /// The request names something the token does not grant (another customer's resource).
    Forbidden,
    /// The client certificate is of an older key generation or for a deleted resource.
    RevokedCertificate,
    /// The request is malformed (bad CSR, empty name, …).
    BadRequest,
    /// The agent speaks a protocol version this relay does not.
    UnsupportedVersion,
    /// Something failed on the relay; try again later.
    Internal,
    /// The relay is shutting down or overloaded; try again later.
    Unavailable,
}

impl RejectCode {
    /// Whether retrying the same request later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(self, RejectCode::Internal | RejectCode::Unavailable)
    }
}

/// A refusal with a human-readable reason (what happened, why, what to do).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Rejection {
    pub code: RejectCode,
    pub message: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

// === Control session ===

/// What an agent can do beyond the baseline; lets the relay pick paths and features.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Capabilities {
    /// The agent's kernel accepted kernel TLS.
    #[serde(default)]
    pub ktls: bool,
    /// The agent counts stream bytes with eBPF.
    #[serde(default)]
    pub ebpf: bool,
    /// Certificate renewal over the control session ([`AgentMsg::RenewCertificate`]).
    /// In [`RelayMsg::Welcome`] it says the relay answers it; an agent only sends what
    /// its relay announced, so either side may be upgraded first.
    #[serde(default)]
    pub renew: bool,
    /// Reports of the private service's reachability ([`AgentMsg::ServiceStatus`]).
    #[serde(default)]
    pub service_status: bool,
    /// Relay clusters: from the agent, "I keep a session to every relay you list"; from
    /// the relay, it sends [`RelayMsg::Relays`] (and the list in its welcome). A relay
    /// sends `Relays` only to agents that announced this.
    #[serde(default)]
    pub relays: bool,
    /// This end's data connections follow the peer's TLS 1.3 KeyUpdate: always on the
    /// user-space path, on kernel TLS where the kernel takes new keys (Linux ≥ 6.14). A
    /// kernel-TLS sender updates its own key only toward a peer that announced this
    /// (docs/ktls.md, "Key updates").
    #[serde(default)]
    pub key_updates: bool,
    /// From the agent: its streams run on user-space TLS and it takes framed streams
    /// ([`StreamOpen::framed`]), handing a data connection back to its pool after a
    /// clean end instead of closing it (docs/protocol.md, "Reusing a data connection").
    #[serde(default)]
    pub reuse: bool,
}

/// One active relay of the cluster, as agents learn it: they keep a control session
/// and a pool of data connections to each (up to their own bound).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelayPeer {
    /// The relay's id in the store (`rly_…`); a restarted relay has a new one.
    pub id: String,
    /// Where agents dial it: `https://host:port`, its `--public-url`.
    pub url: String,
}

/// Messages from agent to relay on the control session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    /// First message of a session.
    Hello {
        version: u32,
        agent_version: String,
        hostname: String,
        #[serde(default)]
        capabilities: Capabilities,
    },
    /// Liveness probe; the relay answers with [`RelayMsg::Pong`].
    Ping { seq: u64 },
    /// Answer to [`RelayMsg::Ping`].
    Pong { seq: u64 },
    /// Byte counts of the agent's streams: about once a second for the running ones, and
    /// once more (with `closed`) when a stream ends.
    StreamStats { streams: Vec<StreamStat> },
    /// "Sign this CSR for my current identity": certificate renewal, authenticated by the
    /// session's (still valid) certificate; the registration JWT is for joining only.
    /// Answered by [`RelayMsg::CertificateRenewed`] or [`RelayMsg::RenewalRefused`].
    RenewCertificate { csr_pem: String },
    /// Whether `APP_HOST:APP_PORT` accepts TCP connections, sent when it changes (and
    /// once at session start): from the agent's periodic check and from real streams.
    ServiceStatus {
        reachable: bool,
        /// The last connection error, when not reachable.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A message type this build does not know (sent by a newer peer): the relay skips it
    /// instead of ending the session, so one side can be upgraded before the other.
    #[serde(other)]
    Unknown,
}

/// Where a stream's byte counts come from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CounterSource {
    /// The agent's eBPF program counted the bytes in the kernel.
    Ebpf,
    /// The agent counted the bytes as it copied them.
    Userspace,
    /// A source this build does not know (a newer agent's): read, not refused.
    #[serde(other)]
    Other,
}

/// How a stream's bytes moved on one end: reported in [`StreamStat`] and used as the
/// `path` label of the stream metrics. Every variant stays in the protocol whatever
/// engines a build carries, so a relay can read what any agent reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// rustls in user space; payload is copied through a user-space buffer.
    Userspace,
    /// Kernel TLS; splice through a pipe, driven by readiness on tokio. Zero-copy.
    KtlsSplice,
    /// Kernel TLS; splice through a pipe submitted to io_uring. Zero-copy (benchmarks).
    KtlsUring,
    /// Kernel TLS; blocking splice on a thread per direction. Zero-copy (benchmarks).
    KtlsThreads,
    /// Kernel TLS; read/write through a user-space buffer (benchmarks).
    KtlsCopy,
    /// A path this build does not know (a newer agent's): its counts are still taken,
    /// labelled `other`, instead of the whole stats report being refused.
    #[serde(other)]
    Other,
}

impl PathKind {
    /// Short name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Userspace => "userspace",
            PathKind::KtlsSplice => "ktls_splice",
            PathKind::KtlsUring => "ktls_uring",
            PathKind::KtlsThreads => "ktls_threads",
            PathKind::KtlsCopy => "ktls_copy",
            PathKind::Other => "other",
        }
    }
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stream's counts as the agent sees them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StreamStat {
    pub stream_id: u64,
    /// Bytes delivered to the private service (client → service).
    pub bytes_in: u64,
    /// Bytes read from the private service (service → client).
    pub bytes_out: u64,
    pub path: PathKind,
    pub counter: CounterSource,
    /// This is the stream's final record.
    #[serde(default)]
    pub closed: bool,
    /// TLS bytes the tunnel socket received/sent for this stream (eBPF only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_bytes: Option<(u64, u64)>,
}

/// Messages from relay to agent on the control session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RelayMsg {
    /// Accepts the session: data connections name `session_id` in their [`DataHello`].
    Welcome {
        version: u32,
        session_id: SessionId,
        resource_id: ResourceId,
        resource_name: String,
        /// Each side pings at this interval; a side that hears nothing for three intervals
        /// declares the peer dead.
        heartbeat_secs: u64,
        /// How many idle data connections the agent should keep open.
        pool_size: u32,
        /// What this relay supports beyond the baseline (absent from older relays).
        #[serde(default)]
        capabilities: Capabilities,
        /// This relay's id in its cluster (empty from older relays).
        #[serde(default)]
        relay_id: String,
        /// The cluster's active relays, this one included (empty from older relays).
        #[serde(default)]
        relays: Vec<RelayPeer>,
    },
    /// Refuses the session; the relay closes the connection after sending it.
    Rejected(Rejection),
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
    },
    /// The relay ran out of idle data connections: open `count` more now.
    OpenData {
        count: u32,
    },
    /// The renewed client certificate (PEM) for [`AgentMsg::RenewCertificate`]: same
    /// agent, resource and key generation, a fresh validity period.
    CertificateRenewed {
        cert_pem: String,
    },
    /// Renewal refused; a [`RejectCode::RevokedCertificate`] means enroll again.
    RenewalRefused(Rejection),
    /// The cluster's active relays changed (a relay joined, left or started to drain);
    /// the whole new list. Sent only to agents with [`Capabilities::relays`]. A relay
    /// that drains sends the list without itself before it ends its sessions.
    Relays {
        relays: Vec<RelayPeer>,
    },
    /// A message type this build does not know (sent by a newer peer): the agent skips it
    /// instead of ending the session, so one side can be upgraded before the other.
    #[serde(other)]
    Unknown,
}

// === Data connections ===

/// First frame of a data connection: binds it to a control session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataHello {
    pub version: u32,
    pub session_id: SessionId,
}

/// Sent by the relay on an idle data connection to start a stream on it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StreamOpen {
    pub stream_id: u64,
    /// The platform client's address, for the agent's logs.
    pub client_addr: String,
    /// The stream's payload is framed ([`frame_header`]) and ends with an empty chunk in
    /// each direction; after a clean end both ends keep the connection for the next
    /// `StreamOpen`. Sent only to an agent that announced [`Capabilities::reuse`], and
    /// left out when false, so agents that predate it read the frame as before.
    #[serde(default, skip_serializing_if = "is_false")]
    pub framed: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Bytes of a framed stream's chunk header: the chunk's length, `u32` big-endian.
pub const FRAME_HEADER_LEN: usize = 4;

/// The header of a framed stream's chunk of `len` bytes; a chunk of length 0 ends its
/// direction of the stream cleanly (what a TLS `close_notify` does on an unframed one).
pub fn frame_header(len: u32) -> [u8; FRAME_HEADER_LEN] {
    len.to_be_bytes()
}

/// The agent's answer to [`StreamOpen`] once it has tried the private service.
/// After `Accepted` the connection carries the stream's raw bytes only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamReply {
    Accepted,
    Refused { reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn frames_round_trip_and_stop_at_frame_boundary() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let open = StreamOpen { stream_id: 7, client_addr: "127.0.0.1:5".into(), framed: false };
        write_frame(&mut a, &open).await.unwrap();
        a.write_all(b"raw").await.unwrap();
        let got: StreamOpen = read_frame(&mut b).await.unwrap();
        assert_eq!(got, open);
        let mut raw = [0u8; 3];
        b.read_exact(&mut raw).await.unwrap();
        assert_eq!(&raw, b"raw");
    }

    /// `framed` is left out of an unframed open (an agent that predates it reads the
    /// same JSON as before) and defaults to false when a relay that predates it omits it.
    #[test]
    fn stream_open_says_framed_only_when_it_is() {
        let plain = StreamOpen { stream_id: 1, client_addr: "c".into(), framed: false };
        assert_eq!(serde_json::to_string(&plain).unwrap(), r#"{"stream_id":1,"client_addr":"c"}"#);
        let old: StreamOpen = serde_json::from_str(r#"{"stream_id":1,"client_addr":"c"}"#).unwrap();
        assert_eq!(old, plain);
        let framed = StreamOpen { framed: true, ..plain };
        let back: StreamOpen = serde_json::from_str(&serde_json::to_string(&framed).unwrap()).unwrap();
        assert!(back.framed);
        assert_eq!(frame_header(0), [0; FRAME_HEADER_LEN]);
        assert_eq!(frame_header(65_532), [0, 0, 0xff, 0xfc]);
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_allocation() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&(u32::MAX).to_be_bytes()).await.unwrap();
        let err = read_frame::<_, StreamOpen>(&mut b).await.unwrap_err();
        assert!(matches!(err, WireError::TooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn unauthenticated_peers_get_a_smaller_limit() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&((MAX_UNAUTHENTICATED_FRAME + 1) as u32).to_be_bytes()).await.unwrap();
        let err = read_frame_limited::<_, EnrollRequest>(&mut b, MAX_UNAUTHENTICATED_FRAME).await.unwrap_err();
        assert!(
            matches!(err, WireError::TooLarge { limit: MAX_UNAUTHENTICATED_FRAME, .. }),
            "a 64 KiB+1 enrollment frame is refused before its body: {err}"
        );
    }

    /// A peer that declares 1 MiB and sends 100 bytes costs a buffer of its 100 bytes
    /// (one first chunk), not 1 MiB.
    #[tokio::test]
    async fn a_stalled_large_frame_costs_only_the_bytes_that_came() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&[7u8; 100]).await.unwrap();
        let mut body = Vec::with_capacity(100);
        let pending = tokio::time::timeout(Duration::from_millis(50), read_body(&mut b, MAX_FRAME, &mut body)).await;
        assert!(pending.is_err(), "still waiting for the rest");
        assert_eq!(body.len(), 100);
        assert!(body.capacity() <= FIRST_BODY_CHUNK, "buffer grew to {} bytes for 100 received", body.capacity());
    }

    #[tokio::test]
    async fn clean_close_between_frames_is_closed_not_an_error() {
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        let err = read_frame::<_, StreamOpen>(&mut b).await.unwrap_err();
        assert!(matches!(err, WireError::Closed));
    }

    #[tokio::test]
    async fn end_of_stream_inside_the_length_prefix_is_truncated_not_closed() {
        for cut in 1..4 {
            let mut r = &[0u8, 0, 0, 2][..cut];
            let err = read_frame::<_, StreamOpen>(&mut r).await.unwrap_err();
            assert!(matches!(err, WireError::Truncated), "{cut} bytes: {err}");
        }
        let mut r = &[0u8, 0, 0, 9, b'{'][..];
        let err = read_frame::<_, StreamOpen>(&mut r).await.unwrap_err();
        assert!(matches!(err, WireError::Truncated), "short body: {err}");
    }

    /// A reader that hands out `data` in chunks of the given sizes (cycled), the way a
    /// TCP or TLS stream may split it anywhere.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        sizes: Vec<usize>,
        turn: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let this = &mut *self;
            let size = this.sizes[this.turn % this.sizes.len()];
            this.turn += 1;
            let n = size.min(buf.remaining()).min(this.data.len() - this.pos);
            buf.put_slice(&this.data[this.pos..this.pos + n]);
            this.pos += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    use proptest::prelude::*;

    proptest! {
        /// Whatever a peer sends, `read_frame` returns (never panics), and which error
        /// follows from the bytes alone: nothing is a clean close, a short prefix or
        /// body is truncation, an oversized length is refused before its body is read.
        #[test]
        fn read_frame_classifies_any_bytes(
            prefix in prop_oneof![any::<u32>(), 0u32..64, (MAX_FRAME as u32 - 2)..=(MAX_FRAME as u32 + 2)],
            body in proptest::collection::vec(any::<u8>(), 0..80),
            cut in any::<prop::sample::Index>(),
            sizes in proptest::collection::vec(1usize..9, 1..5),
        ) {
            let mut bytes = prefix.to_be_bytes().to_vec();
            bytes.extend_from_slice(&body);
            bytes.truncate(cut.index(bytes.len() + 1));
            let n = bytes.len();
            let got = block_on(read_frame::<_, serde_json::Value>(&mut Chunked { data: bytes, pos: 0, sizes, turn: 0 }));
            let len = prefix as usize;
            match got {
                Err(WireError::Closed) => prop_assert_eq!(n, 0),
                Err(WireError::TooLarge { len: l, .. }) => prop_assert!(n >= 4 && l == len && l > MAX_FRAME),
                Err(WireError::Truncated) => prop_assert!(n > 0 && (n < 4 || (len <= MAX_FRAME && n < 4 + len))),
                Err(WireError::Malformed(_)) | Ok(_) => prop_assert!(len <= MAX_FRAME && n >= 4 + len),
                Err(WireError::Io(e)) => prop_assert!(false, "no i/o error from a slice: {e}"),
            }
        }

        /// What `write_frame` wrote, `read_frame` reads back however the bytes are split,
        /// and it stops at the last frame: the raw bytes after it stay unread.
        #[test]
        fn frames_round_trip_under_any_chunking(
            msgs in proptest::collection::vec((any::<u64>(), ".{0,40}"), 0..6),
            raw in proptest::collection::vec(any::<u8>(), 0..32),
            sizes in proptest::collection::vec(1usize..17, 1..6),
        ) {
            let msgs: Vec<StreamOpen> =
                msgs.into_iter().map(|(stream_id, client_addr)| StreamOpen { stream_id, client_addr, framed: false }).collect();
            block_on(async {
                let mut data = Vec::new();
                for m in &msgs {
                    write_frame(&mut data, m).await.unwrap();
                }
                data.extend_from_slice(&raw);
                let mut r = Chunked { data, pos: 0, sizes, turn: 0 };
                for m in &msgs {
                    let got: StreamOpen = read_frame(&mut r).await.unwrap();
                    assert_eq!(&got, m);
                }
                let mut rest = Vec::new();
                r.read_to_end(&mut rest).await.unwrap();
                assert_eq!(rest, raw);
            });
        }
    }

    #[test]
    fn messages_are_tagged_json() {
        let m = RelayMsg::OpenData { count: 3 };
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"type":"open_data","count":3}"#);
        let r = EnrollResponse::Rejected(Rejection { code: RejectCode::RevokedToken, message: "x".into() });
        let back: EnrollResponse = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert!(!RejectCode::RevokedToken.is_transient());
        assert!(RejectCode::Unavailable.is_transient());
    }

    /// A newer agent may report a data path, a counter source or a whole message type
    /// this relay does not know; the older relay must keep the session and the counts.
    #[test]
    fn a_version_refusal_names_the_side_to_upgrade() {
        let newer = version_refusal(PROTOCOL_VERSION + 1);
        assert!(newer.contains("upgrade the relay first"), "{newer}");
        let older = version_refusal(PROTOCOL_VERSION - 1);
        assert!(older.contains("upgrade the agent") && !older.contains("relay first"), "{older}");
    }

    #[test]
    fn an_older_peer_reads_what_a_newer_one_adds() {
        let report = r#"{"type":"stream_stats","streams":[{"stream_id":9,"bytes_in":10,"bytes_out":20,
            "path":"ktls_sendfile_2030","counter":"sock_ops","closed":true,"new_field":1}]}"#;
        let msg: AgentMsg = serde_json::from_str(report).unwrap();
        let AgentMsg::StreamStats { streams } = msg else { panic!("not stats: {msg:?}") };
        assert_eq!((streams[0].bytes_in, streams[0].bytes_out, streams[0].closed), (10, 20, true));
        assert_eq!((streams[0].path, streams[0].counter), (PathKind::Other, CounterSource::Other));
        assert_eq!(streams[0].path.as_str(), "other");

        let from_agent: AgentMsg = serde_json::from_str(r#"{"type":"quic_offer","port":443}"#).unwrap();
        assert_eq!(from_agent, AgentMsg::Unknown);
        let from_relay: RelayMsg = serde_json::from_str(r#"{"type":"rebalance","to":"rly_2"}"#).unwrap();
        assert_eq!(from_relay, RelayMsg::Unknown);
    }
}
