//! Per-socket byte counting for streams, by an eBPF program when it can run, else in
//! user space — one interface either way ([`Meter`]).
//!
//! With eBPF, the agent registers a socket's cookie in the program's map *before*
//! connecting it, so the program sees the handshake; counts are then exact payload
//! bytes, read live, and read-and-deleted when the stream ends. Two programs do this
//! (`agent-ebpf`, docs/benchmarks.md compares them):
//! - `cgroup_skb` ([`Counter::Skb`]): reads every packet's TCP header and counts new
//!   sequence space; live counts come from its map.
//! - `sock_ops` ([`Counter::SockOps`]): runs a few times per connection and keeps the
//!   kernel's own totals at each state change; live counts are `TCP_INFO` read from a
//!   descriptor the registration holds, with the program's record saying which FINs
//!   the totals include.
//!
//! Without eBPF (not root, no CAP_BPF/CAP_NET_ADMIN, no cgroup2, program not built) the
//! agent logs why once and uses the counts its copy loop keeps.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use sluice_agent_ebpf_common::{SockCounts, TcpTotals};
use sluice_proto::wire::CounterSource;

/// Which counter to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterMode {
    /// The default eBPF program when it loads, else user space.
    Auto,
    /// This eBPF program when it loads, else user space.
    Ebpf(Counter),
    /// Always user space.
    Userspace,
}

/// The two eBPF counters (`agent-ebpf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// `cgroup_skb` programs that read every packet of the agent's cgroup.
    Skb,
    /// A `sock_ops` program that runs a few times per connection.
    SockOps,
}

impl Counter {
    /// What `SLUICE_COUNTER=auto` tries, in order: `sock_ops` costs about a
    /// thousandth of `cgroup_skb`'s run time per GiB at equal exactness
    /// (docs/benchmarks.md); `cgroup_skb` is there for kernels that refuse it.
    pub const AUTO: [Counter; 2] = [Counter::SockOps, Counter::Skb];

    pub fn as_str(self) -> &'static str {
        match self {
            Counter::Skb => "cgroup_skb",
            Counter::SockOps => "sock_ops",
        }
    }
}

/// Counts stream bytes for the agent.
pub struct Meter {
    ebpf: Option<Mutex<Loaded>>,
}

struct Loaded {
    _bpf: aya::Ebpf,
    map: Map,
}

/// The loaded program's map.
enum Map {
    Skb(aya::maps::HashMap<aya::maps::MapData, u64, SockCounts>),
    SockOps(aya::maps::HashMap<aya::maps::MapData, u64, TcpTotals>),
}

impl Map {
    fn insert(&mut self, cookie: u64) -> bool {
        match self {
            Map::Skb(m) => m.insert(cookie, SockCounts::default(), 0).is_ok(),
            Map::SockOps(m) => m.insert(cookie, TcpTotals::default(), 0).is_ok(),
        }
    }

    fn remove(&mut self, cookie: u64) {
        let _ = match self {
            Map::Skb(m) => m.remove(&cookie),
            Map::SockOps(m) => m.remove(&cookie),
        };
    }

    fn len(&self) -> usize {
        match self {
            Map::Skb(m) => m.keys().filter(Result::is_ok).count(),
            Map::SockOps(m) => m.keys().filter(Result::is_ok).count(),
        }
    }
}

/// A socket registered with the eBPF program, by its cookie. The entry leaves the
/// program's map when this is dropped (a stream that ends, fails or is cancelled at any
/// await point), or earlier with [`Registration::finish`], which also returns the final
/// counts. No path can leave an entry behind.
pub struct Registration {
    meter: Arc<Meter>,
    cookie: u64,
    live: AtomicBool,
    /// The socket itself, for `TCP_INFO` (the `sock_ops` counter only).
    fd: Option<OwnedFd>,
}

/// Payload bytes of one socket: sent (to its peer) and received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub sent: u64,
    pub received: u64,
}

