//! float16 compute: rewrites a finished float32 graph so that its arithmetic runs in float16.
//!
//! [`to_f16_compute`] keeps the graph's interface float32 (a `Cast` after each float input,
//! one before each float output, output names unchanged) and turns everything inside into
//! float16: float initializers and `Constant` / `ConstantOfShape` values are stored as FLOAT16,
//! `Cast(to=FLOAT)` becomes `Cast(to=FLOAT16)` (casts left with nothing to do are removed, so
//! the f16 *storage* casts of `BuildOptions::weights_f16` disappear), and `LayerNormalization`
//! gets `stash_type=1` (mean and variance accumulated in f32, as opset 17 defines it).
//! Integer and boolean values are untouched.
//!
//! Some ops stay float32 ([`F16Options::keep_f32`], default [`DEFAULT_KEEP_F32`]) with casts
//! on their float inputs, and so does any op fed a constant that f16 cannot hold (an epsilon of
//! 1e-12, a 1e-30 tie-break bias: they would round to 0 and change the op's meaning). Data
//! movement ops (`Reshape`, `Gather`, `Identity`, ...) run in whatever precision their input
//! has, so an f32 value is not rounded through f16 just to be reshaped.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType as P;

use crate::error::{Error, Result};

/// Op types kept in float32 by default. All are cheap (they act on `[N, D]` embeddings or the
/// CAPT head's small tables, never on the towers' activations) and numerically exposed in f16:
///
/// - `ReduceSum`, `Sqrt`, `Max`, `Div`: the L2 norm `x / max(sqrt(sum x^2), 1e-12)` and the
///   head's dot products. A sum of squares over D = 512 loses most of f16's 11 bits and
///   overflows past 65504, and the 1e-12 clamp is 0 in f16, so a zero row (an empty bank
///   cell) would give 0/0 = NaN instead of 0.
/// - `TopK`: the SEM pair scores `Nhat * p_j` are probabilities down to 1e-30 with a 1e-30
///   tie-break bias; in f16 they round to 0 and the chosen pairs change.
pub const DEFAULT_KEEP_F32: &[&str] = &["ReduceSum", "Sqrt", "Max", "Div", "TopK"];

/// Options of [`to_f16_compute`].
#[derive(Debug, Clone, PartialEq)]
pub struct F16Options {
    /// Op types that stay float32 (their float inputs are cast up, outputs stay f32 until an
    /// f16 op consumes them).
    pub keep_f32: Vec<String>,
}

impl Default for F16Options {
    fn default() -> Self {
        Self {
            keep_f32: DEFAULT_KEEP_F32.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// What [`to_f16_compute`] changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct F16Report {
    /// Float nodes computing in float16.
    pub f16_nodes: usize,
    /// Names of the float nodes left in float32 (block list, or fed a constant f16 cannot
    /// hold), in graph order.
    pub f32_nodes: Vec<String>,
    /// Float initializers and constants now stored as float16.
    pub initializers: usize,
    /// Casts inserted (interface, around f32 nodes) and removed (now no-ops).
    pub casts_added: usize,
    pub casts_removed: usize,
}

/// Precision a float value is computed / stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Prec {
    F32,
    F16,
}

impl Prec {
    fn of(data_type: i32) -> Option<Self> {
        if data_type == P::Float as i32 {
            Some(Prec::F32)
        } else if data_type == P::Float16 as i32 {
            Some(Prec::F16)
        } else {
            None
        }
    }

    fn dtype(self) -> P {
        match self {
            Prec::F32 => P::Float,
            Prec::F16 => P::Float16,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Prec::F32 => "f32",
            Prec::F16 => "f16",
        }
    }
}

/// How an op relates to the precision of its float operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Float inputs and outputs share one type T: computes in f16 unless kept f32.
    Compute,
    /// Moves data without arithmetic: runs in the precision of its float inputs.
    Follow,
    /// `Cast`: input of any type.
    Cast,
    /// Reads only the shape (`Shape`, `Size`): input of any type, INT64 out.
    Shape,
    Constant,
    ConstantOfShape,
}

