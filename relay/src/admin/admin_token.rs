//! The relay's admin token: how a bearer token is recognised as it, and its rotation
//! (`sluice admin-token rotate`, `POST /v1/admin-token/rotate`) without a restart.
//!
//! Before any rotation the admin token is the file `admin-token` of the data directory
//! (every relay of a cluster starts from a copy of the first one's data directory, so
//! they share it). A rotation moves the authority into the store, where every relay of
//! a cluster reads it on every request, as it does for API tokens:
//!
//! - the new token is stored as an admin row of the API-token table (only its SHA-256,
//!   id `adm_…`, name [`ROW_NAME`]), so it works on every relay at once;
//! - the token it replaces is recorded there as revoked (its hash), and every earlier
//!   admin-token row is revoked, so the old token is refused on every relay at once;
//! - the rotating relay writes the new token to its own data directory (0600) for the
//!   CLI on its host. Other relays' `admin-token` files keep the old, now refused token
//!   until the operator copies the new file there (their CLI says so when refused).
//!
//! Once a rotation happened (an admin-token row exists), a data directory's file token
//! counts only when the store lists it as live: a data directory restored from an old
//! copy cannot bring a rotated-out token back.

use std::path::PathBuf;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sluice_proto::identity::unix_now;
use tracing::info;

use crate::admin::auth::{Caller, token_hash};
use crate::admin::ops::AdminError;
use crate::relay::Relay;
use crate::state::enrollment::new_id;
use crate::state::pki::{files, write_secret};
use crate::state::store::{ApiTokenRecord, StoreError};

/// Id prefix of the admin-token rows in the API-token table.
pub const ROW_PREFIX: &str = "adm_";
/// Name of the admin-token rows (shown by `sluice api-tokens list`).
pub const ROW_NAME: &str = "admin token (sluice admin-token rotate)";

/// A new admin token: `sluice_admin_` and 24 random bytes in hex (the form the data
/// directory's first token has).
pub fn new_admin_token() -> String {
    let mut k = [0u8; 24];
    rand::rng().fill_bytes(&mut k);
    format!("sluice_admin_{}", hex::encode(k))
}

/// Whether an API-token row is an admin token's (made by a rotation).
pub fn is_admin_token_row(t: &ApiTokenRecord) -> bool {
    t.id.starts_with(ROW_PREFIX)
}

/// What a rotation did (the answer of `POST /v1/admin-token/rotate`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminTokenRotated {
    /// The new admin token, shown this once (the rotating relay also wrote it to its
    /// data directory).
    pub token: String,
    /// Its row id in the store (`adm_…`): the caller id in the audit trail.
    pub id: String,
    /// Where the rotating relay wrote it, on that relay's host.
    pub file: PathBuf,
    /// The relay that rotated it.
    pub relay_id: String,
    /// Unix time of the rotation.
    pub rotated_at: u64,
    /// Admin-token rows revoked by this rotation (earlier rotations' tokens).
    pub revoked: Vec<String>,
    /// The other relays of the cluster: they accept the new token at once, but their
    /// data directories' `admin-token` files still hold the old one.
    pub other_relays: Vec<String>,
}

impl Relay {
    /// The data directory's admin token, as this relay holds it now.
    pub(crate) fn file_admin_token(&self) -> String {
        self.admin_token.read().clone()
    }

    /// Recognises the data directory's admin token. `stored` is the store's row for
    /// the token's hash (`None`: no row). `Some` is the decision; `None`: not the file
    /// token, look further (API tokens).
    pub(crate) fn check_file_admin_token(
        &self,
        given: &str,
        stored: &Result<Option<ApiTokenRecord>, StoreError>,
    ) -> Option<Result<Caller, AdminError>> {
        let is_file_token = crate::admin::auth::same(given.as_bytes(), self.admin_token.read().as_bytes());
        match stored {
            // A row decides (live admin row, or a revoked one): the API-token checks.
            Ok(Some(_)) => None,
            // The store does not answer: the file token keeps working, so the operator
            // can still look at a relay whose store fails.
            Err(_) => is_file_token.then(|| Ok(Caller::bootstrap())),
            Ok(None) if !is_file_token => None,
            Ok(None) => Some(match self.store.api_tokens() {
                Ok(rows) if rows.iter().any(is_admin_token_row) => Err(AdminError {
                    status: 401,
                    message: format!(
                        "this admin token (the data directory's admin-token file) was replaced by `sluice admin-token \
                         rotate`: use the new one, which the relay that rotated it wrote into its data directory \
                         ({}); copy that file into this relay's data directory too",
                        files::ADMIN_TOKEN
                    ),
                }),
                _ => Ok(Caller::bootstrap()),
            }),
        }
    }

