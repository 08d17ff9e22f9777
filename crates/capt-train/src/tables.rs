//! The CAPT head's tables for one epoch, and the per-step splice of freshly encoded pairs.
//!
//! Cost control on CPU: encoding every (class, candidate) pair prompt with gradient every
//! step costs `3 C K` text sequences. Instead the whole table (`t_com`, `t_dif`, `t_dif_rev`
//! for every class and candidate) is encoded WITHOUT gradient once per epoch (after the bank
//! refresh, with the current contexts), and each step re-encodes WITH gradient only the pairs
//! its batch selects (deduplicated, at most `trainer.grad_pairs` of them, 0 = all; see
//! `Model::step_text`) and splices them in differentiably:
//! `table = cached * (1 - mask) + selection @ fresh`. Pairs a step does not re-encode read
//! the epoch's values.

use std::collections::{BTreeSet, HashMap};

use candle_core::{DType, Tensor};
use capt_method::bank::{top_candidates, ConfusionBank};
use capt_method::classes::{ClassError, Prompt, PromptEncoder};
use capt_method::head::{HeadConfig, HeadTables};

use crate::error::{Result, TrainError};
use crate::model::Model;
use crate::prompts::{encode_with_context, Family};

/// The pairs of one training step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPairs {
    /// Distinct (c, j) pairs re-encoded with gradient, most used first.
    pub grad_pairs: Vec<(usize, usize)>,
    /// Distinct pairs the batch uses.
    pub used: usize,
    /// Whether `t_dif(j, c)` is re-encoded with gradient too (`trainer.grad_dif_reverse`).
    pub reverse_dif: bool,
}

impl StepPairs {
    /// The DIF prompts to encode with gradient, deduplicated in first-seen order:
    /// `t_dif(c, j)` of every grad pair, and `t_dif(j, c)` too with `reverse_dif`.
    pub fn dif_pairs(&self) -> Vec<(usize, usize)> {
        let mut ordered: Vec<(usize, usize)> = Vec::new();
        for &(c, j) in &self.grad_pairs {
            let both = [(c, j), (j, c)];
            let n = if self.reverse_dif { 2 } else { 1 };
            for p in &both[..n] {
                if !ordered.contains(p) {
                    ordered.push(*p);
                }
            }
        }
        ordered
    }

    /// From the head's selection (`class [N]`, `partners [N, K_p]`, I64): the distinct pairs,
    /// most used first (ties: first seen), capped at `limit` (0 = no cap).
    pub fn from_selection(
        class: &Tensor,
        partners: &Tensor,
        limit: usize,
        reverse_dif: bool,
    ) -> Result<Self> {
        let class = class.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        let partners = partners.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let mut order: Vec<((usize, usize), usize)> = Vec::new();
        let mut pos: HashMap<(usize, usize), usize> = HashMap::new();
        for (c, row) in class.iter().zip(&partners) {
            for &j in row {
                let key = (*c as usize, j as usize);
                match pos.get(&key) {
                    Some(&i) => order[i].1 += 1,
                    None => {
                        pos.insert(key, order.len());
                        order.push((key, 1));
                    }
                }
            }
        }
        let used = order.len();
        // Stable: equal counts keep first-seen order.
        order.sort_by_key(|o| std::cmp::Reverse(o.1));
        let take = if limit == 0 { used } else { limit.min(used) };
        Ok(Self {
            grad_pairs: order.into_iter().take(take).map(|(k, _)| k).collect(),
            used,
            reverse_dif,
        })
    }
}

