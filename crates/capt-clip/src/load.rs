//! Checkpoint loading: HF-format directories and OpenAI / open_clip state dicts (safetensors, or
//! PyTorch `.pt` / `.bin` files: state dicts and OpenAI's TorchScript archives),
//! name mapping, shape checks with named errors, config inference, and the backbone hash.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::config::{Activation, ClipConfig, ClipTextConfig, ClipVisionConfig};
use crate::error::{ClipError, Result};
use crate::model::ClipModel;

/// Tensor naming of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// transformers `CLIPModel` (`text_model.*`, `vision_model.*`, `*_projection.weight`).
    HuggingFace,
    /// OpenAI CLIP / open_clip (`transformer.resblocks.N.*`, `visual.*`, `text_projection`).
    OpenAi,
}

/// The files of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointFiles {
    pub weights: PathBuf,
    /// HF `config.json` next to the weights, if present.
    pub config: Option<PathBuf>,
}

/// Finds the weights (`model.safetensors`, the only `*.safetensors` of a directory, else its only
/// PyTorch file `*.bin` / `*.pt` / `*.pth`) and an optional `config.json` next to them. `path`
/// is a directory or a weights file.
pub fn resolve_checkpoint(path: impl AsRef<Path>) -> Result<CheckpointFiles> {
    let path = path.as_ref();
    let meta = std::fs::metadata(path).map_err(|source| ClipError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let weights = if meta.is_dir() {
        let preferred = path.join("model.safetensors");
        if preferred.is_file() {
            preferred
        } else {
            let entries = std::fs::read_dir(path).map_err(|source| ClipError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            let with_ext = |exts: &[&str]| -> Vec<PathBuf> {
                files
                    .iter()
                    .filter(|p| {
                        p.extension()
                            .and_then(|e| e.to_str())
                            .is_some_and(|e| exts.contains(&e))
                    })
                    .cloned()
                    .collect()
            };
            // safetensors first; else one PyTorch file (pytorch_model.bin, ViT-B-16.pt, ...).
            let safetensors = with_ext(&["safetensors"]);
            let torch = with_ext(&["bin", "pt", "pth"]);
            match (safetensors.as_slice(), torch.as_slice()) {
                ([one], _) => one.clone(),
                ([], [one]) => one.clone(),
                _ => {
                    return Err(ClipError::UnknownFormat {
                        file: path.to_path_buf(),
                        reason: format!(
                            "expected model.safetensors, exactly one *.safetensors file, or else \
                             exactly one PyTorch file (*.bin, *.pt, *.pth); found {} and {}: \
                             pass the file itself as --backbone",
                            safetensors.len(),
                            torch.len()
                        ),
                    })
                }
            }
        }
    } else {
        path.to_path_buf()
    };
    let config = weights
        .parent()
        .map(|d| d.join("config.json"))
        .filter(|p| p.is_file());
    Ok(CheckpointFiles { weights, config })
}

/// Every tensor [`ClipModel::new`] reads, by HF name, with its shape.
pub fn expected_tensors(cfg: &ClipConfig) -> Vec<(String, Vec<usize>)> {
    let t = &cfg.text;
    let v = &cfg.vision;
    let d = cfg.projection_dim;
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut push = |name: String, shape: &[usize]| out.push((name, shape.to_vec()));
    let (w, p, c) = (v.hidden_size, v.patch_size, v.num_channels);
    push(
        "text_model.embeddings.token_embedding.weight".into(),
        &[t.vocab_size, t.hidden_size],
    );
    push(
        "text_model.embeddings.position_embedding.weight".into(),
        &[t.max_position_embeddings, t.hidden_size],
    );
    encoder_tensors(
        "text_model",
        t.hidden_size,
        t.intermediate_size,
        t.num_hidden_layers,
        &mut push,
    );
    push(
        "text_model.final_layer_norm.weight".into(),
        &[t.hidden_size],
    );
    push("text_model.final_layer_norm.bias".into(), &[t.hidden_size]);
    push("text_projection.weight".into(), &[d, t.hidden_size]);
    push("vision_model.embeddings.class_embedding".into(), &[w]);
    push(
        "vision_model.embeddings.patch_embedding.weight".into(),
        &[w, c, p, p],
    );
    push(
        "vision_model.embeddings.position_embedding.weight".into(),
        &[v.num_patches() + 1, w],
    );
    push("vision_model.pre_layrnorm.weight".into(), &[w]);
    push("vision_model.pre_layrnorm.bias".into(), &[w]);
    encoder_tensors(
        "vision_model",
        w,
        v.intermediate_size,
        v.num_hidden_layers,
        &mut push,
    );
    push("vision_model.post_layernorm.weight".into(), &[w]);
    push("vision_model.post_layernorm.bias".into(), &[w]);
    push("visual_projection.weight".into(), &[d, w]);
    push("logit_scale".into(), &[]);
    out
}

fn encoder_tensors(
    tower: &str,
    w: usize,
    inter: usize,
    layers: usize,
    push: &mut impl FnMut(String, &[usize]),
) {
    for i in 0..layers {
        let p = format!("{tower}.encoder.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            push(format!("{p}.self_attn.{proj}.weight"), &[w, w]);
            push(format!("{p}.self_attn.{proj}.bias"), &[w]);
        }
        for ln in ["layer_norm1", "layer_norm2"] {
            push(format!("{p}.{ln}.weight"), &[w]);
            push(format!("{p}.{ln}.bias"), &[w]);
        }
        push(format!("{p}.mlp.fc1.weight"), &[inter, w]);
        push(format!("{p}.mlp.fc1.bias"), &[inter]);
        push(format!("{p}.mlp.fc2.weight"), &[w, inter]);
        push(format!("{p}.mlp.fc2.bias"), &[w]);
    }
}

/// How an HF tensor is taken from an OpenAI-named one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Take {
    Whole,
    /// OpenAI stores `x @ P` projections, HF `x @ W^T`.
    Transposed,
    /// Part `k` (q, k, v) of the fused `in_proj_weight` / `in_proj_bias`.
    Third(usize),
}

/// The OpenAI name an HF tensor comes from.
fn openai_source(hf: &str) -> Option<(String, Take)> {
    let fixed = match hf {
        "text_model.embeddings.token_embedding.weight" => "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight" => "positional_embedding",
        "text_model.final_layer_norm.weight" => "ln_final.weight",
        "text_model.final_layer_norm.bias" => "ln_final.bias",
        "text_projection.weight" => return Some(("text_projection".into(), Take::Transposed)),
        "visual_projection.weight" => return Some(("visual.proj".into(), Take::Transposed)),
        "logit_scale" => "logit_scale",
        "vision_model.embeddings.class_embedding" => "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight" => "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight" => "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight" => "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias" => "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight" => "visual.ln_post.weight",
        "vision_model.post_layernorm.bias" => "visual.ln_post.bias",
        _ => "",
    };
    if !fixed.is_empty() {
        return Some((fixed.to_string(), Take::Whole));
    }
    let (prefix, rest) = if let Some(r) = hf.strip_prefix("text_model.encoder.layers.") {
        ("transformer.resblocks.", r)
    } else if let Some(r) = hf.strip_prefix("vision_model.encoder.layers.") {
        ("visual.transformer.resblocks.", r)
    } else {
        return None;
    };
    let (idx, sub) = rest.split_once('.')?;
    let (name, take) = match sub {
        "self_attn.q_proj.weight" => ("attn.in_proj_weight", Take::Third(0)),
        "self_attn.k_proj.weight" => ("attn.in_proj_weight", Take::Third(1)),
        "self_attn.v_proj.weight" => ("attn.in_proj_weight", Take::Third(2)),
        "self_attn.q_proj.bias" => ("attn.in_proj_bias", Take::Third(0)),
        "self_attn.k_proj.bias" => ("attn.in_proj_bias", Take::Third(1)),
        "self_attn.v_proj.bias" => ("attn.in_proj_bias", Take::Third(2)),
        "self_attn.out_proj.weight" => ("attn.out_proj.weight", Take::Whole),
        "self_attn.out_proj.bias" => ("attn.out_proj.bias", Take::Whole),
        "layer_norm1.weight" => ("ln_1.weight", Take::Whole),
        "layer_norm1.bias" => ("ln_1.bias", Take::Whole),
        "layer_norm2.weight" => ("ln_2.weight", Take::Whole),
        "layer_norm2.bias" => ("ln_2.bias", Take::Whole),
        "mlp.fc1.weight" => ("mlp.c_fc.weight", Take::Whole),
        "mlp.fc1.bias" => ("mlp.c_fc.bias", Take::Whole),
        "mlp.fc2.weight" => ("mlp.c_proj.weight", Take::Whole),
        "mlp.fc2.bias" => ("mlp.c_proj.bias", Take::Whole),
        _ => return None,
    };
    Some((format!("{prefix}{idx}.{name}"), take))
}

/// Detects the naming of a state dict from its keys.
pub fn detect_format(keys: &BTreeSet<String>, file: &Path) -> Result<CheckpointFormat> {
    if keys.contains("text_model.embeddings.token_embedding.weight")
        || keys.iter().any(|k| k.starts_with("vision_model."))
    {
        Ok(CheckpointFormat::HuggingFace)
    } else if keys
        .iter()
        .any(|k| k.starts_with("visual.attnpool.") || k.starts_with("visual.layer1."))
    {
        // OpenAI's RN50 / RN101 / RN50x4...: a modified ResNet image tower with attention
        // pooling, not a ViT.
        Err(ClipError::UnknownFormat {
            file: file.to_path_buf(),
            reason: "a ResNet CLIP (OpenAI's RN50 / RN101 / RN50x*: `visual.layer1.*`, \
                     `visual.attnpool.*`); capt supports ViT CLIPs (ViT-B/32, ViT-B/16, ViT-L/14, ...)"
                .into(),
        })
    } else if keys.contains("token_embedding.weight") || keys.contains("visual.conv1.weight") {
        Ok(CheckpointFormat::OpenAi)
    } else {
        let sample: Vec<&str> = keys.iter().take(5).map(String::as_str).collect();
        Err(ClipError::UnknownFormat {
            file: file.to_path_buf(),
            reason: format!(
                "not a CLIP state dict (no `text_model.*` or `token_embedding.weight` / \
                 `visual.conv1.weight`); first keys: {sample:?}"
            ),
        })
    }
}

/// Infers the architecture from tensor shapes (no `config.json`). Head counts follow OpenAI's
/// rule `width / 64` and the activation is QuickGELU, as in every OpenAI CLIP; checkpoints that
/// differ (e.g. open_clip GELU models) need a config.
pub fn infer_config(
    shapes: &HashMap<String, Vec<usize>>,
    format: CheckpointFormat,
    file: &Path,
) -> Result<ClipConfig> {
    let hf = format == CheckpointFormat::HuggingFace;
    let pick = |hf_name: &'static str, oa_name: &'static str| if hf { hf_name } else { oa_name };
    let get = |name: &str, rank: usize| -> Result<&[usize]> {
        match shapes.get(name) {
            Some(s) if s.len() == rank => Ok(s.as_slice()),
            Some(s) => Err(ClipError::UnknownFormat {
                file: file.to_path_buf(),
                reason: format!("tensor `{name}` has shape {s:?}, expected rank {rank}"),
            }),
            None => Err(ClipError::UnknownFormat {
                file: file.to_path_buf(),
                reason: format!(
                    "no config.json and tensor `{name}` is missing, so the architecture cannot be inferred"
                ),
            }),
        }
    };
    let count_layers = |prefix: &str| -> usize {
        shapes
            .keys()
            .filter_map(|k| {
                k.strip_prefix(prefix)?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .map(|i| i + 1)
            .max()
            .unwrap_or(0)
    };
    let heads = |width: usize, what: &str| -> Result<usize> {
        if width >= 64 && width.is_multiple_of(64) {
            Ok(width / 64)
        } else {
            Err(ClipError::UnknownFormat {
                file: file.to_path_buf(),
                reason: format!(
                    "no config.json and {what} width {width} is not a multiple of 64, so the head \
                     count cannot be inferred; put an HF config.json next to the weights"
                ),
            })
        }
    };

    let tok = get(
        pick(
            "text_model.embeddings.token_embedding.weight",
            "token_embedding.weight",
        ),
        2,
    )?;
    let (vocab, width) = (tok[0], tok[1]);
    let ctx = get(
        pick(
            "text_model.embeddings.position_embedding.weight",
            "positional_embedding",
        ),
        2,
    )?[0];
    let t_prefix = pick("text_model.encoder.layers.", "transformer.resblocks.");
    let t_inter = get(
        &format!("{t_prefix}0.{}", pick("mlp.fc1.weight", "mlp.c_fc.weight")),
        2,
    )?[0];
    let tproj = get(pick("text_projection.weight", "text_projection"), 2)?;
    let proj_dim = if hf { tproj[0] } else { tproj[1] };

    let conv = get(
        pick(
            "vision_model.embeddings.patch_embedding.weight",
            "visual.conv1.weight",
        ),
        4,
    )?;
    let (v_width, channels, patch) = (conv[0], conv[1], conv[2]);
    let n_pos = get(
        pick(
            "vision_model.embeddings.position_embedding.weight",
            "visual.positional_embedding",
        ),
        2,
    )?[0];
    let grid = (((n_pos.saturating_sub(1)) as f64).sqrt().round()) as usize;
    if grid * grid + 1 != n_pos {
        return Err(ClipError::UnknownFormat {
            file: file.to_path_buf(),
            reason: format!("{n_pos} vision positions is not a square grid plus CLS"),
        });
    }
    let v_prefix = pick(
        "vision_model.encoder.layers.",
        "visual.transformer.resblocks.",
    );
    let v_inter = get(
        &format!("{v_prefix}0.{}", pick("mlp.fc1.weight", "mlp.c_fc.weight")),
        2,
    )?[0];

    let cfg = ClipConfig {
        text: ClipTextConfig {
            vocab_size: vocab,
            hidden_size: width,
            intermediate_size: t_inter,
            num_hidden_layers: count_layers(t_prefix),
            num_attention_heads: heads(width, "text")?,
            max_position_embeddings: ctx,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        },
        vision: ClipVisionConfig {
            image_size: grid * patch,
            patch_size: patch,
            num_channels: channels,
            hidden_size: v_width,
            intermediate_size: v_inter,
            num_hidden_layers: count_layers(v_prefix),
            num_attention_heads: heads(v_width, "vision")?,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        },
        projection_dim: proj_dim,
        logit_scale_init: 2.6592,
    };
    cfg.validate(file)?;
    Ok(cfg)
}

/// Reads a weights file into CPU tensors, stripping a `module.` prefix (DataParallel saves):
/// safetensors, or a PyTorch zip archive (`torch.save` state dict, TorchScript as OpenAI's
/// `.pt` files; [`crate::torch_file`]).
fn read_weights(file: &Path) -> Result<(HashMap<String, Tensor>, bool)> {
    use crate::torch_file::{Container, TorchFileKind};
    let mut openai_jit = false;
    let raw = match crate::torch_file::sniff(file)? {
        Container::TorchZip => {
            let (tensors, kind) = crate::torch_file::read_torch_file(file)?;
            tracing::debug!(file = %file.display(), ?kind, "read PyTorch checkpoint");
            // OpenAI's released files are TorchScript of their own `clip.model.CLIP`.
            openai_jit = matches!(&kind, TorchFileKind::TorchScript { class }
                if class.starts_with("__torch__.clip.model") && class.ends_with(".CLIP"));
            tensors
        }
        Container::LegacyPickle => {
            return Err(ClipError::UnknownFormat {
                file: file.to_path_buf(),
                reason: "a PyTorch file in the pre-1.6 pickle format, which capt does not read: \
                         re-save it with a current torch (`torch.save(torch.load(f), f)`) or as \
                         safetensors (`safetensors.torch.save_file`)"
                    .into(),
            })
        }
        Container::Other => {
            candle_core::safetensors::load(file, &Device::Cpu).map_err(|source| {
                ClipError::Safetensors {
                    file: file.to_path_buf(),
                    source,
                }
            })?
        }
    };
    let all_module = !raw.is_empty() && raw.keys().all(|k| k.starts_with("module."));
    let tensors = raw
        .into_iter()
        .map(|(k, v)| {
            let k = if all_module {
                k["module.".len()..].to_string()
            } else {
                k
            };
            (k, v)
        })
        .collect();
    Ok((tensors, openai_jit))
}

/// Maps a state dict to HF names, checking every expected tensor's presence and shape.
fn to_hf_tensors(
    raw: HashMap<String, Tensor>,
    format: CheckpointFormat,
    cfg: &ClipConfig,
    file: &Path,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    let mut used = std::collections::HashSet::new();
    for (hf_name, shape) in expected_tensors(cfg) {
        let (src_name, take) = match format {
            CheckpointFormat::HuggingFace => (hf_name.clone(), Take::Whole),
            CheckpointFormat::OpenAi => {
                openai_source(&hf_name).ok_or_else(|| ClipError::UnknownFormat {
                    file: file.to_path_buf(),
                    reason: format!("no OpenAI name known for `{hf_name}`"),
                })?
            }
        };
        let src_shape: Vec<usize> = match take {
            Take::Whole => shape.clone(),
            Take::Transposed => shape.iter().rev().copied().collect(),
            Take::Third(_) => {
                let mut s = shape.clone();
                s[0] *= 3;
                s
            }
        };
        let t = raw.get(&src_name).ok_or_else(|| ClipError::MissingTensor {
            file: file.to_path_buf(),
            name: src_name.clone(),
            expected: src_shape.clone(),
        })?;
        if t.dims() != src_shape.as_slice() {
            return Err(ClipError::ShapeMismatch {
                file: file.to_path_buf(),
                name: src_name,
                expected: src_shape,
                found: t.dims().to_vec(),
            });
        }
        let t = match take {
            Take::Whole => t.clone(),
            Take::Transposed => t.t()?.contiguous()?,
            Take::Third(k) => t.narrow(0, k * shape[0], shape[0])?.contiguous()?,
        };
        used.insert(src_name);
        out.insert(hf_name, t);
    }
    let mut unused: Vec<&String> = raw.keys().filter(|k| !used.contains(*k)).collect();
    if !unused.is_empty() {
        unused.sort();
        tracing::debug!(file = %file.display(), ?unused, "tensors not used by CLIP");
    }
    Ok(out)
}

/// What a caller knows about a checkpoint beyond its files.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions<'a> {
    /// The architecture, overriding `config.json` / `open_clip_config.json` / inference.
    pub config: Option<&'a ClipConfig>,
    /// An open_clip model name (`ViT-B-16`, `ViT-B-16-quickgelu`, `ViT-H-14`, ...) or `openai`:
    /// the facts tensor shapes cannot tell (activation, head width) for a checkpoint without
    /// a config (`--arch`).
    pub arch: Option<&'a str>,
}

/// The facts an `--arch` name gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchHint {
    pub activation: Activation,
    /// Width of one vision attention head (64 but for open_clip's H/g/bigG models).
    pub vision_head_width: usize,
}

/// Parses an `--arch` name: open_clip's model names (`-quickgelu` = OpenAI's activation,
/// otherwise GELU, as open_clip builds them) or `openai` (OpenAI's own weights: QuickGELU).
pub fn arch_hint(name: &str) -> Result<ArchHint> {
    let lower = name.to_ascii_lowercase();
    if lower == "openai" {
        return Ok(ArchHint {
            activation: Activation::QuickGelu,
            vision_head_width: 64,
        });
    }
    let (base, activation) = match lower.strip_suffix("-quickgelu") {
        Some(b) => (b.to_string(), Activation::QuickGelu),
        None => (lower.clone(), Activation::Gelu),
    };
    if !base.starts_with("vit-") {
        return Err(ClipError::UnknownArch {
            what: format!("--arch {name}"),
            reason: "expected `openai` or an open_clip ViT name such as ViT-B-16 (GELU), \
                     ViT-B-16-quickgelu (QuickGELU, OpenAI's activation) or ViT-H-14"
                .into(),
        });
    }
    // open_clip's vision head widths (its `head_width`; 64 unless its model JSON says else).
    let vision_head_width = match base.as_str() {
        "vit-h-14" | "vit-h-16" => 80,
        "vit-g-14" => 88,
        "vit-bigg-14" => 104,
        _ => 64,
    };
    Ok(ArchHint {
        activation,
        vision_head_width,
    })
}

/// Architecture facts from an open_clip `open_clip_config.json` (`model_cfg`): activation
/// (`quick_gelu`, false by default as in open_clip), head counts.
fn open_clip_facts(path: &Path) -> Result<(Activation, Option<usize>, Option<usize>)> {
    let text = std::fs::read_to_string(path).map_err(|source| ClipError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| ClipError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let m = v.get("model_cfg").unwrap_or(&v);
    let quick = m
        .get("quick_gelu")
        .and_then(|q| q.as_bool())
        .unwrap_or(false);
    let vision_head_width = m
        .pointer("/vision_cfg/head_width")
        .and_then(|x| x.as_u64())
        .map(|x| x as usize);
    let text_heads = m
        .pointer("/text_cfg/heads")
        .and_then(|x| x.as_u64())
        .map(|x| x as usize);
    let act = if quick {
        Activation::QuickGelu
    } else {
        Activation::Gelu
    };
    Ok((act, vision_head_width, text_heads))
}

/// Reads a checkpoint (as [`ClipModel::load`]) into CPU tensors under their HF names, mapped
/// from OpenAI / open_clip names when needed, every expected tensor present and shaped; with
/// the architecture (`config` overrides the checkpoint's) and the files read.
pub fn load_hf_tensors(
    path: impl AsRef<Path>,
    config: Option<&ClipConfig>,
) -> Result<(ClipConfig, HashMap<String, Tensor>, CheckpointFiles)> {
    load_hf_tensors_with(path, &LoadOptions { config, arch: None })
}

/// [`load_hf_tensors`] with everything the caller knows ([`LoadOptions`]). Without a config,
/// the activation comes from `--arch`, an `open_clip_config.json` next to the weights, or the
/// file being OpenAI's own TorchScript / carrying OpenAI's `input_resolution` entry; when none
/// of these says it, the checkpoint is refused (QuickGELU and GELU models have the same
/// tensors, and a wrong guess computes wrong features silently).
pub fn load_hf_tensors_with(
    path: impl AsRef<Path>,
    opts: &LoadOptions<'_>,
) -> Result<(ClipConfig, HashMap<String, Tensor>, CheckpointFiles)> {
    let files = resolve_checkpoint(path)?;
    let file = files.weights.as_path();
    let (raw, openai_jit) = read_weights(file)?;
    let keys: BTreeSet<String> = raw.keys().cloned().collect();
    let format = detect_format(&keys, file)?;
    let hint = opts.arch.map(arch_hint).transpose()?;
    let open_clip_json = file
        .parent()
        .map(|d| d.join("open_clip_config.json"))
        .filter(|p| p.is_file());
    let cfg = match (opts.config, &files.config) {
        (Some(c), _) => {
            c.validate(file)?;
            c.clone()
        }
        (None, Some(cfg_file)) => ClipConfig::from_hf_config_json(cfg_file)?,
        (None, None) => {
            let shapes: HashMap<String, Vec<usize>> = raw
                .iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                .collect();
            let mut cfg = infer_config(&shapes, format, file)?;
            let act = if let Some(h) = hint {
                cfg.vision.num_attention_heads = cfg.vision.hidden_size / h.vision_head_width;
                h.activation
            } else if let Some(oc) = &open_clip_json {
                let (act, head_width, text_heads) = open_clip_facts(oc)?;
                if let Some(w) = head_width.filter(|w| *w > 0) {
                    cfg.vision.num_attention_heads = cfg.vision.hidden_size / w;
                }
                if let Some(h) = text_heads {
                    cfg.text.num_attention_heads = h;
                }
                act
            } else if openai_jit || keys.contains("input_resolution") {
                Activation::QuickGelu
            } else {
                return Err(ClipError::UnknownArch {
                    what: file.display().to_string(),
                    reason: "its activation cannot be known: it has no config.json or \
                             open_clip_config.json, and QuickGELU (OpenAI's weights) and GELU \
                             (open_clip's LAION / DataComp weights) models have the same tensors. \
                             Pass --arch ViT-B-16-quickgelu (or `openai`) for OpenAI weights, \
                             --arch ViT-B-16 (the open_clip name) for GELU ones, or put the \
                             model's open_clip_config.json next to the file"
                        .into(),
                });
            };
            cfg.text.hidden_act = act;
            cfg.vision.hidden_act = act;
            cfg.validate(file)?;
            cfg
        }
    };
    let tensors = to_hf_tensors(raw, format, &cfg, file)?;
    tracing::debug!(file = %file.display(), ?format, act = ?cfg.vision.hidden_act, "read CLIP tensors");
    Ok((cfg, tensors, files))
}

impl ClipModel {
    /// Loads a checkpoint: an HF directory (`config.json` + `model.safetensors`), or an HF / OpenAI
    /// / open_clip state dict in a `.safetensors` file (architecture from a `config.json` next to
    /// it, else inferred from the shapes). Weights are cast to `dtype` (f32, f16, bf16; f64 for
    /// gradient checks) on `device`.
    pub fn load(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_config(path, None, dtype, device)
    }

    /// As [`Self::load`], with `config` overriding the checkpoint's `config.json` / inference.
    pub fn load_with_config(
        path: impl AsRef<Path>,
        config: Option<&ClipConfig>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_with(path, &LoadOptions { config, arch: None }, dtype, device)
    }

    /// As [`Self::load`], with what the caller knows about the checkpoint ([`LoadOptions`]).
    pub fn load_with(
        path: impl AsRef<Path>,
        opts: &LoadOptions<'_>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            return Err(ClipError::UnsupportedDType(dtype));
        }
        let (cfg, tensors, files) = load_hf_tensors_with(path, opts)?;
        let file = files.weights.as_path();
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(dtype)?.to_device(device)?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        let mut model = ClipModel::new(vb, &cfg)?;
        model.weights_file = Some(files.weights.clone());
        tracing::info!(file = %file.display(), ?dtype, "loaded CLIP");
        Ok(model)
    }
}

/// SHA-256 (hex) of a checkpoint's weights file, streamed; `path` as for [`ClipModel::load`].
/// Checkpoints record it to tie trained prompts to their backbone.
pub fn backbone_hash(path: impl AsRef<Path>) -> Result<String> {
    let file = resolve_checkpoint(path)?.weights;
    let io = |source| ClipError::Io {
        path: file.clone(),
        source,
    };
    capt_core::fs::sha256_file(&file).map_err(io)
}
