//! The fleet's revocation list, kept by the coordinator (`bulwark revoke ROLE
//! NAME`, `bulwark revocations`).
//!
//! An entry revokes an identity (role and name) as of a moment: every certificate
//! of that identity whose notBefore is at or before it is refused, so a certificate
//! issued for the name later (enrollment with a token made after the revocation)
//! works again; the coordinator's own signing never dates one back past it
//! (`crate::enroll`). The entry also lists the serial numbers of that identity's
//! certificates the coordinator knows of: those it issued (enrollment, renewal) and
//! those it saw presented (the access layer reports every caller's certificate to
//! [`RevocationStore::note_certificate`]). Those serials make the X.509 CRL, signed
//! by the fleet CA when the coordinator holds its key (`[enrollment] ca_key`), and
//! written to `data_dir/crl.der` and `data_dir/crl.pem` at every change and start.
//!
//! State: the tree `revocations` of the registry's state store, JSON records with a format
//! version `v`: `id/<role>/<name>` (the entries), `serial/<role>/<name>/<hex>`
//! (certificates known), `version` (counts up with every change; also the CRL
//! number). The version is at least the time of the change in Unix ms, so it keeps
//! counting up even over a coordinator whose state was lost, and nodes and agents,
//! which take only a newer list, are never rolled back to an older one.
//!
//! The list in force is published to the coordinator's own TLS state (which cuts
//! the revoked identities' connections at once), to every connected agent on its
//! control stream, and to nodes in heartbeat answers.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use bulwark_common::pki::Signer;
use bulwark_common::revocation::{CertFacts, Revocations, serial_bytes};
use bulwark_common::time::{now_ms, rfc3339_ms};
use bulwark_common::tls::Role;
use bulwark_proto as pb;
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::registry::{Registry, RegistryError};
use crate::state::{StateError, StateStore, TreeName, Txn};

/// The state tree of the list.
pub const REVOCATIONS: TreeName = "revocations";

/// A revoked identity as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EntryRecord {
    v: u32,
    role: String,
    name: String,
    revoked_at_ms: i64,
    by: String,
    serials: Vec<String>,
}

/// A certificate the coordinator knows of.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SerialRecord {
    v: u32,
    not_before_ms: i64,
    first_seen_ms: i64,
    /// "issued" or "presented".
    how: String,
}

const FORMAT_VERSION: u32 = 1;
/// Serials remembered as seen, in memory, before the set starts again (each new one
/// costs a state read; the set only saves repeated reads).
const SEEN_CAP: usize = 100_000;

fn store_err(e: impl std::fmt::Display) -> Status {
    tracing::error!("revocation list: {e}");
    Status::internal(format!("revocation list: {e}"))
}

/// A failure of the state store, with the code of the one mapping
/// (`crate::error`): "not the leader" stays distinct from a store that fails.
fn state_err(e: StateError) -> Status {
    let st = Status::from(RegistryError::from(e));
    Status::new(st.code(), format!("revocation list: {}", st.message()))
}

fn entry_key(role: Role, name: &str) -> String {
    format!("id/{role}/{name}")
}

fn serial_prefix(role: Role, name: &str) -> String {
    format!("serial/{role}/{name}/")
}

/// The coordinator's revocation list (see the module docs).
pub struct RevocationStore {
    state: Arc<dyn StateStore>,
    signer: Option<Signer>,
    data_dir: PathBuf,
    tls: Arc<Revocations>,
    registry: Arc<Registry>,
    current: RwLock<pb::RevocationList>,
    seen: Mutex<HashSet<String>>,
    /// One change at a time (version, entries and CRL move together).
    // single-writer: the leader
    change: Mutex<()>,
}

