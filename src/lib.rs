//! sniplex: a Layer-4 TLS SNI router.
//!
//! Data flows one way through the crate:
//!
//! ```text
//! listener (bind) -> server (accept on every worker, limits, shutdown) -> conn:
//!     hello (read ClientHello) -> router (route by SNI) -> backend (connect)
//!     -> splice (forward both ways, zero-copy) -> outcome (log)
//! ```
//!
//! Pure modules (`name`, `hello`, `router`, `alert`, `config`) do no I/O and never touch tokio.

#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(missing_debug_implementations)]

pub mod acme;
pub mod alert;
pub mod backend;
pub mod config;
pub mod conn;
pub mod hello;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod name;
pub mod privileges;
pub mod proxy_protocol;
pub mod quic;
pub mod router;
pub mod server;
pub mod splice;
pub mod systemd;
pub mod tls;
pub mod workers;

pub use config::Config;

/// Locks `m`, also when poisoned: a poisoned lock only means another task panicked in the middle
/// of an update of plain data (maps, counters), which the next user can still work with.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
pub use server::{run, Control, Options};
