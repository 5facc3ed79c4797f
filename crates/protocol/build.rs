//! Compiles `proto/*.proto` with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto");
    let files = ["runner.proto", "poolmanager.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={proto_dir}/{file}");
    }
    let fds = protox::compile(files, [proto_dir])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Body chunks and header values as `bytes::Bytes`: decoded as slices of the received
        // buffer, so frames move between hyper and tonic, and header values into `http`'s
        // `HeaderValue`, without copies.
        .bytes(".dataplane.runner.v1.DataFrame")
        .bytes(".dataplane.runner.v1.Header")
        .compile_fds(fds)?;
    Ok(())
}
