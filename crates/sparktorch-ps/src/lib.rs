//! The sparktorch parameter server: a tokio server, a blocking client, the parameter store, the
//! three training modes, and the server's counters.
//!
//! Modules:
//! - [`config`]: what a server is started with ([`ServerConfig`]) and its validation;
//! - [`store`]: the flat `f32` parameters and the optimizer, stored per mode (atomics for
//!   hogwild, double-buffered versioned snapshots for async and synchronous);
//! - `framing` (private): the bytes a frame is written as and where a payload is read into,
//!   shared by the client and the server;
//! - [`server`]: [`Server`] and its `run(listener, shutdown)`: handshake, requests, rounds,
//!   early stopping, stats;
//! - [`client`]: [`Client`], a blocking client over `std::net::TcpStream` for executor tasks;
//! - [`stats`]: [`Stats`], the snapshot of the counters;
//! - [`checkpoint`]: [`Checkpoint`], one `safetensors` file with the parameters, the optimizer
//!   state and what a resume needs (atomic writes, validated reads);
//! - [`layout`]: how many elements a [`Layout`] covers, and the flat values cut per tensor;
//! - [`tls`]: the per-server TLS identity ([`ServerTls`]) and the clients' pinned-certificate
//!   configuration;
//! - [`error`]: [`PsError`] (server side) and [`ClientError`].
//!
//! Threading, modes and the protocol are described in `docs/engine.md` and `docs/protocol.md`.

pub mod checkpoint;
pub mod client;
pub mod config;
pub mod error;
mod framing;
pub mod layout;
pub mod server;
pub mod stats;
pub mod store;
pub mod tls;
mod wire;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use client::{Client, ClientOptions, PushOutcome};
pub use config::{LostWorkerPolicy, ServerConfig};
pub use error::{ClientError, PsError};
pub use server::Server;
pub use sparktorch_proto::{Dtype, Mode, PROTOCOL_VERSION};
pub use stats::Stats;
pub use store::Layout;
pub use tls::{Fingerprint, ServerTls};

/// Lock a std mutex, recovering the data if a panicking thread poisoned it (the state it
/// protects is kept consistent by each critical section, which never panics midway by design).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read-lock a std RwLock, recovering from poison (see [`lock`]).
pub(crate) fn read<T>(m: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-lock a std RwLock, recovering from poison (see [`lock`]).
pub(crate) fn write<T>(m: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}
