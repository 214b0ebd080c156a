//! `stationd`: the provisioning station's service (see [`station::daemon`]).

fn main() -> std::process::ExitCode {
    station::daemon::main()
}
