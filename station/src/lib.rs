//! The provisioning station: the engine that runs every nest of the cell, the journal and audit
//! log that let a factory and an auditor trust it, and the commands the CLI and the touch console
//! are built on.

#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod db;
pub mod demo;
pub mod engine;
pub mod fleet;
pub mod fuzz;
pub mod labels;
pub mod manifest;
pub mod merkle;
pub mod opcua;
pub mod plc;
pub mod records;
pub mod report;
pub mod run;
pub mod shift;

pub use engine::{Command, Engine, Error, Event, LineView, OpenOptions, Reply, Session};

/// A crash point for the tests of crash safety: when the environment variable
/// `STATION_FAILPOINT` names `point`, the process aborts here, as a power cut would. Nothing sets
/// it in a cell; the tests set it for a `stationd` they then restart.
pub(crate) fn failpoint(point: &str) {
    if std::env::var_os("STATION_FAILPOINT").is_some_and(|v| v == point) {
        eprintln!("stationd: failpoint {point}: aborting");
        std::process::abort();
    }
}
