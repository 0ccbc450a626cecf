//! Progress on standard error while a long operation runs: [`show_progress`]
//! draws a figure that [`watch_progress`] feeds from the agent's reports (or
//! `bulwark export` from its own reads); [`end_progress`] stops it.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bulwark_common::config::format_size;
use bulwark_common::metrics::Progress;
use bulwark_proto as pb;

use crate::admin::Admin;

/// A progress bar with bytes, rate and time left, rewritten in place on a terminal;
/// a plain line every 10 seconds otherwise. Runs until aborted; nothing is shown
/// while `total` is 0 (not known yet).
pub async fn show_progress(label: String, progress: Arc<Progress>) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(10)
    };
    // The rate is measured from the first figure seen (a remote operation may have
    // started before this display).
    let mut first: Option<(Instant, u64)> = None;
    loop {
        tokio::time::sleep(every).await;
        let n = progress.done.load(Ordering::Relaxed);
        let total = progress.total.load(Ordering::Relaxed);
        if total == 0 {
            continue;
        }
        let (t0, n0) = *first.get_or_insert((Instant::now(), n));
        let secs = t0.elapsed().as_secs_f64().max(0.001);
        let rate = n.saturating_sub(n0) as f64 / secs;
        let left = if rate > 0.0 {
            format!("{:.0} s left", total.saturating_sub(n) as f64 / rate)
        } else {
            "-".into()
        };
        let frac = (n as f64 / total as f64).clamp(0.0, 1.0);
        let figures = format!(
            "{} of {} ({:.0}%), {}/s, {left}",
            format_size(n),
            format_size(total),
            frac * 100.0,
            format_size(rate as u64)
        );
        if tty {
            const WIDTH: usize = 24;
            let filled = (frac * WIDTH as f64).round() as usize;
            let bar = format!("{}{}", "#".repeat(filled), "-".repeat(WIDTH - filled));
            eprint!("\r{label} [{bar}] {figures:<60}");
        } else {
            eprintln!("{label}: {figures}");
        }
    }
}

/// Shows the progress the source's agent reports (through `sources`) while a
/// `--wait` runs; stop it with [`end_progress`].
pub fn watch_progress(admin: &Admin, op: &str, source: &str) -> tokio::task::JoinHandle<()> {
    let mut client = admin.client.clone();
    let source = source.to_string();
    let progress = Arc::new(Progress::default());
    let label = format!("{op} {source}");
    tokio::spawn(async move {
        // The display shows nothing until the first report gives a total.
        let display = show_progress(label, progress.clone());
        let poll = async {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Ok(r) = client.list_sources(pb::ListSourcesRequest {}).await else {
                    continue;
                };
                let found = r
                    .into_inner()
                    .sources
                    .into_iter()
                    .find(|x| x.name == source);
                let Some((p, size)) = found.and_then(|s| s.progress.map(|p| (p, s.size_bytes)))
                else {
                    continue;
                };
                let total = if p.total_bytes > 0 {
                    p.total_bytes
                } else {
                    size
                };
                progress.done.store(p.done_bytes, Ordering::Relaxed);
                progress.total.store(total, Ordering::Relaxed);
            }
        };
        tokio::select! {
            _ = display => {}
            _ = poll => {}
        }
    })
}

/// Stops a [`watch_progress`] display and ends its line on a terminal.
pub fn end_progress(shown: Option<tokio::task::JoinHandle<()>>) {
    if let Some(t) = shown {
        t.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
}
