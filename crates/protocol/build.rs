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
        // Body chunks and header values as `bytes::Bytes`, decoded as slices of the received
        // buffer: frames move between hyper and tonic without copies, and so do the response
        // head's values into the LB's `HeaderValue`s (`call::wire_headers` on the way out).
        .bytes(".dataplane.runner.v1.DataFrame")
        .bytes(".dataplane.runner.v1.Header")
        // The config as `CallSpec` holds it: converting is a move at the runner and a clone at
        // the LB, with no rehashing, and it encodes in a stable order.
        .btree_map(".dataplane.runner.v1.Call.config")
        // A stream's one `TryCall` behind a box, so that `ClientMsg` is the size of the
        // data messages that make up the rest of it (48 bytes rather than 304), and each move
        // of one through the channels and encoders is a few words, not a `memcpy`.
        .boxed(".dataplane.runner.v1.ClientMsg.body.try_call")
        // prost's codec, with the repeated fields of a received message counted before it
        // is decoded (`codec`).
        .codec_path("crate::codec::CheckedCodec")
        .compile_fds(fds)?;
    Ok(())
}
