//! `capt-train eval` / `zeroshot`: top-1, macro-F1 and the confusion matrix of a split;
//! base / novel / HM under the base-to-novel protocol (each half in its own label space);
//! the confusable pairs of a baseline report (>= 2 errors) and the Correction Rate against
//! it; `report.json`, `report.md` and confusion heatmaps.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use capt_core::fs::write_atomic;
use capt_data::{Dataset, DatasetKind, Split, Subsample};
use capt_graph::HostTensor;
use capt_method::classes::{retarget, ClassTables, HeadRule};
use capt_method::head::HeadTables;
use capt_method::metrics::{harmonic_mean, ConfusionMatrix};
use capt_method::{ConfusionBank, Method};
use serde::{Deserialize, Serialize};

use crate::backbone::{Backbone, BackboneRecord, BackboneSpec};
use crate::checkpoint::{self, State};
use crate::config::RunConfig;
use crate::error::{Result, TrainError};
use crate::features::for_each_eval_batch;
use crate::model::{argmax_rows, resolve_template, Feats, Model};
use crate::params::read_safetensors;
use crate::tables::{CandleEncoder, TableCache};

/// Which classes an evaluation covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalSubsample {
    All,
    Base,
    New,
    /// Base and new halves, each in its own label space, plus their harmonic mean.
    BaseToNew,
}

impl std::str::FromStr for EvalSubsample {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(Self::All),
            "base" => Ok(Self::Base),
            "new" | "novel" => Ok(Self::New),
            "b2n" | "base-to-new" => Ok(Self::BaseToNew),
            other => Err(TrainError::Config(format!(
                "--subsample {other:?}: expected all, base, new or b2n"
            ))),
        }
    }
}

impl EvalSubsample {
    pub fn parts(self) -> Vec<Subsample> {
        match self {
            Self::All => vec![Subsample::All],
            Self::Base => vec![Subsample::Base],
            Self::New => vec![Subsample::New],
            Self::BaseToNew => vec![Subsample::Base, Subsample::New],
        }
    }
}

/// Labels and image features of one split (cached image side: independent of the prompts).
#[derive(Debug, Clone)]
pub struct SplitFeatures {
    pub labels: Vec<usize>,
    pub feats: Feats,
}

/// One evaluated class set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartReport {
    /// `all`, `base` or `new`.
    pub part: String,
    pub class_names: Vec<String>,
    pub images: usize,
    pub top1: f64,
    pub macro_f1: f64,
    pub confusion: ConfusionMatrix,
    /// Largest off-diagonal cells: (true, predicted, count).
    pub top_confusions: Vec<(String, String, u64)>,
    /// Unlabelled PNG thumbnail of the row-normalised matrix.
    pub heatmap: String,
    /// The labelled heatmap (class names, colour bar, counts): the one to read.
    #[serde(default)]
    pub heatmap_svg: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<BaselineComparison>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaselineComparison {
    pub report: String,
    pub method: String,
    /// Confusable pairs of the baseline (>= 2 test errors).
    pub pairs: usize,
    pub errors_before: u64,
    pub errors_after: u64,
    /// `1 - after / before` over the pairs, percent; `None` without confusable pairs.
    pub correction_rate: Option<f64>,
    pub baseline_top1: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub format: String,
    pub dataset: String,
    pub split: String,
    pub method: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    pub backbone: BackboneRecord,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shots: Option<usize>,
    pub parts: Vec<PartReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub novel: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hm: Option<f64>,
}

pub const REPORT_FORMAT: &str = "capt-train-report-v1";

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalArgs {
    /// A checkpoint folder or run folder; `None` = zero-shot CLIP.
    pub checkpoint: Option<PathBuf>,
    pub dataset: DatasetKind,
    pub root: PathBuf,
    pub split_file: Option<PathBuf>,
    pub split: Split,
    /// Default: `b2n` for a checkpoint trained on base classes, else `all`.
    pub subsample: Option<EvalSubsample>,
    pub baseline: Option<PathBuf>,
    /// Default: the checkpoint's backbone path (required for zero-shot).
    pub backbone: Option<BackboneSpec>,
    pub device: Device,
    pub dtype: DType,
    /// Output folder (default: `<checkpoint>/../eval-<split>` or `eval-zeroshot-<split>`).
    pub out: Option<PathBuf>,
    /// Settings for zero-shot runs (template, batch sizes, local grid).
    pub config: RunConfig,
}