fn rule(op: &str) -> Option<Rule> {
    Some(match op {
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Neg" | "Abs" | "Exp" | "Log" | "Sqrt"
        | "Reciprocal" | "Sigmoid" | "Tanh" | "Relu" | "LeakyRelu" | "Elu" | "Softplus"
        | "HardSigmoid" | "Erf" | "Sin" | "Cos" | "Floor" | "Ceil" | "Round" | "Sign" | "Max"
        | "Min" | "Sum" | "Mean" | "Clip" | "MatMul" | "Gemm" | "Conv" | "ConvTranspose"
        | "Softmax" | "LogSoftmax" | "LayerNormalization" | "ReduceSum" | "ReduceMean"
        | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL2" | "ReduceSumSquare"
        | "AveragePool" | "MaxPool" | "GlobalAveragePool" | "Where" | "ArgMax" | "ArgMin"
        | "TopK" | "Equal" | "Greater" | "Less" | "GreaterOrEqual" | "LessOrEqual" | "Not"
        | "And" | "Or" | "Xor" | "IsNaN" | "IsInf" | "Range" => Rule::Compute,
        "Identity" | "Reshape" | "Transpose" | "Squeeze" | "Unsqueeze" | "Flatten" | "Slice"
        | "Gather" | "GatherElements" | "GatherND" | "Expand" | "Pad" | "Concat" | "Tile"
        | "Split" => Rule::Follow,
        "Cast" => Rule::Cast,
        "Shape" | "Size" => Rule::Shape,
        "Constant" => Rule::Constant,
        "ConstantOfShape" => Rule::ConstantOfShape,
        _ => return None,
    })
}

/// Element types of a node's outputs from its inputs' (`None`: optional input left out).
fn out_types(n: &pb::NodeProto, rule: Rule, ins: &[Option<i32>]) -> Result<Vec<i32>> {
    let unsupported = |why: &str| {
        Error::Model(format!(
            "f16 conversion: node `{}` ({}) {why}",
            n.name, n.op_type
        ))
    };
    let input = |i: usize| {
        ins.get(i)
            .copied()
            .flatten()
            .ok_or_else(|| unsupported(&format!("has no input {i}")))
    };
    let all = |t: i32| vec![t; n.output.len()];
    Ok(match rule {
        Rule::Cast => all(attr(n, "to")
            .map(|a| a.i as i32)
            .ok_or_else(|| unsupported("has no `to`"))?),
        Rule::Shape => all(P::Int64 as i32),
        Rule::Constant => {
            let a = n
                .attribute
                .iter()
                .find(|a| a.name.starts_with("value"))
                .ok_or_else(|| unsupported("has no value"))?;
            all(match a.name.as_str() {
                "value" => a.t.as_ref().map_or(P::Float as i32, |t| t.data_type),
                "value_float" | "value_floats" => P::Float as i32,
                "value_int" | "value_ints" => P::Int64 as i32,
                _ => return Err(unsupported(&format!("has a `{}` value", a.name))),
            })
        }
        Rule::ConstantOfShape => all(attr(n, "value")
            .and_then(|a| a.t.as_ref())
            .map_or(P::Float as i32, |t| t.data_type)),
        Rule::Compute | Rule::Follow => match n.op_type.as_str() {
            "ArgMax" | "ArgMin" => all(P::Int64 as i32),
            "TopK" => vec![input(0)?, P::Int64 as i32],
            "Equal" | "Greater" | "Less" | "GreaterOrEqual" | "LessOrEqual" | "Not" | "And"
            | "Or" | "Xor" | "IsNaN" | "IsInf" => all(P::Bool as i32),
            "Where" => all(input(1)?),
            "LayerNormalization" if n.output.len() > 1 => {
                return Err(unsupported("has mean / inv-std-dev outputs"))
            }
            _ => all(input(0)?),
        },
    })
}

fn attr<'a>(n: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