impl Registration {
    /// Live counts.
    pub fn counts(&self) -> Option<Counts> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        self.read()
    }

    fn read(&self) -> Option<Counts> {
        let l = self.meter.ebpf.as_ref()?.lock();
        match &l.map {
            Map::Skb(m) => m.get(&self.cookie, 0).ok().map(|c| Counts { sent: c.tx_bytes, received: c.rx_bytes }),
            Map::SockOps(m) => {
                let totals = m.get(&self.cookie, 0).ok()?;
                drop(l);
                let info = tcp_info(self.fd.as_ref()?.as_fd())?;
                let (sent, received) =
                    totals.live(info.tcpi_state as u32, info.tcpi_bytes_acked, info.tcpi_bytes_received)?;
                Some(Counts { sent, received })
            }
        }
    }

    /// Final counts; the socket leaves the map (later calls return `None`).
    pub fn finish(&self) -> Option<Counts> {
        if !self.live.swap(false, Ordering::AcqRel) {
            return None;
        }
        let v = self.read();
        self.meter.ebpf.as_ref()?.lock().map.remove(self.cookie);
        v
    }

    /// The socket's (received, sent) bytes so far, counted so that they split exactly
    /// between streams that take a connection one after another: received, the
    /// kernel's in-order count; sent, everything written to the socket (what was sent
    /// and what is still queued, which is counted when it leaves). `fd` is the socket.
    pub fn split_counts(&self, fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
        let c = self.counts()?;
        Some(match self.fd {
            // Acknowledged bytes: the unacknowledged rest is still queued.
            Some(_) => (c.received, c.sent + unacked_bytes(fd).unwrap_or(0).max(0) as u64),
            // Sent bytes (acknowledged or not); the eBPF received count follows this
            // socket's ACKs, which the kernel may delay, and `TCP_INFO`'s does not.
            None => (received_in_order(fd).unwrap_or(0).max(c.received), c.sent + unsent_bytes(fd).unwrap_or(0)),
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.finish();
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registration({})", self.cookie)
    }
}

impl Meter {
    /// Loads and attaches the eBPF program (unless told not to). The second value says
    /// why counting happens in user space, if it does.
    pub fn start(mode: CounterMode) -> (Meter, Option<String>) {
        let order = match mode {
            CounterMode::Userspace => {
                let why = "user-space counting was requested (SLUICE_COUNTER=userspace)";
                return (Meter { ebpf: None }, Some(why.into()));
            }
            CounterMode::Auto => &Counter::AUTO[..],
            CounterMode::Ebpf(Counter::SockOps) => &[Counter::SockOps][..],
            CounterMode::Ebpf(Counter::Skb) => &[Counter::Skb][..],
        };
        let mut failed: Vec<String> = Vec::new();
        let mut loaded = None;
        for &counter in order {
            match load(counter) {
                Ok(l) => {
                    loaded = Some(l);
                    break;
                }
                Err(why) if failed.iter().any(|f| f.ends_with(&why)) => {}
                Err(why) if order.len() > 1 => failed.push(format!("{}: {why}", counter.as_str())),
                Err(why) => failed.push(why),
            }
        }
        // Loading parses the kernel's BTF (megabytes, freed afterwards): give that memory
        // back to the OS so the agent's resident size stays small.
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        match loaded {
            Some(l) => {
                for f in &failed {
                    tracing::warn!(reason = %f, "an eBPF counter did not load; using the next one");
                }
                (Meter { ebpf: Some(Mutex::new(l)) }, None)
            }
            None => (Meter { ebpf: None }, Some(failed.join("; "))),
        }
    }

    /// A meter that counts in user space only.
    #[cfg(test)]
    pub fn userspace() -> Meter {
        Meter { ebpf: None }
    }

    pub fn source(&self) -> CounterSource {
        if self.ebpf.is_some() { CounterSource::Ebpf } else { CounterSource::Userspace }
    }

    /// The eBPF program counting, if one is.
    pub fn counter(&self) -> Option<Counter> {
        self.ebpf.as_ref().map(|e| match e.lock().map {
            Map::Skb(_) => Counter::Skb,
            Map::SockOps(_) => Counter::SockOps,
        })
    }

    /// Registers a socket (before it connects); the guard unregisters it. `None` means
    /// "count this one in user space" (no eBPF, or the map is full).
    pub fn register(self: &Arc<Self>, fd: BorrowedFd<'_>) -> Option<Registration> {
        let ebpf = self.ebpf.as_ref()?;
        let cookie = socket_cookie(fd)?;
        let mut l = ebpf.lock();
        // The `sock_ops` counter reads the socket's `TCP_INFO`: the registration holds
        // it (a duplicate descriptor), and with it the socket, until it is dropped.
        let fd = match l.map {
            Map::SockOps(_) => Some(fd.try_clone_to_owned().ok()?),
            Map::Skb(_) => None,
        };
        l.map.insert(cookie).then(|| Registration { meter: self.clone(), cookie, live: AtomicBool::new(true), fd })
    }

    /// Sockets registered now (entries in the program's map).
    pub fn entries(&self) -> usize {
        self.ebpf.as_ref().map(|e| e.lock().map.len()).unwrap_or(0)
    }
}

/// `SO_COOKIE` of a socket: the kernel's stable id for it, what the program keys by.
fn socket_cookie(fd: BorrowedFd<'_>) -> Option<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a correctly sized out-buffer.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, (&mut cookie as *mut u64).cast(), &mut len)
    };
    (rc == 0).then_some(cookie)
}

/// Bytes queued on a socket that the peer has not acknowledged yet (`SIOCOUTQ`).
pub fn unacked_bytes(fd: BorrowedFd<'_>) -> Option<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: valid fd; TIOCOUTQ (== SIOCOUTQ) writes one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    (rc == 0).then_some(n)
}

/// Bytes written to a socket that the kernel has not sent yet (`SIOCOUTQNSD`): the
/// eBPF program counts them when they leave.
pub fn unsent_bytes(fd: BorrowedFd<'_>) -> Option<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: valid fd; SIOCOUTQNSD writes one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCOUTQNSD as _, &mut n) };
    (rc == 0).then_some(n.max(0) as u64)
}

