//! Compiles `proto/ambient_cni.proto` with protox (pure Rust), so a fresh machine needs no `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["ambient_cni.proto"], ["proto"])?;
    let server = std::env::var_os("CARGO_FEATURE_SERVER").is_some();
    tonic_prost_build::configure()
        .build_server(server)
        .build_client(true)
        // No `connect(uri)` helper: both sides dial a unix socket through their own connector.
        .build_transport(false)
        .compile_fds(fds)?;
    // compile_fds does not know the file names: without this, edits to the .proto would not rebuild.
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
