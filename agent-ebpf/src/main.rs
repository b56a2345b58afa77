//! The agent's eBPF program: two cgroup socket-buffer programs (egress and ingress),
//! attached to the agent's own cgroup, that count exact payload bytes for the sockets
//! the agent registered in `SOCKETS` (by socket cookie). Every other socket is passed
//! through untouched after one map lookup. See `SockCounts` for the counting rules.
#![no_std]
#![no_main]

use aya_ebpf::helpers::bpf_get_socket_cookie;
use aya_ebpf::macros::{cgroup_skb, map};
use aya_ebpf::maps::HashMap;
use aya_ebpf::programs::SkBuffContext;
use sluice_agent_ebpf_common::{MAX_SOCKETS, Segment, SockCounts};

#[map]
static SOCKETS: HashMap<u64, SockCounts> = HashMap::with_max_entries(MAX_SOCKETS, 0);

const IPPROTO_TCP: u8 = 6;

#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Option<Segment> {
    let first: u8 = ctx.load(0).ok()?;
    let (ip_len, proto) = match first >> 4 {
        4 => (((first & 0x0f) as usize) * 4, ctx.load::<u8>(9).ok()?),
        6 => (40usize, ctx.load::<u8>(6).ok()?),
        _ => return None,
    };
    if proto != IPPROTO_TCP || ip_len < 20 || ip_len > 60 {
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
