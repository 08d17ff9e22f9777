//! The trainer settings a checkpoint records (`[trainer]` of the run config, state.json).

use serde::{Deserialize, Serialize};

/// Settings of the trainer that are not part of the method (`[trainer]` in the config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerConfig {
    /// Confusion pairs re-encoded WITH gradient per step (SEM). The pair tables
    /// (`t_com`, `t_dif` for every class and candidate) are encoded without gradient once per
    /// epoch; each step re-encodes only the pairs its batch selects, with gradient, and
    /// splices them in. n > 0 = the n most used pairs of the batch (ties: first seen), the
    /// rest read the epoch's cache; 0 = every pair the batch uses (up to batch * K_p). Each
    /// pair costs 2 text sequences (COM(c,j), DIF(c,j); 3 with `grad_dif_reverse`), all in
    /// one extra encoder pass. Default 1: at ViT-B/16 size a CAPT step then costs about
    /// 1.1-1.3x a CoOp step (10 / 100 classes) instead of 1.6-4.6x with every pair and
    /// reverse (see `capt-train bench train-step`).
    pub grad_pairs: usize,
    /// Also re-encode `t_dif(j, c)` of each gradient pair with gradient (3 sequences per pair
    /// instead of 2). Off: the reverse rows read the epoch's cache this step (they get
    /// gradient on steps where (j, c) itself is selected).
    pub grad_dif_reverse: bool,
    /// Augmented views cached per training image (0 = `bank.views`). Each epoch every image
    /// uses one of them, drawn from the run's seeded generator.
    pub train_views: usize,
    /// A fresh random resized crop + flip of every image in every epoch (the frozen image
    /// encoder runs once per image and epoch, cached like the pool) instead of one draw per
    /// epoch from a pool of `train_views` views. Default on: measured better for CAPT at
    /// the same step time (docs/METHOD.md); `false` keeps the small cached pool (less
    /// encoding up front, e.g. a large dataset on CPU).
    pub fresh_views: bool,
    /// Images per forward pass in evaluation and bank refreshes.
    pub eval_batch: usize,
    /// Text sequences per forward pass when encoding without gradient (pair tables).
    pub text_chunk: usize,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            grad_pairs: 1,
            grad_dif_reverse: false,
            train_views: 0,
            fresh_views: true,
            eval_batch: 64,
            text_chunk: 256,
        }
    }
}
