//! The exported model directory: `DIR/capt.json` (the manifest the exporter writes) plus the
//! ONNX files it lists, each pinned by sha256. Everything is checked on open so a broken or
//! half-copied directory fails at start-up with the file and the fix named, not mid-request.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use capt_core::PreprocessConfig;
use serde::{Deserialize, Serialize};

/// The manifest file name inside a model directory.
pub const MANIFEST_FILE: &str = "capt.json";
/// The manifest format this runtime reads.
pub const FORMAT_VERSION: u32 = 1;

/// `DIR/capt.json`. Unknown fields are ignored so a newer exporter can add information
/// without breaking older runtimes; a breaking change bumps `format_version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub model_name: String,
    /// Class names in logit order.
    pub class_names: Vec<String>,
    /// Joint image/text embedding dimension (512 for ViT-B/16).
    pub embedding_dim: usize,
    pub preprocess: PreprocessConfig,
    /// How the classifier was produced: "capt", "coop", "zeroshot", ...
    pub method: String,
    pub files: ModelFiles,
    /// sha256 of the training checkpoint the export came from.
    pub source_checkpoint_sha256: String,
    /// sha256 of the frozen CLIP backbone weights.
    pub backbone_sha256: String,
    /// Where those weights came from: a path, or a hub model pinned to the commit it resolved
    /// to (`openai/clip-vit-base-patch16@<commit>`). Empty in manifests written before.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backbone: String,
    /// Tool and version that wrote the directory, e.g. "capt-export 0.1.0".
    pub created_by: String,
    /// What the graphs compute (`capt_model::ModelSpec` as JSON: architecture, method config,
    /// text prompt families): lets the edge re-emit the classifier when classes are added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_spec: Option<serde_json::Value>,
    /// Compute precision inside the graphs: "f32", or "f16" (float16 weights and compute; the
    /// inputs and outputs stay f32, so runtimes need not care). Manifests written before this
    /// field existed are "f32".
    #[serde(default)]
    pub precision: Precision,
}

/// Compute precision inside an export's graphs. Their interface (`pixel_values`, `input_ids`,
/// `logits`, embeddings) is float32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// float32 everywhere.
    #[default]
    F32,
    /// float16 weights and compute (GPU / TensorRT): the f32 graph rewritten by
    /// `capt_onnx::to_f16_compute`, norms and the SEM pair top-k left in f32. Half the size.
    F16,
    /// Integer compute for the CLIP towers' linear layers (`--int8 dynamic`): int8 weights,
    /// activations quantised per call (`DynamicQuantizeLinear` + `MatMulInteger`,
    /// `capt_onnx::quantize_dynamic_int8`); norms, softmax, the CAPT head and the L2 norms
    /// stay f32. CPU edge devices (VNNI, ARM dot product).
    Int8,
}

impl Precision {
    /// The manifest's and the ONNX metadata's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Int8 => "int8",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Files of a model directory, paths relative to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFiles {
    /// `pixel_values` f32 [N,3,H,W] -> `logits`, `probs` f32 [N,C].
    pub classifier: FileEntry,
    /// Text tower for adding classes at the edge (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder: Option<FileEntry>,
    /// Image tower alone (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_encoder: Option<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    /// Lower-case hex sha256 of the file's bytes.
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    #[error("model directory {dir} does not exist or is not a directory; pass the folder the exporter wrote (it contains {MANIFEST_FILE})")]
    NotADir { dir: PathBuf },
    #[error(
        "{path} is missing; the model directory must contain the manifest written by the exporter"
    )]
    MissingManifest { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid capt manifest: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("{path} has format_version {found}, this runtime reads version {FORMAT_VERSION}; re-export the model or upgrade capt-edge")]
    FormatVersion { path: PathBuf, found: u32 },
    #[error(
        "the manifest lists {role} file {path} but it is missing; copy the whole model directory"
    )]
    MissingFile { role: &'static str, path: PathBuf },
    #[error("{role} file {path} has sha256 {actual} but the manifest expects {expected}; the file is corrupt or from another export, copy the directory again")]
    HashMismatch {
        role: &'static str,
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

/// A validated model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub root: PathBuf,
    pub manifest: Manifest,
}

impl ModelDir {
    /// Reads and checks `dir/capt.json` and the classifier file (existence and sha256).
    /// Optional encoders are checked when they are used.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ModelDirError> {
        let root = dir.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(ModelDirError::NotADir { dir: root });
        }
        let path = root.join(MANIFEST_FILE);
        if !path.is_file() {
            return Err(ModelDirError::MissingManifest { path });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| ModelDirError::Io {
            path: path.clone(),
            source,
        })?;
        let manifest = Manifest::from_json(&text, &path)?;
        let dir = Self { root, manifest };
        dir.verify_file("classifier", &dir.manifest.files.classifier)?;
        Ok(dir)
    }

    /// Absolute path of the classifier graph.
    pub fn classifier_path(&self) -> PathBuf {
        self.root.join(&self.manifest.files.classifier.path)
    }

    /// Short content-derived version: the first 12 hex digits of the classifier's sha256.
    pub fn version(&self) -> String {
        self.manifest
            .files
            .classifier
            .sha256
            .chars()
            .take(12)
            .collect()
    }

    /// Checks that `entry` exists under the root and hashes to its recorded sha256.
    pub fn verify_file(
        &self,
        role: &'static str,
        entry: &FileEntry,
    ) -> Result<PathBuf, ModelDirError> {
        let path = self.root.join(&entry.path);
        if !path.is_file() {
            return Err(ModelDirError::MissingFile { role, path });
        }
        let actual = sha256_file(&path)?;
        if !actual.eq_ignore_ascii_case(&entry.sha256) {
            return Err(ModelDirError::HashMismatch {
                role,
                path,
                expected: entry.sha256.clone(),
                actual,
            });
        }
        Ok(path)
    }
}

