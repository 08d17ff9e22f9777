//! `capt-train fit`: the training loop.
//!
//! Per run: few-shot data (CoOp protocol), frozen backbone, seeded initialisation; for the
//! CAPT methods the Confusion Bank is built before epoch 1 from `A` augmented views of every
//! training image with the starting model and refreshed after every epoch. Each epoch: SGD
//! (momentum, weight decay, global-norm clipping) at `lr_at_epoch`, batches in a seeded order,
//! then a checkpoint. A resumed run reproduces the uninterrupted one bit for bit on CPU: batch
//! order and view choice are pure functions of (seed, epoch), and parameters, momentum, bank
//! and pair tables are restored exactly.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use capt_data::{Dataset, DatasetKind, Subsample};
use capt_method::ConfusionBank;
use serde::{Deserialize, Serialize};

use crate::backbone::{Backbone, BackboneSpec};
use crate::checkpoint::{self, State};
use crate::config::RunConfig;
use crate::error::{Result, TrainError};
use crate::features::TrainImages;
use crate::model::{argmax_rows, resolve_template, Model};
use crate::optim::Sgd;
use crate::params::tensors_to_safetensors;
use crate::rng;
use crate::tables::TableCache;

/// Everything `fit` needs.
#[derive(Debug, Clone)]
pub struct FitArgs {
    pub dataset: DatasetKind,
    pub root: PathBuf,
    pub split_file: Option<PathBuf>,
    pub config: RunConfig,
    pub backbone: BackboneSpec,
    pub device: Device,
    pub dtype: DType,
    pub seed: u64,
    pub subsample: Subsample,
    pub out: PathBuf,
    pub resume: bool,
    /// Stop (resumably) after this many epochs in this invocation.
    pub stop_after: Option<usize>,
    /// Feature cache folder (default `OUT/feature-cache`).
    pub feature_cache: Option<PathBuf>,
    pub progress: bool,
}

/// One line of `log.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub lr: f64,
    pub steps: usize,
    pub loss: f64,
    pub acc: f64,
    pub ce: f64,
    pub ce_base: f64,
    pub kg: f64,
    pub lb: f64,
    pub grad_norm: f64,
    /// Mean pairs re-encoded with gradient per step (CAPT).
    pub grad_pairs: f64,
    pub seconds: f64,
    pub ms_per_step: f64,
    /// Bank after the refresh (CAPT): total count mass, pool entries, misses and near
    /// misses observed in the refresh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bank: Option<BankStats>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BankStats {
    pub counts: f64,
    pub pool: usize,
    pub misses: usize,
    pub near_misses: usize,
    pub views: usize,
}

#[derive(Debug, Clone)]
pub struct FitSummary {
    pub checkpoint: PathBuf,
    pub epochs_done: usize,
    pub finished: bool,
    pub logs: Vec<EpochLog>,
}

