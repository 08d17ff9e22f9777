//! CAPT configuration: every default is the value fixed by `docs/METHOD.md`. Loaded from
//! TOML (unknown keys rejected so typos do not silently fall back to defaults) and
//! validated as a whole.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("inconsistent config: {0}")]
    Invalid(String),
}

/// Which method a run trains: CAPT, its ablations, or the baselines it must beat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Hand-crafted prompts, nothing learned.
    ZeroShot,
    /// Learned context only, KgCoOp-style (the configured context, `lambda_kg`): no bank,
    /// no SEM/SAM/MGDE.
    Coop,
    /// Plain CoOp (Zhou et al. 2022): 16 random context tokens, no KgCoOp regulariser
    /// (`prompt.n_ctx = 16`, `ctx_init` none, `lambda_kg = 0` unless configured otherwise).
    CoopPlain,
    /// The full method.
    Capt,
    /// CAPT without the Semantic Confusion Miner (no semantic experts).
    CaptNoSem,
    /// CAPT without the Sample Confusion Miner (no sample expert, no adapter).
    CaptNoSam,
    /// CAPT with uniform MGDE gates instead of the learned router.
    CaptNoRouting,
}

impl Method {
    pub const ALL: [Method; 7] = [
        Method::ZeroShot,
        Method::CoopPlain,
        Method::Coop,
        Method::Capt,
        Method::CaptNoSem,
        Method::CaptNoSam,
        Method::CaptNoRouting,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::ZeroShot => "zero-shot",
            Method::Coop => "coop",
            Method::CoopPlain => "coop-plain",
            Method::Capt => "capt",
            Method::CaptNoSem => "capt-no-sem",
            Method::CaptNoSam => "capt-no-sam",
            Method::CaptNoRouting => "capt-no-routing",
        }
    }

    pub fn parse(s: &str) -> Result<Method, ConfigError> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let known: Vec<_> = Method::ALL.iter().map(|m| m.name()).collect();
                ConfigError::Invalid(format!(
                    "unknown method `{s}`; expected one of {}",
                    known.join(", ")
                ))
            })
    }

    /// Whether the run needs the Confusion Bank and the CAPT head at all.
    pub fn uses_bank(self) -> bool {
        !matches!(self, Method::ZeroShot | Method::Coop | Method::CoopPlain)
    }
    pub fn uses_sem(self) -> bool {
        self.uses_bank() && self != Method::CaptNoSem
    }
    pub fn uses_sam(self) -> bool {
        self.uses_bank() && self != Method::CaptNoSam
    }
    pub fn learned_router(self) -> bool {
        self.uses_bank() && self != Method::CaptNoRouting
    }
    pub fn trains(self) -> bool {
        self != Method::ZeroShot
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Base prompt learner (§0) and the KgCoOp-style regulariser (§5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptConfig {
    /// Number of learned context tokens.
    pub n_ctx: usize,
    /// Phrase whose token embeddings initialise the context; `None` = random N(0, 0.02).
    pub ctx_init: Option<String>,
    /// One context per class (CoOp's CSC) instead of a shared one.
    pub class_specific: bool,
    /// Text prompt depth: 1 = input layer only; d > 1 adds deep prompts in layers 1..d-1.
    pub text_depth: usize,
    /// Vision prompt depth: 0 = off (image features of the frozen encoder can be cached).
    pub vision_depth: usize,
    /// Number of visual prompt tokens per layer when vision prompts are on.
    pub vision_n_ctx: usize,
    /// Zero-shot template used for the regulariser targets `t^zs` and zero-shot runs.
    pub template: String,
    /// Weight of the KgCoOp regulariser `mean_c ||norm(t_c) - norm(t_c^zs)||^2`.
    pub lambda_kg: f64,
}

impl Default for PromptConfig {
    fn default() -> Self {
        Self {
            n_ctx: 4,
            ctx_init: Some("a photo of a".into()),
            class_specific: false,
            text_depth: 1,
            vision_depth: 0,
            vision_n_ctx: 4,
            template: "a photo of a {}.".into(),
            lambda_kg: 8.0,
        }
    }
}

/// Confusion Bank (§1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BankConfig {
    /// Near-miss margin: a correct top-1 with `p_y - p_j < delta` still counts 0.5.
    pub delta: f32,
    /// Ring-buffer length `M` of each (y, j) cell.
    pub cell_size: usize,
    /// Capacity of the shared feature pool.
    pub pool_size: usize,
    /// Augmented views per training image when building/refreshing (`A`).
    pub views: usize,
    /// Decay of old counts at each refresh (`N <- decay * N + new`).
    pub decay: f32,
    /// Training retrieves leave-one-out: a view never retrieves the bank entries of its own
    /// image (those have cosine 1 and a zero difference, so the adapter would learn from
    /// nothing). Inference is unaffected.
    pub leave_one_out: bool,
    /// Weight `beta` of the text-similarity prior.
    pub prior_beta: f32,
    /// Temperature of the prior's softmax over text similarities.
    pub prior_temperature: f32,
    /// Local tokens are average-pooled to a `grid x grid` map.
    pub local_grid: usize,
}

impl Default for BankConfig {
    fn default() -> Self {
        Self {
            delta: 0.1,
            cell_size: 8,
            pool_size: 2048,
            views: 4,
            decay: 0.5,
            leave_one_out: true,
            prior_beta: 1.0,
            prior_temperature: 0.05,
            local_grid: 4,
        }
    }
}

/// Semantic Confusion Miner (§2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SemConfig {
    /// Candidate partners per class (`K_cand`).
    pub k_cand: usize,
    /// Semantic Confusion Pairs per image (`K_p`).
    pub k_pairs: usize,
    /// Learned context length `m` of the COM and DIF prompt families.
    pub m_ctx: usize,
    /// Optional descriptions file (`"a|b": [...]` or `classname: [...]`).
    pub descriptions: Option<PathBuf>,
}

