//! tract engine: loads `classifier.onnx` with tract-onnx and runs it as a batch-1 plan
//! (measured on ViT-B/16, 2 cores: a plan for the exact shape N=1 is 1.2x faster per image
//! than the symbolic-N plan, and 1.14x faster than tract's own N=8 plan). One image uses every
//! thread through tract's multithreaded matmul; a larger batch runs its images side by side,
//! one single-threaded plan per thread (the weights are shared). Pure Rust, no shared library:
//! the default backend of `capt-edge`.

use std::path::Path;
use std::sync::Arc;

use capt_backend::{
    check_batch, check_input_dims, check_io_names, load_error, Backend, BackendError,
    ClassifierOutput, ImageBatch, ModelDir, INPUT_NAME, LOGITS_NAME, PROBS_NAME,
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
    /// Batch sizes > 1 that get their own plan optimised for that exact shape (each costs a
    /// copy of the packed weights); other sizes run image by image on the batch-1 plan.
    pub fixed_batches: Vec<usize>,
}

/// A loaded, optimised classifier plan; immutable and shared across threads.
pub struct TractBackend {
    /// The N=1 plan on the multithreaded executor: one image at a time, lowest latency.
    one: Arc<TypedRunnableModel>,
    /// The same optimised model on a single-thread executor, run by up to `threads` workers
    /// side by side, each over a contiguous share of a larger batch (`None` with one thread).
    solo: Option<Arc<TypedRunnableModel>>,
    fixed: Vec<(usize, Arc<TypedRunnableModel>)>,
    crop: usize,
    threads: usize,
}

impl TractBackend {
    /// Loads and optimises the classifier of a validated model directory.
    pub fn load(model: &ModelDir, opts: &TractOptions) -> Result<Self, BackendError> {
        let path = model.classifier_path();
        let crop = model.manifest.preprocess.crop as usize;
        let load_err = |e: TractError| load_error(ENGINE, &path, format!("{e:#}"));
        let onnx = tract_onnx::onnx();
        let proto = onnx.proto_model_for_path(&path).map_err(load_err)?;
        check_contract(&proto, &path, crop)?;

        let dir = path.parent().and_then(Path::to_str);
        let parsed = onnx.parse(&proto, dir).map_err(load_err)?;
        drop(proto); // the raw weights: a model-sized buffer not needed past parsing
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
        let concrete = |b: usize| {
            let subs = std::collections::HashMap::from([(n.clone(), (b as i64).to_dim())]);
            typed.set_symbols(&subs).and_then(|m| m.into_optimized())
        };
        let mut fixed = Vec::new();
        for &b in opts.fixed_batches.iter().filter(|b| **b > 1) {
            let plan = concrete(b)
                .and_then(|m| m.into_runnable_with_options(&options))
                .map_err(load_err)?;
            fixed.push((b, plan));
        }
        // Both batch-1 plans run the same graph (one copy of the packed weights).
        let optimized = Arc::new(concrete(1).map_err(load_err)?);
        drop(typed);
        let solo = if threads > 1 {
            let single = RunOptions {
                executor: Some(Executor::SingleThread),
                ..Default::default()
            };
            Some(TypedSimplePlan::new_with_options(optimized.clone(), &single).map_err(load_err)?)
        } else {
            None
        };
        let one = TypedSimplePlan::new_with_options(optimized, &options).map_err(load_err)?;
        tracing::info!(path = %path.display(), threads, fixed_batches = ?opts.fixed_batches, "tract plan ready");
        Ok(Self {
            one,
            solo,
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
        if let Some((_, plan)) = self.fixed.iter().find(|(b, _)| *b == batch.n) {
            let input = Tensor::from_shape(&batch.shape(), &batch.data).map_err(run_err)?;
            let outputs = plan.run(tvec!(input.into())).map_err(run_err)?;
            let (logits, probs) = (take(&outputs, 0)?, take(&outputs, 1)?);
            return ClassifierOutput::from_parts(ENGINE, batch.n, logits, probs);
        }
        let image = 3 * batch.height * batch.width;
        let run_one = |plan: &Arc<TypedRunnableModel>, i: usize| -> Result<Rows, BackendError> {
            let pixels = &batch.data[i * image..(i + 1) * image];
            let input =
                Tensor::from_shape(&[1, 3, batch.height, batch.width], pixels).map_err(run_err)?;
            let outputs = plan.run(tvec!(input.into())).map_err(run_err)?;
            Ok((take(&outputs, 0)?.1, take(&outputs, 1)?.1))
        };
        let rows: Vec<Rows> = match &self.solo {
            Some(solo) if batch.n > 1 => {
                // Images side by side: one contiguous chunk per worker, results in batch order.
                let per = batch.n.div_ceil(self.threads);
                let run_one = &run_one;
                let chunks: Vec<Result<Vec<Rows>, BackendError>> = std::thread::scope(|s| {
                    let handles: Vec<_> = (0..batch.n)
                        .step_by(per)
                        .map(|start| {
                            s.spawn(move || {
                                (start..(start + per).min(batch.n))
                                    .map(|i| run_one(solo, i))
                                    .collect()
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| {
                            h.join().unwrap_or_else(|_| {
                                Err(BackendError::Run {
                                    engine: ENGINE,
                                    reason: "a tract worker thread panicked".into(),
                                })
                            })
                        })
                        .collect()
                });
                chunks.into_iter().collect::<Result<Vec<_>, _>>()?.concat()
            }
            _ => (0..batch.n)
                .map(|i| run_one(&self.one, i))
                .collect::<Result<_, _>>()?,
        };
        let classes = rows.first().map_or(0, |(l, _)| l.len());
        let (logits, probs): (Vec<Vec<f32>>, Vec<Vec<f32>>) = rows.into_iter().unzip();
        ClassifierOutput::from_parts(
            ENGINE,
            batch.n,
            (vec![batch.n, classes], logits.concat()),
            (vec![batch.n, classes], probs.concat()),
        )
    }
}

/// One image's `logits` and `probs` rows.
type Rows = (Vec<f32>, Vec<f32>);

fn run_err(e: TractError) -> BackendError {
    BackendError::Run {
        engine: ENGINE,
        reason: format!("{e:#}"),
    }
}

/// Output `ix` of a plan run as (shape, values).
fn take(outputs: &TVec<TValue>, ix: usize) -> Result<(Vec<usize>, Vec<f32>), BackendError> {
    let view = outputs[ix].to_plain_array_view::<f32>().map_err(run_err)?;
    Ok((view.shape().to_vec(), view.iter().copied().collect()))
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
        check_input_dims(path, &dims, crop)?;
    }
    Ok(())
}
