//! Who may call what, end to end: every RPC of every service in the wire protocol
//! (read from `bulwark_proto::FILE_DESCRIPTOR_SET`, so a new RPC is in the test the
//! moment it is in the proto) has a row in `common::access::RULES`, and a real
//! fleet answers each one, called with an empty request by a certificate of each
//! role, exactly as the table says: an allowed role gets any answer but
//! `PermissionDenied`/`Unauthenticated` (an empty request may well be
//! `InvalidArgument`), any other role `PermissionDenied`. A certificate from
//! another CA, and no certificate at all, are refused in the TLS handshake on both
//! the coordinator and the node. The enrollment listener serves `Enroll` without a
//! certificate, and nothing else.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bulwark_common::access::{self, Access};
use bulwark_common::telemetry::TracedChannel;
use bulwark_common::tls::{Role, Target, TlsIdentity};
use bulwark_tests::{Fleet, Pki, TlsFiles, block_on};
use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Request, Status};

/// Raw bytes both ways: an empty request is an empty message of any type, and
/// any answer decodes.
#[derive(Debug, Clone, Copy, Default)]
struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;
    fn encoder(&mut self) -> BytesCodec {
        BytesCodec
    }
    fn decoder(&mut self) -> BytesCodec {
        BytesCodec
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// One RPC as the descriptor describes it.
#[derive(Debug, Clone)]
struct Rpc {
    service: String,
    path: String,
    client_streaming: bool,
    server_streaming: bool,
}

fn rpcs() -> Vec<Rpc> {
    let set = prost_types::FileDescriptorSet::decode(bulwark_proto::FILE_DESCRIPTOR_SET)
        .expect("the proto crate's descriptor set decodes");
    let mut out = Vec::new();
    for file in &set.file {
        let package = file.package();
        for svc in &file.service {
            for m in &svc.method {
                out.push(Rpc {
                    service: svc.name().to_string(),
                    path: format!("/{package}.{}/{}", svc.name(), m.name()),
                    client_streaming: m.client_streaming(),
                    server_streaming: m.server_streaming(),
                });
            }
        }
    }
    out
}

/// Calls `rpc` with an empty request (an empty stream for streaming inputs);
/// `Ok` is any answer the server gave as a response.
async fn call(channel: TracedChannel, rpc: &Rpc) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(format!("transport error: {e}")))?;
    let path = PathAndQuery::from_str(&rpc.path).expect("a path");
    let run = async {
        match (rpc.client_streaming, rpc.server_streaming) {
            (false, false) => grpc
                .unary::<_, Bytes, _>(Request::new(Bytes::new()), path, BytesCodec)
                .await
                .map(|_| ()),
            (false, true) => grpc
                .server_streaming::<_, Bytes, _>(Request::new(Bytes::new()), path, BytesCodec)
                .await
                .map(|_| ()),
            (true, false) => grpc
                .client_streaming::<_, _, Bytes, _>(
                    Request::new(tokio_stream::empty::<Bytes>()),
                    path,
                    BytesCodec,
                )
                .await
                .map(|_| ()),
            (true, true) => grpc
                .streaming::<_, _, Bytes, _>(
                    Request::new(tokio_stream::empty::<Bytes>()),
                    path,
                    BytesCodec,
                )
                .await
                .map(|_| ()),
        }
    };
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer within 30 s")))
}

/// Whether `status` is what a TLS 1.3 client sees when the server refused its
/// certificate in the handshake (the CLI's own reading of it).
fn refused_in_handshake(status: &Status) -> bool {
    bulwark_common::tls::explain_status("server", status)
        .contains("refused this client's certificate")
}

/// A client configuration that trusts the fleet CA and presents no certificate.
fn no_certificate(ca: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).expect("ca");
    for c in bulwark_common::tls::parse_certs_pem(&pem).expect("pem") {
        roots.add(c).expect("root");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// Who calls.
#[derive(Debug, Clone)]
enum Caller {
    Fleet(Role, TlsFiles),
    OtherCa(TlsFiles),
    NoCertificate,
}

impl Caller {
    fn label(&self) -> String {
        match self {
            Caller::Fleet(r, _) => format!("{r} certificate"),
            Caller::OtherCa(_) => "certificate of another CA".into(),
            Caller::NoCertificate => "no certificate".into(),
        }
    }

    fn config(&self, ca: &std::path::Path, server: Role) -> Arc<rustls::ClientConfig> {
        match self {
            Caller::Fleet(_, f) | Caller::OtherCa(f) => TlsIdentity::load(f)
                .expect("identity")
                .client_config(server)
                .expect("config"),
            Caller::NoCertificate => no_certificate(ca),
        }
    }
}

/// Checks one answer against the table; a mismatch is described.
fn judge(caller: &Caller, rpc: &Rpc, on: &str, result: &Result<(), Status>) -> Option<String> {
    let what = format!("{} calling {} on {on}", caller.label(), rpc.path);
    match caller {
        Caller::Fleet(role, _) => {
            let allowed = access::allows(&rpc.path, *role);
            match result {
                Ok(()) if allowed => None,
                Err(s) if allowed => {
                    (matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated))
                        .then(|| format!("{what}: allowed by the table, refused: {s:?}"))
                }
                Err(s) if s.code() == Code::PermissionDenied => {
                    let method = access::method_of(&rpc.path);
                    (!s.message().contains(method))
                        .then(|| format!("{what}: the refusal does not name {method}: {s:?}"))
                }
                other => Some(format!(
                    "{what}: not allowed by the table, expected PermissionDenied, got {other:?}"
                )),
            }
        }
        Caller::OtherCa(_) | Caller::NoCertificate => match result {
            Err(s) if refused_in_handshake(s) => None,
            other => Some(format!(
                "{what}: expected a refusal in the TLS handshake, got {other:?}"
            )),
        },
    }
}

