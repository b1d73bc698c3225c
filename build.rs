//! Compiles pullgate's own protocol, the local admin API (proto/pullgate/admin/v1/admin.proto), with
//! tonic's code generator. Needs `protoc` (Debian: protobuf-compiler; scripts/install-deps.sh).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/pullgate/admin/v1/admin.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&[proto], &["proto"])?;
    Ok(())
}
