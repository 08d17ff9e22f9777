//! `capt-train b2n`: the base-to-novel benchmark (CoCoOp's Table 1). For every dataset, seed
//! and method: train on the base classes (few-shot), evaluate base and novel test classes in
//! their own label spaces; per dataset report the seed means of Base and Novel and their HM;
//! the average row is the HM of the mean Base and mean Novel over datasets.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device};
use capt_core::fs::write_atomic;
use capt_data::{Dataset, DatasetKind, Layout, Split, Subsample};
use capt_method::metrics::harmonic_mean;
use capt_method::Method;
use serde::{Deserialize, Serialize};

use crate::backbone::{Backbone, BackboneSpec};
use crate::checkpoint;
use crate::config::RunConfig;
use crate::error::{Result, TrainError};
use crate::evaluate::{
    confusion, part_report, scorer_from_checkpoint, split_features, summarise, write_report,
    zero_shot_scorer, Report, Scorer, SplitFeatures, REPORT_FORMAT,
};
use crate::fit::{fit, FitArgs};
use crate::model::resolve_template;

#[derive(Debug, Clone)]
pub struct B2nArgs {
    pub datasets: Vec<DatasetKind>,
    pub seeds: Vec<u64>,
    pub methods: Vec<Method>,
    pub root: PathBuf,
    /// Split-file name for datasets laid out by a split file, `{name}` standing for the part
    /// of CoOp's file name after `split_zhou_` (`split_mini_{name}.json` ->
    /// `split_mini_DescribableTextures.json`); relative to each dataset folder. `None`: CoOp's.
    pub split_file: Option<String>,
    pub config: RunConfig,
    pub backbone: BackboneSpec,
    pub device: Device,
    pub dtype: DType,
    pub out: PathBuf,
    pub progress: bool,
}

/// One (dataset, method, seed) result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct B2nRow {
    pub dataset: String,
    pub method: String,
    pub seed: u64,
    pub base: f64,
    pub novel: f64,
    pub hm: f64,
    /// Correction Rate against zero-shot on the base / novel test classes (percent; `None`
    /// when zero-shot has no confusable pair there).
    #[serde(default)]
    pub cr_base: Option<f64>,
    #[serde(default)]
    pub cr_novel: Option<f64>,
}

/// Seed means of a (dataset, method) and the HM of the means, with the spread over seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct B2nCell {
    pub base: f64,
    pub novel: f64,
    pub hm: f64,
    pub seeds: usize,
    /// Sample standard deviations over seeds (0 for one seed); `hm_std` is that of the
    /// per-seed HMs.
    pub base_std: f64,
    pub novel_std: f64,
    pub hm_std: f64,
    /// Mean Correction Rate against zero-shot over the seeds that have one.
    pub cr_base: Option<f64>,
    pub cr_novel: Option<f64>,
}

