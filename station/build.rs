//! Generates the service API's Rust code from its contract, `schemas/station.proto`, with a
//! protobuf compiler written in Rust: no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../schemas/station.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../schemas"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
