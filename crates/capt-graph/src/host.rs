//! Element types and host-side tensors (the backend-neutral way to hand constants and
//! parameters to an [`crate::Ops`] backend).

use crate::{Error, Result};

/// Element type of a value flowing through [`crate::Ops`].
///
/// Float compute is `F32` (export, inference) or `F64` (gradient checks); indices are always
/// `I64` (ONNX's index type); masks are `Bool` (candle stores them as `u8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    I64,
    Bool,
}

impl DType {
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64)
    }
}

/// Row-major element storage of a [`HostTensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

impl HostData {
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::F64(v) => v.len(),
            HostData::I64(v) => v.len(),
            HostData::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::F64(_) => DType::F64,
            HostData::I64(_) => DType::I64,
            HostData::Bool(_) => DType::Bool,
        }
    }
}

/// A dense row-major tensor in host memory. Rank 0 (`dims == []`) is a scalar.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    dims: Vec<usize>,
    data: HostData,
}

impl HostTensor {
    /// Checks that `data` has `prod(dims)` elements.
    pub fn new(dims: Vec<usize>, data: HostData) -> Result<Self> {
        let expected: usize = dims.iter().product();
        if expected != data.len() {
            return Err(Error::HostData {
                dims,
                expected,
                got: data.len(),
            });
        }
        Ok(Self { dims, data })
    }

    pub fn f32(dims: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        Self::new(dims, HostData::F32(data))
    }

    pub fn f64(dims: Vec<usize>, data: Vec<f64>) -> Result<Self> {
        Self::new(dims, HostData::F64(data))
    }

    pub fn i64(dims: Vec<usize>, data: Vec<i64>) -> Result<Self> {
        Self::new(dims, HostData::I64(data))
    }

    pub fn bool(dims: Vec<usize>, data: Vec<bool>) -> Result<Self> {
        Self::new(dims, HostData::Bool(data))
    }

    /// `[0, 1, .., n-1]` as I64, shape `[n]`.
    pub fn range_i64(n: usize) -> Self {
        Self {
            dims: vec![n],
            data: HostData::I64((0..n as i64).collect()),
        }
    }

    /// A rank-0 F32 scalar.
    pub fn scalar_f32(v: f32) -> Self {
        Self {
            dims: vec![],
            data: HostData::F32(vec![v]),
        }
    }

    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    pub fn data(&self) -> &HostData {
        &self.data
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn elem_count(&self) -> usize {
        self.data.len()
    }

    /// The elements when the tensor is F32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            HostData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The elements when the tensor is I64.
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            HostData::I64(v) => Some(v),
            _ => None,
        }
    }

    #[cfg(feature = "candle")]
    /// Copies a candle tensor to the host. `U8` becomes `Bool` (candle's mask type), `U32`
    /// becomes `I64`; `F16`/`BF16` become `F32`.
    pub fn from_candle(t: &candle_core::Tensor) -> Result<Self> {
        use crate::error::CandleCtx;
        use candle_core::DType as C;
        let dims = t.dims().to_vec();
        let flat = t.flatten_all().ctx("HostTensor::from_candle")?;
        let data = match t.dtype() {
            C::F64 => HostData::F64(flat.to_vec1::<f64>().ctx("HostTensor::from_candle")?),
            C::F32 | C::F16 | C::BF16 => HostData::F32(
                flat.to_dtype(C::F32)
                    .and_then(|f| f.to_vec1::<f32>())
                    .ctx("HostTensor::from_candle")?,
            ),
            C::I64 | C::U32 => HostData::I64(
                flat.to_dtype(C::I64)
                    .and_then(|f| f.to_vec1::<i64>())
                    .ctx("HostTensor::from_candle")?,
            ),
            C::U8 => HostData::Bool(
                flat.to_vec1::<u8>()
                    .ctx("HostTensor::from_candle")?
                    .into_iter()
                    .map(|v| v != 0)
                    .collect(),
            ),
            other => {
                return Err(Error::op(
                    "HostTensor::from_candle",
                    format!("unsupported candle dtype {other:?}"),
                ))
            }
        };
        Self::new(dims, data)
    }

    #[cfg(feature = "candle")]
    /// Builds a candle tensor; float data is converted to `float_dtype` (F32 or F64).
    pub fn to_candle(
        &self,
        device: &candle_core::Device,
        float_dtype: candle_core::DType,
    ) -> Result<candle_core::Tensor> {
        use crate::error::CandleCtx;
        use candle_core::Tensor;
        let dims = self.dims.as_slice();
        let t = match &self.data {
            HostData::F32(v) => Tensor::from_slice(v, dims, device)
                .and_then(|t| t.to_dtype(float_dtype))
                .ctx("HostTensor::to_candle")?,
            HostData::F64(v) => Tensor::from_slice(v, dims, device)
                .and_then(|t| t.to_dtype(float_dtype))
                .ctx("HostTensor::to_candle")?,
            HostData::I64(v) => Tensor::from_slice(v, dims, device).ctx("HostTensor::to_candle")?,
            HostData::Bool(v) => {
                let u: Vec<u8> = v.iter().map(|&b| b as u8).collect();
                Tensor::from_slice(&u, dims, device).ctx("HostTensor::to_candle")?
            }
        };
        Ok(t)
    }
}
