//! [`OnnxBuilder`]: records [`capt_graph::Ops`] calls as an ONNX graph (opset 17, IR 8).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};

use capt_graph::{norm_axis, DType, Error, HostData, HostTensor, Ops, Result};
use tract_onnx::pb;

use crate::value::{broadcast, fmt_dims, reshape_dims, Dim, Value};

/// ONNX IR version written (the ONNX types of `tract_onnx::pb` are IR 8).
pub const IR_VERSION: i64 = 8;
/// Default-domain opset written.
pub const OPSET: i64 = 17;

/// How the builder stores parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildOptions {
    /// Store float parameters with at least `f16_min_elems` elements as IEEE float16
    /// initializers, each widened by one `Cast(to=FLOAT)` node: the file is about half the size
    /// and all compute stays float32 (LayerNorm, softmax and logits keep f32 accuracy; the only
    /// error is the weights' f16 rounding). Smaller tensors (biases, LN affine, scalars) stay f32.
    pub weights_f16: bool,
    pub f16_min_elems: usize,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            weights_f16: false,
            f16_min_elems: 1024,
        }
    }
}

/// Model-level fields of the written file (`producer_name` is always
/// [`crate::PRODUCER`], `producer_version` this crate's version).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelMeta {
    /// `GraphProto.name`.
    pub graph_name: String,
    pub doc_string: String,
    pub model_version: i64,
    /// `metadata_props`, written in key order.
    pub metadata: BTreeMap<String, String>,
}

#[derive(Default)]
struct Inner {
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
    inputs: Vec<pb::ValueInfoProto>,
    outputs: Vec<pb::ValueInfoProto>,
    /// Every value name in the graph (inputs, initializers, node outputs).
    names: HashSet<String>,
    params: HashMap<String, Value>,
    /// Constant dedup: (dtype, dims, bytes) -> value.
    consts: HashMap<(i32, Vec<i64>, Vec<u8>), Value>,
    next_node: usize,
    next_const: usize,
}

/// Records [`Ops`] calls as ONNX nodes. `T` = [`Value`] (name + dtype + export-time dims).
///
/// Determinism: node, value and initializer names come from counters in call order
/// (`MatMul_12`, `const_3`) and parameters keep their own names, so the same generic code
/// with the same parameters produces the same bytes. Constants with equal bytes are stored
/// once. Float compute is float32.
pub struct OnnxBuilder {
    params: HashMap<String, HostTensor>,
    opts: BuildOptions,
    inner: RefCell<Inner>,
}

fn attr_i(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn attr_f(name: &str, f: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f,
        ..Default::default()
    }
}

