//! A PostgreSQL server for the factory registry on loopback, for the tests (see
//! `e2e::registry`): `e2e-registry [DIR]` prints `ready DIR`, then takes `kill` and `start` on
//! standard input; at end of input it stops the server.

fn main() {
    e2e::registry::serve(std::env::args_os().nth(1).map(std::path::PathBuf::from));
}
