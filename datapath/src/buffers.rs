//! Copy buffers lent to a stream's direction only while its bytes flow.
//!
//! The user-space path copies each direction through a [`COPY_BUF`] buffer. Owning one
//! per direction for a stream's whole life made every held-open stream cost two
//! buffers, and — because a recycled heap chunk is zero-filled by `calloc` — a stream
//! opened after others had closed touched all 128 KiB of them: 200 idle held streams
//! grew the agent by 22 MiB. Now a direction takes a buffer when it reads and gives it
//! back as soon as it has nothing buffered and its reader would block; idle streams
//! hold none. Each thread keeps a few returned buffers ([`KEEP_PER_THREAD`]) so a busy
//! stream's take/give cycle costs a `Vec` push and pop, not an allocation and a
//! zero-fill. [`trim`] hands freed heap memory back to the kernel after bursts.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::COPY_BUF;

/// Returned buffers each thread keeps for the next direction that needs one.
pub const KEEP_PER_THREAD: usize = 4;

thread_local! {
    static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// Buffers lent to directions right now (for metrics and tests).
static LENT: AtomicUsize = AtomicUsize::new(0);
/// Buffers given back since start; [`trim`] runs only after some were.
static RETURNED: AtomicU64 = AtomicU64::new(0);

/// Lends a [`COPY_BUF`] buffer: one this thread kept, else a new one.
pub(crate) fn take() -> Box<[u8]> {
    LENT.fetch_add(1, Ordering::Relaxed);
    FREE.with(|free| free.borrow_mut().pop()).unwrap_or_else(|| vec![0u8; COPY_BUF].into_boxed_slice())
}

/// Takes a lent buffer back: kept for reuse on this thread, or freed if it keeps enough.
pub(crate) fn give_back(buf: Box<[u8]>) {
    LENT.fetch_sub(1, Ordering::Relaxed);
    RETURNED.fetch_add(1, Ordering::Relaxed);
    FREE.with(|free| {
        let mut free = free.borrow_mut();
        if free.len() < KEEP_PER_THREAD {
            free.push(buf);
        }
    });
}

/// How many copy buffers directions hold right now.
pub fn lent() -> usize {
    LENT.load(Ordering::Relaxed)
}

/// Hands the heap memory freed since the last call back to the kernel (glibc keeps
/// freed chunks resident otherwise, so a burst of streams would set the process's
/// memory for good). Cheap when nothing was freed: it does nothing then. Call it from a
/// periodic task.
pub fn trim() {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let returned = RETURNED.load(Ordering::Relaxed);
    if LAST.swap(returned, Ordering::Relaxed) == returned {
        return;
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes the
    // allocator's locks like any malloc call.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How often [`trim_periodically`] looks for freed memory to hand back.
pub const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs [`trim`] every [`TRIM_INTERVAL`] until `stop`; relay and agent spawn it once.
pub async fn trim_periodically(stop: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TRIM_INTERVAL) => trim(),
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_a_few_buffers_and_reuses_them() {
        std::thread::spawn(|| {
            let bufs: Vec<_> = (0..KEEP_PER_THREAD + 2).map(|_| take()).collect();
            let last_kept = bufs[KEEP_PER_THREAD - 1].as_ptr();
            for b in bufs {
                give_back(b);
            }
            // The first few given back are kept, the rest freed.
            FREE.with(|f| assert_eq!(f.borrow().len(), KEEP_PER_THREAD));
            // The last one kept is lent again first.
            let again = take();
            assert_eq!(again.as_ptr(), last_kept);
            assert_eq!(again.len(), COPY_BUF);
            give_back(again);
        })
        .join()
        .unwrap();
    }
}
