//! tract engine: loads `classifier.onnx` with tract-onnx, keeps the batch dimension symbolic
//! so one optimised plan serves every batch size, and runs matmuls on a private thread pool.
//! Pure Rust, no shared library: the default backend of `capt-edge`.

use std::path::Path;
use std::sync::Arc;

use capt_backend::{
    check_batch, check_io_names, Backend, BackendError, ClassifierOutput, ImageBatch, ModelDir,
    INPUT_NAME, LOGITS_NAME, PROBS_NAME,
};
use tract_linalg::multithread::Executor;
use tract_onnx::pb;
use tract_onnx::prelude::*;

const ENGINE: &str = "tract";

/// How to build the tract plan.
#[derive(Debug, Clone, Default)]
pub struct TractOptions {
    /// Matmul threads; 0 uses every available core.
    pub threads: usize,
    /// Batch sizes that get their own plan optimised for that exact shape (faster than the
    /// symbolic-N plan, at the cost of load time and memory); other sizes use the symbolic plan.
    pub fixed_batches: Vec<usize>,
}

/// A loaded, optimised classifier plan; immutable and shared across threads.
pub struct TractBackend {
    plan: Arc<TypedRunnableModel>,
    fixed: Vec<(usize, Arc<TypedRunnableModel>)>,
    crop: usize,
    threads: usize,
}

impl TractBackend {
    /// Loads and optimises the classifier of a validated model directory.
    pub fn load(model: &ModelDir, opts: &TractOptions) -> Result<Self, BackendError> {
        let path = model.classifier_path();
        let crop = model.manifest.preprocess.crop as usize;
        let load_err = |e: TractError| BackendError::Load {
            engine: ENGINE,
            path: path.clone(),
            reason: format!("{e:#}"),
        };
        let onnx = tract_onnx::onnx();
        let proto = onnx.proto_model_for_path(&path).map_err(load_err)?;
        check_contract(&proto, &path, crop)?;

        let dir = path.parent().and_then(Path::to_str);
        let parsed = onnx.parse(&proto, dir).map_err(load_err)?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(BackendError::Load {
                engine: ENGINE,
                path: path.clone(),
                reason: format!("unresolved graph inputs {:?}", parsed.unresolved_inputs),
            });
        }
        let mut graph = parsed.model;
        // Pin H and W to the manifest's crop and keep N symbolic (the ONNX may name it anything).
        let n = graph.symbols.sym("N");
        let fact = f32::fact([n.to_dim(), 3.to_dim(), crop.to_dim(), crop.to_dim()]);
        graph.set_input_fact(0, fact.into()).map_err(load_err)?;
        let outlets = output_outlets(&graph, &path)?;
        graph.select_output_outlets(&outlets).map_err(load_err)?;

