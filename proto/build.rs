//! Generates the wire types from `proto/hopper.proto` with a protoc taken from crates.io,
//! so a fresh machine needs no system package to build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    // Message bodies are `bytes::Bytes`: decoding a frame slices the read buffer instead of
    // copying the body, and the broker shares one allocation across every delivery.
    config.bytes(["."]);
    config.compile_protos(&["proto/hopper.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/hopper.proto");
    Ok(())
}