impl Manifest {
    /// Parses and validates a manifest; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, ModelDirError> {
        let bad = |reason: String| ModelDirError::BadManifest {
            path: path.to_path_buf(),
            reason,
        };
        // Check the version first so an incompatible future manifest gets the version error,
        // not a confusing missing-field one.
        let raw: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        match raw.get("format_version").and_then(|v| v.as_u64()) {
            Some(v) if v == FORMAT_VERSION as u64 => {}
            Some(v) => {
                return Err(ModelDirError::FormatVersion {
                    path: path.to_path_buf(),
                    found: v.min(u32::MAX as u64) as u32,
                })
            }
            None => return Err(bad("missing integer field `format_version`".into())),
        }
        let m: Manifest = serde_json::from_value(raw).map_err(|e| bad(e.to_string()))?;
        m.validate().map_err(bad)?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), String> {
        if self.class_names.is_empty() {
            return Err("`class_names` is empty; a classifier needs at least one class".into());
        }
        let mut seen = HashSet::new();
        for (i, c) in self.class_names.iter().enumerate() {
            if c.trim().is_empty() {
                return Err(format!("`class_names[{i}]` is empty"));
            }
            if !seen.insert(c.as_str()) {
                return Err(format!("`class_names` lists {c:?} twice"));
            }
        }
        let p = &self.preprocess;
        if p.crop == 0 || p.resize_shorter == 0 {
            return Err("`preprocess.crop` and `preprocess.resize_shorter` must be > 0".into());
        }
        if p.crop > 4096 || p.resize_shorter > 4096 {
            return Err("`preprocess` sizes above 4096 px are not supported".into());
        }
        if p.std.iter().any(|s| !s.is_finite() || *s <= 0.0)
            || p.mean.iter().any(|m| !m.is_finite())
        {
            return Err("`preprocess.std` must be positive and `preprocess.mean` finite".into());
        }
        if p.interpolation != "bicubic" {
            return Err(format!(
                "`preprocess.interpolation` is {:?}; only \"bicubic\" is implemented",
                p.interpolation
            ));
        }
        let mut entries = vec![("classifier", &self.files.classifier)];
        entries.extend(self.files.text_encoder.iter().map(|e| ("text_encoder", e)));
        entries.extend(
            self.files
                .image_encoder
                .iter()
                .map(|e| ("image_encoder", e)),
        );
        for (role, e) in entries {
            let rel = Path::new(&e.path);
            if e.path.is_empty()
                || rel.is_absolute()
                || rel
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(format!(
                    "`files.{role}.path` {:?} must be a relative path inside the model directory",
                    e.path
                ));
            }
            if e.sha256.len() != 64 || !e.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(format!("`files.{role}.sha256` must be 64 hex digits"));
            }
        }
        Ok(())
    }
}

