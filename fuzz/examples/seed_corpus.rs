//! Writes the seed corpus (`fuzz/corpus/<target>/`) from real messages: the frames,
//! requests, tokens and settings relay and agent exchange, plus a few known-bad inputs
//! that the tests next to each parser pin down. The files are committed; regenerate
//! them after a protocol change with
//!
//!     CARGO_TARGET_DIR=target cargo run --release --manifest-path fuzz/Cargo.toml --example seed_corpus
//!
//! (the main workspace's target directory: its release dependencies are reused).
//!
//! Each file is named after what it holds, so a seed that starts failing says what it was.

use std::path::{Path, PathBuf};

use base64::Engine;
use sluice_fuzz::block_on;
use sluice_proto::identity::{AgentIdentity, JWT_AUDIENCE, JWT_ISSUER, RegistrationClaims};
use sluice_proto::wire::*;

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(target: &str, name: &str, bytes: impl AsRef<[u8]>) {
    std::fs::write(corpus(target).join(name), bytes).unwrap();
}

fn frame<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    block_on(write_frame(&mut out, msg)).unwrap();
    out
}

fn claims(customer: Option<&str>, resource: Option<(&str, u64)>, exp: Option<u64>) -> RegistrationClaims {
    RegistrationClaims {
        iss: JWT_ISSUER.into(),
        aud: JWT_AUDIENCE.into(),
        jti: "jti_seed".into(),
        iat: 1_700_000_000,
        exp,
        customer_id: customer.map(Into::into),
        resource_id: resource.map(|r| r.0.into()),
        generation: resource.map(|r| r.1),
        relay_url: "https://relay.example.com:8443".into(),
        ca_pin: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
    }
}

