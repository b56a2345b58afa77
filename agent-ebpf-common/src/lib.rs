//! The one definition of what the agent's eBPF program stores per socket, shared by the
//! kernel side (`agent-ebpf`, no_std) and the user-space loader (`sluice-agent`).
#![no_std]

/// Most sockets counted at once (a bounded map: registering more fails, and the agent
/// then counts that stream in user space).
pub const MAX_SOCKETS: u32 = 65_536;

/// Name of the map in the object file.
pub const SOCKETS_MAP: &str = "SOCKETS";
/// Names of the two programs in the object file.
pub const EGRESS_PROG: &str = "sluice_egress";
pub const INGRESS_PROG: &str = "sluice_ingress";

/// `SockCounts::init` bit: the send side's sequence anchor is set.
pub const TX_INIT: u32 = 1;
/// `SockCounts::init` bit: the receive side's acknowledgement anchor is set.
pub const RX_INIT: u32 = 2;

/// Per-socket counts, keyed by socket cookie (`SO_COOKIE`).
///
/// Payload bytes are counted in TCP sequence space, so they are exact whatever the
/// packet sizes (GSO/GRO), and neither retransmissions nor SYN/FIN are counted:
/// - sent: new sequence space of outgoing segments (`tx_next` is the highest end seen);
/// - received: the advance of the ACK numbers this socket sends (its `rcv_nxt`), capped
///   at the peer's FIN, so reordered or lost-and-resent segments count once, in order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockCounts {
    /// Payload bytes sent.
    pub tx_bytes: u64,
    /// Payload bytes received (in order).
    pub rx_bytes: u64,
    /// Sequence number after the last byte sent.
    pub tx_next: u32,
    /// Last acknowledgement number sent (payload part).
    pub rx_ack: u32,
    /// Sequence number of the peer's FIN (valid when `fin_seen` is 1).
    pub rx_fin: u32,
    /// `TX_INIT | RX_INIT` bits.
    pub init: u32,
    /// 1 once the peer's FIN was seen (written by the ingress program only).
    pub fin_seen: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
// SAFETY: plain old data, `repr(C)`, no padding beyond the explicit `_pad` field.
unsafe impl aya::Pod for SockCounts {}
