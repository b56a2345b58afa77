//! The agent's eBPF programs, two designs of one counter: exact payload bytes of the
//! sockets the agent registered (by socket cookie), attached to the agent's own cgroup.
//!
//! - `cgroup_skb` (egress and ingress): reads every packet's TCP header and counts new
//!   sequence space for the sockets in `SOCKETS`; every other socket is passed through
//!   after one map lookup. See `SockCounts` for the counting rules.
//! - `sock_ops`: runs a few times per connection, not per packet — when a socket
//!   connects, is established and changes state — and keeps the kernel's own totals for
//!   the sockets in `TCP_TOTALS` and which FINs they include. See `TcpTotals`.
//!
//! The agent attaches one of them (`SLUICE_COUNTER`, agent/src/meter.rs).
#![no_std]
#![no_main]

use aya_ebpf::bindings::{
    BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
};
use aya_ebpf::helpers::bpf_get_socket_cookie;
use aya_ebpf::macros::{cgroup_skb, map, sock_ops};
use aya_ebpf::maps::HashMap;
use aya_ebpf::programs::{SkBuffContext, SockOpsContext};
use sluice_agent_ebpf_common::{MAP_FLAGS, MAX_SOCKETS, Segment, SockCounts, TcpTotals};

#[map]
static SOCKETS: HashMap<u64, SockCounts> = HashMap::with_max_entries(MAX_SOCKETS, MAP_FLAGS);

#[map]
static TCP_TOTALS: HashMap<u64, TcpTotals> = HashMap::with_max_entries(MAX_SOCKETS, MAP_FLAGS);

const IPPROTO_TCP: u8 = 6;
/// An IPv4 header without options and a TCP header up to its flags byte.
const IPV4_TCP: usize = 20 + 14;
/// An IPv6 header and a TCP header up to its flags byte.
const IPV6_TCP: usize = 40 + 14;
/// IPv6 "next header" value of a hop-by-hop options header.
const IPPROTO_HOPOPTS: u8 = 0;
/// An IPv6 header, an 8-byte hop-by-hop header (jumbo payload), a TCP header up to its flags.
const IPV6_HBH_TCP: usize = 40 + 8 + 14;

/// The TCP header fields the counters need, from the TCP header at `tcp` in `h`.
#[inline(always)]
fn tcp_fields(h: &[u8], tcp: usize, len: u32) -> Segment {
    let seq = u32::from_be_bytes([h[tcp + 4], h[tcp + 5], h[tcp + 6], h[tcp + 7]]);
    let ack = u32::from_be_bytes([h[tcp + 8], h[tcp + 9], h[tcp + 10], h[tcp + 11]]);
    let doff = h[tcp + 12];
    let flags = h[tcp + 13];
    let headers = tcp as u32 + ((doff >> 4) as u32) * 4;
    Segment { seq, ack, flags, payload: len.saturating_sub(headers) }
}

/// Reads the segment's IP and TCP headers with as few `bpf_skb_load_bytes` calls as
/// the packet allows: two (the version byte, then one fixed-size block up to the TCP
/// flags) for IPv6 and for IPv4 without options — nearly every packet — and the
/// field-by-field way for IPv4 with options. Each helper call is a fixed cost per
/// packet, and the program runs on every packet of the agent's cgroup.
#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Option<Segment> {
    let first: u8 = ctx.load(0).ok()?;
    match first >> 4 {
        4 if first & 0x0f == 5 => {
            let h: [u8; IPV4_TCP] = ctx.load(0).ok()?;
            (h[9] == IPPROTO_TCP).then(|| tcp_fields(&h, 20, ctx.len()))
        }
        4 => parse_with_options(ctx, first),
        6 => {
            let h: [u8; IPV6_TCP] = ctx.load(0).ok()?;
            match h[6] {
                IPPROTO_TCP => Some(tcp_fields(&h, 40, ctx.len())),
                // IPv6 BIG TCP: a GSO packet over 64 KiB carries a hop-by-hop header
                // with the jumbo payload option (8 bytes) before TCP. Loopback sends
                // these; missing them once undercounted IPv6 services by ~90 %.
                IPPROTO_HOPOPTS => {
                    let h: [u8; IPV6_HBH_TCP] = ctx.load(0).ok()?;
                    (h[40] == IPPROTO_TCP && h[41] == 0).then(|| tcp_fields(&h, 48, ctx.len()))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// IPv4 with options: the TCP header's offset is only known at run time.
#[inline(always)]
fn parse_with_options(ctx: &SkBuffContext, first: u8) -> Option<Segment> {
    let ip_len = ((first & 0x0f) as usize) * 4;
    if ctx.load::<u8>(9).ok()? != IPPROTO_TCP || !(20..=60).contains(&ip_len) {
        return None;
    }
    let seq = u32::from_be(ctx.load::<u32>(ip_len + 4).ok()?);
    let ack = u32::from_be(ctx.load::<u32>(ip_len + 8).ok()?);
    let doff: u8 = ctx.load(ip_len + 12).ok()?;
    let flags: u8 = ctx.load(ip_len + 13).ok()?;
    let headers = ip_len as u32 + ((doff >> 4) as u32) * 4;
    Some(Segment { seq, ack, flags, payload: ctx.len().saturating_sub(headers) })
}

#[inline(always)]
fn counts(ctx: &SkBuffContext) -> Option<*mut SockCounts> {
    // SAFETY: the helper only reads the socket the skb belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    SOCKETS.get_ptr_mut(&cookie)
}

/// Outgoing segments: count new sequence space sent, and the advance of our ACKs
/// ([`SockCounts::egress`]).
#[cgroup_skb]
pub fn sluice_egress(ctx: SkBuffContext) -> i32 {
    if let Some(c) = counts(&ctx)
        && let Some(s) = parse(&ctx)
    {
        // SAFETY: the map value lives while we hold the pointer (RCU), and only this
        // program writes these fields (the socket lock serialises transmits).
        unsafe { &mut *c }.egress(&s);
    }
    1
}

/// Incoming segments: only the peer's FIN matters ([`SockCounts::ingress`]).
#[cgroup_skb]
pub fn sluice_ingress(ctx: SkBuffContext) -> i32 {
    if let Some(c) = counts(&ctx)
        && let Some(s) = parse(&ctx)
    {
        // SAFETY: as above; only this program writes `rx_fin` and `fin_seen`.
        unsafe { &mut *c }.ingress(&s);
    }
    1
}

/// The `sock_ops` design: for a registered socket, asks the kernel for state-change
/// callbacks when it connects, sets the bases when it is established, and keeps the
/// totals at each state change ([`TcpTotals`]). Sockets that are not registered cost
/// one map lookup per callback (a handful per connection).
#[sock_ops]
pub fn sluice_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_STATE_CB {
        return 1;
    }
    // SAFETY: the helper only reads the socket the callback is about.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
    let Some(t) = TCP_TOTALS.get_ptr_mut(&cookie) else {
        return 1;
    };
    // SAFETY: the map value lives while we hold the pointer (RCU); the callbacks of one
    // socket run under its lock, one at a time.
    let t = unsafe { &mut *t };
    // SAFETY: reading fields of the context the kernel passed.
    let ops = unsafe { &*ctx.ops };
    match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => t.established(ops.bytes_acked, ops.bytes_received),
        _ => t.state_change(ctx.arg(0), ctx.arg(1), ops.bytes_acked, ops.bytes_received, ops.snd_una == ops.snd_nxt),
    }
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
