//! Shared helpers: the fixture paths, running the binary, scratch folders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// CoOp `$DATA` root holding the DTD fixture (`dtd/`).
pub fn data_root() -> PathBuf {
    repo().join("tests/fixtures/coop")
}

pub fn tiny_config() -> PathBuf {
    repo().join("tests/fixtures/train/tiny.toml")
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn capt_train(args: &[&str]) -> Run {
    capt_train_env(args, &[])
}

/// `capt-train fit` on the DTD fixture with the tiny backbone and tiny.toml, plus `extra`.
pub fn fit(out: &Path, extra: &[&str]) -> Run {
    fit_with(&tiny_config(), "tiny", out, extra)
}

/// `capt-train fit` on the DTD fixture with the given config file and backbone, plus `extra`.
pub fn fit_with(config: &Path, backbone: &str, out: &Path, extra: &[&str]) -> Run {
    fit_env(config, backbone, out, extra, &[])
}

/// [`fit_with`] with extra environment variables.
pub fn fit_env(
    config: &Path,
    backbone: &str,
    out: &Path,
    extra: &[&str],
    env: &[(&str, &Path)],
) -> Run {
    let out = out.display().to_string();
    let cfg = config.display().to_string();
    let root = data_root().display().to_string();
    let mut args = vec![
        "fit",
        "--dataset",
        "dtd",
        "--root",
        &root,
        "--backbone",
        backbone,
        "--config",
        &cfg,
        "--out",
        &out,
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    capt_train_env(&args, env)
}

/// `capt-train eval` of `checkpoint` on the DTD fixture into `out`, plus `extra`.
pub fn eval(checkpoint: &Path, out: &Path, extra: &[&str]) -> Run {
    eval_env(checkpoint, out, extra, &[])
}

/// [`eval`] with extra environment variables.
pub fn eval_env(checkpoint: &Path, out: &Path, extra: &[&str], env: &[(&str, &Path)]) -> Run {
    let (ckpt, out) = (checkpoint.display().to_string(), out.display().to_string());
    let root = data_root().display().to_string();
    let mut args = vec![
        "eval",
        "--checkpoint",
        &ckpt,
        "--dataset",
        "dtd",
        "--root",
        &root,
        "--out",
        &out,
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    capt_train_env(&args, env)
}

pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

pub fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|it| {
            it.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A hub cache (`$HF_HOME/hub`) holding the tiny HF fixture as `capt-test/tiny-clip` at
/// `main` = `commit`, laid out as hf-hub writes it (refs/, snapshots/).
pub fn hub_cache_with_tiny(home: &Path, commit: &str) {
    let repo = home.join("hub").join("models--capt-test--tiny-clip");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(repo_root_fixture(f), snap.join(f)).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), commit).unwrap();
}

fn repo_root_fixture(file: &str) -> PathBuf {
    repo().join("tests/fixtures/clip/tiny-hf").join(file)
}

/// `capt-train` with extra environment variables.
pub fn capt_train_env(args: &[&str], env: &[(&str, &Path)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_capt-train"));
    cmd.args(args).env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("capt-train runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