/// A model ready to score images of one part.
pub struct Scorer {
    pub model: Model,
    pub class_emb: Tensor,
    pub cache: Option<TableCache>,
}

impl Scorer {
    pub fn logits(&self, feats: &Feats) -> Result<Tensor> {
        self.model
            .predict(feats, &self.class_emb, self.cache.as_ref())
    }
}

/// A scorer for `classnames` from a checkpoint: on the trained classes the checkpoint's tables
/// are used as saved; on other classes (novel) class embeddings come from the learned
/// context and the CAPT tables from the text prior with an empty bank.
pub fn scorer_from_checkpoint(
    backbone: Backbone,
    dir: &Path,
    state: &State,
    classnames: &[String],
) -> Result<Scorer> {
    let cfg = RunConfig {
        capt: state.config.clone(),
        trainer: state.trainer.clone(),
    };
    let same = classnames == state.class_names.as_slice();
    if !same && cfg.capt.prompt.class_specific {
        return Err(TrainError::checkpoint(
            dir,
            "has class-specific contexts, which exist only for its own classes; evaluate it on them (--subsample as trained)",
        ));
    }
    let mut model = Model::new(
        backbone,
        &cfg,
        classnames,
        &state.template,
        state.local_tokens,
        state.seed,
    )?;
    let lp = dir.join(checkpoint::LEARNED);
    model
        .params
        .load_safetensors(&checkpoint::read_file(dir, checkpoint::LEARNED)?, &lp)?;
    let read_tables = || {
        let tp = dir.join(checkpoint::TABLES);
        read_safetensors(
            &checkpoint::read_file(dir, checkpoint::TABLES)?,
            &tp,
            &model.backbone.device,
        )
    };
    if same {
        let tp = dir.join(checkpoint::TABLES);
        let t = read_tables()?;
        let class_emb = t
            .get("class_emb")
            .cloned()
            .ok_or_else(|| TrainError::checkpoint(&tp, "has no `class_emb`"))?;
        let cache = match &model.head {
            Some(hc) => Some(TableCache::from_checkpoint(&t, hc)?),
            None => None,
        };
        return Ok(Scorer {
            model,
            class_emb,
            cache,
        });
    }
    // Every trained class in the list (e.g. `--classes all`): the trained state retargeted to
    // the list by the one class rule (`capt_method::classes`, also the exporter's and the
    // edge's); else the list's own embeddings and, for CAPT, prior-only tables.
    let all_trained = state.class_names.iter().all(|n| classnames.contains(n));
    let (class_emb, cache) = if all_trained {
        let t = read_tables()?;
        let tp = dir.join(checkpoint::TABLES);
        let host = |n: &str| -> Result<HostTensor> {
            let v = t
                .get(n)
                .ok_or_else(|| TrainError::checkpoint(&tp, format!("has no `{n}`")))?;
            let v = if v.dtype().is_float() {
                v.to_dtype(DType::F32)?
            } else {
                v.clone()
            };
            Ok(HostTensor::from_candle(&v)?)
        };
        let saved = ClassTables {
            names: state.class_names.clone(),
            class_emb: host("class_emb")?,
            head: match &model.head {
                Some(_) => Some(HeadTables::try_named(host)?),
                None => None,
            },
        };
        let rule = HeadRule {
            k_cand: cfg.capt.sem.k_cand,
            prior_beta: cfg.capt.bank.prior_beta,
            prior_temperature: cfg.capt.bank.prior_temperature,
        };
        let mut enc = CandleEncoder::new(&model);
        let out = retarget(saved, classnames, Some(&rule), &mut enc)
            .map_err(|e| TrainError::Config(format!("classes beyond the trained ones: {e}")))?;
        let dev = &model.backbone.device;
        let work = model.backbone.work;
        let class_emb = out.class_emb.to_candle(dev, work)?;
        let cache = match (&model.head, out.head) {
            (Some(hc), Some(h)) => {
                let mut named = std::collections::BTreeMap::new();
                for (n, v) in h.into_named() {
                    named.insert(n.to_string(), v.to_candle(dev, work)?);
                }
                named.insert("class_emb".to_string(), class_emb.clone());
                Some(TableCache::from_checkpoint(&named, hc)?)
            }
            _ => None,
        };
        (class_emb, cache)
    } else {
        let cache = match &model.head {
            Some(_) => {
                let bank = ConfusionBank::new(
                    model.num_classes(),
                    model.backbone.dim(),
                    model.local_tokens,
                    &cfg.capt.bank,
                );
                Some(TableCache::build(&model, &bank)?)
            }
            None => None,
        };
        (model.class_embeddings(false)?, cache)
    };
    Ok(Scorer {
        model,
        class_emb,
        cache,
    })
}