fn main() {
    let hello = AgentMsg::Hello {
        version: PROTOCOL_VERSION,
        agent_version: "0.1.0".into(),
        hostname: "db-host-1".into(),
        capabilities: Capabilities { ktls: true, ebpf: true, renew: true, service_status: true, ..Default::default() },
    };
    let agent_msgs = vec![
        ("hello", hello),
        ("ping", AgentMsg::Ping { seq: 7 }),
        ("pong", AgentMsg::Pong { seq: 7 }),
        (
            "stream_stats",
            AgentMsg::StreamStats {
                streams: vec![
                    StreamStat {
                        stream_id: 1,
                        bytes_in: 1 << 20,
                        bytes_out: 4096,
                        path: PathKind::KtlsSplice,
                        counter: CounterSource::Ebpf,
                        closed: false,
                        tunnel_bytes: Some((1_050_000, 4200)),
                    },
                    StreamStat {
                        stream_id: 2,
                        bytes_in: 0,
                        bytes_out: 0,
                        path: PathKind::Userspace,
                        counter: CounterSource::Userspace,
                        closed: true,
                        tunnel_bytes: None,
                    },
                ],
            },
        ),
        ("renew", AgentMsg::RenewCertificate { csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\n…".into() }),
        ("service_down", AgentMsg::ServiceStatus { reachable: false, error: Some("connection refused".into()) }),
        ("service_up", AgentMsg::ServiceStatus { reachable: true, error: None }),
    ];
    let rejection = Rejection { code: RejectCode::RevokedCertificate, message: "enroll again".into() };
    let relay_msgs = vec![
        (
            "welcome",
            RelayMsg::Welcome {
                version: PROTOCOL_VERSION,
                session_id: "ses_abc".into(),
                resource_id: "res_abc".into(),
                resource_name: "Acme PostgreSQL".into(),
                heartbeat_secs: 10,
                pool_size: 4,
                capabilities: Capabilities { renew: true, relays: true, ..Default::default() },
                relay_id: "rly_abc".into(),
                relays: vec![RelayPeer { id: "rly_abc".into(), url: "https://relay-1.example.com".into() }],
            },
        ),
        (
            "relays",
            RelayMsg::Relays {
                relays: vec![
                    RelayPeer { id: "rly_abc".into(), url: "https://relay-1.example.com".into() },
                    RelayPeer { id: "rly_def".into(), url: "https://relay-2.example.com:8443".into() },
                ],
            },
        ),
        ("rejected", RelayMsg::Rejected(rejection.clone())),
        ("ping", RelayMsg::Ping { seq: 1 }),
        ("pong", RelayMsg::Pong { seq: 1 }),
        ("open_data", RelayMsg::OpenData { count: 3 }),
        ("renewed", RelayMsg::CertificateRenewed { cert_pem: "-----BEGIN CERTIFICATE-----\n…".into() }),
        ("renewal_refused", RelayMsg::RenewalRefused(rejection.clone())),
    ];
    let enrollment = EnrollResponse::Enrolled(Enrollment {
        resource_id: "res_abc".into(),
        resource_name: "Lager Zürich".into(),
        customer_id: Some("cus_a".into()),
        agent_id: "agt_abc".into(),
        generation: 2,
        cert_pem: "-----BEGIN CERTIFICATE-----\n…".into(),
        ca_pem: "-----BEGIN CERTIFICATE-----\n…".into(),
    });
    let enroll = |jwt: &str, name: &str, csr: &str, hostname: &str| EnrollRequest {
        version: PROTOCOL_VERSION,
        jwt: jwt.into(),
        name: name.into(),
        csr_pem: csr.into(),
        agent_version: "0.1.0".into(),
        hostname: hostname.into(),
    };
    let enroll_requests = [
        ("customer", enroll("$customer", "Acme PostgreSQL", "$csr", "db-host-1")),
        ("customer_unicode_name", enroll("$customer", "売上 DB", "$csr", "h")),
        ("resource", enroll("$resource", "", "$csr", "db-host-2")),
        ("resource_other_name", enroll("$resource", "other", "$csr", "h")),
        ("bad_csr", enroll("$customer", "db", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "h")),
        ("forged_log_line", enroll("$customer", "a\nINFO forged", "$csr", "h\u{1b}[31m")),
        ("bidi_name", enroll("$customer", "admin\u{202E}gpj", "$csr", "h")),
        ("garbage_jwt", enroll("x.y.z", "db", "$csr", "h")),
        ("old_version", EnrollRequest { version: 0, ..enroll("$customer", "db", "$csr", "h") }),
    ];

    // frame: whole frames as they go over the wire, and broken ones.
    for (name, m) in &agent_msgs {
        write("frame", &format!("agent_{name}"), frame(m));
    }
    for (name, m) in &relay_msgs {
        write("frame", &format!("relay_{name}"), frame(m));
    }
    for (name, m) in &enroll_requests {
        write("frame", &format!("enroll_{name}"), frame(m));
    }
    let mut open = frame(&StreamOpen { stream_id: 9, client_addr: "10.0.0.7:51000".into(), framed: false });
    open.extend_from_slice(b"raw stream bytes after the frame");
    write("frame", "stream_open_then_raw", open);
    write("frame", "data_hello", frame(&DataHello { version: PROTOCOL_VERSION, session_id: "ses_abc".into() }));
    write("frame", "declares_1mib_sends_little", [&[0u8, 0x10, 0, 0][..], b"{\"type\":"].concat());
    write("frame", "declares_4gib", [0xffu8, 0xff, 0xff, 0xff]);
    write("frame", "cut_in_prefix", [0u8, 0]);
    write("frame", "cut_in_body", [&[0u8, 0, 0, 20][..], b"{\"seq\""].concat());
    write("frame", "not_json", [&[0u8, 0, 0, 4][..], b"\xff\xfe{{"].concat());

    // control_messages: JSON bodies of every message.
    for (name, m) in &agent_msgs {
        write("control_messages", &format!("agent_{name}"), serde_json::to_vec(m).unwrap());
    }
    for (name, m) in &relay_msgs {
        write("control_messages", &format!("relay_{name}"), serde_json::to_vec(m).unwrap());
    }
    let data_hello = DataHello { version: PROTOCOL_VERSION, session_id: "ses_abc".into() };
    write("control_messages", "data_hello", serde_json::to_vec(&data_hello).unwrap());
    let open = StreamOpen { stream_id: 9, client_addr: "[::1]:51000".into(), framed: false };
    write("control_messages", "stream_open", serde_json::to_vec(&open).unwrap());
    write("control_messages", "stream_accepted", serde_json::to_vec(&StreamReply::Accepted).unwrap());
    let refused = StreamReply::Refused { reason: "connection refused".into() };
    write("control_messages", "stream_refused", serde_json::to_vec(&refused).unwrap());
    write("control_messages", "enrolled", serde_json::to_vec(&enrollment).unwrap());
    let enroll_rejected = EnrollResponse::Rejected(rejection);
    write("control_messages", "enroll_rejected", serde_json::to_vec(&enroll_rejected).unwrap());
    write("control_messages", "unknown_type", br#"{"type":"launch_missiles","seq":1}"#);
    write("control_messages", "extra_fields", br#"{"type":"ping","seq":1,"future":[1,2,{"x":null}]}"#);

    // enroll_request: request bodies ($customer, $resource and $csr are filled in).
    for (name, m) in &enroll_requests {
        write("enroll_request", name, serde_json::to_vec(m).unwrap());
    }

    // jwt_claims: tokens signed with the target's key, claims to sign, and bad tokens.
    let signer = sluice_relay::state::tokens::TokenSigner::new(b"sluice-fuzz-jwt-key-0123456789ab");
    let kinds = [
        ("customer", claims(Some("cus_a"), None, None)),
        ("resource", claims(Some("cus_a"), Some(("res_abc", 3)), Some(4_000_000_000))),
        ("org", claims(None, None, None)),
        ("expired", claims(Some("cus_a"), None, Some(1_000))),
        ("other_audience", RegistrationClaims { aud: "someone-else".into(), ..claims(None, None, None) }),
        ("other_issuer", RegistrationClaims { iss: "someone-else".into(), ..claims(None, None, None) }),
    ];
    for (name, c) in &kinds {
        write("jwt_claims", &format!("token_{name}"), signer.sign(c));
        write("jwt_claims", &format!("claims_{name}"), serde_json::to_vec(c).unwrap());
    }
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let alg_none =
        format!("{}.{}.", b.encode(br#"{"alg":"none"}"#), b.encode(serde_json::to_vec(&kinds[0].1).unwrap()));
    write("jwt_claims", "alg_none", alg_none);
    write("jwt_claims", "two_parts", "abc.def");
    write("jwt_claims", "bad_base64", "a.!!!.c");

    // record_classifier: content type, then plaintext.
    for (name, bytes) in [
        ("close_notify", &[21u8, 1, 0][..]),
        ("alert_fatal", &[21, 2, 40]),
        ("user_canceled", &[21, 1, 90]),
        ("alert_short", &[21, 1]),
        ("session_ticket", &[22, 4, 0, 0, 1, 0]),
        ("key_update", &[22, 24, 0, 0, 1, 0]),
        ("key_update_requested", &[22, 24, 0, 0, 1, 1]),
        ("handshake_empty", &[22]),
        ("application_data", &[23, b'h', b'i']),
        ("change_cipher_spec", &[20, 1]),
        ("unknown_type", &[99, 0]),
    ] {
        write("record_classifier", name, bytes);
    }

    // agent_config: NUL-separated VARIABLE=value settings.
    let c = serde_json::to_string(&claims(Some("cus_a"), None, None)).unwrap();
    let r = serde_json::to_string(&claims(Some("cus_a"), Some(("res_abc", 1)), None)).unwrap();
    let token = signer.sign(&claims(Some("cus_a"), None, Some(4_000_000_000)));
    for (name, settings) in [
        (
            "minimal",
            vec!["APP_HOST=db.internal", "APP_PORT=5432", "NAME=orders-db", &format!("REGISTRATION_JWT_CLAIMS={c}")],
        ),
        ("resource_jwt_no_name", vec!["APP_HOST=db", "APP_PORT=1", &format!("REGISTRATION_JWT_CLAIMS={r}")]),
        (
            "real_token",
            vec!["APP_HOST=10.0.0.5", "APP_PORT=1433", "NAME=Acme MS SQL", &format!("REGISTRATION_JWT={token}")],
        ),
        (
            "everything",
            vec![
                "APP_HOST=db",
                "APP_PORT=65535",
                "NAME= Lager Zürich ",
                &format!("REGISTRATION_JWT_CLAIMS={c}"),
                "SLUICE_URL=https://[::1]:8443/",
                "SLUICE_RECONNECT_MAX_SECS=5",
                "SLUICE_METRICS_LISTEN=127.0.0.1:9464",
                "SLUICE_COUNTER=userspace",
                "SLUICE_DATA_PATH=auto",
                "SLUICE_KTLS_ENGINE=splice",
                "SLUICE_SERVICE_CHECK_SECS=0",
                "SLUICE_LOG=sluice_agent=debug",
            ],
        ),
        ("bad_port", vec!["APP_HOST=db", "APP_PORT=70000", "NAME=x", &format!("REGISTRATION_JWT_CLAIMS={c}")]),
        (
            "name_newline",
            vec!["APP_HOST=db", "APP_PORT=1", "NAME=a\nINFO forged", &format!("REGISTRATION_JWT_CLAIMS={c}")],
        ),
        ("not_a_jwt", vec!["APP_HOST=db", "APP_PORT=1", "NAME=x", "REGISTRATION_JWT=nope"]),
        (
            "bad_url",
            vec!["APP_HOST=db", "APP_PORT=1", "NAME=x", &format!("REGISTRATION_JWT_CLAIMS={c}"), "SLUICE_URL=http://x"],
        ),
    ] {
        write("agent_config", name, settings.join("\0"));
    }
    write("agent_config", "not_utf8", b"APP_HOST=\xff\xfe\0APP_PORT=1".as_slice());

    // identity: names, relay URLs, identity URIs, a certificate.
    for (name, s) in [
        ("name_plain", "Acme PostgreSQL"),
        ("name_unicode", "  Lager Zürich \t"),
        ("name_control", "a\nINFO forged line"),
        ("name_bidi", "admin\u{202E}gpj"),
        ("url_port", "https://relay.example.com:8443/"),
        ("url_default_port", "https://relay.example.com"),
        ("url_ipv6", "https://[::1]:9"),
        ("url_http", "http://r:1"),
        ("uri_agent", "urn:sluice:agent:agt_1:resource:res_2:generation:3"),
        ("uri_extra", "urn:sluice:agent:a:resource:r:generation:1:extra"),
    ] {
        write("identity", name, s);
    }
    let key = rcgen::KeyPair::generate().unwrap();
    let who = AgentIdentity { agent_id: "agt_1".into(), resource_id: "res_2".into(), generation: 3 };
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(who.to_uri().try_into().unwrap())];
    write("identity", "cert_der", params.self_signed(&key).unwrap().der());

    println!("seed corpus written to {}", Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").display());
}
