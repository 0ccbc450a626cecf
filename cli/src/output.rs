//! How every command prints: aligned tables whose cells are escaped, `--json` as
//! pretty JSON, and the small words and figures shared by several commands.

use bulwark_common::point::PointKind;
use clap::Args;
use serde_json::Value;

/// The flags of a plain listing.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Prints rows as aligned columns under a header.
/// Prints rows under a header. Every cell is escaped: agents and nodes choose
/// much of what is shown (errors, warnings, tracker names, versions), and a
/// hostile one must not reach the admin's terminal with control sequences.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| bulwark_common::text::escape(c)).collect())
        .collect();
    let rows = &rows;
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<w$}", c, w = widths[i]))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// Prints a listing: a JSON array with `--json`, else a table.
pub fn listing<T>(
    items: &[T],
    json: bool,
    header: &[&str],
    to_json: impl Fn(&T) -> Value,
    to_row: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<()> {
    if json {
        print_json(&Value::Array(items.iter().map(to_json).collect()))
    } else {
        table(header, &items.iter().map(to_row).collect::<Vec<_>>());
        Ok(())
    }
}

/// `-` for an empty cell.
pub fn dash_if_empty(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// Prints `v` as pretty JSON on standard output.
pub fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// The word for a point's kind (`full`, `incremental`, `log`, ...).
pub fn kind_word(kind: i32) -> &'static str {
    PointKind::from_proto(kind).map_or("unknown", PointKind::as_str)
}

/// A measured duration for people: `850 ms`, `12.3 s`.
pub fn format_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}
