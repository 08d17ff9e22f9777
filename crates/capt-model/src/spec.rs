//! [`ModelSpec`]: everything needed to (re)build the exported graphs from their parameters.
//! Serialised into the model directory's manifest (`capt.json`, field `model_spec`) so the
//! edge runtime can re-emit the classifier after adding classes.

use capt_method::head::HeadConfig;
use capt_method::{CaptConfig, Method};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// MLP activation of a tower (same JSON names as `capt_clip::Activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Act {
    QuickGelu,
    Gelu,
}

/// Transformer sizes of one tower.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TowerSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub hidden_act: Act,
    pub layer_norm_eps: f64,
}

/// The vision tower (field names as `capt_clip::ClipVisionConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionSpec {
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    #[serde(flatten)]
    pub tower: TowerSpec,
}

impl VisionSpec {
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// The text tower (field names as `capt_clip::ClipTextConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextTowerSpec {
    pub vocab_size: usize,
    /// Context length (77).
    pub max_position_embeddings: usize,
    #[serde(flatten)]
    pub tower: TowerSpec,
}

/// CLIP architecture (JSON-compatible with `capt_clip::ClipConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipSpec {
    pub text: TextTowerSpec,
    pub vision: VisionSpec,
    pub projection_dim: usize,
}

/// One output of `text_encoder.onnx`: a prompt family and the text each row must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextFamily {
    /// Class embeddings `t_c`: learned `prompt.ctx` (+ deep prompts) before `"{name}."`
    /// (for zero-shot exports: the plain template text).
    Class,
    /// Frozen zero-shot embeddings `t^zs` of the template text (the bank prior's `S_text`).
    ZeroShot,
    /// SEM commonality `[COM] {a} and {b}.`
    Com,
    /// SEM difference `[DIF] {a}, not {b}.`
    Dif,
}

impl TextFamily {
    /// Output name in `text_encoder.onnx`.
    pub fn output(self) -> &'static str {
        match self {
            TextFamily::Class => "text_embeds",
            TextFamily::ZeroShot => "zs_embeds",
            TextFamily::Com => "com_embeds",
            TextFamily::Dif => "dif_embeds",
        }
    }
}

/// The text side of the export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextSpec {
    /// Learned context tokens spliced after SOT for [`TextFamily::Class`] (0: none).
    pub n_ctx: usize,
    /// Deep text prompt layers (`prompt.deep.1..`), replacing the context slots.
    pub deep_layers: usize,
    /// SEM context length `m` (0 without SEM).
    pub m_ctx: usize,
    /// Text of a class row for [`TextFamily::Class`], `{}` = class name (e.g. `"{}."`).
    pub class_prompt: String,
    /// Zero-shot template (e.g. `"a photo of a {}."`).
    pub zs_template: String,
    /// Outputs of `text_encoder.onnx`, in order.
    pub families: Vec<TextFamily>,
}

impl TextSpec {
    /// Context tokens a family splices after SOT.
    pub fn ctx_len(&self, family: TextFamily) -> usize {
        match family {
            TextFamily::Class => self.n_ctx,
            TextFamily::ZeroShot => 0,
            TextFamily::Com | TextFamily::Dif => self.m_ctx,
        }
    }

    /// The text a family encodes for class `a` (and partner `b` for the pair families);
    /// names are written as prompts use them (`_` -> space).
    pub fn text(&self, family: TextFamily, a: &str, b: &str) -> String {
        let (a, b) = (a.replace('_', " "), b.replace('_', " "));
        match family {
            TextFamily::Class => self.class_prompt.replace("{}", &a),
            TextFamily::ZeroShot => self.zs_template.replace("{}", &a),
            TextFamily::Com => com_text(&a, &b),
            TextFamily::Dif => dif_text(&a, &b),
        }
    }
}

/// SEM's commonality prompt of the pair (a, b) (after `[COM]` context tokens): the one place
/// its text is written, for the trainer and the exported text encoder alike.
pub fn com_text(a: &str, b: &str) -> String {
    format!("{a} and {b}.")
}

/// SEM's difference prompt of the pair (a, b) (after `[DIF]` context tokens).
pub fn dif_text(a: &str, b: &str) -> String {
    format!("{a}, not {b}.")
}

/// What the exported graphs compute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub clip: ClipSpec,
    pub method: Method,
    pub num_classes: usize,
    /// Side of the pooled local-token grid (`bank.local_grid`, 4 -> 16 tokens).
    pub local_grid: usize,
    /// Deep visual prompt layers (`prompt.visual.0..`), 0 = none.
    pub visual_prompt_layers: usize,
    /// The run's CAPT configuration (head sizes, prior), for CAPT methods.
    pub capt: Option<CaptConfig>,
    pub text: TextSpec,
}

impl ModelSpec {
    /// The CAPT head of this model, `None` for zero-shot and CoOp.
    pub fn head(&self) -> Result<Option<HeadConfig>> {
        if !self.method.uses_bank() {
            return Ok(None);
        }
        let capt = self.capt.as_ref().ok_or_else(|| {
            ModelError::Spec(format!(
                "method `{}` has a CAPT head but the spec carries no CAPT config",
                self.method.name()
            ))
        })?;
        let g = self.local_grid * self.local_grid;
        Ok(Some(HeadConfig::from_config(
            capt,
            self.num_classes,
            self.clip.projection_dim,
            g,
        )?))
    }

    /// Checks sizes that the graphs rely on.
    pub fn validate(&self) -> Result<()> {
        let v = &self.clip.vision;
        let err = |m: String| Err(ModelError::Spec(m));
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return err(format!(
                "image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        for (name, t) in [("vision", &v.tower), ("text", &self.clip.text.tower)] {
            if t.num_attention_heads == 0 || !t.hidden_size.is_multiple_of(t.num_attention_heads) {
                return err(format!(
                    "{name} width {} is not divisible by {} heads",
                    t.hidden_size, t.num_attention_heads
                ));
            }
        }
        if self.num_classes == 0 {
            return err("no classes".into());
        }
        let ctx = self.clip.text.max_position_embeddings;
        if self.text.n_ctx + 2 > ctx || self.text.m_ctx + 2 > ctx {
            return err(format!(
                "{} / {} context tokens do not fit a text context of {ctx}",
                self.text.n_ctx, self.text.m_ctx
            ));
        }
        if self.local_grid == 0 || self.local_grid > v.grid_size() {
            return err(format!(
                "local grid {} must be in 1..={} (the patch grid)",
                self.local_grid,
                v.grid_size()
            ));
        }
        self.head()?;
        Ok(())
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("ModelSpec serialises")
    }

    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        serde_json::from_value(v.clone())
            .map_err(|e| ModelError::Spec(format!("cannot read the model spec: {e}")))
    }
}
