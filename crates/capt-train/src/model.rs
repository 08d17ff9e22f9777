//! The trained model of a run: frozen backbone + learned prompts (+ SEM contexts and the
//! CAPT head for the CAPT methods), its forward passes and losses.
//!
//! `L = CE(z, y) + CE(z_base, y) + lambda_kg * KgCoOp + lambda_lb * load_balance` for the CAPT
//! methods; `CE(z_base, y) + lambda_kg * KgCoOp` for CoOp (z = z_base).

use candle_core::{DType, Tensor, D};
use capt_graph::{CandleOps, Ops};
use capt_method::head::{self, capt_head, HeadConfig, HeadInputs, HeadOutput};
use capt_method::{CaptConfig, Method};

use crate::backbone::{Backbone, TokenRows};
use crate::config::RunConfig;
use crate::desc::DescEmbeddings;
use crate::error::{Result, TrainError};
use crate::params::ParamStore;
use crate::prompts::{self, Family, COM_CTX, CTX, DIF_CTX};
use crate::tables::{self, StepPairs, TableCache};

/// Image features of a batch: `global [N, D]` (raw projected CLS) and `local [N, G, D]`.
#[derive(Debug, Clone)]
pub struct Feats {
    pub global: Tensor,
    pub local: Tensor,
}

/// The loss and its parts (scalars) for one batch.
#[derive(Debug, Clone)]
pub struct TrainOutput {
    pub loss: Tensor,
    pub logits: Tensor,
    pub ce: f32,
    pub ce_base: f32,
    pub kg: f32,
    pub lb: f32,
    /// Pairs re-encoded with gradient this step.
    pub grad_pairs: usize,
    /// SEM pair prompts encoded with gradient this step (COM + DIF sequences).
    pub grad_sequences: usize,
}

pub struct Model {
    pub backbone: Backbone,
    pub cfg: RunConfig,
    pub classnames: Vec<String>,
    /// Template of the zero-shot targets `t^zs` (and of zero-shot runs).
    pub template: String,
    pub params: ParamStore,
    pub class_rows: TokenRows,
    /// `[C, D]` frozen zero-shot class embeddings (un-normalised).
    pub zs_emb: Tensor,
    /// `C x C` cosine similarity of `zs_emb` (the bank prior's `S_text`).
    pub text_sim: Vec<f32>,
    pub head: Option<HeadConfig>,
    pub local_tokens: usize,
    /// Candle executor of the head, holding the `capt.*` variables.
    pub ops: CandleOps,
    /// SEM description embeddings (`sem.descriptions`), if configured.
    pub descriptions: Option<DescEmbeddings>,
    /// Run seed (initialisation, view choice, batch order).
    pub seed: u64,
}

/// The zero-shot template: the config's when it was changed from the default, else the
/// dataset's CoOp template.
pub fn resolve_template(cfg: &CaptConfig, dataset_template: &str) -> String {
    let default = capt_method::config::PromptConfig::default().template;
    if cfg.prompt.template != default {
        cfg.prompt.template.clone()
    } else {
        dataset_template.to_string()
    }
}

