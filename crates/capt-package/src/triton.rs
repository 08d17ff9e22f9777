//! `--format triton`: a Triton Inference Server model repository.
//!
//! ```text
//! OUT/capt_classifier/{config.pbtxt, labels.txt, capt.json, 1/model.onnx}
//! OUT/capt_text_encoder/{config.pbtxt, 1/model.onnx}      (when exported)
//! OUT/capt_image_encoder/{config.pbtxt, 1/model.onnx}     (when exported)
//! ```
//! Each model runs on Triton's onnxruntime backend with dynamic batching.

use std::fmt::Write as _;
use std::path::Path;

use capt_onnx::WriteOptions;

use capt_backend::Precision;

use crate::error::{io, Result};
use crate::io_names::*;
use crate::write::{manifest, write_manifest, Graph, Package};

/// Largest batch Triton forms; requests are coalesced up to it.
pub const MAX_BATCH: usize = 32;

fn tensor(name: &str, dtype: &str, dims: &[usize], labels: bool) -> String {
    let dims: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    let mut s = format!(
        "  {{\n    name: \"{name}\"\n    data_type: {dtype}\n    dims: [ {} ]\n",
        dims.join(", ")
    );
    if labels {
        s.push_str("    label_filename: \"labels.txt\"\n");
    }
    s.push_str("  }");
    s
}

/// `config.pbtxt` of one model.
pub fn config_pbtxt(name: &str, inputs: &[String], outputs: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "name: \"{name}\"");
    let _ = writeln!(s, "backend: \"onnxruntime\"");
    let _ = writeln!(s, "max_batch_size: {MAX_BATCH}");
    let _ = writeln!(s, "input [\n{}\n]", inputs.join(",\n"));
    let _ = writeln!(s, "output [\n{}\n]", outputs.join(",\n"));
    let _ = writeln!(
        s,
        "dynamic_batching {{\n  preferred_batch_size: [ 8, 16 ]\n  max_queue_delay_microseconds: 2000\n}}"
    );
    let _ = writeln!(s, "instance_group [\n  {{\n    kind: KIND_AUTO\n  }}\n]");
    s
}

/// Writes the repository into `dir`; returns (relative path, bytes) of each file.
pub fn write_repository(
    src: &Package,
    graphs: &[Graph],
    dir: &Path,
    precision: Precision,
) -> Result<Vec<(String, u64)>> {
    let spec = &src.spec;
    let (s, d, c) = (
        spec.clip.vision.image_size,
        spec.clip.projection_dim,
        src.class_names.len(),
    );
    let g = spec.local_grid * spec.local_grid;
    let mut files = Vec::new();
    for graph in graphs {
        let name = format!("capt_{}", graph.role);
        let mdir = dir.join(&name);
        let vdir = mdir.join("1");
        std::fs::create_dir_all(&vdir).map_err(io(&vdir))?;
        let w = capt_onnx::write_model(
            &vdir.join("model.onnx"),
            &graph.model,
            &WriteOptions::default(),
        )?;
        files.push((format!("{name}/1/model.onnx"), w.model_bytes));
        let pixel = tensor(PIXEL_VALUES, "TYPE_FP32", &[3, s, s], false);
        let (inputs, outputs) = match graph.role {
            CLASSIFIER => (
                vec![pixel],
                vec![
                    tensor(LOGITS, "TYPE_FP32", &[c], true),
                    tensor(PROBS, "TYPE_FP32", &[c], true),
                ],
            ),
            IMAGE_ENCODER => (
                vec![pixel],
                vec![
                    tensor(IMAGE_EMBEDS, "TYPE_FP32", &[d], false),
                    tensor(GLOBAL, "TYPE_FP32", &[d], false),
                    tensor(LOCAL, "TYPE_FP32", &[g, d], false),
                ],
            ),
            _ => (
                vec![tensor(
                    INPUT_IDS,
                    "TYPE_INT64",
                    &[spec.clip.text.max_position_embeddings],
                    false,
                )],
                spec.text
                    .families
                    .iter()
                    .map(|f| tensor(f.output(), "TYPE_FP32", &[d], false))
                    .collect(),
            ),
        };
        let cfg = config_pbtxt(&name, &inputs, &outputs);
        let p = mdir.join("config.pbtxt");
        std::fs::write(&p, &cfg).map_err(io(&p))?;
        files.push((format!("{name}/config.pbtxt"), cfg.len() as u64));
        if graph.role == CLASSIFIER {
            let labels = src.class_names.join("\n") + "\n";
            let p = mdir.join("labels.txt");
            std::fs::write(&p, &labels).map_err(io(&p))?;
            files.push((format!("{name}/labels.txt"), labels.len() as u64));
            // The manifest as capt-edge reads it, pointing at the classifier file.
            let m = manifest(
                src,
                &mdir,
                &[(CLASSIFIER, "1/model.onnx".into())],
                precision,
            )?;
            files.push((format!("{name}/capt.json"), write_manifest(&mdir, &m)?));
        }
    }
    Ok(files)
}
