//! The graphs of a [`Package`] (one emitter each) and the model directory written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use capt_backend::{FileEntry, Manifest, ModelFiles, Precision, FORMAT_VERSION, MANIFEST_FILE};
use capt_core::PreprocessConfig;
use capt_graph::{DType, HostTensor};
use capt_model::{graphs, ModelSpec};
use capt_onnx::{
    pb, BuildOptions, Dim, F16Options, F16Report, ModelMeta, OnnxBuilder, QuantReport, WriteOptions,
};

use crate::error::{io, PackageError, Result};
use crate::io_names::*;
use crate::triton;

/// A model ready to be emitted: what it computes, for which classes, with which parameters.
#[derive(Debug, Clone)]
pub struct Package {
    pub spec: ModelSpec,
    pub class_names: Vec<String>,
    /// Every parameter the graphs may read, by name (`capt_model::names`).
    pub params: BTreeMap<String, HostTensor>,
    pub model_name: String,
    pub backbone_sha256: String,
    /// The backbone as the checkpoint recorded it (a path, or `org/name@<commit>`).
    pub backbone: String,
    /// Digest of the checkpoint folder's files (empty for zero-shot exports).
    pub source_checkpoint_sha256: String,
    /// The graphs' `model_version`: 1 from an export, one more with each class edit.
    pub version: i64,
}

/// Layout of the output directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// `classifier.onnx`, `text_encoder.onnx`, `image_encoder.onnx`, `capt.json` (capt-edge).
    #[default]
    Onnx,
    /// A Triton Inference Server model repository.
    Triton,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExportOptions {
    pub precision: Precision,
    /// Weight-only int8 storage for the linear layers (`--int8 weights`, see
    /// `capt_onnx::quantize_weights_int8`): files ~4x smaller, compute stays f32. Only with
    /// `Precision::F32`; `Precision::Int8` is integer compute.
    pub int8_weights: bool,
    pub opset: i64,
    pub text_encoder: bool,
    pub image_encoder: bool,
    pub format: Format,
    /// Replace an existing output directory.
    pub force: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            precision: Precision::F32,
            int8_weights: false,
            opset: capt_onnx::OPSET,
            text_encoder: true,
            image_encoder: true,
            format: Format::Onnx,
            force: false,
        }
    }
}

/// One emitted graph.
pub struct Graph {
    /// `classifier`, `text_encoder` or `image_encoder`.
    pub role: &'static str,
    pub model: pb::ModelProto,
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub out: PathBuf,
    /// Files written (relative path, bytes).
    pub files: Vec<(String, u64)>,
    pub build_seconds: f64,
    pub write_seconds: f64,
    pub quant: Option<QuantReport>,
    /// Per graph role, what the f16 conversion did (`--precision f16`).
    pub f16: Vec<(&'static str, F16Report)>,
}

pub use capt_onnx::INT8_MIN_ELEMS;

fn metadata(src: &Package, role: &str, precision: Precision) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("capt.graph".into(), role.into());
    m.insert("capt.version".into(), src.version.to_string());
    m.insert("capt.precision".into(), precision.as_str().into());
    m.insert("capt.format_version".into(), FORMAT_VERSION.to_string());
    m.insert("capt.model_name".into(), src.model_name.clone());
    m.insert("capt.method".into(), src.spec.method.name().into());
    m.insert(
        "capt.class_names".into(),
        serde_json::to_string(&src.class_names).expect("strings serialise"),
    );
    m.insert(
        "capt.embedding_dim".into(),
        src.spec.clip.projection_dim.to_string(),
    );
    m.insert(
        "capt.preprocess".into(),
        serde_json::to_string(&preprocess(&src.spec)).expect("serialises"),
    );
    m.insert("capt.backbone_sha256".into(), src.backbone_sha256.clone());
    m.insert(
        "capt.source_checkpoint_sha256".into(),
        src.source_checkpoint_sha256.clone(),
    );
    m.insert("capt.model_spec".into(), src.spec.to_json().to_string());
    m
}

fn preprocess(spec: &ModelSpec) -> PreprocessConfig {
    PreprocessConfig::clip(spec.clip.vision.image_size as u32)
}

