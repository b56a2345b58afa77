//! The relay's place in its cluster: relays that share one store (PostgreSQL; a single
//! relay on SQLite is a cluster of one) find each other through it, and each one tells
//! its agents the current set so every agent keeps a session to every active relay.
//!
//! Every [`MEMBERSHIP_INTERVAL`] each relay, in [`run`]:
//! - writes its heartbeat into its row of the `relays` table (re-registering when the
//!   row is gone) and reads back its state, so `sluice relays drain ID` given to *any*
//!   relay reaches the one it names ([`Cluster::drain_requested`]);
//! - drops rows silent for [`SILENT_AFTER`] and sends its agents the list of active,
//!   fresh relays whenever it changes ([`RelayMsg::Relays`]);
//! - sweeps revocations made on other relays: sessions whose resource was deleted, or
//!   whose certificate's key generation is below the resource's (a rotation), are cut,
//!   streams included — so a rotation anywhere reaches every relay within one interval.
//!
//! What stays local to each relay (live sessions, streams, metrics) is described in
//! docs/scaling.md.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sluice_proto::identity::unix_now;
use sluice_proto::wire::{RelayMsg, RelayPeer};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::data::registry::Registry;
use crate::relay::Relay;
use crate::state::store::{RelayRecord, RelayState, Store};

/// How often a relay writes its heartbeat, reads the set and sweeps revocations.
pub const MEMBERSHIP_INTERVAL: Duration = Duration::from_secs(2);

/// A relay whose heartbeat is older than this is out of the set (and its row deleted).
/// Five intervals: a relay starved of CPU for a few seconds is not dropped; a dead one
/// is gone from every agent's list within this bound plus one interval.
pub const SILENT_AFTER: Duration = Duration::from_secs(10);

/// This relay's membership: its id, the set it last saw, and whether it was asked to drain.
pub struct Cluster {
    /// `rly_…`, new at every start (a restarted relay is a new member; the old row ages out).
    pub id: String,
    /// What this relay registered (heartbeats refresh `heartbeat_at`).
    record: Mutex<RelayRecord>,
    /// The active, fresh relays last read from the store (this one included while active).
    peers: Mutex<Vec<RelayPeer>>,
    /// Cancelled when the store says this relay is draining (`sluice relays drain`).
    pub drain_requested: CancellationToken,
}

impl Cluster {
    pub fn new(record: RelayRecord) -> Cluster {
        let me = RelayPeer { id: record.id.clone(), url: record.agent_url.clone() };
        Cluster {
            id: record.id.clone(),
            record: Mutex::new(record),
            peers: Mutex::new(vec![me]),
            drain_requested: CancellationToken::new(),
        }
    }

    /// A fresh relay id.
    pub fn new_id() -> String {
        crate::state::enrollment::new_id("rly")
    }

    /// The active relays agents should hold sessions to (for the welcome).
    pub fn peers(&self) -> Vec<RelayPeer> {
        self.peers.lock().clone()
    }

    /// Registers this relay in the store (at start).
    pub fn register(&self, store: &dyn Store) -> Result<(), crate::state::store::StoreError> {
        let mut r = self.record.lock().clone();
        r.heartbeat_at = unix_now();
        store.register_relay(&r)?;
        *self.record.lock() = r;
        Ok(())
    }

    /// Marks this relay draining in the store, and drops it from the set its agents see:
    /// they get the list without it (and stop holding sessions to it) before it closes.
    pub fn start_draining(&self, store: &dyn Store, registry: &Registry) {
        self.record.lock().state = RelayState::Draining;
        if let Err(e) = store.set_relay_state(&self.id, RelayState::Draining) {
            warn!(error = %e, "could not mark this relay draining in the store; the other relays drop it from \
                   their lists when its heartbeat stops");
        }
        let without_me: Vec<RelayPeer> = self.peers.lock().iter().filter(|p| p.id != self.id).cloned().collect();
        *self.peers.lock() = without_me.clone();
        push(registry, &without_me);
    }

    /// Deletes this relay's row (clean exit).
    pub fn leave(&self, store: &dyn Store) {
        if let Err(e) = store.remove_relay(&self.id) {
            warn!(error = %e, "could not remove this relay from the store; its row ages out in {SILENT_AFTER:?}");
        }
    }

