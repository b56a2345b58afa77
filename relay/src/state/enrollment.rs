//! Enrollment decisions: whether a registration JWT may enroll an agent for a resource,
//! and which certificate it gets; and whether a certificate still stands for a current
//! identity ([`check_identity`]).
//!
//! The decisions take exactly what they need — the store, the token signer, the relay's
//! identity (CA) and two settings — not the whole relay, so they are tested here over a
//! temporary store, one refusal code per row.

use std::ops::RangeInclusive;
use std::time::Duration;

use sluice_proto::identity::{AgentIdentity, RegistrationClaims, printable, unix_now, validate_resource_name};
use sluice_proto::wire::{EnrollRequest, Enrollment, PROTOCOL_VERSION, RejectCode, Rejection};
use tracing::{error, info, warn};

use crate::state::pki::RelayIdentity;
use crate::state::store::{AgentRecord, Resource, Store, StoreError};
use crate::state::tokens::TokenSigner;

/// Makes a short random id with a readable prefix, e.g. `res_k3x9…`.
pub fn new_id(prefix: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let s: String = (0..16).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect();
    format!("{prefix}_{s}")
}

pub(crate) fn reject(code: RejectCode, message: impl Into<String>) -> Rejection {
    Rejection { code, message: message.into() }
}

pub(crate) fn internal(e: StoreError) -> Rejection {
    error!(error = %e, "store error during enrollment");
    reject(RejectCode::Internal, "the relay could not read its store; try again later")
}

/// What an enrollment decision needs.
pub struct Enroller<'a> {
    pub store: &'a dyn Store,
    pub signer: &'a TokenSigner,
    pub identity: &'a RelayIdentity,
    /// Where a new resource's port comes from.
    pub resource_ports: RangeInclusive<u16>,
    /// Validity of the certificates signed for agents.
    pub cert_lifetime: Duration,
    /// `--max-resources-per-customer`: enrollments that would create one more are refused.
    pub max_resources_per_customer: u32,
    /// `--max-enrollments-per-jwt-per-hour`: agents one JWT may enroll per hour.
    pub max_enrollments_per_jwt_per_hour: u32,
}

/// The window of `--max-enrollments-per-jwt-per-hour`.
const ENROLLMENT_WINDOW_SECS: u64 = 3600;

