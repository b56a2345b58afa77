//! The store contract, run against both engines: every behaviour of [`Store`] holds the
//! same on the embedded SQLite file and on PostgreSQL (a real server started by the
//! test). Then what only PostgreSQL must survive: two relays' stores racing on one
//! database (resource creation, port allocation, quotas, enrollment counts, the first
//! migration), and the figures behind docs/scaling.md's choice of engine client.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use sluice_e2e::{shared_postgres, test_dir};
use sluice_relay::state::store::{
    AdminActionRecord, AgentRecord, ApiTokenRecord, AuditEvent, AuditQuery, AuditRecord, Lease, LeaseRefusal, NewLease,
    PgStore, RelayRecord, RelayState, ResourceRevocation, SqliteStore, Store, StoreError, StreamRecord, TokenRecord,
    TokenRevocation,
};

/// A fresh, empty PostgreSQL database on the process's server; its URL.
fn fresh_database(label: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let db = format!("store_{label}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let pg = shared_postgres();
    pg.create_database(&db);
    pg.url(&db)
}

/// Runs `contract` on a fresh SQLite file and on a fresh PostgreSQL database; `open`
/// opens the same store again each time it is called.
fn on_both_engines(label: &str, contract: fn(&dyn Fn() -> Box<dyn Store>)) {
    let dir = test_dir(label);
    let path = dir.path().join("s.db");
    eprintln!("{label} on SQLite");
    contract(&|| Box::new(SqliteStore::open(&path).unwrap()));
    let url = fresh_database(label);
    eprintln!("{label} on PostgreSQL");
    contract(&|| Box::new(PgStore::open(&url).unwrap()));
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                on_both_engines(stringify!($name), contract::$name);
            }
        )*
    };
}

contract!(
    ports_are_allocated_lowest_free_and_survive_reopen,
    names_are_unique_per_customer,
    rotation_revokes_the_resources_jwts_and_blocks_customer_jwts_for_it_only,
    deletion_revokes_like_rotation_and_unknown_ids_change_nothing,
    tokens_are_listed_with_agent_counts_and_revoked_one_by_one,
    quotas_are_counted_in_the_same_transaction_as_the_insert,
    relays_register_heartbeat_drain_and_are_forgotten_when_silent,
    leases_take_the_lowest_free_port_count_connections_and_end,
    api_tokens_are_found_by_hash_and_revoked_once,
    audit_records_are_appended_filtered_and_forgotten_by_age,
);

/// The contract itself: each function gets a way to open (and reopen) one empty store.
mod contract {
    use super::*;

    pub fn ports_are_allocated_lowest_free_and_survive_reopen(open: &dyn Fn() -> Box<dyn Store>) {
        let s = open();
        s.create_customer("c1", "acme", 1).unwrap();
        let a = s.create_resource("r1", Some("c1"), "db", 100..=102, u32::MAX, 1).unwrap();
        let b = s.create_resource("r2", None, "db", 100..=102, u32::MAX, 1).unwrap();
        assert_eq!((a.port, b.port), (100, 101));
        assert!(s.delete_resource("r1", 2).unwrap().is_some());
        let c = s.create_resource("r3", Some("c1"), "sftp", 100..=102, u32::MAX, 3).unwrap();
        assert_eq!(c.port, 100, "a deleted resource's port is reused");
        s.create_resource("r4", Some("c1"), "x", 100..=102, u32::MAX, 3).unwrap();
        let err = s.create_resource("r5", Some("c1"), "y", 100..=102, u32::MAX, 3).unwrap_err();
        assert!(matches!(err, StoreError::Exhausted(_)));
        s.touch_resource("r2", 9).unwrap();
        drop(s);
        let s = open();
        let r2 = s.resource("r2").unwrap().unwrap();
        assert_eq!((r2.port, r2.last_seen_at, r2.customer_id), (101, Some(9), None));
        assert_eq!(s.resources().unwrap().len(), 3);
        assert_eq!(s.customer("c1").unwrap().unwrap().name, "acme");
        assert_eq!(s.customers().unwrap().len(), 1);
        assert_eq!(s.customer("nope").unwrap(), None);
        assert_eq!(s.resource("nope").unwrap(), None);
        assert!(s.check().is_ok());
    }

