//! Persistent state and credentials, below both planes: the [`store`] (customers,
//! resources, agents, registration JWTs), the relay's identity material ([`pki`]),
//! registration JWT signing ([`tokens`]) and the [`enrollment`] decisions built on
//! them; the data directory's lock and file errors ([`data_dir`]) and the watch that
//! notices the database file failing under the running relay ([`store_watch`]).
//! [`backup`] copies all of it consistently while the relay runs, and restores it.
//! Nothing here listens on a socket.

pub mod backup;
pub mod data_dir;
pub mod enrollment;
pub mod pki;
pub mod store;
pub mod store_watch;
pub mod tokens;