/// Lower-case hex sha256 of a file ([`capt_core::fs::sha256_file`], path named on error).
pub fn sha256_file(path: &Path) -> Result<String, ModelDirError> {
    capt_core::fs::sha256_file(path).map_err(|source| ModelDirError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format_version: 1,
            model_name: "m".into(),
            class_names: vec!["a".into(), "b".into()],
            embedding_dim: 8,
            preprocess: PreprocessConfig::clip(32),
            method: "zeroshot".into(),
            files: ModelFiles {
                classifier: FileEntry {
                    path: "classifier.onnx".into(),
                    sha256: String::new(),
                },
                text_encoder: None,
                image_encoder: None,
            },
            source_checkpoint_sha256: "x".into(),
            backbone_sha256: "y".into(),
            backbone: String::new(),
            created_by: "test".into(),
            model_spec: None,
            precision: Precision::F32,
        }
    }

    fn write_dir(m: &Manifest, onnx: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("classifier.onnx"), onnx).unwrap();
        std::fs::write(
            dir.path().join(MANIFEST_FILE),
            serde_json::to_string(m).unwrap(),
        )
        .unwrap();
        dir
    }

    fn with_hash(mut m: Manifest, bytes: &[u8]) -> Manifest {
        m.files.classifier.sha256 = capt_core::fs::sha256_hex(bytes);
        m
    }

    #[test]
    fn opens_valid_dir_and_round_trips() {
        let m = with_hash(sample(), b"graph");
        let d = write_dir(&m, b"graph");
        let md = ModelDir::open(d.path()).unwrap();
        assert_eq!(md.manifest, m);
        assert_eq!(md.version().len(), 12);
        assert!(md.classifier_path().ends_with("classifier.onnx"));
    }

    #[test]
    fn hash_mismatch_names_file_and_fix() {
        let m = with_hash(sample(), b"graph");
        let d = write_dir(&m, b"tampered");
        let e = ModelDir::open(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("classifier.onnx") && e.contains("copy the directory again"),
            "{e}"
        );
    }

    #[test]
    fn missing_manifest_and_file() {
        let d = tempfile::tempdir().unwrap();
        let e = ModelDir::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("capt.json is missing"), "{e}");
        let m = with_hash(sample(), b"graph");
        let d = write_dir(&m, b"graph");
        std::fs::remove_file(d.path().join("classifier.onnx")).unwrap();
        let e = ModelDir::open(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("classifier file") && e.contains("missing"),
            "{e}"
        );
        let e = ModelDir::open(d.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn rejects_bad_fields() {
        let p = Path::new("capt.json");
        let mut v = serde_json::to_value(with_hash(sample(), b"g")).unwrap();
        v["format_version"] = 2.into();
        let e = Manifest::from_json(&v.to_string(), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("format_version 2"), "{e}");

        let mut m = with_hash(sample(), b"g");
        m.class_names = vec!["a".into(), "a".into()];
        let e = Manifest::from_json(&serde_json::to_string(&m).unwrap(), p).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");

        let mut m = with_hash(sample(), b"g");
        m.files.classifier.path = "../escape.onnx".into();
        let e = Manifest::from_json(&serde_json::to_string(&m).unwrap(), p).unwrap_err();
        assert!(e.to_string().contains("relative path"), "{e}");

        let mut m = with_hash(sample(), b"g");
        m.preprocess.interpolation = "nearest".into();
        let e = Manifest::from_json(&serde_json::to_string(&m).unwrap(), p).unwrap_err();
        assert!(e.to_string().contains("bicubic"), "{e}");

        let e = Manifest::from_json("{\"format_version\": 1}", p).unwrap_err();
        assert!(e.to_string().contains("missing field"), "{e}");
        let e = Manifest::from_json("not json", p).unwrap_err();
        assert!(e.to_string().contains("capt.json"), "{e}");
    }

    #[test]
    fn precision_defaults_to_f32() {
        let mut v = serde_json::to_value(with_hash(sample(), b"g")).unwrap();
        v.as_object_mut().unwrap().remove("precision");
        let m = Manifest::from_json(&v.to_string(), Path::new("capt.json")).unwrap();
        assert_eq!(m.precision, Precision::F32);
        v["precision"] = "f16".into();
        let m = Manifest::from_json(&v.to_string(), Path::new("capt.json")).unwrap();
        assert_eq!(m.precision, Precision::F16);
        // A precision this version does not know is named, with the ones it does.
        v["precision"] = "int4".into();
        let e = Manifest::from_json(&v.to_string(), Path::new("capt.json")).unwrap_err();
        assert!(
            e.to_string().contains("int4") && e.to_string().contains("f16"),
            "{e}"
        );
        v["precision"] = "int8".into();
        let m = Manifest::from_json(&v.to_string(), Path::new("capt.json")).unwrap();
        assert_eq!(m.precision, Precision::Int8);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut v = serde_json::to_value(with_hash(sample(), b"g")).unwrap();
        v["future_field"] = 3.into();
        Manifest::from_json(&v.to_string(), Path::new("capt.json")).unwrap();
    }
}