/// Everything the head reads besides the class embeddings, for the current bank and contexts.
#[derive(Debug, Clone)]
pub struct TableCache {
    /// `[C, D]` class embeddings of the contexts the tables were built with: the
    /// approximate `z_base` that picks each step's gradient pairs before the text pass.
    pub class_emb: Tensor,
    pub num_classes: usize,
    pub k: usize,
    /// `[C * K]` candidate partners, strongest first.
    pub cand_index: Vec<u32>,
    pub cand_weight: Vec<f32>,
    /// `[C * K, D]` (working dtype).
    pub t_com: Tensor,
    pub t_dif: Tensor,
    pub t_dif_rev: Tensor,
    /// Rows of `t_dif` / `t_dif_rev` that hold `t_dif(a, b)`.
    dif_at: HashMap<(usize, usize), (Vec<usize>, Vec<usize>)>,
    pub pool_global: Tensor,
    pub pool_local: Tensor,
    /// I64 `[C, K, 2, M]`.
    pub cells: Tensor,
    /// Per pool slot, the training sample it came from (-1 unknown; empty when restored
    /// from a checkpoint): leave-one-out retrieval in training.
    pub slot_sample: Vec<i64>,
}

impl TableCache {
    /// Builds the tables from the bank (prior, candidates, cells, pool) and the current SEM
    /// contexts, without gradients.
    pub fn build(model: &Model, bank: &ConfusionBank) -> Result<Self> {
        Self::build_reusing(model, bank, None)
    }

    /// As [`Self::build`], taking pair encodings that `reuse` already holds (it must have been
    /// built with the same contexts) and encoding only the others.
    pub fn build_reusing(
        model: &Model,
        bank: &ConfusionBank,
        reuse: Option<&TableCache>,
    ) -> Result<Self> {
        let hc = model.head.as_ref().ok_or_else(|| {
            TrainError::Config("pair tables exist only for the CAPT methods".into())
        })?;
        let c = model.num_classes();
        let bcfg = &model.cfg.capt.bank;
        if bank.num_classes() != c {
            return Err(TrainError::Config(format!(
                "the confusion bank has {} classes, the model {c}",
                bank.num_classes()
            )));
        }
        let nhat = bank.prior(&model.text_sim, bcfg.prior_beta, bcfg.prior_temperature)?;
        let cands = top_candidates(&nhat, c, hc.k_cand);
        let k = cands.k;
        let dev = &model.backbone.device;
        let d = model.backbone.dim();
        let row_pairs: Vec<(usize, usize)> = (0..c * k)
            .map(|r| (r / k, cands.index[r] as usize))
            .collect();
        let (t_com, t_dif, t_dif_rev, dif_at) = if hc.use_sem {
            // COM rows: reused rows of `reuse.t_com`, else freshly encoded.
            let com_src = match reuse {
                Some(old) => assemble(model, Family::Com, &row_pairs, &[&old.t_com], |&(a, b)| {
                    old.row_of(a, b).map(|r| (0, r))
                })?,
                None => encode_pairs(model, Family::Com, &row_pairs, false)?,
            };
            let ordered: BTreeSet<(usize, usize)> = row_pairs
                .iter()
                .flat_map(|&(a, b)| [(a, b), (b, a)])
                .collect();
            let ordered: Vec<(usize, usize)> = ordered.into_iter().collect();
            let index: HashMap<(usize, usize), usize> =
                ordered.iter().enumerate().map(|(i, &p)| (p, i)).collect();
            let dif = match reuse {
                Some(old) => assemble(
                    model,
                    Family::Dif,
                    &ordered,
                    &[&old.t_dif, &old.t_dif_rev],
                    |p| {
                        old.dif_at
                            .get(p)
                            .and_then(|(f, r)| match (f.first(), r.first()) {
                                (Some(&row), _) => Some((0, row)),
                                (None, Some(&row)) => Some((1, row)),
                                _ => None,
                            })
                    },
                )?,
                None => encode_pairs(model, Family::Dif, &ordered, false)?,
            };
            let fwd: Vec<u32> = row_pairs
                .iter()
                .map(|&(a, b)| index[&(a, b)] as u32)
                .collect();
            let rev: Vec<u32> = row_pairs
                .iter()
                .map(|&(a, b)| index[&(b, a)] as u32)
                .collect();
            let mut dif_at: HashMap<(usize, usize), (Vec<usize>, Vec<usize>)> = HashMap::new();
            for (r, &(a, b)) in row_pairs.iter().enumerate() {
                dif_at.entry((a, b)).or_default().0.push(r);
                dif_at.entry((b, a)).or_default().1.push(r);
            }
            let t_dif = dif.index_select(&Tensor::from_vec(fwd, c * k, dev)?, 0)?;
            let t_dif_rev = dif.index_select(&Tensor::from_vec(rev, c * k, dev)?, 0)?;
            (com_src, t_dif, t_dif_rev, dif_at)
        } else {
            let z = Tensor::zeros((c * k, d), model.backbone.work, dev)?;
            (z.clone(), z.clone(), z, HashMap::new())
        };
        let g = model.local_tokens;
        let p = bank.pool_len();
        let (pool_global, pool_local) = if p == 0 {
            (
                Tensor::zeros((1, d), model.backbone.work, dev)?,
                Tensor::zeros((1, g, d), model.backbone.work, dev)?,
            )
        } else {
            (
                Tensor::from_slice(bank.pool_global(), (p, d), dev)?
                    .to_dtype(model.backbone.work)?,
                Tensor::from_slice(bank.pool_local(), (p, g, d), dev)?
                    .to_dtype(model.backbone.work)?,
            )
        };
        let cells = Tensor::from_vec(bank.cell_table(&cands), (c, k, 2, bank.cell_size()), dev)?;
        Ok(Self {
            class_emb: model.class_embeddings(false)?,
            num_classes: c,
            k,
            cand_index: cands.index,
            cand_weight: cands.weight,
            t_com,
            t_dif,
            t_dif_rev,
            dif_at,
            pool_global,
            pool_local,
            cells,
            slot_sample: bank.slot_samples().to_vec(),
        })
    }

