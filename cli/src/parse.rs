//! Value parsers for clap: sizes, durations, times, times of day. Each wraps the
//! parser `bulwark_common` uses for the same words in config files, so a value
//! means the same on the command line and in a TOML file.

/// A size such as `20GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    bulwark_common::config::parse_size(s)
}

/// A moment in RFC 3339 (`2026-12-02T15:04:05Z`), as Unix milliseconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    bulwark_common::time::parse_rfc3339_ms(s)
}

/// A duration such as `15m` or `1d`, in milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    bulwark_common::config::parse_duration(s).map(|d| d.as_millis() as u64)
}

/// A time of day `HH:MM` (UTC), as minutes after midnight.
pub fn parse_time_of_day(s: &str) -> Result<u32, String> {
    let bad = || format!("invalid time of day {s:?}: expected HH:MM (UTC)");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}
