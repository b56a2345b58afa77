//! Every control-session and data-connection message: the JSON body of a frame decoded
//! as each message type ([`AgentMsg`], [`RelayMsg`], [`DataHello`], [`StreamOpen`],
//! [`StreamReply`], [`EnrollResponse`]).
//!
//! Checks: decoding never panics; whatever decodes survives encode → decode unchanged,
//! re-encodes to the same bytes, and goes through `write_frame` → `read_frame` unchanged.
#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_fuzz::{Chunked, block_on, chunk_sizes};
use sluice_proto::wire::{
    AgentMsg, DataHello, EnrollResponse, RelayMsg, StreamOpen, StreamReply, read_frame, write_frame,
};

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(body: &[u8]) {
    let Ok(msg) = serde_json::from_slice::<T>(body) else { return };
    let encoded = serde_json::to_vec(&msg).expect("a decoded message encodes");
    let back: T = serde_json::from_slice(&encoded)
        .unwrap_or_else(|e| panic!("re-decoding {} failed: {e}", String::from_utf8_lossy(&encoded)));
    assert_eq!(back, msg, "encode → decode changed the message");
    assert_eq!(serde_json::to_vec(&back).unwrap(), encoded, "encoding is not stable");

    let mut wire = Vec::new();
    block_on(write_frame(&mut wire, &msg)).expect("a frame of a decoded message is writable");
    let mut r = Chunked::new(&wire, chunk_sizes(body));
    let framed: T = block_on(read_frame(&mut r)).expect("a written frame reads back");
    assert_eq!(framed, msg, "write_frame → read_frame changed the message");
    assert!(r.rest().is_empty());
}

fuzz_target!(|body: &[u8]| {
    round_trip::<AgentMsg>(body);
    round_trip::<RelayMsg>(body);
    round_trip::<DataHello>(body);
    round_trip::<StreamOpen>(body);
    round_trip::<StreamReply>(body);
    round_trip::<EnrollResponse>(body);
});
