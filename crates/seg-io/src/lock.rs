//! Advisory folder locks: one process at a time writes a run or report folder.
//!
//! The lock is an exclusive OS file lock on `<folder>/.lock`, which also holds the holder's
//! process id for the message a second process gets. The operating system releases the lock
//! when its holder exits, however it exits (a killed run leaves no stale lock behind); the file
//! itself stays, and is reused by the next holder.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The name of the lock file inside a locked folder.
pub const LOCK_FILE: &str = ".lock";

/// An exclusive lock on a folder, held until dropped.
#[derive(Debug)]
pub struct FolderLock {
    file: File,
    path: PathBuf,
}

impl FolderLock {
    /// Creates `folder` if needed and locks it for this process.
    ///
    /// # Errors
    /// [`Error::Locked`] naming the folder and the holder's process id when another process
    /// holds it; [`Error::Io`] when the folder or its lock file cannot be created.
    pub fn acquire(folder: &Path) -> Result<FolderLock> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        fs::create_dir_all(folder).map_err(io(folder))?;
        let path = folder.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse::<u32>().ok());
                return Err(Error::Locked {
                    folder: folder.to_path_buf(),
                    holder,
                });
            }
            Err(TryLockError::Error(source)) => return Err(Error::Io { path, source }),
        }
        let pid = std::process::id().to_string();
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(pid.as_bytes()))
            .and_then(|()| file.flush())
            .map_err(io(&path))?;
        Ok(FolderLock { file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first makes it immediate.
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("run");
        let first = FolderLock::acquire(&folder).unwrap();
        assert_eq!(
            fs::read_to_string(first.path()).unwrap(),
            std::process::id().to_string()
        );
        // A second open file description conflicts even within one process.
        let err = FolderLock::acquire(&folder).unwrap_err();
        match &err {
            Error::Locked { folder: f, holder } => {
                assert_eq!(f, &folder);
                assert_eq!(*holder, Some(std::process::id()));
            }
            other => panic!("{other}"),
        }
        let text = err.to_string();
        assert!(text.contains(&std::process::id().to_string()), "{text}");
        assert!(text.contains("run"), "{text}");
        drop(first);
        let again = FolderLock::acquire(&folder).unwrap();
        drop(again);
    }
}
