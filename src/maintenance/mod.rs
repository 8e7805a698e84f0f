//! Maintenance of a repository across engines: retention (`expire`),
//! integrity checks (`verify --list/--read-data`), region repair (`sync`) and
//! key-only listings (`inventory`). It sits above the engines because it
//! reads their manifests and catalogs; the repository format below knows
//! nothing of them.

pub mod coverage;
pub mod expire;
pub mod inventory;
pub mod sync;
pub mod verify;