    /// One round: heartbeat, read the set, push changes, sweep revocations.
    fn tick(&self, store: &dyn Store, registry: &Registry) -> Result<(), crate::state::store::StoreError> {
        let now = unix_now();
        match store.relay_heartbeat(&self.id, now)? {
            None => {
                warn!(relay = %self.id, "this relay's row was gone from the store (silent too long?); registering again");
                self.register(store)?;
            }
            Some(RelayState::Draining) if !self.drain_requested.is_cancelled() => {
                info!(relay = %self.id, "the store says this relay drains (`sluice relays drain`)");
                self.drain_requested.cancel();
            }
            Some(_) => {}
        }
        let forgotten = store.forget_silent_relays(now.saturating_sub(SILENT_AFTER.as_secs()))?;
        if !forgotten.is_empty() {
            warn!(relays = %forgotten.join(","), "relays silent for {SILENT_AFTER:?} dropped from the cluster");
        }
        let draining = self.record.lock().state == RelayState::Draining || self.drain_requested.is_cancelled();
        let fresh = active_peers(&store.relays()?, now, if draining { Some(&self.id) } else { None });
        let changed = {
            let mut peers = self.peers.lock();
            let changed = *peers != fresh;
            *peers = fresh.clone();
            changed
        };
        if changed {
            info!(relays = %fresh.iter().map(|p| format!("{}={}", p.id, p.url)).collect::<Vec<_>>().join(" "),
                  "the cluster's active relays changed; telling the agents");
            push(registry, &fresh);
        }
        sweep_revocations(store, registry)?;
        Ok(())
    }
}

/// The relays agents should hold sessions to: active, heard within [`SILENT_AFTER`], in
/// id order; without `except` (this relay, while it drains).
fn active_peers(rows: &[RelayRecord], now: u64, except: Option<&str>) -> Vec<RelayPeer> {
    let mut peers: Vec<RelayPeer> = rows
        .iter()
        .filter(|r| r.state == RelayState::Active)
        .filter(|r| r.heartbeat_at + SILENT_AFTER.as_secs() >= now)
        .filter(|r| Some(r.id.as_str()) != except)
        .map(|r| RelayPeer { id: r.id.clone(), url: r.agent_url.clone() })
        .collect();
    peers.sort();
    peers
}

/// Sends the list to every session whose agent follows relay lists.
fn push(registry: &Registry, peers: &[RelayPeer]) {
    for s in registry.all_sessions() {
        if s.info.capabilities.relays {
            s.send(RelayMsg::Relays { relays: peers.to_vec() });
        }
    }
}

/// Cuts the sessions whose credentials a rotation or deletion on any relay revoked.
/// Returns how many were cut.
fn sweep_revocations(store: &dyn Store, registry: &Registry) -> Result<usize, crate::state::store::StoreError> {
    let sessions = registry.all_sessions();
    if sessions.is_empty() {
        return Ok(0);
    }
    let generations: HashMap<String, u64> = store.resources()?.into_iter().map(|r| (r.id, r.generation)).collect();
    let mut cut = 0;
    let mut seen = std::collections::HashSet::new();
    for s in sessions {
        let rid = s.resource_id.to_string();
        if !seen.insert(rid.clone()) {
            continue;
        }
        cut += match generations.get(&rid) {
            None => registry.revoke(
                &rid,
                None,
                &format!("resource {rid} was deleted: this agent's certificate is no longer valid"),
            ),
            Some(&g) => registry.revoke(
                &rid,
                Some(g),
                &format!(
                    "resource {rid} was rotated: this agent's certificate is revoked, and its registration JWT \
                     may be too; enroll again with a new registration JWT"
                ),
            ),
        };
    }
    if cut > 0 {
        info!(sessions = cut, "cut agent sessions revoked through the store (a rotation or deletion)");
    }
    Ok(cut)
}

/// Keeps the membership until the relay shuts down; store failures are logged (the
/// store watch reports them on /readyz) and retried next round.
pub async fn run(relay: Arc<Relay>) {
    let mut tick = tokio::time::interval(MEMBERSHIP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = relay.shutdown.cancelled() => return,
        }
        // Store calls block (PostgreSQL round trips): off the async workers.
        let r = relay.clone();
        let ticked = tokio::task::spawn_blocking(move || r.cluster.tick(&*r.store, &r.registry)).await;
        let Ok(ticked) = ticked else { continue };
        match ticked {
            Ok(()) if failing => {
                failing = false;
                info!("cluster membership: the store answers again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                warn!(error = %e, "cluster membership: could not reach the store; this relay keeps serving its \
                       sessions and retries every {MEMBERSHIP_INTERVAL:?}");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, heartbeat_at: u64, state: RelayState) -> RelayRecord {
        RelayRecord {
            id: id.into(),
            agent_url: format!("https://{id}.example:443"),
            resource_host: "127.0.0.1".into(),
            admin_url: "http://127.0.0.1:8080".into(),
            version: "0".into(),
            started_at: 0,
            heartbeat_at,
            state,
        }
    }

    #[test]
    fn agents_see_active_fresh_relays_only() {
        let now = 1_000;
        let rows = [
            row("rly_c", now, RelayState::Active),
            row("rly_a", now - 3, RelayState::Active),
            row("rly_old", now - SILENT_AFTER.as_secs() - 1, RelayState::Active),
            row("rly_drain", now, RelayState::Draining),
        ];
        let ids = |p: Vec<RelayPeer>| p.into_iter().map(|p| p.id).collect::<Vec<_>>();
        assert_eq!(ids(active_peers(&rows, now, None)), ["rly_a", "rly_c"]);
        assert_eq!(ids(active_peers(&rows, now, Some("rly_a"))), ["rly_c"], "a draining relay leaves itself out");
    }
}
