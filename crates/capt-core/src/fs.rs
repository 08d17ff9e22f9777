//! The one home of capt's file helpers: atomic writes of files and folders, and file digests.
//! Every crate that writes a checkpoint, an export, a cache or a report goes through these,
//! so "a reader sees the old content or the complete new one" holds everywhere.
//!
//! Errors are plain `std::io::Error`s; callers attach the path and what they were doing.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A temporary sibling of `path`, unique within this process: `.<name>.tmp<pid>-<n>`.
pub fn temp_sibling(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(
        ".{name}.tmp{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The folder `path` lives in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `path` through `fill` into a temporary file in the same folder, fsyncs it and
/// renames it into place (creating the folder if needed). Readers never see a partial file;
/// concurrent writers of the same content are harmless; a failure leaves no temporary file.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    if path.file_name().is_none() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file path",
        ));
    }
    std::fs::create_dir_all(parent_dir(path))?;
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        fill(&mut f)?;
        f.flush()?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomic_with`] for bytes in memory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Fills a fresh temporary sibling folder of `dst` through `fill` and renames it into place.
/// An existing `dst` is replaced only with `replace` (it is moved aside first and removed
/// after the swap, so `dst` is never missing its content for longer than two renames).
/// A failure removes the temporary folder and leaves `dst` as it was.
pub fn commit_dir<E: From<std::io::Error>>(
    dst: &Path,
    replace: bool,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    if dst.exists() && !replace {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} already exists", dst.display()),
        )
        .into());
    }
    let parent = parent_dir(dst);
    std::fs::create_dir_all(&parent)?;
    let tmp = temp_sibling(dst);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let filled = fill(&tmp).and_then(|()| {
        sync_dir(&tmp);
        if dst.exists() {
            let old = temp_sibling(dst).with_extension("old");
            std::fs::rename(dst, &old)?;
            if let Err(e) = std::fs::rename(&tmp, dst) {
                let _ = std::fs::rename(&old, dst);
                return Err(e.into());
            }
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, dst)?;
        }
        Ok(())
    });
    if filled.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    } else {
        sync_dir(&parent);
    }
    filled
}

/// Best-effort fsync of a folder's entries (a rename's durability).
pub fn sync_dir(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Lower-case hex sha256 of a file, streamed in 1 MiB reads.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Lower-case hex sha256 of bytes in memory.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// sha256 over `name NUL sha256(file) LF` of every file directly in `dir`, sorted by name:
/// one digest of a folder of files (a checkpoint), independent of listing order.
pub fn sha256_dir_files(dir: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut all = Sha256::new();
    for f in files {
        all.update(f.file_name().unwrap_or_default().as_encoded_bytes());
        all.update([0]);
        all.update(sha256_file(&f)?.as_bytes());
        all.update(b"\n");
    }
    Ok(hex::encode(all.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/x.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub")).unwrap().collect();
        assert_eq!(names.len(), 1);
        // A failing fill leaves the old file and no temporary.
        let err = write_atomic_with(&p, |_| Err(std::io::Error::other("boom")));
        assert!(err.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1
        );
    }

    #[test]
    fn commit_dir_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("out");
        commit_dir::<std::io::Error>(&dst, false, |t| std::fs::write(t.join("a"), b"1")).unwrap();
        assert_eq!(std::fs::read(dst.join("a")).unwrap(), b"1");
        // Refused without replace; replaced with it; a failing fill keeps the old folder.
        assert!(commit_dir::<std::io::Error>(&dst, false, |_| Ok(())).is_err());
        let failed = commit_dir::<std::io::Error>(&dst, true, |t| {
            std::fs::write(t.join("b"), b"2")?;
            Err(std::io::Error::other("boom"))
        });
        assert!(failed.is_err());
        assert!(dst.join("a").is_file() && !dst.join("b").exists());
        commit_dir::<std::io::Error>(&dst, true, |t| std::fs::write(t.join("b"), b"2")).unwrap();
        assert!(!dst.join("a").exists() && dst.join("b").is_file());
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary folders left");
    }

    #[test]
    fn digests() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&p).unwrap(), abc);
        assert_eq!(sha256_hex(b"abc"), abc);
        let d1 = sha256_dir_files(dir.path()).unwrap();
        std::fs::write(dir.path().join("b"), b"x").unwrap();
        assert_ne!(sha256_dir_files(dir.path()).unwrap(), d1);
    }
}