pub fn run(args: &B2nArgs) -> Result<Vec<B2nRow>> {
    if args.datasets.is_empty() || args.seeds.is_empty() || args.methods.is_empty() {
        return Err(TrainError::Config(
            "b2n needs at least one dataset, seed and method".into(),
        ));
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|e| TrainError::io("create output folder", &args.out, e))?;
    let _log = crate::progress::attach(&args.out)?;
    let cells = crate::progress::bar(
        args.progress,
        args.datasets.len() * args.methods.len() * args.seeds.len(),
        "b2n cells",
    );
    let backbone = Backbone::load(&args.backbone, args.dtype, &args.device)?;
    let feature_cache = args.out.join("feature-cache");
    let mut rows = Vec::new();
    for &kind in &args.datasets {
        let split_file = split_file_for(kind, args.split_file.as_deref());
        let split_file = split_file.as_deref();
        // Test features of each half, shared by every method without vision prompts.
        let mut memo: BTreeMap<String, SplitFeatures> = BTreeMap::new();
        let mut features =
            |scorer: &Scorer, ds: &capt_data::Dataset, key: String| -> Result<SplitFeatures> {
                if scorer.model.uses_vision_prompts() {
                    return split_features(&scorer.model, ds, Split::Test);
                }
                if !memo.contains_key(&key) {
                    memo.insert(key.clone(), split_features(&scorer.model, ds, Split::Test)?);
                }
                Ok(memo[&key].clone())
            };
        // The zero-shot baseline of each half: every cell's Correction Rate is against it.
        let baseline_dir = args.out.join(kind.name()).join("baseline-zero-shot");
        std::fs::create_dir_all(&baseline_dir)
            .map_err(|e| TrainError::io("create output folder", &baseline_dir, e))?;
        let mut baseline_parts = Vec::new();
        let mut baseline_name = String::new();
        for part in [Subsample::Base, Subsample::New] {
            let ds = Dataset::for_protocol(kind, &args.root, split_file, 0, args.seeds[0], part)?;
            baseline_name = ds.name.clone();
            let template = resolve_template(&args.config.capt, ds.template());
            let scorer =
                zero_shot_scorer(backbone.clone(), &args.config, &ds.classnames, &template)?;
            let sf = features(&scorer, &ds, part.to_string())?;
            let m = confusion(&scorer, &sf)?;
            baseline_parts.push(part_report(part, &ds.classnames, m, &baseline_dir, None)?);
        }
        let mut baseline = Report {
            format: REPORT_FORMAT.into(),
            dataset: baseline_name,
            split: "test".into(),
            method: Method::ZeroShot.name().into(),
            checkpoint: None,
            backbone: backbone.record.clone(),
            seed: None,
            shots: None,
            parts: baseline_parts,
            base: None,
            novel: None,
            hm: None,
        };
        summarise(&mut baseline);
        write_report(&baseline_dir, &baseline)?;
        let baseline_path = baseline_dir.join("report.json");
        for &method in &args.methods {
            let mut cfg = args.config.clone();
            cfg.capt.method = method;
            cfg.validate()?;
            for &seed in &args.seeds {
                let run_dir = args
                    .out
                    .join(kind.name())
                    .join(method.name())
                    .join(format!("seed{seed}"));
                cells.set_message(format!("{} {} seed {seed}", kind.name(), method.name()));
                let ckpt = if method.trains() {
                    let summary = fit(&FitArgs {
                        dataset: kind,
                        root: args.root.clone(),
                        split_file: split_file.map(PathBuf::from),
                        config: cfg.clone(),
                        backbone: args.backbone.clone(),
                        device: args.device.clone(),
                        dtype: args.dtype,
                        seed,
                        subsample: Subsample::Base,
                        out: run_dir.clone(),
                        resume: true,
                        stop_after: None,
                        feature_cache: Some(feature_cache.clone()),
                        progress: args.progress,
                    })?;
                    Some(summary.checkpoint)
                } else {
                    None
                };
                let eval_dir = run_dir.join("eval-test");
                std::fs::create_dir_all(&eval_dir)
                    .map_err(|e| TrainError::io("create output folder", &eval_dir, e))?;
                let mut parts = Vec::new();
                let mut name = String::new();
                for part in [Subsample::Base, Subsample::New] {
                    let ds = Dataset::for_protocol(kind, &args.root, split_file, 0, seed, part)?;
                    name = ds.name.clone();
                    let scorer: Scorer = match &ckpt {
                        Some(dir) => {
                            let dir = checkpoint::resolve(dir)?;
                            let state = checkpoint::read_state(&dir)?;
                            scorer_from_checkpoint(backbone.clone(), &dir, &state, &ds.classnames)?
                        }
                        None => {
                            let template = resolve_template(&cfg.capt, ds.template());
                            zero_shot_scorer(backbone.clone(), &cfg, &ds.classnames, &template)?
                        }
                    };
                    let sf = features(&scorer, &ds, part.to_string())?;
                    let m = confusion(&scorer, &sf)?;
                    parts.push(part_report(
                        part,
                        &ds.classnames,
                        m,
                        &eval_dir,
                        Some((&baseline_path, &baseline)),
                    )?);
                }
                let cr = |i: usize| {
                    parts
                        .get(i)
                        .and_then(|p: &crate::evaluate::PartReport| p.baseline.as_ref())
                        .and_then(|b| b.correction_rate)
                };
                let (cr_base, cr_novel) = (cr(0), cr(1));
                let mut report = Report {
                    format: REPORT_FORMAT.into(),
                    dataset: name.clone(),
                    split: "test".into(),
                    method: method.name().into(),
                    checkpoint: ckpt.as_ref().map(|d| d.display().to_string()),
                    backbone: backbone.record.clone(),
                    seed: Some(seed),
                    shots: Some(cfg.capt.data.shots),
                    parts,
                    base: None,
                    novel: None,
                    hm: None,
                };
                summarise(&mut report);
                write_report(&eval_dir, &report)?;
                let row = B2nRow {
                    dataset: name,
                    method: method.name().into(),
                    seed,
                    base: report.base.unwrap_or(0.0),
                    novel: report.novel.unwrap_or(0.0),
                    hm: report.hm.unwrap_or(0.0),
                    cr_base,
                    cr_novel,
                };
                tracing::info!(?row, "base-to-novel result");
                rows.push(row);
                cells.inc(1);
            }
        }
    }
    cells.finish_and_clear();
    let (md, csv) = render(&rows, &args.methods);
    for (file, text) in [("b2n.md", &md), ("b2n.csv", &csv)] {
        let p = args.out.join(file);
        write_atomic(&p, text.as_bytes()).map_err(|e| TrainError::io("write", &p, e))?;
    }
    crate::progress::record(&md);
    print!("{md}");
    Ok(rows)
}

