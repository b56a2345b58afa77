//! What the fuzz targets share: a reader that splits its bytes the way TCP may, a
//! `block_on` for futures that never wait, an allocator that remembers the largest
//! allocation (so a target can prove a declared size is not allocated before its bytes
//! arrive), and the relay fixture (store, CA, token key) the enrollment targets run
//! against.
//!
//! The targets are in `fuzz_targets/`, one per parser; `cargo xtask fuzz` runs them and
//! docs/reliability.md ("Fuzzing") says what each checks.

use std::alloc::{GlobalAlloc, Layout, System};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

// === allocation tracking ===

/// The system allocator, noting the largest single allocation (or reallocation) request.
pub struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

#[global_allocator]
static ALLOC: Tracking = Tracking;

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Runs `f` and returns its result with the largest allocation it asked for, in bytes.
/// The fuzzer runs one input at a time on one thread, so nothing else allocates meanwhile.
pub fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.store(0, Ordering::Relaxed);
    let r = f();
    (r, LARGEST.load(Ordering::Relaxed))
}

// === readers and futures ===

/// A reader that hands out `data` in chunks of the given sizes (cycled) and is never
/// pending: the way a TCP or TLS stream may split the same bytes anywhere.
pub struct Chunked<'a> {
    data: &'a [u8],
    pos: usize,
    sizes: Vec<usize>,
    turn: usize,
}

impl<'a> Chunked<'a> {
    pub fn new(data: &'a [u8], sizes: Vec<usize>) -> Self {
        assert!(sizes.iter().all(|&s| s > 0), "a chunk of 0 bytes would read as end of stream");
        Chunked { data, pos: 0, sizes, turn: 0 }
    }

    /// What has not been read yet.
    pub fn rest(&self) -> &'a [u8] {
        &self.data[self.pos..]
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let size = this.sizes[this.turn % this.sizes.len()];
        this.turn += 1;
        let n = size.min(buf.remaining()).min(this.data.len() - this.pos);
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// Chunk sizes that follow from the input itself, so a crash reproduces from the file.
pub fn chunk_sizes(data: &[u8]) -> Vec<usize> {
    let seed = data.iter().fold(7usize, |h, &b| h.wrapping_mul(31).wrapping_add(b as usize));
    (0..4).map(|i| 1 + (seed >> (i * 3)) % 9).collect()
}

/// Drives a future whose I/O is never pending (a [`Chunked`] reader, a `Vec` writer) to
/// completion without a runtime, so no runtime allocation is counted.
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    for _ in 0..1_000_000 {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
    }
    panic!("a future over in-memory I/O kept returning Pending");
}

// === checks shared by targets ===

/// Text that may reach a log line, a terminal or another peer: one line, no control
/// characters (escapes, newlines) that could forge a line or repaint a terminal.
pub fn assert_printable_line(what: &str, text: &str) {
    assert!(!text.chars().any(char::is_control), "{what} holds a control character: {text:?}");
}

// === the relay fixture ===

/// A relay's state for enrollment decisions: a store in a temporary directory, the CA
/// and the token key, two customers, and a customer JWT and a resource JWT it issued.
pub struct RelayFixture {
    _dir: tempfile::TempDir,
    pub store: sluice_relay::state::store::SqliteStore,
    pub signer: sluice_relay::state::tokens::TokenSigner,
    pub identity: sluice_relay::state::pki::RelayIdentity,
    /// A JWT of customer `cus_a` (no resource): enrolls agents for any NAME.
    pub customer_jwt: String,
    /// A JWT for resource `res_fixed` (customer `cus_a`, NAME `fixed`).
    pub resource_jwt: String,
    /// A CSR for a fresh key.
    pub csr_pem: String,
}

impl RelayFixture {
    pub fn new() -> Self {
        use sluice_proto::identity::{JWT_AUDIENCE, JWT_ISSUER, RegistrationClaims};
        use sluice_relay::state::store::{SqliteStore, Store, TokenRecord};
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = SqliteStore::open(&dir.path().join("store.db")).expect("store");
        let identity =
            sluice_relay::state::pki::RelayIdentity::load_or_create(&dir.path().join("pki"), &["localhost".to_owned()])
                .expect("relay identity");
        let signer = sluice_relay::state::tokens::TokenSigner::new(&identity.jwt_key);
        store.create_customer("cus_a", "acme", 1).expect("customer");
        store.create_customer("cus_b", "globex", 1).expect("customer");
        store.create_resource("res_fixed", Some("cus_a"), "fixed", 1024..=1024, 100, 1).expect("resource");
        let issue = |jti: &str, resource: Option<(&str, u64)>| {
            let claims = RegistrationClaims {
                iss: JWT_ISSUER.into(),
                aud: JWT_AUDIENCE.into(),
                jti: jti.into(),
                iat: 1,
                exp: None,
                customer_id: Some("cus_a".into()),
                resource_id: resource.map(|r| r.0.into()),
                generation: resource.map(|r| r.1),
                relay_url: "https://localhost:8443".into(),
                ca_pin: identity.ca_pin.clone(),
            };
            store
                .record_token(&TokenRecord {
                    jti: jti.into(),
                    customer_id: claims.customer_id.clone(),
                    resource_id: claims.resource_id.clone(),
                    issued_at: 1,
                    expires_at: None,
                    revoked_at: None,
                })
                .expect("token record");
            signer.sign(&claims)
        };
        let customer_jwt = issue("jti_customer", None);
        let resource_jwt = issue("jti_resource", Some(("res_fixed", 1)));
        let key = rcgen::KeyPair::generate().expect("key");
        let csr_pem = rcgen::CertificateParams::default().serialize_request(&key).expect("csr").pem().expect("pem");
        RelayFixture { _dir: dir, store, signer, identity, customer_jwt, resource_jwt, csr_pem }
    }
}

impl Default for RelayFixture {
    fn default() -> Self {
        Self::new()
    }
}
