//! A PostgreSQL server for the factory registry on loopback, for the tests (see
//! `e2e::registry`): `e2e-registry [--durable] [DIR]` prints `ready DIR`, then takes `kill` and
//! `start` on standard input; at end of input it stops the server. `--durable` keeps fsync on.

fn main() {
    let mut durable = false;
    let mut dir = None;
    for a in std::env::args_os().skip(1) {
        if a == "--durable" {
            durable = true;
        } else {
            dir = Some(std::path::PathBuf::from(a));
        }
    }
    e2e::registry::serve(dir, durable);
}
