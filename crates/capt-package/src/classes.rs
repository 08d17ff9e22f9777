//! The class set of an exported model: [`retarget`] applies `capt_method::classes::retarget`
//! (the one rule for what a kept class keeps and a new class gets, docs/METHOD.md §6) to a
//! [`Package`]'s parameters, with the package's own text encoder run by tract
//! ([`TractTextEncoder`]). `capt-export --classes all|FILE` exports the trained classes and
//! retargets them in memory; `capt-edge add-class` / `remove-class` ([`add_classes`],
//! [`remove_classes`]) open an exported directory as a [`Package`], retarget it, re-emit the
//! classifier with the exporter's own emitter ([`classifier_graph`]) under a new
//! content-named file and switch `capt.json` to it atomically: a reader sees the old model
//! or the new one, never a mix.

use std::path::{Path, PathBuf};
use std::time::Instant;

use capt_backend::{FileEntry, ModelDir, Precision, MANIFEST_FILE};
use capt_core::ClipTokenizer;
use capt_method::classes::{self as rule, ClassError, ClassTables, HeadRule, Prompt};
use capt_method::head::HeadTables;
use capt_model::{names, tokens, ModelSpec, TextFamily};
use capt_onnx::pb;

use crate::error::{PackageError, Result};
use crate::io_names::{CLASSIFIER, TEXT_ENCODER};
use crate::write::{apply_precision, classifier_graph, write_manifest, ExportOptions, Package};

pub use capt_method::classes::{check_names, PromptEncoder};

/// Where a [`TractTextEncoder`]'s graph comes from.
enum EncoderGraph<'a> {
    File(PathBuf),
    Memory(&'a pb::ModelProto),
}

/// A package's `text_encoder.onnx` run by tract, with capt-core's CLIP tokenizer.
pub struct TractTextEncoder<'a> {
    spec: &'a ModelSpec,
    tok: ClipTokenizer,
    graph: EncoderGraph<'a>,
}

impl<'a> TractTextEncoder<'a> {
    /// The text encoder written at `path`.
    pub fn from_file(spec: &'a ModelSpec, path: PathBuf) -> Result<Self> {
        Self::new(spec, EncoderGraph::File(path))
    }

    /// A text encoder graph in memory (an export before it is written).
    pub fn from_model(spec: &'a ModelSpec, model: &'a pb::ModelProto) -> Result<Self> {
        Self::new(spec, EncoderGraph::Memory(model))
    }

    fn new(spec: &'a ModelSpec, graph: EncoderGraph<'a>) -> Result<Self> {
        let tok = ClipTokenizer::bundled().map_err(|e| PackageError::Tokenizer(e.to_string()))?;
        Ok(Self { spec, tok, graph })
    }

    /// Embeddings `[D]` of `(family, a, b)` prompts, one tract run for all of them.
    pub fn encode_family(&self, prompts: &[(TextFamily, &str, &str)]) -> Result<Vec<Vec<f32>>> {
        if prompts.is_empty() {
            return Ok(vec![]);
        }
        let spec = self.spec;
        let len = spec.clip.text.max_position_embeddings;
        let vocab = spec.clip.text.vocab_size;
        let mut lists = Vec::with_capacity(prompts.len());
        for &(fam, a, b) in prompts {
            let text = spec.text.text(fam, a, b);
            let ids = self
                .tok
                .encode(&text)
                .map_err(|e| PackageError::Tokenizer(format!("{text:?}: {e}")))?;
            // Checks the fit with the family's context tokens.
            tokens::rows(
                &[(text.clone(), ids.clone())],
                vocab,
                len,
                spec.text.ctx_len(fam),
            )?;
            lists.push((text, ids));
        }
        let ids = tokens::rows(&lists, vocab, len, 0)?;
        let outs = match &self.graph {
            EncoderGraph::File(p) => capt_onnx::run_tract(p, &[ids])?,
            EncoderGraph::Memory(m) => {
                capt_onnx::run_tract_model(m, Path::new("text_encoder (in memory)"), &[ids])?
            }
        };
        let d = spec.clip.projection_dim;
        prompts
            .iter()
            .enumerate()
            .map(|(i, (fam, _, _))| {
                let k = spec
                    .text
                    .families
                    .iter()
                    .position(|f| f == fam)
                    .ok_or_else(|| {
                        PackageError::Input(format!(
                            "the text encoder has no `{}` output; re-export the model",
                            fam.output()
                        ))
                    })?;
                let v = outs[k].as_f32().ok_or_else(|| {
                    PackageError::Input("text encoder output is not float".into())
                })?;
                Ok(v[i * d..(i + 1) * d].to_vec())
            })
            .collect()
    }
}

