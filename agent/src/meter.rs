//! Per-socket byte counting for streams, by the eBPF program when it can run, else in
//! user space — one interface either way ([`Meter`]).
//!
//! With eBPF, the agent registers a socket's cookie in the program's map *before*
//! connecting it, so the program sees the handshake and anchors its sequence numbers;
//! counts are then exact payload bytes, read live, and read-and-deleted when the stream
//! ends. Without eBPF (not root, no CAP_BPF/CAP_NET_ADMIN, no cgroup2, program not
//! built) the agent logs why once and uses the counts its copy loop keeps.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use sluice_agent_ebpf_common::SockCounts;
use sluice_proto::wire::CounterSource;

/// Which counter to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterMode {
    /// eBPF when it loads, else user space.
    Auto,
    /// Always user space.
    Userspace,
}

/// Counts stream bytes for the agent.
pub struct Meter {
    ebpf: Option<Mutex<Loaded>>,
}

struct Loaded {
    _bpf: aya::Ebpf,
    sockets: aya::maps::HashMap<aya::maps::MapData, u64, SockCounts>,
}

/// A socket registered with the eBPF program, by its cookie. The entry leaves the
/// program's map when this is dropped (a stream that ends, fails or is cancelled at any
/// await point), or earlier with [`Registration::finish`], which also returns the final
/// counts. No path can leave an entry behind.
pub struct Registration {
    meter: Arc<Meter>,
    cookie: u64,
    live: AtomicBool,
}

impl Registration {
    /// Live counts.
    pub fn counts(&self) -> Option<SockCounts> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        self.meter.ebpf.as_ref()?.lock().sockets.get(&self.cookie, 0).ok()
    }

    /// Final counts; the socket leaves the map (later calls return `None`).
    pub fn finish(&self) -> Option<SockCounts> {
        if !self.live.swap(false, Ordering::AcqRel) {
            return None;
        }
        let mut l = self.meter.ebpf.as_ref()?.lock();
        let v = l.sockets.get(&self.cookie, 0).ok();
        let _ = l.sockets.remove(&self.cookie);
        v
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
        if mode == CounterMode::Userspace {
            return (Meter { ebpf: None }, Some("user-space counting was requested (SLUICE_COUNTER=userspace)".into()));
        }
        let loaded = load();
        // Loading parses the kernel's BTF (megabytes, freed afterwards): give that memory
        // back to the OS so the agent's resident size stays small.
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        match loaded {
            Ok(l) => (Meter { ebpf: Some(Mutex::new(l)) }, None),
            Err(why) => (Meter { ebpf: None }, Some(why)),
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

    /// Registers a socket (before it connects); the guard unregisters it. `None` means
    /// "count this one in user space" (no eBPF, or the map is full).
    pub fn register(self: &Arc<Self>, fd: BorrowedFd<'_>) -> Option<Registration> {
        let ebpf = self.ebpf.as_ref()?;
        let cookie = socket_cookie(fd)?;
        ebpf.lock().sockets.insert(cookie, SockCounts::default(), 0).ok()?;
        Some(Registration { meter: self.clone(), cookie, live: AtomicBool::new(true) })
    }

    /// Sockets registered now (entries in the program's map).
    pub fn entries(&self) -> usize {
        self.ebpf.as_ref().map(|e| e.lock().sockets.keys().filter(Result::is_ok).count()).unwrap_or(0)
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

/// Payload bytes the socket has received in order since it connected (`TCP_INFO`'s
/// `tcpi_bytes_received`): exact at once, where the eBPF count follows the ACKs this
/// socket sends, which the kernel may delay.
pub fn received_bytes(fd: BorrowedFd<'_>) -> Option<u64> {
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
    let has_field = len as usize >= std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8;
    (rc == 0 && has_field).then_some(info.tcpi_bytes_received)
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
fn load() -> Result<Loaded, String> {
    Err("this agent was built without its eBPF program (build with scripts/setup-ebpf.sh installed)".into())
}

#[cfg(sluice_ebpf)]
fn load() -> Result<Loaded, String> {
    use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};
    use sluice_agent_ebpf_common::{EGRESS_PROG, INGRESS_PROG, SOCKETS_MAP};

    let cgroup = own_cgroup()?;
    let dir = std::fs::File::open(&cgroup).map_err(|e| format!("opening cgroup {}: {e}", cgroup.display()))?;
    let mut bpf =
        aya::Ebpf::load(PROGRAM).map_err(|e| format!("loading the eBPF object: {e} (needs root or CAP_BPF)"))?;
    for (name, kind) in [(EGRESS_PROG, CgroupSkbAttachType::Egress), (INGRESS_PROG, CgroupSkbAttachType::Ingress)] {
        let prog: &mut CgroupSkb = bpf
            .program_mut(name)
            .ok_or_else(|| format!("program {name} missing from the object"))?
            .try_into()
            .map_err(|e| format!("program {name}: {e}"))?;
        prog.load().map_err(|e| format!("loading {name}: {e} (needs root or CAP_BPF)"))?;
        // Links (what aya creates) always let several programs share a cgroup; the mode
        // flag must be "single" for the kernel to accept the link.
        prog.attach(&dir, kind, CgroupAttachMode::Single).map_err(|e| {
            format!("attaching {name} to cgroup {}: {e} (needs root or CAP_NET_ADMIN and cgroup2)", cgroup.display())
        })?;
    }
    let map = bpf.take_map(SOCKETS_MAP).ok_or("map SOCKETS missing from the object")?;
    let sockets = aya::maps::HashMap::try_from(map).map_err(|e| format!("map SOCKETS: {e}"))?;
    Ok(Loaded { _bpf: bpf, sockets })
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
