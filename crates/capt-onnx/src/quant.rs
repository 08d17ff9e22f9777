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

/// Suffixes of a weight quantised for integer compute ([`quantize_dynamic_int8`]): `W.qt` holds
/// `W^T` as int8 `[K, N]`, `W.qt_scale` its per-column f32 scales `[N]`, `W.qt_zp` the int8
/// zero point (0, symmetric).
pub const QT_SUFFIX: &str = ".qt";
pub const QT_SCALE_SUFFIX: &str = ".qt_scale";
pub const QT_ZP_SUFFIX: &str = ".qt_zp";

fn node(op: &str, name: String, input: Vec<String>, output: Vec<String>) -> pb::NodeProto {
    pb::NodeProto {
        input,
        output,
        name,
        op_type: op.into(),
        ..Default::default()
    }
}

/// Integer compute for the linear layers: every float initializer `W` `[N, K]` of rank 2 with
/// at least `min_elems` elements, accepted by `include(name)`, whose only consumers are
/// `Transpose(perm = [1, 0])` nodes feeding `MatMul` as its right operand (how
/// `capt_graph::Ops::linear` is written), is stored transposed as int8 with one scale per
/// output column (symmetric), and each such `MatMul(A, W^T)` becomes
///
/// ```text
/// DynamicQuantizeLinear(A) -> A_q (u8), A_scale, A_zp      (once per distinct A)
/// MatMulInteger(A_q, W.qt, A_zp, W.qt_zp) -> Cast(float) -> Mul(., Mul(A_scale, W.qt_scale))
/// ```
///
/// exactly the pattern onnxruntime's dynamic quantization writes, which its graph optimiser
/// fuses into `DynamicQuantizeMatMul` (u8 x s8 GEMM; VNNI where the CPU has it); tract runs
/// the standard ops as they are. Everything else (LayerNorm, softmax, attention's
/// activation x activation products, the CAPT head, the L2 norms) stays f32.
pub fn quantize_dynamic_int8(
    model: &mut pb::ModelProto,
    min_elems: usize,
    include: &dyn Fn(&str) -> bool,
) -> crate::Result<QuantReport> {
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| Error::Model("the model has no graph".into()))?;
    let perm_10 = |n: &pb::NodeProto| {
        n.attribute
            .iter()
            .find(|a| a.name == "perm")
            .is_some_and(|a| a.ints == [1, 0])
    };
    // Consumers of every value, as (node index, input position).
    let mut consumers: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
    for (ni, n) in graph.node.iter().enumerate() {
        for (pos, i) in n.input.iter().enumerate() {
            consumers.entry(i.as_str()).or_default().push((ni, pos));
        }
    }
    // Weights to quantise: name -> (transpose node index, the MatMuls it feeds).
    let mut plan: BTreeMap<String, (usize, Vec<usize>)> = BTreeMap::new();
    for t in &graph.initializer {
        let elems: i64 = t.dims.iter().product();
        if t.data_type != P::Float as i32
            || t.dims.len() != 2
            || (elems as usize) < min_elems
            || !include(&t.name)
            || t.data_location == Some(pb::tensor_proto::DataLocation::External as i32)
        {
            continue;
        }
        let Some(uses) = consumers.get(t.name.as_str()) else {
            continue;
        };
        let [(ti, 0)] = uses.as_slice() else { continue };
        let tr = &graph.node[*ti];
        if tr.op_type != "Transpose" || !perm_10(tr) || tr.output.len() != 1 {
            continue;
        }
        let Some(mm) = consumers.get(tr.output[0].as_str()) else {
            continue;
        };
        if mm.is_empty()
            || !mm
                .iter()
                .all(|&(ni, pos)| pos == 1 && graph.node[ni].op_type == "MatMul")
        {
            continue;
        }
        plan.insert(
            t.name.clone(),
            (*ti, mm.iter().map(|&(ni, _)| ni).collect()),
        );
    }
    let mut report = QuantReport::default();
    let mut new_inits = Vec::new();
    // MatMul node index -> the weight it reads.
    let mut matmul_weight: HashMap<usize, String> = HashMap::new();
    let mut dropped: std::collections::HashSet<usize> = Default::default();
    for t in graph.initializer.iter() {
        let Some((ti, mms)) = plan.get(&t.name) else {
            continue;
        };
        let w = f32s(t).ok_or_else(|| Error::Model(format!("`{}` has no float data", t.name)))?;
        let (n_out, k_in) = (t.dims[0] as usize, t.dims[1] as usize);
        // B = W^T [K, N]; one scale per column n (= row n of W).
        let mut scales = Vec::with_capacity(n_out);
        for r in 0..n_out {
            let max = w[r * k_in..(r + 1) * k_in]
                .iter()
                .fold(0.0f32, |m, v| m.max(v.abs()));
            scales.push(if max > 0.0 { max / 127.0 } else { 1.0 });
        }
        let mut q = vec![0u8; n_out * k_in];
        for r in 0..n_out {
            for c in 0..k_in {
                let v = w[r * k_in + c];
                let qv = (v / scales[r]).round().clamp(-127.0, 127.0);
                report.max_abs_error = report.max_abs_error.max((qv * scales[r] - v).abs());
                q[c * n_out + r] = qv as i8 as u8;
            }
        }
        report.tensors += 1;
        report.bytes_before += (n_out * k_in * 4) as u64;
        report.bytes_after += (n_out * k_in + n_out * 4 + 1) as u64;
        let base = &t.name;
        new_inits.push(pb::TensorProto {
            dims: vec![k_in as i64, n_out as i64],
            data_type: P::Int8 as i32,
            name: format!("{base}{QT_SUFFIX}"),
            raw_data: q,
            ..Default::default()
        });
        new_inits.push(pb::TensorProto {
            dims: vec![n_out as i64],
            data_type: P::Float as i32,
            name: format!("{base}{QT_SCALE_SUFFIX}"),
            raw_data: scales.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        });
        new_inits.push(pb::TensorProto {
            dims: vec![],
            data_type: P::Int8 as i32,
            name: format!("{base}{QT_ZP_SUFFIX}"),
            raw_data: vec![0],
            ..Default::default()
        });
        dropped.insert(*ti);
        for &m in mms {
            matmul_weight.insert(m, base.clone());
        }
    }
    graph.initializer.retain(|t| !plan.contains_key(&t.name));
    graph.initializer.extend(new_inits);
    // Rewrite the node list in order: each quantised MatMul becomes its integer pattern, with
    // the activation's DynamicQuantizeLinear placed before its first use.
    let old = std::mem::take(&mut graph.node);
    let mut quantised_inputs: std::collections::HashSet<String> = Default::default();
    for (ni, n) in old.into_iter().enumerate() {
        if dropped.contains(&ni) {
            continue;
        }
        let Some(w) = matmul_weight.get(&ni) else {
            graph.node.push(n);
            continue;
        };
        let (a, y) = (n.input[0].clone(), n.output[0].clone());
        let (aq, a_scale, a_zp) = (
            format!("{a}.q"),
            format!("{a}.q_scale"),
            format!("{a}.q_zp"),
        );
        if quantised_inputs.insert(a.clone()) {
            graph.node.push(node(
                "DynamicQuantizeLinear",
                format!("DynamicQuantizeLinear_{a}"),
                vec![a.clone()],
                vec![aq.clone(), a_scale.clone(), a_zp.clone()],
            ));
        }
        let (yi, yf, ys) = (
            format!("{y}.i32"),
            format!("{y}.i32_f32"),
            format!("{y}.scale"),
        );
        graph.node.push(node(
            "MatMulInteger",
            format!("MatMulInteger_{y}"),
            vec![
                aq,
                format!("{w}{QT_SUFFIX}"),
                a_zp,
                format!("{w}{QT_ZP_SUFFIX}"),
            ],
            vec![yi.clone()],
        ));
        let mut cast = node("Cast", format!("Cast_{y}"), vec![yi], vec![yf.clone()]);
        cast.attribute.push(attr_i("to", P::Float as i64));
        graph.node.push(cast);
        graph.node.push(node(
            "Mul",
            format!("MulScales_{y}"),
            vec![a_scale, format!("{w}{QT_SCALE_SUFFIX}")],
            vec![ys.clone()],
        ));
        graph
            .node
            .push(node("Mul", format!("Mul_{y}"), vec![yf, ys], vec![y]));
    }
    Ok(report)
}

