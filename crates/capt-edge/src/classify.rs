//! `capt-edge classify`: files, folders (recursively, image extensions only) and `-` (stdin),
//! classified in batches; one line (or one JSON object) per image. A bad image is reported
//! with its path and the run goes on; the exit status says whether all succeeded.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use capt_backend::{top_k, ImageBatch};
use serde_json::json;

use crate::engine::{Engine, EngineArgs};

#[derive(Debug, Clone, clap::Args)]
pub struct ClassifyArgs {
    /// Exported model directory (contains capt.json and classifier.onnx).
    #[arg(long)]
    pub model: PathBuf,
    /// Image files, folders (searched recursively), or `-` for one image on stdin.
    #[arg(required = true, value_name = "IMAGES")]
    pub images: Vec<String>,
    /// Labels to print per image.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Print one JSON object per image (JSON Lines) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Images per backend call.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
}

const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "bmp"];

/// One input to classify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Stdin,
    File(PathBuf),
}

impl Source {
    fn name(&self) -> String {
        match self {
            Self::Stdin => "-".into(),
            Self::File(p) => p.display().to_string(),
        }
    }
}

/// Expands the command-line inputs; errors name the missing path.
pub fn expand_inputs(items: &[String]) -> anyhow::Result<Vec<Source>> {
    let mut out = Vec::new();
    let mut stdin_seen = false;
    for item in items {
        if item == "-" {
            anyhow::ensure!(!stdin_seen, "`-` (stdin) can be given only once");
            stdin_seen = true;
            out.push(Source::Stdin);
            continue;
        }
        let p = Path::new(item);
        if p.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found)?;
            found.sort();
            if found.is_empty() {
                tracing::warn!(dir = %p.display(), "folder has no {} files", IMAGE_EXTENSIONS.join("/"));
            }
            out.extend(found.into_iter().map(Source::File));
        } else if p.is_file() {
            out.push(Source::File(p.to_path_buf()));
        } else {
            anyhow::bail!(
                "{item} does not exist (expected an image file, a folder or `-` for stdin)"
            );
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot list folder {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Runs the subcommand; returns whether every image was classified.
pub fn run(args: &ClassifyArgs, out: &mut dyn Write) -> anyhow::Result<bool> {
    anyhow::ensure!(args.top_k >= 1, "--top-k must be at least 1");
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    let sources = expand_inputs(&args.images)?;
    anyhow::ensure!(
        !sources.is_empty(),
        "no images found in {}",
        args.images.join(" ")
    );
    let engine = Engine::load(&args.model, &args.engine)?;
    let pre = engine.model.manifest.preprocess.clone();
    let names = &engine.model.manifest.class_names;
    let crop = pre.crop as usize;
    let k = args.top_k.min(names.len());
    let mut all_ok = true;

    for chunk in sources.chunks(args.batch) {
        let mut ok_names = Vec::new();
        let mut data = Vec::new();
        for src in chunk {
            let decoded = match src {
                Source::Stdin => {
                    let mut bytes = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut bytes)
                        .map_err(|e| anyhow::anyhow!("cannot read stdin: {e}"))
                        .and_then(|_| Ok(pre.preprocess_bytes(&bytes, "stdin")?))
                }
                Source::File(p) => pre.preprocess_file(p).map_err(anyhow::Error::from),
            };
            match decoded {
                Ok(pixels) => {
                    data.extend(pixels);
                    ok_names.push(src.name());
                }
                Err(e) => {
                    all_ok = false;
                    report_error(out, args.json, &src.name(), &e.to_string())?;
                }
            }
        }
        if ok_names.is_empty() {
            continue;
        }
        let batch = ImageBatch {
            data,
            n: ok_names.len(),
            height: crop,
            width: crop,
        };
        let scores = engine.backend.classify(&batch)?;
        for (i, name) in ok_names.iter().enumerate() {
            let top = top_k(scores.probs_row(i), k);
            if args.json {
                let labels: Vec<_> = top
                    .iter()
                    .map(|(c, p)| json!({"label": names[*c], "class_index": c, "probability": p, "logit": scores.logits_row(i)[*c]}))
                    .collect();
                writeln!(out, "{}", json!({"image": name, "top_k": labels}))?;
            } else {
                let labels: Vec<String> = top
                    .iter()
                    .map(|(c, p)| format!("{} ({p:.4})", names[*c]))
                    .collect();
                writeln!(out, "{name}: {}", labels.join(", "))?;
            }
        }
        out.flush()?;
    }
    Ok(all_ok)
}

fn report_error(out: &mut dyn Write, json: bool, name: &str, msg: &str) -> std::io::Result<()> {
    if json {
        writeln!(out, "{}", json!({"image": name, "error": msg}))
    } else {
        eprintln!("error: {msg}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_folders_recursively_and_sorted() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        for f in ["b.PNG", "a.jpg", "sub/c.webp", "notes.txt"] {
            std::fs::write(d.path().join(f), b"x").unwrap();
        }
        let got = expand_inputs(&[d.path().display().to_string(), "-".into()]).unwrap();
        let names: Vec<String> = got
            .iter()
            .map(|s| match s {
                Source::File(p) => p.strip_prefix(d.path()).unwrap().display().to_string(),
                Source::Stdin => "-".into(),
            })
            .collect();
        assert_eq!(names, ["a.jpg", "b.PNG", "sub/c.webp", "-"]);
        let e = expand_inputs(&["/no/such/file.jpg".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("/no/such/file.jpg does not exist"), "{e}");
        assert!(expand_inputs(&["-".into(), "-".into()]).is_err());
    }
}
