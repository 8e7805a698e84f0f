//! `dr`: backup, disaster-recovery and failover orchestration for PostgreSQL,
//! Redis and RabbitMQ definitions. The library is the product; the `dr` binary is a thin CLI over it.
//!
//! Data flows `source → zstd → age → store` through bounded channels; the
//! repository is append-only and a backup exists only once its manifest is
//! durable. See `docs/repository-format.md`.
//!
//! # Layers, bottom to top
//!
//! An import may only point down: a module uses modules of lower layers,
//! never one above it nor one beside it in its own layer (design.md §11).
//! `tests/layers.rs` reads this list and checks every `crate::` path in
//! `src/` against it, and that no two files import each other, directly or
//! through others.
//!
//! 1. `error`, `os`, `time`, `keys`, `lockfile`, `progress`, `tls`, `schedule`: foundations that stand alone
//! 2. `config`, `http`: plain data and parsing, checks that need an engine living with the engine; the HTTP(S) client over `tls`
//! 3. `store`: regions and their objects
//! 4. `codec`: compression and encryption of streams
//! 5. `repo`: repository format, keys, manifests, retention
//! 6. `audit`: the append-only record of operations, kept locally and in the repository, so every layer above audits the same way
//! 7. `postgres`, `redis`, `rabbitmq`: the engines, each checking its own config sections
//! 8. `maintenance`: retention, integrity checks and region repair across engines
//! 9. `check`, `playbook`: read-only checks of a setup; failover playbooks
//! 10. `verify`, `ha`: scratch restores, drills (which run playbooks), staging; automatic failover through etcd (which reuses playbook actions and audits through `audit`)
//! 11. `validate`, `report`: loading a config with every engine's checks; `dr report` (recoverable windows, verification and drill history as HTML)
//! 12. `daemon`: schedules, probes, metrics
//! 13. `cli`, `main`: the `dr` binary

pub mod audit;
pub mod check;
pub mod codec;
pub mod config;
pub mod daemon;
pub mod error;
pub mod ha;
pub mod http;
pub mod keys;
pub mod lockfile;
pub mod maintenance;
pub mod os;
pub mod playbook;
pub mod postgres;
pub mod progress;
pub mod rabbitmq;
pub mod redis;
pub mod repo;
pub mod report;
pub mod schedule;
pub mod store;
pub mod time;
pub mod tls;
pub mod validate;
pub mod verify;
