//! Frame decoding (`read_frame_limited`) over any bytes a peer may send, split anywhere.
//!
//! Checks, for the three limits in use (authenticated, unauthenticated, and a small one):
//! - the outcome follows from the bytes alone: nothing is a clean close, a short length
//!   prefix or body is truncation, a declared length over the limit is refused before
//!   any of its body is read, and a complete frame decodes as its JSON does;
//! - a read stops at the frame's end (the raw stream bytes after it stay unread);
//! - splitting the bytes differently changes nothing;
//! - no allocation is larger than what arrived (or the 8 KiB first body chunk): a
//!   declared 1 MiB frame costs only the bytes that came.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;
use sluice_fuzz::{Chunked, block_on, chunk_sizes, largest_allocation};
use sluice_proto::wire::{MAX_FRAME, MAX_UNAUTHENTICATED_FRAME, WireError, read_frame_limited};

/// Each outcome, comparable across splits.
#[derive(Debug, PartialEq)]
enum Outcome {
    Closed,
    Truncated,
    TooLarge { len: usize, limit: usize },
    Malformed,
    Frame,
}

fn read(data: &[u8], limit: usize, sizes: Vec<usize>) -> (Outcome, usize, usize) {
    let mut r = Chunked::new(data, sizes);
    let (got, largest) = largest_allocation(|| block_on(read_frame_limited::<_, IgnoredAny>(&mut r, limit)));
    let outcome = match got {
        Err(WireError::Closed) => Outcome::Closed,
        Err(WireError::Truncated) => Outcome::Truncated,
        Err(WireError::TooLarge { len, limit }) => Outcome::TooLarge { len, limit },
        Err(WireError::Malformed(_)) => Outcome::Malformed,
        Err(WireError::Io(e)) => panic!("i/o error from memory: {e}"),
        Ok(IgnoredAny) => Outcome::Frame,
    };
    (outcome, data.len() - r.rest().len(), largest)
}

fuzz_target!(|data: &[u8]| {
    for limit in [MAX_FRAME, MAX_UNAUTHENTICATED_FRAME, 64] {
        let (outcome, consumed, largest) = read(data, limit, vec![usize::MAX]);
        let n = data.len();
        let declared = (n >= 4).then(|| u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize);
        let expected = match declared {
            None if n == 0 => Outcome::Closed,
            None => Outcome::Truncated,
            Some(len) if len > limit => Outcome::TooLarge { len, limit },
            Some(len) if n < 4 + len => Outcome::Truncated,
            Some(len) => match serde_json::from_slice::<IgnoredAny>(&data[4..4 + len]) {
                Ok(_) => Outcome::Frame,
                Err(_) => Outcome::Malformed,
            },
        };
        assert_eq!(outcome, expected, "limit {limit}");
        match (&outcome, declared) {
            (Outcome::TooLarge { .. }, _) => assert_eq!(consumed, 4, "a refused frame's body is not read"),
            (Outcome::Frame | Outcome::Malformed, Some(len)) => {
                assert_eq!(consumed, 4 + len, "a read stops at the frame's end")
            }
            _ => {}
        }
        let bound = 2 * n.max(8 << 10);
        assert!(largest <= bound, "allocated {largest} bytes for a {n}-byte input (limit {limit})");

        let (chunked, chunked_consumed, _) = read(data, limit, chunk_sizes(data));
        assert_eq!((chunked, chunked_consumed), (outcome, consumed), "the same bytes split differently");
    }
});
