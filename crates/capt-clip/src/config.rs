//! CLIP configuration: presets and the HF `config.json` reader.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{ClipError, Result};

/// MLP activation. OpenAI CLIP uses QuickGELU; some open_clip / HF checkpoints use exact GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// Exact (erf) GELU, HF's `"gelu"`.
    Gelu,
}

impl Activation {
    /// Parses an HF `hidden_act` value.
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    /// Width `W` of the text transformer.
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Context length (77 for CLIP).
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    /// Width of the vision transformer.
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// Patches per side.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Number of patch tokens `P`.
    pub fn num_patches(&self) -> usize {
        self.grid_size() * self.grid_size()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    /// Joint embedding dim `D`.
    pub projection_dim: usize,
    /// Initial `logit_scale` (ln(1/0.07) = 2.6592); the checkpoint's value wins when loading.
    pub logit_scale_init: f64,
}

const LOGIT_SCALE_INIT: f64 = 2.6592;

fn text_512() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 49408,
        hidden_size: 512,
        intermediate_size: 2048,
        num_hidden_layers: 12,
        num_attention_heads: 8,
        max_position_embeddings: 77,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
    }
}

fn vision_768(patch_size: usize) -> ClipVisionConfig {
    ClipVisionConfig {
        image_size: 224,
        patch_size,
        num_channels: 3,
        hidden_size: 768,
        intermediate_size: 3072,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
    }
}

impl ClipConfig {
    /// OpenAI ViT-B/32.
    pub fn vit_b32() -> Self {
        Self {
            text: text_512(),
            vision: vision_768(32),
            projection_dim: 512,
            logit_scale_init: LOGIT_SCALE_INIT,
        }
    }

    /// OpenAI ViT-B/16 (the reference backbone).
    pub fn vit_b16() -> Self {
        Self {
            vision: vision_768(16),
            ..Self::vit_b32()
        }
    }

    /// OpenAI ViT-L/14 (224 px): text width 768 with 12 heads, vision 1024 x 24 layers.
    pub fn vit_l14() -> Self {
        Self {
            text: ClipTextConfig {
                hidden_size: 768,
                intermediate_size: 3072,
                num_attention_heads: 12,
                ..text_512()
            },
            vision: ClipVisionConfig {
                patch_size: 14,
                hidden_size: 1024,
                intermediate_size: 4096,
                num_hidden_layers: 24,
                num_attention_heads: 16,
                ..vision_768(14)
            },
            projection_dim: 768,
            logit_scale_init: LOGIT_SCALE_INIT,
        }
    }

    /// A few-kB model for tests: the architecture of `tests/fixtures/clip/tiny-hf` (whose text
    /// tower uses exact GELU; this preset uses QuickGELU on both towers).
    pub fn tiny() -> Self {
        Self {
            text: ClipTextConfig {
                vocab_size: 600,
                hidden_size: 32,
                intermediate_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                max_position_embeddings: 77,
                hidden_act: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
            },
            vision: ClipVisionConfig {
                image_size: 32,
                patch_size: 8,
                num_channels: 3,
                hidden_size: 48,
                intermediate_size: 96,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                hidden_act: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
            },
            projection_dim: 24,
            logit_scale_init: LOGIT_SCALE_INIT,
        }
    }

