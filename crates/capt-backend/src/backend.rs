//! The inference engine seam: each engine (tract, onnxruntime) loads `classifier.onnx` once
//! and runs batches through `&self`, so one instance is shared by every request thread.

use std::path::PathBuf;

use capt_core::ImageBatch;

use crate::ModelDir;

/// Contract of `classifier.onnx` (see the exporter): input name.
pub const INPUT_NAME: &str = "pixel_values";
/// Output with the raw class scores.
pub const LOGITS_NAME: &str = "logits";
/// Output with the softmax of the logits.
pub const PROBS_NAME: &str = "probs";

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    ModelDir(#[from] crate::ModelDirError),
    #[error("cannot load {path} with {engine}: {reason}")]
    Load {
        engine: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{path} breaks the classifier contract: {detail}; re-export it with the capt exporter (input `pixel_values` f32 [N,3,H,W], outputs `logits` and `probs` f32 [N,C])")]
    Contract { path: PathBuf, detail: String },
    #[error("{engine} is not available: {reason}")]
    Unavailable {
        engine: &'static str,
        reason: String,
    },
    #[error("input batch has shape {got:?} but the model takes [N,3,{height},{width}]")]
    InputShape {
        got: [usize; 4],
        height: usize,
        width: usize,
    },
    #[error("{engine} inference failed: {reason}")]
    Run {
        engine: &'static str,
        reason: String,
    },
}

/// Class scores of a batch, row-major [n, classes].
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifierOutput {
    pub n: usize,
    pub classes: usize,
    pub logits: Vec<f32>,
    pub probs: Vec<f32>,
}

impl ClassifierOutput {
    pub fn logits_row(&self, i: usize) -> &[f32] {
        &self.logits[i * self.classes..(i + 1) * self.classes]
    }

    pub fn probs_row(&self, i: usize) -> &[f32] {
        &self.probs[i * self.classes..(i + 1) * self.classes]
    }

    /// Builds an output from the two flat tensors and their shapes, checking both are [n, C].
    pub fn from_parts(
        engine: &'static str,
        n: usize,
        logits: (Vec<usize>, Vec<f32>),
        probs: (Vec<usize>, Vec<f32>),
    ) -> Result<Self, BackendError> {
        let check = |name: &str, shape: &[usize], len: usize| {
            if shape.len() != 2 || shape[0] != n || shape[0] * shape[1] != len {
                return Err(BackendError::Run {
                    engine,
                    reason: format!("output `{name}` has shape {shape:?}, expected [{n}, C]"),
                });
            }
            Ok(shape[1])
        };
        let c = check(LOGITS_NAME, &logits.0, logits.1.len())?;
        let cp = check(PROBS_NAME, &probs.0, probs.1.len())?;
        if c != cp {
            return Err(BackendError::Run {
                engine,
                reason: format!("`logits` has {c} classes but `probs` has {cp}"),
            });
        }
        Ok(Self {
            n,
            classes: c,
            logits: logits.1,
            probs: probs.1,
        })
    }
}

/// An inference engine with the classifier loaded. Implementations are immutable after
/// loading (sessions created once) and safe to share across threads.
pub trait Backend: Send + Sync {
    /// Engine name: "tract" or "ort".
    fn name(&self) -> &'static str;

    /// What actually runs, for logs and `/v1/model`, e.g. "ort 1.32.0 CUDAExecutionProvider".
    fn describe(&self) -> String;

    /// Runs the classifier on an NCHW batch.
    fn classify(&self, batch: &ImageBatch) -> Result<ClassifierOutput, BackendError>;
}

impl<B: Backend + ?Sized> Backend for std::sync::Arc<B> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn classify(&self, batch: &ImageBatch) -> Result<ClassifierOutput, BackendError> {
        (**self).classify(batch)
    }
}

/// Checks a batch has the model's [N,3,crop,crop] shape and consistent data length.
pub fn check_batch(batch: &ImageBatch, crop: usize) -> Result<(), BackendError> {
    let shape = batch.shape();
    if batch.height != crop
        || batch.width != crop
        || batch.data.len() != shape.iter().product::<usize>()
        || batch.n == 0
    {
        return Err(BackendError::InputShape {
            got: shape,
            height: crop,
            width: crop,
        });
    }
    Ok(())
}

/// Checks graph input/output names against the contract; `inputs`/`outputs` are the graph's.
pub fn check_io_names(
    path: &std::path::Path,
    inputs: &[String],
    outputs: &[String],
) -> Result<(), BackendError> {
    let contract = |detail: String| BackendError::Contract {
        path: path.to_path_buf(),
        detail,
    };
    if inputs.len() != 1 || inputs[0] != INPUT_NAME {
        return Err(contract(format!(
            "inputs are {inputs:?}, expected [\"{INPUT_NAME}\"]"
        )));
    }
    for want in [LOGITS_NAME, PROBS_NAME] {
        if !outputs.iter().any(|o| o == want) {
            return Err(contract(format!(
                "outputs are {outputs:?}, `{want}` is missing"
            )));
        }
    }
    Ok(())
}

/// Integer-compute ops of a `capt-export --int8` (dynamic) classifier.
pub const INT8_COMPUTE_OPS: [&str; 3] = [
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "MatMulIntegerToFloat",
];

/// A load failure of `engine` on `path`. When the runtime's message names an integer-compute
/// op it cannot run, the error says which op and which export avoids it.
pub fn load_error(engine: &'static str, path: &std::path::Path, reason: String) -> BackendError {
    let reason = match INT8_COMPUTE_OPS.iter().find(|op| reason.contains(*op)) {
        Some(op) => format!(
            "{reason}; `{op}` is an integer-compute op of a `capt-export --int8` (dynamic) export \
             that this runtime cannot run: re-export with `--int8 weights` (int8 storage, f32 \
             compute) or without --int8, or serve it with another backend"
        ),
        None => reason,
    };
    BackendError::Load {
        engine,
        path: path.to_path_buf(),
        reason,
    }
}

