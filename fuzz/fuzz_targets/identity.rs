//! Strings that name things: resource names (`validate_resource_name`, `printable`), the
//! relay URL (`RelayUrl::parse`) and the agent identity in a certificate
//! (`AgentIdentity::from_uri`, `from_cert_der`). The input is one string (and, for the
//! certificate parser, the same bytes as DER).
//!
//! Checks:
//! - a valid name is the input trimmed, 1–100 characters, with no control or invisible
//!   character, and stays valid; a refusal is one printable line;
//! - `printable` output has no control character and is bounded, and leaves valid names
//!   as they are;
//! - a parsed relay URL prints as a URL that parses to the same, and that printed form
//!   is what was written (modulo whitespace, a trailing `/`, the default port and
//!   leading zeros of the port): nothing the operator wrote is silently dropped;
//! - a parsed identity URI round-trips through `to_uri`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_fuzz::assert_printable_line;
use sluice_proto::identity::{AgentIdentity, MAX_NAME_CHARS, printable, validate_resource_name};
use sluice_proto::relay_url::RelayUrl;

fuzz_target!(|data: &[u8]| {
    let _ = AgentIdentity::from_cert_der(data);
    let Ok(s) = std::str::from_utf8(data) else { return };

    match validate_resource_name(s) {
        Ok(name) => {
            assert_eq!(name, s.trim());
            assert!((1..=MAX_NAME_CHARS).contains(&name.chars().count()));
            assert!(!name.chars().any(char::is_control));
            assert_eq!(validate_resource_name(name), Ok(name));
            assert_eq!(printable(name), name, "a valid name prints as it is");
        }
        Err(why) => assert_printable_line("a name refusal", &why),
    }
    let shown = printable(s);
    assert_printable_line("printable()", &shown);
    assert!(shown.chars().count() <= MAX_NAME_CHARS * 10 + 1, "{} characters", shown.chars().count());

    match RelayUrl::parse(s) {
        Ok(url) => {
            assert!(!url.host.is_empty() && url.port != 0);
            let printed = url.to_string();
            assert_eq!(RelayUrl::parse(&printed).as_ref(), Ok(&url), "{printed}");
            // What was written is https://HOST, optionally :PORT in digits, and nothing else.
            let written = s.trim().trim_end_matches('/');
            let host = if url.host.contains(':') { format!("[{}]", url.host) } else { url.host.clone() };
            let port = written.strip_prefix("https://").and_then(|w| w.strip_prefix(host.as_str()));
            let port_ok = match port {
                Some("") => url.port == 443,
                Some(p) => p.strip_prefix(':').is_some_and(|p| {
                    !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse() == Ok(url.port)
                }),
                None => false,
            };
            assert!(port_ok, "{s:?} was read as {printed}");
        }
        Err(why) => assert!(!why.contains('\n')),
    }

    if let Some(id) = AgentIdentity::from_uri(s) {
        assert_eq!(AgentIdentity::from_uri(&id.to_uri()), Some(id));
    }
});
