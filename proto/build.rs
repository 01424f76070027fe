//! Generates the Rust types and tonic services from the .proto files with a vendored
//! `protoc`, so building Capstan's own protocols needs no protoc on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let protos = ["proto/kv.proto", "proto/auth.proto", "proto/rpc.proto", "proto/raft.proto", "proto/agent.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure().build_client(true).build_server(true).compile_protos(&protos, &["proto"])?;
    Ok(())
}
