//! Paths shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// `tests/fixtures/coop` of the repository: a tiny `$DATA` with `dtd/` and `eurosat/`.
pub fn fixture_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/coop")
}

/// The real CoOp-layout data (`../shared/data/coop_data` next to the checkout, or
/// `$CAPT_COOP_DATA`), when present. Tests that use it skip themselves otherwise.
pub fn real_root() -> Option<PathBuf> {
    let p = std::env::var_os("CAPT_COOP_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/coop_data")
        });
    if p.join("dtd").is_dir() {
        Some(p)
    } else {
        eprintln!("real CoOp data not found at {}; skipping", p.display());
        None
    }
}

/// Copies a folder tree (fixtures are read-only inputs; tests that write work on a copy).
pub fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}
