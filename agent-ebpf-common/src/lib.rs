//! The one definition of what the agent's eBPF program stores per socket, shared by the
//! kernel side (`agent-ebpf`, no_std) and the user-space loader (`sluice-agent`), and
//! the program's counting rules as plain functions ([`SockCounts::egress`],
//! [`SockCounts::ingress`]) so they are tested on the host, wrap-around and
//! retransmissions included.
#![cfg_attr(not(test), no_std)]

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
