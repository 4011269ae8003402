//! grapheon-agent: the passive network agent of Graphēon.
//!
//! One run: load the configuration, take the state lock, register if there is no API key,
//! collect the four tables, send the delta report, save the state, exit. See [`run`].

#[macro_use]
pub mod log;

pub mod cli;
pub mod client;
pub mod collect;
pub mod config;
pub mod error;
pub mod input;
pub mod json;
pub mod model;
pub mod pacing;
pub mod policy;
pub mod report;
pub mod run;
pub mod slots;
pub mod state;
pub mod timefmt;
pub mod tls;
