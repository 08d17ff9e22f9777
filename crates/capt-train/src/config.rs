//! Run configuration: the method's `CaptConfig` (every spec default) plus trainer-only
//! settings under `[trainer]` in the same TOML file, then command-line overrides.

use std::path::Path;

use capt_method::{CaptConfig, ConfigError};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

pub use capt_checkpoint::TrainerConfig;

/// Method config + trainer config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub capt: CaptConfig,
    pub trainer: TrainerConfig,
}

impl RunConfig {
    /// Reads a TOML file: `CaptConfig` keys at the top level, `[trainer]` for the trainer.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TrainError::io("read config file", path, e))?;
        Self::from_toml_str(&text).map_err(|e| match e {
            TrainError::MethodConfig(ConfigError::Parse { message, .. }) => {
                TrainError::MethodConfig(ConfigError::Parse {
                    path: path.display().to_string(),
                    message,
                })
            }
            TrainError::Config(m) => {
                TrainError::Config(format!("config file {}: {m}", path.display()))
            }
            other => other,
        })
    }

    pub fn from_toml_str(text: &str) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| {
            TrainError::MethodConfig(ConfigError::Parse {
                path: "<string>".into(),
                message: e.to_string(),
            })
        })?;
        let trainer = match table.remove("trainer") {
            Some(v) => v
                .try_into::<TrainerConfig>()
                .map_err(|e| TrainError::Config(format!("[trainer]: {e}")))?,
            None => TrainerConfig::default(),
        };
        let rest = toml::to_string(&table).expect("a parsed table serialises");
        let capt = CaptConfig::from_toml_str(&rest)?;
        let cfg = Self { capt, trainer };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.capt.validate()?;
        if self.trainer.eval_batch == 0 || self.trainer.text_chunk == 0 {
            return Err(TrainError::Config(
                "trainer.eval_batch and trainer.text_chunk must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The config a run trains with ([`CaptConfig::effective`]: method-specific prompt
    /// settings of `coop-plain`).
    pub fn effective(&self) -> RunConfig {
        RunConfig {
            capt: self.capt.effective(),
            trainer: self.trainer.clone(),
        }
    }

    /// Views cached per training image.
    pub fn train_views(&self) -> usize {
        if self.trainer.train_views == 0 {
            self.capt.bank.views
        } else {
            self.trainer.train_views
        }
    }

    pub fn to_toml_string(&self) -> String {
        let mut s = self.capt.to_toml_string();
        s.push_str("\n[trainer]\n");
        s.push_str(&toml::to_string_pretty(&self.trainer).expect("trainer config serialises"));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capt_method::Method;

    #[test]
    fn trainer_section_is_split_off_and_checked() {
        let c = RunConfig::from_toml_str("method = \"coop\"\n[trainer]\ngrad_pairs = 2\n").unwrap();
        assert_eq!(c.capt.method, Method::Coop);
        assert_eq!(c.trainer.grad_pairs, 2);
        let back = RunConfig::from_toml_str(&c.to_toml_string()).unwrap();
        assert_eq!(back, c);
        let e = RunConfig::from_toml_str("[trainer]\ngrad_pair = 2\n").unwrap_err();
        assert!(e.to_string().contains("grad_pair"), "{e}");
        let e = RunConfig::from_toml_str("[sem]\nk_pairs = 9\n").unwrap_err();
        assert!(e.to_string().contains("k_pairs"), "{e}");
    }
}
