//! `dr`: backup, disaster-recovery and failover orchestration for PostgreSQL and
//! Redis. The library is the product; the `dr` binary is a thin CLI over it.
//!
//! Data flows `source → zstd → age → store` through bounded channels; the
//! repository is append-only and a backup exists only once its manifest is
//! durable. See `docs/repository-format.md`.

pub mod audit;
pub mod check;
pub mod codec;
pub mod config;
pub mod daemon;
pub mod keys;
pub mod lockfile;
pub mod os;
pub mod playbook;
pub mod postgres;
pub mod progress;
pub mod redis;
pub mod repo;
pub mod schedule;
pub mod store;
pub mod time;
pub mod tls;
pub mod validate;
pub mod verify;
