//! Registration JWTs, read by both sides: the agent's unverified read of the claims
//! (`RegistrationClaims::decode_unverified`) and the relay's verification
//! (`TokenSigner::verify`, in relay/src/state/tokens.rs).
//!
//! Checks:
//! The input is read twice: as a token, and, when it is the JSON of claims, as claims to
//! sign with the relay's key.
//!
//! - any string: neither side panics; what the agent accepts has the right audience and
//!   has not expired; what the relay accepts the agent reads as the same claims;
//! - claims signed with the relay's key: the relay accepts them exactly when issuer and
//!   audience are right and they have not expired (30 s leeway), and returns them as
//!   signed; a refusal says why in one line;
//! - the same token with one byte changed (other than whitespace around it) is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_fuzz::assert_printable_line;
use sluice_proto::identity::{JWT_AUDIENCE, JWT_ISSUER, RegistrationClaims, unix_now};
use sluice_proto::wire::RejectCode;
use sluice_relay::state::tokens::TokenSigner;

/// The relay key of this target; seeds signed with it (fuzz/examples/seed_corpus.rs)
/// start the fuzzer on real tokens.
const KEY: &[u8] = b"sluice-fuzz-jwt-key-0123456789ab";

fuzz_target!(|data: &[u8]| {
    let signer = TokenSigner::new(KEY);
    let now = unix_now();

    // Any string.
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = RegistrationClaims::decode_unverified(&text, now) {
        assert_eq!(c.aud, JWT_AUDIENCE);
        assert!(c.exp.is_none_or(|e| e > now));
    }
    match signer.verify(&text) {
        Ok(c) => assert_eq!(RegistrationClaims::decode_unverified(&text, 0), Ok(c)),
        Err(r) => assert_printable_line("a refusal", &r.message),
    }

    // Signed claims.
    let Ok(claims) = serde_json::from_slice::<RegistrationClaims>(data) else { return };
    let exp = claims.exp;
    let token = signer.sign(&claims);
    let verified = signer.verify(&token);
    let right = claims.iss == JWT_ISSUER && claims.aud == JWT_AUDIENCE;
    let left = exp.map(|e| e as i128 - now as i128);
    let expired = left.is_some_and(|l| l < -30);
    let code = verified.as_ref().map_err(|r| r.code);
    if left.is_some_and(|l| (-35..=-25).contains(&l)) {
        // Near the leeway's edge the clock may tick between signing and verifying.
    } else if right && !expired {
        assert_eq!(verified.as_ref(), Ok(&claims), "a good token is accepted as signed");
    } else if right {
        assert_eq!(code, Err(RejectCode::ExpiredToken), "an expired token");
    } else {
        assert!(matches!(code, Err(RejectCode::InvalidToken | RejectCode::ExpiredToken)), "{claims:?}: {code:?}");
        assert!(expired || code == Err(RejectCode::InvalidToken), "{claims:?}: {code:?}");
    }
    if let Err(r) = &verified {
        assert_printable_line("a refusal", &r.message);
    }
    if right && exp.is_none_or(|e| e > now) {
        assert_eq!(RegistrationClaims::decode_unverified(&token, now).as_ref(), Ok(&claims), "the agent's read");
    }

    // One byte changed (where and how follows from the input).
    let seed = data.iter().fold(7u64, |h, &b| h.wrapping_mul(31).wrapping_add(b as u64));
    let mut bytes = token.clone().into_bytes();
    let at = seed as usize % bytes.len();
    bytes[at] = bytes[at].wrapping_add(((seed >> 32) as u8).max(1));
    {
        let tampered = String::from_utf8_lossy(&bytes);
        if tampered.trim() != token {
            assert!(signer.verify(&tampered).is_err(), "a changed token was accepted: {tampered}");
        }
    }
});