impl Model {
    /// A freshly initialised model (seeded) for `classnames`.
    pub fn new(
        backbone: Backbone,
        cfg: &RunConfig,
        classnames: &[String],
        template: &str,
        local_tokens: usize,
        seed: u64,
    ) -> Result<Self> {
        let c = &cfg.capt;
        if classnames.is_empty() {
            return Err(TrainError::Config("the dataset has no classes".into()));
        }
        let mut params = ParamStore::new(backbone.work);
        if c.method.trains() {
            prompts::init_prompt_params(&mut params, &backbone, &c.prompt, classnames.len(), seed)?;
        }
        let head = if c.method.uses_bank() {
            let hc = HeadConfig::from_config(c, classnames.len(), backbone.dim(), local_tokens)?;
            if c.method.uses_sem() {
                prompts::init_sem_params(&mut params, &backbone, c, seed)?;
            }
            for (name, shape, data) in head::init_head_params(&hc, seed) {
                params.insert_data(&name, &shape, data, &backbone.device)?;
            }
            Some(hc)
        } else {
            None
        };
        if c.method.trains() && c.prompt.vision_depth == 0 && c.prompt.text_depth == 0 {
            return Err(TrainError::Config("nothing to learn".into()));
        }
        let texts = prompts::template_texts(template, classnames);
        let zs_emb = backbone.encode_texts(&texts, cfg.trainer.text_chunk)?;
        let text_sim = prompts::cosine_matrix(&zs_emb)?;
        let class_rows = prompts::class_rows(&backbone, classnames, c.prompt.n_ctx)?;
        let gdt = if backbone.work == DType::F64 {
            capt_graph::DType::F64
        } else {
            capt_graph::DType::F32
        };
        let ops = CandleOps::new(&backbone.device, gdt)?.with_params(params.with_prefix("capt."));
        let descriptions = match (&c.sem.descriptions, c.method.uses_sem()) {
            (Some(path), true) => Some(DescEmbeddings::load(
                path,
                &backbone,
                classnames,
                cfg.trainer.text_chunk,
            )?),
            _ => None,
        };
        Ok(Self {
            backbone,
            cfg: cfg.clone(),
            classnames: classnames.to_vec(),
            template: template.to_string(),
            params,
            class_rows,
            zs_emb,
            text_sim,
            head,
            local_tokens,
            ops,
            descriptions,
            seed,
        })
    }

    /// The `[G, P]` pooling matrix from the patch grid to the bank's local grid.
    pub fn image_pool(&self) -> Result<Tensor> {
        let g = self.backbone.config.vision.grid_size();
        let grid = self.cfg.capt.bank.local_grid;
        let m = capt_graph::adaptive_pool_matrix((g, g), (grid, grid))
            .map_err(|e| TrainError::Config(format!("bank.local_grid = {grid}: {e}")))?;
        Ok(m.to_candle(&self.backbone.device, self.backbone.work)?)
    }

    pub fn method(&self) -> Method {
        self.cfg.capt.method
    }

    pub fn num_classes(&self) -> usize {
        self.classnames.len()
    }

    pub fn uses_vision_prompts(&self) -> bool {
        self.method().trains() && self.cfg.capt.prompt.vision_depth > 0
    }

