//! ONNX export of code written against [`capt_graph::Ops`].
//!
//! [`OnnxBuilder`] implements `Ops` by recording ONNX nodes (opset 17, IR 8) instead of
//! computing, so the generic CAPT inference path that candle runs in training is the graph that
//! gets exported. [`write_model`] writes it deterministically and atomically (external data
//! above 2 GB), [`read_model`] loads it back with clear errors for truncated / corrupt files,
//! and [`run_tract`] executes it for parity tests. The protobuf types are `tract_onnx::pb`
//! (re-exported as [`pb`]), encoded with prost. [`quantize_weights_int8`] stores linear
//! weights as int8, [`to_f16_compute`] turns a float32 graph into float16 compute with a
//! float32 interface, and [`read_params`] reads a graph's parameters back.

mod builder;
mod error;
mod f16;
mod io;
mod quant;
mod tract_run;
mod value;

pub use builder::{BuildOptions, ModelMeta, OnnxBuilder, IR_VERSION, OPSET};
pub use error::{Error, Result};
pub use f16::{to_f16_compute, F16Options, F16Report, DEFAULT_KEEP_F32};
pub use io::{
    decode_model, external_data_path, read_model, validate, write_model, ExternalData,
    WriteOptions, Written, EXTERNAL_ALIGN, EXTERNAL_MIN_BYTES, FILE_BYTES_KEY, PRODUCER,
    PROTOBUF_LIMIT,
};
pub use quant::{
    quantize_dynamic_int8, quantize_weights_int8, read_params, QuantReport, INT8_MIN_ELEMS,
    QT_SCALE_SUFFIX, QT_SUFFIX, QT_ZP_SUFFIX, SCALE_SUFFIX,
};
pub use tract_onnx::pb;
pub use tract_run::{run_tract, run_tract_model, tract_value_types};
pub use value::{Dim, Value};