impl Default for SemConfig {
    fn default() -> Self {
        Self {
            k_cand: 8,
            k_pairs: 3,
            m_ctx: 4,
            descriptions: None,
        }
    }
}

/// Sample Confusion Miner and Diff-Manner Adapter (§3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamConfig {
    /// Representative Confusion Samples per image (`K_s`).
    pub k_samples: usize,
    /// Temperature of the retrieval weights.
    pub temperature: f32,
    /// Adapter bottleneck: hidden width is `D / reduction`.
    pub reduction: usize,
}

impl Default for SamConfig {
    fn default() -> Self {
        Self {
            k_samples: 4,
            temperature: 0.07,
            reduction: 4,
        }
    }
}

/// Multi-Granularity Discrepancy Expert (§4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MgdeConfig {
    /// Norm of the router's random initial rows.
    pub router_init_scale: f32,
    /// Weight of the load-balance loss.
    pub lambda_lb: f64,
}

impl Default for MgdeConfig {
    fn default() -> Self {
        Self {
            router_init_scale: 0.01,
            lambda_lb: 0.01,
        }
    }
}

/// Optimisation (§5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f64,
    /// Learning rate of the CAPT head (adapter, router, gains), on the same schedule;
    /// `None` = `lr`. Default 0.05 (not the spec's single lr): zero-initialised gains at lr
    /// 0.002 barely move in a few hundred steps, and the sample expert not at all
    /// (docs/METHOD.md, "Choices measured here").
    pub head_lr: Option<f64>,
    pub momentum: f64,
    pub weight_decay: f64,
    pub warmup_epochs: usize,
    pub warmup_lr: f64,
    pub epochs: usize,
    pub batch_size: usize,
    /// Global L2 gradient-norm clip; `None` or 0 disables clipping (a TOML file writes
    /// `grad_clip = 0`).
    pub grad_clip: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 0.002,
            head_lr: Some(0.05),
            momentum: 0.9,
            weight_decay: 5e-4,
            warmup_epochs: 1,
            warmup_lr: 1e-5,
            epochs: 20,
            batch_size: 4,
            grad_clip: Some(1.0),
        }
    }
}

/// Data protocol (§5, §7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub shots: usize,
    pub seeds: Vec<u64>,
    /// Training views: RandomResizedCrop scale range.
    pub crop_scale: (f32, f32),
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            shots: 16,
            seeds: vec![1, 2, 3],
            crop_scale: (0.08, 1.0),
        }
    }
}

/// The whole run configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptConfig {
    pub method: Method,
    pub prompt: PromptConfig,
    pub bank: BankConfig,
    pub sem: SemConfig,
    pub sam: SamConfig,
    pub mgde: MgdeConfig,
    pub optim: OptimConfig,
    pub data: DataConfig,
}

