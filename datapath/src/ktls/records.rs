//! What a TLS record that is not application data means once the kernel owns the
//! connection's receive side, decided without touching a socket (so it is tested on
//! any kernel).
//!
//! After offload the kernel decrypts every record but hands only application data to
//! `read`/`splice`; anything else stops them (`EIO`/`EINVAL`) until it is read with
//! `recvmsg`, which also says the record's content type. This module decides what the
//! stream does with it.

/// TLS content types (RFC 8446 §5.1).
pub const CHANGE_CIPHER_SPEC: u8 = 20;
pub const ALERT: u8 = 21;
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;

/// Alert level "warning" + description "close_notify".
pub const CLOSE_NOTIFY: [u8; 2] = [1, 0];
const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_USER_CANCELED: u8 = 90;
const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
const HANDSHAKE_KEY_UPDATE: u8 = 24;

/// What to do with a received record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Payload: deliver it.
    Data,
    /// The peer ended its direction cleanly: propagate a half-close.
    CloseNotify,
    /// Harmless; read on.
    Ignore(&'static str),
    /// The peer moved to its next send key (RFC 8446 §4.6.3): install the next receive
    /// key before reading on; if it asks, answer before the next data this end sends.
    KeyUpdate { update_requested: bool },
    /// The stream cannot continue: abort it, with this reason.
    Fatal(String),
}

/// Classifies one record read with `recvmsg` (its content type and plaintext).
pub fn classify(record_type: u8, payload: &[u8]) -> Received {
    match record_type {
        APPLICATION_DATA => Received::Data,
        ALERT => match payload {
            [_, ALERT_CLOSE_NOTIFY] => Received::CloseNotify,
            // "should be followed by close_notify" (RFC 8446 §6.1): wait for that.
            [_, ALERT_USER_CANCELED] => Received::Ignore("user_canceled alert"),
            [level, description] => Received::Fatal(format!(
                "the peer sent TLS alert {description} (level {level}): the tunnel connection failed"
            )),
            _ => Received::Fatal(format!("malformed TLS alert record ({} bytes)", payload.len())),
        },
        HANDSHAKE => match payload.first() {
            // A ticket that arrives after offload is only a spare for resumption: drop it.
            Some(&HANDSHAKE_NEW_SESSION_TICKET) => Received::Ignore("session ticket"),
            Some(&HANDSHAKE_KEY_UPDATE) => match payload {
                [_, 0, 0, 1, 0] => Received::KeyUpdate { update_requested: false },
                [_, 0, 0, 1, 1] => Received::KeyUpdate { update_requested: true },
                // One message per record (rustls sends it so); anything else is refused
                // rather than half understood.
                _ => Received::Fatal(format!("malformed TLS KeyUpdate record ({} bytes)", payload.len())),
            },
            Some(t) => Received::Fatal(format!("unexpected TLS handshake message {t} after the handshake")),
            None => Received::Fatal("empty TLS handshake record".into()),
        },
        CHANGE_CIPHER_SPEC => Received::Ignore("change_cipher_spec"),
        other => Received::Fatal(format!("unknown TLS record type {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_notify_ends_the_direction_cleanly() {
        assert_eq!(classify(ALERT, &CLOSE_NOTIFY), Received::CloseNotify);
        // TLS 1.3 ignores the level byte.
        assert_eq!(classify(ALERT, &[2, 0]), Received::CloseNotify);
    }

    #[test]
    fn other_alerts_abort_with_their_code() {
        match classify(ALERT, &[2, 40]) {
            Received::Fatal(why) => assert!(why.contains("alert 40"), "{why}"),
            r => panic!("{r:?}"),
        }
        assert!(matches!(classify(ALERT, &[1]), Received::Fatal(_)));
        assert!(matches!(classify(ALERT, &[1, 0, 0]), Received::Fatal(_)));
        assert_eq!(classify(ALERT, &[1, 90]), Received::Ignore("user_canceled alert"));
    }

    #[test]
    fn handshake_messages_after_offload() {
        assert_eq!(classify(HANDSHAKE, &[4, 0, 0, 1, 0]), Received::Ignore("session ticket"));
        assert_eq!(classify(HANDSHAKE, &[24, 0, 0, 1, 0]), Received::KeyUpdate { update_requested: false });
        assert_eq!(classify(HANDSHAKE, &[24, 0, 0, 1, 1]), Received::KeyUpdate { update_requested: true });
        for bad in [&[24, 0, 0, 1, 2][..], &[24, 0, 0, 1], &[24, 0, 0, 2, 0, 0], &[24, 0, 0, 1, 0, 4, 0, 0, 0]] {
            match classify(HANDSHAKE, bad) {
                Received::Fatal(why) => assert!(why.contains("KeyUpdate"), "{why}"),
                r => panic!("{bad:?}: {r:?}"),
            }
        }
        assert!(matches!(classify(HANDSHAKE, &[]), Received::Fatal(_)));
        assert!(matches!(classify(HANDSHAKE, &[1]), Received::Fatal(_)));
    }

    #[test]
    fn every_type_is_decided() {
        // Property: no input panics, and only application data counts as payload.
        for ty in 0..=255u8 {
            for payload in [&[][..], &[1], &[1, 0], &[2, 50], &[4, 0], &[24, 0, 0]] {
                let r = classify(ty, payload);
                assert_eq!(r == Received::Data, ty == APPLICATION_DATA, "{ty} {payload:?}");
            }
        }
    }
}
