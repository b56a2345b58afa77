//! The one definition of what the agent's eBPF program stores per socket, shared by the
//! kernel side (`agent-ebpf`, no_std) and the user-space loader (`sluice-agent`), and
//! the program's counting rules as plain functions ([`SockCounts::egress`],
//! [`SockCounts::ingress`]) so they are tested on the host, wrap-around and
//! retransmissions included.
#![cfg_attr(not(test), no_std)]

/// Most sockets counted at once (a bounded map: registering more fails, and the agent
/// then counts that stream in user space). The maps are not preallocated
/// ([`MAP_FLAGS`]): what they hold costs kernel memory as it is used, and the bound
/// costs only the hash buckets (16 bytes each, 256 KiB per map).
pub const MAX_SOCKETS: u32 = 16_384;

/// Flags of the per-socket maps: `BPF_F_NO_PREALLOC`. Preallocated, the two maps of
/// 65,536 entries took 14 MB of kernel memory the agent's container is charged for
/// (`memlock` in the map's fdinfo; `docker stats` counts it) however few streams ran.
pub const MAP_FLAGS: u32 = 1;

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

/// TCP flag bits (byte 13 of the TCP header).
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

/// The TCP facts of one (possibly GSO/GRO) segment, as the program reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// Payload bytes (the segment's length minus its IP and TCP headers).
    pub payload: u32,
}

impl Segment {
    /// Sequence number of the first payload byte (a SYN takes one number itself).
    #[inline(always)]
    fn start(&self) -> u32 {
        self.seq.wrapping_add(if self.flags & SYN != 0 { 1 } else { 0 })
    }

    /// Sequence number after the last payload byte.
    #[inline(always)]
    fn end(&self) -> u32 {
        self.start().wrapping_add(self.payload)
    }
}