/// A builder of the f32 graph: f16 compute is a rewrite of the finished f32 graph, not f16
/// weight storage (whose widening casts would be left as no-ops).
fn builder(params: &BTreeMap<String, HostTensor>) -> OnnxBuilder {
    OnnxBuilder::new(
        params.iter().map(|(k, v)| (k.clone(), v.clone())),
        BuildOptions::default(),
    )
}

fn finish(
    b: OnnxBuilder,
    src: &Package,
    role: &'static str,
    opts: &ExportOptions,
) -> Result<Graph> {
    let meta = ModelMeta {
        graph_name: format!("capt_{role}"),
        doc_string: format!(
            "capt {role} ({}, {} classes), written by capt-export {}",
            src.spec.method.name(),
            src.class_names.len(),
            env!("CARGO_PKG_VERSION")
        ),
        model_version: src.version,
        metadata: metadata(src, role, opts.precision),
    };
    Ok(Graph {
        role,
        model: b.finish(&meta)?,
    })
}

/// The image input `pixel_values f32 [N, 3, H, W]` (symbolic batch).
fn pixel_input(b: &OnnxBuilder, src: &Package) -> Result<capt_onnx::Value> {
    let s = src.spec.clip.vision.image_size;
    Ok(b.input(
        PIXEL_VALUES,
        DType::F32,
        &["N".into(), 3.into(), s.into(), s.into()],
    )?)
}

/// `classifier.onnx`: `pixel_values [N, 3, H, W]` -> `logits`, `probs` `[N, C]`.
pub fn classifier_graph(
    src: &Package,
    params: &BTreeMap<String, HostTensor>,
    opts: &ExportOptions,
) -> Result<Graph> {
    let b = builder(params);
    let x = pixel_input(&b, src)?;
    let out = graphs::classifier(&b, &src.spec, &x)?;
    b.output(LOGITS, &out.logits)?;
    b.output(PROBS, &out.probs)?;
    finish(b, src, CLASSIFIER, opts)
}

/// `image_encoder.onnx`: `pixel_values` -> `image_embeds` (normalised), `global`, `local`.
pub fn image_encoder_graph(src: &Package, opts: &ExportOptions) -> Result<Graph> {
    let b = builder(&src.params);
    let x = pixel_input(&b, src)?;
    let out = graphs::image_encoder(&b, &src.spec, &x)?;
    b.output(IMAGE_EMBEDS, &out.image_embeds)?;
    b.output(GLOBAL, &out.global)?;
    b.output(LOCAL, &out.local)?;
    finish(b, src, IMAGE_ENCODER, opts)
}

/// `text_encoder.onnx`: `input_ids [M, 77]` (I64, model vocabulary) -> one `[M, D]` output
/// per prompt family of the spec.
pub fn text_encoder_graph(src: &Package, opts: &ExportOptions) -> Result<Graph> {
    let b = builder(&src.params);
    let len = src.spec.clip.text.max_position_embeddings;
    let ids = b.input(INPUT_IDS, DType::I64, &[Dim::Sym("M".into()), len.into()])?;
    let outs = graphs::text_encoder(&b, &src.spec, &ids, len)?;
    for (fam, o) in src.spec.text.families.iter().zip(&outs) {
        b.output(fam.output(), o)?;
    }
    finish(b, src, TEXT_ENCODER, opts)
}