#[test]
fn every_rpc_answers_each_role_as_the_access_table_says() {
    let rpcs = rpcs();
    // Every RPC has a row, and every row is an RPC (or the health service).
    let missing: Vec<&str> = rpcs
        .iter()
        .filter(|r| access::rule(&r.path).is_none())
        .map(|r| r.path.as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "RPCs without a row in common::access::RULES (add one): {missing:?}"
    );
    let stale: Vec<&str> = access::RULES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !p.starts_with("/grpc.health.v1.") && !rpcs.iter().any(|r| r.path == *p))
        .collect();
    assert!(
        stale.is_empty(),
        "rows for RPCs the proto does not have: {stale:?}"
    );
    let services: std::collections::BTreeSet<&str> =
        rpcs.iter().map(|r| r.service.as_str()).collect();
    assert_eq!(
        services.into_iter().collect::<Vec<_>>(),
        vec!["Coordinator", "Enrollment", "Node"],
        "a new service needs its listener in this test"
    );

    let mut fleet = Fleet::builder()
        .node("n1")
        .agent("a1", "a1-data", 8 << 20)
        .enrollment()
        .start();
    let ca = fleet.pki().ca();
    let mut callers: Vec<Caller> = Role::ALL
        .iter()
        .map(|r| Caller::Fleet(*r, fleet.pki().issue(r.as_str(), &format!("matrix-{r}"))))
        .collect();
    let other = Pki::init(&fleet.root().join("other-pki")).issue("admin", "admin");
    callers.push(Caller::OtherCa(TlsFiles {
        ca: ca.clone(),
        ..other
    }));
    callers.push(Caller::NoCertificate);
    let listeners: HashMap<&str, (String, Role)> = [
        (
            "Coordinator",
            (fleet.coordinator_url().to_string(), Role::Coordinator),
        ),
        ("Node", (fleet.node_address("n1"), Role::Node)),
    ]
    .into();

    let mut wrong = Vec::new();
    let mut calls = 0;
    block_on(async {
        for caller in &callers {
            for (service, (url, server_role)) in &listeners {
                // One channel per identity and listener, reused for every call.
                let target = Target::parse(url).expect("url");
                let channel =
                    match bulwark_common::tls::channel(&target, caller.config(&ca, *server_role))
                        .await
                    {
                        Ok(c) => c,
                        Err(e) => {
                            // Refused before any call: fine for the refused callers.
                            if !matches!(caller, Caller::Fleet(..))
                                && e.to_string().contains("certificate")
                            {
                                continue;
                            }
                            panic!(
                                "{} cannot connect to {service} at {url}: {e}",
                                caller.label()
                            );
                        }
                    };
                let on: Vec<&Rpc> = rpcs
                    .iter()
                    .filter(|r| r.service == *service || r.service == "Enrollment")
                    .collect();
                for rpc in on {
                    let result = call(channel.clone(), rpc).await;
                    calls += 1;
                    if let Some(w) = judge(caller, rpc, service, &result) {
                        wrong.push(w);
                    }
                }
                // A method nobody has a row for is refused to everyone before any
                // routing (without the access layer it would be Unimplemented).
                if let Caller::Fleet(..) = caller {
                    let nope = Rpc {
                        service: service.to_string(),
                        path: format!("/bulwark.v1.{service}/NoSuchMethod"),
                        client_streaming: false,
                        server_streaming: false,
                    };
                    match call(channel.clone(), &nope).await {
                        Err(s)
                            if s.code() == Code::PermissionDenied
                                && s.message().contains("no access rule") => {}
                        other => wrong.push(format!(
                            "{} calling {} on {service}: expected a refusal for the missing rule, got {other:?}",
                            caller.label(),
                            nope.path
                        )),
                    }
                }
                // Health checks: any fleet certificate.
                let health = Rpc {
                    service: "Health".into(),
                    path: "/grpc.health.v1.Health/Check".into(),
                    client_streaming: false,
                    server_streaming: false,
                };
                let result = call(channel.clone(), &health).await;
                if let Some(w) = judge(caller, &health, service, &result) {
                    wrong.push(w);
                }
            }
        }

        // The enrollment listener: Enroll without a certificate (the empty token
        // is refused as such, not for the missing certificate); nothing else.
        let target = Target::parse(fleet.enrollment_url()).expect("url");
        let channel = bulwark_common::tls::channel(&target, no_certificate(&ca))
            .await
            .expect("the enrollment listener takes clients without a certificate");
        for rpc in &rpcs {
            let result = call(channel.clone(), rpc).await;
            let token = access::rule(&rpc.path) == Some(Access::Token);
            let ok = match &result {
                Err(s) if token => s.code() == Code::InvalidArgument,
                Err(s) => s.code() == Code::PermissionDenied,
                Ok(()) => false,
            };
            if !ok {
                wrong.push(format!(
                    "no certificate calling {} on the enrollment listener: {result:?}",
                    rpc.path
                ));
            }
        }
    });
    assert!(calls > 100, "only {calls} calls were made");
    assert!(
        wrong.is_empty(),
        "{} answer(s) do not match common::access::RULES:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // The refusals were counted where they happened.
    for log in [fleet.coordinator().log_text(), fleet.node("n1").log_text()] {
        assert!(log.contains("refused call"), "no refusal logged");
        assert!(
            log.contains("refused TLS connection"),
            "no refused handshake logged"
        );
    }
}