/// The split file of `kind` named by `template` (see [`B2nArgs::split_file`]); `None` for
/// CoOp's own file and for datasets whose splits are not a split file (ImageNet, Aircraft).
pub fn split_file_for(kind: DatasetKind, template: Option<&str>) -> Option<PathBuf> {
    match (kind.layout(), template) {
        (Layout::SplitFile { split_file }, Some(t)) => {
            let name = split_file
                .trim_start_matches("split_zhou_")
                .trim_end_matches(".json");
            Some(PathBuf::from(t.replace("{name}", name)))
        }
        _ => None,
    }
}

/// Mean and sample standard deviation.
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let m = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (m, 0.0);
    }
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
    (m, var.sqrt())
}

fn mean_some(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let got: Vec<f64> = v.flatten().collect();
    (!got.is_empty()).then(|| got.iter().sum::<f64>() / got.len() as f64)
}

/// Seed means per (dataset, method), datasets in first-seen order.
pub fn cells(rows: &[B2nRow]) -> (Vec<String>, BTreeMap<(String, String), B2nCell>) {
    let mut datasets: Vec<String> = Vec::new();
    let mut acc: BTreeMap<(String, String), Vec<&B2nRow>> = BTreeMap::new();
    for r in rows {
        if !datasets.contains(&r.dataset) {
            datasets.push(r.dataset.clone());
        }
        acc.entry((r.dataset.clone(), r.method.clone()))
            .or_default()
            .push(r);
    }
    let cells = acc
        .into_iter()
        .map(|(k, rs)| {
            let col =
                |f: fn(&B2nRow) -> f64| mean_std(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
            let (b, b_sd) = col(|r| r.base);
            let (n, n_sd) = col(|r| r.novel);
            let (_, h_sd) = col(|r| r.hm);
            (
                k,
                B2nCell {
                    base: b,
                    novel: n,
                    hm: harmonic_mean(b, n),
                    seeds: rs.len(),
                    base_std: b_sd,
                    novel_std: n_sd,
                    hm_std: h_sd,
                    cr_base: mean_some(rs.iter().map(|r| r.cr_base)),
                    cr_novel: mean_some(rs.iter().map(|r| r.cr_novel)),
                },
            )
        })
        .collect();
    (datasets, cells)
}

/// Average over datasets: mean Base, mean Novel, and the HM of those means (spreads and
/// Correction Rates averaged over the datasets).
pub fn average(
    cells: &BTreeMap<(String, String), B2nCell>,
    datasets: &[String],
    method: &str,
) -> Option<B2nCell> {
    let mine: Vec<&B2nCell> = datasets
        .iter()
        .filter_map(|d| cells.get(&(d.clone(), method.to_string())))
        .collect();
    if mine.is_empty() {
        return None;
    }
    let n = mine.len() as f64;
    let avg = |f: fn(&B2nCell) -> f64| mine.iter().map(|c| f(c)).sum::<f64>() / n;
    let (b, v) = (avg(|c| c.base), avg(|c| c.novel));
    Some(B2nCell {
        base: b,
        novel: v,
        hm: harmonic_mean(b, v),
        seeds: mine.iter().map(|c| c.seeds).min().unwrap_or(0),
        base_std: avg(|c| c.base_std),
        novel_std: avg(|c| c.novel_std),
        hm_std: avg(|c| c.hm_std),
        cr_base: mean_some(mine.iter().map(|c| c.cr_base)),
        cr_novel: mean_some(mine.iter().map(|c| c.cr_novel)),
    })
}

/// Markdown (Table-1 style: one table per dataset plus the average; mean +- std over seeds,
/// Correction Rate against zero-shot) and CSV.
pub fn render(rows: &[B2nRow], methods: &[Method]) -> (String, String) {
    let (datasets, cells) = cells(rows);
    let names: Vec<&str> = methods.iter().map(|m| m.name()).collect();
    let mut md = String::from("# Base-to-novel generalisation\n\nmean +- std over seeds; CR = Correction Rate against zero-shot on the test classes' confusable pairs (zero-shot >= 2 errors), base / novel.\n");
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let table = |title: &str, get: &dyn Fn(&str) -> Option<B2nCell>| {
        let mut s = format!(
            "\n## {title}\n\n| method | Base | Novel | HM | CR base | CR novel |\n|---|---|---|---|---|---|\n"
        );
        for m in &names {
            if let Some(c) = get(m) {
                s.push_str(&format!(
                    "| {m} | {:.2} +- {:.2} | {:.2} +- {:.2} | {:.2} +- {:.2} | {} | {} |\n",
                    c.base,
                    c.base_std,
                    c.novel,
                    c.novel_std,
                    c.hm,
                    c.hm_std,
                    pct(c.cr_base),
                    pct(c.cr_novel)
                ));
            }
        }
        s
    };
    md.push_str(&table(
        &format!("Average over {} dataset(s)", datasets.len()),
        &|m| average(&cells, &datasets, m),
    ));
    for d in &datasets {
        md.push_str(&table(d, &|m| {
            cells.get(&(d.clone(), m.to_string())).cloned()
        }));
    }
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
    let mut csv = String::from("dataset,method,seed,base,novel,hm,cr_base,cr_novel\n");
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{:.4},{:.4},{:.4},{},{}\n",
            r.dataset,
            r.method,
            r.seed,
            r.base,
            r.novel,
            r.hm,
            opt(r.cr_base),
            opt(r.cr_novel)
        ));
    }
    let mut summary = |d: &str, m: &str, c: &B2nCell| {
        csv.push_str(&format!(
            "{d},{m},mean,{:.4},{:.4},{:.4},{},{}\n",
            c.base,
            c.novel,
            c.hm,
            opt(c.cr_base),
            opt(c.cr_novel)
        ));
    };
    for d in &datasets {
        for m in &names {
            if let Some(c) = cells.get(&(d.clone(), m.to_string())) {
                summary(d, m, c);
            }
        }
    }
    for m in &names {
        if let Some(c) = average(&cells, &datasets, m) {
            summary("average", m, &c);
        }
    }
    (md, csv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(d: &str, m: &str, s: u64, b: f64, n: f64) -> B2nRow {
        B2nRow {
            dataset: d.into(),
            method: m.into(),
            seed: s,
            base: b,
            novel: n,
            hm: harmonic_mean(b, n),
            cr_base: Some(b / 2.0),
            cr_novel: None,
        }
    }

    #[test]
    fn average_row_is_hm_of_means() {
        let rows = vec![
            row("A", "coop", 1, 80.0, 60.0),
            row("A", "coop", 2, 90.0, 70.0),
            row("B", "coop", 1, 60.0, 40.0),
        ];
        let (ds, cells) = cells(&rows);
        let a = &cells[&("A".to_string(), "coop".to_string())];
        assert_eq!((a.base, a.novel, a.seeds), (85.0, 65.0, 2));
        let avg = average(&cells, &ds, "coop").unwrap();
        assert!((avg.base - 72.5).abs() < 1e-12 && (avg.novel - 52.5).abs() < 1e-12);
        assert!((avg.hm - harmonic_mean(72.5, 52.5)).abs() < 1e-12);
        let (md, csv) = render(&rows, &[Method::Coop]);
        // A: seeds 80 / 90 -> std 7.07; CR base (40 + 45) / 2.
        assert!((a.base_std - 50f64.sqrt()).abs() < 1e-12);
        assert_eq!((a.cr_base, a.cr_novel), (Some(42.5), None));
        assert!(
            md.contains("| coop | 72.50 +- 3.54 | 52.50 +- 3.54 |"),
            "{md}"
        );
        assert!(csv.contains("average,coop,mean,72.5000,52.5000"), "{csv}");
    }

    #[test]
    fn split_file_template_names_each_datasets_file() {
        let t = Some("split_mini_{name}.json");
        assert_eq!(
            split_file_for(DatasetKind::Dtd, t),
            Some(PathBuf::from("split_mini_DescribableTextures.json"))
        );
        assert_eq!(
            split_file_for(DatasetKind::EuroSat, t),
            Some(PathBuf::from("split_mini_EuroSAT.json"))
        );
        // No split file in these layouts, and no template: CoOp's default.
        assert_eq!(split_file_for(DatasetKind::ImageNet, t), None);
        assert_eq!(split_file_for(DatasetKind::Dtd, None), None);
    }
}
