//! The kernel-TLS record classifier (`sluice_datapath::ktls::records::classify`): what a
//! record that the kernel will not splice means, from its content type and plaintext.
//! The input is the content type byte followed by the record's plaintext.
//!
//! Checks: every record is decided without a panic; only application data is payload;
//! only a two-byte alert with description 0 is a clean close; only the exact five-byte
//! KeyUpdate message (type 24, length 1, request 0 or 1) is a key update; a fatal reason
//! is one printable line that never repeats the peer's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_datapath::ktls::records::{ALERT, APPLICATION_DATA, CHANGE_CIPHER_SPEC, HANDSHAKE, Received, classify};
use sluice_fuzz::assert_printable_line;

fuzz_target!(|data: &[u8]| {
    let Some((&record_type, payload)) = data.split_first() else { return };
    let received = classify(record_type, payload);
    assert_eq!(received == Received::Data, record_type == APPLICATION_DATA, "{received:?}");
    let close_notify = record_type == ALERT && payload.len() == 2 && payload[1] == 0;
    assert_eq!(received == Received::CloseNotify, close_notify, "{received:?}");
    match received {
        Received::Ignore(_) => {
            assert!(matches!(record_type, ALERT | HANDSHAKE | CHANGE_CIPHER_SPEC), "type {record_type} ignored")
        }
        Received::Fatal(why) => {
            assert_printable_line("a fatal reason", &why);
            assert!(why.len() <= 256, "a reason of {} bytes", why.len());
        }
        Received::KeyUpdate { update_requested } => {
            assert_eq!(record_type, HANDSHAKE);
            assert_eq!(payload, [24, 0, 0, 1, u8::from(update_requested)], "only a well-formed KeyUpdate");
        }
        Received::Data | Received::CloseNotify => {}
    }
});
