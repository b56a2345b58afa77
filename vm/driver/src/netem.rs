//! Network delay inside the guest: a `netem` queueing discipline on an interface, set up
//! over rtnetlink by the driver itself.
//!
//! The guest's userland is busybox, whose `tc` knows neither `netem` nor `qdisc add`, and
//! iproute2's `tc` is a dynamically linked program the initramfs cannot run. What `tc
//! qdisc add dev lo root netem delay 100ms` sends is one `RTM_NEWQDISC` message, written
//! here: a `tcmsg` for the interface's root, the kind `netem`, and netem's options
//! (`struct tc_netem_qopt`, latency in scheduler ticks of 64 ns). The kernel needs the
//! `sch_netem` module (the harness loads it when the kernel package has it).
//!
//! On loopback every packet crosses `lo`'s egress once, so a delay `d` on `lo` makes
//! every round trip between two local sockets `2·d`.

use std::io;
use std::time::Duration;

use anyhow::{Context, Result, bail};

const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
/// `TC_H_ROOT`: the interface's root qdisc.
const TC_H_ROOT: u32 = 0xFFFF_FFFF;
/// `PSCHED_SHIFT`: netem's `latency` field counts 2^6 ns ticks.
const PSCHED_SHIFT: u32 = 6;
/// Packets netem may hold (iproute2's default is 1000; loopback packets are up to 64 KiB,
/// and a bulk transfer over a 200 ms round trip keeps many in flight).
const LIMIT: u32 = 10_000;

/// A netem delay on an interface, removed again on drop.
pub struct Delay {
    ifindex: u32,
    pub interface: String,
    pub delay: Duration,
}

impl Delay {
    /// Adds a root `netem` qdisc delaying every packet `interface` sends by `delay`.
    pub fn add(interface: &str, delay: Duration) -> Result<Delay> {
        let ifindex = ifindex(interface)?;
        let ticks = u32::try_from(delay.as_nanos() >> PSCHED_SHIFT).context("netem delay too long")?;
        // struct tc_netem_qopt { latency, limit, loss, gap, duplicate, jitter }
        let mut qopt = Vec::with_capacity(24);
        for v in [ticks, LIMIT, 0, 0, 0, 0] {
            qopt.extend_from_slice(&v.to_ne_bytes());
        }
        let mut attrs = attr(TCA_KIND, b"netem\0");
        attrs.extend(attr(TCA_OPTIONS, &qopt));
        request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, ifindex, &attrs).with_context(|| {
            format!(
                "adding `netem delay {}ms` on {interface} (the kernel needs sch_netem: is the module in the \
                 initramfs's load list?)",
                delay.as_millis()
            )
        })?;
        Ok(Delay { ifindex, interface: interface.to_owned(), delay })
    }

    /// Removes the qdisc; the interface is back to its default queueing.
    pub fn remove(self) -> Result<()> {
        let r = request(RTM_DELQDISC, 0, self.ifindex, &[])
            .with_context(|| format!("removing the netem qdisc from {}", self.interface));
        std::mem::forget(self);
        r
    }
}

impl Drop for Delay {
    fn drop(&mut self) {
        let _ = request(RTM_DELQDISC, 0, self.ifindex, &[]);
    }
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no network interface {name:?}: {}", io::Error::last_os_error());
    }
    Ok(i)
}

/// One rtattr: length, type, payload padded to 4 bytes.
fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut a = Vec::with_capacity(len.next_multiple_of(4));
    a.extend_from_slice(&(len as u16).to_ne_bytes());
    a.extend_from_slice(&ty.to_ne_bytes());
    a.extend_from_slice(payload);
    a.resize(len.next_multiple_of(4), 0);
    a
}

/// The bytes of an rtnetlink qdisc request on the root of `ifindex`.
fn message(ty: u16, flags: u16, ifindex: u32, attrs: &[u8]) -> Vec<u8> {
    // struct tcmsg { u8 family, u8 pad, u16 pad, i32 ifindex, u32 handle, u32 parent, u32 info }
    let mut tcm = vec![0u8; 4];
    tcm.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    tcm.extend_from_slice(&0u32.to_ne_bytes());
    tcm.extend_from_slice(&TC_H_ROOT.to_ne_bytes());
    tcm.extend_from_slice(&0u32.to_ne_bytes());
    let len = 16 + tcm.len() + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    m.extend(tcm);
    m.extend_from_slice(attrs);
    m
}

/// Sends one request and reads the kernel's acknowledgement (an `NLMSG_ERROR` whose
/// code is 0 on success).
fn request(ty: u16, flags: u16, ifindex: u32, attrs: &[u8]) -> Result<()> {
    // SAFETY: plain socket(2); the descriptor is owned by `fd` below.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if raw < 0 {
        return Err(io::Error::last_os_error()).context("opening a netlink socket");
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let msg = message(ty, flags, ifindex, attrs);
    // SAFETY: `msg` is valid for `msg.len()` bytes; a zeroed sockaddr_nl addresses the kernel.
    let sent = unsafe {
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error()).context("sending to netlink");
    }
    let mut buf = [0u8; 4096];
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::recv(std::os::fd::AsRawFd::as_raw_fd(&fd), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error()).context("reading netlink's answer");
    }
    ack_code(&buf[..n as usize]).map_err(anyhow::Error::from)
}

/// The outcome in the kernel's answer: `Ok` for an `NLMSG_ERROR` with code 0.
fn ack_code(answer: &[u8]) -> io::Result<()> {
    let u16_at = |i: usize| answer.get(i..i + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let i32_at = |i: usize| answer.get(i..i + 4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    match (u16_at(4), i32_at(16)) {
        (Some(NLMSG_ERROR), Some(0)) => Ok(()),
        (Some(NLMSG_ERROR), Some(code)) => Err(io::Error::from_raw_os_error(-code)),
        _ => Err(io::Error::other(format!("unexpected netlink answer ({} bytes)", answer.len()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_netem_request_has_the_layout_tc_sends() {
        let qopt = [0u8; 24];
        let mut attrs = attr(TCA_KIND, b"netem\0");
        attrs.extend(attr(TCA_OPTIONS, &qopt));
        let m = message(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, 1, &attrs);
        // nlmsghdr 16 + tcmsg 20 + kind (4 + 6 → 12) + options (4 + 24 = 28)
        assert_eq!(m.len(), 16 + 20 + 12 + 28);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize, m.len());
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), RTM_NEWQDISC);
        assert_eq!(u32::from_ne_bytes(m[16 + 12..16 + 16].try_into().unwrap()), TC_H_ROOT);
        assert_eq!(&m[36 + 4..36 + 10], b"netem\0");
    }

    #[test]
    fn the_delay_is_in_64_ns_ticks() {
        assert_eq!(Duration::from_millis(100).as_nanos() >> PSCHED_SHIFT, 1_562_500);
    }

    #[test]
    fn acks_and_errors_are_read() {
        let mut a = vec![0u8; 36];
        a[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert!(ack_code(&a).is_ok());
        a[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(ack_code(&a).unwrap_err().raw_os_error(), Some(libc::ENOENT));
        assert!(ack_code(&a[..8]).is_err());
    }
}