fn attr_i(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn set_attr_i(n: &mut pb::NodeProto, name: &str, i: i64) {
    match n.attribute.iter_mut().find(|a| a.name == name) {
        Some(a) => a.i = i,
        None => n.attribute.push(attr_i(name, i)),
    }
}

/// The values of a FLOAT tensor (raw little-endian or `float_data`).
fn floats(t: &pb::TensorProto) -> Result<Vec<f32>> {
    if t.data_location == Some(pb::tensor_proto::DataLocation::External as i32) {
        return Err(Error::Model(format!(
            "f16 conversion: `{}` is stored as external data; convert the model before writing it",
            t.name
        )));
    }
    Ok(crate::quant::f32s(t).unwrap_or_default())
}

/// Whether f16 holds `v` to within its rounding: the largest error may not exceed 2^-10 of
/// the tensor's largest magnitude (normal rounding is within 2^-11), and nothing finite may
/// overflow. Weights pass (a few tiny entries flushing to 0 are far below that bound);
/// an epsilon of 1e-12 or a tensor of 1e-30 biases, which f16 turns into 0, do not.
fn f16_holds(v: &[f32]) -> bool {
    let max = v
        .iter()
        .filter(|x| x.is_finite())
        .fold(0.0f32, |m, x| m.max(x.abs()));
    v.iter().filter(|x| x.is_finite()).all(|&x| {
        let h = half::f16::from_f32(x).to_f32();
        h.is_finite() && (h - x).abs() <= max * (1.0 / 1024.0)
    })
}

/// `t` (FLOAT) rewritten as FLOAT16, raw little-endian.
fn to_f16_tensor(t: &mut pb::TensorProto) -> Result<()> {
    let v = floats(t)?;
    t.data_type = P::Float16 as i32;
    t.raw_data = v
        .iter()
        .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
        .collect();
    t.float_data.clear();
    Ok(())
}

/// The float tensor a `Constant` / `ConstantOfShape` node holds, as FLOAT.
fn const_value(n: &pb::NodeProto) -> Result<Option<pb::TensorProto>> {
    for a in &n.attribute {
        match a.name.as_str() {
            "value" => return Ok(a.t.clone().filter(|t| t.data_type == P::Float as i32)),
            "value_float" => {
                return Ok(Some(pb::TensorProto {
                    data_type: P::Float as i32,
                    float_data: vec![a.f],
                    ..Default::default()
                }))
            }
            "value_floats" => {
                return Ok(Some(pb::TensorProto {
                    dims: vec![a.floats.len() as i64],
                    data_type: P::Float as i32,
                    float_data: a.floats.clone(),
                    ..Default::default()
                }))
            }
            _ => {}
        }
    }
    // ConstantOfShape without a value fills with float 0.
    Ok((n.op_type == "ConstantOfShape").then(|| pb::TensorProto {
        dims: vec![1],
        data_type: P::Float as i32,
        float_data: vec![0.0],
        ..Default::default()
    }))
}

/// Unique names derived from a base (`x.f16`, `x.f16.1`, ...).
struct Names(HashSet<String>);

impl Names {
    fn fresh(&mut self, base: String) -> String {
        let mut name = base.clone();
        let mut i = 1;
        while !self.0.insert(name.clone()) {
            name = format!("{base}.{i}");
            i += 1;
        }
        name
    }
}

fn elem_type(v: &pb::ValueInfoProto) -> Option<i32> {
    let pb::type_proto::Value::TensorType(t) = v.r#type.as_ref()?.value.as_ref()?;
    Some(t.elem_type)
}

fn set_elem_type(v: &mut pb::ValueInfoProto, dt: P) {
    if let Some(pb::type_proto::Value::TensorType(t)) =
        v.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.elem_type = dt as i32;
    }
}