fn attr_ints(name: &str, ints: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

pub(crate) fn onnx_dtype(d: DType) -> pb::tensor_proto::DataType {
    use pb::tensor_proto::DataType as P;
    match d {
        DType::F32 => P::Float,
        DType::F64 => P::Double,
        DType::I64 => P::Int64,
        DType::Bool => P::Bool,
    }
}

/// Raw little-endian bytes of a host tensor in the builder's storage type (floats as f32).
fn host_bytes(t: &HostTensor, f16: bool) -> (pb::tensor_proto::DataType, Vec<u8>) {
    use pb::tensor_proto::DataType as P;
    match t.data() {
        HostData::F32(v) if f16 => (
            P::Float16,
            v.iter()
                .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
                .collect(),
        ),
        HostData::F64(v) if f16 => (
            P::Float16,
            v.iter()
                .flat_map(|x| half::f16::from_f64(*x).to_bits().to_le_bytes())
                .collect(),
        ),
        HostData::F32(v) => (P::Float, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        HostData::F64(v) => (
            P::Float,
            v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect(),
        ),
        HostData::I64(v) => (P::Int64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        HostData::Bool(v) => (P::Bool, v.iter().map(|&b| b as u8).collect()),
    }
}

pub(crate) fn value_info(name: &str, dtype: DType, dims: &[Dim]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            denotation: String::new(),
            value: match d {
                Dim::Known(k) => Some(dimension::Value::DimValue(*k as i64)),
                Dim::Sym(s) => Some(dimension::Value::DimParam(s.clone())),
                Dim::Unknown => None,
            },
        })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: onnx_dtype(dtype) as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

impl OnnxBuilder {
    /// A builder whose [`Ops::param`] serves `params` (names as the candle side uses them).
    pub fn new(params: impl IntoIterator<Item = (String, HostTensor)>, opts: BuildOptions) -> Self {
        Self {
            params: params.into_iter().collect(),
            opts,
            inner: RefCell::new(Inner::default()),
        }
    }

    /// Declares a graph input, e.g. `input("pixel_values", F32, &["N".into(), 3.into(), ..])`.
    pub fn input(&self, name: &str, dtype: DType, dims: &[Dim]) -> Result<Value> {
        let mut g = self.inner.borrow_mut();
        Self::claim(&mut g, "input", name)?;
        g.inputs.push(value_info(name, dtype, dims));
        Ok(Value {
            name: name.into(),
            dtype,
            dims: dims.to_vec(),
        })
    }

    /// Declares `x` as the graph output `name` (through an `Identity` node, so any value,
    /// including an input or an initializer, can be exposed under a stable name).
    pub fn output(&self, name: &str, x: &Value) -> Result<()> {
        let mut g = self.inner.borrow_mut();
        Self::claim(&mut g, "output", name)?;
        let idx = g.next_node;
        g.next_node += 1;
        g.nodes.push(pb::NodeProto {
            input: vec![x.name.clone()],
            output: vec![name.into()],
            name: format!("Identity_{idx}"),
            op_type: "Identity".into(),
            ..Default::default()
        });
        g.outputs.push(value_info(name, x.dtype, &x.dims));
        Ok(())
    }

    /// Number of nodes recorded so far.
    pub fn node_count(&self) -> usize {
        self.inner.borrow().nodes.len()
    }

    /// Assembles the ModelProto (IR 8, opset 17). Fails when no output was declared.
    pub fn finish(self, meta: &ModelMeta) -> Result<pb::ModelProto> {
        let g = self.inner.into_inner();
        if g.outputs.is_empty() {
            return Err(Error::op(
                "finish",
                "the graph has no outputs; call output() first",
            ));
        }
        let graph = pb::GraphProto {
            node: g.nodes,
            name: if meta.graph_name.is_empty() {
                "capt".into()
            } else {
                meta.graph_name.clone()
            },
            initializer: g.initializers,
            input: g.inputs,
            output: g.outputs,
            ..Default::default()
        };
        Ok(pb::ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: crate::io::PRODUCER.into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            model_version: meta.model_version,
            doc_string: meta.doc_string.clone(),
            graph: Some(graph),
            metadata_props: meta
                .metadata
                .iter()
                .map(|(k, v)| pb::StringStringEntryProto {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            ..Default::default()
        })
    }

    fn claim(g: &mut Inner, op: &'static str, name: &str) -> Result<()> {
        if name.is_empty() || !g.names.insert(name.to_string()) {
            return Err(Error::op(
                op,
                format!("value name `{name}` is empty or already used in the graph"),
            ));
        }
        Ok(())
    }

    /// Adds an initializer named `name` holding `t` (floats as f32, or f16 when asked).
    fn add_initializer(g: &mut Inner, name: &str, t: &HostTensor, f16: bool) -> Result<()> {
        Self::claim(g, "initializer", name)?;
        let (dt, raw) = host_bytes(t, f16);
        g.initializers.push(pb::TensorProto {
            dims: t.dims().iter().map(|&d| d as i64).collect(),
            data_type: dt as i32,
            name: name.into(),
            raw_data: raw,
            ..Default::default()
        });
        Ok(())
    }

    /// Appends one node; returns its outputs as values.
    fn node(
        &self,
        op_type: &'static str,
        inputs: &[&str],
        attrs: Vec<pb::AttributeProto>,
        outs: Vec<(DType, Vec<Dim>)>,
    ) -> Result<Vec<Value>> {
        let mut g = self.inner.borrow_mut();
        let idx = g.next_node;
        g.next_node += 1;
        let base = format!("{op_type}_{idx}");
        let names: Vec<String> = if outs.len() == 1 {
            vec![base.clone()]
        } else {
            (0..outs.len()).map(|i| format!("{base}_{i}")).collect()
        };
        for n in &names {
            Self::claim(&mut g, op_type, n)?;
        }
        g.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: names.clone(),
            name: base,
            op_type: op_type.into(),
            attribute: attrs,
            ..Default::default()
        });
        Ok(names
            .into_iter()
            .zip(outs)
            .map(|(name, (dtype, dims))| Value { name, dtype, dims })
            .collect())
    }

    fn node1(
        &self,
        op_type: &'static str,
        inputs: &[&str],
        attrs: Vec<pb::AttributeProto>,
        dtype: DType,
        dims: Vec<Dim>,
    ) -> Result<Value> {
        Ok(self
            .node(op_type, inputs, attrs, vec![(dtype, dims)])?
            .remove(0))
    }

    fn const_i64(&self, v: &[i64]) -> Result<Value> {
        self.constant(&HostTensor::i64(vec![v.len()], v.to_vec())?)
    }

    fn scalar_like(&self, x: &Value, s: f64) -> Result<Value> {
        let t = match x.dtype {
            DType::I64 => HostTensor::i64(vec![], vec![s as i64])?,
            _ => HostTensor::scalar_f32(s as f32),
        };
        self.constant(&t)
    }

    fn float_only(op: &'static str, x: &Value) -> Result<()> {
        if !x.dtype.is_float() {
            return Err(Error::op(
                op,
                format!("needs a float input, got {:?} ({})", x.dtype, x.name),
            ));
        }
        Ok(())
    }

    /// Arithmetic, ordering and reductions are not defined on Bool in opset 17.
    fn numeric(op: &'static str, x: &Value) -> Result<()> {
        if x.dtype == DType::Bool {
            return Err(Error::op(
                op,
                format!("not defined on Bool ({}); cast the mask first", x.name),
            ));
        }
        Ok(())
    }

    fn same_dtype(op: &'static str, a: &Value, b: &Value) -> Result<()> {
        if a.dtype != b.dtype {
            return Err(Error::op(
                op,
                format!(
                    "dtype mismatch {:?} ({}) vs {:?} ({})",
                    a.dtype, a.name, b.dtype, b.name
                ),
            ));
        }
        Ok(())
    }

    fn index_only(op: &'static str, i: &Value) -> Result<()> {
        if i.dtype != DType::I64 {
            return Err(Error::op(
                op,
                format!("indices must be I64, got {:?} ({})", i.dtype, i.name),
            ));
        }
        Ok(())
    }

    fn binary(
        &self,
        op_type: &'static str,
        a: &Value,
        b: &Value,
        out: Option<DType>,
    ) -> Result<Value> {
        Self::same_dtype(op_type, a, b)?;
        if op_type != "Equal" {
            Self::numeric(op_type, a)?;
        }
        let dims = broadcast(op_type, &[&a.dims, &b.dims])?;
        self.node1(
            op_type,
            &[&a.name, &b.name],
            vec![],
            out.unwrap_or(a.dtype),
            dims,
        )
    }

    fn unary(&self, op_type: &'static str, x: &Value) -> Result<Value> {
        Self::float_only(op_type, x)?;
        self.node1(op_type, &[&x.name], vec![], x.dtype, x.dims.clone())
    }

    fn reduce_dims(x: &Value, a: usize, keepdim: bool) -> Vec<Dim> {
        let mut d = x.dims.clone();
        if keepdim {
            d[a] = Dim::Known(1);
        } else {
            d.remove(a);
        }
        d
    }
}

impl Ops for OnnxBuilder {
    type T = Value;

    fn dims(&self, x: &Value) -> Vec<Option<usize>> {
        x.dims.iter().map(Dim::known).collect()
    }

    fn dtype(&self, x: &Value) -> DType {
        x.dtype
    }

    fn param(&self, name: &str) -> Result<Value> {
        if let Some(v) = self.inner.borrow().params.get(name) {
            return Ok(v.clone());
        }
        let t = self.params.get(name).ok_or_else(|| Error::MissingParam {
            name: name.to_string(),
            available: self.params.len(),
        })?;
        let dims: Vec<Dim> = t.dims().iter().map(|&d| Dim::Known(d)).collect();
        let dtype = if t.dtype().is_float() {
            DType::F32
        } else {
            t.dtype()
        };
        let f16 = self.opts.weights_f16
            && dtype == DType::F32
            && t.elem_count() >= self.opts.f16_min_elems;
        let value = {
            let mut g = self.inner.borrow_mut();
            Self::add_initializer(&mut g, name, t, f16)?;
            Value {
                name: name.into(),
                dtype,
                dims: dims.clone(),
            }
        };
        let value = if f16 {
            let to = pb::tensor_proto::DataType::Float as i64;
            self.node1("Cast", &[name], vec![attr_i("to", to)], DType::F32, dims)?
        } else {
            value
        };
        self.inner
            .borrow_mut()
            .params
            .insert(name.to_string(), value.clone());
        Ok(value)
    }

    fn has_param(&self, name: &str) -> bool {
        self.params.contains_key(name)
    }

    fn constant(&self, value: &HostTensor) -> Result<Value> {
        let (dt, raw) = host_bytes(value, false);
        let dims_i: Vec<i64> = value.dims().iter().map(|&d| d as i64).collect();
        let key = (dt as i32, dims_i, raw);
        let mut g = self.inner.borrow_mut();
        if let Some(v) = g.consts.get(&key) {
            return Ok(v.clone());
        }
        let name = format!("const_{}", g.next_const);
        g.next_const += 1;
        Self::add_initializer(&mut g, &name, value, false)?;
        let dtype = if value.dtype().is_float() {
            DType::F32
        } else {
            value.dtype()
        };
        let v = Value {
            name,
            dtype,
            dims: value.dims().iter().map(|&d| Dim::Known(d)).collect(),
        };
        g.consts.insert(key, v.clone());
        Ok(v)
    }

    fn matmul(&self, a: &Value, b: &Value) -> Result<Value> {
        if a.rank() < 2 || b.rank() < 2 {
            return Err(Error::op(
                "matmul",
                format!(
                    "needs rank >= 2, got {} @ {}",
                    fmt_dims(&a.dims),
                    fmt_dims(&b.dims)
                ),
            ));
        }
        Self::same_dtype("matmul", a, b)?;
        Self::numeric("matmul", a)?;
        let (ra, rb) = (a.rank(), b.rank());
        if let (Some(k1), Some(k2)) = (a.dims[ra - 1].known(), b.dims[rb - 2].known()) {
            if k1 != k2 {
                return Err(Error::op(
                    "matmul",
                    format!(
                        "inner dims differ: {} @ {}",
                        fmt_dims(&a.dims),
                        fmt_dims(&b.dims)
                    ),
                ));
            }
        }
        let mut dims = broadcast("matmul", &[&a.dims[..ra - 2], &b.dims[..rb - 2]])?;
        dims.push(a.dims[ra - 2].clone());
        dims.push(b.dims[rb - 1].clone());
        self.node1("MatMul", &[&a.name, &b.name], vec![], a.dtype, dims)
    }

    fn conv2d(
        &self,
        x: &Value,
        w: &Value,
        bias: Option<&Value>,
        stride: usize,
        padding: usize,
    ) -> Result<Value> {
        if x.rank() != 4 || w.rank() != 4 || stride == 0 {
            return Err(Error::op(
                "conv2d",
                format!(
                    "needs x [n,c,h,w], w [o,c,kh,kw], stride > 0; got {} and {}",
                    fmt_dims(&x.dims),
                    fmt_dims(&w.dims)
                ),
            ));
        }
        Self::same_dtype("conv2d", x, w)?;
        let out = |i: usize, k: &Dim| match (x.dims[i].known(), k.known()) {
            (Some(h), Some(k)) if h + 2 * padding >= k => {
                Ok(Dim::Known((h + 2 * padding - k) / stride + 1))
            }
            (Some(_), Some(_)) => Err(Error::op("conv2d", "kernel larger than the padded input")),
            _ => Ok(Dim::Unknown),
        };
        let dims = vec![
            x.dims[0].clone(),
            w.dims[0].clone(),
            out(2, &w.dims[2])?,
            out(3, &w.dims[3])?,
        ];
        let (s, p) = (stride as i64, padding as i64);
        let attrs = vec![
            attr_ints("dilations", &[1, 1]),
            attr_i("group", 1),
            attr_ints("pads", &[p, p, p, p]),
            attr_ints("strides", &[s, s]),
        ];
        let mut inputs = vec![x.name.as_str(), w.name.as_str()];
        if let Some(b) = bias {
            inputs.push(&b.name);
        }
        self.node1("Conv", &inputs, attrs, x.dtype, dims)
    }

    fn add(&self, a: &Value, b: &Value) -> Result<Value> {
        self.binary("Add", a, b, None)
    }

    fn sub(&self, a: &Value, b: &Value) -> Result<Value> {
        self.binary("Sub", a, b, None)
    }

    fn mul(&self, a: &Value, b: &Value) -> Result<Value> {
        self.binary("Mul", a, b, None)
    }

    fn div(&self, a: &Value, b: &Value) -> Result<Value> {
        Self::float_only("div", a)?;
        self.binary("Div", a, b, None)
    }

    fn mul_scalar(&self, x: &Value, s: f64) -> Result<Value> {
        Self::float_only("mul_scalar", x)?;
        let c = self.scalar_like(x, s)?;
        self.binary("Mul", x, &c, None)
    }

    fn add_scalar(&self, x: &Value, s: f64) -> Result<Value> {
        Self::float_only("add_scalar", x)?;
        let c = self.scalar_like(x, s)?;
        self.binary("Add", x, &c, None)
    }

    fn neg(&self, x: &Value) -> Result<Value> {
        self.unary("Neg", x)
    }

    fn exp(&self, x: &Value) -> Result<Value> {
        self.unary("Exp", x)
    }

    fn sqrt(&self, x: &Value) -> Result<Value> {
        self.unary("Sqrt", x)
    }

    fn sigmoid(&self, x: &Value) -> Result<Value> {
        self.unary("Sigmoid", x)
    }

    fn gelu_erf(&self, x: &Value) -> Result<Value> {
        // Opset 17 has no Gelu: 0.5 x (1 + erf(x / sqrt 2)).
        Self::float_only("gelu_erf", x)?;
        let scaled = self.mul_scalar(x, std::f64::consts::FRAC_1_SQRT_2)?;
        let erf = self.unary("Erf", &scaled)?;
        let one_plus = self.add_scalar(&erf, 1.0)?;
        let half_x = self.mul_scalar(x, 0.5)?;
        self.mul(&half_x, &one_plus)
    }

    fn equal(&self, a: &Value, b: &Value) -> Result<Value> {
        self.binary("Equal", a, b, Some(DType::Bool))
    }

    fn less(&self, a: &Value, b: &Value) -> Result<Value> {
        self.binary("Less", a, b, Some(DType::Bool))
    }

    fn greater(&self, a: &Value, b: &Value) -> Result<Value> {
        self.binary("Greater", a, b, Some(DType::Bool))
    }

    fn where_(&self, cond: &Value, a: &Value, b: &Value) -> Result<Value> {
        if cond.dtype != DType::Bool {
            return Err(Error::op(
                "where",
                format!("condition must be Bool, got {:?}", cond.dtype),
            ));
        }
        Self::same_dtype("where", a, b)?;
        let dims = broadcast("where", &[&cond.dims, &a.dims, &b.dims])?;
        self.node1(
            "Where",
            &[&cond.name, &a.name, &b.name],
            vec![],
            a.dtype,
            dims,
        )
    }

    fn cast(&self, x: &Value, dtype: DType) -> Result<Value> {
        if x.dtype == dtype {
            return Ok(x.clone());
        }
        let to = onnx_dtype(dtype) as i64;
        self.node1(
            "Cast",
            &[&x.name],
            vec![attr_i("to", to)],
            dtype,
            x.dims.clone(),
        )
    }

    fn softmax(&self, x: &Value, axis: isize) -> Result<Value> {
        Self::float_only("softmax", x)?;
        let a = norm_axis("softmax", axis, x.rank())?;
        self.node1(
            "Softmax",
            &[&x.name],
            vec![attr_i("axis", a as i64)],
            x.dtype,
            x.dims.clone(),
        )
    }

    fn layer_norm(&self, x: &Value, w: &Value, b: &Value, eps: f64) -> Result<Value> {
        Self::float_only("layer_norm", x)?;
        let n = x.dims.last().cloned().unwrap_or(Dim::Unknown);
        if x.rank() == 0 || w.dims != [n.clone()] || b.dims != [n] {
            return Err(Error::op(
                "layer_norm",
                format!(
                    "weight {} / bias {} must be [last dim] of the input {}",
                    fmt_dims(&w.dims),
                    fmt_dims(&b.dims),
                    fmt_dims(&x.dims)
                ),
            ));
        }
        let attrs = vec![attr_i("axis", -1), attr_f("epsilon", eps as f32)];
        self.node1(
            "LayerNormalization",
            &[&x.name, &w.name, &b.name],
            attrs,
            x.dtype,
            x.dims.clone(),
        )
    }

    fn l2_normalize(&self, x: &Value, axis: isize) -> Result<Value> {
        Self::float_only("l2_normalize", x)?;
        let sq = self.mul(x, x)?;
        let ss = self.reduce_sum(&sq, axis, true)?;
        let norm = self.sqrt(&ss)?;
        let eps = self.scalar_like(x, 1e-12)?;
        let dims = norm.dims.clone();
        let clamped = self.node1("Max", &[&norm.name, &eps.name], vec![], x.dtype, dims)?;
        self.div(x, &clamped)
    }

    fn reduce_sum(&self, x: &Value, axis: isize, keepdim: bool) -> Result<Value> {
        Self::numeric("reduce_sum", x)?;
        let a = norm_axis("reduce_sum", axis, x.rank())?;
        // Opset 13+: ReduceSum takes the axes as an input.
        let axes = self.const_i64(&[a as i64])?;
        let dims = Self::reduce_dims(x, a, keepdim);
        self.node1(
            "ReduceSum",
            &[&x.name, &axes.name],
            vec![attr_i("keepdims", keepdim as i64)],
            x.dtype,
            dims,
        )
    }

    fn reduce_mean(&self, x: &Value, axis: isize, keepdim: bool) -> Result<Value> {
        Self::float_only("reduce_mean", x)?;
        let a = norm_axis("reduce_mean", axis, x.rank())?;
        let attrs = vec![
            attr_ints("axes", &[a as i64]),
            attr_i("keepdims", keepdim as i64),
        ];
        self.node1(
            "ReduceMean",
            &[&x.name],
            attrs,
            x.dtype,
            Self::reduce_dims(x, a, keepdim),
        )
    }

    fn reduce_max(&self, x: &Value, axis: isize, keepdim: bool) -> Result<Value> {
        Self::numeric("reduce_max", x)?;
        let a = norm_axis("reduce_max", axis, x.rank())?;
        let attrs = vec![
            attr_ints("axes", &[a as i64]),
            attr_i("keepdims", keepdim as i64),
        ];
        self.node1(
            "ReduceMax",
            &[&x.name],
            attrs,
            x.dtype,
            Self::reduce_dims(x, a, keepdim),
        )
    }

    fn argmax(&self, x: &Value, axis: isize, keepdim: bool) -> Result<Value> {
        Self::numeric("argmax", x)?;
        let a = norm_axis("argmax", axis, x.rank())?;
        let attrs = vec![
            attr_i("axis", a as i64),
            attr_i("keepdims", keepdim as i64),
            attr_i("select_last_index", 0),
        ];
        self.node1(
            "ArgMax",
            &[&x.name],
            attrs,
            DType::I64,
            Self::reduce_dims(x, a, keepdim),
        )
    }

    fn topk(&self, x: &Value, k: usize) -> Result<(Value, Value)> {
        Self::numeric("topk", x)?;
        let last = x.dims.last().cloned();
        let ok = match &last {
            None => false,
            Some(Dim::Known(n)) => k >= 1 && k <= *n,
            Some(_) => k >= 1,
        };
        if !ok {
            return Err(Error::op(
                "topk",
                format!("k = {k} must be in 1..=last dim of {}", fmt_dims(&x.dims)),
            ));
        }
        let kc = self.const_i64(&[k as i64])?;
        let mut dims = x.dims.clone();
        *dims.last_mut().expect("rank checked") = Dim::Known(k);
        let attrs = vec![
            attr_i("axis", -1),
            attr_i("largest", 1),
            attr_i("sorted", 1),
        ];
        let mut outs = self.node(
            "TopK",
            &[&x.name, &kc.name],
            attrs,
            vec![(x.dtype, dims.clone()), (DType::I64, dims)],
        )?;
        let idx = outs.pop().expect("two outputs");
        let vals = outs.pop().expect("two outputs");
        Ok((vals, idx))
    }

    fn gather(&self, x: &Value, indices: &Value, axis: isize) -> Result<Value> {
        Self::index_only("gather", indices)?;
        let a = norm_axis("gather", axis, x.rank())?;
        let mut dims = x.dims[..a].to_vec();
        dims.extend_from_slice(&indices.dims);
        dims.extend_from_slice(&x.dims[a + 1..]);
        self.node1(
            "Gather",
            &[&x.name, &indices.name],
            vec![attr_i("axis", a as i64)],
            x.dtype,
            dims,
        )
    }

    fn gather_elements(&self, x: &Value, indices: &Value, axis: isize) -> Result<Value> {
        Self::index_only("gather_elements", indices)?;
        let a = norm_axis("gather_elements", axis, x.rank())?;
        if indices.rank() != x.rank() {
            return Err(Error::op(
                "gather_elements",
                format!(
                    "indices {} must have the rank of x {}",
                    fmt_dims(&indices.dims),
                    fmt_dims(&x.dims)
                ),
            ));
        }
        for (i, (dx, di)) in x.dims.iter().zip(&indices.dims).enumerate() {
            if let (Some(dx), Some(di)) = (dx.known(), di.known()) {
                if i != a && di > dx {
                    return Err(Error::op(
                        "gather_elements",
                        format!(
                            "indices {} larger than x {} on axis {i}",
                            fmt_dims(&indices.dims),
                            fmt_dims(&x.dims)
                        ),
                    ));
                }
            }
        }
        self.node1(
            "GatherElements",
            &[&x.name, &indices.name],
            vec![attr_i("axis", a as i64)],
            x.dtype,
            indices.dims.clone(),
        )
    }

    fn reshape(&self, x: &Value, shape: &[i64]) -> Result<Value> {
        let dims = reshape_dims("reshape", &x.dims, shape)?;
        let s = self.const_i64(shape)?;
        self.node1("Reshape", &[&x.name, &s.name], vec![], x.dtype, dims)
    }

    fn permute(&self, x: &Value, perm: &[usize]) -> Result<Value> {
        let mut seen = vec![false; x.rank()];
        let valid = perm.len() == x.rank()
            && perm
                .iter()
                .all(|&p| p < x.rank() && !std::mem::replace(&mut seen[p], true));
        if !valid {
            return Err(Error::op(
                "permute",
                format!("{perm:?} is not a permutation of 0..{}", x.rank()),
            ));
        }
        let dims = perm.iter().map(|&p| x.dims[p].clone()).collect();
        let p: Vec<i64> = perm.iter().map(|&p| p as i64).collect();
        self.node1(
            "Transpose",
            &[&x.name],
            vec![attr_ints("perm", &p)],
            x.dtype,
            dims,
        )
    }

    fn concat(&self, xs: &[&Value], axis: isize) -> Result<Value> {
        let first = xs.first().ok_or_else(|| Error::op("concat", "no inputs"))?;
        let a = norm_axis("concat", axis, first.rank())?;
        let mut dims = first.dims.clone();
        let mut total = Some(0usize);
        for x in xs {
            Self::same_dtype("concat", first, x)?;
            if x.rank() != first.rank() {
                return Err(Error::op("concat", "inputs differ in rank"));
            }
            for (i, (d, e)) in dims.iter_mut().zip(&x.dims).enumerate() {
                if i == a {
                    continue;
                }
                match (d.known(), e.known()) {
                    (Some(p), Some(q)) if p != q => {
                        return Err(Error::op(
                            "concat",
                            format!(
                                "{} vs {} differ on axis {i}",
                                fmt_dims(&first.dims),
                                fmt_dims(&x.dims)
                            ),
                        ))
                    }
                    (None, Some(q)) => *d = Dim::Known(q),
                    _ => {}
                }
            }
            total = match (total, x.dims[a].known()) {
                (Some(t), Some(k)) => Some(t + k),
                _ => None,
            };
        }
        dims[a] = total.map_or(Dim::Unknown, Dim::Known);
        let names: Vec<&str> = xs.iter().map(|x| x.name.as_str()).collect();
        self.node1(
            "Concat",
            &names,
            vec![attr_i("axis", a as i64)],
            first.dtype,
            dims,
        )
    }

    fn narrow(&self, x: &Value, axis: isize, start: usize, len: usize) -> Result<Value> {
        let a = norm_axis("narrow", axis, x.rank())?;
        if let Some(d) = x.dims[a].known() {
            if start + len > d {
                return Err(Error::op(
                    "narrow",
                    format!(
                        "{start}..{} out of range for axis {a} of {}",
                        start + len,
                        fmt_dims(&x.dims)
                    ),
                ));
            }
        }
        let starts = self.const_i64(&[start as i64])?;
        let ends = self.const_i64(&[(start + len) as i64])?;
        let axes = self.const_i64(&[a as i64])?;
        let mut dims = x.dims.clone();
        dims[a] = Dim::Known(len);
        self.node1(
            "Slice",
            &[&x.name, &starts.name, &ends.name, &axes.name],
            vec![],
            x.dtype,
            dims,
        )
    }

    fn unsqueeze(&self, x: &Value, axis: isize) -> Result<Value> {
        let a = norm_axis("unsqueeze", axis, x.rank() + 1)?;
        let axes = self.const_i64(&[a as i64])?;
        let mut dims = x.dims.clone();
        dims.insert(a, Dim::Known(1));
        self.node1("Unsqueeze", &[&x.name, &axes.name], vec![], x.dtype, dims)
    }

    fn squeeze(&self, x: &Value, axis: isize) -> Result<Value> {
        let a = norm_axis("squeeze", axis, x.rank())?;
        if x.dims[a] != Dim::Known(1) {
            return Err(Error::op(
                "squeeze",
                format!("axis {axis} of {} is not statically 1", fmt_dims(&x.dims)),
            ));
        }
        let axes = self.const_i64(&[a as i64])?;
        let mut dims = x.dims.clone();
        dims.remove(a);
        self.node1("Squeeze", &[&x.name, &axes.name], vec![], x.dtype, dims)
    }

    fn expand(&self, x: &Value, shape: &[usize]) -> Result<Value> {
        let target: Vec<Dim> = shape.iter().map(|&d| Dim::Known(d)).collect();
        let dims = broadcast("expand", &[&x.dims, &target])?;
        let s: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let s = self.const_i64(&s)?;
        self.node1("Expand", &[&x.name, &s.name], vec![], x.dtype, dims)
    }

    fn pad(&self, x: &Value, axis: isize, before: usize, after: usize) -> Result<Value> {
        let a = norm_axis("pad", axis, x.rank())?;
        // Opset 13-17 Pad: pads = [x1_begin, x2_begin, .., x1_end, x2_end, ..], zeros by default.
        let r = x.rank();
        let mut pads = vec![0i64; 2 * r];
        pads[a] = before as i64;
        pads[r + a] = after as i64;
        let p = self.const_i64(&pads)?;
        let mut dims = x.dims.clone();
        dims[a] = match x.dims[a].known() {
            Some(d) => Dim::Known(d + before + after),
            None => Dim::Unknown,
        };
        self.node1("Pad", &[&x.name, &p.name], vec![], x.dtype, dims)
    }
}
