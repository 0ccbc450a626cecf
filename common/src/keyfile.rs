//! Reading and writing the files a process keeps beside its keys (certificates,
//! keys, the revocation list) without being redirected: a file is created
//! exclusively and never through a symbolic link, a stale file is replaced only if
//! it is a regular file of this user, and a durable write goes through a temporary
//! file, fsync and rename. Enrollment and renewal (`enroll`) write with it; `tls`
//! reads a renewal's pending certificate with it. It imports no other module.

use std::path::{Path, PathBuf};

/// A key or certificate file that could not be read or written safely, and which.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot inspect {path}: {source}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} exists and is not a regular file (a symbolic link or directory): refusing to write through it; remove it by hand"
    )]
    NotRegular { path: PathBuf },
    #[error(
        "{path} exists and belongs to user {owner}, not to this process (user {me}): refusing to replace it"
    )]
    Foreign { path: PathBuf, owner: u32, me: u32 },
    #[error("cannot remove stale {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open {path} (not following links): {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a regular file of this user")]
    NotOurs { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot rename into {path}: {source}")]
    Rename {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where a renewal puts the new version of `path` before renaming it into place:
/// `PATH.bulwark-new` (a suffix, so a certificate and a key with the same stem
/// never share it).
pub fn pending_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".bulwark-new");
    PathBuf::from(p)
}

/// The effective user id of this process.
#[allow(unsafe_code)]
fn euid() -> u32 {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// Removes a file left at `path` by an earlier, interrupted write of ours: only a
/// regular file this user owns. Anything else there (a symbolic link someone
/// planted, a directory, another user's file) is refused, never followed.
fn remove_stale(path: &Path) -> Result<(), FileError> {
    use std::os::unix::fs::MetadataExt;
    let path_buf = || path.to_path_buf();
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(FileError::Inspect {
                path: path_buf(),
                source,
            });
        }
    };
    if !m.file_type().is_file() {
        return Err(FileError::NotRegular { path: path_buf() });
    }
    if m.uid() != euid() {
        return Err(FileError::Foreign {
            path: path_buf(),
            owner: m.uid(),
            me: euid(),
        });
    }
    std::fs::remove_file(path).map_err(|source| FileError::RemoveStale {
        path: path_buf(),
        source,
    })
}

/// Reads `path` if it is a regular file owned by this user, without following a
/// symbolic link; `None` if there is nothing there.
pub fn read_own_file(path: &Path) -> Result<Option<Vec<u8>>, FileError> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path_buf = || path.to_path_buf();
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FileError::Open {
                path: path_buf(),
                source,
            });
        }
    };
    let m = f.metadata().map_err(|source| FileError::Inspect {
        path: path_buf(),
        source,
    })?;
    if !m.file_type().is_file() || m.uid() != euid() {
        return Err(FileError::NotOurs { path: path_buf() });
    }
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(|source| FileError::Read {
        path: path_buf(),
        source,
    })?;
    Ok(Some(buf))
}

/// Writes `data` to the new file `path` (created with `mode`) and fsyncs it. A
/// stale file of ours is replaced; the file is created exclusively and never
/// through a symbolic link (`O_NOFOLLOW`), so a link planted beside the keys cannot
/// redirect a key or certificate elsewhere.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), FileError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    remove_stale(path)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(path)
        .map_err(|source| FileError::Create {
            path: path.to_path_buf(),
            source,
        })?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|source| FileError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// Renames `from` onto `to` (the error names `to`).
pub fn rename_into(from: &Path, to: &Path) -> Result<(), FileError> {
    std::fs::rename(from, to).map_err(|source| FileError::Rename {
        path: to.to_path_buf(),
        source,
    })
}

/// Writes `data` to `path` durably: a temporary file, fsync, rename (mode `mode`).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), FileError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".bulwark-tmp");
    let tmp = PathBuf::from(tmp);
    write_file(&tmp, data, mode)?;
    rename_into(&tmp, path)?;
    if let Some(dir) = path.parent() {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}