impl Default for CaptConfig {
    fn default() -> Self {
        Self {
            method: Method::Capt,
            prompt: PromptConfig::default(),
            bank: BankConfig::default(),
            sem: SemConfig::default(),
            sam: SamConfig::default(),
            mgde: MgdeConfig::default(),
            optim: OptimConfig::default(),
            data: DataConfig::default(),
        }
    }
}

impl CaptConfig {
    /// The config a run of `self.method` trains with: `coop-plain` takes CoOp's own prompt
    /// settings (16 random context tokens, no KgCoOp term) wherever the prompt config is
    /// still at its defaults; every other method is unchanged.
    pub fn effective(&self) -> CaptConfig {
        let mut c = self.clone();
        if c.method == Method::CoopPlain {
            let d = PromptConfig::default();
            if c.prompt.n_ctx == d.n_ctx {
                c.prompt.n_ctx = 16;
            }
            if c.prompt.ctx_init == d.ctx_init {
                c.prompt.ctx_init = None;
            }
            if c.prompt.lambda_kg == d.lambda_kg {
                c.prompt.lambda_kg = 0.0;
            }
        }
        c
    }

    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let cfg: CaptConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<string>".into(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_toml_string(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises to TOML")
    }

    /// Checks the cross-field rules the method relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let p = &self.prompt;
        if p.n_ctx == 0 {
            return bad("prompt.n_ctx must be at least 1".into());
        }
        if p.text_depth == 0 {
            return bad("prompt.text_depth must be at least 1 (1 = input layer only)".into());
        }
        if p.vision_depth > 0 && p.vision_n_ctx == 0 {
            return bad(
                "prompt.vision_n_ctx must be at least 1 when prompt.vision_depth > 0".into(),
            );
        }
        if !p.template.contains("{}") {
            return bad(format!(
                "prompt.template `{}` has no `{{}}` placeholder for the class name",
                p.template
            ));
        }
        if let Some(init) = &p.ctx_init {
            if init.trim().is_empty() {
                return bad("prompt.ctx_init is empty; remove it for random initialisation".into());
            }
        }
        if self.sem.k_pairs == 0 || self.sem.k_cand == 0 {
            return bad("sem.k_pairs and sem.k_cand must be at least 1".into());
        }
        if self.sem.k_pairs > self.sem.k_cand {
            return bad(format!(
                "sem.k_pairs ({}) is larger than sem.k_cand ({}): pairs are chosen among the candidates",
                self.sem.k_pairs, self.sem.k_cand
            ));
        }
        if self.sem.m_ctx == 0 {
            return bad("sem.m_ctx must be at least 1".into());
        }
        if self.sam.k_samples == 0 {
            return bad("sam.k_samples must be at least 1".into());
        }
        if self.sam.temperature <= 0.0 || self.bank.prior_temperature <= 0.0 {
            return bad(
                "temperatures (sam.temperature, bank.prior_temperature) must be > 0".into(),
            );
        }
        if self.sam.reduction == 0 {
            return bad("sam.reduction must be at least 1".into());
        }
        let b = &self.bank;
        if b.cell_size == 0 || b.pool_size == 0 || b.views == 0 || b.local_grid == 0 {
            return bad(
                "bank.cell_size, bank.pool_size, bank.views and bank.local_grid must be at least 1"
                    .into(),
            );
        }
        if !(0.0..=1.0).contains(&b.decay) {
            return bad(format!("bank.decay ({}) must lie in [0, 1]", b.decay));
        }
        let o = &self.optim;
        if o.epochs == 0 || o.batch_size == 0 {
            return bad("optim.epochs and optim.batch_size must be at least 1".into());
        }
        if o.warmup_epochs >= o.epochs && o.warmup_epochs > 0 {
            return bad(format!(
                "optim.warmup_epochs ({}) must be smaller than optim.epochs ({})",
                o.warmup_epochs, o.epochs
            ));
        }
        if o.lr.is_nan() || o.lr <= 0.0 || !o.lr.is_finite() {
            return bad(format!("optim.lr ({}) must be a positive number", o.lr));
        }
        if let Some(h) = o.head_lr {
            if h.is_nan() || h <= 0.0 || !h.is_finite() {
                return bad(format!("optim.head_lr ({h}) must be a positive number"));
            }
        }
        if let Some(c) = o.grad_clip {
            if c.is_nan() || c < 0.0 {
                return bad(format!(
                    "optim.grad_clip ({c}) must be >= 0; 0 disables clipping"
                ));
            }
        }
        if self.data.shots == 0 {
            return bad("data.shots must be at least 1".into());
        }
        let (lo, hi) = self.data.crop_scale;
        if !(0.0 < lo && lo <= hi && hi <= 1.0) {
            return bad(format!(
                "data.crop_scale ({lo}, {hi}) must satisfy 0 < min <= max <= 1"
            ));
        }
        Ok(())
    }

    /// Learning rate at `epoch` (0-based) of a run: a constant warm-up of
    /// `warmup_epochs` at `warmup_lr`, then cosine from `lr` to 0 over the remaining epochs
    /// (Dassl's `ConstantWarmupScheduler` around `CosineAnnealingLR`).
    pub fn lr_at_epoch(&self, epoch: usize) -> f64 {
        let o = &self.optim;
        if epoch < o.warmup_epochs {
            return o.warmup_lr;
        }
        let t = (epoch - o.warmup_epochs) as f64;
        let total = (o.epochs - o.warmup_epochs).max(1) as f64;
        0.5 * o.lr * (1.0 + (std::f64::consts::PI * t / total).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_spec_values_and_valid() {
        let c = CaptConfig::default();
        c.validate().unwrap();
        assert_eq!(c.prompt.n_ctx, 4);
        assert_eq!(c.bank.cell_size, 8);
        assert_eq!(c.sem.k_cand, 8);
        assert_eq!(c.sem.k_pairs, 3);
        assert_eq!(c.sam.k_samples, 4);
        assert_eq!(c.optim.batch_size, 4);
        assert_eq!(c.prompt.lambda_kg, 8.0);
    }

    #[test]
    fn toml_roundtrip_and_overrides() {
        let c = CaptConfig::from_toml_str("method = \"coop\"\n[optim]\nepochs = 5\n").unwrap();
        assert_eq!(c.method, Method::Coop);
        assert_eq!(c.optim.epochs, 5);
        assert_eq!(c.optim.lr, 0.002);
        let back = CaptConfig::from_toml_str(&c.to_toml_string()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn inconsistent_configs_are_rejected_with_the_field() {
        let e = CaptConfig::from_toml_str("[sem]\nk_pairs = 9\n").unwrap_err();
        assert!(e.to_string().contains("sem.k_pairs"), "{e}");
        let e = CaptConfig::from_toml_str("method = \"capt-plus\"\n").unwrap_err();
        assert!(e.to_string().contains("capt-plus"), "{e}");
        let e = CaptConfig::from_toml_str("[optim]\nlearning_rate = 1.0\n").unwrap_err();
        assert!(e.to_string().contains("learning_rate"), "{e}");
        assert!(Method::parse("nope").is_err());
    }

    #[test]
    fn coop_plain_is_coop_with_its_own_prompt_settings() {
        let mut c = CaptConfig {
            method: Method::CoopPlain,
            ..CaptConfig::default()
        };
        let e = c.effective();
        assert_eq!((e.prompt.n_ctx, e.prompt.lambda_kg), (16, 0.0));
        assert_eq!(e.prompt.ctx_init, None);
        assert!(!e.method.uses_bank() && e.method.trains());
        c.prompt.n_ctx = 8;
        assert_eq!(c.effective().prompt.n_ctx, 8, "an explicit setting wins");
        let kg = CaptConfig::default();
        assert_eq!(kg.effective(), kg);
        assert_eq!(Method::parse("coop-plain").unwrap(), Method::CoopPlain);
    }

    #[test]
    fn schedule_warms_up_then_cosine() {
        let c = CaptConfig::default();
        assert_eq!(c.lr_at_epoch(0), 1e-5);
        assert!((c.lr_at_epoch(1) - 0.002).abs() < 1e-12);
        assert!(c.lr_at_epoch(10) < 0.002 && c.lr_at_epoch(10) > 0.0);
        assert!(c.lr_at_epoch(19) < c.lr_at_epoch(18));
    }
}
