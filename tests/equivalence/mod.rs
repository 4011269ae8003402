//! Helpers of the equivalence tests: namespaces, socket-holding processes, the scene they
//! make, and the agent's `--dry-run` output as comparable sets.

pub mod dry_run;
pub mod holder;
pub mod namespace;
pub mod seccomp;
pub mod world;