/// `a` is after `b` in TCP sequence space (modulo 2^32, within half the space).
#[inline(always)]
pub fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl SockCounts {
    /// An outgoing segment: counts the new sequence space it sends (a retransmission
    /// sends none) and the advance of the ACK number (this socket's `rcv_nxt`), which
    /// never passes the peer's FIN.
    #[inline(always)]
    pub fn egress(&mut self, s: &Segment) {
        let (start, end) = (s.start(), s.end());
        if self.init & TX_INIT == 0 {
            self.tx_next = end;
            self.tx_bytes += s.payload as u64;
            self.init |= TX_INIT;
        } else if after(end, self.tx_next) {
            let from = if after(start, self.tx_next) { start } else { self.tx_next };
            self.tx_bytes += end.wrapping_sub(from) as u64;
            self.tx_next = end;
        }
        if s.flags & ACK != 0 {
            let mut ack = s.ack;
            if self.fin_seen != 0 && after(ack, self.rx_fin) {
                ack = self.rx_fin; // the peer's FIN takes a sequence number but is no payload
            }
            if self.init & RX_INIT == 0 {
                self.rx_ack = ack;
                self.init |= RX_INIT;
            } else if after(ack, self.rx_ack) {
                self.rx_bytes += ack.wrapping_sub(self.rx_ack) as u64;
                self.rx_ack = ack;
            }
        }
    }

    /// An incoming segment: only the peer's FIN matters (its sequence number caps the
    /// ACKs counted by [`SockCounts::egress`]).
    #[inline(always)]
    pub fn ingress(&mut self, s: &Segment) {
        if s.flags & FIN != 0 {
            self.rx_fin = s.end();
            self.fin_seen = 1;
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: plain old data, `repr(C)`, no padding beyond the explicit `_pad` field.
unsafe impl aya::Pod for SockCounts {}

/// Name of the `sock_ops` counter's map in the object file.
pub const TCP_TOTALS_MAP: &str = "TCP_TOTALS";
/// Name of the `sock_ops` program in the object file.
pub const SOCKOPS_PROG: &str = "sluice_sockops";

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const CLOSING: u32 = 11;
}

/// `TcpTotals::flags`: the socket is established and its bases are set.
pub const ESTABLISHED: u32 = 1;
/// `TcpTotals::flags`: this socket queued its FIN.
pub const FIN_SENT: u32 = 2;
/// `TcpTotals::flags`: the peer acknowledged this socket's FIN (`bytes_acked` counts it).
pub const FIN_ACKED: u32 = 4;
/// `TcpTotals::flags`: the peer's FIN arrived (`bytes_received` counts it).
pub const PEER_FIN: u32 = 8;

/// The `sock_ops` counter's record of one socket, keyed by socket cookie.
///
/// The kernel already keeps exact payload totals per TCP socket (`bytes_acked`,
/// `bytes_received`: the same numbers as `TCP_INFO`'s `tcpi_bytes_acked` and
/// `tcpi_bytes_received`), so this program does not look at packets. It runs a few times
/// per connection: when it is established (the bases: the SYN takes one acknowledged
/// sequence number) and at each state change, where it keeps the totals and which FINs
/// they include — each FIN takes one sequence number and is no payload. Live counts
/// of a running socket come from `TCP_INFO` with the same rules ([`TcpTotals::live`]);
/// the program's record is what tells, once the socket has closed, whether its totals
/// include the FINs (a state of `CLOSE` alone does not say how it got there).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpTotals {
    /// The kernel's `bytes_acked` at the last state change.
    pub bytes_acked: u64,
    /// The kernel's `bytes_received` at the last state change.
    pub bytes_received: u64,
    /// `bytes_acked` when the socket was established (its SYN).
    pub acked_base: u32,
    /// `bytes_received` when the socket was established.
    pub received_base: u32,
    /// The state the socket changed to last (0: none seen yet).
    pub state: u32,
    /// `ESTABLISHED | FIN_SENT | FIN_ACKED | PEER_FIN` bits.
    pub flags: u32,
}

impl TcpTotals {
    /// The socket is established: the totals so far (a SYN, a SYN-ACK) are the bases.
    #[inline(always)]
    pub fn established(&mut self, acked: u64, received: u64) {
        self.acked_base = acked as u32;
        self.received_base = received as u32;
        self.bytes_acked = acked;
        self.bytes_received = received;
        self.state = tcp_state::ESTABLISHED;
        self.flags |= ESTABLISHED;
    }

    /// The socket changes from state `old` to `new`, with these totals, and `snd_una ==
    /// snd_nxt` (everything sent, a FIN included, is acknowledged) as `all_acked`.
    ///
    /// Which FINs the totals include, by transition: into `FIN_WAIT1` or `LAST_ACK` this
    /// socket queued its FIN; into `FIN_WAIT2` (or `TIME_WAIT`) the peer acknowledged
    /// it; into `CLOSE_WAIT` or `CLOSING` the peer's FIN arrived. Into `CLOSE` the way
    /// there tells: from `FIN_WAIT2` the peer's FIN (the socket moves to time-wait),
    /// from `LAST_ACK` or `CLOSING` the acknowledgement of this socket's FIN when
    /// everything is acknowledged, else a reset or a time-out ended it first.
    #[inline(always)]
    pub fn state_change(&mut self, old: u32, new: u32, acked: u64, received: u64, all_acked: bool) {
        use tcp_state::*;
        self.bytes_acked = acked;
        self.bytes_received = received;
        self.state = new;
        self.flags |= match new {
            FIN_WAIT1 => FIN_SENT,
            LAST_ACK => FIN_SENT,
            FIN_WAIT2 | TIME_WAIT => FIN_ACKED,
            CLOSE_WAIT | CLOSING => PEER_FIN,
            CLOSE => match old {
                FIN_WAIT2 => PEER_FIN,
                LAST_ACK | CLOSING if all_acked => FIN_ACKED,
                _ => 0,
            },
            _ => 0,
        };
    }

    /// Payload bytes (sent and acknowledged, received in order): the totals without the
    /// SYN and the FINs they include.
    #[inline(always)]
    pub fn payload(&self) -> (u64, u64) {
        let fin = |bit: u32| if self.flags & bit != 0 { 1 } else { 0 };
        let sent = self.bytes_acked.saturating_sub(self.acked_base as u64 + fin(FIN_ACKED));
        let received = self.bytes_received.saturating_sub(self.received_base as u64 + fin(PEER_FIN));
        (sent, received)
    }

    /// Payload bytes of a socket read live (`TCP_INFO`: its state and totals now). The
    /// state says which FINs the totals include, except `CLOSE`, where the program's
    /// record (written before the kernel stores the new state) is the final word.
    /// `None` before the program saw the socket established.
    pub fn live(&self, state: u32, acked: u64, received: u64) -> Option<(u64, u64)> {
        use tcp_state::*;
        if self.flags & ESTABLISHED == 0 {
            return None;
        }
        if state == CLOSE {
            return Some(self.payload());
        }
        let mut now = *self;
        now.bytes_acked = acked;
        now.bytes_received = received;
        now.flags |= match state {
            FIN_WAIT2 | TIME_WAIT => FIN_ACKED,
            CLOSE_WAIT | LAST_ACK | CLOSING => PEER_FIN,
            _ => 0,
        };
        Some(now.payload())
    }
}

#[cfg(feature = "user")]
// SAFETY: plain old data, `repr(C)`, 32 bytes without padding.
unsafe impl aya::Pod for TcpTotals {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seg(seq: u32, ack: u32, flags: u8, payload: u32) -> Segment {
        Segment { seq, ack, flags, payload }
    }

    proptest! {
        /// Sent bytes: whatever the initial sequence number (wrap-around at 2^32
        /// included), however the stream is cut into segments and whichever earlier
        /// ranges are sent again, `tx_bytes` is the stream's length, SYN and FIN excluded.
        #[test]
        fn sent_bytes_count_once_across_wraps_and_retransmissions(
            isn in prop_oneof![any::<u32>(), (u32::MAX - 5000)..=u32::MAX],
            cuts in proptest::collection::vec(0u32..3000, 1..20),
            resends in proptest::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..20),
        ) {
            let mut c = SockCounts::default();
            c.egress(&seg(isn, 0, SYN, 0));
            let data = isn.wrapping_add(1);
            let (mut sent, mut total) = (0u32, 0u64);
            for (i, len) in cuts.iter().enumerate() {
                c.egress(&seg(data.wrapping_add(sent), 1, ACK, *len));
                sent += len;
                total += *len as u64;
                // Resend any earlier range [a, b) of what was sent so far.
                if let Some((x, y)) = resends.get(i) {
                    let (a, b) = (x.index(sent as usize + 1) as u32, y.index(sent as usize + 1) as u32);
                    let (a, b) = (a.min(b), a.max(b));
                    c.egress(&seg(data.wrapping_add(a), 1, ACK, b - a));
                }
            }
            c.egress(&seg(data.wrapping_add(sent), 1, ACK | FIN, 0));
            prop_assert_eq!(c.tx_bytes, total);
            prop_assert_eq!(c.tx_next, data.wrapping_add(sent));
        }

        /// Received bytes: the ACK numbers this socket sends advance with the bytes it
        /// received in order; repeated or stale (reordered) ACKs add nothing, and the
        /// ACK of the peer's FIN is not a payload byte.
        #[test]
        fn received_bytes_follow_acks_once_and_stop_at_the_fin(
            peer_isn in prop_oneof![any::<u32>(), (u32::MAX - 5000)..=u32::MAX],
            steps in proptest::collection::vec((0u32..3000, 0u8..3), 1..20),
        ) {
            let mut c = SockCounts::default();
            let first = peer_isn.wrapping_add(1); // our SYN-ACK acknowledges the peer's SYN
            c.egress(&seg(7, first, SYN | ACK, 0));
            let mut got = 0u32;
            for (len, repeat) in &steps {
                let before = got;
                got += len;
                c.egress(&seg(8, first.wrapping_add(got), ACK, 0));
                for _ in 0..*repeat {
                    c.egress(&seg(8, first.wrapping_add(got), ACK, 0)); // duplicate ACK
                    c.egress(&seg(8, first.wrapping_add(before), ACK, 0)); // stale, reordered
                }
            }
            c.ingress(&seg(first.wrapping_add(got), 8, FIN | ACK, 0));
            c.egress(&seg(8, first.wrapping_add(got).wrapping_add(1), ACK, 0)); // ACK of the FIN
            prop_assert_eq!(c.rx_bytes, got as u64);
        }
    }

    /// An agent socket's life as the kernel reports it (the figures are what a loopback
    /// connection shows in `TCP_INFO`: the SYN counts as one acknowledged byte, each FIN
    /// as one acknowledged or received byte).
    #[test]
    fn sockops_totals_drop_the_syn_and_both_fins_whichever_side_closes_first() {
        use tcp_state::*;
        // We close first: FIN_WAIT1, FIN_WAIT2, then the peer's FIN (time-wait: CLOSE).
        let mut t = TcpTotals::default();
        t.established(1, 0);
        assert_eq!(t.live(ESTABLISHED, 1001, 77), Some((1000, 77)));
        t.state_change(ESTABLISHED, FIN_WAIT1, 1001, 77, false);
        assert_eq!(t.live(FIN_WAIT1, 1001, 77), Some((1000, 77)), "the FIN is not acknowledged yet");
        t.state_change(FIN_WAIT1, FIN_WAIT2, 1002, 77, true);
        assert_eq!(t.live(FIN_WAIT2, 1002, 90), Some((1000, 90)));
        t.state_change(FIN_WAIT2, CLOSE, 1002, 91, true);
        assert_eq!(t.payload(), (1000, 90));
        assert_eq!(t.live(CLOSE, 1002, 91), Some((1000, 90)));

        // The peer closes first: CLOSE_WAIT, LAST_ACK, and the ACK of our FIN: CLOSE.
        let mut t = TcpTotals::default();
        t.established(1, 0);
        t.state_change(ESTABLISHED, CLOSE_WAIT, 1001, 78, true);
        assert_eq!(t.live(CLOSE_WAIT, 5001, 78), Some((5000, 77)));
        t.state_change(CLOSE_WAIT, LAST_ACK, 5001, 78, false);
        assert_eq!(t.live(LAST_ACK, 5001, 78), Some((5000, 77)));
        t.state_change(LAST_ACK, CLOSE, 5002, 78, true);
        assert_eq!(t.payload(), (5000, 77));

        // Both at once: FIN_WAIT1, CLOSING (the peer's FIN), then the ACK of ours.
        let mut t = TcpTotals::default();
        t.established(1, 0);
        t.state_change(ESTABLISHED, FIN_WAIT1, 11, 0, false);
        t.state_change(FIN_WAIT1, CLOSING, 11, 6, false);
        assert_eq!(t.live(CLOSING, 11, 6), Some((10, 5)));
        t.state_change(CLOSING, CLOSE, 12, 6, true);
        assert_eq!(t.payload(), (10, 5));
    }

    #[test]
    fn sockops_totals_after_a_reset_count_no_fin_that_was_not_acknowledged() {
        use tcp_state::*;
        // Reset while established: no FIN either way.
        let mut t = TcpTotals::default();
        t.established(1, 0);
        t.state_change(ESTABLISHED, CLOSE, 801, 40, false);
        assert_eq!(t.payload(), (800, 40));
        // Reset in LAST_ACK, our FIN (and some data) not acknowledged.
        let mut t = TcpTotals::default();
        t.established(1, 0);
        t.state_change(ESTABLISHED, CLOSE_WAIT, 101, 11, true);
        t.state_change(CLOSE_WAIT, LAST_ACK, 101, 11, false);
        t.state_change(LAST_ACK, CLOSE, 301, 11, false);
        assert_eq!(t.payload(), (300, 10));
        // Not seen established (registered after the handshake): no live counts.
        assert_eq!(TcpTotals::default().live(ESTABLISHED, 10, 10), None);
    }

    #[test]
    fn after_is_modulo_two_to_the_32() {
        assert!(after(1, 0) && after(0, u32::MAX) && after(5, u32::MAX - 5));
        assert!(!after(0, 0) && !after(u32::MAX, 0) && !after(0, 1 << 31));
    }

    #[test]
    fn a_fin_with_payload_caps_acks_after_its_data() {
        let mut c = SockCounts::default();
        c.egress(&seg(1, 100, ACK, 0));
        c.ingress(&seg(100, 1, FIN | ACK, 10));
        c.egress(&seg(1, 111, ACK, 0));
        assert_eq!((c.rx_bytes, c.rx_fin), (10, 110));
    }
}
