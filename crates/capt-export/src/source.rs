//! What gets exported: a training checkpoint (or a bare CLIP for zero-shot) turned into a
//! [`ModelSpec`] plus every parameter the graphs read, by name.
//!
//! Class embeddings and CAPT tables come from capt-train's own scorer
//! (`scorer_from_checkpoint`, `zero_shot_scorer`), i.e. exactly what `capt-train eval` uses,
//! so the exported logits are the evaluated ones.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType as CDType, Device, Tensor};
use capt_graph::HostTensor;
use capt_method::Method;
use capt_model::{names, ClipSpec, ModelSpec, TextFamily, TextSpec};
use capt_train::backbone::{Backbone, BackboneSpec};
use capt_train::config::RunConfig;
use capt_train::{checkpoint, evaluate};
use sha2::{Digest, Sha256};

use crate::error::{ExportError, Result};

/// Which classes the classifier scores.
#[derive(Debug, Clone, PartialEq)]
pub enum Classes {
    /// The classes the checkpoint was trained on (`base` in the base-to-novel protocol).
    Trained,
    /// Every class of the checkpoint's dataset (base + novel), read from `root`.
    All { root: PathBuf },
    /// One class name per line (trained classes keep their tables; others get the text
    /// prior and empty cells, as `capt-train eval` treats novel classes).
    File(PathBuf),
}

/// A model ready to be written.
pub struct ExportSource {
    pub spec: ModelSpec,
    pub class_names: Vec<String>,
    /// Every parameter the graphs may read, by name.
    pub params: BTreeMap<String, HostTensor>,
    pub model_name: String,
    pub backbone_sha256: String,
    /// The backbone as the checkpoint recorded it (a path, or `org/name@<commit>`).
    pub backbone: String,
    /// Digest of the checkpoint folder's files (empty for zero-shot exports).
    pub source_checkpoint_sha256: String,
}

fn host(t: &Tensor, what: &str) -> Result<HostTensor> {
    HostTensor::from_candle(&t.to_dtype(CDType::F32).unwrap_or_else(|_| t.clone()))
        .map_err(|e| ExportError::Source(format!("{what}: {e}")))
}

fn host_any(t: &Tensor, what: &str) -> Result<HostTensor> {
    if t.dtype().is_float() {
        host(t, what)
    } else {
        HostTensor::from_candle(t).map_err(|e| ExportError::Source(format!("{what}: {e}")))
    }
}

/// Reads class names, one per line (blank lines and `#` comments skipped).
pub fn read_class_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ExportError::Input(format!(
            "cannot read the class list {}: {e}; pass a text file with one class name per line",
            path.display()
        ))
    })?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if names.is_empty() {
        return Err(ExportError::Input(format!(
            "{} lists no class names; write one name per line",
            path.display()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for n in &names {
        if !seen.insert(n) {
            return Err(ExportError::Input(format!(
                "{} lists `{n}` twice; class names must be unique",
                path.display()
            )));
        }
    }
    Ok(names)
}

/// sha256 over `name NUL sha256(file) LF` of every file of a checkpoint folder, sorted.
pub fn checkpoint_digest(dir: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ExportError::Input(format!("cannot list {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut all = Sha256::new();
    for f in files {
        let mut h = Sha256::new();
        let mut file = std::fs::File::open(&f)
            .map_err(|e| ExportError::Input(format!("cannot read {}: {e}", f.display())))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| ExportError::Input(format!("cannot read {}: {e}", f.display())))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        all.update(f.file_name().unwrap_or_default().as_encoded_bytes());
        all.update([0]);
        all.update(hex::encode(h.finalize()).as_bytes());
        all.update(b"\n");
    }
    Ok(hex::encode(all.finalize()))
}

/// The CLIP tensors (HF names) of a backbone file, as host tensors.
fn backbone_params(
    path: &Path,
    cfg: &capt_clip::ClipConfig,
) -> Result<BTreeMap<String, HostTensor>> {
    let (_, tensors, _) = capt_clip::load_hf_tensors(path, Some(cfg))?;
    tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), host(t, k)?)))
        .collect()
}

fn clip_spec(cfg: &capt_clip::ClipConfig) -> Result<ClipSpec> {
    serde_json::from_value(serde_json::to_value(cfg).expect("ClipConfig serialises"))
        .map_err(|e| ExportError::Source(format!("backbone config: {e}")))
}

