//! One source of truth for the CAPT inference path.
//!
//! The CLIP image encoder and the CAPT head are written once, generic over the small
//! [`Ops`] trait. [`CandleOps`] executes them eagerly in candle (training, with autograd;
//! parity tests), and `capt_onnx::OnnxBuilder` records the very same calls as an ONNX graph
//! (export to `classifier.onnx`). Parity tests run both and compare.

#[cfg(feature = "candle")]
mod candle;
mod error;
mod host;
mod ops;

#[cfg(feature = "candle")]
pub use crate::candle::CandleOps;
pub use error::{Error, Result};
pub use host::{DType, HostData, HostTensor};
pub use ops::{adaptive_pool_matrix, broadcast_shape, norm_axis, resolve_reshape, Ops};
