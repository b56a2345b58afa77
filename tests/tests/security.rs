//! Who may talk to the relay: each forged or borrowed credential is refused.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls::pki_types::ServerName;
use sluice_e2e::load::echo_server;
use sluice_e2e::{Agent, Relay, test_dir};
use sluice_proto::identity::{JWT_AUDIENCE, JWT_ISSUER, RegistrationClaims, unix_now};
use sluice_proto::tls;
use sluice_proto::wire::{self, ALPN_CONTROL, AgentMsg, Capabilities, PROTOCOL_VERSION, RelayMsg};
use tokio::net::TcpStream;

fn read(p: std::path::PathBuf) -> String {
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Opens a control session to `relay` with `config`; Ok(msg) is the relay's first answer.
async fn try_control(relay: &Relay, config: rustls::ClientConfig) -> Result<RelayMsg, String> {
    let tcp = TcpStream::connect(("127.0.0.1", relay.agent_port)).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut t =
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let hello = AgentMsg::Hello {
        version: PROTOCOL_VERSION,
        agent_version: "test".into(),
        hostname: "test".into(),
        capabilities: Capabilities::default(),
    };
    wire::write_frame(&mut t, &hello).await.map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(10), wire::read_frame::<_, RelayMsg>(&mut t))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())
}

/// An enrolled agent's state dir (key, cert, CA) from relay `r`.
async fn enrolled_agent(dir: &std::path::Path, r: &Relay, label: &str) -> (Agent, String) {
    let echo = echo_server().await;
    let cid = r.create_customer(&format!("cust-{label}"));
    let agent = Agent::for_service(dir, label, echo.port(), &r.customer_jwt(&cid));
    r.wait_status(label, "AVAILABLE", Some(&agent));
    (agent, cid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cert_from_another_relays_ca_is_refused() {
    let dir = test_dir("sec-foreign-ca");
    let a = Relay::start(&dir.path().join("a"));
    let b = Relay::start(&dir.path().join("b"));
    let (agent_b, _) = enrolled_agent(&dir.path().join("b"), &b, "other").await;
    // Trust A's CA (so the server side verifies), present B's agent certificate.
    let a_ca = tls::certs_from_pem(&read(a.data_dir().join("ca.pem"))).unwrap().remove(0);
    let b_chain = tls::certs_from_pem(&read(agent_b.state_dir.join("agent.pem"))).unwrap();
    let b_key = tls::key_from_pem(&read(agent_b.state_dir.join("agent.key"))).unwrap();
    let cfg = tls::agent_session_config(a_ca.clone(), b_chain.clone(), b_key.clone_key(), ALPN_CONTROL).unwrap();
    let r = try_control(&a, cfg).await;
    assert!(r.is_err(), "relay A must refuse B's certificate, got {r:?}");
    assert!(r.unwrap_err().contains("alert"), "refused in the TLS handshake");

    // The same certificate is accepted by its own relay (the test is not vacuous).
    let b_ca = tls::certs_from_pem(&read(b.data_dir().join("ca.pem"))).unwrap().remove(0);
    let cfg = tls::agent_session_config(b_ca, b_chain, b_key, ALPN_CONTROL).unwrap();
    assert!(matches!(try_control(&b, cfg).await, Ok(RelayMsg::Welcome { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_session_without_client_cert_is_refused() {
    let dir = test_dir("sec-no-cert");
    let a = Relay::start(dir.path());
    let a_ca = tls::certs_from_pem(&read(a.data_dir().join("ca.pem"))).unwrap().remove(0);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(a_ca).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_CONTROL.to_vec()];
    let r = try_control(&a, cfg).await;
    assert!(r.is_err(), "no client certificate must be refused, got {r:?}");
}

fn sign(claims: &RegistrationClaims, key: &[u8]) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(key)).unwrap()
}

fn claims_for(relay: &Relay, jti: &str) -> RegistrationClaims {
    let ca = tls::certs_from_pem(&read(relay.data_dir().join("ca.pem"))).unwrap().remove(0);
    RegistrationClaims {
        iss: JWT_ISSUER.into(),
        aud: JWT_AUDIENCE.into(),
        jti: jti.into(),
        iat: unix_now(),
        exp: None,
        customer_id: None,
        resource_id: None,
        generation: None,
        relay_url: relay.public_url(),
        ca_pin: sluice_proto::identity::ca_pin(&ca),
    }
}

#[test]
fn jwt_signed_by_another_key_is_refused() {
    let dir = test_dir("sec-jwt-key");
    let relay = Relay::start(dir.path());
    let cid = relay.create_customer("acme");
    let mut c = claims_for(&relay, "jwt_forged");
    c.customer_id = Some(cid);
    let forged = sign(&c, b"not-the-relays-key-not-the-relays-key");
    let mut agent = Agent::for_service(dir.path(), "forged", 1, &forged);
    assert_eq!(agent.proc.wait_exit(Duration::from_secs(20)), Some(1));
    let log = agent.proc.log_text();
    assert!(log.contains("signature does not verify with this relay's key"), "{log}");
    assert!(relay.resource("forged").is_none(), "no resource was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_of_customer_a_cannot_enroll_into_customer_bs_resource() {
    let dir = test_dir("sec-cross-customer");
    let relay = Relay::start(dir.path());
    let (_agent_b, cid_b) = enrolled_agent(dir.path(), &relay, "b-db").await;
    let b_res = relay.resource("b-db").unwrap();
    assert_eq!(b_res["customer_id"], cid_b.as_str());
    let rid_b = b_res["id"].as_str().unwrap().to_owned();
    let cid_a = relay.create_customer("cust-a");

    // Through the API: a token for A naming B's resource is refused outright.
    let out = relay.cli(&["resources", "registration-jwt", "--customer-id", &cid_a, "--resource-id", &rid_b]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not belong to customer"), "{:?}", out);

    // At enrollment: a validly signed token of customer A (a real, unrevoked jti) that
    // claims B's resource is refused — the relay checks the customer, not just the signature.
    let issued: serde_json::Value = serde_json::from_str(&relay.cli_ok(&[
        "resources",
        "registration-jwt",
        "--customer-id",
        &cid_a,
        "--output",
        "json",
    ]))
    .unwrap();
    let mut c = claims_for(&relay, issued["jti"].as_str().unwrap());
    c.customer_id = Some(cid_a);
    c.resource_id = Some(rid_b.clone());
    c.generation = Some(1);
    let key = hex::decode(read(relay.data_dir().join("jwt-signing.key")).trim()).unwrap();
    let crossed = sign(&c, &key);
    let mut agent = Agent::start(
        dir.path(),
        "crossed",
        &[("APP_HOST", "127.0.0.1"), ("APP_PORT", "1"), ("NAME", "b-db"), ("REGISTRATION_JWT", &crossed)],
    );
    assert_eq!(agent.proc.wait_exit(Duration::from_secs(20)), Some(1));
    let log = agent.proc.log_text();
    assert!(log.contains("is for another customer"), "{log}");
    assert_eq!(relay.resource("b-db").unwrap()["agents"], 1, "B's resource still has only its own agent");
}