    /// Class embeddings `t_c` `[C, D]` (working dtype, un-normalised). With `grad` the graph reaches the
    /// context and deep prompts; without, fast kernels run in chunks of `trainer.text_chunk`.
    pub fn class_embeddings(&self, grad: bool) -> Result<Tensor> {
        if !self.method().trains() {
            return Ok(self.zs_emb.clone());
        }
        let ctx = self.params.get_grad(CTX, grad)?;
        let deep = prompts::deep_prompts(&self.params, self.cfg.capt.prompt.text_depth, grad)?;
        if grad {
            return prompts::encode_with_context(
                &self.backbone,
                &ctx,
                &self.class_rows,
                deep.as_ref(),
            );
        }
        let c = self.num_classes();
        let chunk = self.cfg.trainer.text_chunk;
        let mut out = Vec::new();
        let mut s = 0;
        while s < c {
            let len = chunk.min(c - s);
            let ids = self.class_rows.ids.narrow(0, s, len)?;
            let eot = self.class_rows.eot[s..s + len].to_vec();
            let rows = TokenRows { ids, eot };
            let ctx_part = if ctx.rank() == 3 {
                ctx.narrow(0, s, len)?
            } else {
                ctx.clone()
            };
            out.push(prompts::encode_with_context(
                &self.backbone,
                &ctx_part,
                &rows,
                deep.as_ref(),
            )?);
            s += len;
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// KgCoOp: `mean_c ||norm(t_c) - norm(t_c^zs)||^2`.
    pub fn kg_loss(&self, class_emb: &Tensor) -> Result<Tensor> {
        let a = capt_clip::l2_normalize(class_emb)?;
        let b = capt_clip::l2_normalize(&self.zs_emb)?;
        Ok((a - b)?.sqr()?.sum(D::Minus1)?.mean_all()?)
    }

    /// `z_base = tau * norm(f) . norm(T)^T`, with the very ops (and order) of the CAPT head,
    /// so CoOp and CAPT-at-init logits are bitwise equal.
    pub fn base_logits(&self, global: &Tensor, class_emb: &Tensor) -> Result<Tensor> {
        let ops = &self.ops;
        let f = ops.l2_normalize(global, -1)?;
        let tn_t = ops.transpose(&ops.l2_normalize(class_emb, -1)?, 0, 1)?;
        let tau = ops.exp(&ops.reshape(&self.backbone.logit_scale, &[1, 1])?)?;
        Ok(ops.mul(&ops.matmul(&f, &tn_t)?, &tau)?)
    }

    fn head_cfg(&self) -> Result<&HeadConfig> {
        self.head.as_ref().ok_or_else(|| {
            TrainError::Config(format!("method `{}` has no CAPT head", self.method()))
        })
    }

    fn run_head(
        &self,
        feats: &Feats,
        class_emb: &Tensor,
        tables: &capt_method::head::HeadTables<Tensor>,
    ) -> Result<HeadOutput<Tensor>> {
        let hc = self.head_cfg()?;
        let inputs = HeadInputs {
            image_global: feats.global.clone(),
            image_local: feats.local.clone(),
            class_emb: class_emb.clone(),
            logit_scale: self.backbone.logit_scale.clone(),
        };
        Ok(capt_head(&self.ops, hc, &inputs, tables)?)
    }

    /// Logits without gradients for `feats` given the class embeddings and (CAPT) the table
    /// cache of the current state.
    pub fn predict(
        &self,
        feats: &Feats,
        class_emb: &Tensor,
        cache: Option<&TableCache>,
    ) -> Result<Tensor> {
        match &self.head {
            None => self.base_logits(&feats.global, class_emb),
            Some(hc) => {
                let cache = cache.ok_or_else(|| {
                    TrainError::Config("CAPT prediction needs the pair tables".into())
                })?;
                let tables = cache.head_tables(hc)?;
                Ok(self.run_head(feats, class_emb, &tables)?.logits)
            }
        }
    }

    /// The text side of a CAPT step, with gradients: class embeddings `[C, D]` (one encoder
    /// pass) and the fresh COM `[S, D]` / DIF `[U, D]` embeddings of the step's pairs (a
    /// second pass holding both families). Sharing one pass with the class prompts was
    /// measured slower on CPU: the pair rows are longer and padding the class rows to them
    /// costs more than the pass saves.
    pub fn step_text(&self, step: &StepPairs) -> Result<(Tensor, Tensor, Tensor)> {
        let bb = &self.backbone;
        let class_emb = self.class_embeddings(true)?;
        if step.grad_pairs.is_empty() {
            let empty = Tensor::zeros((0, bb.dim()), bb.work, &bb.device)?;
            return Ok((class_emb, empty.clone(), empty));
        }
        let com_pairs = &step.grad_pairs;
        let dif_pairs = step.dif_pairs();
        let mut lists = tables::pair_ids(self, Family::Com, com_pairs)?;
        lists.extend(tables::pair_ids(self, Family::Dif, &dif_pairs)?);
        let rows = bb.rows_from_ids(&lists, self.cfg.capt.sem.m_ctx)?;
        let (s, u) = (com_pairs.len(), dif_pairs.len());
        let groups = [
            bb.text
                .build_prompts(&self.params.get(COM_CTX)?, &rows.ids.narrow(0, 0, s)?)?,
            bb.text
                .build_prompts(&self.params.get(DIF_CTX)?, &rows.ids.narrow(0, s, u)?)?,
        ];
        let embeds: Vec<&Tensor> = groups.iter().map(|g| &g.embeds).collect();
        let eot: Vec<usize> = groups
            .iter()
            .flat_map(|g| g.eot_positions.iter().copied())
            .collect();
        let all = bb
            .text
            .forward_embeds(&Tensor::cat(&embeds, 0)?, &eot, None)?
            .to_dtype(bb.work)?;
        let mut fresh_com = all.narrow(0, 0, s)?;
        let mut fresh_dif = all.narrow(0, s, u)?;
        if let Some(desc) = &self.descriptions {
            fresh_com = desc.add_to_pairs(&fresh_com, Family::Com, com_pairs)?;
            fresh_dif = desc.add_to_pairs(&fresh_dif, Family::Dif, &dif_pairs)?;
        }
        Ok((class_emb, fresh_com, fresh_dif))
    }

    /// Training forward pass with gradients: loss and logits of a batch.
    pub fn train_forward(
        &self,
        feats: &Feats,
        labels: &Tensor,
        cache: Option<&TableCache>,
    ) -> Result<TrainOutput> {
        self.train_forward_samples(feats, labels, cache, &[])
    }

    /// As [`Self::train_forward`] for the training images `samples` (their indices): with
    /// `bank.leave_one_out` the Sample Confusion Miner does not retrieve their own bank
    /// entries.
    pub fn train_forward_samples(
        &self,
        feats: &Feats,
        labels: &Tensor,
        cache: Option<&TableCache>,
        samples: &[usize],
    ) -> Result<TrainOutput> {
        let c = &self.cfg.capt;
        let scalar =
            |t: &Tensor| -> Result<f32> { Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()?) };
        match &self.head {
            None => {
                let class_emb = self.class_embeddings(true)?;
                let kg = self.kg_loss(&class_emb)?;
                let z = self.base_logits(&feats.global, &class_emb)?;
                let ce = candle_nn::loss::cross_entropy(&z, labels)?;
                let loss = (&ce + (&kg * c.prompt.lambda_kg)?)?;
                Ok(TrainOutput {
                    ce: scalar(&ce)?,
                    ce_base: scalar(&ce)?,
                    kg: scalar(&kg)?,
                    lb: 0.0,
                    loss,
                    logits: z,
                    grad_pairs: 0,
                    grad_sequences: 0,
                })
            }
            Some(hc) => {
                let cache = cache.ok_or_else(|| {
                    TrainError::Config("CAPT training needs the pair tables".into())
                })?;
                // The pairs to re-encode with gradient are picked before the text pass, by the
                // head's own selection on z_base from the epoch's class embeddings (the head
                // then selects on the current ones; a pair it picks that was not re-encoded
                // reads the cache).
                let cached = cache.head_tables(hc)?;
                let step = if hc.use_sem {
                    let z_sel = self.base_logits(&feats.global.detach(), &cache.class_emb)?;
                    let sel = capt_method::head::select_pairs(&self.ops, hc, &z_sel, &cached)?;
                    StepPairs::from_selection(
                        &sel.class,
                        &sel.partners,
                        self.cfg.trainer.grad_pairs,
                        self.cfg.trainer.grad_dif_reverse,
                    )?
                } else {
                    StepPairs::default()
                };
                let (class_emb, fresh_com, fresh_dif) = self.step_text(&step)?;
                let kg = self.kg_loss(&class_emb)?;
                let mut tables = cache.spliced_tables(hc, &step, &fresh_com, &fresh_dif)?;
                if hc.use_sam && c.bank.leave_one_out {
                    tables.cells = cache.cells_without(samples)?;
                }
                let out = self.run_head(feats, &class_emb, &tables)?;
                let ce = candle_nn::loss::cross_entropy(&out.logits, labels)?;
                let ce_base = candle_nn::loss::cross_entropy(&out.base_logits, labels)?;
                let lb = head::load_balance_loss(&self.ops, &out.gates)?;
                let loss = (((&ce + &ce_base)? + (&kg * c.prompt.lambda_kg)?)?
                    + (&lb * c.mgde.lambda_lb)?)?;
                Ok(TrainOutput {
                    ce: scalar(&ce)?,
                    ce_base: scalar(&ce_base)?,
                    kg: scalar(&kg)?,
                    lb: scalar(&lb)?,
                    loss,
                    logits: out.logits,
                    grad_pairs: step.grad_pairs.len(),
                    grad_sequences: fresh_com.dim(0)? + fresh_dif.dim(0)?,
                })
            }
        }
    }
}

/// Top-1 predictions of logits `[N, C]`.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<usize>> {
    Ok(logits
        .argmax(D::Minus1)?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|v| v as usize)
        .collect())
}