        let threads = match opts.threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            t => t,
        };
        let executor = if threads > 1 {
            // Built here rather than with `Executor::multithread`, which panics on failure.
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("capt-tract-{i}"))
                .build()
                .map_err(|e| BackendError::Load {
                    engine: ENGINE,
                    path: path.clone(),
                    reason: format!("cannot start {threads} worker threads: {e}"),
                })?;
            Executor::MultiThread(Arc::new(pool))
        } else {
            Executor::SingleThread
        };
        let options = RunOptions {
            executor: Some(executor),
            ..Default::default()
        };
        let typed = graph
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(load_err)?;
        let mut fixed = Vec::new();
        for &b in opts.fixed_batches.iter().filter(|b| **b > 0) {
            let subs = std::collections::HashMap::from([(n.clone(), (b as i64).to_dim())]);
            let plan = typed
                .set_symbols(&subs)
                .and_then(|m| m.into_optimized())
                .and_then(|m| m.into_runnable_with_options(&options))
                .map_err(load_err)?;
            fixed.push((b, plan));
        }
        let plan = typed
            .into_optimized()
            .and_then(|m| m.into_runnable_with_options(&options))
            .map_err(load_err)?;
        tracing::info!(path = %path.display(), threads, fixed_batches = ?opts.fixed_batches, "tract plan ready");
        Ok(Self {
            plan,
            fixed,
            crop,
            threads,
        })
    }

    /// Matmul threads the plan runs with.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn describe(&self) -> String {
        format!("tract-onnx 0.23 (cpu, {} threads)", self.threads)
    }

    fn classify(&self, batch: &ImageBatch) -> Result<ClassifierOutput, BackendError> {
        check_batch(batch, self.crop)?;
        let run_err = |e: TractError| BackendError::Run {
            engine: ENGINE,
            reason: format!("{e:#}"),
        };
        let input = Tensor::from_shape(&batch.shape(), &batch.data).map_err(run_err)?;
        let plan = self
            .fixed
            .iter()
            .find(|(b, _)| *b == batch.n)
            .map_or(&self.plan, |(_, p)| p);
        let outputs = plan.run(tvec!(input.into())).map_err(run_err)?;
        let take = |ix: usize| -> Result<(Vec<usize>, Vec<f32>), BackendError> {
            let view = outputs[ix].to_plain_array_view::<f32>().map_err(run_err)?;
            Ok((view.shape().to_vec(), view.iter().copied().collect()))
        };
        ClassifierOutput::from_parts(ENGINE, batch.n, take(0)?, take(1)?)
    }
}

/// The `logits` and `probs` outlets, in that order, found by their ONNX output names.
fn output_outlets(graph: &InferenceModel, path: &Path) -> Result<Vec<OutletId>, BackendError> {
    let outlets = graph.output_outlets().map_err(|e| BackendError::Load {
        engine: ENGINE,
        path: path.to_path_buf(),
        reason: format!("{e:#}"),
    })?;
    [LOGITS_NAME, PROBS_NAME]
        .iter()
        .map(|want| {
            outlets
                .iter()
                .copied()
                .find(|o| graph.outlet_label(*o) == Some(*want))
                .ok_or_else(|| BackendError::Contract {
                    path: path.to_path_buf(),
                    detail: format!("tract found no graph output named `{want}`"),
                })
        })
        .collect()
}

/// Checks input/output names, the input element type and its [N,3,crop,crop] shape on the
/// ONNX protobuf itself, before tract's type inference can fail with a less helpful message.
fn check_contract(proto: &pb::ModelProto, path: &Path, crop: usize) -> Result<(), BackendError> {
    let contract = |detail: String| BackendError::Contract {
        path: path.to_path_buf(),
        detail,
    };
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| contract("the file has no graph".into()))?;
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&pb::ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .collect();
    let names = |v: &mut dyn Iterator<Item = &pb::ValueInfoProto>| {
        v.map(|i| i.name.clone()).collect::<Vec<_>>()
    };
    check_io_names(
        path,
        &names(&mut inputs.iter().copied()),
        &names(&mut graph.output.iter()),
    )?;

    let Some(pb::type_proto::Value::TensorType(t)) =
        inputs[0].r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(contract(format!("input `{INPUT_NAME}` is not a tensor")));
    };
    if t.elem_type != pb::tensor_proto::DataType::Float as i32 {
        return Err(contract(format!(
            "input `{INPUT_NAME}` has element type {}, expected float32",
            t.elem_type
        )));
    }
    if let Some(shape) = &t.shape {
        let dims: Vec<Option<i64>> = shape
            .dim
            .iter()
            .map(|d| match d.value {
                Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) => Some(v),
                _ => None,
            })
            .collect();
        let want = [None, Some(3), Some(crop as i64), Some(crop as i64)];
        let ok = dims.len() == 4
            && dims
                .iter()
                .zip(&want)
                .skip(1)
                .all(|(d, w)| d.is_none() || d == w);
        if !ok {
            let shown: Vec<String> = dims
                .iter()
                .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
                .collect();
            return Err(contract(format!(
                "input `{INPUT_NAME}` has shape [{}], expected [N,3,{crop},{crop}] (crop from capt.json)",
                shown.join(",")
            )));
        }
    }
    Ok(())
}
