//! The `station` command, as a binary of the end-to-end test package.

fn main() -> std::process::ExitCode {
    station::cli::main()
}