    pub fn names_are_unique_per_customer(open: &dyn Fn() -> Box<dyn Store>) {
        let s = open();
        s.create_customer("c1", "acme", 1).unwrap();
        s.create_customer("c2", "globex", 1).unwrap();
        assert!(matches!(s.create_customer("c3", "acme", 1), Err(StoreError::Conflict(_))));
        s.create_resource("r1", Some("c1"), "db", 1..=9, u32::MAX, 1).unwrap();
        s.create_resource("r2", Some("c2"), "db", 1..=9, u32::MAX, 1).unwrap();
        assert!(matches!(s.create_resource("r3", Some("c1"), "db", 1..=9, u32::MAX, 1), Err(StoreError::Conflict(_))));
        assert_eq!(s.resource_by_name(Some("c2"), "db").unwrap().unwrap().id, "r2");
        assert_eq!(s.resource_by_name(None, "db").unwrap(), None);
    }

    fn tok(jti: &str, cid: Option<&str>, rid: Option<&str>) -> TokenRecord {
        TokenRecord {
            jti: jti.into(),
            customer_id: cid.map(Into::into),
            resource_id: rid.map(Into::into),
            issued_at: 1,
            expires_at: None,
            revoked_at: None,
        }
    }

    fn agent(id: &str, rid: &str, jti: &str) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            resource_id: rid.into(),
            generation: 1,
            hostname: "h".into(),
            enrolled_at: 1,
            jti: Some(jti.into()),
        }
    }

    pub fn rotation_revokes_the_resources_jwts_and_blocks_customer_jwts_for_it_only(open: &dyn Fn() -> Box<dyn Store>) {
        let s = open();
        s.create_customer("c1", "acme", 1).unwrap();
        s.create_resource("r1", Some("c1"), "a", 1..=9, u32::MAX, 1).unwrap();
        s.create_resource("r2", Some("c1"), "b", 1..=9, u32::MAX, 1).unwrap();
        s.record_token(&tok("for-r1", Some("c1"), Some("r1"))).unwrap();
        s.record_token(&tok("for-r2", Some("c1"), Some("r2"))).unwrap();
        s.record_token(&tok("customer", Some("c1"), None)).unwrap();
        s.record_token(&tok("unrelated", Some("c1"), None)).unwrap();
        // One customer JWT enrolled agents of both resources.
        s.mark_token_used("customer", "r1").unwrap();
        s.mark_token_used("customer", "r2").unwrap();
        s.mark_token_used("for-r1", "r1").unwrap();

        let (generation, revoked) = s.rotate_resource("r1", 5).unwrap();
        assert_eq!(generation, 2);
        assert_eq!(
            revoked,
            ResourceRevocation {
                revoked_resource_jwts: vec!["for-r1".into()],
                blocked_for_resource_jwts: vec!["customer".into()],
            }
        );
        assert_eq!(s.token("for-r1").unwrap().unwrap().revoked_at, Some(5));
        assert_eq!(s.token("for-r2").unwrap().unwrap().revoked_at, None, "other resources' JWTs stay valid");
        assert_eq!(s.token("customer").unwrap().unwrap().revoked_at, None, "the customer JWT stays valid");
        assert_eq!(s.token("unrelated").unwrap().unwrap().revoked_at, None);
        assert_eq!(s.token_use_revoked_at("customer", "r1").unwrap(), Some(5), "but it can no longer enroll into r1");
        assert_eq!(s.token_use_revoked_at("customer", "r2").unwrap(), None, "and still can into r2");
        assert_eq!(s.token_use_revoked_at("unrelated", "r1").unwrap(), None, "a JWT that never enrolled r1");

        // A second rotation reports only what it revoked itself.
        assert_eq!(s.rotate_resource("r1", 6).unwrap(), (3, ResourceRevocation::default()));
        assert_eq!(s.token_use_revoked_at("customer", "r1").unwrap(), Some(5));
    }

    pub fn deletion_revokes_like_rotation_and_unknown_ids_change_nothing(open: &dyn Fn() -> Box<dyn Store>) {
        let s = open();
        s.create_customer("c1", "acme", 1).unwrap();
        s.create_resource("r1", Some("c1"), "a", 1..=9, u32::MAX, 1).unwrap();
        s.record_token(&tok("for-r1", Some("c1"), Some("r1"))).unwrap();
        s.record_token(&tok("customer", Some("c1"), None)).unwrap();
        s.mark_token_used("customer", "r1").unwrap();
        s.add_agent(&agent("a1", "r1", "customer")).unwrap();
        assert_eq!(s.delete_resource("nope", 2).unwrap(), None);
        assert_eq!(s.token_use_revoked_at("customer", "r1").unwrap(), None);
        let revoked = s.delete_resource("r1", 3).unwrap().unwrap();
        assert_eq!(revoked.revoked_resource_jwts, ["for-r1"]);
        assert_eq!(revoked.blocked_for_resource_jwts, ["customer"]);
        assert_eq!(s.token("customer").unwrap().unwrap().revoked_at, None);
        assert_eq!(s.token_use_revoked_at("customer", "r1").unwrap(), Some(3));
        assert!(s.resources_enrolled_with("customer").unwrap().is_empty(), "the agents went with the resource");
    }

    pub fn tokens_are_listed_with_agent_counts_and_revoked_one_by_one(open: &dyn Fn() -> Box<dyn Store>) {
        let s = open();
        s.create_customer("c1", "acme", 1).unwrap();
        s.create_customer("c2", "globex", 1).unwrap();
        s.create_resource("r1", Some("c1"), "a", 1..=9, u32::MAX, 1).unwrap();
        s.record_token(&tok("t1", Some("c1"), None)).unwrap();
        s.record_token(&tok("t2", Some("c2"), None)).unwrap();
        s.record_token(&tok("t3", None, None)).unwrap();
        s.add_agent(&agent("a1", "r1", "t1")).unwrap();
        s.add_agent(&agent("a2", "r1", "t1")).unwrap();

        let all = s.tokens(None).unwrap();
        let counts: Vec<(&str, u64)> = all.iter().map(|u| (u.token.jti.as_str(), u.agents)).collect();
        assert_eq!(counts, [("t1", 2), ("t2", 0), ("t3", 0)]);
        let of_c2 = s.tokens(Some("c2")).unwrap();
        assert_eq!(of_c2.iter().map(|u| u.token.jti.as_str()).collect::<Vec<_>>(), ["t2"]);
        assert_eq!(s.resources_enrolled_with("t1").unwrap(), ["r1"]);

        assert!(matches!(s.revoke_token("t1", 7).unwrap(), TokenRevocation::Revoked(t) if t.revoked_at == Some(7)));
        assert!(
            matches!(s.revoke_token("t1", 8).unwrap(), TokenRevocation::AlreadyRevoked(t) if t.revoked_at == Some(7))
        );
        assert_eq!(s.revoke_token("nope", 8).unwrap(), TokenRevocation::Unknown);
        assert_eq!(s.token("t2").unwrap().unwrap().revoked_at, None);
    }

    pub fn quotas_are_counted_in_the_same_transaction_as_the_insert(open: &dyn Fn() -> Box<dyn Store>) {
        let s = open();
        s.create_customer("c1", "acme", 1).unwrap();
        s.create_customer("c2", "globex", 1).unwrap();
        s.create_resource("r1", Some("c1"), "a", 1..=9, 2, 1).unwrap();
        s.create_resource("r2", Some("c1"), "b", 1..=9, 2, 1).unwrap();
        let over = s.create_resource("r3", Some("c1"), "c", 1..=9, 2, 1).unwrap_err();
        assert!(matches!(&over, StoreError::Quota(m) if m.contains("customer c1 already has 2 resources")), "{over}");
        s.create_resource("r3", Some("c2"), "c", 1..=9, 2, 1).expect("another customer's quota is its own");
        s.create_resource("r4", None, "c", 1..=9, 1, 1).expect("the org level counts apart");

        let mut a = agent("a1", "r1", "t1");
        a.enrolled_at = 100;
        s.add_agent_within(&a, 50, 2).unwrap();
        a.id = "a2".into();
        s.add_agent_within(&a, 50, 2).unwrap();
        a.id = "a3".into();
        assert!(matches!(s.add_agent_within(&a, 50, 2), Err(StoreError::Quota(_))));
        assert_eq!(s.enrollments_since("t1", 50).unwrap(), 2);
        assert_eq!(s.enrollments_since("t1", 101).unwrap(), 0, "older enrollments leave the window");
        s.add_agent_within(&a, 101, 2).expect("a new window");
        assert_eq!(s.enrollments_since("t2", 0).unwrap(), 0);
    }

    fn relay(id: &str, started_at: u64) -> RelayRecord {
        RelayRecord {
            id: id.into(),
            agent_url: format!("https://{id}.example:7443"),
            resource_host: format!("{id}.example"),
            admin_url: format!("http://{id}.example:7444"),
            version: "0.1.0".into(),
            started_at,
            heartbeat_at: started_at,
            state: RelayState::Active,
        }
    }

    pub fn relays_register_heartbeat_drain_and_are_forgotten_when_silent(open: &dyn Fn() -> Box<dyn Store>) {
        let s = open();
        assert!(s.relays().unwrap().is_empty());
        s.register_relay(&relay("rly_b", 10)).unwrap();
        s.register_relay(&relay("rly_a", 10)).unwrap();
        s.register_relay(&relay("rly_c", 5)).unwrap();
        let ids = |s: &dyn Store| s.relays().unwrap().into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(&*s), ["rly_c", "rly_a", "rly_b"], "oldest first, then by id");
        assert_eq!(s.relays().unwrap()[1], relay("rly_a", 10), "stored as registered");

        assert_eq!(s.relay_heartbeat("rly_a", 20).unwrap(), Some(RelayState::Active));
        assert!(s.set_relay_state("rly_a", RelayState::Draining).unwrap());
        assert!(!s.set_relay_state("rly_nope", RelayState::Draining).unwrap());
        assert_eq!(s.relay_heartbeat("rly_a", 21).unwrap(), Some(RelayState::Draining), "set through another relay");
        assert_eq!(s.relay_heartbeat("rly_nope", 21).unwrap(), None, "a row that is gone asks to re-register");

        // Re-registering replaces the row (a restart with the same id).
        let mut again = relay("rly_b", 30);
        again.version = "0.2.0".into();
        s.register_relay(&again).unwrap();
        assert_eq!(s.relays().unwrap().last().unwrap(), &again);

        // rly_c (heartbeat 5) and nobody else is silent before 20.
        assert_eq!(s.forget_silent_relays(20).unwrap(), ["rly_c"]);
        assert_eq!(ids(&*s), ["rly_a", "rly_b"]);
        assert!(s.forget_silent_relays(20).unwrap().is_empty());
        s.remove_relay("rly_a").unwrap();
        s.remove_relay("rly_a").unwrap();
        assert_eq!(ids(&*s), ["rly_b"]);
        let r = s.relays().unwrap().remove(0);
        assert_eq!(serde_json::to_value(r.state).unwrap(), "active");
    }
    fn new_lease(id: &str, rid: &str, now: u64, ttl: u64, max: Option<u32>) -> NewLease {
        NewLease {
            id: id.into(),
            resource_id: rid.into(),
            created_at: now,
            expires_at: now + ttl,
            max_connections: max,
            source: Some("10.1.2.3/32".into()),
        }
    }

    pub fn leases_take_the_lowest_free_port_count_connections_and_end(open: &dyn Fn() -> Box<dyn Store>) {
        let s = open();
        s.create_resource("r1", None, "db", 100..=102, u32::MAX, 1).unwrap();
        assert!(!s.leased_only_resources().unwrap().contains(&"r1".to_owned()), "open by default");
        assert!(s.set_resource_leased_only("r1", true).unwrap());
        assert!(!s.set_resource_leased_only("nope", true).unwrap());
        assert_eq!(s.leased_only_resources().unwrap(), ["r1"]);
        let a = s.create_lease(&new_lease("l1", "r1", 10, 100, Some(2)), 200..=202, 2).unwrap();
        let b = s.create_lease(&new_lease("l2", "r1", 10, 5, None), 200..=202, 2).unwrap();
        assert_eq!((a.port, b.port), (200, 201));
        assert_eq!(a.source.as_deref(), Some("10.1.2.3/32"));
        let over = s.create_lease(&new_lease("l3", "r1", 11, 100, None), 200..=202, 2).unwrap_err();
        assert!(matches!(over, StoreError::Quota(ref m) if m.contains("--max-leases-per-resource")), "{over}");
        // The budget: two connections, then spent.
        assert_eq!(s.use_lease("l1", 12).unwrap().map(|l| l.connections_used), Ok(1));
        assert_eq!(s.use_lease("l1", 12).unwrap().map(|l| l.connections_used), Ok(2));
        assert_eq!(s.use_lease("l1", 12).unwrap().map(|_| ()), Err(LeaseRefusal::Spent));
        assert_eq!(s.use_lease("nope", 12).unwrap().map(|_| ()), Err(LeaseRefusal::Unknown));
        // l2 expires at 15: refused after, and ended by the next creation, which reuses its port.
        assert_eq!(s.use_lease("l2", 15).unwrap().map(|_| ()), Err(LeaseRefusal::Expired));
        let c = s.create_lease(&new_lease("l3", "r1", 16, 100, None), 200..=202, 2).unwrap();
        assert_eq!(c.port, 201, "an ended lease's port is free again");
        let l2 = s.lease("l2").unwrap().unwrap();
        assert_eq!((l2.ended_at, l2.end_reason.as_deref()), (Some(15), Some("expired")));
        // Deleting ends it once; an ended lease admits nobody.
        let ended = s.end_lease("l3", "deleted", 17).unwrap().unwrap();
        assert_eq!((ended.ended_at, ended.end_reason.as_deref()), (Some(17), Some("deleted")));
        let again = s.end_lease("l3", "spent", 18).unwrap().unwrap();
        assert_eq!(again.end_reason.as_deref(), Some("deleted"), "the first end stands");
        assert_eq!(s.use_lease("l3", 17).unwrap().map(|_| ()), Err(LeaseRefusal::Ended));
        assert_eq!(s.end_lease("nope", "deleted", 17).unwrap(), None);
        // Listing: active ones, and ended ones since a time.
        let ids = |v: Vec<Lease>| v.into_iter().map(|l| l.id).collect::<Vec<_>>();
        assert_eq!(ids(s.leases(Some("r1"), 17).unwrap()), ["l3", "l1"]);
        assert_eq!(ids(s.leases(None, 0).unwrap()), ["l3", "l1", "l2"]);
        assert_eq!(ids(s.leases(Some("other"), 0).unwrap()), Vec::<String>::new());
        let expired = s.expire_leases(200).unwrap();
        assert_eq!(ids(expired), ["l1"]);
        drop(s);
        let s = open();
        assert_eq!(s.lease("l1").unwrap().unwrap().connections_used, 2, "counts survive a reopen");
        assert_eq!(s.leased_only_resources().unwrap(), ["r1"]);
    }

    fn api_token(id: &str, hash: &str, role: &str, cid: Option<&str>, at: u64) -> ApiTokenRecord {
        ApiTokenRecord {
            id: id.into(),
            name: Some(format!("{id} name")),
            role: role.into(),
            customer_id: cid.map(Into::into),
            token_hash: hash.into(),
            created_at: at,
            expires_at: Some(at + 100),
            revoked_at: None,
        }
    }

    pub fn api_tokens_are_found_by_hash_and_revoked_once(open: &dyn Fn() -> Box<dyn Store>) {
        let s = open();
        let a = api_token("tok_a", "aa11", "operator", None, 1);
        let b = api_token("tok_b", "bb22", "customer", Some("c1"), 2);
        s.create_api_token(&b).unwrap();
        s.create_api_token(&a).unwrap();
        assert!(s.create_api_token(&api_token("tok_c", "aa11", "admin", None, 3)).is_err(), "hashes are unique");
        assert_eq!(s.api_token_by_hash("bb22").unwrap().as_ref(), Some(&b));
        assert_eq!(s.api_token_by_hash("cc33").unwrap(), None);
        let ids: Vec<String> = s.api_tokens().unwrap().into_iter().map(|t| t.id).collect();
        assert_eq!(ids, ["tok_a", "tok_b"], "oldest first");
        assert_eq!(s.revoke_api_token("tok_a", 50).unwrap().unwrap().revoked_at, Some(50));
        assert_eq!(
            s.revoke_api_token("tok_a", 60).unwrap().unwrap().revoked_at,
            Some(50),
            "the first revocation stays"
        );
        assert_eq!(s.revoke_api_token("tok_none", 60).unwrap(), None);
        drop(s);
        // Revocation is in the store: another relay (a reopened store) sees it at once.
        let s = open();
        assert_eq!(s.api_token_by_hash("aa11").unwrap().unwrap().revoked_at, Some(50));
        assert_eq!(s.api_token_by_hash("bb22").unwrap().unwrap().revoked_at, None);
    }

    fn admin_record(id: &str, at_ms: u64, target: &str) -> AuditRecord {
        AuditRecord {
            id: id.into(),
            at_ms,
            relay_id: "rly_1".into(),
            event: AuditEvent::Admin(AdminActionRecord {
                token_id: "bootstrap".into(),
                role: "admin".into(),
                customer_id: None,
                action: "delete_resource".into(),
                route: format!("DELETE /v1/resources/{target}"),
                target: Some(target.into()),
                status: 204,
                error: None,
                source: "127.0.0.1:5000".into(),
            }),
        }
    }

    fn stream_record(id: &str, at_ms: u64, rid: &str, name: &str) -> AuditRecord {
        AuditRecord {
            id: id.into(),
            at_ms,
            relay_id: "rly_2".into(),
            event: AuditEvent::Stream(StreamRecord {
                resource_id: rid.into(),
                resource_name: name.into(),
                agent_id: "agt_1".into(),
                client_addr: "10.0.0.9:4444".into(),
                started_at_ms: at_ms - 10,
                ended_at_ms: at_ms,
                bytes_in: u64::MAX - 1,
                bytes_out: 7,
                end: "aborted".into(),
                end_detail: "aborted: socket side failed: reset".into(),
                path: "userspace".into(),
                lease_id: None,
            }),
        }
    }

    pub fn audit_records_are_appended_filtered_and_forgotten_by_age(open: &dyn Fn() -> Box<dyn Store>) {
        let s = open();
        let records = [
            admin_record("aud_1", 1_000, "res_1"),
            stream_record("aud_2", 2_000, "res_1", "db"),
            stream_record("aud_3", 3_000, "res_2", "sftp"),
            admin_record("aud_4", 4_000, "cus_1"),
        ];
        // One by one (admin actions) and in a batch (how the writer stores streams).
        s.append_audit(&records[0]).unwrap();
        s.append_audits(&records[1..3]).unwrap();
        s.append_audit(&records[3]).unwrap();
        // A batch is all or none: a duplicate id fails it, and its other record is not kept.
        let bad = [stream_record("aud_5", 5_000, "res_1", "db"), records[0].clone()];
        assert!(s.append_audits(&bad).is_err(), "a duplicate id fails the batch");
        let q = |since_ms, resource: Option<&str>, limit| {
            s.audit(&AuditQuery { since_ms, resource: resource.map(Into::into), limit }).unwrap()
        };
        assert_eq!(q(0, None, 100), records, "oldest first, exactly as written");
        assert_eq!(q(2_000, None, 100), records[1..]);
        assert_eq!(q(0, None, 2), records[2..], "the newest `limit`");
        assert_eq!(q(0, Some("res_1"), 100), records[..2], "by id: the stream and the admin action on it");
        assert_eq!(q(0, Some("sftp"), 100), records[2..3], "by name");
        assert_eq!(s.forget_audit_before(3_000).unwrap(), 2);
        drop(s);
        let s = open();
        assert_eq!(s.audit(&AuditQuery { since_ms: 0, resource: None, limit: 100 }).unwrap(), records[2..]);
    }
}