/// A zero-shot CLIP scorer.
pub fn zero_shot_scorer(
    backbone: Backbone,
    cfg: &RunConfig,
    classnames: &[String],
    template: &str,
) -> Result<Scorer> {
    let mut cfg = cfg.clone();
    cfg.capt.method = Method::ZeroShot;
    let grid = cfg.capt.bank.local_grid;
    let model = Model::new(backbone, &cfg, classnames, template, grid * grid, 0)?;
    let class_emb = model.zs_emb.clone();
    Ok(Scorer {
        model,
        class_emb,
        cache: None,
    })
}

/// Image features of a split through `model`'s image side.
pub fn split_features(model: &Model, ds: &Dataset, split: Split) -> Result<SplitFeatures> {
    let (mut labels, mut gs, mut ls) = (Vec::new(), Vec::new(), Vec::new());
    for_each_eval_batch(model, ds, split, model.cfg.trainer.eval_batch, |lab, f| {
        labels.extend_from_slice(lab);
        gs.push(f.global.clone());
        ls.push(f.local.clone());
        Ok(())
    })?;
    if labels.is_empty() {
        return Err(TrainError::Config(format!(
            "{} has no {split} images for these classes",
            ds.name
        )));
    }
    Ok(SplitFeatures {
        labels,
        feats: Feats {
            global: Tensor::cat(&gs, 0)?,
            local: Tensor::cat(&ls, 0)?,
        },
    })
}

/// Confusion matrix of a scorer on features (in chunks of `trainer.eval_batch`).
pub fn confusion(scorer: &Scorer, sf: &SplitFeatures) -> Result<ConfusionMatrix> {
    let c = scorer.model.num_classes();
    let mut m = ConfusionMatrix::new(c);
    let n = sf.labels.len();
    let chunk = scorer.model.cfg.trainer.eval_batch;
    let mut s = 0;
    while s < n {
        let len = chunk.min(n - s);
        let feats = Feats {
            global: sf.feats.global.narrow(0, s, len)?,
            local: sf.feats.local.narrow(0, s, len)?,
        };
        for (p, &y) in argmax_rows(&scorer.logits(&feats)?)?
            .into_iter()
            .zip(&sf.labels[s..s + len])
        {
            if y >= c {
                return Err(TrainError::Config(format!(
                    "label {y} outside the {c} evaluated classes"
                )));
            }
            m.add(y, p);
        }
        s += len;
    }
    Ok(m)
}

/// Builds one part's report and writes its heatmap into `out`.
pub fn part_report(
    part: Subsample,
    class_names: &[String],
    m: ConfusionMatrix,
    out: &Path,
    baseline: Option<(&Path, &Report)>,
) -> Result<PartReport> {
    let heatmap = format!("heatmap-{part}.png");
    let px = (512 / class_names.len().max(1)).clamp(2, 24) as u32;
    let hp = out.join(&heatmap);
    crate::heatmap::png(&m, px)
        .and_then(|bytes| write_atomic(&hp, &bytes))
        .map_err(|e| TrainError::io("write", &hp, e))?;
    let heatmap_svg = format!("heatmap-{part}.svg");
    let sp = out.join(&heatmap_svg);
    let title = format!(
        "{part} classes ({}): top-1 {:.1} % on {} images",
        class_names.len(),
        m.accuracy(),
        m.total()
    );
    write_atomic(&sp, crate::heatmap::svg(&m, class_names, &title).as_bytes())
        .map_err(|e| TrainError::io("write", &sp, e))?;
    let top_confusions = m
        .top_confusions(10)
        .into_iter()
        .map(|(i, j, v)| (class_names[i].clone(), class_names[j].clone(), v))
        .collect();
    let baseline = match baseline {
        Some((path, rep)) => Some(compare(path, rep, part, class_names, &m)?),
        None => None,
    };
    Ok(PartReport {
        part: part.to_string(),
        class_names: class_names.to_vec(),
        images: m.total() as usize,
        top1: m.accuracy(),
        macro_f1: m.macro_f1(),
        top_confusions,
        heatmap,
        heatmap_svg,
        baseline,
        confusion: m,
    })
}

