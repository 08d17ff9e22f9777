//! Text prompts: the base prompt learner (CoOp context, class-specific option, deep text
//! prompts), the zero-shot template embeddings, and the SEM pair prompts
//! `[SOS] COM_1..m {a} and {b}. [EOS]` / `[SOS] DIF_1..m {a}, not {b}. [EOS]`.

use candle_core::Tensor;
use capt_clip::DeepTextPrompts;
use capt_data::prompt_classname;

use crate::backbone::{Backbone, TokenRows};
use crate::error::{Result, TrainError};
use crate::params::ParamStore;
use crate::rng;

// Checkpoint names of the learned prompts: the exported graphs read them under the same
// names, so both sides take them from capt-model.
pub use capt_model::names::{deep_text as deep_name, visual as visual_name, COM_CTX, CTX, DIF_CTX};

/// The two SEM prompt families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// `[COM] {a} and {b}.`
    Com,
    /// `[DIF] {a}, not {b}.`
    Dif,
}

impl Family {
    pub fn param(self) -> &'static str {
        match self {
            Family::Com => COM_CTX,
            Family::Dif => DIF_CTX,
        }
    }

    pub fn text(self, a: &str, b: &str) -> String {
        let (a, b) = (prompt_classname(a), prompt_classname(b));
        match self {
            Family::Com => capt_model::spec::com_text(&a, &b),
            Family::Dif => capt_model::spec::dif_text(&a, &b),
        }
    }
}

/// Initial context `[n, W]`: the token embeddings of `init` (must be `n` tokens), else N(0, 0.02).
pub fn init_context(
    backbone: &Backbone,
    init: Option<&str>,
    n: usize,
    seed: u64,
    name: &str,
    what: &str,
) -> Result<Tensor> {
    let w = backbone.text_width();
    match init {
        Some(phrase) => {
            let emb = backbone.phrase_embeddings(phrase)?;
            let got = emb.dim(0)?;
            if got != n {
                return Err(TrainError::Config(format!(
                    "{what}: the initialisation phrase {phrase:?} has {got} tokens but {n} context tokens are learned; \
                     set the context length to {got} or remove the phrase for random N(0, 0.02) initialisation"
                )));
            }
            Ok(emb)
        }
        None => {
            let data = rng::normal(
                &mut rng::rng(seed, rng::stream::INIT, rng::name_id(name)),
                n * w,
                0.02,
            );
            Ok(Tensor::from_vec(data, (n, w), &backbone.device)?)
        }
    }
}

/// Adds the prompt learner's tensors: `prompt.ctx` `[n, W]` (or `[C, n, W]` class-specific),
/// `prompt.deep.{1..d-1}` `[n, W]`, `prompt.visual.{0..vd-1}` `[nv, Wv]`.
pub fn init_prompt_params(
    params: &mut ParamStore,
    backbone: &Backbone,
    cfg: &capt_method::config::PromptConfig,
    num_classes: usize,
    seed: u64,
) -> Result<()> {
    let n = cfg.n_ctx;
    let w = backbone.text_width();
    let ctx = if cfg.class_specific {
        let rows: Vec<Tensor> = (0..num_classes)
            .map(|c| {
                init_context(
                    backbone,
                    cfg.ctx_init.as_deref(),
                    n,
                    seed,
                    &format!("{CTX}[{c}]"),
                    "prompt.ctx_init",
                )
            })
            .collect::<Result<_>>()?;
        Tensor::stack(&rows, 0)?
    } else {
        init_context(
            backbone,
            cfg.ctx_init.as_deref(),
            n,
            seed,
            CTX,
            "prompt.ctx_init",
        )?
    };
    params.insert(CTX, &ctx)?;
    let layers = backbone.config.text.num_hidden_layers;
    if cfg.text_depth > layers {
        return Err(TrainError::Config(format!(
            "prompt.text_depth = {} but the text tower has {layers} layers",
            cfg.text_depth
        )));
    }
    for k in 1..cfg.text_depth {
        let name = deep_name(k);
        let data = rng::normal(
            &mut rng::rng(seed, rng::stream::INIT, rng::name_id(&name)),
            n * w,
            0.02,
        );
        params.insert_data(&name, &[n, w], data, &backbone.device)?;
    }
    if cfg.vision_depth > 0 {
        let vl = backbone.config.vision.num_hidden_layers;
        if cfg.vision_depth > vl {
            return Err(TrainError::Config(format!(
                "prompt.vision_depth = {} but the vision tower has {vl} layers",
                cfg.vision_depth
            )));
        }
        backbone.vision()?;
        let wv = backbone.config.vision.hidden_size;
        let nv = cfg.vision_n_ctx;
        for k in 0..cfg.vision_depth {
            let name = visual_name(k);
            let data = rng::normal(
                &mut rng::rng(seed, rng::stream::INIT, rng::name_id(&name)),
                nv * wv,
                0.02,
            );
            params.insert_data(&name, &[nv, wv], data, &backbone.device)?;
        }
    }
    Ok(())
}