/// Two relays' stores on one database, eight threads: creating leases at once never
/// hands one port to two active leases, and taking connections at once never exceeds a
/// lease's budget.
#[test]
fn two_relays_racing_on_postgres_share_lease_ports_and_budgets() {
    let url = fresh_database("lease_race");
    let relays: Vec<Arc<dyn Store>> =
        vec![Arc::new(PgStore::open(&url).unwrap()), Arc::new(PgStore::open(&url).unwrap())];
    relays[0].create_resource("r1", None, "db", 100..=110, u32::MAX, 1).unwrap();
    let budget = NewLease {
        id: "budget".into(),
        resource_id: "r1".into(),
        created_at: 1,
        expires_at: u64::MAX / 4,
        max_connections: Some(5),
        source: None,
    };
    relays[0].create_lease(&budget, 30000..=30999, 1000).unwrap();
    const THREADS: usize = 8;
    let start = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, start) = (relays[t % 2].clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let mut ports = Vec::new();
                let mut admitted = 0;
                for i in 0..10 {
                    let mut l = budget_like(&format!("t{t}-{i}"));
                    l.max_connections = None;
                    ports.push(store.create_lease(&l, 30000..=30999, 1000).unwrap().port);
                    if store.use_lease("budget", 2).unwrap().is_ok() {
                        admitted += 1;
                    }
                }
                (ports, admitted)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut admitted = 0;
    for w in workers {
        let (p, a) = w.join().unwrap();
        all.extend(p);
        admitted += a;
    }
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "a lease port was handed out twice");
    assert_eq!(admitted, 5, "the budget of 5 held across both relays");
    assert_eq!(relays[1].lease("budget").unwrap().unwrap().connections_used, 5);
}

