//! `bulwark-coordinator migrate --from sled:DIR --to etcd:URL[,URL...]`: copies a
//! stopped coordinator's sled state into an empty etcd prefix, so the fleet can run
//! several coordinators over etcd (issue 25).
//!
//! Rules:
//! - Every tree the sled database (`DIR/registry`) holds is copied, except sled's
//!   own default tree, so a tree added later is not forgotten; keys and values are
//!   copied byte for byte (etcd key `<prefix>/<tree>/<key>`, as [`EtcdState`] lays
//!   them out).
//! - The source must not be in use: sled locks its database, and a locked one
//!   (a coordinator still running on it) is refused.
//! - The target prefix must hold nothing (commit markers aside): a prefix with
//!   state is refused, naming some of its keys.
//! - Commits hold at most [`MAX_TXN_OPS`] keys (and about 1 MiB), each key
//!   conditioned on being absent, so a writer that appears during the copy makes it
//!   fail rather than mix.
//! - Afterwards every tree is read back from etcd and compared, key by key and
//!   value by value, with the sled tree.
//!
//! The CRL files (`crl.der`, `crl.pem`) in the data directory are not state: a
//! coordinator holding the CA key (`[enrollment] ca_key`) writes them from the
//! revocation list in the state at every start and change, and a follower at each
//! change it reads from etcd.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::state::etcd::{EtcdOptions, EtcdTls};
use crate::state::{EtcdState, MAX_TXN_OPS, StateStore, TreeName, Txn};

/// The most value bytes in one commit (etcd refuses requests over 1.5 MiB by
/// default, `--max-request-bytes`).
const MAX_TXN_BYTES: usize = 1024 * 1024;

/// How many of the keys already in the target a refusal names.
const SHOW_KEYS: i64 = 5;

/// What to copy where.
#[derive(Debug, Clone)]
pub struct Migration {
    /// The coordinator's `data_dir` (the sled database is `data_dir/registry`).
    pub data_dir: PathBuf,
    /// The target cluster, prefix and TLS.
    pub etcd: EtcdOptions,
}

/// What was copied of one tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeCopied {
    pub tree: String,
    pub keys: usize,
    pub bytes: usize,
}

/// Parses `--from sled:DIR`.
pub fn parse_from(s: &str) -> Result<PathBuf, String> {
    match s.strip_prefix("sled:") {
        Some(dir) if !dir.is_empty() => Ok(PathBuf::from(dir)),
        _ => Err(format!(
            "--from \"{s}\": expected sled:DIR, DIR being the coordinator's data_dir"
        )),
    }
}

/// Parses `--to etcd:URL[,URL...]` with the TLS files into the target's options.
pub fn parse_to(
    s: &str,
    prefix: &str,
    tls: Option<EtcdTls>,
    timeout: Duration,
) -> Result<EtcdOptions, String> {
    let Some(list) = s.strip_prefix("etcd:") else {
        return Err(format!(
            "--to \"{s}\": expected etcd:URL[,URL...] (e.g. etcd:https://10.0.0.1:2379)"
        ));
    };
    let endpoints: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(String::from)
        .collect();
    if endpoints.is_empty() {
        return Err(format!("--to \"{s}\": no etcd endpoint"));
    }
    for e in &endpoints {
        let rest = e
            .strip_prefix("https://")
            .or_else(|| e.strip_prefix("http://"));
        match rest {
            Some(hp) if !hp.is_empty() && !hp.contains('/') => {}
            _ => {
                return Err(format!(
                    "--to: endpoint \"{e}\" is not http://host:port or https://host:port"
                ));
            }
        }
        if e.starts_with("https://") && tls.is_none() {
            return Err(format!(
                "--to: endpoint \"{e}\" is https: give --ca, --cert and --key"
            ));
        }
        if e.starts_with("http://") && tls.is_some() {
            return Err(format!(
                "--to: endpoint \"{e}\" is plain http but TLS files were given: use https://"
            ));
        }
    }
    if !prefix.starts_with('/')
        || prefix.len() < 2
        || prefix.ends_with('/')
        || prefix.contains("//")
        || !prefix.chars().all(|c| c.is_ascii_graphic())
    {
        return Err(format!(
            "--prefix \"{prefix}\" is not a key prefix like \"/bulwark\" (starts with /, no trailing /, printable ASCII)"
        ));
    }
    Ok(EtcdOptions {
        endpoints,
        prefix: prefix.to_string(),
        tls,
        timeout,
    })
}

