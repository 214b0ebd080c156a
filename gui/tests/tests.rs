//! The console's integration tests: the real console driven through its accessibility tree over
//! demo cells ([`console`]), and pictures of its screens ([`snapshots`]).

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod console;
mod snapshots;
mod util;
