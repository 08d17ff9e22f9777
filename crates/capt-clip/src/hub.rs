//! Hugging Face hub ids as backbones: `openai/clip-vit-base-patch16[@revision]` resolved through
//! the `hf-hub` crate into its standard cache (`$HF_HOME/hub`, default
//! `~/.cache/huggingface/hub`), from `$HF_ENDPOINT` (default `https://huggingface.co`), or from
//! the cache alone under `HF_HUB_OFFLINE=1`.
//!
//! A resolved backbone is recorded as `<repo>@<commit>` (the revision the hub answered with),
//! so a checkpoint reloads exactly the weights it trained on, from the cache, offline.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{ClipError, Result};

/// A hub model id with an optional revision (branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: Option<String>,
}

impl HubId {
    /// `org/name` or `org/name@revision` (hub naming: letters, digits, `-`, `_`, `.`), when
    /// `s` is not an existing local path.
    pub fn parse(s: &str) -> Option<Self> {
        if Path::new(s).exists() {
            return None;
        }
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
            Some(_) => return None,
            None => (s, None),
        };
        let ok = |part: &str| {
            !part.is_empty()
                && !part.starts_with('.')
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        match repo.split_once('/') {
            Some((org, name)) if ok(org) && ok(name) => Some(Self {
                repo: repo.to_string(),
                revision,
            }),
            _ => None,
        }
    }

    fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    fn display(&self) -> String {
        format!("{}@{}", self.repo, self.revision())
    }
}

/// Where and how to reach the hub.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// Base URL (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The hub cache folder (`$HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// Cache only (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    pub token: Option<String>,
    /// Show download progress bars.
    pub progress: bool,
}

impl HubSettings {
    /// From the environment, as the hub's own tools read it.
    pub fn from_env() -> Self {
        let cache = Cache::from_env();
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        Self {
            endpoint: std::env::var("HF_ENDPOINT")
                .unwrap_or_else(|_| "https://huggingface.co".into()),
            token: std::env::var("HF_TOKEN").ok().or_else(|| cache.token()),
            cache_dir: cache.path().clone(),
            offline,
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }
}

/// A hub model in the local cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The snapshot folder holding the fetched files (a checkpoint folder for `ClipModel::load`).
    pub dir: PathBuf,
    /// The commit the revision resolved to.
    pub commit: String,
    /// `<repo>@<commit>`: what checkpoints record.
    pub pinned: String,
}

/// Weight files tried in order (HF format first; then open_clip's names; then PyTorch).
const WEIGHTS: [&str; 4] = [
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
];
/// Config files fetched when the repo has them.
const CONFIGS: [&str; 2] = ["config.json", "open_clip_config.json"];

fn hub_err(id: &HubId, reason: String) -> ClipError {
    ClipError::Hub {
        id: id.display(),
        reason,
    }
}

/// What a failed request means, in a user's words.
fn explain(id: &HubId, file: &str, settings: &HubSettings, e: ApiError) -> ClipError {
    if let ApiError::RequestError(re) = &e {
        if let ureq::Error::Status(code, resp) = re.as_ref() {
            let kind = resp.header("x-error-code").unwrap_or("").to_string();
            let reason = match (code, kind.as_str()) {
                (_, "RevisionNotFound") => format!(
                    "revision `{}` does not exist in {}: check the branch, tag or commit",
                    id.revision(),
                    id.repo
                ),
                (_, "RepoNotFound") | (401, _) => format!(
                    "repository {} does not exist on {} (or is private: set HF_TOKEN), and \
                     there is no local path {0} either",
                    id.repo, settings.endpoint
                ),
                (404, _) => format!("{} has no {file}", id.display()),
                (code, _) => format!("{file}: HTTP {code} from {}", settings.endpoint),
            };
            return hub_err(id, reason);
        }
        return hub_err(
            id,
            format!(
                "no local path {} exists and {} cannot be reached ({re}); set HF_HUB_OFFLINE=1 \
                 to use the cache at {}, or put the files in a local folder and pass it as \
                 --backbone",
                id.repo,
                settings.endpoint,
                settings.cache_dir.display()
            ),
        );
    }
    if let ApiError::IoError(io) = &e {
        return hub_err(
            id,
            format!("{file}: download interrupted ({io}); nothing partial was kept: run again"),
        );
    }
    hub_err(id, format!("{file}: {e}"))
}