/// Opens the stopped coordinator's sled database, refusing a missing or locked one.
fn open_sled(data_dir: &Path) -> anyhow::Result<sled::Db> {
    let path = data_dir.join("registry");
    if !path.join("db").exists() && !path.join("conf").exists() {
        anyhow::bail!(
            "no sled state at {} (give --from sled:DIR with DIR the coordinator's data_dir)",
            path.display()
        );
    }
    sled::Config::new().path(&path).open().map_err(|e| {
        let m = e.to_string();
        if m.contains("could not acquire lock") || m.contains("WouldBlock") {
            anyhow::anyhow!(
                "the sled database {} is locked: a coordinator is running on it; stop it \
                 first (the copy must be of a state nobody changes)",
                path.display()
            )
        } else {
            anyhow::anyhow!("cannot open the sled database {}: {m}", path.display())
        }
    })
}

/// The trees to copy: every tree but sled's default one, by name.
fn tree_names(db: &sled::Db) -> anyhow::Result<Vec<String>> {
    let default = db.name();
    let mut out = Vec::new();
    for n in db.tree_names() {
        if n == default {
            continue;
        }
        let name = std::str::from_utf8(&n)
            .ok()
            .filter(|s| {
                !s.is_empty()
                    && *s != "_txn"
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            })
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "the sled database has a tree named {:?}, not a state tree name (ASCII \
                     letters, digits, _ and -): nothing was copied",
                    String::from_utf8_lossy(&n)
                )
            })?;
        out.push(name.to_string());
    }
    out.sort();
    Ok(out)
}

/// A tree name for the state API, which takes names that live as long as the
/// program: the handful of names of one migration, leaked once.
fn static_name(name: &str) -> TreeName {
    Box::leak(name.to_string().into_boxed_str())
}

/// Refuses a target prefix that already holds state.
fn check_empty(etcd: &EtcdState, prefix: &str) -> anyhow::Result<()> {
    let (count, keys) = etcd.keys_in_prefix(SHOW_KEYS)?;
    if count == 0 {
        return Ok(());
    }
    let shown: Vec<String> = keys
        .iter()
        .map(|k| bulwark_common::text::escape(&String::from_utf8_lossy(k)).to_string())
        .collect();
    anyhow::bail!(
        "the etcd prefix {prefix} already holds {count} key(s) ({}{}): nothing was copied. \
         Migrate into an empty prefix (--prefix /another), or, if that state is not \
         wanted, stop every coordinator using it and delete it (etcdctl del --prefix \
         {prefix}/)",
        shown.join(", "),
        if count > SHOW_KEYS { ", ..." } else { "" }
    )
}

/// Copies one tree in commits of at most [`MAX_TXN_OPS`] keys and
/// [`MAX_TXN_BYTES`] bytes, each key required absent.
fn copy_tree(
    etcd: &EtcdState,
    name: TreeName,
    entries: &[(Vec<u8>, Vec<u8>)],
) -> anyhow::Result<()> {
    let mut rest = entries;
    while !rest.is_empty() {
        let mut n = 0;
        let mut bytes = 0;
        while n < rest.len() && n < MAX_TXN_OPS {
            let size = rest[n].0.len() + rest[n].1.len();
            if n > 0 && bytes + size > MAX_TXN_BYTES {
                break;
            }
            bytes += size;
            n += 1;
        }
        let (batch, after) = rest.split_at(n);
        let txn = batch.iter().fold(Txn::new(), |t, (k, v)| {
            t.when(name, k.clone(), None)
                .put(name, k.clone(), v.clone())
        });
        if !etcd.commit(txn)? {
            anyhow::bail!(
                "copying tree {name}: a key was written in etcd by someone else during the \
                 copy (is a coordinator running on this prefix?); stop it, delete the \
                 prefix and migrate again"
            );
        }
        rest = after;
    }
    Ok(())
}