    /// Reads an HF `config.json` (`model_type: "clip"`, `text_config` / `vision_config`, the legacy
    /// `*_config_dict` overrides as HF applies them, HF defaults for absent fields).
    pub fn from_hf_config_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ClipError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| ClipError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_hf_json_value(&value, path)
    }

    /// As [`Self::from_hf_config_json`], from parsed JSON; `file` is only used in errors.
    pub fn from_hf_json_value(value: &Value, file: &Path) -> Result<Self> {
        let r = HfReader {
            file: file.to_path_buf(),
        };
        let root = value
            .as_object()
            .ok_or_else(|| r.bad("<root>", value, "a JSON object"))?;
        if let Some(mt) = root.get("model_type") {
            if mt.as_str() != Some("clip") {
                return Err(r.bad("model_type", mt, "\"clip\" (a full CLIPModel config)"));
            }
        }
        let text = r.section(root, "text_config")?;
        let vision = r.section(root, "vision_config")?;

        let tc = ClipTextConfig {
            vocab_size: r.usize(&text, "text_config", "vocab_size", 49408)?,
            hidden_size: r.usize(&text, "text_config", "hidden_size", 512)?,
            intermediate_size: r.usize(&text, "text_config", "intermediate_size", 2048)?,
            num_hidden_layers: r.usize(&text, "text_config", "num_hidden_layers", 12)?,
            num_attention_heads: r.usize(&text, "text_config", "num_attention_heads", 8)?,
            max_position_embeddings: r.usize(
                &text,
                "text_config",
                "max_position_embeddings",
                77,
            )?,
            hidden_act: r.act(&text, "text_config")?,
            layer_norm_eps: r.f64(&text, "text_config", "layer_norm_eps", 1e-5)?,
        };
        let vc = ClipVisionConfig {
            image_size: r.square(&vision, "vision_config", "image_size", 224)?,
            patch_size: r.square(&vision, "vision_config", "patch_size", 32)?,
            num_channels: r.usize(&vision, "vision_config", "num_channels", 3)?,
            hidden_size: r.usize(&vision, "vision_config", "hidden_size", 768)?,
            intermediate_size: r.usize(&vision, "vision_config", "intermediate_size", 3072)?,
            num_hidden_layers: r.usize(&vision, "vision_config", "num_hidden_layers", 12)?,
            num_attention_heads: r.usize(&vision, "vision_config", "num_attention_heads", 12)?,
            hidden_act: r.act(&vision, "vision_config")?,
            layer_norm_eps: r.f64(&vision, "vision_config", "layer_norm_eps", 1e-5)?,
        };
        let cfg = ClipConfig {
            text: tc,
            vision: vc,
            projection_dim: r.usize(root, "", "projection_dim", 512)?,
            logit_scale_init: r.f64(root, "", "logit_scale_init_value", LOGIT_SCALE_INIT)?,
        };
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Checks the architecture is buildable; `file` names the source in the error.
    pub fn validate(&self, file: &Path) -> Result<()> {
        let err = |field: &str, value: usize, expected: String| ClipError::UnsupportedConfig {
            file: file.to_path_buf(),
            field: field.to_string(),
            value: value.to_string(),
            expected,
        };
        let t = &self.text;
        let v = &self.vision;
        let positive = [
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.num_attention_heads", t.num_attention_heads),
            (
                "text_config.max_position_embeddings",
                t.max_position_embeddings,
            ),
            ("vision_config.image_size", v.image_size),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.num_channels", v.num_channels),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("projection_dim", self.projection_dim),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(err(field, value, "a positive integer".into()));
            }
        }
        if !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            return Err(err(
                "text_config.num_attention_heads",
                t.num_attention_heads,
                format!("a divisor of text_config.hidden_size = {}", t.hidden_size),
            ));
        }
        if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(err(
                "vision_config.num_attention_heads",
                v.num_attention_heads,
                format!("a divisor of vision_config.hidden_size = {}", v.hidden_size),
            ));
        }
        if !v.image_size.is_multiple_of(v.patch_size) {
            return Err(err(
                "vision_config.patch_size",
                v.patch_size,
                format!("a divisor of vision_config.image_size = {}", v.image_size),
            ));
        }
        Ok(())
    }
}

/// Reads HF config fields with HF defaults and errors that name the file and field.
struct HfReader {
    file: PathBuf,
}

impl HfReader {
    fn bad(&self, field: &str, value: &Value, expected: &str) -> ClipError {
        ClipError::UnsupportedConfig {
            file: self.file.clone(),
            field: field.to_string(),
            value: value.to_string(),
            expected: expected.to_string(),
        }
    }

    /// `name` merged with the legacy `name_dict`, whose entries win (as in transformers).
    fn section(&self, root: &Map<String, Value>, name: &str) -> Result<Map<String, Value>> {
        let mut out = Map::new();
        for key in [name.to_string(), format!("{name}_dict")] {
            match root.get(&key) {
                None | Some(Value::Null) => {}
                Some(Value::Object(m)) => out.extend(m.clone()),
                Some(other) => return Err(self.bad(&key, other, "a JSON object")),
            }
        }
        Ok(out)
    }

    fn field(section: &str, key: &str) -> String {
        if section.is_empty() {
            key.to_string()
        } else {
            format!("{section}.{key}")
        }
    }

