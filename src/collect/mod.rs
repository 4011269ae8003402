//! Collection of the four tables, each from the first source that works.
//!
//! Sources: the kernel over netlink (`netlink`, `sockdiag`), `/proc` text (`procfs`), and the
//! external commands of the earlier agent (`commands`). Each source turns its raw input into
//! [`crate::model`] records; this module picks sources per table and applies the normalisation
//! every source shares.

pub mod commands;
pub mod netlink;
pub mod procfs;
pub mod sockdiag;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::model::Connection;

/// Why one source could not serve one table. Never fatal: the caller falls back or leaves the
/// table empty with a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError(pub String);

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A socket as a source lists it, before wildcard expansion. `inode` (0 when unknown) links it to
/// the `socket:[inode]` entries under `/proc/<pid>/fd`; `dual_stack` is true only for an IPv6
/// socket bound to `::` that is known to accept IPv4 too (not `IPV6_V6ONLY`; `ss` prints its
/// address as `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    pub connection: Connection,
    pub inode: u64,
    pub dual_stack: bool,
}

/// Which sources may serve the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Kernel first, then `/proc`, then the commands, per table.
    Auto,
    /// Kernel interfaces and `/proc` only.
    Native,
    /// The earlier agent's external commands only.
    Commands,
}

/// Which tables the policy lets us collect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tables {
    pub addresses: bool,
    pub neighbors: bool,
    pub routes: bool,
    pub connections: bool,
}

impl Default for Tables {
    fn default() -> Tables {
        Tables {
            addresses: true,
            neighbors: true,
            routes: true,
            connections: true,
        }
    }
}

/// Everything collection needs to know.
#[derive(Clone, Debug)]
pub struct Options {
    pub mode: Mode,
    pub proc_root: PathBuf,
    pub command_timeout: Duration,
    pub tables: Tables,
}
