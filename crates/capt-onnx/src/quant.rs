//! Weight-only int8 quantisation of written graphs, and reading parameters back.
//!
//! [`quantize_weights_int8`] stores large 2-D float weights that feed `MatMul`/`Transpose`
//! (the linear layers) as int8 with one f32 scale per row (symmetric, `scale = max|w| / 127`)
//! and dequantizes them in the graph with `Cast` + `Mul`: the per-axis `DequantizeLinear`
//! computation, written with ops every runtime (tract, onnxruntime, TensorRT) runs. Runtimes
//! fold it once at load, so files are ~4x smaller and compute stays f32.
//! [`read_params`] turns initializers back into [`HostTensor`]s by name, undoing the f16
//! storage of `BuildOptions::weights_f16` and this int8 storage, so a graph can be re-emitted
//! from its own file (adding classes at the edge).

use std::collections::{BTreeMap, HashMap};

use capt_graph::{HostTensor, Result};
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType as P;

use crate::error::Error;

/// Smallest weight (elements) stored as int8: biases, norms and small tables stay f32.
pub const INT8_MIN_ELEMS: usize = 4096;

/// Suffix of the per-row scale initializer of an int8 weight.
pub const SCALE_SUFFIX: &str = ".scale";

/// What [`quantize_weights_int8`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QuantReport {
    pub tensors: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Largest `|w - dequant(q)|` over all quantised weights.
    pub max_abs_error: f32,
}

fn attr_i(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

pub(crate) fn f32s(t: &pb::TensorProto) -> Option<Vec<f32>> {
    if !t.raw_data.is_empty() {
        Some(
            t.raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    } else if !t.float_data.is_empty() {
        Some(t.float_data.clone())
    } else {
        None
    }
}

/// Quantises every float initializer of rank 2 with at least `min_elems` elements whose only
/// consumers are `MatMul`, `Gemm` or `Transpose` nodes. Deterministic (initializer order).
pub fn quantize_weights_int8(
    model: &mut pb::ModelProto,
    min_elems: usize,
) -> crate::Result<QuantReport> {
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| Error::Model("the model has no graph".into()))?;
    let mut consumers: HashMap<String, Vec<String>> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            consumers
                .entry(i.clone())
                .or_default()
                .push(n.op_type.clone());
        }
    }
    let mut report = QuantReport::default();
    let mut new_nodes = Vec::new();
    let mut scales = Vec::new();
    let mut renamed: HashMap<String, String> = HashMap::new();
    for t in graph.initializer.iter_mut() {
        let linear_only = consumers.get(&t.name).is_some_and(|ops| {
            ops.iter()
                .all(|o| matches!(o.as_str(), "MatMul" | "Gemm" | "Transpose"))
        });
        let elems: i64 = t.dims.iter().product();
        if t.data_type != P::Float as i32
            || t.dims.len() != 2
            || (elems as usize) < min_elems
            || !linear_only
            || t.data_location == Some(pb::tensor_proto::DataLocation::External as i32)
        {
            continue;
        }
        let Some(w) = f32s(t) else { continue };
        let (rows, cols) = (t.dims[0] as usize, t.dims[1] as usize);
        let mut q = Vec::with_capacity(rows * cols);
        let mut s = Vec::with_capacity(rows);
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
            for &v in row {
                let qv = (v / scale).round().clamp(-127.0, 127.0);
                report.max_abs_error = report.max_abs_error.max((qv * scale - v).abs());
                q.push(qv as i8 as u8);
            }
            s.push(scale);
        }
        report.tensors += 1;
        report.bytes_before += (rows * cols * 4) as u64;
        report.bytes_after += (rows * cols + rows * 4) as u64;
        let name = t.name.clone();
        t.data_type = P::Int8 as i32;
        t.raw_data = q;
        t.float_data.clear();
        let scale_name = format!("{name}{SCALE_SUFFIX}");
        scales.push(pb::TensorProto {
            dims: vec![rows as i64, 1],
            data_type: P::Float as i32,
            name: scale_name.clone(),
            raw_data: s.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        });
        let widened = format!("{name}.f32");
        let deq = format!("{name}.dequant");
        new_nodes.push(pb::NodeProto {
            input: vec![name.clone()],
            output: vec![widened.clone()],
            name: format!("Cast_{name}"),
            op_type: "Cast".into(),
            attribute: vec![attr_i("to", P::Float as i64)],
            ..Default::default()
        });
        new_nodes.push(pb::NodeProto {
            input: vec![widened, scale_name],
            output: vec![deq.clone()],
            name: format!("Mul_{name}"),
            op_type: "Mul".into(),
            ..Default::default()
        });
        renamed.insert(name, deq);
    }
    for n in graph.node.iter_mut() {
        for i in n.input.iter_mut() {
            if let Some(r) = renamed.get(i.as_str()) {
                *i = r.clone();
            }
        }
    }
    graph.initializer.extend(scales);
    new_nodes.append(&mut graph.node);
    graph.node = new_nodes;
    Ok(report)
}