    /// The cell table with every entry stored for one of `samples` masked out (-1): what a
    /// training batch of those samples retrieves from (`bank.leave_one_out`).
    pub fn cells_without(&self, samples: &[usize]) -> Result<Tensor> {
        if samples.is_empty() || self.slot_sample.is_empty() {
            return Ok(self.cells.clone());
        }
        let dims = self.cells.dims().to_vec();
        let mut table = self.cells.flatten_all()?.to_vec1::<i64>()?;
        ConfusionBank::leave_out(&self.slot_sample, &mut table, samples);
        Ok(Tensor::from_vec(table, dims, self.cells.device())?)
    }

    fn cand_tensors(&self, dev: &candle_core::Device) -> Result<(Tensor, Tensor)> {
        let (c, k) = (self.num_classes, self.k);
        let idx: Vec<i64> = self.cand_index.iter().map(|&v| v as i64).collect();
        Ok((
            Tensor::from_vec(idx, (c, k), dev)?,
            Tensor::from_slice(&self.cand_weight, (c, k), dev)?.to_dtype(self.t_com.dtype())?,
        ))
    }

    /// The cached tables in the head's shapes.
    pub fn head_tables(&self, hc: &HeadConfig) -> Result<HeadTables<Tensor>> {
        self.tables_with(hc, &self.t_com, &self.t_dif, &self.t_dif_rev)
    }

    fn tables_with(
        &self,
        hc: &HeadConfig,
        com: &Tensor,
        dif: &Tensor,
        rev: &Tensor,
    ) -> Result<HeadTables<Tensor>> {
        let (c, k, d) = (self.num_classes, self.k, hc.dim);
        let (cand_index, cand_weight) = self.cand_tensors(self.t_com.device())?;
        Ok(HeadTables {
            cand_index,
            cand_weight,
            t_com: com.reshape((c, k, d))?,
            t_dif: dif.reshape((c, k, d))?,
            t_dif_rev: rev.reshape((c, k, d))?,
            pool_global: self.pool_global.clone(),
            pool_local: self.pool_local.clone(),
            cells: self.cells.clone(),
        })
    }

    /// Row of (c, j) in the `[C * K]` tables.
    pub fn row_of(&self, c: usize, j: usize) -> Option<usize> {
        let k = self.k;
        self.cand_index[c * k..(c + 1) * k]
            .iter()
            .position(|&v| v as usize == j)
            .map(|i| c * k + i)
    }

