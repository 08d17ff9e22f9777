//! Writing and reading `.onnx` files: atomic writes, external data for models over the 2 GB
//! protobuf limit, and a reader that turns truncated / corrupt files into clear errors.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;
use tract_onnx::pb;

use crate::{Error, Result};

/// Protobuf messages cannot exceed 2 GiB; stay a little below.
pub const PROTOBUF_LIMIT: usize = (i32::MAX as usize) - (16 << 20);
/// Tensors smaller than this stay inline when writing external data (onnx's default).
pub const EXTERNAL_MIN_BYTES: usize = 1024;
/// External tensors start at multiples of this (page size; lets runtimes mmap them).
pub const EXTERNAL_ALIGN: u64 = 4096;

/// `producer_name` of models built by [`crate::OnnxBuilder`]; the reader requires the
/// file-size entry on these.
pub const PRODUCER: &str = "capt-onnx";
/// `metadata_props` key the writer appends last: the model file's own size, 20 digits.
/// A file cut at a protobuf field boundary still decodes; this entry makes any truncation of
/// a capt-written file (or bytes appended to it) detectable.
pub const FILE_BYTES_KEY: &str = "capt.file_bytes";

/// Where initializer bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExternalData {
    /// Inline unless the model would exceed [`PROTOBUF_LIMIT`].
    #[default]
    Auto,
    /// Always write tensors of at least [`EXTERNAL_MIN_BYTES`] to `<file>.data`.
    Always,
    /// Always inline; a model over the limit is an error.
    Never,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOptions {
    pub external_data: ExternalData,
}

/// What [`write_model`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub model_path: PathBuf,
    pub model_bytes: u64,
    /// The external data file and its size, when one was written.
    pub data: Option<(PathBuf, u64)>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `path` atomically through `fill` ([`capt_core::fs::write_atomic_with`]).
fn write_atomic(path: &Path, fill: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    capt_core::fs::write_atomic_with(path, fill).map_err(io_err(path))
}

/// The external data file of `model_path`: `<file name>.data` beside it.
pub fn external_data_path(model_path: &Path) -> PathBuf {
    let mut name = model_path.file_name().unwrap_or_default().to_os_string();
    name.push(".data");
    model_path.with_file_name(name)
}

/// Writes `model` to `path` (atomically). With external data, tensors of at least
/// [`EXTERNAL_MIN_BYTES`] go to `<file>.data` at 4096-aligned offsets, referenced by
/// `TensorProto.external_data` (`location` relative to the model, `offset`, `length`) and
/// `data_location = EXTERNAL`; the data file is renamed into place before the model.
/// The same model always gives the same bytes.
pub fn write_model(path: &Path, model: &pb::ModelProto, opts: &WriteOptions) -> Result<Written> {
    let inline_len = model.encoded_len();
    let external = match opts.external_data {
        ExternalData::Always => true,
        ExternalData::Never => false,
        ExternalData::Auto => inline_len > PROTOBUF_LIMIT,
    };
    if !external {
        if inline_len > PROTOBUF_LIMIT {
            return Err(Error::TooLarge {
                path: path.to_path_buf(),
                msg: format!(
                    "model is {inline_len} bytes, over the 2 GB protobuf limit; write it with external data (ExternalData::Auto)"
                ),
            });
        }
        let bytes = encode_with_size(model);
        write_atomic(path, |f| f.write_all(&bytes))?;
        tracing::debug!(path = %path.display(), bytes = bytes.len(), "wrote ONNX model");
        return Ok(Written {
            model_path: path.to_path_buf(),
            model_bytes: bytes.len() as u64,
            data: None,
        });
    }

    let data_path = external_data_path(path);
    let location = data_path
        .file_name()
        .expect("derived from a file name")
        .to_string_lossy()
        .into_owned();
    let graph = model.graph.as_ref().ok_or_else(|| Error::Invalid {
        path: path.to_path_buf(),
        msg: "model has no graph".into(),
    })?;
    // Plan offsets, then stream the bytes; the light model copy holds no tensor data.
    let mut stripped = Vec::with_capacity(graph.initializer.len());
    let mut placed: Vec<(u64, &[u8])> = vec![];
    let mut offset = 0u64;
    for t in &graph.initializer {
        if t.raw_data.len() < EXTERNAL_MIN_BYTES {
            stripped.push(t.clone());
            continue;
        }
        offset = offset.div_ceil(EXTERNAL_ALIGN) * EXTERNAL_ALIGN;
        let len = t.raw_data.len() as u64;
        let entry = |k: &str, v: String| pb::StringStringEntryProto {
            key: k.into(),
            value: v,
        };
        stripped.push(pb::TensorProto {
            raw_data: vec![],
            data_location: Some(pb::tensor_proto::DataLocation::External as i32),
            external_data: vec![
                entry("location", location.clone()),
                entry("offset", offset.to_string()),
                entry("length", len.to_string()),
            ],
            ..tensor_header(t)
        });
        placed.push((offset, &t.raw_data));
        offset += len;
    }
    let data_len = offset;
    write_atomic(&data_path, |f| {
        let mut pos = 0u64;
        let zeros = [0u8; EXTERNAL_ALIGN as usize];
        for (off, bytes) in &placed {
            f.write_all(&zeros[..(off - pos) as usize])?;
            f.write_all(bytes)?;
            pos = off + bytes.len() as u64;
        }
        Ok(())
    })?;
    let light = pb::ModelProto {
        graph: Some(pb::GraphProto {
            initializer: stripped,
            ..graph_without_initializers(graph)
        }),
        ..model_without_graph(model)
    };
    if light.encoded_len() > PROTOBUF_LIMIT {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            msg: "even without tensor data the graph exceeds 2 GB".into(),
        });
    }
    let bytes = encode_with_size(&light);
    write_atomic(path, |f| f.write_all(&bytes))?;
    tracing::debug!(path = %path.display(), bytes = bytes.len(), data = data_len, "wrote ONNX model + external data");
    Ok(Written {
        model_path: path.to_path_buf(),
        model_bytes: bytes.len() as u64,
        data: Some((data_path, data_len)),
    })
}

