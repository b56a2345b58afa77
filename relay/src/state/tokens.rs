//! Registration JWTs: signing when the operator asks for one, verifying at enrollment.
//!
//! Only the relay signs and verifies these tokens, so a symmetric HMAC-SHA256 key is
//! enough. The signature proves the relay issued the token; the store's record of every
//! `jti` is what makes revocation (rotation, deletion) possible.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use sluice_proto::identity::{JWT_AUDIENCE, JWT_ISSUER, RegistrationClaims};
use sluice_proto::wire::{RejectCode, Rejection};

/// Signs and verifies registration JWTs with the relay's key.
pub struct TokenSigner {
    enc: EncodingKey,
    dec: DecodingKey,
}

impl TokenSigner {
    pub fn new(key: &[u8]) -> Self {
        TokenSigner { enc: EncodingKey::from_secret(key), dec: DecodingKey::from_secret(key) }
    }

    /// Signs `claims` into a compact JWT.
    pub fn sign(&self, claims: &RegistrationClaims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.enc)
            .expect("HMAC signing of serializable claims cannot fail")
    }

    /// Verifies signature, issuer, audience and expiry; the answer explains a refusal.
    pub fn verify(&self, jwt: &str) -> Result<RegistrationClaims, Rejection> {
        let mut v = Validation::new(Algorithm::HS256);
        v.set_audience(&[JWT_AUDIENCE]);
        v.set_issuer(&[JWT_ISSUER]);
        v.set_required_spec_claims(&["aud", "iss"]);
        v.leeway = 30;
        jsonwebtoken::decode::<RegistrationClaims>(jwt.trim(), &self.dec, &v).map(|d| d.claims).map_err(|e| {
            let (code, message) = match e.kind() {
                ErrorKind::ExpiredSignature => (
                    RejectCode::ExpiredToken,
                    "the registration JWT has expired; ask the operator for a new one \
                     (sluice resources registration-jwt)"
                        .to_owned(),
                ),
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => (
                    RejectCode::InvalidToken,
                    "the registration JWT's signature does not verify with this relay's key: it was \
                     issued by another relay or altered; ask this relay's operator for a new one"
                        .to_owned(),
                ),
                other => (RejectCode::InvalidToken, format!("the registration JWT is not valid: {other:?}")),
            };
            Rejection { code, message }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: Option<u64>) -> RegistrationClaims {
        RegistrationClaims {
            iss: JWT_ISSUER.into(),
            aud: JWT_AUDIENCE.into(),
            jti: "j1".into(),
            iat: 1_700_000_000,
            exp,
            customer_id: Some("cus_1".into()),
            resource_id: None,
            generation: None,
            relay_url: "https://localhost:8443".into(),
            ca_pin: "00".into(),
        }
    }

    #[test]
    fn signs_and_verifies_and_names_the_failure() {
        let s = TokenSigner::new(b"k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1k1");
        let jwt = s.sign(&claims(None));
        assert_eq!(s.verify(&jwt).unwrap(), claims(None));

        let other = TokenSigner::new(b"k2k2k2k2k2k2k2k2k2k2k2k2k2k2k2k2");
        assert_eq!(other.verify(&jwt).unwrap_err().code, RejectCode::InvalidToken);

        let expired = s.sign(&claims(Some(1000)));
        assert_eq!(s.verify(&expired).unwrap_err().code, RejectCode::ExpiredToken);
        assert_eq!(s.verify("garbage").unwrap_err().code, RejectCode::InvalidToken);
    }
}