fn budget_like(id: &str) -> NewLease {
    NewLease {
        id: id.into(),
        resource_id: "r1".into(),
        created_at: 1,
        expires_at: u64::MAX / 4,
        max_connections: None,
        source: None,
    }
}

/// Two relays' stores (separate connections) on one database, eight threads creating
/// resources at once: some names wanted by every thread, some by one, and one customer
/// whose quota is smaller than what the threads ask for. No port is handed out twice,
/// each name exists once (the others got `Conflict`), the quota holds, and two threads
/// enrolling with one JWT stay under its limit.
#[test]
fn two_relays_racing_on_postgres_allocate_no_duplicate_and_keep_quotas() {
    let url = fresh_database("race");
    let relays: Vec<Arc<dyn Store>> =
        vec![Arc::new(PgStore::open(&url).unwrap()), Arc::new(PgStore::open(&url).unwrap())];
    relays[0].create_customer("c1", "acme", 1).unwrap();
    relays[1].create_customer("c2", "globex", 1).unwrap();
    relays[0].create_resource("r-enroll", Some("c1"), "enroll", 30000..=30999, u32::MAX, 1).unwrap();
    const THREADS: usize = 8;
    const SHARED: usize = 10;
    const QUOTA: u32 = 5;
    let start = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = relays[t % 2].clone();
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let (mut created, mut conflicts, mut quota) = (0, 0, 0);
                for i in 0..SHARED {
                    let mut tally = |r: Result<_, StoreError>| match r {
                        Ok(_) => created += 1,
                        Err(StoreError::Conflict(_)) => conflicts += 1,
                        Err(StoreError::Quota(_)) => quota += 1,
                        Err(e) => panic!("thread {t}: {e}"),
                    };
                    let ports = 30000..=30999;
                    tally(store.create_resource(
                        &format!("s{t}-{i}"),
                        Some("c1"),
                        &format!("shared-{i}"),
                        ports.clone(),
                        u32::MAX,
                        2,
                    ));
                    tally(store.create_resource(
                        &format!("o{t}-{i}"),
                        Some("c1"),
                        &format!("own-{t}-{i}"),
                        ports.clone(),
                        u32::MAX,
                        2,
                    ));
                    tally(store.create_resource(
                        &format!("q{t}-{i}"),
                        Some("c2"),
                        &format!("q-{t}-{i}"),
                        ports,
                        QUOTA,
                        2,
                    ));
                    let agent = AgentRecord {
                        id: format!("a{t}-{i}"),
                        resource_id: "r-enroll".into(),
                        generation: 1,
                        hostname: "h".into(),
                        enrolled_at: 100,
                        jti: Some("jwt-1".into()),
                    };
                    match store.add_agent_within(&agent, 50, 7) {
                        Ok(()) | Err(StoreError::Quota(_)) => {}
                        Err(e) => panic!("thread {t}: {e}"),
                    }
                }
                (created, conflicts, quota)
            })
        })
        .collect();
    let mut totals = (0, 0, 0);
    for w in workers {
        let (c, k, q) = w.join().unwrap();
        totals = (totals.0 + c, totals.1 + k, totals.2 + q);
    }
    let all = relays[1].resources().unwrap();
    let mut ports: Vec<u16> = all.iter().map(|r| r.port).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), all.len(), "no port handed out twice");
    assert_eq!(ports, (30000..30000 + all.len() as u16).collect::<Vec<_>>(), "the lowest ports, no gaps");
    for i in 0..SHARED {
        let n = all.iter().filter(|r| r.name == format!("shared-{i}")).count();
        assert_eq!(n, 1, "one resource named shared-{i}");
    }
    let of_c2 = all.iter().filter(|r| r.customer_id.as_deref() == Some("c2")).count();
    assert_eq!(of_c2, QUOTA as usize, "the quota of globex holds");
    // 1 (r-enroll) + SHARED + THREADS*SHARED own + QUOTA.
    assert_eq!(all.len(), 1 + SHARED + THREADS * SHARED + QUOTA as usize);
    assert_eq!(
        totals,
        (SHARED + THREADS * SHARED + QUOTA as usize, (THREADS - 1) * SHARED, THREADS * SHARED - QUOTA as usize)
    );
    assert_eq!(relays[0].enrollments_since("jwt-1", 50).unwrap(), 7, "the enrollment limit holds across relays");
}