impl std::fmt::Debug for RevocationStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RevocationStore(version {})", self.version())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RevocationStore {
    /// Opens the list in the registry's tree `revocations` and puts it in force in
    /// `tls` (the coordinator's own TLS state); `signer` (the CA key, when the
    /// coordinator has one) signs the CRL, written into `data_dir`.
    pub fn open(
        registry: Arc<Registry>,
        signer: Option<Signer>,
        data_dir: &Path,
        tls: Arc<Revocations>,
    ) -> Result<RevocationStore, String> {
        let store = RevocationStore {
            state: registry.state().clone(),
            signer,
            data_dir: data_dir.to_path_buf(),
            tls,
            registry,
            current: RwLock::new(pb::RevocationList::default()),
            seen: Mutex::new(HashSet::new()),
            change: Mutex::new(()),
        };
        {
            let _g = lock(&store.change);
            store.publish(None).map_err(|s| s.message().to_string())?;
        }
        let n = store.list().revocations.len();
        if n > 0 {
            tracing::info!(
                revoked = n,
                version = store.version(),
                "revocation list in force"
            );
        }
        Ok(store)
    }

    /// The list in force.
    pub fn list(&self) -> pb::RevocationList {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts in force a newer list another coordinator wrote into the shared state
    /// (with etcd, a follower learns the leader's revocations this way); returns
    /// whether it changed anything.
    pub fn refresh(&self) -> Result<bool, Status> {
        if self.stored_version()? <= self.version() {
            return Ok(false);
        }
        let _g = lock(&self.change);
        self.publish(None)?;
        Ok(true)
    }

    /// The list's version in the state store (0 = nothing was ever revoked).
    fn stored_version(&self) -> Result<u64, Status> {
        Ok(self
            .state
            .get(REVOCATIONS, b"version")
            .map_err(state_err)?
            .and_then(|v| serde_json::from_slice::<u64>(&v).ok())
            .unwrap_or(0))
    }

    /// Its version in force here (0 = nothing was ever revoked).
    pub fn version(&self) -> u64 {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .version
    }

    /// The list for a node that holds version `held`: `None` when it is current.
    pub fn for_version(&self, held: u64) -> Option<pb::RevocationList> {
        let list = self.list();
        (list.version != held).then_some(list)
    }

    /// When `role`/`name` was revoked, if it is.
    pub fn revoked_at(&self, role: Role, name: &str) -> Option<i64> {
        self.tls.snapshot().revoked_at(role, name)
    }

    /// Revokes every certificate of `role`/`name` issued up to now; `by` is the
    /// admin. Revoking an identity again moves its time to now.
    pub fn revoke(&self, role: &str, name: &str, by: &str) -> Result<pb::Revocation, Status> {
        let role: Role = role
            .parse()
            .map_err(|e: bulwark_common::pki::UnknownRole| {
                Status::invalid_argument(format!("cannot revoke: {e}"))
            })?;
        if !bulwark_common::pki::valid_name(name) {
            return Err(Status::invalid_argument(format!(
                "cannot revoke {role} {name:?}: not a valid name (letters, digits, '.', '-', '_')"
            )));
        }
        if role == Role::Admin && name == by {
            // The admin would lock itself out with nothing left to undo it.
            return Err(Status::failed_precondition(format!(
                "admin {by} cannot revoke its own certificate: revoke it with another admin's"
            )));
        }
        let _g = lock(&self.change);
        let now = now_ms();
        let mut serials: Vec<String> = self.known_serials(role, name, now)?;
        if let Some(old) = self.entry(role, name)? {
            serials.extend(old.serials);
        }
        serials.sort();
        serials.dedup();
        let rec = EntryRecord {
            v: FORMAT_VERSION,
            role: role.to_string(),
            name: name.to_string(),
            revoked_at_ms: now,
            by: by.to_string(),
            serials,
        };
        self.publish(Some(&rec))?;
        tracing::warn!(%role, name, by, serials = rec.serials.len(), "identity revoked: its certificates are refused and its connections cut");
        Ok(to_proto(rec))
    }

    /// Records a certificate the coordinator issued (`how` = "issued") or saw
    /// presented ("presented"). A certificate the list already revokes by identity
    /// but not yet by serial is added to the CRL.
    pub fn note_certificate(&self, f: &CertFacts, how: &str) {
        {
            let mut seen = lock(&self.seen);
            if seen.contains(&f.serial) {
                return;
            }
            if seen.len() >= SEEN_CAP {
                seen.clear();
            }
            seen.insert(f.serial.clone());
        }
        if let Err(e) = self.note(f, how) {
            tracing::warn!(caller = %f.identity, serial = %f.serial, "cannot record the certificate: {}", e.message());
        }
    }

    fn note(&self, f: &CertFacts, how: &str) -> Result<(), Status> {
        let (role, name) = (f.identity.role, f.identity.name.as_str());
        let key = format!("{}{}", serial_prefix(role, name), f.serial);
        if self
            .state
            .get(REVOCATIONS, key.as_bytes())
            .map_err(state_err)?
            .is_none()
        {
            let rec = SerialRecord {
                v: FORMAT_VERSION,
                not_before_ms: f.not_before_ms,
                first_seen_ms: now_ms(),
                how: how.to_string(),
            };
            // Durable on return: the CRL must be able to name what the coordinator
            // handed out. Only if still absent: the first sighting is kept.
            let txn = Txn::new().when(REVOCATIONS, key.as_bytes(), None).put(
                REVOCATIONS,
                key.as_bytes(),
                serde_json::to_vec(&rec).map_err(store_err)?,
            );
            self.state.commit(txn).map_err(state_err)?;
        }
        let Some(at) = self.revoked_at(role, name) else {
            return Ok(());
        };
        if f.not_before_ms > at {
            return Ok(());
        }
        let _g = lock(&self.change);
        if let Some(mut e) = self.entry(role, name)?
            && !e.serials.contains(&f.serial)
        {
            e.serials.push(f.serial.clone());
            self.publish(Some(&e))?;
        }
        Ok(())
    }

    /// Serials of `role`/`name` valid from `until_ms` or earlier.
    fn known_serials(&self, role: Role, name: &str, until_ms: i64) -> Result<Vec<String>, Status> {
        let prefix = serial_prefix(role, name);
        let mut out = Vec::new();
        for (k, v) in self
            .state
            .scan(REVOCATIONS, prefix.as_bytes())
            .map_err(state_err)?
        {
            let rec: SerialRecord = match serde_json::from_slice(&v) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("revocation list: unreadable serial record ignored: {e}");
                    continue;
                }
            };
            if rec.not_before_ms <= until_ms {
                out.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
            }
        }
        Ok(out)
    }

    fn entry(&self, role: Role, name: &str) -> Result<Option<EntryRecord>, Status> {
        self.state
            .get(REVOCATIONS, entry_key(role, name).as_bytes())
            .map_err(state_err)?
            .map(|v| serde_json::from_slice(&v).map_err(store_err))
            .transpose()
    }

    /// The write of `rec` added to `txn`.
    fn put_entry(txn: Txn, rec: &EntryRecord) -> Result<Txn, Status> {
        let role: Role = rec.role.parse().map_err(store_err)?;
        Ok(txn.put(
            REVOCATIONS,
            entry_key(role, &rec.name).as_bytes(),
            serde_json::to_vec(rec).map_err(store_err)?,
        ))
    }

    fn entries(&self) -> Result<Vec<EntryRecord>, Status> {
        let mut out = Vec::new();
        for (_, v) in self.state.scan(REVOCATIONS, b"id/").map_err(state_err)? {
            let rec: EntryRecord = serde_json::from_slice(&v).map_err(store_err)?;
            if rec.v != FORMAT_VERSION {
                return Err(store_err(format!(
                    "entry {}/{} has format version {}, this coordinator knows {FORMAT_VERSION}",
                    rec.role, rec.name, rec.v
                )));
            }
            out.push(rec);
        }
        out.sort_by(|a, b| {
            (a.revoked_at_ms, &a.role, &a.name).cmp(&(b.revoked_at_ms, &b.role, &b.name))
        });
        Ok(out)
    }

    /// Writes `changed` (an entry) with the version bumped, in one commit; then
    /// builds the list (and CRL) from the tree and puts it in force everywhere.
    /// Called under `change`.
    fn publish(&self, changed: Option<&EntryRecord>) -> Result<(), Status> {
        let stored = self.stored_version()?;
        let version = if let Some(entry) = changed {
            let v = (stored + 1).max(u64::try_from(now_ms()).unwrap_or(0));
            // The entry and the version move together, durable before anyone is
            // told (a commit is durable on return).
            let txn = Txn::new().put(
                REVOCATIONS,
                b"version".as_slice(),
                serde_json::to_vec(&v).map_err(store_err)?,
            );
            self.state
                .commit(RevocationStore::put_entry(txn, entry)?)
                .map_err(state_err)?;
            v
        } else {
            stored
        };
        let entries = self.entries()?;
        let crl_der = match &self.signer {
            Some(signer) => self.write_crl(signer, version, &entries)?,
            None => Vec::new(),
        };
        let list = pb::RevocationList {
            revocations: entries.into_iter().map(to_proto).collect(),
            crl_der: crl_der.into(),
            version,
        };
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = list.clone();
        self.tls.set(list.clone()).map_err(store_err)?;
        if changed.is_some() {
            self.registry
                .broadcast(crate::registry::Command::Revocations(list));
        }
        Ok(())
    }

    /// Signs the CRL and writes `crl.der` and `crl.pem` into the data directory.
    fn write_crl(
        &self,
        signer: &Signer,
        version: u64,
        entries: &[EntryRecord],
    ) -> Result<Vec<u8>, Status> {
        let mut revoked = Vec::new();
        for e in entries {
            for s in &e.serials {
                match serial_bytes(s) {
                    Some(b) => revoked.push((b, e.revoked_at_ms)),
                    None => tracing::warn!(
                        "revocation list: serial {s:?} of {}/{} is not hex; left out of the CRL",
                        e.role,
                        e.name
                    ),
                }
            }
        }
        let (der, pem) = signer
            .sign_crl(version, &revoked)
            .map_err(|e| store_err(format!("cannot sign the CRL: {e}")))?;
        for (file, bytes) in [("crl.der", der.as_slice()), ("crl.pem", pem.as_bytes())] {
            let path = self.data_dir.join(file);
            bulwark_common::keyfile::write_atomic(&path, bytes, 0o644).map_err(store_err)?;
        }
        Ok(der)
    }

    /// A critical alert `revoked/<node>` for every revoked node, naming the data
    /// sources it holds: they should be moved off it.
    pub fn node_alerts(&self, registry: &Registry) -> Vec<pb::Alert> {
        let list = self.list();
        let sources = registry.sources().unwrap_or_default();
        list.revocations
            .iter()
            .filter(|r| r.role == Role::Node.as_str())
            .map(|r| {
                let held: Vec<&str> = sources
                    .iter()
                    .filter(|s| s.node.as_deref() == Some(r.name.as_str()))
                    .map(|s| s.name.as_str())
                    .collect();
                let what = if held.is_empty() {
                    "it holds no data sources".to_string()
                } else {
                    format!("its data sources {} no longer take syncs there", held.join(", "))
                };
                pb::Alert {
                    key: format!("revoked/{}", r.name),
                    severity: "critical".into(),
                    subject: r.name.clone(),
                    message: format!(
                        "node {} was revoked at {} by {}: {what}; run `bulwark drain {}` to move them to other nodes, then retire it (a new certificate for the name makes it a node again)",
                        r.name,
                        rfc3339_ms(r.revoked_at_ms),
                        r.by,
                        r.name
                    ),
                    ..Default::default()
                }
            })
            .collect()
    }
}

