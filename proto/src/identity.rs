//! Identities carried in certificates and registration JWTs, shared by relay and agent.
//!
//! - An agent's client certificate names its agent id, resource id and the resource's key
//!   generation in a URI SAN ([`AgentIdentity`]); the relay reads it back after the mTLS
//!   handshake and refuses generations older than the resource's current one.
//! - A registration JWT ([`RegistrationClaims`]) carries the relay URL and the SHA-256
//!   pin of the relay CA, so a new agent can trust the relay on first contact without a
//!   public CA. The agent reads the claims without verifying the signature (it does not
//!   hold the relay's key); the relay verifies it at enrollment.

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// JWT issuer of registration tokens.
pub const JWT_ISSUER: &str = "sluice-relay";
/// JWT audience of registration tokens.
pub const JWT_AUDIENCE: &str = "sluice-agent-registration";
const URI_PREFIX: &str = "urn:sluice:agent:";

/// Declares a typed id: a string on the wire and in the store, a distinct type in code,
/// so a function taking a resource id and an agent id cannot be called with them swapped.
macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name(s)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_owned())
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

typed_id!(
    /// A resource's id (`res_…`).
    ResourceId
);
typed_id!(
    /// An enrolled agent's id (`agt_…`), the identity in its certificate.
    AgentId
);
typed_id!(
    /// A control session's id (`ses_…`); data connections name it.
    SessionId
);

/// Who an agent is, as its client certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub agent_id: AgentId,
    pub resource_id: ResourceId,
    pub generation: u64,
}

impl AgentIdentity {
    /// The URI SAN that encodes this identity.
    pub fn to_uri(&self) -> String {
        format!("{URI_PREFIX}{}:resource:{}:generation:{}", self.agent_id, self.resource_id, self.generation)
    }

    /// Parses a URI made by [`AgentIdentity::to_uri`].
    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(URI_PREFIX)?;
        let mut parts = rest.split(':');
        let agent_id = parts.next()?;
        let (Some("resource"), Some(resource_id), Some("generation"), Some(generation), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if agent_id.is_empty() || resource_id.is_empty() {
            return None;
        }
        Some(AgentIdentity {
            agent_id: agent_id.into(),
            resource_id: resource_id.into(),
            generation: generation.parse().ok()?,
        })
    }

    /// Reads the identity from a DER client certificate.
    pub fn from_cert_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Self::from_uri(uri),
            _ => None,
        })
    }
}

/// The SHA-256 pin of a CA certificate (lower-case hex of the DER's digest).
pub fn ca_pin(ca_der: &[u8]) -> String {
    hex::encode(Sha256::digest(ca_der))
}

/// Claims of a registration JWT.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RegistrationClaims {
    pub iss: String,
    pub aud: String,
    /// Unique token id; the relay keeps a record of every token it issued.
    pub jti: String,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Expiry (seconds since the epoch); absent means the token does not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// The customer the agent registers for; absent for an org-only token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// Set when the token was issued for one existing resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// The resource's key generation when the token was issued (with `resource_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The URL agents dial (`https://host:port`).
    pub relay_url: String,
    /// SHA-256 pin of the relay CA certificate ([`ca_pin`]).
    pub ca_pin: String,
}

/// Why a string is not a usable registration JWT.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ClaimsError {
    #[error("not a JWT: expected three base64url parts separated by dots")]
    NotAJwt,
    #[error("the JWT's payload is not valid base64url")]
    BadEncoding,
    #[error("the JWT's payload is not a Sluice registration token: {0}")]
    BadClaims(String),
    #[error("the JWT is not a Sluice registration token (audience {0:?})")]
    WrongAudience(String),
    #[error("the JWT expired at {exp} (now {now}); ask the operator for a new one")]
    Expired { exp: u64, now: u64 },
}

impl RegistrationClaims {
    /// Reads the claims of `jwt` WITHOUT verifying its signature (the agent cannot:
    /// only the relay holds the key). Checks shape, audience and expiry against `now`.
    pub fn decode_unverified(jwt: &str, now: u64) -> Result<Self, ClaimsError> {
        let parts: Vec<&str> = jwt.trim().split('.').collect();
        if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(ClaimsError::NotAJwt);
        }
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(parts[1]).map_err(|_| ClaimsError::BadEncoding)?;
        let claims: RegistrationClaims =
            serde_json::from_slice(&payload).map_err(|e| ClaimsError::BadClaims(e.to_string()))?;
        if claims.aud != JWT_AUDIENCE {
            return Err(ClaimsError::WrongAudience(claims.aud));
        }
        if let Some(exp) = claims.exp
            && exp <= now
        {
            return Err(ClaimsError::Expired { exp, now });
        }
        Ok(claims)
    }
}

/// Longest resource name, in characters.
pub const MAX_NAME_CHARS: usize = 100;

