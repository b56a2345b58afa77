//! The admin plane: what operators do, over HTTP.
//!
//! - [`ops`]: operator actions (customers, registration JWTs and rotation, resources,
//!   agents and their views) as plain methods on the relay, used by the API and by
//!   `sluice quickstart`;
//! - [`relays`]: the cluster's relays (list, drain);
//! - [`api`]: the admin HTTP API (JSON, bearer token), health and metrics endpoints;
//! - [`auth`]: roles, the scope table and the caller of each request;
//! - [`api_tokens`]: API tokens (create, list, revoke, check) and reading the audit trail;
//! - [`admin_token`]: the admin token's check and its rotation without a restart.
//!
//! It reads the data plane's live state (sessions, streams) to answer, and acts on it
//! only through the registry (revocation).

pub mod admin_token;
pub mod api;
pub mod api_tokens;
pub mod auth;
pub mod ops;
pub mod relays;