fn to_proto(r: EntryRecord) -> pb::Revocation {
    pb::Revocation {
        role: r.role,
        name: r.name,
        revoked_at_ms: r.revoked_at_ms,
        by: r.by,
        serials: r.serials,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(with_ca: bool) -> (tempfile::TempDir, RevocationStore, Arc<Revocations>) {
        let dir = tempfile::tempdir().expect("tmp");
        bulwark_common::pki::init(&dir.path().join("pki"), "test.fleet").expect("ca");
        let (store, tls) = open(dir.path(), with_ca);
        (dir, store, tls)
    }

    fn open(dir: &Path, with_ca: bool) -> (RevocationStore, Arc<Revocations>) {
        let (crt, key) = bulwark_common::pki::ca_paths(&dir.join("pki"));
        let signer = with_ca.then(|| Signer::load(&crt, &key).expect("signer"));
        let registry = Arc::new(
            Registry::open(&dir.join("data"), std::time::Duration::from_secs(30))
                .expect("registry"),
        );
        let mut roots = rustls::RootCertStore::empty();
        let ca =
            bulwark_common::tls::parse_certs_pem(&std::fs::read(&crt).expect("ca")).expect("pem");
        roots.add(ca[0].clone()).expect("root");
        let tls = Arc::new(Revocations::new(Arc::new(roots), "test.fleet").expect("revs"));
        let store =
            RevocationStore::open(registry, signer, &dir.join("data"), tls.clone()).expect("store");
        (store, tls)
    }

    fn facts(name: &str, serial: &str, not_before_ms: i64) -> CertFacts {
        CertFacts {
            identity: bulwark_common::tls::Identity {
                role: Role::Agent,
                name: name.into(),
            },
            not_before_ms,
            not_after_ms: not_before_ms + 1000,
            serial: serial.into(),
        }
    }

    #[test]
    fn a_revocation_lists_known_serials_survives_a_reopen_and_signs_a_crl() {
        let (dir, store, tls) = setup(true);
        assert_eq!(store.version(), 0);
        let old = facts("a1", "0badcafe", now_ms() - 10_000);
        store.note_certificate(&old, "presented");
        let r = store.revoke("agent", "a1", "admin").expect("revoke");
        assert_eq!(r.serials, vec!["0badcafe".to_string()]);
        assert!(store.version() > 0);
        assert!(tls.snapshot().refusal(&old).is_some());
        // A certificate issued after the revocation is not revoked.
        let new = facts("a1", "1234", r.revoked_at_ms + 1000);
        assert!(tls.snapshot().refusal(&new).is_none());
        // The CRL on disk lists the serial.
        let der = std::fs::read(dir.path().join("data/crl.der")).expect("crl.der");
        assert_eq!(der, store.list().crl_der.to_vec());
        assert!(
            std::fs::read_to_string(dir.path().join("data/crl.pem"))
                .expect("crl.pem")
                .contains("BEGIN X509 CRL")
        );
        // A second known certificate dating from before the revocation joins it.
        let v = store.version();
        store.note_certificate(&facts("a1", "77", r.revoked_at_ms - 5000), "presented");
        assert!(store.version() > v);
        assert_eq!(store.list().revocations[0].serials, vec!["0badcafe", "77"]);
        // Bad input is refused, nothing changes.
        assert!(store.revoke("root", "a1", "admin").is_err());
        assert!(store.revoke("agent", "", "admin").is_err());
        assert!(store.revoke("agent", "../x", "admin").is_err());
        assert!(store.revoke("admin", "alice", "alice").is_err());
        assert_eq!(store.list().revocations.len(), 1);
        assert!(store.for_version(store.version()).is_none());
        assert!(store.for_version(0).is_some());
        // A restart keeps the list, its version and its CRL.
        let (version, list) = (store.version(), store.list());
        drop(store);
        let (store, tls) = open(dir.path(), true);
        assert_eq!(store.version(), version);
        assert_eq!(store.list().revocations, list.revocations);
        assert!(tls.snapshot().refusal(&old).is_some());
        assert!(tls.snapshot().crl_in_use());
    }

    #[test]
    fn without_the_ca_key_the_list_has_no_crl() {
        let (dir, store, tls) = setup(false);
        store.revoke("node", "n2", "admin").expect("revoke");
        assert!(store.list().crl_der.is_empty());
        assert!(!dir.path().join("data/crl.der").exists());
        assert!(tls.snapshot().revoked_at(Role::Node, "n2").is_some());
    }
}