/// Checks a resource's display name (the agent's `NAME`) and returns it trimmed.
///
/// Names are written by people (`Acme MS SQL`, `Lager Zürich`): any printable Unicode,
/// spaces included, 1 to [`MAX_NAME_CHARS`] characters after trimming. Refused are
/// control characters (newlines, escapes: they would forge log lines or repaint a
/// terminal) and the invisible format characters that make two different names look the
/// same or reorder text (zero-width spaces, bidirectional overrides, BOM). Whatever needs
/// a restricted character set — metric labels, file names — uses the resource id.
pub fn validate_resource_name(name: &str) -> Result<&str, String> {
    let trimmed = name.trim();
    let n = trimmed.chars().count();
    if n == 0 {
        return Err("the name is empty: give 1 to 100 printable characters, e.g. \"Acme PostgreSQL\"".into());
    }
    if n > MAX_NAME_CHARS {
        return Err(format!("the name is {n} characters long; at most {MAX_NAME_CHARS} are allowed"));
    }
    if let Some(bad) = trimmed.chars().find(|&c| c.is_control() || is_invisible_format(c)) {
        return Err(format!(
            "the name contains the non-printable character U+{:04X}; use printable characters and spaces only",
            bad as u32
        ));
    }
    Ok(trimmed)
}

/// Invisible characters that change how text looks without being visible themselves.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

/// A name made safe for one log line or terminal cell: at most 100 characters, control
/// and invisible characters escaped. For names that have not been validated yet.
pub fn printable(name: &str) -> String {
    let capped: String = name.chars().take(MAX_NAME_CHARS).collect();
    let mut out = escape_controls(&capped);
    if name.chars().count() > MAX_NAME_CHARS {
        out.push('…');
    }
    out
}

/// `text` with control and invisible format characters written as `\u{…}` escapes, so
/// nothing it holds can forge a line or steer a terminal (table cells, log fields).
pub fn escape_controls(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() || is_invisible_format(c) { c.escape_unicode().collect::<Vec<_>>() } else { vec![c] }
        })
        .collect()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_ids_are_plain_strings_on_the_wire() {
        let id = ResourceId::from("res_1");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"res_1\"");
        assert_eq!(serde_json::from_str::<AgentId>("\"agt_2\"").unwrap(), AgentId::from("agt_2"));
        let mut by_id = std::collections::HashMap::new();
        by_id.insert(SessionId::from("ses_3"), 3);
        assert_eq!(by_id.get("ses_3"), Some(&3), "looked up by &str");
        assert!(id == "res_1" && format!("{id}") == "res_1");
    }

    #[test]
    fn resource_names_are_display_names() {
        for good in ["orders-db", "Acme MS SQL", "Acme PostgreSQL", "Lager Zürich", "売上 DB", "a", &"x".repeat(100)]
        {
            assert_eq!(validate_resource_name(good), Ok(good), "{good:?}");
        }
        assert_eq!(validate_resource_name("  Acme MS SQL \t"), Ok("Acme MS SQL"));
        for (bad, why) in [
            ("", "empty"),
            ("   ", "empty"),
            ("a\nINFO forged line", "U+000A"),
            ("\u{1b}[31mred", "U+001B"),
            ("admin\u{202E}gpj", "U+202E"),
            ("zero\u{200B}width", "U+200B"),
            (&"x".repeat(101), "101 characters"),
        ] {
            let err = validate_resource_name(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(!err.contains('\n'));
        }
        assert_eq!(printable("a\nb"), "a\\u{a}b");
        assert!(printable(&"y".repeat(5000)).chars().count() <= MAX_NAME_CHARS + 1);
    }

    #[test]
    fn identity_uri_round_trips_and_rejects_junk() {
        let id = AgentIdentity { agent_id: "agt_1".into(), resource_id: "res_2".into(), generation: 3 };
        assert_eq!(AgentIdentity::from_uri(&id.to_uri()), Some(id));
        for bad in [
            "urn:sluice:agent:a:resource:r",
            "urn:sluice:agent:a:resource:r:generation:x",
            "urn:sluice:agent::resource:r:generation:1",
            "urn:sluice:agent:a:resource:r:generation:1:extra",
            "https://example.com",
        ] {
            assert_eq!(AgentIdentity::from_uri(bad), None, "{bad}");
        }
    }

    fn encode(claims: &serde_json::Value) -> String {
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.{}.sig", b.encode(b"{}"), b.encode(claims.to_string()))
    }

    fn claims(exp: Option<u64>) -> serde_json::Value {
        serde_json::json!({
            "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "jti": "j", "iat": 1, "exp": exp,
            "customer_id": "cus_1", "relay_url": "https://r:8443", "ca_pin": "ab"
        })
    }

    #[test]
    fn decodes_claims_and_checks_expiry_and_audience() {
        let c = RegistrationClaims::decode_unverified(&encode(&claims(None)), 10).unwrap();
        assert_eq!(c.customer_id.as_deref(), Some("cus_1"));
        assert_eq!(
            RegistrationClaims::decode_unverified(&encode(&claims(Some(5))), 10),
            Err(ClaimsError::Expired { exp: 5, now: 10 })
        );
        let mut other = claims(None);
        other["aud"] = "someone-else".into();
        assert!(matches!(
            RegistrationClaims::decode_unverified(&encode(&other), 10),
            Err(ClaimsError::WrongAudience(_))
        ));
        assert_eq!(RegistrationClaims::decode_unverified("abc", 1), Err(ClaimsError::NotAJwt));
        assert_eq!(RegistrationClaims::decode_unverified("a.!!!.c", 1), Err(ClaimsError::BadEncoding));
    }
}
