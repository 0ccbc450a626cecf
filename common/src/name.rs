//! Names of data sources, agents, nodes and groups: one safe path component each.
//!
//! A storage node builds the path of a source's folder from its name
//! (`<disk>/bulwark/<source>/`), an agent names its tracker files after its sources,
//! and the coordinator keys its records by them. A name an agent or node sends is
//! hostile input: `..` would put a replica in the pool disk's root, `deltas` or
//! `a.import` would collide with the node's own folders. So every name crosses the
//! API edge once, through [`Name::parse`] (or `TryFrom`), into one of the newtypes
//! below, and paths on disk are built only from those.
//!
//! The rule: 1 to [`MAX_LEN`] bytes of ASCII letters, digits, `-`, `_` and `.`;
//! starting with a letter or digit (so no `.`, `..` or hidden files) and not
//! ending with `.`; not one of the [`RESERVED`] folder and file names of the node
//! and agent (in any case), and not ending in one of the [`RESERVED_SUFFIXES`] of
//! their temporary files.

use std::fmt;
use std::marker::PhantomData;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest name, in bytes.
pub const MAX_LEN: usize = 128;

/// Names the node and agent use for their own files and folders beside, or
/// inside, the folders named after sources.
pub const RESERVED: &[&str] = &[
    "bulwark",
    "deltas",
    "journal",
    "logs",
    "replica",
    "digests",
    "meta",
    "registry",
    "trackers",
    "snapshots",
    "staging",
    "tmp",
    "lost+found",
];

/// Suffixes of the node's and agent's temporary and staging files.
pub const RESERVED_SUFFIXES: &[&str] = &[
    ".import",
    ".merge",
    ".delta",
    ".tmp",
    ".partial",
    ".bulwark-partial",
    ".bulwark-new",
    ".bulwark-tmp",
    ".bitmap",
    ".era",
    ".snap",
    ".lock",
    ".sock",
];

/// What a name was refused for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} name \"{shown}\": {why}")]
pub struct NameError {
    pub kind: &'static str,
    /// The name as given, with control characters escaped and cut to a sane length.
    pub shown: String,
    pub why: String,
}

/// Checks `name` against the rule in the module docs; `kind` names what it is for
/// the error ("data source", "agent", ...).
pub fn check(kind: &'static str, name: &str) -> Result<(), NameError> {
    let refuse = |why: String| NameError {
        kind,
        shown: crate::text::escape_short(name, 80),
        why,
    };
    if name.is_empty() {
        return Err(refuse("it is empty".into()));
    }
    if name.len() > MAX_LEN {
        return Err(refuse(format!(
            "it is {} bytes long, at most {MAX_LEN} are allowed",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || *c == '.'))
    {
        return Err(refuse(format!(
            "{} is not allowed (use letters, digits, '-', '_' and '.')",
            crate::text::describe_char(c)
        )));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(refuse("it must start with a letter or a digit".into()));
    }
    if name.ends_with('.') {
        return Err(refuse("it must not end with '.'".into()));
    }
    let lower = name.to_ascii_lowercase();
    if RESERVED.contains(&lower.as_str()) {
        return Err(refuse(format!(
            "\"{name}\" is reserved for the node's and agent's own folders"
        )));
    }
    if let Some(s) = RESERVED_SUFFIXES.iter().find(|s| lower.ends_with(*s)) {
        return Err(refuse(format!(
            "names ending in \"{s}\" are reserved for temporary files"
        )));
    }
    Ok(())
}

/// Whether `name` is valid (see [`check`]).
pub fn is_valid(name: &str) -> bool {
    check("", name).is_ok()
}

/// What a [`Name`] names: only a word for errors.
pub trait NameKind: Copy + Eq + Ord + std::hash::Hash + Send + Sync + 'static {
    /// "data source", "agent", ...
    const WORD: &'static str;
}

/// A checked name of kind `K` (see the module docs). Derefs to `str`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name<K: NameKind> {
    value: String,
    kind: PhantomData<K>,
}

impl<K: NameKind> Name<K> {
    /// Parses a name received from elsewhere.
    pub fn parse(s: impl Into<String>) -> Result<Self, NameError> {
        let value = s.into();
        check(K::WORD, &value)?;
        Ok(Name {
            value,
            kind: PhantomData,
        })
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// The name, owned.
    pub fn into_string(self) -> String {
        self.value
    }
}

impl<K: NameKind> std::ops::Deref for Name<K> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.value
    }
}