/// Encodes `model` and appends the [`FILE_BYTES_KEY`] entry (protobuf concatenation appends
/// to the repeated `metadata_props`, field 14, the last field prost writes). The value has a
/// fixed width, so the total size is known before it is written.
fn encode_with_size(model: &pb::ModelProto) -> Vec<u8> {
    let stripped;
    let model = if model.metadata_props.iter().any(|e| e.key == FILE_BYTES_KEY) {
        let mut m = model_without_graph(model);
        m.graph = model.graph.clone();
        m.metadata_props.retain(|e| e.key != FILE_BYTES_KEY);
        stripped = m;
        &stripped
    } else {
        model
    };
    let entry = |n: usize| pb::StringStringEntryProto {
        key: FILE_BYTES_KEY.into(),
        value: format!("{n:020}"),
    };
    let mut bytes = model.encode_to_vec();
    let mut tail = vec![];
    prost::encoding::message::encode(14, &entry(0), &mut tail);
    let total = bytes.len() + tail.len();
    tail.clear();
    prost::encoding::message::encode(14, &entry(total), &mut tail);
    bytes.extend_from_slice(&tail);
    debug_assert_eq!(bytes.len(), total);
    bytes
}

// Copies that skip the bulky fields (tensor data, initializers).

fn tensor_header(t: &pb::TensorProto) -> pb::TensorProto {
    pb::TensorProto {
        dims: t.dims.clone(),
        data_type: t.data_type,
        segment: t.segment.clone(),
        name: t.name.clone(),
        doc_string: t.doc_string.clone(),
        ..Default::default()
    }
}

fn graph_without_initializers(g: &pb::GraphProto) -> pb::GraphProto {
    pb::GraphProto {
        node: g.node.clone(),
        name: g.name.clone(),
        initializer: vec![],
        sparse_initializer: g.sparse_initializer.clone(),
        doc_string: g.doc_string.clone(),
        input: g.input.clone(),
        output: g.output.clone(),
        value_info: g.value_info.clone(),
        quantization_annotation: g.quantization_annotation.clone(),
    }
}

fn model_without_graph(m: &pb::ModelProto) -> pb::ModelProto {
    pb::ModelProto {
        ir_version: m.ir_version,
        opset_import: m.opset_import.clone(),
        producer_name: m.producer_name.clone(),
        producer_version: m.producer_version.clone(),
        domain: m.domain.clone(),
        model_version: m.model_version,
        doc_string: m.doc_string.clone(),
        graph: None,
        metadata_props: m.metadata_props.clone(),
        training_info: m.training_info.clone(),
        functions: m.functions.clone(),
    }
}

/// Reads and checks an `.onnx` file. Truncated or corrupt files give [`Error::Decode`] or
/// [`Error::Invalid`] naming the file (protobuf cut at a field boundary still decodes, so the
/// structure is checked too: IR version and default opset present, every node input defined
/// before use, every output produced, inline tensor sizes consistent, external data present).
pub fn read_model(path: &Path) -> Result<pb::ModelProto> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    decode_model(path, &bytes)
}

/// [`read_model`] on bytes already in memory (`path` names them in errors and locates
/// external data).
pub fn decode_model(path: &Path, bytes: &[u8]) -> Result<pb::ModelProto> {
    let model = pb::ModelProto::decode(bytes).map_err(|source| Error::Decode {
        path: path.to_path_buf(),
        source,
    })?;
    check_file_size(path, &model, bytes.len())?;
    validate(path, &model)?;
    Ok(model)
}