fn resolve_backbone(recorded: &str, given: Option<&Path>, ckpt: &Path) -> Result<PathBuf> {
    if recorded == "tiny" && given.is_none() {
        return Err(ExportError::Input(format!(
            "{} was trained on the in-memory `tiny` backbone, which has no weights file to export; \
             train on a backbone folder (e.g. tests/fixtures/clip/tiny-hf or models/<name>)",
            ckpt.display()
        )));
    }
    // A hub backbone is recorded as `org/name@<commit>`: the cache has it (or the hub does).
    let p = match given {
        Some(g) => g.to_path_buf(),
        None => capt_clip::hub::local_path(recorded)?.0,
    };
    if !p.exists() {
        return Err(ExportError::Input(format!(
            "the checkpoint's backbone {} does not exist; pass --backbone DIR pointing at the same CLIP weights",
            p.display()
        )));
    }
    Ok(p)
}

/// From a training checkpoint (a checkpoint folder or a run's `--out` folder).
pub fn from_checkpoint(
    path: &Path,
    backbone: Option<&Path>,
    classes: &Classes,
) -> Result<ExportSource> {
    let dir = checkpoint::resolve(path)?;
    let state = checkpoint::read_state(&dir)?;
    for f in [checkpoint::LEARNED, checkpoint::TABLES] {
        if !dir.join(f).is_file() {
            return Err(ExportError::Input(format!(
                "checkpoint {} is incomplete: {f} is missing; export a finished checkpoint (the run's LATEST)",
                dir.display()
            )));
        }
    }
    let bb_path = resolve_backbone(&state.backbone.path, backbone, &dir)?;
    let sha = capt_clip::backbone_hash(&bb_path)?;
    if sha != state.backbone.sha256 {
        return Err(ExportError::Input(format!(
            "backbone {} has sha256 {sha} but {} was trained on {} (sha256 {}); pass --backbone with the original weights",
            bb_path.display(),
            dir.display(),
            state.backbone.path,
            state.backbone.sha256
        )));
    }
    let class_names = match classes {
        Classes::Trained => state.class_names.clone(),
        Classes::File(f) => read_class_file(f)?,
        Classes::All { root } => {
            let kind = state.dataset.parse().map_err(|e| {
                ExportError::Input(format!("checkpoint dataset `{}`: {e}", state.dataset))
            })?;
            let ds = capt_train::fit::load_dataset(
                kind,
                root,
                None,
                state.shots,
                state.seed,
                capt_data::Subsample::All,
            )?;
            ds.classnames.clone()
        }
    };
    let method = state.config.method;
    let trains = method.trains();
    let dev = Device::Cpu;
    let cfg = state.backbone.config.clone();
    let bb = Backbone::load_with_config(
        &BackboneSpec::Path(bb_path.clone()),
        Some(&cfg),
        CDType::F32,
        &dev,
    )?;
    let scorer = evaluate::scorer_from_checkpoint(bb, &dir, &state, &class_names)?;

    let mut params = backbone_params(&bb_path, &cfg)?;
    // Learned tensors (contexts, deep prompts, head parameters) under their checkpoint names.
    for (name, var) in scorer.model.params.iter() {
        let t = var.as_tensor();
        let t = if name == names::CTX && t.rank() == 3 {
            // Class-specific contexts cannot serve new names: the text encoder gets their mean.
            tracing::warn!(
                "class-specific contexts: text_encoder.onnx uses their mean for new classes"
            );
            t.mean(0)?
        } else {
            t.clone()
        };
        params.insert(name.clone(), host(&t, name)?);
    }
    params.insert(
        names::CLASS_EMB.into(),
        host(&scorer.class_emb, "class_emb")?,
    );
    if let (Some(hc), Some(cache)) = (&scorer.model.head, &scorer.cache) {
        let t = cache.head_tables(hc)?;
        for (name, v) in [
            (names::CAND_INDEX, &t.cand_index),
            (names::CAND_WEIGHT, &t.cand_weight),
            (names::T_COM, &t.t_com),
            (names::T_DIF, &t.t_dif),
            (names::T_DIF_REV, &t.t_dif_rev),
            (names::POOL_GLOBAL, &t.pool_global),
            (names::POOL_LOCAL, &t.pool_local),
            (names::CELLS, &t.cells),
        ] {
            params.insert(name.into(), host_any(v, name)?);
        }
    }

    let has_sem = params.contains_key(names::COM_CTX) && params.contains_key(names::DIF_CTX);
    let m_ctx = if has_sem {
        params[names::COM_CTX].dims()[0]
    } else {
        0
    };
    let mut families = vec![TextFamily::Class, TextFamily::ZeroShot];
    if has_sem && method.uses_bank() {
        families.extend([TextFamily::Com, TextFamily::Dif]);
    }
    let p = &state.config.prompt;
    let spec = ModelSpec {
        clip: clip_spec(&cfg)?,
        method,
        num_classes: class_names.len(),
        local_grid: state.config.bank.local_grid,
        visual_prompt_layers: if trains { p.vision_depth } else { 0 },
        capt: method.uses_bank().then(|| state.config.clone()),
        text: TextSpec {
            n_ctx: if trains { p.n_ctx } else { 0 },
            deep_layers: if trains {
                p.text_depth.saturating_sub(1)
            } else {
                0
            },
            m_ctx,
            class_prompt: if trains {
                "{}.".into()
            } else {
                state.template.clone()
            },
            zs_template: state.template.clone(),
            families,
        },
    };
    spec.validate()?;
    Ok(ExportSource {
        model_name: format!("{}-{}", method.name(), state.dataset),
        spec,
        class_names,
        params,
        backbone_sha256: sha,
        backbone: match backbone {
            Some(b) => b.display().to_string(),
            None => state.backbone.path.clone(),
        },
        source_checkpoint_sha256: checkpoint_digest(&dir)?,
    })
}