impl Enroller<'_> {
    /// Checks an enrollment request against the token and the store and, if it is allowed,
    /// finds or creates the resource and issues the agent's certificate.
    /// Decides an enrollment: the JWT admits the agent, names (or creates) its resource,
    /// and the agent gets a certificate for its CSR.
    pub fn decide(&self, req: &EnrollRequest) -> Result<Enrollment, Rejection> {
        let claims = self.admit(req)?;
        self.check_enrollment_rate(&claims)?;
        let resource = self.resource_for(req, &claims)?;
        self.check_not_blocked(&claims, &resource)?;
        self.issue(req, &claims, resource)
    }

    /// The protocol version, the JWT's signature and expiry, its record (known, not
    /// revoked) and its customer (still there).
    fn admit(&self, req: &EnrollRequest) -> Result<RegistrationClaims, Rejection> {
        if req.version != PROTOCOL_VERSION {
            return Err(reject(RejectCode::UnsupportedVersion, sluice_proto::wire::version_refusal(req.version)));
        }
        let claims: RegistrationClaims = self.signer.verify(&req.jwt)?;
        let record = self.store.token(&claims.jti).map_err(internal)?.ok_or_else(|| {
            reject(
                RejectCode::InvalidToken,
                "the registration JWT is not known to this relay; ask its operator for a new one",
            )
        })?;
        if record.revoked_at.is_some() {
            let hint = match &claims.resource_id {
                Some(r) => format!("sluice resources registration-jwt --resource-id {r}"),
                None => "sluice resources registration-jwt".to_owned(),
            };
            return Err(reject(
                RejectCode::RevokedToken,
                format!(
                    "the registration JWT was revoked (by `sluice tokens revoke`, or because the resource it was issued for \
                     was rotated or deleted); ask the operator for a new one: {hint}"
                ),
            ));
        }
        if let Some(cid) = &claims.customer_id
            && self.store.customer(cid).map_err(internal)?.is_none()
        {
            return Err(reject(
                RejectCode::Forbidden,
                format!("customer {cid} of this registration JWT no longer exists"),
            ));
        }
        Ok(claims)
    }

    /// Refuses early, before a resource is created or a CSR signed, a JWT that already
    /// enrolled its hourly share of agents ([`Store::add_agent_within`] enforces it again,
    /// atomically, when the agent is recorded).
    fn check_enrollment_rate(&self, claims: &RegistrationClaims) -> Result<(), Rejection> {
        let since = unix_now().saturating_sub(ENROLLMENT_WINDOW_SECS);
        let max = self.max_enrollments_per_jwt_per_hour;
        let recent = self.store.enrollments_since(&claims.jti, since).map_err(internal)?;
        if recent >= u64::from(max) {
            return Err(rate_refusal(&claims.jti, recent, max));
        }
        Ok(())
    }

    /// The resource the JWT names, or the one of the agent's NAME for this customer
    /// (created with the lowest free port on first use).
    fn resource_for(&self, req: &EnrollRequest, claims: &RegistrationClaims) -> Result<Resource, Rejection> {
        match &claims.resource_id {
            Some(rid) => {
                let r = self.store.resource(rid).map_err(internal)?.ok_or_else(|| {
                    reject(RejectCode::RevokedToken, format!("resource {rid} of this registration JWT was deleted"))
                })?;
                if r.customer_id != claims.customer_id {
                    return Err(reject(
                        RejectCode::Forbidden,
                        format!(
                            "this registration JWT is for another customer than resource {rid}'s; it cannot enroll agents for it"
                        ),
                    ));
                }
                if claims.generation != Some(r.generation) {
                    return Err(reject(
                        RejectCode::RevokedToken,
                        format!(
                            "the registration JWT is of an older key generation of resource {rid} (rotated); ask the operator for a new one: sluice resources registration-jwt --resource-id {rid}"
                        ),
                    ));
                }
                if !req.name.trim().is_empty() && req.name.trim() != r.name {
                    return Err(reject(
                        RejectCode::BadRequest,
                        format!(
                            "NAME {:?} does not match resource {rid} ({:?}) this registration JWT was issued for; set NAME={} or use a customer JWT",
                            printable(&req.name),
                            r.name,
                            r.name
                        ),
                    ));
                }
                Ok(r)
            }
            None => {
                let name = validate_resource_name(&req.name)
                    .map_err(|m| reject(RejectCode::BadRequest, format!("NAME is not valid: {m}")))?;
                let cid = claims.customer_id.as_deref();
                match self.store.resource_by_name(cid, name).map_err(internal)? {
                    Some(r) => Ok(r),
                    None => {
                        let r = self
                            .store
                            .create_resource(
                                &new_id("res"),
                                cid,
                                name,
                                self.resource_ports.clone(),
                                self.max_resources_per_customer,
                                unix_now(),
                            )
                            .map_err(|e| match e {
                                StoreError::Exhausted(m) => {
                                    // The operator's problem, not the customer's: say it loudly.
                                    error!(reason = %m, "a resource cannot be created: the port range is full");
                                    reject(RejectCode::Unavailable, m)
                                }
                                StoreError::Quota(m) => {
                                    warn!(customer = cid, reason = %m, "enrollment refused: resource quota");
                                    reject(RejectCode::Forbidden, m)
                                }
                                StoreError::Conflict(_) => reject(
                                    RejectCode::Unavailable,
                                    "the resource was being created concurrently; retry",
                                ),
                                e => internal(e),
                            })?;
                        info!(resource = %r.id, name = %r.name, port = r.port, "resource created");
                        Ok(r)
                    }
                }
            }
        }
    }

    /// A customer or org-level JWT that enrolled agents of this resource before it was
    /// rotated may have leaked with them: it stays valid for other resources only.
    fn check_not_blocked(&self, claims: &RegistrationClaims, resource: &Resource) -> Result<(), Rejection> {
        if self.store.token_use_revoked_at(&claims.jti, &resource.id).map_err(internal)?.is_some() {
            let rid = &resource.id;
            return Err(reject(
                RejectCode::RevokedToken,
                format!(
                    "this registration JWT enrolled agents of resource {rid} ({:?}) before {rid} was rotated or deleted; \
                     it can no longer enroll agents for {rid} (it stays valid for other resources); issue a new one: \
                     sluice resources registration-jwt --resource-id {rid}",
                    resource.name
                ),
            ));
        }
        Ok(())
    }

    /// Signs the agent's certificate and records the agent and the JWT's use.
    fn issue(
        &self,
        req: &EnrollRequest,
        claims: &RegistrationClaims,
        resource: Resource,
    ) -> Result<Enrollment, Rejection> {
        let who = AgentIdentity {
            agent_id: new_id("agt").into(),
            resource_id: resource.id.clone().into(),
            generation: resource.generation,
        };
        let cert_pem = self
            .identity
            .sign_agent_csr(&req.csr_pem, &who, self.cert_lifetime)
            .map_err(|m| reject(RejectCode::BadRequest, m))?;
        let now = unix_now();
        let record = AgentRecord {
            id: who.agent_id.to_string(),
            resource_id: resource.id.clone(),
            generation: resource.generation,
            hostname: printable(&req.hostname),
            enrolled_at: now,
            jti: Some(claims.jti.clone()),
        };
        let window_start = now.saturating_sub(ENROLLMENT_WINDOW_SECS);
        let max = self.max_enrollments_per_jwt_per_hour;
        self.store.add_agent_within(&record, window_start, max).map_err(|e| match e {
            StoreError::Quota(_) => rate_refusal(&claims.jti, u64::from(max), max),
            e => internal(e),
        })?;
        self.store.mark_token_used(&claims.jti, &resource.id).map_err(internal)?;
        Ok(Enrollment {
            resource_id: resource.id.into(),
            resource_name: resource.name,
            customer_id: resource.customer_id,
            agent_id: who.agent_id,
            generation: who.generation,
            cert_pem,
            ca_pem: self.identity.ca_pem.clone(),
        })
    }
}

