//! The Bulwark wire protocol (package `bulwark.v1`): generated messages, clients and
//! servers, and the file descriptor set for gRPC reflection. Nothing hand-written lives
//! here; the domain types that check these messages are in `bulwark-common`.
//!
//! Also the clients of the subset of etcd's v3 API the coordinator's etcd state
//! backend uses ([`etcd`], package `etcdserverpb`, from `etcd/etcd_v3.proto`).

/// Generated code for `bulwark.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("bulwark.v1");
}

/// Generated clients and messages for `etcdserverpb` (etcd's v3 API, the subset
/// Bulwark uses).
#[allow(clippy::all, missing_docs)]
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// Encoded `FileDescriptorSet` of every Bulwark proto file.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/bulwark_descriptor.bin"));

pub use v1::*;