pub fn fit(args: &FitArgs) -> Result<FitSummary> {
    let run_cfg = args.config.effective();
    let cfg = &run_cfg;
    cfg.validate()?;
    let c = &cfg.capt;
    if !c.method.trains() {
        return Err(TrainError::Config(
            "method `zero-shot` learns nothing; use `capt-train zeroshot` to evaluate it".into(),
        ));
    }
    let out = &args.out;
    std::fs::create_dir_all(out).map_err(|e| TrainError::io("create output folder", out, e))?;
    let _log = crate::progress::attach(out)?;
    let probe = out.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| TrainError::io("write into output folder", out, e))?;
    let _ = std::fs::remove_file(&probe);

    let ds = Dataset::for_protocol(
        args.dataset,
        &args.root,
        args.split_file.as_deref(),
        c.data.shots,
        args.seed,
        args.subsample,
    )?;
    if ds.train().is_empty() {
        return Err(TrainError::Config(format!(
            "{} has no training images for this protocol",
            ds.name
        )));
    }
    let backbone = Backbone::load(&args.backbone, args.dtype, &args.device)?;

    // Resume or refuse to overwrite.
    let existing = checkpoint::resolve(out).ok();
    let resume_from = match (&existing, args.resume) {
        (Some(dir), false) => {
            return Err(TrainError::Config(format!(
                "{} already holds a checkpoint ({}); pass --resume to continue it, or choose another --out",
                out.display(),
                dir.display()
            )))
        }
        (Some(dir), true) => Some(dir.clone()),
        (None, true) => {
            tracing::info!(out = %out.display(), "--resume: no checkpoint yet, starting from scratch");
            None
        }
        (None, false) => None,
    };
    let template = resolve_template(c, ds.template());
    let grid = c.bank.local_grid;
    let mut model = Model::new(
        backbone,
        cfg,
        &ds.classnames,
        &template,
        grid * grid,
        args.seed,
    )?;
    let mut sgd = Sgd::new(c.optim.momentum, c.optim.weight_decay, c.optim.grad_clip)
        .with_head_lr_scale(c.optim.head_lr.map_or(1.0, |h| h / c.optim.lr));
    let mut bank = model.head.as_ref().map(|_| {
        ConfusionBank::new(
            model.num_classes(),
            model.backbone.dim(),
            model.local_tokens,
            &c.bank,
        )
    });
    let mut start_epoch = 0;
    let mut step = 0;
    let mut cache: Option<TableCache> = None;
    if let Some(dir) = &resume_from {
        let state = checkpoint::read_state(dir)?;
        check_resumable(&state, &model, args, cfg, &ds, dir)?;
        restore(&mut model, &mut sgd, &mut bank, &mut cache, dir)?;
        start_epoch = state.epoch;
        step = state.step;
        tracing::info!(checkpoint = %dir.display(), epoch = state.epoch, "resuming");
        if state.finished {
            return Ok(FitSummary {
                checkpoint: dir.clone(),
                epochs_done: state.epoch,
                finished: true,
                logs: read_log(out)?,
            });
        }
    }
    let cfg_path = out.join("config.toml");
    capt_core::fs::write_atomic(&cfg_path, cfg.to_toml_string().as_bytes())
        .map_err(|e| TrainError::io("write", &cfg_path, e))?;
    truncate_log(out, start_epoch)?;

    let cache_dir = args
        .feature_cache
        .clone()
        .unwrap_or_else(|| out.join("feature-cache"));
    let images = TrainImages::prepare(&model, &ds, &cache_dir, args.seed)?;
    tracing::info!(
        dataset = %ds.name,
        classes = model.num_classes(),
        train = images.len(),
        method = %c.method,
        learned = model.params.numel(),
        "training"
    );

    // Confusion Bank before epoch 1 (starting model), and the first pair tables.
    if let (Some(b), None) = (bank.as_mut(), cache.as_ref()) {
        let empty = TableCache::build(&model, b)?;
        let stats = refresh_bank(&model, &images, b, &empty, false)?;
        tracing::info!(?stats, "confusion bank built");
        cache = Some(TableCache::build_reusing(&model, b, Some(&empty))?);
    }

    let mut logs = read_log(out)?;
    let epochs = c.optim.epochs;
    let bs = c.optim.batch_size;
    let n = images.len();
    let batches = if n >= bs { n / bs } else { 1 };
    let mut last_dir: Option<PathBuf> = resume_from.clone();
    for (done_here, epoch) in (start_epoch..epochs).enumerate() {
        let lr = cfg.capt.lr_at_epoch(epoch);
        let order = rng::permutation(
            &mut rng::rng(args.seed, rng::stream::ORDER, epoch as u64),
            n,
        );
        let bar = crate::progress::bar(
            args.progress,
            batches,
            format!("epoch {}/{epochs}", epoch + 1),
        );
        let started = Instant::now();
        let mut acc_n = 0usize;
        let mut seen = 0usize;
        let mut sums = EpochSums::default();
        for b in 0..batches {
            let idx = &order[b * bs..((b + 1) * bs).min(n)];
            let feats = images.batch(&model, idx, epoch, true)?;
            let labels: Vec<u32> = idx.iter().map(|&i| images.labels()[i] as u32).collect();
            let label_t = Tensor::from_vec(labels.clone(), labels.len(), &model.backbone.device)?;
            let outp = model.train_forward_samples(&feats, &label_t, cache.as_ref(), idx)?;
            let loss = outp.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !loss.is_finite() {
                bar.abandon();
                let kept = match &last_dir {
                    Some(d) => format!("The last good checkpoint {} is kept", d.display()),
                    None => {
                        "No checkpoint was written (the first epoch did not finish)".to_string()
                    }
                };
                return Err(TrainError::NonFiniteLoss {
                    loss,
                    epoch: epoch + 1,
                    step: step + 1,
                    method: c.method.to_string(),
                    kept,
                });
            }
            let grads = outp.loss.backward()?;
            let st = sgd.step(&model.params, &grads, lr)?;
            step += 1;
            let preds = argmax_rows(&outp.logits)?;
            acc_n += preds
                .iter()
                .zip(&labels)
                .filter(|(p, y)| **p == **y as usize)
                .count();
            seen += labels.len();
            sums.loss += loss;
            sums.ce += outp.ce as f64;
            sums.ce_base += outp.ce_base as f64;
            sums.kg += outp.kg as f64;
            sums.lb += outp.lb as f64;
            sums.grad_norm += st.grad_norm;
            sums.grad_pairs += outp.grad_pairs as f64;
            let k = (b + 1) as f64;
            bar.set_message(format!(
                "loss {:.4} acc {:.1}% lr {:.2e}",
                sums.loss / k,
                100.0 * acc_n as f64 / seen as f64,
                lr
            ));
            bar.inc(1);
        }
        bar.finish();
        let train_secs = started.elapsed().as_secs_f64();
        let mut bank_stats = None;
        if let Some(b) = bank.as_mut() {
            let current = TableCache::build(&model, b)?;
            bank_stats = Some(refresh_bank(&model, &images, b, &current, true)?);
            cache = Some(TableCache::build_reusing(&model, b, Some(&current))?);
        }
        let k = batches as f64;
        let log = EpochLog {
            epoch: epoch + 1,
            lr,
            steps: batches,
            loss: sums.loss / k,
            acc: 100.0 * acc_n as f64 / seen.max(1) as f64,
            ce: sums.ce / k,
            ce_base: sums.ce_base / k,
            kg: sums.kg / k,
            lb: sums.lb / k,
            grad_norm: sums.grad_norm / k,
            grad_pairs: sums.grad_pairs / k,
            seconds: started.elapsed().as_secs_f64(),
            ms_per_step: 1000.0 * train_secs / k,
            bank: bank_stats,
        };
        let finished = epoch + 1 == epochs;
        let state = State {
            format_version: checkpoint::FORMAT_VERSION,
            method: c.method.to_string(),
            config: c.clone(),
            trainer: cfg.trainer.clone(),
            class_names: model.classnames.clone(),
            dataset: ds.name.clone(),
            subsample: args.subsample.to_string(),
            shots: c.data.shots,
            seed: args.seed,
            epoch: epoch + 1,
            epochs,
            step,
            finished,
            backbone: model.backbone.record.clone(),
            template: model.template.clone(),
            dim: model.backbone.dim(),
            local_tokens: model.local_tokens,
            train_loss: Some(log.loss),
            train_acc: Some(log.acc),
        };
        let files = checkpoint_files(&model, &sgd, bank.as_ref(), cache.as_ref(), &state)?;
        let name = checkpoint::epoch_dir_name(epoch + 1);
        let dir = checkpoint::write_dir(out, &name, &files)?;
        checkpoint::set_latest(out, &name)?;
        checkpoint::prune(out, &name)?;
        if finished {
            checkpoint::write_dir(out, checkpoint::FINAL, &files)?;
        }
        append_log(out, &log)?;
        tracing::info!(
            epoch = epoch + 1,
            loss = format!("{:.4}", log.loss),
            acc = format!("{:.1}", log.acc),
            ms_per_step = format!("{:.0}", log.ms_per_step),
            checkpoint = %dir.display(),
            "epoch done"
        );
        logs.push(log);
        last_dir = Some(dir);
        if args.stop_after.is_some_and(|s| done_here + 1 >= s) && !finished {
            return Ok(FitSummary {
                checkpoint: last_dir.expect("an epoch finished"),
                epochs_done: epoch + 1,
                finished: false,
                logs,
            });
        }
    }
    let final_dir = out.join(checkpoint::FINAL);
    Ok(FitSummary {
        checkpoint: if final_dir.is_dir() {
            final_dir
        } else {
            last_dir.unwrap_or_else(|| out.clone())
        },
        epochs_done: epochs,
        finished: true,
        logs,
    })
}

