//! Compiles `bulwark/v1/*.proto` and `etcd/etcd_v3.proto` with protox (pure Rust), so
//! no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["bulwark/v1/bulwark.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("bulwark_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // `bytes` fields decode as `bytes::Bytes`: a slice of the received buffer, not a
    // copy. Extent data is most of what crosses the wire.
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;

    // The etcd v3 subset the coordinator's etcd backend speaks (client side only; not
    // part of the reflection descriptor, which describes Bulwark's own services).
    let etcd = "etcd/etcd_v3.proto";
    println!("cargo:rerun-if-changed={etcd}");
    let fds = protox::compile([etcd], ["."])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