/// What [`build_graphs`] did beyond emitting the graphs.
#[derive(Debug, Clone, Default)]
pub struct BuildReport {
    pub quant: Option<QuantReport>,
    pub f16: Vec<(&'static str, F16Report)>,
}

/// Emits every graph the options ask for (int8 or f16 applied), in a fixed order.
pub fn build_graphs(src: &Package, opts: &ExportOptions) -> Result<(Vec<Graph>, BuildReport)> {
    build_graphs_with(src, opts, &mut |_| {})
}

/// How many `step` calls [`export_with_progress`] makes for `opts` (a progress bar's length).
pub fn export_steps(opts: &ExportOptions) -> usize {
    let graphs = 1 + usize::from(opts.text_encoder) + usize::from(opts.image_encoder);
    let passes = usize::from(opts.int8_weights || opts.precision != Precision::F32);
    graphs * (1 + passes) + 1
}

/// [`build_graphs`], calling `step(what)` after each graph and each pass over a graph.
fn build_graphs_with(
    src: &Package,
    opts: &ExportOptions,
    step: &mut dyn FnMut(&str),
) -> Result<(Vec<Graph>, BuildReport)> {
    if opts.opset != capt_onnx::OPSET {
        return Err(PackageError::Input(format!(
            "--opset {}: capt writes opset {} (ReduceMean and Squeeze change form in 18); use --opset {}",
            opts.opset,
            capt_onnx::OPSET,
            capt_onnx::OPSET
        )));
    }
    if opts.int8_weights && opts.precision != Precision::F32 {
        return Err(PackageError::Input(format!(
            "--int8 weights stores f32-compute weights as int8; it does not combine with {} compute: pick one",
            opts.precision
        )));
    }
    let mut graphs = vec![classifier_graph(src, &src.params, opts)?];
    step("classifier graph");
    if opts.text_encoder {
        graphs.push(text_encoder_graph(src, opts)?);
        step("text encoder graph");
    }
    if opts.image_encoder {
        graphs.push(image_encoder_graph(src, opts)?);
        step("image encoder graph");
    }
    let mut quant: Option<QuantReport> = None;
    let mut f16 = Vec::new();
    for g in graphs.iter_mut() {
        let (q, f) = apply_precision(g, opts)?;
        if let Some(r) = q {
            let q = quant.get_or_insert_with(QuantReport::default);
            q.tensors += r.tensors;
            q.bytes_before += r.bytes_before;
            q.bytes_after += r.bytes_after;
            q.max_abs_error = q.max_abs_error.max(r.max_abs_error);
            step("int8");
        }
        if let Some(f) = f {
            f16.push((g.role, f));
            step("f16 compute");
        }
    }
    Ok((graphs, BuildReport { quant, f16 }))
}

/// Whether a parameter is a weight of a CLIP tower's transformer blocks: what integer compute
/// quantises (99 % of a ViT's multiply-adds). The patch embedding, the projections into the
/// joint space, the CAPT head, the tables and the learned prompts stay f32: the projections
/// cost little and their error goes straight into the embeddings (measured: max |d prob|
/// 1.50e-2 with them quantised, 1.37e-2 without, semantic fixture).
pub fn tower_weight(name: &str) -> bool {
    ["vision_model.encoder.", "text_model.encoder."]
        .iter()
        .any(|p| name.starts_with(p))
}

/// The passes `opts` asks for on an emitted f32 graph: int8 weight storage, integer compute
/// (classifier and image encoder; the text encoder keeps f32 so class embeddings added at the
/// edge match the exported ones), or f16 compute.
pub(crate) fn apply_precision(
    g: &mut Graph,
    opts: &ExportOptions,
) -> Result<(Option<QuantReport>, Option<F16Report>)> {
    let quant = if opts.int8_weights {
        Some(capt_onnx::quantize_weights_int8(
            &mut g.model,
            INT8_MIN_ELEMS,
        )?)
    } else if opts.precision == Precision::Int8 && g.role != TEXT_ENCODER {
        Some(capt_onnx::quantize_dynamic_int8(
            &mut g.model,
            INT8_MIN_ELEMS,
            &tower_weight,
        )?)
    } else {
        None
    };
    let f16 = if opts.precision == Precision::F16 {
        Some(capt_onnx::to_f16_compute(
            &mut g.model,
            &F16Options::default(),
        )?)
    } else {
        None
    };
    Ok((quant, f16))
}

/// The manifest for graph files already written under `dir`: `(role, path relative to dir)`;
/// the classifier must be among them.
pub fn manifest(
    src: &Package,
    dir: &Path,
    files: &[(&str, String)],
    precision: Precision,
) -> Result<Manifest> {
    let entry = |role: &str| -> Result<Option<FileEntry>> {
        let Some((_, path)) = files.iter().find(|(r, _)| *r == role) else {
            return Ok(None);
        };
        let sha256 = capt_backend::sha256_file(&dir.join(path))
            .map_err(|e| PackageError::Input(e.to_string()))?;
        Ok(Some(FileEntry {
            path: path.clone(),
            sha256,
        }))
    };
    let classifier = entry(CLASSIFIER)?
        .ok_or_else(|| PackageError::Input("no classifier graph was written".into()))?;
    Ok(Manifest {
        format_version: FORMAT_VERSION,
        model_name: src.model_name.clone(),
        class_names: src.class_names.clone(),
        embedding_dim: src.spec.clip.projection_dim,
        preprocess: preprocess(&src.spec),
        method: src.spec.method.name().into(),
        files: ModelFiles {
            classifier,
            text_encoder: entry(TEXT_ENCODER)?,
            image_encoder: entry(IMAGE_ENCODER)?,
        },
        source_checkpoint_sha256: src.source_checkpoint_sha256.clone(),
        backbone: src.backbone.clone(),
        backbone_sha256: src.backbone_sha256.clone(),
        created_by: format!("capt-export {}", env!("CARGO_PKG_VERSION")),
        model_spec: Some(src.spec.to_json()),
        precision,
    })
}

/// Writes `graphs` + `capt.json` into the (new, empty) directory `dir`.
pub fn write_model_dir(
    src: &Package,
    graphs: &[Graph],
    dir: &Path,
    precision: Precision,
) -> Result<Vec<(String, u64)>> {
    let mut files = Vec::new();
    for g in graphs {
        let name = format!("{}.onnx", g.role);
        let w = capt_onnx::write_model(&dir.join(&name), &g.model, &WriteOptions::default())?;
        files.push((name, w.model_bytes));
        if let Some((p, n)) = w.data {
            files.push((
                p.file_name().unwrap_or_default().to_string_lossy().into(),
                n,
            ));
        }
    }
    let entries: Vec<(&str, String)> = graphs
        .iter()
        .map(|g| (g.role, format!("{}.onnx", g.role)))
        .collect();
    let m = manifest(src, dir, &entries, precision)?;
    files.push((MANIFEST_FILE.into(), write_manifest(dir, &m)?));
    Ok(files)
}

/// Writes `dir/capt.json` atomically (what a class edit's switch to a new classifier rests
/// on); returns its size.
pub fn write_manifest(dir: &Path, m: &Manifest) -> Result<u64> {
    let text = serde_json::to_string_pretty(m).expect("manifest serialises") + "\n";
    let path = dir.join(MANIFEST_FILE);
    capt_core::fs::write_atomic(&path, text.as_bytes()).map_err(io(&path))?;
    Ok(text.len() as u64)
}

/// Builds and writes the export to `out` atomically: everything goes to a temporary sibling
/// directory which is renamed into place only when complete (an existing `out` is replaced
/// only with `force`).
pub fn export(src: &Package, opts: &ExportOptions, out: &Path) -> Result<ExportReport> {
    export_with_progress(src, opts, out, &mut |_| {})
}

/// [`export`], calling `step(what)` as each graph is built and when the files are written
/// ([`export_steps`] calls in all).
pub fn export_with_progress(
    src: &Package,
    opts: &ExportOptions,
    out: &Path,
    step: &mut dyn FnMut(&str),
) -> Result<ExportReport> {
    if out.exists() && !opts.force {
        return Err(PackageError::Input(format!(
            "{} already exists; choose another --out or pass --force to replace it",
            out.display()
        )));
    }
    let t0 = Instant::now();
    let (graphs, built) = build_graphs_with(src, opts, step)?;
    let build_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    if out.file_name().is_none() {
        return Err(PackageError::Input(format!(
            "--out {} has no folder name",
            out.display()
        )));
    }
    let mut files = Vec::new();
    capt_core::fs::commit_dir(out, opts.force, |tmp| {
        files = match opts.format {
            Format::Onnx => write_model_dir(src, &graphs, tmp, opts.precision)?,
            Format::Triton => triton::write_repository(src, &graphs, tmp, opts.precision)?,
        };
        step("files written");
        Ok::<(), PackageError>(())
    })?;
    Ok(ExportReport {
        out: out.to_path_buf(),
        files,
        build_seconds,
        write_seconds: t1.elapsed().as_secs_f64(),
        quant: built.quant,
        f16: built.f16,
    })
}