/// `TCP_INFO`'s in-order received bytes without the peer's FIN: the states after its
/// arrival say it is counted (a reset also leads to `CLOSE`: then this is one short,
/// and the `cgroup_skb` count beside it is exact).
fn received_in_order(fd: BorrowedFd<'_>) -> Option<u64> {
    use sluice_agent_ebpf_common::tcp_state::*;
    let info = tcp_info(fd)?;
    let fin = matches!(info.tcpi_state as u32, CLOSE_WAIT | LAST_ACK | CLOSING | CLOSE);
    Some(info.tcpi_bytes_received.saturating_sub(fin as u64))
}

/// The socket's `TCP_INFO`, if the kernel's has the byte totals (Linux 4.1+).
fn tcp_info(fd: BorrowedFd<'_>) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd; the kernel writes at most `len` bytes into `info` and sets `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    let has_fields = len as usize >= std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8;
    (rc == 0 && has_fields).then_some(info)
}

/// This process's cgroup directory under the cgroup2 mount (looked up, never assumed).
#[cfg_attr(not(sluice_ebpf), allow(dead_code))]
pub fn own_cgroup() -> Result<PathBuf, String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("reading mountinfo: {e}"))?;
    let mount = mounts
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2").then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .ok_or("no cgroup2 file system is mounted")?;
    let cgroups =
        std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
    let path = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process has no cgroup2 (unified) membership")?;
    Ok(mount.join(path.trim_start_matches('/')))
}

#[cfg(sluice_ebpf)]
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-agent-ebpf"));

#[cfg(not(sluice_ebpf))]
fn load(_: Counter) -> Result<Loaded, String> {
    Err("this agent was built without its eBPF program (build with scripts/setup-ebpf.sh installed)".into())
}

#[cfg(sluice_ebpf)]
fn load(counter: Counter) -> Result<Loaded, String> {
    use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SockOps};
    use sluice_agent_ebpf_common::{EGRESS_PROG, INGRESS_PROG, SOCKETS_MAP, SOCKOPS_PROG, TCP_TOTALS_MAP};

    let cgroup = own_cgroup()?;
    let dir = std::fs::File::open(&cgroup).map_err(|e| format!("opening cgroup {}: {e}", cgroup.display()))?;
    let mut bpf =
        aya::Ebpf::load(PROGRAM).map_err(|e| format!("loading the eBPF object: {e} (needs root or CAP_BPF)"))?;
    let attach_error = |name: &str, e: &dyn std::fmt::Display| {
        format!("attaching {name} to cgroup {}: {e} (needs root or CAP_NET_ADMIN and cgroup2)", cgroup.display())
    };
    if counter == Counter::SockOps {
        let prog: &mut SockOps = bpf
            .program_mut(SOCKOPS_PROG)
            .ok_or_else(|| format!("program {SOCKOPS_PROG} missing from the object"))?
            .try_into()
            .map_err(|e| format!("program {SOCKOPS_PROG}: {e}"))?;
        prog.load().map_err(|e| format!("loading {SOCKOPS_PROG}: {e} (needs root, or CAP_BPF and CAP_NET_ADMIN)"))?;
        prog.attach(&dir, CgroupAttachMode::Single).map_err(|e| attach_error(SOCKOPS_PROG, &e))?;
        let map = bpf.take_map(TCP_TOTALS_MAP).ok_or("map TCP_TOTALS missing from the object")?;
        let totals = aya::maps::HashMap::try_from(map).map_err(|e| format!("map TCP_TOTALS: {e}"))?;
        return Ok(Loaded { _bpf: bpf, map: Map::SockOps(totals) });
    }
    for (name, kind) in [(EGRESS_PROG, CgroupSkbAttachType::Egress), (INGRESS_PROG, CgroupSkbAttachType::Ingress)] {
        let prog: &mut CgroupSkb = bpf
            .program_mut(name)
            .ok_or_else(|| format!("program {name} missing from the object"))?
            .try_into()
            .map_err(|e| format!("program {name}: {e}"))?;
        prog.load().map_err(|e| format!("loading {name}: {e} (needs root, or CAP_BPF and CAP_NET_ADMIN)"))?;
        // Links (what aya creates) always let several programs share a cgroup; the mode
        // flag must be "single" for the kernel to accept the link.
        prog.attach(&dir, kind, CgroupAttachMode::Single).map_err(|e| attach_error(name, &e))?;
    }
    let map = bpf.take_map(SOCKETS_MAP).ok_or("map SOCKETS missing from the object")?;
    let sockets = aya::maps::HashMap::try_from(map).map_err(|e| format!("map SOCKETS: {e}"))?;
    Ok(Loaded { _bpf: bpf, map: Map::Skb(sockets) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_own_cgroup_under_the_cgroup2_mount() {
        match own_cgroup() {
            Ok(p) => assert!(p.exists(), "{}", p.display()),
            Err(e) => eprintln!("no cgroup2 here: {e}"),
        }
    }

    #[test]
    fn userspace_meter_registers_nothing() {
        let m = Arc::new(Meter::userspace());
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsFd;
        assert!(m.register(s.as_fd()).is_none());
        assert_eq!(m.source(), CounterSource::Userspace);
        assert!(socket_cookie(s.as_fd()).is_some_and(|c| c > 0));
    }
}