    fn usize(&self, m: &Map<String, Value>, sec: &str, key: &str, default: usize) -> Result<usize> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| self.bad(&Self::field(sec, key), v, "a non-negative integer")),
        }
    }

    fn f64(&self, m: &Map<String, Value>, sec: &str, key: &str, default: f64) -> Result<f64> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.bad(&Self::field(sec, key), v, "a number")),
        }
    }

    /// An int, or an `[h, w]` list with `h == w` (non-square inputs are not supported).
    fn square(
        &self,
        m: &Map<String, Value>,
        sec: &str,
        key: &str,
        default: usize,
    ) -> Result<usize> {
        match m.get(key) {
            Some(Value::Array(a)) => {
                let dims: Vec<_> = a.iter().filter_map(Value::as_u64).collect();
                match dims.as_slice() {
                    [h, w] if h == w && a.len() == 2 => Ok(*h as usize),
                    _ => Err(self.bad(
                        &Self::field(sec, key),
                        &Value::Array(a.clone()),
                        "an integer or a square [n, n] pair",
                    )),
                }
            }
            _ => self.usize(m, sec, key, default),
        }
    }

    fn act(&self, m: &Map<String, Value>, sec: &str) -> Result<Activation> {
        match m.get("hidden_act") {
            None | Some(Value::Null) => Ok(Activation::QuickGelu),
            Some(v) => v.as_str().and_then(Activation::from_hf).ok_or_else(|| {
                self.bad(
                    &Self::field(sec, "hidden_act"),
                    v,
                    "\"quick_gelu\" or \"gelu\"",
                )
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_sized_as_published() {
        for cfg in [
            ClipConfig::vit_b32(),
            ClipConfig::vit_b16(),
            ClipConfig::vit_l14(),
            ClipConfig::tiny(),
        ] {
            cfg.validate(Path::new("<preset>")).unwrap();
        }
        assert_eq!(ClipConfig::vit_b16().vision.num_patches(), 196);
        assert_eq!(ClipConfig::vit_b32().vision.num_patches(), 49);
        let l = ClipConfig::vit_l14();
        assert_eq!((l.text.hidden_size, l.text.num_attention_heads), (768, 12));
        assert_eq!((l.vision.num_patches(), l.projection_dim), (256, 768));
    }

    #[test]
    fn config_round_trips_through_json() {
        let cfg = ClipConfig::vit_b16();
        let s = serde_json::to_string(&cfg).unwrap();
        assert_eq!(serde_json::from_str::<ClipConfig>(&s).unwrap(), cfg);
    }
}

/// The architecture as the export graphs describe it (`capt_model::ClipSpec`, candle-free).
impl From<&ClipConfig> for capt_model::ClipSpec {
    fn from(c: &ClipConfig) -> Self {
        use capt_model::{Act, ClipSpec, TextTowerSpec, TowerSpec, VisionSpec};
        let act = |a: Activation| match a {
            Activation::QuickGelu => Act::QuickGelu,
            Activation::Gelu => Act::Gelu,
        };
        let (t, v) = (&c.text, &c.vision);
        ClipSpec {
            text: TextTowerSpec {
                vocab_size: t.vocab_size,
                max_position_embeddings: t.max_position_embeddings,
                tower: TowerSpec {
                    hidden_size: t.hidden_size,
                    intermediate_size: t.intermediate_size,
                    num_hidden_layers: t.num_hidden_layers,
                    num_attention_heads: t.num_attention_heads,
                    hidden_act: act(t.hidden_act),
                    layer_norm_eps: t.layer_norm_eps,
                },
            },
            vision: VisionSpec {
                image_size: v.image_size,
                patch_size: v.patch_size,
                num_channels: v.num_channels,
                tower: TowerSpec {
                    hidden_size: v.hidden_size,
                    intermediate_size: v.intermediate_size,
                    num_hidden_layers: v.num_hidden_layers,
                    num_attention_heads: v.num_attention_heads,
                    hidden_act: act(v.hidden_act),
                    layer_norm_eps: v.layer_norm_eps,
                },
            },
            projection_dim: c.projection_dim,
        }
    }
}

#[cfg(test)]
mod clip_spec_tests {
    use super::*;

    /// `ClipSpec` reads the same JSON: the conversion and the JSON route agree.
    #[test]
    fn clip_spec_from_config_equals_its_json_reading() {
        for mut cfg in [ClipConfig::tiny(), ClipConfig::vit_b16()] {
            cfg.text.hidden_act = Activation::Gelu;
            let via_json: capt_model::ClipSpec =
                serde_json::from_value(serde_json::to_value(&cfg).unwrap()).unwrap();
            assert_eq!(capt_model::ClipSpec::from(&cfg), via_json);
        }
    }
}
