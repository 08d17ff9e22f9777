//! The CAPT head acts on a CLIP whose features mean something: on the semantic fixture
//! (tests/fixtures/clip/semantic-64, pretrained here) and the DTD-10 sample
//! (tests/fixtures/coop_full), a short run grows every expert's gain to where it changes
//! predictions, and `coop`, `capt`, `capt-no-sam` and `capt-no-sem` predict differently.

mod common;

use std::path::{Path, PathBuf};

use common::{capt_train, repo};

fn semantic() -> PathBuf {
    repo().join("tests/fixtures/clip/semantic-64")
}

fn data() -> String {
    repo()
        .join("tests/fixtures/coop_full")
        .display()
        .to_string()
}

const SPLIT: &str = "split_full_DescribableTextures.json";

/// A short run of `method` on the DTD-10 sample with tests/fixtures/train/semantic.toml.
fn fit(out: &Path, method: &str) {
    let cfg = repo().join("tests/fixtures/train/semantic.toml");
    let backbone = semantic().display().to_string();
    let r = capt_train(&[
        "fit",
        "--dataset",
        "dtd",
        "--root",
        &data(),
        "--split-file",
        SPLIT,
        "--backbone",
        &backbone,
        "--config",
        cfg.to_str().unwrap(),
        "--method",
        method,
        "--subsample",
        "all",
        "--seed",
        "1",
        "--out",
        out.to_str().unwrap(),
        "--no-progress",
    ]);
    assert_eq!(r.code, 0, "fit {method}: {}", r.stderr);
}

/// Test-split predictions of a checkpoint: its confusion matrix (row = truth).
fn confusion(run: &Path, eval: &Path) -> Vec<u64> {
    let r = capt_train(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--dataset",
        "dtd",
        "--root",
        &data(),
        "--split-file",
        SPLIT,
        "--out",
        eval.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "eval: {}", r.stderr);
    let rep: serde_json::Value =
        serde_json::from_slice(&std::fs::read(eval.join("report.json")).unwrap()).unwrap();
    rep["parts"][0]["confusion"]["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

/// `capt.mgde.gains` of a run's final checkpoint.
fn gains(run: &Path) -> Vec<f32> {
    let p = run.join("checkpoint/learned.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("capt.mgde.gains").unwrap();
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn every_expert_acts_and_the_ablations_predict_differently() {
    let tmp = tempfile::tempdir().unwrap();
    let methods = ["coop", "capt", "capt-no-sam", "capt-no-sem"];
    let mut preds = Vec::new();
    for m in methods {
        let run = tmp.path().join(m);
        fit(&run, m);
        preds.push(confusion(&run, &tmp.path().join(format!("{m}-eval"))));
    }
    for i in 0..methods.len() {
        for j in i + 1..methods.len() {
            assert_ne!(
                preds[i], preds[j],
                "{} and {} predict the same on every test image",
                methods[i], methods[j]
            );
        }
    }
    // CAPT lowers its loss (on the config's fixed pool of views).
    let capt = tmp.path().join("capt");
    let l = losses(&capt);
    let n = l.len();
    assert!(
        (l[n - 1] + l[n - 2]) / 2.0 < l[0],
        "CAPT loss did not drop: {l:?}"
    );
    // Every expert's gain grew from 0 to where it moves logits, the sample expert's of the
    // same order as the semantic ones.
    let g = gains(&capt);
    println!("capt gains after training: {g:?}");
    let mags: Vec<f32> = g.iter().map(|v| v.abs()).collect();
    let max = mags.iter().cloned().fold(0.0, f32::max);
    for (e, &m) in mags.iter().enumerate() {
        assert!(
            m >= 0.05,
            "expert {e} gain {m} stayed near its zero start ({g:?})"
        );
        assert!(
            m >= max / 10.0,
            "expert {e} gain {m} is an order of magnitude below the largest ({g:?})"
        );
    }
}
