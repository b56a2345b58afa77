//! The enrollment request — the one message the relay reads from a peer that has not
//! authenticated — and the relay's decision on it (`Enroller::decide` over a real store).
//!
//! The input is the request's JSON. So that the fuzzer gets past the signature check and
//! reaches the name, hostname and CSR handling, a `jwt` of `$customer` or `$resource` is
//! replaced by a JWT the fixture relay issued (for customer `cus_a`, or for its resource
//! `fixed`), and a `csr_pem` of `$csr` by a real CSR.
//!
//! Checks: decoding never panics and round-trips; a refusal's message is one printable
//! line of bounded length whatever the request held (it reaches the agent's log and a
//! terminal); an enrollment is for the resource the NAME or the JWT says, and its
//! certificate names the identity returned.
#![no_main]

use std::cell::{Cell, RefCell};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sluice_fuzz::{RelayFixture, assert_printable_line};
use sluice_proto::identity::{AgentIdentity, validate_resource_name};
use sluice_proto::wire::EnrollRequest;
use sluice_relay::state::enrollment::Enroller;

/// Executions before the fixture (and its growing store) is made anew.
const FIXTURE_RUNS: u32 = 5_000;

thread_local! {
    static FIXTURE: RefCell<RelayFixture> = RefCell::new(RelayFixture::new());
    static RUNS: Cell<u32> = const { Cell::new(0) };
}

fuzz_target!(|body: &[u8]| {
    let Ok(mut req) = serde_json::from_slice::<EnrollRequest>(body) else { return };
    let encoded = serde_json::to_vec(&req).unwrap();
    assert_eq!(serde_json::from_slice::<EnrollRequest>(&encoded).unwrap(), req, "encode → decode");

    if RUNS.with(|r| r.replace(r.get() + 1)) >= FIXTURE_RUNS {
        RUNS.with(|r| r.set(0));
        FIXTURE.with(|f| *f.borrow_mut() = RelayFixture::new());
    }
    FIXTURE.with(|f| {
        let f = f.borrow();
        let for_resource = match req.jwt.as_str() {
            "$customer" => Some(false),
            "$resource" => Some(true),
            _ => None,
        };
        match for_resource {
            Some(false) => req.jwt = f.customer_jwt.clone(),
            Some(true) => req.jwt = f.resource_jwt.clone(),
            None => {}
        }
        if req.csr_pem == "$csr" {
            req.csr_pem = f.csr_pem.clone();
        }
        let enroller = Enroller {
            store: &f.store,
            signer: &f.signer,
            identity: &f.identity,
            resource_ports: 20_000..=29_999,
            cert_lifetime: Duration::from_secs(3600),
            // Quotas out of the way: millions of enrollments with one JWT would hit them
            // and stop every input at the quota check (tested in the relay's own tests).
            max_resources_per_customer: u32::MAX,
            max_enrollments_per_jwt_per_hour: u32::MAX,
        };
        match enroller.decide(&req) {
            Err(rejection) => {
                assert_printable_line("a refusal", &rejection.message);
                assert!(rejection.message.len() <= 2048, "a refusal of {} bytes", rejection.message.len());
            }
            Ok(enrollment) => {
                match for_resource {
                    Some(true) => assert_eq!(enrollment.resource_name, "fixed"),
                    _ => assert_eq!(Ok(enrollment.resource_name.as_str()), validate_resource_name(&req.name)),
                }
                let der = sluice_proto::tls::certs_from_pem(&enrollment.cert_pem).expect("the certificate parses");
                let who = AgentIdentity::from_cert_der(&der[0]).expect("the certificate names an identity");
                assert_eq!(
                    (who.agent_id, who.resource_id, who.generation),
                    (enrollment.agent_id, enrollment.resource_id, enrollment.generation)
                );
            }
        }
    });
});