/// Observes every training image in the bank's `A` views with the model (predictions from
/// `cache`, the tables of the current state): a refresh decays the old counts first.
pub fn refresh_bank(
    model: &Model,
    images: &TrainImages,
    bank: &mut ConfusionBank,
    cache: &TableCache,
    decay: bool,
) -> Result<BankStats> {
    if decay {
        bank.begin_refresh();
    }
    let class_emb = model.class_embeddings(false)?;
    let mut st = BankStats {
        counts: 0.0,
        pool: 0,
        misses: 0,
        near_misses: 0,
        views: 0,
    };
    images.bank_views(
        model,
        model.cfg.trainer.eval_batch,
        |samples, labels, feats| {
            let logits = model.predict(feats, &class_emb, Some(cache))?;
            let probs = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?
                .to_vec2::<f32>()?;
            let g = feats.global.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let (n, gt, d) = feats.local.dims3()?;
            let l = feats
                .local
                .reshape((n, gt * d))?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            for (i, &y) in labels.iter().enumerate() {
                match bank.observe_sample(y, &probs[i], &g[i], &l[i], Some(samples[i]))? {
                    capt_method::Observation::Miss { .. } => st.misses += 1,
                    capt_method::Observation::NearMiss { .. } => st.near_misses += 1,
                    capt_method::Observation::Correct => {}
                }
                st.views += 1;
            }
            Ok(())
        },
    )?;
    st.counts = bank.counts().iter().map(|&v| v as f64).sum();
    st.pool = bank.pool_len();
    Ok(st)
}

