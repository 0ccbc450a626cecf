//! Config files as operators write them: TOML, unknown keys refused, sizes like
//! `64KiB` or `1.5GiB`, durations like `90s`, `15m`, `1h`. Every error names the file
//! and the key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, de};

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// An error about one key of a file, found after parsing (validation).
    pub fn invalid(path: &Path, key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Reads and parses a TOML config file into `T`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    parse(path, &text)
}

/// Parses TOML text that came from `path` (named in errors).
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: one_line(&e.to_string()),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let message = one_line(&e.inner().to_string());
        if key.is_empty() || key == "." {
            ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            }
        } else {
            ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                message,
            }
        }
    })
}

/// toml's messages carry a source snippet over several lines; keep the sentence.
fn one_line(s: &str) -> String {
    let lines: Vec<&str> = s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| "|^ ".contains(c)))
        .collect();
    lines.join(": ")
}

/// A size in bytes, written `65536`, `"64KiB"`, `"1.5GiB"`, `"500GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The number of bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

/// Parses `"64KiB"`, `"1.5 GiB"`, `"10MB"`, `"4096"`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), t[split..].trim());
    if num.is_empty() {
        return Err(format!(
            "invalid size \"{s}\": expected a number such as 64KiB or 1.5GiB"
        ));
    }
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000_u64.pow(2),
        "g" | "gb" => 1000_u64.pow(3),
        "t" | "tb" => 1000_u64.pow(4),
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "invalid size \"{s}\": unknown unit \"{unit}\" (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ));
        }
    };
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .ok_or_else(|| format!("invalid size \"{s}\": too large"));
    }
    let f: f64 = num
        .parse()
        .map_err(|_| format!("invalid size \"{s}\": \"{num}\" is not a number"))?;
    let bytes = f * mult as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("invalid size \"{s}\": too large"));
    }
    Ok(bytes.round() as u64)
}