/// The refusal of a JWT over `--max-enrollments-per-jwt-per-hour` (transient: the agent
/// retries with backoff, and gets in once the hour's window moves on).
fn rate_refusal(jti: &str, recent: u64, max: u32) -> Rejection {
    warn!(%jti, recent, max, "enrollment refused: this JWT's enrollments per hour");
    reject(
        RejectCode::Unavailable,
        format!(
            "this registration JWT already enrolled {recent} agents in the last hour, the relay's limit \
             (--max-enrollments-per-jwt-per-hour {max}); retry later. An agent that enrolls afresh on every start \
             has lost its state: give it a persistent STATE_DIR (a volume)"
        ),
    )
}

/// Checks a client certificate's identity against the store: the resource must exist
/// and the certificate must be of its current key generation.
pub fn check_identity(store: &dyn Store, who: &AgentIdentity) -> Result<Resource, Rejection> {
    let r = store.resource(&who.resource_id).map_err(internal)?.ok_or_else(|| {
        reject(
            RejectCode::RevokedCertificate,
            format!("resource {} was deleted; this agent's certificate is no longer valid", who.resource_id),
        )
    })?;
    if who.generation != r.generation {
        return Err(reject(
            RejectCode::RevokedCertificate,
            format!(
                "this agent's certificate is of key generation {} but resource {} was rotated to generation {}; the agent needs a new registration JWT",
                who.generation, r.id, r.generation
            ),
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::{SqliteStore, TokenRecord};
    use sluice_proto::identity::{JWT_AUDIENCE, JWT_ISSUER};

    struct Fixture {
        _dir: tempfile::TempDir,
        store: SqliteStore,
        signer: TokenSigner,
        identity: RelayIdentity,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
            let identity = RelayIdentity::load_or_create(&dir.path().join("pki"), &["localhost".to_owned()]).unwrap();
            let signer = TokenSigner::new(&identity.jwt_key);
            store.create_customer("cus_a", "acme", 1).unwrap();
            store.create_customer("cus_b", "globex", 1).unwrap();
            Fixture { _dir: dir, store, signer, identity }
        }

        fn enroller(&self, ports: RangeInclusive<u16>) -> Enroller<'_> {
            Enroller {
                store: &self.store,
                signer: &self.signer,
                identity: &self.identity,
                resource_ports: ports,
                cert_lifetime: Duration::from_secs(3600),
                max_resources_per_customer: 100,
                max_enrollments_per_jwt_per_hour: 100,
            }
        }

        /// Issues (records and signs) a JWT.
        fn jwt(&self, jti: &str, customer: Option<&str>, resource: Option<(&str, u64)>) -> String {
            let claims = RegistrationClaims {
                iss: JWT_ISSUER.into(),
                aud: JWT_AUDIENCE.into(),
                jti: jti.into(),
                iat: unix_now(),
                exp: None,
                customer_id: customer.map(Into::into),
                resource_id: resource.map(|r| r.0.into()),
                generation: resource.map(|r| r.1),
                relay_url: "https://localhost:8443".into(),
                ca_pin: self.identity.ca_pin.clone(),
            };
            self.store
                .record_token(&TokenRecord {
                    jti: jti.into(),
                    customer_id: claims.customer_id.clone(),
                    resource_id: claims.resource_id.clone(),
                    issued_at: claims.iat,
                    expires_at: None,
                    revoked_at: None,
                })
                .unwrap();
            self.signer.sign(&claims)
        }
    }

    fn csr() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap()
    }

    fn request(jwt: String, name: &str) -> EnrollRequest {
        EnrollRequest {
            version: PROTOCOL_VERSION,
            jwt,
            name: name.into(),
            csr_pem: csr(),
            agent_version: "test".into(),
            hostname: "h".into(),
        }
    }

    #[test]
    fn enrolls_then_reuses_the_resource_of_the_same_name() {
        let f = Fixture::new();
        let e = f.enroller(100..=101);
        let jwt = f.jwt("j1", Some("cus_a"), None);
        let first = e.decide(&request(jwt.clone(), "Acme MS SQL")).unwrap();
        let second = e.decide(&request(jwt, "  Acme MS SQL ")).unwrap();
        assert_eq!(first.resource_id, second.resource_id, "same NAME and customer: one resource");
        assert_ne!(first.agent_id, second.agent_id);
        assert_eq!(first.resource_name, "Acme MS SQL");
        let der = sluice_proto::tls::certs_from_pem(&first.cert_pem).unwrap().remove(0);
        let who = AgentIdentity::from_cert_der(&der).unwrap();
        assert_eq!((who.resource_id.as_str(), who.generation), (first.resource_id.as_str(), 1));
        assert!(check_identity(&f.store, &who).is_ok());
    }

    /// One row per refusal: what the request is, the code, and words the message must carry.
    #[test]
    fn each_refusal_has_its_code_and_says_why() {
        let f = Fixture::new();
        let e = f.enroller(100..=102);
        // A resource of customer A, enrolled once so its id exists.
        let seed = f.jwt("seed", Some("cus_a"), None);
        let a = e.decide(&request(seed.clone(), "db")).unwrap();
        let rid = a.resource_id.as_str();
        let other_signer = TokenSigner::new(b"another relay's key, 32 bytes...");
        let expired = {
            let mut c =
                sluice_proto::identity::RegistrationClaims::decode_unverified(&f.jwt("old", Some("cus_a"), None), 0)
                    .unwrap();
            c.exp = Some(unix_now() - 3600);
            f.signer.sign(&c)
        };
        let unknown = {
            let mut c =
                sluice_proto::identity::RegistrationClaims::decode_unverified(&f.jwt("x", Some("cus_a"), None), 0)
                    .unwrap();
            c.jti = "never-issued".into();
            f.signer.sign(&c)
        };
        let forged = {
            let c = sluice_proto::identity::RegistrationClaims::decode_unverified(&f.jwt("y", Some("cus_a"), None), 0)
                .unwrap();
            other_signer.sign(&c)
        };
        let revoked = f.jwt("revoked", Some("cus_a"), None);
        f.store.revoke_token("revoked", unix_now()).unwrap();
        let gone_customer = f.jwt("gone", Some("cus_gone"), None);
        let foreign = f.jwt("foreign", Some("cus_b"), Some((rid, 1)));
        let wrong_name = f.jwt("named", Some("cus_a"), Some((rid, 1)));
        let customer_jwt = f.jwt("cust", Some("cus_a"), None);
        // Fill the port range: 100 is "db", then two more.
        e.decide(&request(customer_jwt.clone(), "second")).unwrap();
        e.decide(&request(customer_jwt.clone(), "third")).unwrap();

        let rows: Vec<(&str, EnrollRequest, RejectCode, &str)> = vec![
            (
                "protocol version",
                EnrollRequest { version: 99, ..request(customer_jwt.clone(), "x") },
                RejectCode::UnsupportedVersion,
                "upgrade the relay first",
            ),
            ("signed by another relay", request(forged, "x"), RejectCode::InvalidToken, "signature"),
            ("never issued here", request(unknown, "x"), RejectCode::InvalidToken, "not known"),
            ("expired", request(expired, "x"), RejectCode::ExpiredToken, "expired"),
            ("revoked", request(revoked, "x"), RejectCode::RevokedToken, "revoked"),
            ("customer gone", request(gone_customer, "x"), RejectCode::Forbidden, "no longer exists"),
            ("another customer's resource", request(foreign, ""), RejectCode::Forbidden, "another customer"),
            (
                "NAME differs from the JWT's resource",
                request(wrong_name, "other"),
                RejectCode::BadRequest,
                "does not match",
            ),
            ("NAME with a newline", request(customer_jwt.clone(), "a\nb"), RejectCode::BadRequest, "NAME is not valid"),
            (
                "unreadable CSR",
                EnrollRequest { csr_pem: "junk".into(), ..request(customer_jwt.clone(), "db") },
                RejectCode::BadRequest,
                "signing request",
            ),
            ("port range full", request(customer_jwt.clone(), "fourth"), RejectCode::Unavailable, "--resource-ports"),
        ];
        let check = |rows: Vec<(&str, EnrollRequest, RejectCode, &str)>| {
            for (what, req, code, words) in rows {
                let r = e.decide(&req).expect_err(what);
                assert_eq!(r.code, code, "{what}: {}", r.message);
                assert!(r.message.contains(words), "{what}: {:?} should mention {words:?}", r.message);
                assert!(!r.message.contains('\n'), "{what}: one line");
            }
        };
        check(rows);

        // A rotation: a resource JWT of generation 1 is now too old, and the customer JWT
        // that enrolled "db" may no longer enroll into it (it may for the others).
        f.store.rotate_resource(rid, unix_now()).unwrap();
        let old_generation = f.jwt("gen1", Some("cus_a"), Some((rid, 1)));
        f.store.create_resource("res_deleted", Some("cus_a"), "deleted", 200..=200, u32::MAX, 1).unwrap();
        let deleted = f.jwt("del", Some("cus_a"), Some(("res_deleted", 1)));
        f.store.delete_resource("res_deleted", unix_now()).unwrap();
        check(vec![
            ("older generation", request(old_generation, ""), RejectCode::RevokedToken, "older key generation"),
            ("resource deleted", request(deleted, ""), RejectCode::RevokedToken, "deleted"),
            (
                "customer JWT blocked for the rotated resource",
                request(seed.clone(), "db"),
                RejectCode::RevokedToken,
                rid,
            ),
        ]);
        // The blocked customer JWT still enrolls into the customer's other resources.
        assert!(e.decide(&request(seed, "second")).is_ok());
    }

    /// Rows 3 and 5 of issue #11: quotas refuse with a code the agent understands (a
    /// resource quota is final, an hourly rate is retried) and name their flag.
    #[test]
    fn quotas_refuse_with_their_flag_before_anything_is_created() {
        let f = Fixture::new();
        let e =
            Enroller { max_resources_per_customer: 2, max_enrollments_per_jwt_per_hour: 3, ..f.enroller(100..=109) };
        let jwt = f.jwt("j", Some("cus_a"), None);
        e.decide(&request(jwt.clone(), "one")).unwrap();
        e.decide(&request(jwt.clone(), "two")).unwrap();
        let over = e.decide(&request(jwt.clone(), "three")).unwrap_err();
        assert_eq!(over.code, RejectCode::Forbidden, "{}", over.message);
        assert!(over.message.contains("--max-resources-per-customer 2"), "{}", over.message);
        let other = f.jwt("k", Some("cus_b"), None);
        e.decide(&request(other, "three")).expect("customer B has its own quota");

        e.decide(&request(jwt.clone(), "one")).unwrap();
        let rate = e.decide(&request(jwt.clone(), "one")).unwrap_err();
        assert_eq!(rate.code, RejectCode::Unavailable, "{}", rate.message);
        assert!(rate.code.is_transient());
        assert!(rate.message.contains("--max-enrollments-per-jwt-per-hour 3"), "{}", rate.message);
        assert_eq!(f.store.enrollments_since("j", 0).unwrap(), 3, "no fourth agent on record");
    }
}
