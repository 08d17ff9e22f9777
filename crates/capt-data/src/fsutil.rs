//! Sorted, hidden-free directory listings (atomic writes live in `capt_core::fs`).

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// File extensions read as images (lower case).
pub const IMAGE_EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "webp", "bmp", "jpe"];

/// Names in `dir` (no hidden entries), sorted, filtered by kind.
fn list(dir: &Path, want_dirs: bool) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        // Follow symlinks: datasets are often linked in from elsewhere.
        let is_dir = std::fs::metadata(entry.path())
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if is_dir == want_dirs {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Sub-folders of `dir`, sorted by name (Python's sorted order on str: code points, which is
/// byte order for UTF-8).
pub fn list_dirs(dir: &Path) -> Result<Vec<String>> {
    list(dir, true)
}

/// Image files of `dir`, sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<String>> {
    Ok(list(dir, false)?
        .into_iter()
        .filter(|n| is_image_name(n))
        .collect())
}

pub fn is_image_name(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// Joins a `/`-separated relative path onto `base`.
pub fn join_rel(base: &Path, rel: &str) -> PathBuf {
    let mut p = base.to_path_buf();
    for part in rel.split('/').filter(|s| !s.is_empty()) {
        p.push(part);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_are_sorted_and_skip_hidden() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["b", "a", ".git"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        for f in ["z.JPG", "y.png", "notes.txt", ".x.jpg"] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        assert_eq!(list_dirs(dir.path()).unwrap(), ["a", "b"]);
        assert_eq!(list_images(dir.path()).unwrap(), ["y.png", "z.JPG"]);
    }
}