/// Human form of a byte count: `64 KiB`, `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else if (v - v.round()).abs() < 0.05 {
        format!("{:.0} {}", v, UNITS[i])
    } else {
        format!("{:.1} {}", v, UNITS[i])
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 65536, \"64KiB\" or \"1.5GiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map(ByteSize).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

/// A duration, written `"90s"`, `"15m"`, `"1h"`, `"500ms"`, `"1d"` or whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

/// Parses `"90s"`, `"15m"`, `"1h"`, `"500ms"`, `"1d"`, `"1h30m"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("invalid duration \"\": expected e.g. 90s, 15m or 1h".into());
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "invalid duration \"{s}\": expected e.g. 90s, 15m or 1h"
            ));
        }
        let value: f64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration \"{s}\": bad number"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let secs = match unit {
            "ms" => value / 1000.0,
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            "d" => value * 86400.0,
            _ => {
                return Err(format!(
                    "invalid duration \"{s}\": unknown unit \"{unit}\" (use ms, s, m, h, d)"
                ));
            }
        };
        // A number beyond what a Duration holds (e.g. "1e400"-long digit runs, or a
        // sum of huge parts) is an error, not a panic (found by fuzz/ `config`).
        total = Duration::try_from_secs_f64(secs)
            .ok()
            .and_then(|d| total.checked_add(d))
            .ok_or_else(|| format!("invalid duration \"{s}\": too long"))?;
    }
    Ok(total)
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"90s\", \"15m\" or \"1h\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                Ok(HumanDuration(Duration::from_secs(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                u64::try_from(v)
                    .map(|s| HumanDuration(Duration::from_secs(s)))
                    .map_err(|_| E::custom(format!("invalid duration {v}: must not be negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                parse_duration(v).map(HumanDuration).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A retention table as written (`[sources.retention]` of agent.toml,
/// `[policy.min_retention]` of coordinator.toml); see [`crate::retention`].
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionToml {
    /// Keep this many newest points.
    #[serde(default)]
    pub keep: u32,
    /// Drop points older than this (never the newest).
    #[serde(default)]
    pub max_age: Option<HumanDuration>,
    /// Keep the newest point of this many hours / days / ISO weeks / months.
    #[serde(default)]
    pub hourly: u32,
    #[serde(default)]
    pub daily: u32,
    #[serde(default)]
    pub weekly: u32,
    #[serde(default)]
    pub monthly: u32,
}

impl RetentionToml {
    /// The policy it says.
    pub fn retention(&self) -> crate::retention::Retention {
        crate::retention::Retention {
            keep: self.keep,
            max_age_ms: self
                .max_age
                .map_or(0, |d| u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX)),
            hourly: self.hourly,
            daily: self.daily,
            weekly: self.weekly,
            monthly: self.monthly,
        }
    }
}

/// The `[tls]` table every daemon has: the fleet CA and this process's identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM file of the fleet CA certificate.
    pub ca: PathBuf,
    /// PEM certificate of this process, signed by the fleet CA.
    pub cert: PathBuf,
    /// PEM private key of `cert` (mode 0600).
    pub key: PathBuf,
    /// Nodes and agents renew their certificate through the coordinator (when it
    /// has `[enrollment]`) once less than this is left (`30d`). Optional; default:
    /// a third of the certificate's validity.
    #[serde(default)]
    pub renew_before: Option<HumanDuration>,
}

impl TlsFiles {
    /// Resolves relative paths against the directory of the config file.
    pub fn relative_to(mut self, config: &Path) -> Self {
        for p in [&mut self.ca, &mut self.cert, &mut self.key] {
            *p = resolve(config, p);
        }
        self
    }
}

/// A path from a config file: relative paths are relative to the file's directory.
pub fn resolve(config: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config.parent().unwrap_or(Path::new(".")).join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1.5GiB"), Ok(1_610_612_736));
        assert_eq!(parse_size("500GB"), Ok(500_000_000_000));
        assert_eq!(parse_size(" 2 MiB "), Ok(2 << 20));
        assert!(
            parse_size("12XB")
                .expect_err("bad unit")
                .contains("unknown unit")
        );
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("1..2GiB").is_err());
        assert_eq!(format_size(1536 << 20), "1.5 GiB");
        assert_eq!(format_size(512), "512 B");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("m").is_err());
        // Found by the `config` fuzz target: these panicked in Duration.
        let huge = format!("{}s", "9".repeat(400));
        assert_eq!(
            parse_duration(&huge),
            Err(format!("invalid duration \"{huge}\": too long"))
        );
        let sum = "10000000000000000000s10000000000000000000s";
        assert_eq!(
            parse_duration(sum),
            Err(format!("invalid duration \"{sum}\": too long"))
        );
        assert!(parse_duration("10999999999999999999999999999s").is_err());
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        name: String,
        disks: Vec<Disk>,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Disk {
        capacity: ByteSize,
    }

    #[test]
    fn errors_name_file_and_key() {
        let p = Path::new("/etc/x.toml");
        let e = parse::<Sample>(p, "name = \"a\"\n[[disks]]\ncapacity = \"12XB\"\n")
            .expect_err("bad size");
        let msg = e.to_string();
        assert!(msg.contains("/etc/x.toml"), "{msg}");
        assert!(msg.contains("disks[0].capacity"), "{msg}");
        assert!(msg.contains("12XB"), "{msg}");

        let e =
            parse::<Sample>(p, "name = \"a\"\ncolour = 3\ndisks = []\n").expect_err("unknown key");
        let msg = e.to_string();
        assert!(msg.contains("colour"), "{msg}");

        let e = parse::<Sample>(p, "disks = []\n").expect_err("missing key");
        assert!(e.to_string().contains("name"), "{e}");

        let e = load::<Sample>(Path::new("/nonexistent/bulwark.toml")).expect_err("missing file");
        assert!(e.to_string().contains("/nonexistent/bulwark.toml"), "{e}");
    }
}

/// `otlp_endpoint` and `metrics_listen`, checked (every daemon has them).
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    pub otlp_endpoint: Option<String>,
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl TelemetryConfig {
    /// Checks the two keys of the file at `path`.
    pub fn check(
        path: &Path,
        otlp_endpoint: Option<String>,
        metrics_listen: Option<String>,
    ) -> Result<TelemetryConfig, ConfigError> {
        if let Some(e) = &otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(ConfigError::invalid(
                path,
                "otlp_endpoint",
                format!("\"{e}\" is not a URL such as http://127.0.0.1:4317"),
            ));
        }
        let metrics_listen = metrics_listen
            .map(|a| {
                a.parse().map_err(|_| {
                    ConfigError::invalid(
                        path,
                        "metrics_listen",
                        format!("\"{a}\" is not an address:port such as 127.0.0.1:9464"),
                    )
                })
            })
            .transpose()?;
        Ok(TelemetryConfig {
            otlp_endpoint,
            metrics_listen,
        })
    }
}