/// Relays started at once against an empty database create the schema once, and all of
/// them work on it.
#[test]
fn relays_starting_at_once_on_an_empty_postgres_database_create_it_once() {
    // The version one relay alone reaches (the last migration, whatever its number).
    let alone = fresh_database("migrate_alone");
    drop(PgStore::open(&alone).unwrap());
    let last =
        shared_postgres().sql(alone.rsplit('/').next().unwrap(), "SELECT version::text FROM sluice_schema_version");
    for round in 0..5 {
        let url = fresh_database("migrate");
        let start = Arc::new(Barrier::new(4));
        let openers: Vec<_> = (0..4)
            .map(|_| {
                let (url, start) = (url.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    PgStore::open(&url)
                })
            })
            .collect();
        let stores: Vec<PgStore> =
            openers.into_iter().map(|o| o.join().unwrap().unwrap_or_else(|e| panic!("round {round}: {e}"))).collect();
        stores[0].create_customer("c1", "acme", 1).unwrap();
        assert_eq!(stores[3].customers().unwrap().len(), 1);
        let db = url.rsplit('/').next().unwrap();
        let versions = shared_postgres().sql(db, "SELECT string_agg(version::text, ',') FROM sluice_schema_version");
        assert_eq!(versions, last, "one version row, at the last migration");
    }
}