/// Adds the SEM contexts `sem.com_ctx` / `sem.dif_ctx` `[m, W]`: initialised like the base
/// context when its phrase has exactly `m` tokens (natural-language start), else N(0, 0.02).
pub fn init_sem_params(
    params: &mut ParamStore,
    backbone: &Backbone,
    cfg: &capt_method::CaptConfig,
    seed: u64,
) -> Result<()> {
    let m = cfg.sem.m_ctx;
    let phrase = cfg.prompt.ctx_init.as_deref().filter(|p| {
        backbone
            .tokenizer
            .token_ids_of_phrase(p)
            .map(|ids| ids.len() == m)
            .unwrap_or(false)
    });
    for fam in [Family::Com, Family::Dif] {
        let t = init_context(backbone, phrase, m, seed, fam.param(), "sem contexts")?;
        params.insert(fam.param(), &t)?;
    }
    Ok(())
}

/// Deep text prompts of the run (empty for depth 1).
pub fn deep_prompts(
    params: &ParamStore,
    depth: usize,
    grad: bool,
) -> Result<Option<DeepTextPrompts>> {
    if depth <= 1 {
        return Ok(None);
    }
    let layers = (1..depth)
        .map(|k| params.get_grad(&deep_name(k), grad))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(DeepTextPrompts { layers }))
}

/// Encodes `ctx` spliced after SOT of `rows` (room for the context already reserved),
/// returning `[n, D]` in the working dtype.
pub fn encode_with_context(
    backbone: &Backbone,
    ctx: &Tensor,
    rows: &TokenRows,
    deep: Option<&DeepTextPrompts>,
) -> Result<Tensor> {
    let prompts = backbone.text.build_prompts(ctx, &rows.ids)?;
    Ok(backbone
        .text
        .forward_embeds(&prompts.embeds, &prompts.eot_positions, deep)?
        .to_dtype(backbone.work)?)
}

/// Class prompt rows `SOT {name}. EOT` with room for `n_ctx` tokens.
pub fn class_rows(backbone: &Backbone, classnames: &[String], n_ctx: usize) -> Result<TokenRows> {
    let texts: Vec<String> = classnames
        .iter()
        .map(|c| format!("{}.", prompt_classname(c)))
        .collect();
    backbone.tokenize(&texts, n_ctx)
}

/// Zero-shot texts of a template.
pub fn template_texts(template: &str, classnames: &[String]) -> Vec<String> {
    classnames
        .iter()
        .map(|c| template.replace("{}", &prompt_classname(c)))
        .collect()
}

/// `C x C` cosine similarity of `emb [C, D]` (row-major).
pub fn cosine_matrix(emb: &Tensor) -> Result<Vec<f32>> {
    let n = capt_clip::l2_normalize(emb)?;
    Ok(n.matmul(&n.t()?)?
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?)
}
