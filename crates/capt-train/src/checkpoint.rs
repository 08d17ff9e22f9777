//! Checkpoints (this module owns the layout): a folder per completed epoch
//! `OUT/epoch-NNN/` holding `learned.safetensors`, `bank.safetensors` (CAPT methods),
//! `tables.safetensors`, `state.json` and `optim.safetensors`; `OUT/LATEST` names the newest
//! one, and the finished run is also `OUT/checkpoint/`.
//!
//! Every checkpoint folder is written as `NAME.tmp-<pid>` and renamed into place, and
//! `LATEST` is replaced atomically after it, so a reader never sees a half-written
//! checkpoint; a failure removes the temporary folder.

use std::io::Write;
use std::path::{Path, PathBuf};

use capt_method::CaptConfig;
use serde::{Deserialize, Serialize};

use crate::backbone::BackboneRecord;
use crate::config::TrainerConfig;
use crate::error::{Result, TrainError};

pub const FORMAT_VERSION: u32 = 1;
pub const LEARNED: &str = "learned.safetensors";
pub const BANK: &str = "bank.safetensors";
pub const TABLES: &str = "tables.safetensors";
pub const STATE: &str = "state.json";
pub const OPTIM: &str = "optim.safetensors";
pub const LATEST: &str = "LATEST";
pub const FINAL: &str = "checkpoint";

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format_version: u32,
    pub method: String,
    pub config: CaptConfig,
    pub trainer: TrainerConfig,
    pub class_names: Vec<String>,
    pub dataset: String,
    /// `all`, `base` or `new`: the classes trained on.
    pub subsample: String,
    pub shots: usize,
    pub seed: u64,
    /// Completed epochs.
    pub epoch: usize,
    /// Planned epochs (`optim.epochs`).
    pub epochs: usize,
    /// Optimiser steps done.
    pub step: usize,
    pub finished: bool,
    pub backbone: BackboneRecord,
    /// Template of the zero-shot targets.
    pub template: String,
    /// Joint embedding dim `D` and local tokens `G` of the head.
    pub dim: usize,
    pub local_tokens: usize,
    /// Training loss / accuracy of the last completed epoch.
    pub train_loss: Option<f64>,
    pub train_acc: Option<f64>,
}

impl State {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("state serialises")
    }
}

pub fn epoch_dir_name(epoch: usize) -> String {
    format!("epoch-{epoch:03}")
}

/// Writes the files of a checkpoint folder `out/name` atomically (temp folder + rename).
pub fn write_dir(out: &Path, name: &str, files: &[(&str, Vec<u8>)]) -> Result<PathBuf> {
    let dst = out.join(name);
    let tmp = out.join(format!("{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<()> {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io("remove stale", &tmp, e))?;
        }
        std::fs::create_dir_all(&tmp)
            .map_err(|e| TrainError::io("create checkpoint folder", &tmp, e))?;
        for (file, bytes) in files {
            let p = tmp.join(file);
            let mut f = std::fs::File::create(&p).map_err(|e| TrainError::io("create", &p, e))?;
            f.write_all(bytes)
                .map_err(|e| TrainError::io("write", &p, e))?;
            f.sync_all().map_err(|e| TrainError::io("sync", &p, e))?;
        }
        if dst.exists() {
            std::fs::remove_dir_all(&dst).map_err(|e| TrainError::io("replace", &dst, e))?;
        }
        std::fs::rename(&tmp, &dst)
            .map_err(|e| TrainError::io("move checkpoint into place at", &dst, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|_| dst)
}

/// Points `out/LATEST` at `name` (atomic replace).
pub fn set_latest(out: &Path, name: &str) -> Result<()> {
    let p = out.join(LATEST);
    capt_method::metrics::write_atomic(&p, format!("{name}\n").as_bytes())
        .map_err(|e| TrainError::io("write", &p, e))
}

/// Removes epoch folders other than `keep`, and temporary folders of crashed writes.
pub fn prune(out: &Path, keep: &str) -> Result<()> {
    let entries = match std::fs::read_dir(out) {
        Ok(e) => e,
        Err(_) => return Ok(()),
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale_epoch = name.starts_with("epoch-") && !name.contains(".tmp-") && name != keep;
        let tmp = name.contains(".tmp-") && (name.starts_with("epoch-") || name.starts_with(FINAL));
        if (stale_epoch || tmp) && e.path().is_dir() {
            std::fs::remove_dir_all(e.path())
                .map_err(|err| TrainError::io("remove old checkpoint", &e.path(), err))?;
        }
    }
    Ok(())
}

/// The checkpoint folder of `path`: itself when it holds `state.json`, else the one its
/// `LATEST` names (a run's output folder).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(STATE).is_file() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join(LATEST);
    match std::fs::read_to_string(&latest) {
        Ok(name) => {
            let dir = path.join(name.trim());
            if dir.join(STATE).is_file() {
                Ok(dir)
            } else {
                Err(TrainError::checkpoint(
                    &dir,
                    format!("named by {} but holds no {STATE}", latest.display()),
                ))
            }
        }
        Err(_) => Err(TrainError::checkpoint(
            path,
            format!("no checkpoint here (neither {STATE} nor {LATEST}); pass a checkpoint folder or a run's --out folder"),
        )),
    }
}

/// Reads and checks `state.json`.
pub fn read_state(dir: &Path) -> Result<State> {
    let p = dir.join(STATE);
    let text = std::fs::read_to_string(&p).map_err(|e| TrainError::io("read", &p, e))?;
    let state: State = serde_json::from_str(&text).map_err(|e| {
        TrainError::checkpoint(dir, format!("{STATE} is not a capt-train state: {e}"))
    })?;
    if state.format_version != FORMAT_VERSION {
        return Err(TrainError::checkpoint(
            dir,
            format!(
                "format_version {} is not supported (this capt-train reads {FORMAT_VERSION})",
                state.format_version
            ),
        ));
    }
    Ok(state)
}

pub fn read_file(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let p = dir.join(name);
    std::fs::read(&p).map_err(|e| TrainError::io("read", &p, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_is_atomic_and_latest_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        write_dir(
            out,
            "epoch-001",
            &[("a.txt", b"one".to_vec()), (STATE, b"{}".to_vec())],
        )
        .unwrap();
        set_latest(out, "epoch-001").unwrap();
        assert_eq!(resolve(out).unwrap(), out.join("epoch-001"));
        write_dir(out, "epoch-002", &[(STATE, b"{}".to_vec())]).unwrap();
        set_latest(out, "epoch-002").unwrap();
        prune(out, "epoch-002").unwrap();
        let names: Vec<String> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names
                .iter()
                .any(|n| n == "epoch-001" || n.contains(".tmp-")),
            "{names:?}"
        );
        // A failing write leaves nothing behind.
        let bad = out.join("not-a-dir");
        std::fs::write(&bad, b"x").unwrap();
        assert!(write_dir(&bad, "epoch-003", &[(STATE, b"{}".to_vec())]).is_err());
        assert!(resolve(&out.join("nothing")).is_err());
    }
}