fn compare(
    path: &Path,
    rep: &Report,
    part: Subsample,
    names: &[String],
    after: &ConfusionMatrix,
) -> Result<BaselineComparison> {
    let bp = rep
        .parts
        .iter()
        .find(|p| p.part == part.to_string())
        .ok_or_else(|| {
            TrainError::Config(format!(
                "baseline {} has no `{part}` part (it has {}); evaluate the baseline with the same --subsample",
                path.display(),
                rep.parts.iter().map(|p| p.part.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })?;
    if bp.class_names != names {
        return Err(TrainError::Config(format!(
            "baseline {} covers other classes ({} vs {}); compare reports of the same dataset and subsample",
            path.display(),
            bp.class_names.len(),
            names.len()
        )));
    }
    let pairs = bp.confusion.confusable_pairs(2);
    let before: u64 = pairs.iter().map(|&(i, j)| bp.confusion.get(i, j)).sum();
    let after_n: u64 = pairs.iter().map(|&(i, j)| after.get(i, j)).sum();
    Ok(BaselineComparison {
        report: path.display().to_string(),
        method: rep.method.clone(),
        pairs: pairs.len(),
        errors_before: before,
        errors_after: after_n,
        correction_rate: ConfusionMatrix::correction_rate(&bp.confusion, after, &pairs),
        baseline_top1: bp.top1,
    })
}

pub fn read_report(path: &Path) -> Result<Report> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TrainError::io("read baseline report", path, e))?;
    let r: Report = serde_json::from_str(&text).map_err(|e| {
        TrainError::Config(format!(
            "{} is not a capt-train report.json: {e}",
            path.display()
        ))
    })?;
    if r.format != REPORT_FORMAT {
        return Err(TrainError::Config(format!(
            "{} has format {:?}; expected {REPORT_FORMAT}",
            path.display(),
            r.format
        )));
    }
    Ok(r)
}

/// Fills base / novel / HM from the parts.
pub fn summarise(report: &mut Report) {
    let acc = |name: &str| report.parts.iter().find(|p| p.part == name).map(|p| p.top1);
    report.base = acc("base");
    report.novel = acc("new");
    report.hm = match (report.base, report.novel) {
        (Some(b), Some(n)) => Some(harmonic_mean(b, n)),
        _ => None,
    };
}

/// Writes `report.json` and `report.md` into `out`.
pub fn write_report(out: &Path, report: &Report) -> Result<()> {
    let jp = out.join("report.json");
    write_atomic(
        &jp,
        serde_json::to_string_pretty(report)
            .expect("report serialises")
            .as_bytes(),
    )
    .map_err(|e| TrainError::io("write", &jp, e))?;
    let mp = out.join("report.md");
    write_atomic(&mp, render_markdown(report).as_bytes())
        .map_err(|e| TrainError::io("write", &mp, e))
}

pub fn render_markdown(r: &Report) -> String {
    let mut s = format!("# {} on {} ({})\n\n", r.method, r.dataset, r.split);
    if let Some(c) = &r.checkpoint {
        s.push_str(&format!("Checkpoint: `{c}`  \n"));
    }
    s.push_str(&format!(
        "Backbone: `{}` (sha256 `{}`)\n\n",
        r.backbone.path, &r.backbone.sha256
    ));
    s.push_str("| classes | images | top-1 (%) | macro-F1 (%) | confusable pairs | Correction Rate (%) |\n|---|---|---|---|---|---|\n");
    for p in &r.parts {
        let (pairs, cr) = match &p.baseline {
            Some(b) => (
                b.pairs.to_string(),
                b.correction_rate
                    .map_or("n/a".into(), |v| format!("{v:.2}")),
            ),
            None => ("-".into(), "-".into()),
        };
        s.push_str(&format!(
            "| {} ({}) | {} | {:.2} | {:.2} | {pairs} | {cr} |\n",
            p.part,
            p.class_names.len(),
            p.images,
            p.top1,
            p.macro_f1
        ));
    }
    if let (Some(b), Some(n), Some(h)) = (r.base, r.novel, r.hm) {
        s.push_str(&format!("\nBase {b:.2} / Novel {n:.2} / HM {h:.2}\n"));
    }
    for p in &r.parts {
        if p.heatmap_svg.is_empty() {
            s.push_str(&format!(
                "\n## {} classes\n\nHeatmap: `{}`\n\n",
                p.part, p.heatmap
            ));
        } else {
            s.push_str(&format!(
                "\n## {} classes\n\n![confusion heatmap, {} classes]({})\n\n",
                p.part, p.part, p.heatmap_svg
            ));
        }
        if let Some(b) = &p.baseline {
            s.push_str(&format!(
                "Against baseline `{}` ({}, top-1 {:.2}): {} confusable pairs, {} errors before, {} after.\n\n",
                b.report, b.method, b.baseline_top1, b.pairs, b.errors_before, b.errors_after
            ));
        }
        if !p.top_confusions.is_empty() {
            s.push_str("Top confusions:\n\n| true | predicted | errors |\n|---|---|---|\n");
            for (t, q, v) in &p.top_confusions {
                s.push_str(&format!("| {t} | {q} | {v} |\n"));
            }
        }
    }
    s
}

/// `eval` and `zeroshot`: evaluates every part, writes the report, returns it.
pub fn evaluate(args: &EvalArgs) -> Result<(Report, PathBuf)> {
    let (state, ckpt_dir) = match &args.checkpoint {
        Some(p) => {
            let dir = checkpoint::resolve(p)?;
            (Some(checkpoint::read_state(&dir)?), Some(dir))
        }
        None => (None, None),
    };
    let out = match (&args.out, &ckpt_dir) {
        (Some(o), _) => o.clone(),
        (None, Some(d)) => d
            .parent()
            .unwrap_or(Path::new("."))
            .join(format!("eval-{}", args.split)),
        (None, None) => PathBuf::from(format!("eval-zeroshot-{}", args.split)),
    };
    std::fs::create_dir_all(&out).map_err(|e| TrainError::io("create output folder", &out, e))?;
    let _log = crate::progress::attach(&out)?;
    let spec = match (&args.backbone, &state) {
        (Some(s), _) => s.clone(),
        (None, Some(st)) => BackboneSpec::parse(&st.backbone.path),
        (None, None) => {
            return Err(TrainError::Config(
                "zero-shot evaluation needs --backbone".into(),
            ))
        }
    };
    let recorded = state.as_ref().map(|st| &st.backbone.config);
    let backbone = Backbone::load_with_config(&spec, recorded, args.dtype, &args.device)?;
    if let (Some(st), Some(dir)) = (&state, &ckpt_dir) {
        backbone.check_matches(&st.backbone, dir)?;
    }
    let subsample = args.subsample.unwrap_or(match &state {
        Some(st) if st.subsample == "base" => EvalSubsample::BaseToNew,
        Some(st) if st.subsample == "new" => EvalSubsample::New,
        _ => EvalSubsample::All,
    });
    let baseline = match &args.baseline {
        Some(p) => Some(read_report(p)?),
        None => None,
    };
    let mut parts = Vec::new();
    let mut dataset_name = String::new();
    for part in subsample.parts() {
        let ds = Dataset::for_protocol(
            args.dataset,
            &args.root,
            args.split_file.as_deref(),
            0,
            1,
            part,
        )?;
        dataset_name = ds.name.clone();
        let scorer = match (&state, &ckpt_dir) {
            (Some(st), Some(dir)) => {
                scorer_from_checkpoint(backbone.clone(), dir, st, &ds.classnames)?
            }
            _ => {
                let template = resolve_template(&args.config.capt, ds.template());
                zero_shot_scorer(backbone.clone(), &args.config, &ds.classnames, &template)?
            }
        };
        let sf = split_features(&scorer.model, &ds, args.split)?;
        let m = confusion(&scorer, &sf)?;
        let bl = match (&args.baseline, &baseline) {
            (Some(p), Some(r)) => Some((p.as_path(), r)),
            _ => None,
        };
        parts.push(part_report(part, &ds.classnames, m, &out, bl)?);
    }
    let mut report = Report {
        format: REPORT_FORMAT.into(),
        dataset: dataset_name,
        split: args.split.to_string(),
        method: state
            .as_ref()
            .map_or("zero-shot".into(), |s| s.method.clone()),
        checkpoint: ckpt_dir.as_ref().map(|d| d.display().to_string()),
        backbone: backbone.record.clone(),
        seed: state.as_ref().map(|s| s.seed),
        shots: state.as_ref().map(|s| s.shots),
        parts,
        base: None,
        novel: None,
        hm: None,
    };
    summarise(&mut report);
    write_report(&out, &report)?;
    Ok((report, out))
}
