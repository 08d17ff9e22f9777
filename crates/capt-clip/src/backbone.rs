//! Where a backbone comes from (`--backbone`): the tiny test model, a local checkpoint (with an
//! `--arch` when its files cannot tell), or a hub id; and how each is resolved and recorded.

use std::path::PathBuf;

use crate::error::{ClipError, Result};

/// Where the backbone comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackboneSpec {
    /// `ClipConfig::tiny()` with weights drawn from a fixed seed: a few-kB model for tests and
    /// smoke runs (its features are meaningless).
    Tiny,
    /// An HF-format directory or a `.safetensors` state dict (see `ClipModel::load`).
    Path(PathBuf),
    /// A checkpoint with an `--arch` name for what its files cannot tell (activation, head
    /// width; `crate::arch_hint`).
    WithArch { path: PathBuf, arch: String },
    /// A Hugging Face hub id (`org/name[@revision]`, not an existing local path), fetched into
    /// the hub cache ([`crate::hub`]); recorded as `org/name@<commit>`.
    Hub {
        id: crate::hub::HubId,
        arch: Option<String>,
    },
}

impl BackboneSpec {
    pub fn parse(s: &str) -> Self {
        if s == "tiny" {
            BackboneSpec::Tiny
        } else if let Some(id) = crate::hub::HubId::parse(s) {
            BackboneSpec::Hub { id, arch: None }
        } else {
            BackboneSpec::Path(PathBuf::from(s))
        }
    }

    /// This checkpoint with `--arch` (when given); `tiny` takes none.
    pub fn with_arch(self, arch: Option<&str>) -> Result<Self> {
        match (self, arch) {
            (spec, None) => Ok(spec),
            (BackboneSpec::Tiny, Some(a)) => Err(ClipError::UnknownArch {
                what: format!("--arch {a}"),
                reason: "the tiny backbone has a fixed architecture; drop --arch".into(),
            }),
            (BackboneSpec::Path(path) | BackboneSpec::WithArch { path, .. }, Some(a)) => {
                crate::arch_hint(a)?;
                Ok(BackboneSpec::WithArch {
                    path,
                    arch: a.to_string(),
                })
            }
            (BackboneSpec::Hub { id, .. }, Some(a)) => {
                crate::arch_hint(a)?;
                Ok(BackboneSpec::Hub {
                    id,
                    arch: Some(a.to_string()),
                })
            }
        }
    }

    /// What `state.json` records as the backbone path (absolute when it exists, so a
    /// checkpoint finds its backbone from any working directory).
    pub fn display(&self) -> String {
        match self {
            BackboneSpec::Tiny => "tiny".into(),
            BackboneSpec::Path(p) | BackboneSpec::WithArch { path: p, .. } => {
                std::fs::canonicalize(p)
                    .unwrap_or_else(|_| p.clone())
                    .display()
                    .to_string()
            }
            BackboneSpec::Hub { id, .. } => match &id.revision {
                Some(r) => format!("{}@{r}", id.repo),
                None => id.repo.clone(),
            },
        }
    }
}

/// A resolved local backbone: its files, the `--arch` given, and how a checkpoint records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedBackbone {
    pub path: PathBuf,
    pub arch: Option<String>,
    /// A canonical path, or `org/name@<commit>` for a hub id.
    pub recorded: String,
}

impl BackboneSpec {
    /// The local files of this backbone (a hub id is fetched into the hub cache first);
    /// `None` for `tiny`, which has no files.
    pub fn resolve(&self) -> Result<Option<ResolvedBackbone>> {
        Ok(Some(match self {
            BackboneSpec::Tiny => return Ok(None),
            BackboneSpec::Path(p) => ResolvedBackbone {
                path: p.clone(),
                arch: None,
                recorded: self.display(),
            },
            BackboneSpec::WithArch { path, arch } => ResolvedBackbone {
                path: path.clone(),
                arch: Some(arch.clone()),
                recorded: self.display(),
            },
            BackboneSpec::Hub { id, arch } => {
                let r = crate::hub::resolve(id, &crate::hub::HubSettings::from_env())?;
                ResolvedBackbone {
                    path: r.dir,
                    arch: arch.clone(),
                    recorded: r.pinned,
                }
            }
        }))
    }
}
