//! The Bulwark wire protocol (package `bulwark.v1`): generated messages, clients and
//! servers, and the file descriptor set for gRPC reflection. Nothing hand-written lives
//! here; the domain types that check these messages are in `bulwark-common`.

/// Generated code for `bulwark.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("bulwark.v1");
}

/// Encoded `FileDescriptorSet` of every Bulwark proto file.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/bulwark_descriptor.bin"));

pub use v1::*;