/// Every initializer as a host tensor (floats as f32: f16 widened, int8 weights with a
/// `NAME.scale` sibling dequantized, integer-compute weights `NAME.qt` dequantized and
/// transposed back to `NAME`; scale and zero-point tensors themselves are omitted).
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
        if let Some(base) = t
            .name
            .strip_suffix(QT_SCALE_SUFFIX)
            .or_else(|| t.name.strip_suffix(QT_ZP_SUFFIX))
        {
            if by_name.contains_key(format!("{base}{QT_SUFFIX}").as_str()) {
                continue;
            }
        }
        if let Some(base) = t.name.strip_suffix(QT_SUFFIX) {
            if t.data_type == P::Int8 as i32 && t.dims.len() == 2 {
                let scale = by_name
                    .get(format!("{base}{QT_SCALE_SUFFIX}").as_str())
                    .and_then(|s| f32s(s))
                    .ok_or_else(|| {
                        Error::Model(format!(
                            "int8 initializer `{}` has no `{base}{QT_SCALE_SUFFIX}`",
                            t.name
                        ))
                    })?;
                let (k, n) = (t.dims[0] as usize, t.dims[1] as usize);
                if t.raw_data.len() != k * n || scale.len() != n {
                    return Err(Error::Model(format!(
                        "initializer `{}` does not hold [{k}, {n}] int8 values with {n} scales",
                        t.name
                    )));
                }
                let mut w = vec![0.0f32; k * n];
                for r in 0..n {
                    for c in 0..k {
                        w[r * k + c] = (t.raw_data[c * n + r] as i8) as f32 * scale[r];
                    }
                }
                let host = HostTensor::f32(vec![n, k], w)
                    .map_err(|e| Error::Model(format!("`{}`: {e}", t.name)))?;
                out.insert(base.to_string(), host);
                continue;
            }
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
