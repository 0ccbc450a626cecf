//! Revocation end to end: `bulwark revoke agent a1` on a running fleet. From then
//! on a1's connections are refused in the TLS handshake by the coordinator and the
//! node, the streams it holds open are cut (its control stream at once, a raw sync
//! stream to the node within a heartbeat), it cannot renew, while a2 keeps syncing.
//! The coordinator's CRL (`data_dir/crl.der`) is a real X.509 CRL listing a1's
//! serial; nodes and agents keep the list across a restart. A token made before
//! the revocation no longer enrolls a1, a new one does, and the new certificate
//! works. Revoking a node raises `revoked/<node>` and agents stop sending it data.

use std::time::{Duration, Instant};

use bulwark_common::revocation::CertFacts;
use bulwark_common::tls::Role;
use bulwark_proto as pb;
use bulwark_proto::coordinator_client::CoordinatorClient;
use bulwark_tests::bins::{self, AGENT};
use bulwark_tests::grpc::{channel, node_client};
use bulwark_tests::{Fleet, TlsFiles, Value, json_str, json_u64, poll};
use tonic::Status;

const SIZE: u64 = 4 << 20;

fn facts(fleet: &Fleet, files: &TlsFiles) -> CertFacts {
    let td = bulwark_common::pki::trust_domain_of_ca(&fleet.pki().ca()).expect("trust domain");
    let der = bulwark_common::tls::parse_certs_pem(&std::fs::read(&files.cert).expect("cert"))
        .expect("pem");
    CertFacts::parse(der[0].as_ref(), &td).expect("certificate")
}

/// `ListRevocations` on the coordinator as the holder of `id`.
async fn list_as(url: &str, id: &TlsFiles) -> Result<pb::RevocationList, Status> {
    let ch = channel(url, id, Role::Coordinator)
        .await
        .map_err(Status::unavailable)?;
    CoordinatorClient::new(ch)
        .list_revocations(pb::ListRevocationsRequest {})
        .await
        .map(|r| r.into_inner())
}