/// Reads `name` back from etcd and compares it with what sled holds.
fn verify_tree(
    etcd: &EtcdState,
    name: TreeName,
    entries: &[(Vec<u8>, Vec<u8>)],
) -> anyhow::Result<()> {
    let copied = etcd.scan(name, b"")?;
    if copied.len() != entries.len() {
        anyhow::bail!(
            "verify: tree {name} holds {} key(s) in etcd, {} in sled",
            copied.len(),
            entries.len()
        );
    }
    for ((ek, ev), (sk, sv)) in copied.iter().zip(entries) {
        if ek != sk || ev != sv {
            anyhow::bail!(
                "verify: tree {name} differs at key {} (etcd) / {} (sled)",
                String::from_utf8_lossy(ek),
                String::from_utf8_lossy(sk)
            );
        }
    }
    Ok(())
}

/// Runs the migration (see the module docs); blocks. Returns what was copied per
/// tree, verified.
pub fn run(m: &Migration) -> anyhow::Result<Vec<TreeCopied>> {
    let db = open_sled(&m.data_dir)?;
    let names = tree_names(&db)?;
    let etcd = EtcdState::connect(&m.etcd)?;
    check_empty(&etcd, &m.etcd.prefix)?;
    let mut report = Vec::new();
    for name in names {
        let tree = db
            .open_tree(&name)
            .map_err(|e| anyhow::anyhow!("sled: cannot open tree {name}: {e}"))?;
        let entries = tree
            .iter()
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("sled: cannot read tree {name}: {e}"))?;
        let tree_name = static_name(&name);
        copy_tree(&etcd, tree_name, &entries)?;
        verify_tree(&etcd, tree_name, &entries)?;
        report.push(TreeCopied {
            tree: name,
            keys: entries.len(),
            bytes: entries.iter().map(|(k, v)| k.len() + v.len()).sum(),
        });
    }
    Ok(report)
}

/// The text `migrate` prints on success.
pub fn summary(m: &Migration, report: &[TreeCopied]) -> String {
    let mut out = format!(
        "copied {} into etcd {} prefix {}\n",
        m.data_dir.join("registry").display(),
        m.etcd.endpoints.join(","),
        m.etcd.prefix
    );
    for t in report {
        out.push_str(&format!(
            "  {:<12} {:>8} keys {:>12} bytes  verified\n",
            t.tree, t.keys, t.bytes
        ));
    }
    let keys: usize = report.iter().map(|t| t.keys).sum();
    out.push_str(&format!(
        "  {:<12} {keys:>8} keys, every key and value read back and compared\n",
        "total"
    ));
    out.push_str(
        "next: in each coordinator's coordinator.toml set [state] backend = \"etcd\" with these \
         endpoints and prefix and its own advertise URL, then start them. The sled copy is left \
         as it was (keep it until the etcd fleet runs). crl.der/crl.pem in data_dir are not \
         copied: a coordinator with [enrollment] ca_key writes them from the state at start.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arguments_are_checked_and_say_what_is_wrong() {
        assert_eq!(
            parse_from("sled:/var/lib/c"),
            Ok(PathBuf::from("/var/lib/c"))
        );
        assert!(
            parse_from("/var/lib/c")
                .expect_err("refused")
                .contains("sled:DIR")
        );
        let t = Duration::from_secs(5);
        let o = parse_to("etcd:http://a:1, http://b:2", "/bulwark", None, t).expect("ok");
        assert_eq!(o.endpoints, vec!["http://a:1", "http://b:2"]);
        assert!(
            parse_to("http://a:1", "/b", None, t)
                .expect_err("refused")
                .contains("etcd:URL")
        );
        assert!(
            parse_to("etcd:", "/b", None, t)
                .expect_err("refused")
                .contains("no etcd endpoint")
        );
        assert!(
            parse_to("etcd:https://a:1", "/b", None, t)
                .expect_err("refused")
                .contains("--ca")
        );
        assert!(
            parse_to("etcd:ftp://a", "/b", None, t)
                .expect_err("refused")
                .contains("ftp://a")
        );
        for bad in ["bulwark", "/", "/b/", "/a//b"] {
            assert!(
                parse_to("etcd:http://a:1", bad, None, t)
                    .expect_err("refused")
                    .contains("--prefix")
            );
        }
    }

    #[test]
    fn a_missing_database_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = open_sled(dir.path()).expect_err("nothing there");
        assert!(e.to_string().contains("no sled state at"), "{e}");
        assert!(
            !dir.path().join("registry").exists(),
            "migrate created a database"
        );
    }
}
