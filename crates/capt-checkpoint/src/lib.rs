//! `capt-checkpoint`: the layout of capt-train's checkpoints, owned here so the trainer writes
//! it and the exporter reads it without depending on the trainer.
//!
//! A folder per completed epoch
//! `OUT/epoch-NNN/` holding `learned.safetensors`, `bank.safetensors` (CAPT methods),
//! `tables.safetensors`, `state.json` and `optim.safetensors`; `OUT/LATEST` names the newest
//! one, and the finished run is also `OUT/checkpoint/`.
//!
//! Every checkpoint folder is written as `NAME.tmp-<pid>` and renamed into place, and
//! `LATEST` is replaced atomically after it, so a reader never sees a half-written
//! checkpoint; a failure removes the temporary folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use capt_clip::ClipConfig;
use capt_graph::HostTensor;
use capt_method::CaptConfig;
use serde::{Deserialize, Serialize};

mod error;
mod trainer;

pub use error::{CheckpointError, Result};
pub use trainer::TrainerConfig;

pub const FORMAT_VERSION: u32 = 1;
pub const LEARNED: &str = "learned.safetensors";
pub const BANK: &str = "bank.safetensors";
pub const TABLES: &str = "tables.safetensors";
pub const STATE: &str = "state.json";
pub const OPTIM: &str = "optim.safetensors";
pub const LATEST: &str = "LATEST";
pub const FINAL: &str = "checkpoint";

/// `state.json`'s record of the backbone: as given (a path, or `org/name@<commit>` for a hub
/// id), the sha256 of its weights file, and its config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackboneRecord {
    pub path: String,
    pub sha256: String,
    pub config: ClipConfig,
}

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

/// Writes the files of a checkpoint folder `out/name` atomically (temporary folder + rename,
/// [`capt_core::fs::commit_dir`]); an older folder of that name is replaced.
pub fn write_dir(out: &Path, name: &str, files: &[(&str, Vec<u8>)]) -> Result<PathBuf> {
    let dst = out.join(name);
    capt_core::fs::commit_dir(&dst, true, |tmp| {
        for (file, bytes) in files {
            capt_core::fs::write_atomic(&tmp.join(file), bytes)?;
        }
        Ok::<(), std::io::Error>(())
    })
    .map_err(|e| CheckpointError::io("write the checkpoint folder", &dst, e))?;
    Ok(dst)
}

/// Points `out/LATEST` at `name` (atomic replace).
pub fn set_latest(out: &Path, name: &str) -> Result<()> {
    let p = out.join(LATEST);
    capt_core::fs::write_atomic(&p, format!("{name}\n").as_bytes())
        .map_err(|e| CheckpointError::io("write", &p, e))
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
                .map_err(|err| CheckpointError::io("remove old checkpoint", &e.path(), err))?;
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
                Err(CheckpointError::invalid(
                    &dir,
                    format!("named by {} but holds no {STATE}", latest.display()),
                ))
            }
        }
        Err(_) => Err(CheckpointError::invalid(
            path,
            format!("no checkpoint here (neither {STATE} nor {LATEST}); pass a checkpoint folder or a run's --out folder"),
        )),
    }
}

/// Reads and checks `state.json`.
pub fn read_state(dir: &Path) -> Result<State> {
    let p = dir.join(STATE);
    let text = std::fs::read_to_string(&p).map_err(|e| CheckpointError::io("read", &p, e))?;
    let state: State = serde_json::from_str(&text).map_err(|e| {
        CheckpointError::invalid(dir, format!("{STATE} is not a capt-train state: {e}"))
    })?;
    if state.format_version != FORMAT_VERSION {
        return Err(CheckpointError::invalid(
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
    std::fs::read(&p).map_err(|e| CheckpointError::io("read", &p, e))
}

/// The tensors of a safetensors file's bytes (F32 or I64, as capt-train writes them), by
/// name; `source` names the file in errors.
pub fn parse_tensors(bytes: &[u8], source: &Path) -> Result<BTreeMap<String, HostTensor>> {
    use safetensors::Dtype;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| CheckpointError::invalid(source, format!("not a safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dims = view.shape().to_vec();
        let bad = |e: capt_graph::Error| CheckpointError::invalid(source, format!("`{name}`: {e}"));
        let t = match view.dtype() {
            Dtype::F32 => {
                let v = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                HostTensor::f32(dims, v).map_err(bad)?
            }
            Dtype::I64 => {
                let v = view
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect();
                HostTensor::i64(dims, v).map_err(bad)?
            }
            other => {
                return Err(CheckpointError::invalid(
                    source,
                    format!("tensor `{name}` has dtype {other:?}; expected F32 or I64"),
                ))
            }
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Serialises F32 / I64 host tensors as safetensors (sorted by name, with optional metadata):
/// the one writer of the checkpoint's tensor files. Other element types are widened to F32.
pub fn serialize_tensors(
    tensors: &BTreeMap<String, HostTensor>,
    meta: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    use capt_graph::HostData;
    use safetensors::{tensor::TensorView, Dtype};
    let data: Vec<(&String, Dtype, &[usize], Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let (dt, bytes) = match t.data() {
                HostData::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                HostData::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                HostData::F64(v) => (
                    Dtype::F32,
                    v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
                ),
                HostData::Bool(v) => (
                    Dtype::F32,
                    v.iter()
                        .flat_map(|&x| if x { 1f32 } else { 0f32 }.to_le_bytes())
                        .collect(),
                ),
            };
            (name, dt, t.dims(), bytes)
        })
        .collect();
    let views = data
        .iter()
        .map(|(n, dt, shape, bytes)| {
            let v = TensorView::new(*dt, shape.to_vec(), bytes).expect("shape matches data");
            ((*n).clone(), v)
        })
        .collect::<Vec<_>>();
    safetensors::serialize(views, meta).map_err(|e| {
        CheckpointError::invalid(
            std::path::Path::new("<tensors>"),
            format!("cannot serialise: {e}"),
        )
    })
}

/// The tensors of the checkpoint file `dir/name` as host tensors.
pub fn read_tensors(dir: &Path, name: &str) -> Result<BTreeMap<String, HostTensor>> {
    parse_tensors(&read_file(dir, name)?, &dir.join(name))
}

/// One digest of a checkpoint folder ([`capt_core::fs::sha256_dir_files`]): what an export
/// records as its source.
pub fn digest(dir: &Path) -> Result<String> {
    capt_core::fs::sha256_dir_files(dir).map_err(|e| CheckpointError::io("hash", dir, e))
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
