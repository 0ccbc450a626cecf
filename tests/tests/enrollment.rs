//! Token enrollment end to end: `bulwark token create` makes a one-time token;
//! `bulwark-agent enroll` makes the key on the host, checks the coordinator against
//! the CA fingerprint in the token, sends a CSR and gets its certificate; the agent
//! then runs with it and renews it without a restart, as the coordinator renews its
//! own. Reused, expired, wrong-role and forged tokens are refused with a message
//! that says which. A node's DNS names and addresses come from its token.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use bulwark_tests::bins::{self, AGENT, NODE};
use bulwark_tests::{Daemon, Fleet, MIB, json_str, poll};

fn enroll(binary: &str, url: &str, token: &str, dir: &Path, extra: &[&str]) -> Output {
    Command::new(bins::bin(binary))
        .args(["enroll", "--coordinator", url, "--dir"])
        .arg(dir)
        .args(extra)
        .env("BULWARK_TOKEN", token)
        .output()
        .expect("run enroll")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn hosts_enroll_with_one_time_tokens_and_renew_without_a_restart() {
    let mut fleet = Fleet::builder().node("node-1").build();
    let eport = bulwark_tests::free_port();
    let url = format!("https://127.0.0.1:{eport}");
    // Turn enrollment on: the coordinator gets the CA key.
    let config = fleet.coordinator().config_path().to_path_buf();
    let text = std::fs::read_to_string(&config).expect("coordinator.toml");
    let ca_key = fleet.pki().dir().join("ca.key");
    // renew_before longer than any certificate's life: the coordinator renews its
    // own certificate (it holds the CA key) at once.
    let text = text.replace("[tls]\n", "[tls]\nrenew_before = \"400d\"\n");
    std::fs::write(
        &config,
        format!(
            "{text}\n[enrollment]\nlisten = \"127.0.0.1:{eport}\"\nca_key = \"{}\"\ncert_validity = \"30d\"\n",
            ca_key.display()
        ),
    )
    .expect("write coordinator.toml");
    let coordinator_cert = fleet.pki().dir().join("coordinator.crt");
    let enrolled_coordinator = std::fs::read(&coordinator_cert).expect("coordinator cert");
    fleet.start_all();
    poll(
        "the coordinator renewed itself",
        Duration::from_secs(30),
        || {
            let now = std::fs::read(&coordinator_cert).map_err(|e| e.to_string())?;
            if now != enrolled_coordinator {
                Ok(())
            } else {
                Err("still the issued certificate".into())
            }
        },
    );
    // Nodes and the CLI still trust it: the renewed one keeps its names.
    let der = bulwark_common::tls::parse_certs_pem(
        &std::fs::read(&coordinator_cert).expect("coordinator cert"),
    )
    .expect("pem");
    let (_, ips) = bulwark_common::tls::dns_and_ip_sans(der[0].as_ref());
    assert!(ips.contains(&"127.0.0.1".to_string()), "{ips:?}");
    fleet.cli(&["nodes", "--json"]);

    let token = |role: &str, name: &str, ttl: &str| {
        json_str(
            &fleet.cli_json(&[
                "token", "create", "--role", role, "--name", name, "--ttl", ttl, "--json",
            ]),
            "token",
        )
    };

    // An agent enrolls: key made here (0600), certificate for agent host-7.
    let pki = fleet.scratch("host-7-pki");
    let t = token("agent", "host-7", "1h");
    let out = enroll(AGENT, &url, &t, &pki, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let key = pki.join("host-7.key");
    let mode = std::fs::metadata(&key).expect("key").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let cert = std::fs::read(pki.join("host-7.crt")).expect("cert");
    let der = bulwark_common::tls::parse_certs_pem(&cert).expect("pem");
    let uri = bulwark_common::tls::spiffe_uri(der[0].as_ref()).expect("uri");
    assert!(uri.ends_with("/agent/host-7"), "{uri}");
    assert_eq!(
        std::fs::read(pki.join("ca.crt")).expect("ca"),
        std::fs::read(fleet.pki().ca()).expect("fleet ca")
    );

    // The same token again: refused, and nothing written.
    let again = fleet.scratch("again");
    let out = enroll(AGENT, &url, &t, &again, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already used"), "{}", stderr(&out));
    assert!(!again.join("host-7.key").exists());
    // A node's token at an agent: refused.
    let out = enroll(AGENT, &url, &token("node", "node-7", "1h"), &again, &[]);
    assert!(stderr(&out).contains("is for a node"), "{}", stderr(&out));
    // Expired.
    let short = token("agent", "host-8", "1s");
    std::thread::sleep(Duration::from_millis(1500));
    let out = enroll(AGENT, &url, &short, &again, &[]);
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));
    // A forged fingerprint: the host does not trust the server.
    let good = token("agent", "host-9", "1h");
    let forged = format!(
        "{}.{}",
        &good[..good.rfind('.').expect("dot")],
        "0".repeat(64)
    );
    let out = enroll(AGENT, &url, &forged, &again, &[]);
    assert!(stderr(&out).contains("fingerprint"), "{}", stderr(&out));
    // Not a token at all.
    let out = enroll(AGENT, &url, "hello", &again, &[]);
    assert!(!out.status.success());
    // The forged attempt did not use up the real token.
    let out = enroll(AGENT, &url, &good, &again, &[]);
    assert!(out.status.success(), "{}", stderr(&out));

    // A node's names come from its token (the admin's word), not from the node.
    let npki = fleet.scratch("node-7-pki");
    let node_token = json_str(
        &fleet.cli_json(&[
            "token",
            "create",
            "--role",
            "node",
            "--name",
            "node-7",
            "--ttl",
            "1h",
            "--dns",
            "localhost",
            "--ip",
            "127.0.0.1",
            "--json",
        ]),
        "token",
    );
    let out = enroll(NODE, &url, &node_token, &npki, &["--dns", "evil.example"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("come from its token"),
        "{}",
        stderr(&out)
    );
    let out = enroll(NODE, &url, &node_token, &npki, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let nder = bulwark_common::tls::parse_certs_pem(
        &std::fs::read(npki.join("node-7.crt")).expect("node cert"),
    )
    .expect("pem");
    let (dns, ips) = bulwark_common::tls::dns_and_ip_sans(nder[0].as_ref());
    assert_eq!(
        (dns, ips),
        (vec!["localhost".to_string()], vec!["127.0.0.1".to_string()])
    );

    // The enrolled agent runs, renews at once (renew_before is longer than the
    // certificate's life), and keeps syncing with the new certificate, no restart.
    let dir = fleet.scratch("host-7");
    let volume = dir.join("vol.img");
    bulwark_tests::write_random_file(&volume, 4 * MIB);
    let agent_toml = dir.join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "name = \"host-7\"\ncoordinator = \"{}\"\nstate_dir = \"{}\"\n\n[[sources]]\nname = \"host-7-data\"\nkind = \"volume\"\npath = \"{}\"\n\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nrenew_before = \"400d\"\n",
            fleet.coordinator_url(),
            dir.join("state").display(),
            volume.display(),
            pki.join("ca.crt").display(),
            pki.join("host-7.crt").display(),
            key.display(),
        ),
    )
    .expect("agent.toml");
    let mut agent = Daemon::new(
        "host-7",
        bins::bin(AGENT),
        agent_toml,
        fleet.root().join("logs").join("host-7.log"),
        None,
    );
    agent.start();
    fleet.wait_agents_connected(&["host-7".to_string()]);
    poll("the certificate renewed", Duration::from_secs(30), || {
        let now = std::fs::read(pki.join("host-7.crt")).map_err(|e| e.to_string())?;
        if now != cert {
            Ok(())
        } else {
            Err("still the enrolled certificate".into())
        }
    });
    assert!(agent.log_text().contains("certificate renewed"));
    let r = fleet.sync("host-7-data");
    assert_eq!(bulwark_tests::json_u64(&r, "bytes_sent"), 4 * MIB, "{r}");
    agent.assert_alive();
    agent.stop();
}