/// The files of a checkpoint of the current state.
pub fn checkpoint_files(
    model: &Model,
    sgd: &Sgd,
    bank: Option<&ConfusionBank>,
    cache: Option<&TableCache>,
    state: &State,
) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let dev = &model.backbone.device;
    let c = model.num_classes();
    // The cache's class embeddings are the ones its tables were built with (same contexts).
    let class_emb = match cache {
        Some(c) => c.class_emb.clone(),
        None => model.class_embeddings(false)?,
    };
    let mut tables = vec![
        ("class_emb".to_string(), class_emb),
        ("class_emb_zs".to_string(), model.zs_emb.clone()),
        (
            "text_sim".to_string(),
            Tensor::from_slice(&model.text_sim, (c, c), dev)?,
        ),
    ];
    if let (Some(hc), Some(cache)) = (&model.head, cache) {
        tables.extend(cache.checkpoint_tensors(hc)?);
    }
    let rng_state = vec![
        (
            "rng.seed".to_string(),
            Tensor::new(&[state.seed as i64], dev)?,
        ),
        (
            "rng.next_epoch".to_string(),
            Tensor::new(&[state.epoch as i64], dev)?,
        ),
    ];
    let mut files = vec![
        (checkpoint::LEARNED, model.params.to_safetensors()?),
        (checkpoint::TABLES, tensors_to_safetensors(&tables, None)?),
        (checkpoint::OPTIM, sgd.to_safetensors(&rng_state)?),
        (checkpoint::STATE, state.to_json().into_bytes()),
    ];
    if let Some(b) = bank {
        files.push((checkpoint::BANK, b.to_safetensors()));
    }
    Ok(files)
}