impl<K: NameKind> AsRef<str> for Name<K> {
    fn as_ref(&self) -> &str {
        &self.value
    }
}

impl<K: NameKind> AsRef<[u8]> for Name<K> {
    fn as_ref(&self) -> &[u8] {
        self.value.as_bytes()
    }
}

impl<K: NameKind> AsRef<std::path::Path> for Name<K> {
    fn as_ref(&self) -> &std::path::Path {
        std::path::Path::new(&self.value)
    }
}

impl<K: NameKind> std::borrow::Borrow<str> for Name<K> {
    fn borrow(&self) -> &str {
        &self.value
    }
}

impl<K: NameKind> fmt::Display for Name<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.value)
    }
}

impl<K: NameKind> fmt::Debug for Name<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.value)
    }
}

impl<K: NameKind> PartialEq<str> for Name<K> {
    fn eq(&self, other: &str) -> bool {
        self.value == other
    }
}

impl<K: NameKind> PartialEq<&str> for Name<K> {
    fn eq(&self, other: &&str) -> bool {
        self.value == *other
    }
}

impl<K: NameKind> PartialEq<String> for Name<K> {
    fn eq(&self, other: &String) -> bool {
        &self.value == other
    }
}

impl<K: NameKind> TryFrom<String> for Name<K> {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Name::parse(s)
    }
}

impl<K: NameKind> TryFrom<&str> for Name<K> {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, NameError> {
        Name::parse(s)
    }
}

impl<K: NameKind> std::str::FromStr for Name<K> {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Name::parse(s)
    }
}

impl<K: NameKind> From<Name<K>> for String {
    fn from(n: Name<K>) -> String {
        n.value
    }
}

impl<K: NameKind> Serialize for Name<K> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.value)
    }
}

/// A stored name is checked again when it is read: a record written before the
/// rule existed (or tampered with) fails to decode, naming the name.
impl<'de, K: NameKind> Deserialize<'de> for Name<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Name::parse(s).map_err(serde::de::Error::custom)
    }
}

macro_rules! name_kind {
    ($kind:ident, $alias:ident, $word:literal) => {
        #[doc = concat!("Marks a ", $word, " name.")]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $kind;
        impl NameKind for $kind {
            const WORD: &'static str = $word;
        }
        #[doc = concat!("A checked ", $word, " name.")]
        pub type $alias = Name<$kind>;
    };
}

name_kind!(SourceKindMarker, SourceName, "data source");
name_kind!(AgentKindMarker, AgentName, "agent");
name_kind!(NodeKindMarker, NodeName, "node");
name_kind!(GroupKindMarker, GroupName, "group");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_refused_with_a_reason() {
        for (bad, why) in [
            ("", "empty"),
            (".", "start with a letter"),
            ("..", "start with a letter"),
            (".x", "start with a letter"),
            ("-x", "start with a letter"),
            ("a/b", "'/'"),
            ("a\0b", "NUL"),
            ("a\x1b[2Jb", "escape"),
            ("a b", "space"),
            ("deltas", "reserved"),
            ("Journal", "reserved"),
            ("logs", "reserved"),
            ("a.import", "\".import\""),
            ("x.merge", "\".merge\""),
            ("x.", "end with"),
            ("é", "not allowed"),
        ] {
            let e = SourceName::parse(bad).expect_err(bad);
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
            assert!(e.to_string().starts_with("invalid data source name"), "{e}");
            assert!(!e.to_string().contains('\0') && !e.to_string().contains('\x1b'));
        }
        let long = "a".repeat(MAX_LEN + 1);
        assert!(SourceName::parse(long).is_err());
    }

    #[test]
    fn ordinary_names_pass() {
        for good in [
            "host-1-data",
            "a",
            "db.wal",
            "A_B-c.9",
            &"a".repeat(MAX_LEN),
        ] {
            let n = SourceName::parse(good).expect(good);
            assert_eq!(n.as_str(), good);
            assert_eq!(n.to_string(), good);
        }
    }

    #[test]
    fn stored_names_are_checked_when_read() {
        let ok: SourceName = serde_json::from_str("\"host-1\"").expect("valid");
        assert_eq!(ok, "host-1");
        let bad = serde_json::from_str::<SourceName>("\"..\"").expect_err("refused");
        assert!(
            bad.to_string().contains("invalid data source name"),
            "{bad}"
        );
        assert_eq!(serde_json::to_string(&ok).expect("encode"), "\"host-1\"");
    }
}