impl PromptEncoder for TractTextEncoder<'_> {
    fn encode(&mut self, prompts: &[Prompt]) -> std::result::Result<Vec<Vec<f32>>, ClassError> {
        let rows: Vec<(TextFamily, &str, &str)> = prompts
            .iter()
            .map(|p| match p {
                Prompt::Class(a) => (TextFamily::Class, a.as_str(), ""),
                Prompt::ZeroShot(a) => (TextFamily::ZeroShot, a.as_str(), ""),
                Prompt::Com(a, b) => (TextFamily::Com, a.as_str(), b.as_str()),
                Prompt::Dif(a, b) => (TextFamily::Dif, a.as_str(), b.as_str()),
            })
            .collect();
        self.encode_family(&rows)
            .map_err(|e| ClassError::Encoder(Box::new(e)))
    }
}

impl From<ClassError> for PackageError {
    fn from(e: ClassError) -> Self {
        match e {
            // The encoder's own error comes back as it was (a tokenizer's "shorter name", ...).
            ClassError::Encoder(inner) => match inner.downcast::<PackageError>() {
                Ok(p) => *p,
                Err(other) => PackageError::Input(other.to_string()),
            },
            other => PackageError::Input(other.to_string()),
        }
    }
}

/// Takes `pkg` (its class names, class embeddings and CAPT tables) to `target` with
/// `capt_method::classes::retarget`; `enc` encodes what is new.
pub fn retarget(pkg: &mut Package, target: &[String], enc: &mut dyn PromptEncoder) -> Result<()> {
    let head = pkg.spec.head()?.is_some();
    let take = |name: String, params: &mut std::collections::BTreeMap<_, _>| {
        params.remove(&name).ok_or_else(|| {
            PackageError::Input(format!(
                "the classifier has no `{name}`; re-export the model with this capt version"
            ))
        })
    };
    let mut params = std::mem::take(&mut pkg.params);
    let taken = (|| -> Result<ClassTables> {
        Ok(ClassTables {
            names: pkg.class_names.clone(),
            class_emb: take(names::CLASS_EMB.into(), &mut params)?,
            head: if head {
                Some(HeadTables::try_named(|n| {
                    take(names::table(n), &mut params)
                })?)
            } else {
                None
            },
        })
    })();
    let tables = match taken {
        Ok(t) => t,
        Err(e) => {
            pkg.params = params;
            return Err(e);
        }
    };
    let rule = pkg.spec.capt.as_ref().map(|c| HeadRule {
        k_cand: c.sem.k_cand,
        prior_beta: c.bank.prior_beta,
        prior_temperature: c.bank.prior_temperature,
    });
    let backup = tables.clone();
    let out = rule::retarget(tables, target, rule.as_ref(), enc).map_err(PackageError::from);
    let t = match out {
        Ok(t) => t,
        Err(e) => {
            // The package is left as it was.
            params.insert(names::CLASS_EMB.into(), backup.class_emb);
            if let Some(h) = backup.head {
                for (n, v) in h.into_named() {
                    params.insert(names::table(n), v);
                }
            }
            pkg.params = params;
            return Err(e);
        }
    };
    params.insert(names::CLASS_EMB.into(), t.class_emb);
    if let Some(h) = t.head {
        for (n, v) in h.into_named() {
            params.insert(names::table(n), v);
        }
    }
    pkg.params = params;
    pkg.class_names = t.names;
    pkg.spec.num_classes = target.len();
    pkg.spec.validate()?;
    Ok(())
}

/// What an edit did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClassEdit {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub classes: usize,
    /// The classifier file now named by `capt.json`.
    pub classifier: String,
    /// The classifier's `model_version` after the edit.
    pub version: i64,
    pub seconds: f64,
}

/// An exported directory opened as a [`Package`] (parameters read back from its classifier).
struct Opened {
    md: ModelDir,
    pkg: Package,
    /// Whether the classifier stores int8 weights for f32 compute (`--int8 weights`, kept when
    /// it is re-emitted; integer compute is the manifest's precision).
    int8_weights: bool,
}