fn check_file_size(path: &Path, model: &pb::ModelProto, len: usize) -> Result<()> {
    let invalid = |msg: String| Error::Invalid {
        path: path.to_path_buf(),
        msg,
    };
    match model
        .metadata_props
        .iter()
        .rfind(|e| e.key == FILE_BYTES_KEY)
    {
        Some(e) => {
            let want: usize = e
                .value
                .parse()
                .map_err(|_| invalid(format!("bad {FILE_BYTES_KEY} entry `{}`", e.value)))?;
            if want != len {
                return Err(invalid(format!(
                    "the file has {len} bytes but was written with {want}"
                )));
            }
        }
        None if model.producer_name == PRODUCER => {
            return Err(invalid(format!(
                "written by {PRODUCER} but its {FILE_BYTES_KEY} entry (the last bytes) is missing"
            )));
        }
        None => {}
    }
    Ok(())
}

fn elem_size(data_type: i32) -> Option<usize> {
    use pb::tensor_proto::DataType as P;
    Some(match P::try_from(data_type).ok()? {
        P::Float | P::Int32 | P::Uint32 => 4,
        P::Double | P::Int64 | P::Uint64 => 8,
        P::Float16 | P::Bfloat16 | P::Int16 | P::Uint16 => 2,
        P::Bool | P::Int8 | P::Uint8 => 1,
        _ => return None,
    })
}

/// The structural checks of [`read_model`] on an in-memory model (`path` is used for
/// messages and to locate external data).
pub fn validate(path: &Path, model: &pb::ModelProto) -> Result<()> {
    let invalid = |msg: String| Error::Invalid {
        path: path.to_path_buf(),
        msg,
    };
    if model.ir_version <= 0 {
        return Err(invalid("ir_version is missing".into()));
    }
    if !model
        .opset_import
        .iter()
        .any(|o| o.domain.is_empty() || o.domain == "ai.onnx")
    {
        return Err(invalid("no default-domain opset_import".into()));
    }
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| invalid("the model has no graph".into()))?;
    if graph.output.is_empty() {
        return Err(invalid("the graph has no outputs".into()));
    }
    let mut defined: HashSet<&str> = HashSet::new();
    defined.extend(graph.input.iter().map(|i| i.name.as_str()));
    for t in &graph.initializer {
        defined.insert(t.name.as_str());
        let count: i64 = t.dims.iter().product();
        let external = t.data_location == Some(pb::tensor_proto::DataLocation::External as i32);
        if external {
            check_external(path, t).map_err(invalid)?;
        } else if let Some(size) = elem_size(t.data_type) {
            let inline = if !t.raw_data.is_empty() {
                t.raw_data.len()
            } else {
                size * (t.float_data.len()
                    + t.int32_data.len()
                    + t.int64_data.len()
                    + t.double_data.len()
                    + t.uint64_data.len())
            };
            if inline != count as usize * size {
                return Err(invalid(format!(
                    "initializer `{}` has {inline} bytes of data, dims {:?} need {}",
                    t.name,
                    t.dims,
                    count as usize * size
                )));
            }
        }
    }
    for n in &graph.node {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            if !defined.contains(i.as_str()) {
                return Err(invalid(format!(
                    "node `{}` ({}) reads `{i}`, which is not defined before it",
                    n.name, n.op_type
                )));
            }
        }
        defined.extend(n.output.iter().map(|o| o.as_str()));
    }
    for o in &graph.output {
        if !defined.contains(o.name.as_str()) {
            return Err(invalid(format!(
                "graph output `{}` is never produced",
                o.name
            )));
        }
    }
    Ok(())
}

fn check_external(model_path: &Path, t: &pb::TensorProto) -> std::result::Result<(), String> {
    let get = |k: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.as_str())
    };
    let location =
        get("location").ok_or_else(|| format!("external tensor `{}` has no location", t.name))?;
    let parse = |k: &str| -> std::result::Result<u64, String> {
        get(k)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|e| format!("tensor `{}` {k} `{v}`: {e}", t.name))
            })
            .transpose()
            .map(|v| v.unwrap_or(0))
    };
    let (offset, length) = (parse("offset")?, parse("length")?);
    let data = model_path.parent().unwrap_or(Path::new(".")).join(location);
    let size = std::fs::metadata(&data)
        .map_err(|e| {
            format!(
                "external data file {} of tensor `{}`: {e}",
                data.display(),
                t.name
            )
        })?
        .len();
    if offset + length > size {
        return Err(format!(
            "tensor `{}` needs bytes {offset}..{} of {}, which has {size}",
            t.name,
            offset + length,
            data.display()
        ));
    }
    Ok(())
}