/// Removes what an interrupted download left in the repo's blob folder (hf-hub's `*.part`),
/// so the cache holds complete files only.
fn remove_partials(settings: &HubSettings, id: &HubId) {
    let blobs = settings
        .cache_dir
        .join(Repo::model(id.repo.clone()).folder_name())
        .join("blobs");
    if let Ok(rd) = std::fs::read_dir(&blobs) {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "part" || x == "lock") {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Resolves `id` into the local cache: the weights (the first of `model.safetensors`,
/// `open_clip_model.safetensors`, `pytorch_model.bin`, `open_clip_pytorch_model.bin` the repo has)
/// and its configs. Online, the hub is asked for the revision's commit (a cached copy is used
/// when that commit is complete in the cache); offline, the cache alone answers.
pub fn resolve(id: &HubId, settings: &HubSettings) -> Result<Resolved> {
    let repo = Repo::with_revision(id.repo.clone(), RepoType::Model, id.revision().to_string());
    let cache = Cache::new(settings.cache_dir.clone());
    let cached = cache.repo(repo.clone());
    // A commit pin (what checkpoints record) whose snapshot is in the cache needs no network.
    let rev = id.revision();
    if rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit()) {
        let snap = settings
            .cache_dir
            .join(repo.folder_name())
            .join("snapshots")
            .join(rev);
        if WEIGHTS.iter().any(|w| snap.join(w).exists()) {
            return Ok(Resolved {
                pinned: format!("{}@{rev}", id.repo),
                dir: snap,
                commit: rev.to_string(),
            });
        }
    }
    if settings.offline {
        let weights = WEIGHTS.iter().find_map(|w| cached.get(w)).ok_or_else(|| {
            hub_err(
                id,
                format!(
                    "HF_HUB_OFFLINE is set and its weights are not in the cache at {}: on a \
                     machine with hub access run `huggingface-cli download {} config.json \
                     model.safetensors` (HF_HOME set as here) and copy the cache over, or put \
                     config.json + model.safetensors in a folder and pass it as --backbone",
                    settings.cache_dir.display(),
                    id.repo
                ),
            )
        })?;
        return snapshot_of(id, &weights);
    }
    let api = ApiBuilder::from_cache(cache.clone())
        .with_endpoint(settings.endpoint.clone())
        .with_token(settings.token.clone())
        .with_progress(settings.progress)
        .build()
        .map_err(|e| hub_err(id, format!("cannot set up the hub client: {e}")))?;
    let remote = api.repo(repo);
    let fetch = |file: &str| -> Result<Option<PathBuf>> {
        match remote.download(file) {
            Ok(p) => Ok(Some(p)),
            Err(e) => {
                remove_partials(settings, id);
                let missing = matches!(&e, ApiError::RequestError(re)
                    if matches!(re.as_ref(), ureq::Error::Status(404, r)
                        if r.header("x-error-code") == Some("EntryNotFound")));
                if missing {
                    Ok(None)
                } else {
                    Err(explain(id, file, settings, e))
                }
            }
        }
    };
    let mut weights = None;
    for w in WEIGHTS {
        if let Some(p) = fetch(w)? {
            weights = Some(p);
            break;
        }
    }
    let weights = weights.ok_or_else(|| {
        hub_err(
            id,
            format!("has none of {WEIGHTS:?}: not a CLIP checkpoint capt can load"),
        )
    })?;
    for c in CONFIGS {
        fetch(c)?;
    }
    // A file whose hub etag is a sha256 (LFS) is checked against it: a download that ended
    // early never passes for the model.
    if let Ok(target) = std::fs::read_link(&weights) {
        if let Some(etag) = target.file_name().map(|n| n.to_string_lossy().into_owned()) {
            if etag.len() == 64 && etag.chars().all(|c| c.is_ascii_hexdigit()) {
                let blob = weights
                    .parent()
                    .map(|d| d.join(&target))
                    .unwrap_or(target.clone());
                let got = crate::load::backbone_hash(&blob)
                    .map_err(|e| hub_err(id, format!("cannot read {}: {e}", blob.display())))?;
                if got != etag {
                    let _ = std::fs::remove_file(&blob);
                    let _ = std::fs::remove_file(&weights);
                    return Err(hub_err(
                        id,
                        format!(
                            "{} arrived with sha256 {got}, the hub says {etag}: removed; run again",
                            weights.display()
                        ),
                    ));
                }
            }
        }
    }
    let r = snapshot_of(id, &weights)?;
    tracing::info!(repo = %id.repo, revision = id.revision(), commit = %r.commit, dir = %r.dir.display(), "hub backbone ready");
    Ok(r)
}

/// The snapshot folder (`snapshots/<commit>/`) holding a cached file, as a [`Resolved`].
fn snapshot_of(id: &HubId, file: &Path) -> Result<Resolved> {
    let dir = file
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| hub_err(id, "cache entry without a folder".into()))?;
    let commit = dir
        .file_name()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Resolved {
        pinned: format!("{}@{commit}", id.repo),
        dir,
        commit,
    })
}

/// A backbone argument as a local checkpoint path: itself when it exists, else a hub id
/// resolved with the environment's settings ([`HubSettings::from_env`]), with the pinned
/// `<repo>@<commit>` to record. `Ok((path, None))` for local paths (including missing ones:
/// loading names them).
pub fn local_path(s: &str) -> Result<(PathBuf, Option<String>)> {
    match HubId::parse(s) {
        None => Ok((PathBuf::from(s), None)),
        Some(id) => {
            let r = resolve(&id, &HubSettings::from_env())?;
            Ok((r.dir, Some(r.pinned)))
        }
    }
}