    /// Replaces the admin token on every relay sharing the store, at once and without a
    /// restart: the new one is live in the store, the old one (and every earlier
    /// rotation's) is revoked there, and this relay's data directory holds the new one.
    pub fn rotate_admin_token(&self) -> Result<AdminTokenRotated, AdminError> {
        let now = unix_now();
        let token = new_admin_token();
        let old = self.file_admin_token();
        let old_hash = token_hash(&old);
        let rows = self.store.api_tokens()?;
        let mut revoked = Vec::new();
        for t in rows.iter().filter(|t| is_admin_token_row(t) && t.revoked_at.is_none()) {
            self.store.revoke_api_token(&t.id, now)?;
            revoked.push(t.id.clone());
        }
        if !rows.iter().any(|t| t.token_hash == old_hash) {
            // The data directory's first token, never stored: record it as revoked.
            let id = new_id(ROW_PREFIX.trim_end_matches('_'));
            self.store.create_api_token(&ApiTokenRecord {
                id: id.clone(),
                name: Some(format!("{ROW_NAME}: the data directory's first")),
                role: "admin".into(),
                customer_id: None,
                token_hash: old_hash,
                created_at: now,
                expires_at: None,
                revoked_at: Some(now),
            })?;
            revoked.push(id);
        }
        let id = new_id(ROW_PREFIX.trim_end_matches('_'));
        self.store.create_api_token(&ApiTokenRecord {
            id: id.clone(),
            name: Some(ROW_NAME.into()),
            role: "admin".into(),
            customer_id: None,
            token_hash: token_hash(&token),
            created_at: now,
            expires_at: None,
            revoked_at: None,
        })?;
        let file = self.config.data_dir.join(files::ADMIN_TOKEN);
        // The store already has the new token: a failed write leaves this relay working
        // (the answer carries the token) and says what to do with the file.
        write_secret(&file, token.as_bytes()).map_err(|e| AdminError {
            status: 500,
            message: format!(
                "the admin token was rotated (new token {id} is live on every relay), but writing it to {} failed: \
                 {e:#}; the new token is not shown here — rotate again once the file can be written",
                file.display()
            ),
        })?;
        *self.admin_token.write() = token.clone();
        let other_relays = self
            .store
            .relays()
            .map(|rs| rs.into_iter().filter(|r| r.id != self.cluster.id).map(|r| r.admin_url).collect())
            .unwrap_or_default();
        info!(
            token_id = %id,
            revoked = %revoked.join(","),
            file = %file.display(),
            "admin token rotated: the old one is refused from now on, on every relay sharing the store"
        );
        Ok(AdminTokenRotated {
            token,
            id,
            file,
            relay_id: self.cluster.id.clone(),
            rotated_at: now,
            revoked,
            other_relays,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_tokens_look_like_the_first_one_and_differ() {
        let (a, b) = (new_admin_token(), new_admin_token());
        assert_ne!(a, b);
        assert!(a.starts_with("sluice_admin_") && a.len() == "sluice_admin_".len() + 48, "{a}");
        let row = |id: &str| ApiTokenRecord {
            id: id.into(),
            name: None,
            role: "admin".into(),
            customer_id: None,
            token_hash: String::new(),
            created_at: 0,
            expires_at: None,
            revoked_at: None,
        };
        assert!(is_admin_token_row(&row("adm_1")));
        assert!(!is_admin_token_row(&row("tok_1")));
    }
}
