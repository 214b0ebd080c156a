//! The touch console of the provisioning cell (`station-gui`): operators log in with a PIN,
//! watch every nest and start or stop the line; supervisors open and close batches, approve
//! rework and acknowledge alarms; auditors read and verify the audit log.
//!
//! It is a view over the station's service and nothing more: a client of `stationd` (over its
//! Unix socket, or mutual TLS from another host), every action goes through the daemon's API
//! (and so through its permission table and audit log), and the console holds no PIN after a
//! log-in, no journal and no HSM, no provisioning logic, and does no IO of its own beyond the
//! backend's calls.
//!
//! - [`state`]: what the console knows, changed only by events;
//! - [`view`]: draws the state, returns the user's commands;
//! - [`backend`]: the daemon side, on the runtime (log-in, event bridge, command execution);
//! - [`app`]: the eframe application that joins them;
//! - [`theme`]: touch sizes, fonts and colours.

#![forbid(unsafe_code)]

pub mod app;
pub mod backend;
pub mod state;
pub mod theme;
pub mod view;

pub use app::{ConsoleApp, ConsoleOptions};