/// Checks the graph's `pixel_values` dims (`None` = symbolic) against `[N, 3, crop, crop]`:
/// the one input-shape check every backend runs at load.
pub fn check_input_dims(
    path: &std::path::Path,
    dims: &[Option<i64>],
    crop: usize,
) -> Result<(), BackendError> {
    let want = [None, Some(3), Some(crop as i64), Some(crop as i64)];
    let ok = dims.len() == 4
        && dims
            .iter()
            .zip(&want)
            .skip(1)
            .all(|(d, w)| d.is_none() || d == w);
    if ok {
        return Ok(());
    }
    let shown: Vec<String> = dims
        .iter()
        .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
        .collect();
    Err(BackendError::Contract {
        path: path.to_path_buf(),
        detail: format!(
            "input `{INPUT_NAME}` has shape [{}], expected [N,3,{crop},{crop}] (crop from capt.json)",
            shown.join(",")
        ),
    })
}

/// Runs one zero image through a freshly loaded backend and checks the class count against
/// the manifest, so a mismatched export fails at start-up (and the first request is warm).
pub fn warm_up(backend: &dyn Backend, model: &ModelDir) -> Result<(), BackendError> {
    let crop = model.manifest.preprocess.crop as usize;
    let batch = ImageBatch {
        data: vec![0.0; model.manifest.preprocess.image_len()],
        n: 1,
        height: crop,
        width: crop,
    };
    let out = backend.classify(&batch)?;
    let want = model.manifest.class_names.len();
    if out.classes != want {
        return Err(BackendError::Contract {
            path: model.classifier_path(),
            detail: format!(
                "it outputs {} classes but capt.json lists {want} class_names",
                out.classes
            ),
        });
    }
    if out.probs.iter().chain(&out.logits).any(|v| !v.is_finite()) {
        return Err(BackendError::Contract {
            path: model.classifier_path(),
            detail: "it produced non-finite scores for a zero image".into(),
        });
    }
    Ok(())
}

/// The `k` largest entries of `row` as (index, value), highest first; ties keep index order.
pub fn top_k(row: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.into_iter().map(|i| (i, row[i])).collect()
}

/// Largest absolute elementwise difference of two equally long outputs (parity checks of one
/// engine against another or against a reference). Panics when the lengths differ.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "outputs of different lengths");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Deterministic test/bench input, exactly representable in f32 so every engine (and the
/// Python fixture generator) sees the same bits: `x[i] = ((i*7919) % 255) / 255 - 0.5`.
pub fn synthetic_batch(n: usize, size: usize) -> ImageBatch {
    let data = (0..n * capt_core::chw_len(size))
        .map(|i| ((i as u64 * 7919) % 255) as f32 / 255.0 - 0.5)
        .collect();
    ImageBatch {
        data,
        n,
        height: size,
        width: size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_integer_op_names_the_op_and_the_export_that_avoids_it() {
        let p = std::path::Path::new("m/classifier.onnx");
        let e = load_error(
            "tensorrt",
            p,
            "No Op registered for DynamicQuantizeLinear".into(),
        );
        let s = e.to_string();
        assert!(
            s.contains("`DynamicQuantizeLinear`") && s.contains("--int8 weights"),
            "{s}"
        );
        let e = load_error("tract", p, "file truncated".into());
        assert!(!e.to_string().contains("--int8"), "{e}");
    }

    #[test]
    fn top_k_orders_and_truncates() {
        let r = [0.1, 0.5, 0.2, 0.5];
        assert_eq!(top_k(&r, 3), vec![(1, 0.5), (3, 0.5), (2, 0.2)]);
        assert_eq!(top_k(&r, 10).len(), 4);
        assert!(top_k(&r, 0).is_empty());
    }

    #[test]
    fn io_names_are_checked() {
        let p = std::path::Path::new("m/classifier.onnx");
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        check_io_names(p, &s(&["pixel_values"]), &s(&["logits", "probs"])).unwrap();
        let e = check_io_names(p, &s(&["x"]), &s(&["logits", "probs"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m/classifier.onnx") && e.contains("pixel_values"),
            "{e}"
        );
        let e = check_io_names(p, &s(&["pixel_values"]), &s(&["logits"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`probs` is missing"), "{e}");
    }

    #[test]
    fn output_shapes_are_checked() {
        let ok = ClassifierOutput::from_parts(
            "t",
            2,
            (vec![2, 3], vec![0.0; 6]),
            (vec![2, 3], vec![0.0; 6]),
        )
        .unwrap();
        assert_eq!(ok.logits_row(1).len(), 3);
        assert!(ClassifierOutput::from_parts(
            "t",
            2,
            (vec![2, 3], vec![0.0; 6]),
            (vec![2, 2], vec![0.0; 4])
        )
        .is_err());
        assert!(ClassifierOutput::from_parts(
            "t",
            1,
            (vec![2, 3], vec![0.0; 6]),
            (vec![2, 3], vec![0.0; 6])
        )
        .is_err());
    }

    #[test]
    fn batch_shape_is_checked() {
        let b = synthetic_batch(2, 4);
        check_batch(&b, 4).unwrap();
        assert!(check_batch(&b, 8).is_err());
        assert_eq!(b.data[1], (7919 % 255) as f32 / 255.0 - 0.5);
    }
}
