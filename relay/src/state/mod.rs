//! Persistent state and credentials, below both planes: the [`store`] (customers,
//! resources, agents, registration JWTs), the relay's identity material ([`pki`]),
//! registration JWT signing ([`tokens`]) and the [`enrollment`] decisions built on
//! them. Nothing here listens on a socket.

pub mod enrollment;
pub mod pki;
pub mod store;
pub mod tokens;