    /// The tables with the step's freshly encoded pairs spliced in: `fresh_com` `[S, D]`
    /// for `step.grad_pairs`, `fresh_dif` `[U, D]` for `step.dif_pairs()`.
    pub fn spliced_tables(
        &self,
        hc: &HeadConfig,
        step: &StepPairs,
        fresh_com: &Tensor,
        fresh_dif: &Tensor,
    ) -> Result<HeadTables<Tensor>> {
        if !hc.use_sem || step.grad_pairs.is_empty() {
            return self.head_tables(hc);
        }
        let rows = self.num_classes * self.k;
        let dev = self.t_com.device();
        // COM: one row per pair.
        let com_rows: Vec<Vec<usize>> = step
            .grad_pairs
            .iter()
            .map(|&(c, j)| {
                self.row_of(c, j).map(|r| vec![r]).ok_or_else(|| {
                    TrainError::Config(format!(
                        "pair ({c}, {j}) is not among the candidates of class {c}"
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let t_com = splice(&self.t_com, fresh_com, &com_rows, rows, dev)?;
        // DIF: both orders of every pair, wherever they occur in t_dif / t_dif_rev.
        let ordered = step.dif_pairs();
        let empty = (Vec::new(), Vec::new());
        let fwd_rows: Vec<Vec<usize>> = ordered
            .iter()
            .map(|p| self.dif_at.get(p).unwrap_or(&empty).0.clone())
            .collect();
        let rev_rows: Vec<Vec<usize>> = ordered
            .iter()
            .map(|p| self.dif_at.get(p).unwrap_or(&empty).1.clone())
            .collect();
        let t_dif = splice(&self.t_dif, fresh_dif, &fwd_rows, rows, dev)?;
        let t_dif_rev = splice(&self.t_dif_rev, fresh_dif, &rev_rows, rows, dev)?;
        self.tables_with(hc, &t_com, &t_dif, &t_dif_rev)
    }

    /// The tables and candidates as checkpoint tensors (`tables.safetensors` names,
    /// `HeadTables::NAMES`).
    pub fn checkpoint_tensors(&self, hc: &HeadConfig) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .head_tables(hc)?
            .into_named()
            .into_iter()
            .map(|(n, t)| (n.to_string(), t))
            .collect())
    }

    /// Restores a cache from checkpoint tensors (evaluation on the trained classes).
    pub fn from_checkpoint(
        tensors: &std::collections::BTreeMap<String, Tensor>,
        hc: &HeadConfig,
    ) -> Result<Self> {
        let get = |n: &str| {
            tensors
                .get(n)
                .cloned()
                .ok_or_else(|| TrainError::Config(format!("tables.safetensors has no `{n}`")))
        };
        let t = HeadTables::try_named(get)?;
        let (c, k) = t.cand_index.dims2()?;
        if c != hc.num_classes || k != hc.k_cand {
            return Err(TrainError::Config(format!(
                "tables.safetensors has [{c}, {k}] candidates, the head expects [{}, {}]",
                hc.num_classes, hc.k_cand
            )));
        }
        let cand_index: Vec<u32> = t
            .cand_index
            .flatten_all()?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|v| v as u32)
            .collect();
        let cand_weight = t.cand_weight.flatten_all()?.to_vec1::<f32>()?;
        let flat = |x: &Tensor| -> Result<Tensor> { Ok(x.reshape((c * k, hc.dim))?) };
        let (t_com, t_dif, t_dif_rev) = (flat(&t.t_com)?, flat(&t.t_dif)?, flat(&t.t_dif_rev)?);
        let dif_at = dif_rows(&cand_index, k);
        Ok(Self {
            class_emb: get("class_emb")?,
            num_classes: c,
            k,
            cand_index,
            cand_weight,
            t_com,
            t_dif,
            t_dif_rev,
            dif_at,
            pool_global: t.pool_global,
            pool_local: t.pool_local,
            cells: t.cells,
            slot_sample: Vec::new(),
        })
    }
}

/// The trainer's text encoder for `capt_method::classes::retarget`: class prompts with the
/// learned context, zero-shot prompts and SEM pair prompts of the model's own class list
/// (the names a retarget asks for are the list it retargets to).
pub struct CandleEncoder<'m> {
    model: &'m Model,
    index: HashMap<&'m str, usize>,
    class_emb: Option<Tensor>,
}

impl<'m> CandleEncoder<'m> {
    pub fn new(model: &'m Model) -> Self {
        let index = model
            .classnames
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        Self {
            model,
            index,
            class_emb: None,
        }
    }

    fn at(&self, name: &str) -> std::result::Result<usize, ClassError> {
        self.index.get(name).copied().ok_or_else(|| {
            ClassError::Input(format!("`{name}` is not a class of the model being scored"))
        })
    }

    fn encode_all(&mut self, prompts: &[Prompt]) -> Result<Vec<Vec<f32>>> {
        let named = |e: ClassError| TrainError::Config(e.to_string());
        let mut out: Vec<Option<Tensor>> = vec![None; prompts.len()];
        // Pair prompts in one encoder pass per family.
        for fam in [Family::Com, Family::Dif] {
            let mut at = Vec::new();
            let mut pairs = Vec::new();
            for (i, p) in prompts.iter().enumerate() {
                match (p, fam) {
                    (Prompt::Com(a, b), Family::Com) | (Prompt::Dif(a, b), Family::Dif) => {
                        at.push(i);
                        pairs.push((self.at(a).map_err(named)?, self.at(b).map_err(named)?));
                    }
                    _ => {}
                }
            }
            if !pairs.is_empty() {
                let e = encode_pairs(self.model, fam, &pairs, false)?;
                for (r, &i) in at.iter().enumerate() {
                    out[i] = Some(e.get(r)?);
                }
            }
        }
        for (i, p) in prompts.iter().enumerate() {
            let row = match p {
                Prompt::Class(a) => {
                    if self.class_emb.is_none() {
                        self.class_emb = Some(self.model.class_embeddings(false)?);
                    }
                    let i = self.at(a).map_err(named)?;
                    self.class_emb.as_ref().expect("set above").get(i)?
                }
                Prompt::ZeroShot(a) => self.model.zs_emb.get(self.at(a).map_err(named)?)?,
                _ => continue,
            };
            out[i] = Some(row);
        }
        out.into_iter()
            .map(|t| {
                Ok(t.expect("every prompt encoded")
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?)
            })
            .collect()
    }
}

impl PromptEncoder for CandleEncoder<'_> {
    fn encode(&mut self, prompts: &[Prompt]) -> std::result::Result<Vec<Vec<f32>>, ClassError> {
        self.encode_all(prompts)
            .map_err(|e| ClassError::Encoder(Box::new(e)))
    }
}

/// Where each ordered pair's `t_dif` sits: rows of `t_dif` holding `t_dif(a, b)` (row (a, b))
/// and rows of `t_dif_rev` holding it (row (b, a)), for the `[C * K]` candidate table.
fn dif_rows(cand_index: &[u32], k: usize) -> HashMap<(usize, usize), (Vec<usize>, Vec<usize>)> {
    let mut dif_at: HashMap<(usize, usize), (Vec<usize>, Vec<usize>)> = HashMap::new();
    for (r, &j) in cand_index.iter().enumerate() {
        let (a, b) = (r / k, j as usize);
        dif_at.entry((a, b)).or_default().0.push(r);
        dif_at.entry((b, a)).or_default().1.push(r);
    }
    dif_at
}

/// Rows for `pairs`: taken from `sources[i][row]` where `find` knows them, the rest encoded.
fn assemble(
    model: &Model,
    family: Family,
    pairs: &[(usize, usize)],
    sources: &[&Tensor],
    find: impl Fn(&(usize, usize)) -> Option<(usize, usize)>,
) -> Result<Tensor> {
    let mut offsets = Vec::with_capacity(sources.len());
    let mut total = 0;
    for s in sources {
        offsets.push(total);
        total += s.dim(0)?;
    }
    let mut missing = Vec::new();
    let mut idx = Vec::with_capacity(pairs.len());
    for p in pairs {
        match find(p) {
            Some((src, row)) => idx.push((offsets[src] + row) as u32),
            None => {
                idx.push((total + missing.len()) as u32);
                missing.push(*p);
            }
        }
    }
    let mut parts: Vec<Tensor> = sources.iter().map(|&t| t.clone()).collect();
    if !missing.is_empty() {
        parts.push(encode_pairs(model, family, &missing, false)?);
    }
    let all = Tensor::cat(&parts, 0)?;
    let n = idx.len();
    Ok(all.index_select(&Tensor::from_vec(idx, n, all.device())?, 0)?)
}

/// `cached * (1 - mask) + selection @ fresh`: rows `rows_of[p]` take `fresh[p]`.
fn splice(
    cached: &Tensor,
    fresh: &Tensor,
    rows_of: &[Vec<usize>],
    rows: usize,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let p = rows_of.len();
    let mut sel = vec![0f32; rows * p];
    let mut keep = vec![1f32; rows];
    for (i, rs) in rows_of.iter().enumerate() {
        for &r in rs {
            sel[r * p + i] = 1.0;
            keep[r] = 0.0;
        }
    }
    let sel = Tensor::from_vec(sel, (rows, p), dev)?.to_dtype(cached.dtype())?;
    let keep = Tensor::from_vec(keep, (rows, 1), dev)?.to_dtype(cached.dtype())?;
    Ok((cached.broadcast_mul(&keep)? + sel.matmul(fresh)?)?)
}

/// Token id lists (`SOT .. EOT`) of a family's pair prompts.
pub fn pair_ids(model: &Model, family: Family, pairs: &[(usize, usize)]) -> Result<Vec<Vec<u32>>> {
    let names = &model.classnames;
    Ok(pairs
        .iter()
        .map(|&(a, b)| {
            model
                .backbone
                .tokenizer
                .encode(&family.text(&names[a], &names[b]))
        })
        .collect::<std::result::Result<_, _>>()?)
}

/// Encodes pair prompts of `family` for `(a, b)` pairs: `[P, D]`, plus the description
/// embeddings of the pair when a descriptions file is configured. Without `grad`, in chunks.
pub fn encode_pairs(
    model: &Model,
    family: Family,
    pairs: &[(usize, usize)],
    grad: bool,
) -> Result<Tensor> {
    let bb = &model.backbone;
    let ctx = model.params.get_grad(family.param(), grad)?;
    let m = ctx.dim(0)?;
    let lists = pair_ids(model, family, pairs)?;
    let chunk = if grad {
        lists.len().max(1)
    } else {
        model.cfg.trainer.text_chunk
    };
    let mut out = Vec::new();
    for part in lists.chunks(chunk) {
        let rows = bb.rows_from_ids(part, m)?;
        out.push(encode_with_context(bb, &ctx, &rows, None)?);
    }
    let emb = Tensor::cat(&out, 0)?;
    match model.descriptions.as_ref() {
        Some(desc) => desc.add_to_pairs(&emb, family, pairs),
        None => Ok(emb),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn step_pairs_are_deduplicated_most_used_first_and_capped() {
        let dev = Device::Cpu;
        // Images predicted as classes 2, 0, 2 with partners [[5, 1], [1, 3], [1, 5]].
        let class = Tensor::new(&[2i64, 0, 2], &dev).unwrap();
        let partners = Tensor::new(&[[5i64, 1], [1, 3], [1, 5]], &dev).unwrap();
        let all = StepPairs::from_selection(&class, &partners, 0, false).unwrap();
        assert_eq!(all.grad_pairs, vec![(2, 5), (2, 1), (0, 1), (0, 3)]);
        assert_eq!(all.used, 4);
        assert_eq!(all.dif_pairs(), vec![(2, 5), (2, 1), (0, 1), (0, 3)]);
        let one = StepPairs::from_selection(&class, &partners, 1, true).unwrap();
        assert_eq!(one.grad_pairs, vec![(2, 5)]);
        assert_eq!(one.dif_pairs(), vec![(2, 5), (5, 2)]);
    }
}