/// Zero-shot CLIP for `class_names` with `template` (`{}` = class name): no training. `arch`
/// (`--arch`) names what a checkpoint without a config cannot tell (`capt_clip::arch_hint`).
pub fn zero_shot(
    backbone: &Path,
    arch: Option<&str>,
    class_names: Vec<String>,
    template: &str,
    local_grid: usize,
) -> Result<ExportSource> {
    if !template.contains("{}") {
        return Err(ExportError::Input(format!(
            "template {template:?} has no `{{}}` where the class name goes, e.g. \"a photo of a {{}}.\""
        )));
    }
    // A hub id resolves into the hub cache; the manifest records it pinned to its commit.
    let (local, pinned) = capt_clip::hub::local_path(&backbone.to_string_lossy())?;
    if !local.exists() {
        return Err(ExportError::Input(format!(
            "backbone {} does not exist; pass an HF CLIP folder (config.json + model.safetensors), \
             a weights file, or a hub id such as openai/clip-vit-base-patch16",
            backbone.display()
        )));
    }
    let spec = BackboneSpec::Path(local.clone()).with_arch(arch)?;
    let recorded = pinned.unwrap_or_else(|| spec.display());
    let backbone = local.as_path();
    let sha = capt_clip::backbone_hash(backbone)?;
    let dev = Device::Cpu;
    let bb = Backbone::load(&spec, CDType::F32, &dev)?;
    let cfg = bb.config.clone();
    let mut run = RunConfig::default();
    run.capt.bank.local_grid = local_grid;
    run.capt.method = Method::ZeroShot;
    let scorer = evaluate::zero_shot_scorer(bb, &run, &class_names, template)?;
    let mut params = backbone_params(backbone, &cfg)?;
    params.insert(
        names::CLASS_EMB.into(),
        host(&scorer.class_emb, "class_emb")?,
    );
    let spec = ModelSpec {
        clip: clip_spec(&cfg)?,
        method: Method::ZeroShot,
        num_classes: class_names.len(),
        local_grid,
        visual_prompt_layers: 0,
        capt: None,
        text: TextSpec {
            n_ctx: 0,
            deep_layers: 0,
            m_ctx: 0,
            class_prompt: template.into(),
            zs_template: template.into(),
            families: vec![TextFamily::Class, TextFamily::ZeroShot],
        },
    };
    spec.validate()?;
    Ok(ExportSource {
        model_name: "zero-shot-clip".into(),
        spec,
        class_names,
        params,
        backbone_sha256: sha,
        backbone: recorded,
        source_checkpoint_sha256: String::new(),
    })
}