/// Opening a database that does not exist, or as a role the server refuses, says so,
/// names the server and what to do, and never the password (a server that is not
/// there: `postgres::tests` in the relay crate).
#[test]
fn postgres_open_errors_say_what_is_wrong_and_what_to_do() {
    let pg = shared_postgres();
    let url = format!("postgres://postgres:pw-never-shown@127.0.0.1:{}/no_such_db", pg.port);
    let err = PgStore::open(&url).err().expect("no such database").to_string();
    eprintln!("{err}");
    assert!(err.contains(&format!("PostgreSQL at 127.0.0.1:{}/no_such_db", pg.port)), "{err}");
    assert!(err.contains("does not exist") && err.contains("create the database"), "{err}");
    assert!(!err.contains("pw-never-shown"), "{err}");
    // Trust authentication still refuses a role that does not exist: an authentication failure.
    pg.create_database("auth_probe");
    let url = format!("postgres://nobody:pw-never-shown@127.0.0.1:{}/auth_probe", pg.port);
    let err = PgStore::open(&url).err().expect("no such role").to_string();
    eprintln!("{err}");
    assert!(err.contains("SQLSTATE 28000") && err.contains("check the user and password in --database-url"), "{err}");
    assert!(!err.contains("pw-never-shown"), "{err}");
}