/// Rewrites `model` to compute in float16 (see the module docs). The interface (graph
/// inputs and outputs) keeps its element types. Deterministic: new names derive from the
/// values they cast. Fails on ops the pass does not know, rather than guessing their typing.
pub fn to_f16_compute(model: &mut pb::ModelProto, opts: &F16Options) -> Result<F16Report> {
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| Error::Model("the model has no graph".into()))?;
    let keep: HashSet<&str> = opts.keep_f32.iter().map(String::as_str).collect();

    // Element type of every value in the original graph, and each node's rule.
    let mut src: HashMap<String, i32> = HashMap::new();
    let inputs: HashSet<String> = graph.input.iter().map(|i| i.name.clone()).collect();
    for i in &graph.input {
        src.insert(i.name.clone(), elem_type(i).unwrap_or(0));
    }
    for t in &graph.initializer {
        if !inputs.contains(&t.name) {
            src.insert(t.name.clone(), t.data_type);
        }
    }
    let mut rules = Vec::with_capacity(graph.node.len());
    for n in &graph.node {
        let r = rule(&n.op_type)
            .filter(|_| n.domain.is_empty() || n.domain == "ai.onnx")
            .ok_or_else(|| {
                Error::Model(format!(
                    "f16 conversion: op `{}` (node `{}`) is not supported; add its typing to capt-onnx's f16 pass",
                    n.op_type, n.name
                ))
            })?;
        let ins: Vec<Option<i32>> = n
            .input
            .iter()
            .map(|i| {
                if i.is_empty() {
                    return Ok(None);
                }
                src.get(i).copied().map(Some).ok_or_else(|| {
                    Error::Model(format!(
                        "f16 conversion: node `{}` reads `{i}` before it is produced",
                        n.name
                    ))
                })
            })
            .collect::<Result<_>>()?;
        for (o, t) in n.output.iter().zip(out_types(n, r, &ins)?) {
            if !o.is_empty() {
                src.insert(o.clone(), t);
            }
        }
        rules.push(r);
    }
    let is_float = |v: &str| src.get(v).is_some_and(|&t| Prec::of(t).is_some());
    // Inputs whose type is the op's T (not a Cast/Shape operand).
    let typed = |r: Rule| matches!(r, Rule::Compute | Rule::Follow);

    // Constants f16 cannot hold keep their value and force their compute consumers to f32.
    let mut exact: HashSet<String> = HashSet::new();
    for t in &graph.initializer {
        if t.data_type == P::Float as i32 && !inputs.contains(&t.name) && !f16_holds(&floats(t)?) {
            exact.insert(t.name.clone());
        }
    }
    for n in &graph.node {
        if matches!(n.op_type.as_str(), "Constant" | "ConstantOfShape") {
            if let Some(t) = const_value(n)? {
                if !f16_holds(&floats(&t)?) {
                    exact.extend(n.output.iter().cloned());
                }
            }
        }
    }
    let forced: Vec<bool> = graph
        .node
        .iter()
        .zip(&rules)
        .map(|(n, &r)| {
            keep.contains(n.op_type.as_str())
                || (r == Rule::Compute && n.input.iter().any(|i| exact.contains(i)))
        })
        .collect();

    // Where constants live: f16 unless f16 cannot hold them or only f32 nodes read them.
    let mut readers: HashMap<&str, Vec<(usize, bool)>> = HashMap::new();
    for (k, (n, &r)) in graph.node.iter().zip(&rules).enumerate() {
        for i in &n.input {
            readers
                .entry(i.as_str())
                .or_default()
                .push((k, typed(r) && forced[k]));
        }
    }
    let const_prec = |name: &str| -> Prec {
        let f32_only = readers
            .get(name)
            .is_some_and(|rs| rs.iter().all(|&(_, kept)| kept));
        if exact.contains(name) || f32_only {
            Prec::F32
        } else {
            Prec::F16
        }
    };
    let mut report = F16Report::default();
    let mut home: HashMap<String, Prec> = HashMap::new();
    for i in &graph.input {
        if let Some(p) = Prec::of(src[&i.name]) {
            home.insert(i.name.clone(), p);
        }
    }
    let mut init_prec = Vec::with_capacity(graph.initializer.len());
    for t in &graph.initializer {
        let p = match Prec::of(t.data_type) {
            Some(_) if inputs.contains(&t.name) => None,
            Some(Prec::F32) => Some(const_prec(&t.name)),
            p => p,
        };
        init_prec.push(p);
        if let Some(p) = p {
            home.insert(t.name.clone(), p);
        }
    }
    let mut const_nodes: HashMap<usize, Prec> = HashMap::new();
    for (k, n) in graph.node.iter().enumerate() {
        if matches!(rules[k], Rule::Constant | Rule::ConstantOfShape)
            && n.output.first().is_some_and(|o| src[o] == P::Float as i32)
        {
            let p = if forced[k] {
                Prec::F32
            } else {
                const_prec(&n.output[0])
            };
            const_nodes.insert(k, p);
        }
    }
    for (t, p) in graph.initializer.iter_mut().zip(&init_prec) {
        if *p == Some(Prec::F16) && t.data_type == P::Float as i32 {
            to_f16_tensor(t)?;
            report.initializers += 1;
        }
    }

    let outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let mut names = Names(
        src.keys()
            .cloned()
            .chain(graph.node.iter().map(|n| n.name.clone()))
            .collect(),
    );
    let mut alias: HashMap<String, String> = HashMap::new();
    let mut memo: HashMap<(String, Prec), String> = HashMap::new();
    let mut nodes: Vec<pb::NodeProto> = Vec::with_capacity(graph.node.len() + 16);
    let cast = |v: &str, to: Prec, out: String, name: String| pb::NodeProto {
        input: vec![v.to_string()],
        output: vec![out],
        name,
        op_type: "Cast".into(),
        attribute: vec![attr_i("to", to.dtype() as i64)],
        ..Default::default()
    };
    for (k, mut n) in std::mem::take(&mut graph.node).into_iter().enumerate() {
        for i in n.input.iter_mut() {
            if let Some(a) = alias.get(i) {
                *i = a.clone();
            }
        }
        let r = rules[k];
        let float_ins: Vec<Prec> = n
            .input
            .iter()
            .filter_map(|i| home.get(i).copied())
            .collect();
        let mode = if forced[k] {
            Prec::F32
        } else if let Some(&p) = const_nodes.get(&k) {
            p
        } else if r == Rule::Follow && !float_ins.is_empty() {
            if float_ins.iter().all(|&p| p == Prec::F32) {
                Prec::F32
            } else {
                Prec::F16
            }
        } else {
            Prec::F16
        };
        if typed(r) {
            for i in n.input.iter_mut() {
                match home.get(i.as_str()) {
                    Some(&p) if p != mode => {
                        let key = (i.clone(), mode);
                        let to = match memo.get(&key) {
                            Some(v) => v.clone(),
                            None => {
                                let v = names.fresh(format!("{i}.{}", mode.suffix()));
                                let nn = names.fresh(format!("Cast_{v}"));
                                nodes.push(cast(i, mode, v.clone(), nn));
                                report.casts_added += 1;
                                home.insert(v.clone(), mode);
                                memo.insert(key, v.clone());
                                v
                            }
                        };
                        *i = to;
                    }
                    _ => {}
                }
            }
        }
        let float_outs: Vec<String> = n.output.iter().filter(|o| is_float(o)).cloned().collect();
        match r {
            Rule::Cast if !float_outs.is_empty() => {
                set_attr_i(&mut n, "to", mode.dtype() as i64);
                let from = n.input.first().and_then(|i| home.get(i)).copied();
                if from == Some(mode) && !outputs.contains(&n.output[0]) {
                    alias.insert(n.output[0].clone(), n.input[0].clone());
                    report.casts_removed += 1;
                    continue;
                }
            }
            Rule::Constant | Rule::ConstantOfShape if mode == Prec::F16 => {
                if let Some(mut t) = const_value(&n)? {
                    to_f16_tensor(&mut t)?;
                    n.attribute.retain(|a| !a.name.starts_with("value"));
                    n.attribute.push(pb::AttributeProto {
                        name: "value".into(),
                        r#type: pb::attribute_proto::AttributeType::Tensor as i32,
                        t: Some(t),
                        ..Default::default()
                    });
                    report.initializers += 1;
                }
            }
            _ => {}
        }
        if n.op_type == "LayerNormalization" && mode == Prec::F16 {
            // Mean and variance in f32 (the opset 17 default, pinned for every runtime).
            set_attr_i(&mut n, "stash_type", 1);
        }
        for o in &float_outs {
            home.insert(o.clone(), mode);
        }
        if (typed(r) && !float_ins.is_empty()) || !float_outs.is_empty() {
            match mode {
                Prec::F16 => report.f16_nodes += 1,
                Prec::F32 => report.f32_nodes.push(n.name.clone()),
            }
        }
        nodes.push(n);
    }

    // The interface keeps its types: an output computed in the other precision is renamed
    // inside and cast back under its own name.
    let mut renames: HashMap<String, String> = HashMap::new();
    let mut tail = Vec::new();
    for o in &graph.output {
        let (Some(want), Some(&have)) =
            (elem_type(o).and_then(Prec::of), home.get(o.name.as_str()))
        else {
            continue;
        };
        if want != have {
            let inner = names.fresh(format!("{}.{}", o.name, have.suffix()));
            renames.insert(o.name.clone(), inner.clone());
            let nn = names.fresh(format!("Cast_{}", o.name));
            tail.push(cast(&inner, want, o.name.clone(), nn));
            report.casts_added += 1;
        }
    }
    let rename = |v: &mut String| {
        if let Some(r) = renames.get(v.as_str()) {
            *v = r.clone();
        }
    };
    for n in nodes.iter_mut() {
        n.input.iter_mut().for_each(rename);
        n.output.iter_mut().for_each(rename);
    }
    for t in graph.initializer.iter_mut() {
        rename(&mut t.name);
    }
    nodes.extend(tail);
    graph.node = nodes;
    for v in graph.value_info.iter_mut() {
        if let Some(&p) = home.get(v.name.as_str()) {
            set_elem_type(v, p.dtype());
        }
        rename(&mut v.name);
    }
    graph.value_info.retain(|v| !alias.contains_key(&v.name));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use capt_graph::{DType, HostTensor, Ops};

    use super::*;
    use crate::{run_tract, tract_value_types, BuildOptions, Dim, ModelMeta, OnnxBuilder};

    /// Deterministic pseudo-random values in [-scale, scale).
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    const D: usize = 32;
    const C: usize = 6;

    fn params() -> Vec<(String, HostTensor)> {
        let t = |dims: Vec<usize>, seed, scale| {
            let n = dims.iter().product();
            HostTensor::f32(dims, values(n, seed, scale)).unwrap()
        };
        let table: Vec<i64> = (0..C as i64).map(|c| (c + 1) % C as i64).collect();
        vec![
            ("ln.w".into(), t(vec![D], 1, 1.0)),
            ("ln.b".into(), t(vec![D], 2, 0.1)),
            ("fc.w".into(), t(vec![D, D], 3, 0.3)),
            ("fc.b".into(), t(vec![D], 4, 0.1)),
            ("emb".into(), t(vec![C, D], 5, 1.0)),
            ("partner".into(), HostTensor::i64(vec![C], table).unwrap()),
        ]
    }

    /// `x [N, D]` -> LN -> linear -> GELU -> L2 norm -> cosine logits against `emb`, softmax,
    /// argmax -> partner (an integer table lookup) -> its logit, top-2: every kind of op the
    /// exported graphs mix (float compute, norms, integer paths, data movement).
    fn build(opts: BuildOptions) -> pb::ModelProto {
        let b = OnnxBuilder::new(params(), opts);
        let x = b
            .input("x", DType::F32, &[Dim::Sym("N".into()), D.into()])
            .unwrap();
        let h = b
            .layer_norm(
                &x,
                &b.param("ln.w").unwrap(),
                &b.param("ln.b").unwrap(),
                1e-5,
            )
            .unwrap();
        let h = b.matmul(&h, &b.param("fc.w").unwrap()).unwrap();
        let h = b.add(&h, &b.param("fc.b").unwrap()).unwrap();
        let h = b.gelu_erf(&h).unwrap();
        let f = b.l2_normalize(&h, -1).unwrap();
        let e = b.l2_normalize(&b.param("emb").unwrap(), -1).unwrap();
        let logits = b
            .mul_scalar(
                &b.matmul(&f, &b.permute(&e, &[1, 0]).unwrap()).unwrap(),
                20.0,
            )
            .unwrap();
        let probs = b.softmax(&logits, -1).unwrap();
        let class = b.argmax(&logits, -1, false).unwrap();
        let partner = b.gather(&b.param("partner").unwrap(), &class, 0).unwrap();
        let idx = b.unsqueeze(&partner, 1).unwrap();
        let partner_logit = b.gather_elements(&logits, &idx, 1).unwrap();
        let (top, top_idx) = b.topk(&probs, 2).unwrap();
        b.output("logits", &logits).unwrap();
        b.output("probs", &probs).unwrap();
        b.output("partner_class", &partner).unwrap();
        b.output("partner_logit", &partner_logit).unwrap();
        b.output("top", &top).unwrap();
        b.output("top_idx", &top_idx).unwrap();
        b.finish(&ModelMeta::default()).unwrap()
    }

    fn input() -> HostTensor {
        HostTensor::f32(vec![4, D], values(4 * D, 9, 2.0)).unwrap()
    }

    fn write(dir: &Path, name: &str, m: &pb::ModelProto) -> std::path::PathBuf {
        let p = dir.join(name);
        crate::write_model(&p, m, &Default::default()).unwrap();
        p
    }

    fn max_diff(a: &HostTensor, b: &HostTensor) -> f32 {
        a.as_f32()
            .unwrap()
            .iter()
            .zip(b.as_f32().unwrap())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn node<'a>(m: &'a pb::ModelProto, op: &str) -> Vec<&'a pb::NodeProto> {
        let g = m.graph.as_ref().unwrap();
        g.node.iter().filter(|n| n.op_type == op).collect()
    }

    #[test]
    fn f16_compute_matches_f32_within_f16_tolerance() {
        let tmp = tempfile::tempdir().unwrap();
        let f32_model = build(BuildOptions::default());
        let mut m = f32_model.clone();
        let report = to_f16_compute(&mut m, &F16Options::default()).unwrap();
        assert!(
            report.f16_nodes > 10 && report.initializers >= 4,
            "{report:?}"
        );
        let a = write(tmp.path(), "f32.onnx", &f32_model);
        let b = write(tmp.path(), "f16.onnx", &m);
        let x = input();
        let want = run_tract(&a, std::slice::from_ref(&x)).unwrap();
        let got = run_tract(&b, &[x]).unwrap();
        // The interface is unchanged: same outputs, same types.
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.dtype(), w.dtype());
            assert_eq!(g.dims(), w.dims());
        }
        let g = m.graph.as_ref().unwrap();
        let f = f32_model.graph.as_ref().unwrap();
        assert_eq!(g.input, f.input);
        assert_eq!(g.output, f.output);
        // logits are 20 * cos: f16 keeps them to ~20 * 2^-10 per rounding step.
        let d = max_diff(&got[0], &want[0]);
        assert!(d > 0.0 && d < 0.1, "logits differ by {d}");
        assert!(max_diff(&got[1], &want[1]) < 1e-2);
        assert_eq!(got[2], want[2], "the integer path changed");
        assert!(max_diff(&got[3], &want[3]) < 0.1);
        assert_eq!(got[5], want[5], "top-k indices changed");
        // The compute really is f16: tract types MatMul operands and the LN output as F16.
        let types = tract_value_types(&b).unwrap();
        for mm in node(&m, "MatMul") {
            for i in &mm.input {
                assert_eq!(types[i], "F16", "MatMul input {i}");
            }
        }
        let ln = node(&m, "LayerNormalization")[0];
        assert_eq!(types[&ln.output[0]], "F16");
        assert_eq!(attr(ln, "stash_type").map(|a| a.i), Some(1));
        assert_eq!(types["x"], "F32");
        assert_eq!(types["logits"], "F32");
        assert_eq!(types["partner_class"], "I64");
    }

    #[test]
    fn kept_ops_stay_f32_and_the_list_is_an_option() {
        let tmp = tempfile::tempdir().unwrap();
        let mut m = build(BuildOptions::default());
        let report = to_f16_compute(&mut m, &F16Options::default()).unwrap();
        let p = write(tmp.path(), "kept.onnx", &m);
        let types = tract_value_types(&p).unwrap();
        for op in DEFAULT_KEEP_F32 {
            for n in node(&m, op) {
                assert!(report.f32_nodes.contains(&n.name), "{} not kept", n.name);
                assert_eq!(types[&n.output[0]], "F32", "{}", n.name);
            }
        }
        assert!(!node(&m, "Div").is_empty() && !node(&m, "TopK").is_empty());

        // Without a block list only the clamp against 1e-12, which f16 rounds to 0, stays f32.
        let mut m = build(BuildOptions::default());
        let none = F16Options { keep_f32: vec![] };
        let report = to_f16_compute(&mut m, &none).unwrap();
        let maxes: Vec<String> = node(&m, "Max").iter().map(|n| n.name.clone()).collect();
        assert_eq!(report.f32_nodes, maxes);
        let p = write(tmp.path(), "none.onnx", &m);
        let types = tract_value_types(&p).unwrap();
        for n in node(&m, "Div").iter().chain(&node(&m, "TopK")) {
            assert_eq!(types[&n.output[0]], "F16", "{}", n.name);
        }
    }

    #[test]
    fn zero_rows_normalise_to_zero_not_nan() {
        // emb has a zero row: the f32 graph gives 0 / 1e-12 = 0 for its logits; an f16 Div
        // would see the clamp as 0 and give NaN.
        let tmp = tempfile::tempdir().unwrap();
        let b = OnnxBuilder::new(
            [("emb".to_string(), {
                let mut v = values(C * D, 5, 1.0);
                v[..D].iter_mut().for_each(|x| *x = 0.0);
                HostTensor::f32(vec![C, D], v).unwrap()
            })],
            BuildOptions::default(),
        );
        let x = b.input("x", DType::F32, &[2.into(), D.into()]).unwrap();
        let e = b.l2_normalize(&b.param("emb").unwrap(), -1).unwrap();
        let y = b.matmul(&x, &b.permute(&e, &[1, 0]).unwrap()).unwrap();
        b.output("y", &y).unwrap();
        let f32_model = b.finish(&ModelMeta::default()).unwrap();
        let x = HostTensor::f32(vec![2, D], values(2 * D, 3, 1.0)).unwrap();
        let want = run_tract(
            &write(tmp.path(), "a.onnx", &f32_model),
            std::slice::from_ref(&x),
        )
        .unwrap();
        let mut m = f32_model.clone();
        to_f16_compute(&mut m, &F16Options::default()).unwrap();
        let got = run_tract(&write(tmp.path(), "b.onnx", &m), std::slice::from_ref(&x)).unwrap();
        let g = got[0].as_f32().unwrap();
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        assert_eq!(g[0], 0.0);
        assert!(max_diff(&got[0], &want[0]) < 1e-2);
        // The same graph with the norm in f16 shows the failure the block list prevents.
        let mut m = f32_model;
        to_f16_compute(&mut m, &F16Options { keep_f32: vec![] }).unwrap();
        let bad = run_tract(&write(tmp.path(), "c.onnx", &m), &[x]).unwrap();
        assert!(bad[0].as_f32().unwrap()[0].is_nan());
    }

    #[test]
    fn storage_casts_disappear_and_constants_convert() {
        let storage = build(BuildOptions {
            weights_f16: true,
            f16_min_elems: 16,
        });
        let widening = node(&storage, "Cast").len();
        let mut m = storage.clone();
        let r = to_f16_compute(&mut m, &F16Options::default()).unwrap();
        assert!(widening >= 3 && r.casts_removed >= 3, "{r:?}");
        let g = m.graph.as_ref().unwrap();
        let f16_inits: HashSet<&str> = g
            .initializer
            .iter()
            .filter(|t| t.data_type == P::Float16 as i32)
            .map(|t| t.name.as_str())
            .collect();
        // No cast reads a float16 initializer to produce float16 again.
        for n in node(&m, "Cast") {
            let to = attr(n, "to").unwrap().i;
            assert!(!(f16_inits.contains(n.input[0].as_str()) && to == P::Float16 as i64));
        }
        // Built from the f32 graph, the result is the same graph.
        let mut from_f32 = build(BuildOptions::default());
        to_f16_compute(&mut from_f32, &F16Options::default()).unwrap();
        let names = |m: &pb::ModelProto| -> Vec<String> {
            m.graph
                .as_ref()
                .unwrap()
                .node
                .iter()
                .map(|n| n.op_type.clone())
                .collect()
        };
        assert_eq!(names(&m), names(&from_f32));
        // Integer initializers are untouched; float ones are f16 unless f16 cannot hold them.
        let (orig, conv) = (
            &build(BuildOptions::default()).graph.unwrap().initializer,
            &from_f32.graph.as_ref().unwrap().initializer,
        );
        for (a, b) in orig.iter().zip(conv) {
            if a.data_type == P::Float as i32 && f16_holds(&floats(a).unwrap()) {
                assert_eq!(b.data_type, P::Float16 as i32, "{}", a.name);
            } else {
                assert_eq!(a, b, "{}", a.name);
            }
        }
        // Deterministic.
        let mut again = build(BuildOptions::default());
        to_f16_compute(&mut again, &F16Options::default()).unwrap();
        assert_eq!(again, from_f32);
    }

    #[test]
    fn constant_nodes_and_unknown_ops() {
        let mut m = pb::ModelProto {
            graph: Some(pb::GraphProto {
                node: vec![
                    pb::NodeProto {
                        output: vec!["c".into()],
                        name: "k".into(),
                        op_type: "Constant".into(),
                        attribute: vec![pb::AttributeProto {
                            name: "value_float".into(),
                            r#type: pb::attribute_proto::AttributeType::Float as i32,
                            f: 0.5,
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                    pb::NodeProto {
                        input: vec!["x".into(), "c".into()],
                        output: vec!["y".into()],
                        name: "mul".into(),
                        op_type: "Mul".into(),
                        ..Default::default()
                    },
                ],
                input: vec![crate::builder::value_info("x", DType::F32, &[3.into()])],
                output: vec![crate::builder::value_info("y", DType::F32, &[3.into()])],
                ..Default::default()
            }),
            ir_version: crate::IR_VERSION,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: crate::OPSET,
            }],
            ..Default::default()
        };
        let mut bad = m.clone();
        to_f16_compute(&mut m, &F16Options::default()).unwrap();
        let g = m.graph.as_ref().unwrap();
        let value = g.node[0].attribute[0].t.as_ref().unwrap();
        assert_eq!(value.data_type, P::Float16 as i32);
        // x -> Cast (before its first reader) -> Mul -> Cast -> y.
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Constant", "Cast", "Mul", "Cast"]);
        assert_eq!(g.node.last().unwrap().output, ["y"]);
        let tmp = tempfile::tempdir().unwrap();
        let p = write(tmp.path(), "c.onnx", &m);
        let x = HostTensor::f32(vec![3], vec![1.0, -2.0, 3.0]).unwrap();
        let y = run_tract(&p, &[x]).unwrap();
        assert_eq!(y[0].as_f32().unwrap(), [0.5, -1.0, 1.5]);

        bad.graph.as_mut().unwrap().node[1].op_type = "Resize".into();
        let err = to_f16_compute(&mut bad, &F16Options::default()).unwrap_err();
        assert!(err.to_string().contains("`Resize`"), "{err}");
    }
}
