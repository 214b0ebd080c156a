//! `station`: the provisioning station's command line (see [`station::cli`]).

fn main() -> std::process::ExitCode {
    station::cli::main()
}
