//! PyTorch checkpoint files read without Python: the zip archives of `torch.save` (a state
//! dict, e.g. `pytorch_model.bin` or `model.pt`) and of `torch.jit.save` (TorchScript, as
//! OpenAI's released `ViT-B-16.pt`).
//!
//! Both hold a pickle (`<archive>/data.pkl`) and one file per tensor storage
//! (`<archive>/data/<key>`). candle's pickle reader decodes the pickle into an object tree; a
//! state dict is a dict of tensors, a TorchScript module an object built from a dict of
//! attributes whose values are parameters, buffers or submodules. Walking that tree with
//! dotted names gives exactly the state dict names (`visual.conv1.weight`, ...). candle's own
//! `PthTensors` reads only the first form, hence this module.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{Device, Tensor};

use crate::error::{ClipError, Result};

/// `PK\x03\x04`: every zip archive, so every torch.save / torch.jit.save file since torch 1.6.
const ZIP_MAGIC: [u8; 4] = *b"PK\x03\x04";

/// A weights file as its first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    /// A zip archive: `torch.save` / `torch.jit.save` since torch 1.6.
    TorchZip,
    /// A bare pickle (`\x80` + protocol): PyTorch's pre-1.6 `torch.save` format, not read here.
    LegacyPickle,
    /// Anything else (safetensors is read as such, and names its own errors).
    Other,
}

/// Reads the first bytes of `file` once to tell its container.
pub fn sniff(file: &Path) -> Result<Container> {
    let mut f = std::fs::File::open(file).map_err(|source| ClipError::Io {
        path: file.to_path_buf(),
        source,
    })?;
    let mut head = [0u8; 4];
    let n = f.read(&mut head).map_err(|source| ClipError::Io {
        path: file.to_path_buf(),
        source,
    })?;
    Ok(if n == 4 && head == ZIP_MAGIC {
        Container::TorchZip
    } else if n >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
        Container::LegacyPickle
    } else {
        Container::Other
    })
}

/// What kind of PyTorch file was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TorchFileKind {
    /// `torch.save` of a dict of tensors.
    StateDict,
    /// `torch.jit.save` of a module; `class` is its TorchScript class (e.g.
    /// `__torch__.clip.model.CLIP` for OpenAI's checkpoints).
    TorchScript { class: String },
}

/// Every tensor of a PyTorch zip checkpoint, by state-dict name, on the CPU.
pub fn read_torch_file(file: &Path) -> Result<(HashMap<String, Tensor>, TorchFileKind)> {
    let bad = |reason: String| ClipError::UnknownFormat {
        file: file.to_path_buf(),
        reason,
    };
    let open = || -> Result<zip::ZipArchive<BufReader<std::fs::File>>> {
        let f = std::fs::File::open(file).map_err(|source| ClipError::Io {
            path: file.to_path_buf(),
            source,
        })?;
        zip::ZipArchive::new(BufReader::new(f)).map_err(|e| {
            bad(format!(
                "not a readable PyTorch zip archive ({e}); a truncated download? Fetch the file again"
            ))
        })
    };
    let mut zip = open()?;
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or_else(|| {
            bad("a zip archive without data.pkl: not a torch.save / torch.jit.save file".into())
        })?;
    let dir = pkl.strip_suffix(".pkl").unwrap_or(&pkl).to_string();
    let obj = {
        let entry = zip
            .by_name(&pkl)
            .map_err(|e| bad(format!("cannot read {pkl}: {e}")))?;
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut BufReader::new(entry))
            .map_err(|e| bad(format!("cannot decode {pkl}: {e}")))?;
        stack
            .finalize()
            .map_err(|e| bad(format!("cannot decode {pkl}: {e}")))?
    };
    let kind = match &obj {
        Object::Build { callable, .. } => match callable.as_ref() {
            Object::Reduce { callable, .. } => match callable.as_ref() {
                Object::Class {
                    module_name,
                    class_name,
                } => TorchFileKind::TorchScript {
                    class: format!("{module_name}.{class_name}"),
                },
                _ => TorchFileKind::StateDict,
            },
            _ => TorchFileKind::StateDict,
        },
        _ => TorchFileKind::StateDict,
    };
    let mut infos = Vec::new();
    collect(obj, String::new(), Path::new(&dir), &mut infos, file)?;
    if infos.is_empty() {
        return Err(bad("no tensors in its data.pkl".into()));
    }
    let mut out = HashMap::with_capacity(infos.len());
    for info in infos {
        let t = read_tensor(&mut zip, &info).map_err(|e| {
            bad(format!(
                "tensor `{}` ({}): {e}; a truncated download? Fetch the file again",
                info.name, info.path
            ))
        })?;
        out.insert(info.name, t);
    }
    Ok((out, kind))
}

