//! Running a written model with tract (parity tests, edge checks).

use std::collections::HashMap;
use std::path::Path;

use capt_graph::{HostData, HostTensor};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::{Error, Result};

fn to_tract(t: &HostTensor) -> TractResult<Tensor> {
    let dims = t.dims();
    match t.data() {
        HostData::F32(v) => Tensor::from_shape(dims, v),
        HostData::F64(v) => Tensor::from_shape(dims, v),
        HostData::I64(v) => Tensor::from_shape(dims, v),
        HostData::Bool(v) => Tensor::from_shape(dims, v),
    }
}

fn from_tract(t: &Tensor) -> TractResult<HostTensor> {
    let dims = t.shape().to_vec();
    let data = match t.datum_type() {
        DatumType::F32 => HostData::F32(t.to_plain_array_view::<f32>()?.iter().copied().collect()),
        DatumType::F64 => HostData::F64(t.to_plain_array_view::<f64>()?.iter().copied().collect()),
        DatumType::I64 => HostData::I64(t.to_plain_array_view::<i64>()?.iter().copied().collect()),
        DatumType::Bool => {
            HostData::Bool(t.to_plain_array_view::<bool>()?.iter().copied().collect())
        }
        other => {
            let c = t.cast_to::<f32>()?;
            let v = c.to_plain_array_view::<f32>()?.iter().copied().collect();
            tracing::debug!(?other, "tract output cast to f32");
            HostData::F32(v)
        }
    };
    HostTensor::new(dims, data).map_err(|e| tract_onnx::tract_hir::internal::format_err!("{e}"))
}

/// Loads `path` with tract-onnx, pins the inputs to the given tensors' shapes (so a symbolic
/// batch gets its concrete size), optimizes, and runs once. Outputs in graph order.
pub fn run_tract(path: &Path, inputs: &[HostTensor]) -> Result<Vec<HostTensor>> {
    run(path, inputs, || tract_onnx::onnx().model_for_path(path))
}

/// [`run_tract`] for a model in memory (`what` names it in errors).
pub fn run_tract_model(
    model: &tract_onnx::pb::ModelProto,
    what: &Path,
    inputs: &[HostTensor],
) -> Result<Vec<HostTensor>> {
    run(what, inputs, || {
        tract_onnx::onnx().model_for_proto_model(model)
    })
}

fn run(
    path: &Path,
    inputs: &[HostTensor],
    load: impl FnOnce() -> TractResult<InferenceModel>,
) -> Result<Vec<HostTensor>> {
    let go = || -> TractResult<Vec<HostTensor>> {
        let mut model = load()?;
        let tensors: Vec<Tensor> = inputs.iter().map(to_tract).collect::<TractResult<_>>()?;
        for (i, t) in tensors.iter().enumerate() {
            let fact = InferenceFact::dt_shape(t.datum_type(), t.shape());
            model = model.with_input_fact(i, fact)?;
        }
        let plan = model.into_optimized()?.into_runnable()?;
        let outs = plan.run(tensors.into_iter().map(|t| t.into()).collect())?;
        outs.iter().map(|o| from_tract(o)).collect()
    };
    go().map_err(|e| Error::Tract {
        path: path.to_path_buf(),
        msg: format!("{e:#}"),
    })
}

/// The element type tract infers for every value of the model at `path` (node outputs under
/// their ONNX names, initializers under theirs), as tract prints it (`F16`, `F32`, `I64`,
/// ...): a check of a graph's typing that does not rely on the code that wrote it.
pub fn tract_value_types(path: &Path) -> Result<HashMap<String, String>> {
    let go = || -> TractResult<HashMap<String, String>> {
        let mut model = tract_onnx::onnx().model_for_path(path)?;
        model.analyse(false)?;
        let mut out = HashMap::new();
        for node in model.nodes() {
            for i in 0..node.outputs.len() {
                let o = OutletId::new(node.id, i);
                let name = model
                    .outlet_label(o)
                    .map_or_else(|| node.name.clone(), str::to_string);
                if let Some(dt) = model.outlet_fact(o)?.datum_type.concretize() {
                    out.insert(name, format!("{dt:?}"));
                }
            }
        }
        Ok(out)
    };
    go().map_err(|e| Error::Tract {
        path: path.to_path_buf(),
        msg: format!("{e:#}"),
    })
}
