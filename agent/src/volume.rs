//! A protected volume: a regular file or a block device, read (and, for restores,
//! written) at byte offsets.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

/// A volume opened for reading.
pub struct Volume {
    file: File,
    path: PathBuf,
    size_bytes: u64,
}

impl Volume {
    /// Opens a regular file or block device read-only and learns its size.
    pub fn open(path: &Path) -> std::io::Result<Volume> {
        let mut file = File::open(path)?;
        let meta = file.metadata()?;
        let ft = meta.file_type();
        let size_bytes = if ft.is_block_device() {
            file.seek(SeekFrom::End(0))?
        } else if ft.is_file() {
            meta.len()
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        };
        Ok(Volume {
            file,
            path: path.to_path_buf(),
            size_bytes,
        })
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fills `buf` from `offset`; a volume that shrank underneath is an error.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}