/// `Renew` on the coordinator as the holder of `id`.
async fn renew_as(url: &str, id: &TlsFiles) -> Result<pb::RenewResponse, Status> {
    let ch = channel(url, id, Role::Coordinator)
        .await
        .map_err(Status::unavailable)?;
    let (_, csr_pem) = bulwark_common::pki::make_csr().expect("csr");
    CoordinatorClient::new(ch)
        .renew(pb::RenewRequest {
            csr_pem,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// A call refused in the TLS handshake, as a TLS 1.3 client sees it.
fn assert_refused_in_handshake<T: std::fmt::Debug>(what: &str, r: &Result<T, Status>) {
    match r {
        Err(s)
            if bulwark_common::tls::explain_status("server", s)
                .contains("refused this client's certificate")
                || s.message().contains("certificate") => {}
        other => panic!("{what}: expected a refusal in the TLS handshake, got {other:?}"),
    }
}

fn revoked_names(list: &Value) -> Vec<(String, String)> {
    list.as_array()
        .expect("an array")
        .iter()
        .map(|r| (json_str(r, "role"), json_str(r, "name")))
        .collect()
}

#[test]
fn a_revoked_agent_is_cut_off_and_others_keep_working() {
    let mut fleet = Fleet::builder()
        .node("n1")
        .agent("a1", "a1-data", SIZE)
        .agent("a2", "a2-data", SIZE)
        .enrollment()
        .start();
    for s in ["a1-data", "a2-data"] {
        assert_eq!(json_u64(&fleet.sync(s), "point"), 1);
    }
    let a1 = fleet.identity("a1");
    let a1_facts = facts(&fleet, &a1);
    let url = fleet.coordinator_url().to_string();
    let node_url = fleet.node_address("n1");
    let rt = bulwark_tests::runtime();
    assert!(
        rt.block_on(list_as(&url, &a1)).is_ok(),
        "a1 may list revocations"
    );
    // A token for a1 made now, before the revocation.
    let token = |fleet: &Fleet| {
        json_str(
            &fleet.cli_json(&[
                "token", "create", "--role", "agent", "--name", "a1", "--ttl", "1h", "--json",
            ]),
            "token",
        )
    };
    let old_token = token(&fleet);

    // A sync stream a1 holds open on the node: Begin, Ready, then nothing.
    let info = fleet.source_info("a1-data");
    let begin = pb::SyncBegin {
        source: "a1-data".into(),
        epoch: json_u64(&info, "epoch"),
        size_bytes: SIZE,
        block_size: 65536,
        base_point: 1,
        consistency: pb::Consistency::Crash as i32,
        kind: pb::PointKind::Incremental as i32,
        want_digests: false,
        deep: false,
    };
    let (held_tx, held) = std::sync::mpsc::channel::<(Result<(), Status>, Instant)>();
    let (ready_tx, ready) = std::sync::mpsc::channel::<Result<(), String>>();
    {
        let (node_url, a1) = (node_url.clone(), a1.clone());
        rt.spawn(async move {
            let mut client = node_client(&node_url, &a1).await;
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::SyncMessage>(4);
            let _ = tx
                .send(pb::SyncMessage {
                    msg: Some(pb::sync_message::Msg::Begin(begin)),
                })
                .await;
            let mut replies = match client
                .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    let _ = ready_tx.send(Err(format!("sync refused: {s:?}")));
                    return;
                }
            };
            match replies.message().await {
                Ok(Some(pb::SyncReply {
                    msg: Some(pb::sync_reply::Msg::Ready(_)),
                })) => {
                    let _ = ready_tx.send(Ok(()));
                }
                other => {
                    let _ = ready_tx.send(Err(format!("no Ready: {other:?}")));
                    return;
                }
            }
            // `tx` stays alive: the stream ends only if the node cuts it.
            let end = replies.message().await.map(|_| ());
            let _ = held_tx.send((end, Instant::now()));
            drop(tx);
        });
    }
    ready
        .recv_timeout(Duration::from_secs(30))
        .expect("the held sync answered")
        .expect("the node took a1's sync");

    // Revoke a1.
    let revoked_at = Instant::now();
    let out = fleet.cli_json(&["revoke", "agent", "a1", "--json"]);
    let entry = &out.as_array().expect("an array")[0];
    assert_eq!(json_str(entry, "role"), "agent");
    assert_eq!(json_str(entry, "name"), "a1");
    assert_eq!(json_str(entry, "by"), "admin");
    assert!(
        bulwark_common::time::parse_rfc3339_ms(&json_str(entry, "revoked_at")).is_ok(),
        "{entry}"
    );
    let serials: Vec<&str> = entry["serials"]
        .as_array()
        .expect("serials")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        serials.contains(&a1_facts.serial.as_str()),
        "the serial a1 presented ({}) is not listed: {entry}",
        a1_facts.serial
    );
    assert_eq!(
        revoked_names(&fleet.cli_json(&["revocations", "--json"])),
        vec![("agent".to_string(), "a1".to_string())]
    );

    // The held stream is cut once the node has the list (heartbeats every 1 s).
    let (end, at) = held
        .recv_timeout(Duration::from_secs(20))
        .expect("the node cut a1's open sync stream");
    assert!(end.is_err(), "the held stream ended cleanly: {end:?}");
    eprintln!(
        "a1's open sync stream was cut {:?} after the revocation",
        at - revoked_at
    );
    assert!(fleet.node("n1").log_text().contains("connection cut"));
    // The coordinator cut a1's control stream at once, and a1 stays out.
    poll("a1 disconnected", Duration::from_secs(20), || {
        let agents = fleet.cli_json_try(&["agents", "--json"])?;
        let a = agents
            .as_array()
            .and_then(|l| l.iter().find(|a| a["name"] == "a1"))
            .cloned()
            .ok_or("a1 is not listed")?;
        if a["connected"] == false {
            Ok(())
        } else {
            Err(format!("a1 still connected: {a}"))
        }
    });
    fleet.agent("a1").assert_alive();
    // Every new connection of a1 is refused, and it cannot renew.
    assert_refused_in_handshake("a1 at the coordinator", &rt.block_on(list_as(&url, &a1)));
    assert_refused_in_handshake("a1 renewing", &rt.block_on(renew_as(&url, &a1)));
    let node_call = rt.block_on(async {
        let ch = channel(&node_url, &a1, Role::Node)
            .await
            .map_err(Status::unavailable)?;
        bulwark_proto::node_client::NodeClient::new(ch)
            .restore(pb::NodeRestoreRequest {
                source: "a1-data".into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    });
    assert_refused_in_handshake("a1 at the node", &node_call);
    let (_, stderr) = fleet.cli_expect_fail(&["sync", "a1-data", "--wait"]);
    assert!(stderr.contains("a1"), "{stderr}");
    // a2 is untouched.
    assert_eq!(json_u64(&fleet.sync("a2-data"), "point"), 2);

    // The CRL: a real X.509 CRL signed by the fleet CA, listing a1's serial.
    let dir = fleet.coordinator_data_dir();
    let der = std::fs::read(dir.join("crl.der")).expect("data_dir/crl.der");
    let (_, crl) = x509_parser::parse_x509_crl(&der).expect("a CRL");
    let listed: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|r| bulwark_common::revocation::serial_hex(r.raw_serial()))
        .collect();
    assert!(
        listed.contains(&a1_facts.serial),
        "{listed:?} lacks {}",
        a1_facts.serial
    );
    // WebPKI takes it as the fleet CA's and refuses a1's certificate by it alone.
    let mut roots = rustls::RootCertStore::empty();
    for c in bulwark_common::tls::parse_certs_pem(&std::fs::read(fleet.pki().ca()).expect("ca"))
        .expect("pem")
    {
        roots.add(c).expect("root");
    }
    let td = bulwark_common::pki::trust_domain_of_ca(&fleet.pki().ca()).expect("td");
    let by_crl = std::sync::Arc::new(
        bulwark_common::revocation::Revocations::new(std::sync::Arc::new(roots), &td)
            .expect("revocations"),
    );
    by_crl
        .set(pb::RevocationList {
            revocations: vec![],
            crl_der: der.clone().into(),
            version: 1,
        })
        .expect("set");
    assert!(by_crl.snapshot().crl_in_use(), "the CRL was not usable");
    let a1_der =
        bulwark_common::tls::parse_certs_pem(&std::fs::read(&a1.cert).expect("cert")).expect("pem");
    use rustls::server::danger::ClientCertVerifier;
    let verdict = by_crl.client_verifier().verify_client_cert(
        &a1_der[0],
        &[],
        rustls::pki_types::UnixTime::now(),
    );
    assert!(
        matches!(
            verdict,
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked
            ))
        ),
        "the CRL does not revoke a1: {verdict:?}"
    );
    assert!(
        std::fs::read_to_string(dir.join("crl.pem"))
            .expect("crl.pem")
            .starts_with("-----BEGIN X509 CRL-----")
    );

    // Nodes and agents keep the list: a restarted node still refuses a1.
    assert!(
        std::fs::read_to_string(fleet.root().join("a2/state/revocations.json"))
            .expect("a2 keeps the list")
            .contains("\"a1\"")
    );
    fleet.node("n1").restart();
    fleet.wait_nodes_up(&["n1".to_string()]);
    let node_call = rt.block_on(async {
        let ch = channel(&node_url, &a1, Role::Node)
            .await
            .map_err(Status::unavailable)?;
        bulwark_proto::node_client::NodeClient::new(ch)
            .list_points(pb::ListPointsRequest::default())
            .await
            .map(|_| ())
    });
    assert_refused_in_handshake("a1 at the restarted node", &node_call);

    // Enrollment: the old token no longer works; a new one does, and the new
    // certificate for a1 is accepted.
    let pki = fleet.scratch("a1-again");
    let enroll = |token: &str| {
        std::process::Command::new(bins::bin(AGENT))
            .args(["enroll", "--coordinator", fleet.enrollment_url(), "--dir"])
            .arg(&pki)
            .env("BULWARK_TOKEN", token)
            .output()
            .expect("run enroll")
    };
    let out = enroll(&old_token);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was revoked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = enroll(&token(&fleet));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fresh = TlsFiles {
        ca: pki.join("ca.crt"),
        cert: pki.join("a1.crt"),
        key: pki.join("a1.key"),
        renew_before: None,
    };
    // Its notBefore may be up to a second ahead (it must follow the revocation).
    let list = poll(
        "the new a1 certificate accepted",
        Duration::from_secs(10),
        || {
            rt.block_on(list_as(&url, &fresh))
                .map_err(|s| format!("{s:?}"))
        },
    );
    assert_eq!(list.revocations.len(), 1);
    assert!(
        facts(&fleet, &fresh).not_before_ms > list.revocations[0].revoked_at_ms,
        "the new certificate dates from after the revocation"
    );

    // Revoking the node: a critical alert names its sources and says to drain
    // it, and the agent refuses to send it data.
    fleet.cli_json(&["revoke", "node", "n1", "--json"]);
    let alert = poll("the revoked/n1 alert", Duration::from_secs(20), || {
        let alerts = fleet.cli_json_try(&["alerts", "--json"])?;
        alerts
            .as_array()
            .and_then(|l| l.iter().find(|a| a["key"] == "revoked/n1"))
            .cloned()
            .ok_or(format!("no revoked/n1 in {alerts}"))
    });
    assert_eq!(json_str(&alert, "severity"), "critical");
    let message = json_str(&alert, "message");
    assert!(
        message.contains("a2-data") && message.contains("bulwark drain n1"),
        "{message}"
    );
    poll(
        "a2 refuses the revoked node",
        Duration::from_secs(20),
        || match fleet.cli_json_try(&["sync", "a2-data", "--wait", "--json"]) {
            Err(e) if e.contains("Revoked") || e.contains("revoked") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
}
