//! The bench harness: our tunnel against direct TCP, rathole, bore and rusnel, measured
//! in one run on the same machine (docs/benchmarks.md); and the soak (docs/reliability.md).

mod cluster;
pub mod fleet;
pub mod floor;
pub mod impair;
pub mod paths;
pub mod peers;
pub mod procstat;
pub mod report;
pub mod run;
pub mod soak;
pub mod traffic;
