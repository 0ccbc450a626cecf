//! Wall-clock helpers: Unix milliseconds on the wire, RFC 3339 for people.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// RFC 3339 (UTC, millisecond precision) of Unix milliseconds; empty for 0.
pub fn rfc3339_ms(ms: i64) -> String {
    if ms == 0 {
        return String::new();
    }
    let nanos = i128::from(ms) * 1_000_000;
    match ::time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => t
            .format(&::time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// A duration for people, in the largest whole unit: `30d`, `12h`, `90s`, `250ms`.
pub fn format_duration_ms(ms: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1000, "s"),
    ];
    for (unit, word) in UNITS {
        if ms >= unit && ms.is_multiple_of(unit) {
            return format!("{}{word}", ms / unit);
        }
    }
    if ms >= 1000 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Unix milliseconds of an RFC 3339 time (`2026-12-02T15:04:05Z`,
/// `2026-12-02T16:04:05.250+01:00`).
pub fn parse_rfc3339_ms(s: &str) -> Result<i64, String> {
    let t =
        ::time::OffsetDateTime::parse(s.trim(), &::time::format_description::well_known::Rfc3339)
            .map_err(|e| {
            format!("\"{s}\" is not an RFC 3339 time such as 2026-12-02T15:04:05Z: {e}")
        })?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("\"{s}\" is out of range"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_for_people() {
        use super::format_duration_ms as f;
        assert_eq!(f(30 * 86_400_000), "30d");
        assert_eq!(f(36 * 3_600_000), "36h");
        assert_eq!(f(90_000), "90s");
        assert_eq!(f(120_000), "2m");
        assert_eq!(f(1500), "1s");
        assert_eq!(f(250), "250ms");
    }

    use super::*;

    #[test]
    fn parses_rfc3339() {
        assert_eq!(
            parse_rfc3339_ms("2023-11-14T22:13:20.123Z"),
            Ok(1_700_000_000_123)
        );
        assert_eq!(
            parse_rfc3339_ms("2023-11-14T23:13:20.123+01:00"),
            Ok(1_700_000_000_123)
        );
        assert!(parse_rfc3339_ms("yesterday").is_err());
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339_ms(0), "");
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