fn open(dir: &Path) -> Result<Opened> {
    let md = ModelDir::open(dir)?;
    let m = &md.manifest;
    let spec_json = m.model_spec.as_ref().ok_or_else(|| {
        PackageError::Input(format!(
            "{} was not written by capt-export (no `model_spec` in {MANIFEST_FILE}); re-export the model with capt-export to edit its classes",
            dir.display()
        ))
    })?;
    let spec = ModelSpec::from_json(spec_json)?;
    let model = capt_onnx::read_model(&md.classifier_path())?;
    let params = capt_onnx::read_params(&model)?;
    let int8_weights = md.manifest.precision == Precision::F32
        && model.graph.as_ref().is_some_and(|g| {
            g.initializer
                .iter()
                .any(|t| t.data_type == pb::tensor_proto::DataType::Int8 as i32)
        });
    let pkg = Package {
        spec,
        class_names: m.class_names.clone(),
        params,
        model_name: m.model_name.clone(),
        backbone_sha256: m.backbone_sha256.clone(),
        backbone: m.backbone.clone(),
        source_checkpoint_sha256: m.source_checkpoint_sha256.clone(),
        version: model.model_version,
    };
    Ok(Opened {
        md,
        pkg,
        int8_weights,
    })
}

/// Retargets the directory's model to `target`, writes the new classifier and switches the
/// manifest to it.
fn edit(dir: &Path, target: &[String], t0: Instant) -> Result<(String, i64, f64)> {
    let Opened {
        md,
        mut pkg,
        int8_weights,
    } = open(dir)?;
    let entry = md.manifest.files.text_encoder.clone().ok_or_else(|| {
        PackageError::Input(format!(
            "{} has no text_encoder.onnx; re-export without --no-text-encoder to edit its classes",
            md.root.display()
        ))
    })?;
    md.verify_file(TEXT_ENCODER, &entry)?;
    let spec = pkg.spec.clone();
    let mut enc = TractTextEncoder::from_file(&spec, md.root.join(&entry.path))?;
    retarget(&mut pkg, target, &mut enc)?;
    pkg.version += 1;
    let opts = ExportOptions {
        precision: md.manifest.precision,
        int8_weights,
        ..Default::default()
    };
    let mut g = classifier_graph(&pkg, &pkg.params, &opts)?;
    apply_precision(&mut g, &opts)?;
    let root = &md.root;
    let staging = root.join(format!(".{CLASSIFIER}.next.onnx"));
    capt_onnx::write_model(&staging, &g.model, &Default::default())?;
    let sha = capt_backend::sha256_file(&staging)?;
    let file = format!("{CLASSIFIER}-{}.onnx", &sha[..12]);
    let dest = root.join(&file);
    std::fs::rename(&staging, &dest).map_err(crate::error::io(&dest))?;
    let old = md.classifier_path();
    let mut manifest = md.manifest.clone();
    manifest.class_names = pkg.class_names.clone();
    manifest.model_spec = Some(pkg.spec.to_json());
    manifest.files.classifier = FileEntry {
        path: file.clone(),
        sha256: sha,
    };
    write_manifest(root, &manifest)?;
    if old != dest {
        let _ = std::fs::remove_file(&old);
    }
    Ok((file, pkg.version, t0.elapsed().as_secs_f64()))
}

/// Adds `new` classes to the model in `dir` (after the existing ones).
pub fn add_classes(dir: &Path, new: &[String]) -> Result<ClassEdit> {
    let t0 = Instant::now();
    check_names(new)?;
    let md = ModelDir::open(dir)?;
    let old = md.manifest.class_names.clone();
    if let Some(dup) = new.iter().find(|n| old.contains(n)) {
        return Err(PackageError::Input(format!(
            "`{dup}` is already a class of {}",
            dir.display()
        )));
    }
    let mut all = old;
    all.extend(new.iter().cloned());
    let (classifier, version, seconds) = edit(dir, &all, t0)?;
    Ok(ClassEdit {
        added: new.to_vec(),
        removed: vec![],
        classes: all.len(),
        classifier,
        version,
        seconds,
    })
}

/// Removes classes from the model in `dir`.
pub fn remove_classes(dir: &Path, gone: &[String]) -> Result<ClassEdit> {
    let t0 = Instant::now();
    check_names(gone)?;
    let md = ModelDir::open(dir)?;
    let old = md.manifest.class_names.clone();
    if let Some(missing) = gone.iter().find(|n| !old.contains(n)) {
        return Err(PackageError::Input(format!(
            "`{missing}` is not a class of {}",
            dir.display()
        )));
    }
    let kept: Vec<String> = old.iter().filter(|n| !gone.contains(n)).cloned().collect();
    let (classifier, version, seconds) = edit(dir, &kept, t0)?;
    Ok(ClassEdit {
        added: vec![],
        removed: gone.to_vec(),
        classes: kept.len(),
        classifier,
        version,
        seconds,
    })
}
