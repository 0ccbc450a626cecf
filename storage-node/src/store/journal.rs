//! The journal: a sync's new blocks, in the delta record format, until the point is settled.

use std::path::{Path, PathBuf};

pub(super) fn journal_path(dir: &Path) -> PathBuf {
    dir.join("journal")
}