/// Walks the pickled object tree: dict keys and module attribute names joined with `.`;
/// tensors recorded under their path. Non-tensor leaves (flags, ints, strings) are skipped.
fn collect(
    obj: Object,
    prefix: String,
    dir: &Path,
    out: &mut Vec<TensorInfo>,
    file: &Path,
) -> Result<()> {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match obj {
        // A module (TorchScript): its attributes are the BUILD dict.
        Object::Build { args, .. } => collect(*args, prefix, dir, out, file),
        Object::Dict(items) => {
            for (k, v) in items {
                let key = match k {
                    Object::Unicode(s) => s,
                    Object::Int(i) => i.to_string(),
                    _ => continue,
                };
                collect(v, join(&key), dir, out, file)?;
            }
            Ok(())
        }
        reduce @ Object::Reduce { .. } => {
            match reduce
                .clone()
                .into_tensor_info(Object::Unicode(prefix.clone()), dir)
            {
                Ok(Some(info)) => out.push(info),
                Ok(None) => {
                    // Not a tensor: an object rebuilt by a call (a submodule in some
                    // TorchScript layouts); its arguments may hold tensors.
                    if let Object::Reduce { args, .. } = reduce {
                        collect(*args, prefix, dir, out, file)?;
                    }
                }
                Err(e) => {
                    return Err(ClipError::UnknownFormat {
                        file: file.to_path_buf(),
                        reason: format!("tensor `{prefix}`: {e}"),
                    })
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// One tensor from its storage entry: contiguous, or transposed (Fortran order), as candle's
/// own reader allows.
fn read_tensor<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    info: &TensorInfo,
) -> std::result::Result<Tensor, String> {
    let layout = &info.layout;
    let fortran = layout.is_fortran_contiguous();
    if !layout.is_contiguous() && !fortran {
        return Err(format!(
            "strided storage layout {layout:?} is not supported"
        ));
    }
    let mut entry = zip.by_name(&info.path).map_err(|e| e.to_string())?;
    let start = layout.start_offset() as u64;
    std::io::copy(&mut entry.by_ref().take(start), &mut std::io::sink())
        .map_err(|e| e.to_string())?;
    let dims = layout.dims().to_vec();
    let n: usize = dims.iter().product();
    let mut bytes = vec![0u8; n * info.dtype.size_in_bytes()];
    entry
        .read_exact(&mut bytes)
        .map_err(|e| format!("storage shorter than the tensor ({e})"))?;
    let t = if fortran && dims.len() > 1 {
        let rev: Vec<usize> = dims.iter().rev().copied().collect();
        let perm: Vec<usize> = (0..dims.len()).rev().collect();
        Tensor::from_raw_buffer(&bytes, info.dtype, &rev, &Device::Cpu)
            .and_then(|t| t.permute(perm))
            .and_then(|t| t.contiguous())
            .map_err(|e| e.to_string())?
    } else {
        Tensor::from_raw_buffer(&bytes, info.dtype, &dims, &Device::Cpu)
            .map_err(|e| e.to_string())?
    };
    Ok(t)
}