/// Latency of the two calls that matter most, on both engines (printed; no bound
/// asserted): docs/scaling.md quotes the figures.
#[test]
fn store_call_latency_on_both_engines() {
    let dir = test_dir("store-latency");
    let sqlite: Box<dyn Store> = Box::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
    let pg: Box<dyn Store> = Box::new(PgStore::open(&fresh_database("latency")).unwrap());
    for (engine, s) in [("SQLite", sqlite), ("PostgreSQL", pg)] {
        s.create_customer("c1", "acme", 1).unwrap();
        const N: usize = 200;
        let t = Instant::now();
        for i in 0..N {
            s.create_resource(&format!("r{i}"), Some("c1"), &format!("n{i}"), 1..=60000, u32::MAX, 1).unwrap();
        }
        let create = t.elapsed() / N as u32;
        let t = Instant::now();
        for _ in 0..N {
            assert_eq!(s.resources().unwrap().len(), N);
        }
        let list = t.elapsed() / N as u32;
        let t = Instant::now();
        for i in 0..N {
            s.resource(&format!("r{i}")).unwrap().unwrap();
        }
        let one = t.elapsed() / N as u32;
        eprintln!(
            "store latency, {engine}: create_resource {:.0} µs, resources() of {N} {:.0} µs, resource(id) {:.0} µs",
            us(create),
            us(list),
            us(one)
        );
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