/// Every initializer as a host tensor (floats as f32: f16 widened, int8 weights with a
/// `NAME.scale` sibling dequantized; scale tensors themselves are omitted).
pub fn read_params(model: &pb::ModelProto) -> crate::Result<BTreeMap<String, HostTensor>> {
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| Error::Model("the model has no graph".into()))?;
    let by_name: HashMap<&str, &pb::TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut out = BTreeMap::new();
    for t in &graph.initializer {
        if t.data_location == Some(pb::tensor_proto::DataLocation::External as i32) {
            return Err(Error::Model(format!(
                "initializer `{}` is stored as external data; load it with its data file first",
                t.name
            )));
        }
        if t.name.ends_with(SCALE_SUFFIX)
            && by_name.contains_key(&t.name[..t.name.len() - SCALE_SUFFIX.len()])
        {
            continue;
        }
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        let bad = |what: &str| {
            Error::Model(format!(
                "initializer `{}` ({what}) has the wrong amount of data for dims {dims:?}",
                t.name
            ))
        };
        let host: Result<HostTensor> = match P::try_from(t.data_type) {
            Ok(P::Float) => HostTensor::f32(dims.clone(), f32s(t).unwrap_or_default()),
            Ok(P::Float16) => {
                let v = t
                    .raw_data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                    .collect();
                HostTensor::f32(dims.clone(), v)
            }
            Ok(P::Int64) => {
                let v = if !t.raw_data.is_empty() {
                    t.raw_data
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                        .collect()
                } else {
                    t.int64_data.clone()
                };
                HostTensor::i64(dims.clone(), v)
            }
            Ok(P::Int8) => {
                let scale = by_name
                    .get(format!("{}{SCALE_SUFFIX}", t.name).as_str())
                    .and_then(|s| f32s(s))
                    .ok_or_else(|| {
                        Error::Model(format!(
                            "int8 initializer `{}` has no `{}{SCALE_SUFFIX}`",
                            t.name, t.name
                        ))
                    })?;
                let cols = dims.get(1).copied().unwrap_or(1).max(1);
                let v: Vec<f32> = t
                    .raw_data
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| (b as i8) as f32 * scale.get(i / cols).copied().unwrap_or(0.0))
                    .collect();
                HostTensor::f32(dims.clone(), v)
            }
            Ok(P::Bool) => {
                HostTensor::bool(dims.clone(), t.raw_data.iter().map(|&b| b != 0).collect())
            }
            _ => {
                return Err(Error::Model(format!(
                    "initializer `{}` has data type {} which capt does not read",
                    t.name, t.data_type
                )))
            }
        };
        let host = host.map_err(|_| bad("data"))?;
        out.insert(t.name.clone(), host);
    }
    Ok(out)
}
