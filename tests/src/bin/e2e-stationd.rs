//! The `stationd` daemon, as a binary of the end-to-end test package.

fn main() -> std::process::ExitCode {
    station::daemon::main()
}
