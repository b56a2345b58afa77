//! Operator actions on the cluster's relays: the set as the store holds it (`sluice
//! relays list`) and draining one for an upgrade (`sluice relays drain ID`), given to
//! any relay of the cluster.
//!
//! The store knows who is a member; how many agents and streams a relay holds lives in
//! that relay's memory, so each relay answers for itself at `GET /v1/relays/self` and
//! the CLI asks every relay and puts the answers together.

use serde::{Deserialize, Serialize};
use sluice_proto::identity::unix_now;

use crate::admin::ops::AdminError;
use crate::cluster::SILENT_AFTER;
use crate::relay::Relay;
use crate::state::store::RelayState;

/// One relay of the cluster as operators see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayView {
    pub id: String,
    /// `active`, `draining`, or `silent` (no heartbeat for the bound: being dropped).
    pub state: String,
    pub version: String,
    /// Where agents dial it.
    pub agent_url: String,
    /// Where its admin API listens (the CLI asks it for its own figures).
    pub admin_url: String,
    /// Host platform jobs use for resource ports on it.
    pub resource_host: String,
    pub started_at: u64,
    /// Seconds since its last heartbeat in the store.
    pub heartbeat_age_secs: u64,
    /// Agent sessions it holds (filled for the relay that answers; the CLI asks the others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<usize>,
    /// Streams open through it (as `agents`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<usize>,
}

/// What a relay says about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelaySelf {
    pub id: String,
    pub agents: usize,
    pub streams: usize,
    pub draining: bool,
}

impl Relay {
    /// Every relay registered in the store, oldest first; this one with its figures.
    pub fn relay_views(&self) -> Result<Vec<RelayView>, AdminError> {
        let now = unix_now();
        let me = self.relay_self();
        Ok(self
            .store
            .relays()?
            .into_iter()
            .map(|r| {
                let age = now.saturating_sub(r.heartbeat_at);
                let state = match r.state {
                    _ if age > SILENT_AFTER.as_secs() => "silent",
                    RelayState::Active => "active",
                    RelayState::Draining => "draining",
                };
                let this = r.id == me.id;
                RelayView {
                    state: state.to_owned(),
                    version: r.version,
                    agent_url: r.agent_url,
                    admin_url: r.admin_url,
                    resource_host: r.resource_host,
                    started_at: r.started_at,
                    heartbeat_age_secs: age,
                    agents: this.then_some(me.agents),
                    streams: this.then_some(me.streams),
                    id: r.id,
                }
            })
            .collect())
    }

    /// This relay's own figures.
    pub fn relay_self(&self) -> RelaySelf {
        RelaySelf {
            id: self.cluster.id.clone(),
            agents: self.registry.all_sessions().len(),
            streams: self.streams.live_count(),
            draining: self.shutdown.is_cancelled() || self.cluster.drain_requested.is_cancelled(),
        }
    }

    /// Marks relay `id` draining in the store; that relay notices within one membership
    /// interval, leaves the set its agents see, lets its streams finish (up to its
    /// `--drain-timeout`) and exits 0.
    pub fn drain_relay(&self, id: &str) -> Result<RelayView, AdminError> {
        let id = id.trim();
        if !self.store.set_relay_state(id, RelayState::Draining)? {
            return Err(AdminError::not_found(format!(
                "no relay {id:?} in the cluster: `sluice relays list` shows their ids (a restarted relay has a new one)"
            )));
        }
        if id == self.cluster.id {
            self.cluster.drain_requested.cancel();
        }
        self.relay_views()?
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| AdminError::not_found(format!("relay {id} left the cluster meanwhile")))
    }
}
