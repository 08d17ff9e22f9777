//! What gets exported: a training checkpoint (or a bare CLIP, for zero-shot) read into a
//! [`Package`] (a `ModelSpec` plus every parameter the graphs read, by name).
//!
//! The checkpoint is read as host tensors (`capt-checkpoint`): the learned contexts and head
//! parameters, and the class embeddings and CAPT tables `capt-train` stored with them, i.e.
//! exactly what `capt-train eval` scores with. No training model is built. Classes beyond
//! the trained ones (`--classes all|FILE`) and the classes of a zero-shot export go through
//! `capt_package::classes::retarget` with the package's own text encoder run by tract: the
//! path `capt-edge add-class` takes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use capt_checkpoint as checkpoint;
use capt_clip::BackboneSpec;
use capt_graph::HostTensor;
use capt_method::head::HeadTables;
use capt_method::Method;
use capt_model::{names, ClipSpec, ModelSpec, TextFamily, TextSpec};
use capt_package::classes::{retarget, TractTextEncoder};
use capt_package::{text_encoder_graph, ExportOptions, Package};

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

/// The CLIP tensors (HF names) of a backbone file, as host tensors.
fn backbone_params(
    path: &Path,
    opts: &capt_clip::LoadOptions<'_>,
) -> Result<(capt_clip::ClipConfig, BTreeMap<String, HostTensor>)> {
    let (cfg, tensors, _) = capt_clip::load_hf_tensors_with(path, opts)?;
    let params = tensors
        .iter()
        .map(|(k, t)| {
            let t = t.to_dtype(candle_core::DType::F32)?;
            let h = HostTensor::from_candle(&t)
                .map_err(|e| ExportError::Source(format!("{k}: {e}")))?;
            Ok((k.clone(), h))
        })
        .collect::<Result<_>>()?;
    Ok((cfg, params))
}

/// Mean over the first axis of a `[C, n, W]` tensor (class-specific contexts).
fn mean_rows(t: &HostTensor) -> Result<HostTensor> {
    let v = t
        .as_f32()
        .ok_or_else(|| ExportError::Source("prompt context is not float".into()))?;
    let c = t.dims()[0].max(1);
    let rest: Vec<usize> = t.dims()[1..].to_vec();
    let n = v.len() / c;
    let mut out = vec![0.0f32; n];
    for row in v.chunks(n) {
        for (o, x) in out.iter_mut().zip(row) {
            *o += x / c as f32;
        }
    }
    Ok(HostTensor::f32(rest, out)?)
}

/// Retargets `pkg` to `target` with the package's own text encoder (built in memory, f32,
/// run by tract): new classes get the learned context and, for CAPT, prior candidates.
fn retarget_in_memory(pkg: &mut Package, target: &[String]) -> Result<()> {
    if pkg.class_names == target {
        return Ok(());
    }
    let text = text_encoder_graph(pkg, &ExportOptions::default())?;
    let spec = pkg.spec.clone();
    let mut enc = TractTextEncoder::from_model(&spec, &text.model)?;
    retarget(pkg, target, &mut enc)?;
    Ok(())
}

/// From a training checkpoint (a checkpoint folder or a run's `--out` folder).
pub fn from_checkpoint(path: &Path, backbone: Option<&Path>, classes: &Classes) -> Result<Package> {
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
    let target = match classes {
        Classes::Trained => state.class_names.clone(),
        Classes::File(f) => read_class_file(f)?,
        Classes::All { root } => {
            let kind = state.dataset.parse().map_err(|e| {
                ExportError::Input(format!("checkpoint dataset `{}`: {e}", state.dataset))
            })?;
            capt_data::Dataset::for_protocol(
                kind,
                root,
                None,
                state.shots,
                state.seed,
                capt_data::Subsample::All,
            )?
            .classnames
        }
    };
    let method = state.config.method;
    let trains = method.trains();
    if target != state.class_names && state.config.prompt.class_specific {
        return Err(ExportError::Input(format!(
            "checkpoint {} has class-specific contexts, which exist only for its own classes; export it with --classes base",
            dir.display()
        )));
    }
    let cfg = &state.backbone.config;
    let (_, mut params) = backbone_params(
        &bb_path,
        &capt_clip::LoadOptions {
            config: Some(cfg),
            arch: None,
        },
    )?;
    // Learned tensors (contexts, deep prompts, head parameters) under their checkpoint names.
    for (name, t) in checkpoint::read_tensors(&dir, checkpoint::LEARNED)? {
        let t = if name == names::CTX && t.dims().len() == 3 {
            // Class-specific contexts cannot serve new names: the text encoder gets their mean.
            tracing::warn!(
                "class-specific contexts: text_encoder.onnx uses their mean for new classes"
            );
            mean_rows(&t)?
        } else {
            t
        };
        params.insert(name, t);
    }
    // The class embeddings and CAPT tables the trainer scored its classes with.
    let tables_path = dir.join(checkpoint::TABLES);
    let mut tables = checkpoint::read_tensors(&dir, checkpoint::TABLES)?;
    let mut take = |n: &str| {
        tables.remove(n).ok_or_else(|| {
            ExportError::Input(format!(
                "{} has no `{n}`; export a checkpoint written by this capt-train",
                tables_path.display()
            ))
        })
    };
    params.insert(names::CLASS_EMB.into(), take("class_emb")?);
    if method.uses_bank() {
        for (n, t) in HeadTables::try_named(&mut take)?.into_named() {
            params.insert(names::table(n), t);
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
        clip: ClipSpec::from(cfg),
        method,
        num_classes: state.class_names.len(),
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
    let mut pkg = Package {
        model_name: format!("{}-{}", method.name(), state.dataset),
        spec,
        class_names: state.class_names.clone(),
        params,
        backbone_sha256: sha,
        backbone: match backbone {
            Some(b) => b.display().to_string(),
            None => state.backbone.path.clone(),
        },
        source_checkpoint_sha256: checkpoint::digest(&dir)?,
        version: 1,
    };
    retarget_in_memory(&mut pkg, &target)?;
    Ok(pkg)
}

/// Zero-shot CLIP for `class_names` with `template` (`{}` = class name): no training. `arch`
/// (`--arch`) names what a checkpoint without a config cannot tell (`capt_clip::arch_hint`).
pub fn zero_shot(
    backbone: &Path,
    arch: Option<&str>,
    class_names: Vec<String>,
    template: &str,
    local_grid: usize,
) -> Result<Package> {
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
    let sha = capt_clip::backbone_hash(&local)?;
    let (cfg, mut params) =
        backbone_params(&local, &capt_clip::LoadOptions { config: None, arch })?;
    let d = cfg.projection_dim;
    // No classes yet: the retarget below encodes every class with the template.
    params.insert(
        names::CLASS_EMB.into(),
        HostTensor::f32(vec![0, d], vec![])?,
    );
    let spec = ModelSpec {
        clip: ClipSpec::from(&cfg),
        method: Method::ZeroShot,
        num_classes: 0,
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
    let mut pkg = Package {
        model_name: "zero-shot-clip".into(),
        spec,
        class_names: vec![],
        params,
        backbone_sha256: sha,
        backbone: recorded,
        source_checkpoint_sha256: String::new(),
        version: 1,
    };
    retarget_in_memory(&mut pkg, &class_names)?;
    Ok(pkg)
}