fn check_resumable(
    state: &State,
    model: &Model,
    args: &FitArgs,
    cfg: &RunConfig,
    ds: &Dataset,
    dir: &Path,
) -> Result<()> {
    model.backbone.check_matches(&state.backbone, dir)?;
    let mismatch = |what: &str, was: String, now: String| {
        TrainError::checkpoint(
            dir,
            format!("was trained with {what} {was}, this run has {now}; resume with the same settings or choose another --out"),
        )
    };
    if state.config != cfg.capt || state.trainer != cfg.trainer {
        return Err(mismatch(
            "a different config",
            "(see its state.json)".into(),
            format!("(see {})", args.out.join("config.toml").display()),
        ));
    }
    if state.seed != args.seed {
        return Err(mismatch(
            "seed",
            state.seed.to_string(),
            args.seed.to_string(),
        ));
    }
    if state.class_names != ds.classnames
        || state.dataset != ds.name
        || state.subsample != args.subsample.to_string()
    {
        return Err(mismatch(
            "dataset/classes",
            format!(
                "{} ({}, {} classes)",
                state.dataset,
                state.subsample,
                state.class_names.len()
            ),
            format!(
                "{} ({}, {} classes)",
                ds.name,
                args.subsample,
                ds.classnames.len()
            ),
        ));
    }
    Ok(())
}

fn restore(
    model: &mut Model,
    sgd: &mut Sgd,
    bank: &mut Option<ConfusionBank>,
    cache: &mut Option<TableCache>,
    dir: &Path,
) -> Result<()> {
    model.params.load_safetensors(
        &checkpoint::read_file(dir, checkpoint::LEARNED)?,
        &dir.join(checkpoint::LEARNED),
    )?;
    sgd.load_safetensors(
        &checkpoint::read_file(dir, checkpoint::OPTIM)?,
        &dir.join(checkpoint::OPTIM),
        &model.params,
    )?;
    if let (Some(b), Some(hc)) = (bank.as_mut(), model.head.as_ref()) {
        let p = dir.join(checkpoint::BANK);
        *b = ConfusionBank::from_safetensors(
            &checkpoint::read_file(dir, checkpoint::BANK)?,
            &p.display().to_string(),
        )?;
        let tp = dir.join(checkpoint::TABLES);
        let t = crate::params::read_safetensors(
            &checkpoint::read_file(dir, checkpoint::TABLES)?,
            &tp,
            &model.backbone.device,
        )?;
        let mut restored = TableCache::from_checkpoint(&t, hc)?;
        // The cells point into the restored bank's pool: leave-one-out needs its sample ids.
        restored.slot_sample = b.slot_samples().to_vec();
        *cache = Some(restored);
    }
    Ok(())
}

/// Per-step values summed over an epoch (their means go to `log.jsonl`).
#[derive(Debug, Default)]
struct EpochSums {
    loss: f64,
    ce: f64,
    ce_base: f64,
    kg: f64,
    lb: f64,
    grad_norm: f64,
    grad_pairs: f64,
}

const LOG: &str = "log.jsonl";

fn append_log(out: &Path, log: &EpochLog) -> Result<()> {
    let p = out.join(LOG);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .map_err(|e| TrainError::io("open", &p, e))?;
    writeln!(f, "{}", serde_json::to_string(log).expect("log serialises"))
        .map_err(|e| TrainError::io("write", &p, e))
}

/// Epoch logs of a run folder.
pub fn read_log(out: &Path) -> Result<Vec<EpochLog>> {
    let p = out.join(LOG);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(_) => return Ok(Vec::new()),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<EpochLog>(l).ok())
        .collect())
}

/// Drops log lines of epochs after `epoch` (written by a run that did not checkpoint them).
fn truncate_log(out: &Path, epoch: usize) -> Result<()> {
    let p = out.join(LOG);
    if !p.exists() {
        return Ok(());
    }
    let keep: Vec<String> = read_log(out)?
        .into_iter()
        .filter(|l| l.epoch <= epoch)
        .map(|l| serde_json::to_string(&l).expect("log serialises"))
        .collect();
    let mut text = keep.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    capt_core::fs::write_atomic(&p, text.as_bytes()).map_err(|e| TrainError::io("write", &p, e))
}
