//! The touch console of the provisioning cell (`station-gui`): operators log in with a PIN,
//! watch every nest and start or stop the line; supervisors open and close batches, approve
//! rework and acknowledge alarms; auditors read and verify the audit log.
//!
//! It is a view over the station engine and nothing more: the engine runs in-process on a tokio
//! runtime, every action goes through [`station::Engine::execute`] (and so through its
//! permission table and audit log), and the console holds no provisioning logic and does no IO
//! of its own.
//!
//! - [`state`]: what the console knows, changed only by events;
//! - [`view`]: draws the state, returns the user's commands;
//! - [`backend`]: the engine side, on the runtime (event bridge, command execution);
//! - [`app`]: the eframe application that joins them;
//! - [`theme`]: touch sizes, fonts and colours.

#![forbid(unsafe_code)]

pub mod app;
pub mod backend;
pub mod state;
pub mod theme;
pub mod view;

pub use app::{ConsoleApp, ConsoleOptions};
