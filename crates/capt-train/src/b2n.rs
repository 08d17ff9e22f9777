//! `capt-train b2n`: the base-to-novel benchmark (CoCoOp's Table 1). For every dataset, seed
//! and method: train on the base classes (few-shot), evaluate base and novel test classes in
//! their own label spaces; per dataset report the seed means of Base and Novel and their HM;
//! the average row is the HM of the mean Base and mean Novel over datasets.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device};
use capt_data::{DatasetKind, Layout, Split, Subsample};
use capt_method::metrics::{harmonic_mean, write_atomic};
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
use crate::fit::{fit, load_dataset, FitArgs};
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
}

/// Seed means of a (dataset, method) and the HM of the means.
#[derive(Debug, Clone, PartialEq)]
pub struct B2nCell {
    pub base: f64,
    pub novel: f64,
    pub hm: f64,
    pub seeds: usize,
}

pub fn run(args: &B2nArgs) -> Result<Vec<B2nRow>> {
    if args.datasets.is_empty() || args.seeds.is_empty() || args.methods.is_empty() {
        return Err(TrainError::Config(
            "b2n needs at least one dataset, seed and method".into(),
        ));
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|e| TrainError::io("create output folder", &args.out, e))?;
    let backbone = Backbone::load(&args.backbone, args.dtype, &args.device)?;
    let feature_cache = args.out.join("feature-cache");
    let mut rows = Vec::new();
    for &kind in &args.datasets {
        let split_file = split_file_for(kind, args.split_file.as_deref());
        let split_file = split_file.as_deref();
        // Test features of each half, shared by every method without vision prompts.
        let mut memo: BTreeMap<String, SplitFeatures> = BTreeMap::new();
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
                    let ds = load_dataset(kind, &args.root, split_file, 0, seed, part)?;
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
                    let key = part.to_string();
                    let sf = if scorer.model.uses_vision_prompts() {
                        split_features(&scorer.model, &ds, Split::Test)?
                    } else {
                        if !memo.contains_key(&key) {
                            memo.insert(
                                key.clone(),
                                split_features(&scorer.model, &ds, Split::Test)?,
                            );
                        }
                        memo[&key].clone()
                    };
                    let m = confusion(&scorer, &sf)?;
                    parts.push(part_report(part, &ds.classnames, m, &eval_dir, None)?);
                }
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
                };
                tracing::info!(?row, "base-to-novel result");
                rows.push(row);
            }
        }
    }
    let (md, csv) = render(&rows, &args.methods);
    for (file, text) in [("b2n.md", &md), ("b2n.csv", &csv)] {
        let p = args.out.join(file);
        write_atomic(&p, text.as_bytes()).map_err(|e| TrainError::io("write", &p, e))?;
    }
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

/// Seed means per (dataset, method), datasets in first-seen order.
pub fn cells(rows: &[B2nRow]) -> (Vec<String>, BTreeMap<(String, String), B2nCell>) {
    let mut datasets: Vec<String> = Vec::new();
    let mut acc: BTreeMap<(String, String), (f64, f64, usize)> = BTreeMap::new();
    for r in rows {
        if !datasets.contains(&r.dataset) {
            datasets.push(r.dataset.clone());
        }
        let e = acc
            .entry((r.dataset.clone(), r.method.clone()))
            .or_insert((0.0, 0.0, 0));
        e.0 += r.base;
        e.1 += r.novel;
        e.2 += 1;
    }
    let cells = acc
        .into_iter()
        .map(|(k, (b, n, s))| {
            let (b, n) = (b / s as f64, n / s as f64);
            (
                k,
                B2nCell {
                    base: b,
                    novel: n,
                    hm: harmonic_mean(b, n),
                    seeds: s,
                },
            )
        })
        .collect();
    (datasets, cells)
}

/// Average over datasets: mean Base, mean Novel, and the HM of those means.
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
    let b = mine.iter().map(|c| c.base).sum::<f64>() / n;
    let v = mine.iter().map(|c| c.novel).sum::<f64>() / n;
    Some(B2nCell {
        base: b,
        novel: v,
        hm: harmonic_mean(b, v),
        seeds: mine.iter().map(|c| c.seeds).min().unwrap_or(0),
    })
}

/// Markdown (Table-1 style: one table per dataset plus the average) and CSV.
pub fn render(rows: &[B2nRow], methods: &[Method]) -> (String, String) {
    let (datasets, cells) = cells(rows);
    let names: Vec<&str> = methods.iter().map(|m| m.name()).collect();
    let mut md = String::from("# Base-to-novel generalisation\n");
    let table = |title: &str, get: &dyn Fn(&str) -> Option<B2nCell>| {
        let mut s = format!("\n## {title}\n\n| method | Base | Novel | HM |\n|---|---|---|---|\n");
        for m in &names {
            if let Some(c) = get(m) {
                s.push_str(&format!(
                    "| {m} | {:.2} | {:.2} | {:.2} |\n",
                    c.base, c.novel, c.hm
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
    let mut csv = String::from("dataset,method,seed,base,novel,hm\n");
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{:.4},{:.4},{:.4}\n",
            r.dataset, r.method, r.seed, r.base, r.novel, r.hm
        ));
    }
    for d in &datasets {
        for m in &names {
            if let Some(c) = cells.get(&(d.clone(), m.to_string())) {
                csv.push_str(&format!(
                    "{d},{m},mean,{:.4},{:.4},{:.4}\n",
                    c.base, c.novel, c.hm
                ));
            }
        }
    }
    for m in &names {
        if let Some(c) = average(&cells, &datasets, m) {
            csv.push_str(&format!(
                "average,{m},mean,{:.4},{:.4},{:.4}\n",
                c.base, c.novel, c.hm
            ));
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
        assert!(md.contains("| coop | 72.50 | 52.50 |"), "{md}");
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
