//! End to end on the tiny backbone (seeded random weights) and the real DTD fixture images:
//! training lowers the loss, evaluation writes its report and heatmaps, a resumed run equals
//! an uninterrupted one bit for bit, the same seed gives the same checkpoint bytes.

mod common;

use common::{capt_train, data_root, fit, fit_with, names_in, read};

const FILES: [&str; 5] = [
    "learned.safetensors",
    "bank.safetensors",
    "tables.safetensors",
    "optim.safetensors",
    "state.json",
];

fn log_losses(out: &std::path::Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["loss"].as_f64().unwrap(), v["ce_base"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn coop_fit_lowers_the_loss_and_eval_writes_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("coop");
    let r = fit(
        &out,
        &[
            "--method", "coop", "--epochs", "4", "--lr", "0.5", "--seed", "3",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("finished after 4 epoch(s)"),
        "{}",
        r.stdout
    );
    let losses = log_losses(&out);
    assert_eq!(losses.len(), 4);
    assert!(
        losses[3].0 < losses[0].0,
        "training loss did not drop: {losses:?}"
    );
    // The final checkpoint and the rotating epoch checkpoint; nothing temporary left.
    let names = names_in(&out);
    assert!(
        names.contains(&"checkpoint".to_string()) && names.contains(&"epoch-004".to_string()),
        "{names:?}"
    );
    assert!(
        !names
            .iter()
            .any(|n| n.contains(".tmp-") || n == "epoch-003"),
        "{names:?}"
    );
    for f in [
        "learned.safetensors",
        "tables.safetensors",
        "optim.safetensors",
        "state.json",
    ] {
        assert!(out.join("checkpoint").join(f).is_file(), "{f}");
    }

    let ev = dir.path().join("eval");
    let r = common::eval(&out, &ev, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report: serde_json::Value = serde_json::from_slice(&read(&ev.join("report.json"))).unwrap();
    assert_eq!(report["method"], "coop");
    let part = &report["parts"][0];
    assert_eq!(part["part"], "all");
    assert_eq!(part["images"], 20);
    let top1 = part["top1"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&top1));
    assert_eq!(part["confusion"]["num_classes"], 10);
    let png = image::open(ev.join("heatmap-all.png")).unwrap();
    assert!(png.width() >= 10);
    // The labelled heatmap names the classes; report.md shows it above the top confusions.
    let svg = std::fs::read_to_string(ev.join("heatmap-all.svg")).unwrap();
    assert!(svg.contains(">banded</text>") && svg.contains("predicted class"));
    let md = std::fs::read_to_string(ev.join("report.md")).unwrap();
    assert!(
        md.contains("top-1") && md.contains("(heatmap-all.svg)"),
        "{md}"
    );

    // Each run folder keeps log.txt: the log lines and the printed result.
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    assert!(log.contains("finished after 4 epoch(s)"), "{log}");
    let log = std::fs::read_to_string(ev.join("log.txt")).unwrap();
    assert!(log.contains("report: "), "{log}");
}

#[test]
fn capt_resume_equals_uninterrupted_run_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full");
    let r = fit(&full, &["--seed", "5"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let losses = log_losses(&full);
    assert_eq!(losses.len(), 2);
    assert!(losses.iter().all(|l| l.0.is_finite()));

    // Interrupted after epoch 1 (another process), then resumed.
    let part = dir.path().join("part");
    let r = fit(&part, &["--seed", "5", "--stop-after", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("stopped after 1 epoch(s)"),
        "{}",
        r.stdout
    );
    assert!(!part.join("checkpoint").exists());
    // Without --resume an existing run is never overwritten.
    let r = fit(&part, &["--seed", "5"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("--resume"), "{}", r.stderr);
    let r = fit(&part, &["--seed", "5", "--resume"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The refused second start and its error, then the resumed run, all in one log.txt.
    let log = std::fs::read_to_string(part.join("log.txt")).unwrap();
    assert!(log.contains("error: ") && log.contains("--resume"), "{log}");
    assert!(log.contains("finished after 2 epoch(s)"), "{log}");
    for f in FILES {
        let a = read(&full.join("checkpoint").join(f));
        let b = read(&part.join("checkpoint").join(f));
        assert!(
            a == b,
            "{f} differs between the resumed and the uninterrupted run"
        );
    }
    assert_eq!(
        std::fs::read_to_string(full.join("log.jsonl"))
            .unwrap()
            .lines()
            .count(),
        std::fs::read_to_string(part.join("log.jsonl"))
            .unwrap()
            .lines()
            .count()
    );
}

#[test]
fn same_seed_gives_identical_checkpoint_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    for (out, seed) in [(&a, "7"), (&b, "7"), (&c, "8")] {
        let r = fit(out, &["--method", "coop", "--epochs", "1", "--seed", seed]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let learned = |d: &std::path::Path| read(&d.join("checkpoint/learned.safetensors"));
    assert!(
        learned(&a) == learned(&b),
        "same seed, different learned tensors"
    );
    assert!(
        read(&a.join("checkpoint/optim.safetensors"))
            == read(&b.join("checkpoint/optim.safetensors"))
    );
    assert!(
        learned(&a) != learned(&c),
        "different seeds gave the same run"
    );
}

#[test]
fn base_to_novel_eval_and_correction_rate_against_zero_shot() {
    let dir = tempfile::tempdir().unwrap();
    let root = data_root().display().to_string();
    let zs = dir.path().join("zs");
    let r = capt_train(&[
        "zeroshot",
        "--dataset",
        "dtd",
        "--root",
        &root,
        "--backbone",
        "tiny",
        "--subsample",
        "b2n",
        "--out",
        zs.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let zr: serde_json::Value = serde_json::from_slice(&read(&zs.join("report.json"))).unwrap();
    assert_eq!(zr["method"], "zero-shot");
    assert_eq!(zr["parts"].as_array().unwrap().len(), 2);
    assert!(zr["hm"].as_f64().is_some());

    let run = dir.path().join("capt-base");
    let r = fit(
        &run,
        &["--subsample", "base", "--epochs", "1", "--seed", "2"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let state: serde_json::Value =
        serde_json::from_slice(&read(&run.join("checkpoint/state.json"))).unwrap();
    assert_eq!(state["class_names"].as_array().unwrap().len(), 5);
    assert_eq!(state["subsample"], "base");

    let ev = dir.path().join("ev");
    let baseline = zs.join("report.json");
    let r = capt_train(&[
        "eval",
        "--checkpoint",
        run.join("checkpoint").to_str().unwrap(),
        "--dataset",
        "dtd",
        "--root",
        &root,
        "--baseline",
        baseline.to_str().unwrap(),
        "--out",
        ev.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("HM"), "{}", r.stdout);
    let er: serde_json::Value = serde_json::from_slice(&read(&ev.join("report.json"))).unwrap();
    let (b, n, h) = (
        er["base"].as_f64().unwrap(),
        er["novel"].as_f64().unwrap(),
        er["hm"].as_f64().unwrap(),
    );
    let expect = if b + n == 0.0 {
        0.0
    } else {
        2.0 * b * n / (b + n)
    };
    assert!((h - expect).abs() < 1e-9);
    for p in er["parts"].as_array().unwrap() {
        assert_eq!(p["images"], 10);
        let bl = &p["baseline"];
        let pairs = bl["pairs"].as_u64().unwrap();
        assert_eq!(bl["correction_rate"].is_null(), pairs == 0, "{bl}");
        assert!(ev.join(p["heatmap"].as_str().unwrap()).is_file());
    }
}

#[test]
fn b2n_writes_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let root = data_root().display().to_string();
    let cfg = common::tiny_config().display().to_string();
    let out = dir.path().join("b2n");
    let r = capt_train(&[
        "b2n",
        "--datasets",
        "dtd",
        "--seeds",
        "1",
        "--methods",
        "zero-shot,coop",
        "--root",
        &root,
        "--backbone",
        "tiny",
        "--config",
        &cfg,
        "--epochs",
        "1",
        "--out",
        out.to_str().unwrap(),
        "--no-progress",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let md = std::fs::read_to_string(out.join("b2n.md")).unwrap();
    assert!(
        md.contains("| zero-shot |") && md.contains("| coop |"),
        "{md}"
    );
    let csv = std::fs::read_to_string(out.join("b2n.csv")).unwrap();
    assert!(
        csv.lines()
            .any(|l| l.starts_with("DescribableTextures,coop,1,")),
        "{csv}"
    );
    assert!(
        csv.lines()
            .any(|l| l.starts_with("average,zero-shot,mean,")),
        "{csv}"
    );
}

#[test]
fn deep_text_visual_and_class_specific_prompts_train_and_evaluate() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("deep.toml");
    let base = std::fs::read_to_string(common::tiny_config()).unwrap();
    std::fs::write(
        &cfg,
        base.replace(
            "[prompt]\n",
            "[prompt]\ntext_depth = 2\nvision_depth = 2\nvision_n_ctx = 2\nclass_specific = true\n",
        ),
    )
    .unwrap();
    let out = dir.path().join("run");
    let r = fit_with(&cfg, "tiny", &out, &["--epochs", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let bytes = read(&out.join("checkpoint/learned.safetensors"));
    let st: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    for name in [
        "prompt.ctx",
        "prompt.deep.1",
        "prompt.visual.0",
        "prompt.visual.1",
        "sem.com_ctx",
        "capt.mgde.gains",
    ] {
        assert!(st.iter().any(|n| n == name), "{name} missing from {st:?}");
    }
    // No feature cache with vision prompts: the image tower runs every step.
    assert!(!out.join("feature-cache").exists());
    let ev = dir.path().join("ev");
    let r = common::eval(&out, &ev, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(ev.join("report.json").is_file());
}

/// A PyTorch state dict with `--arch` trains; evaluation reloads the backbone as recorded
/// (no `--arch` needed again), and without `--arch` the ambiguous file is refused by name.
#[test]
fn openai_state_dict_with_arch_trains_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let pt = common::repo().join("tests/fixtures/clip/openai-tiny/state_dict.pt");
    let pt = pt.to_str().unwrap();
    let out = dir.path().join("run");
    let r = fit_with(&common::tiny_config(), pt, &out, &["--epochs", "1"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("--arch") && r.stderr.contains("state_dict.pt"),
        "{}",
        r.stderr
    );
    let r = fit_with(
        &common::tiny_config(),
        pt,
        &out,
        &["--epochs", "1", "--arch", "openai"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = common::eval(&out, &dir.path().join("eval"), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// A hub id as the backbone, from a hub cache under HF_HUB_OFFLINE: the checkpoint records it
/// pinned to the commit (`org/name@<commit>`), and evaluation reloads that commit from the
/// cache with no network and no offline flag.
#[test]
fn hub_backbone_is_recorded_pinned_and_reloads_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("hf-home");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    common::hub_cache_with_tiny(&home, commit);
    let out = dir.path().join("run");
    let offline = std::path::Path::new("1");
    let fit = |home: &std::path::Path| {
        common::fit_env(
            &common::tiny_config(),
            "capt-test/tiny-clip",
            &out,
            &["--epochs", "1"],
            &[("HF_HOME", home), ("HF_HUB_OFFLINE", offline)],
        )
    };
    let r = fit(&home);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let state: serde_json::Value =
        serde_json::from_slice(&read(&out.join("checkpoint/state.json"))).unwrap();
    assert_eq!(
        state["backbone"]["path"],
        format!("capt-test/tiny-clip@{commit}")
    );
    // Reload by the pinned commit: online settings, but the cache has it (no request made:
    // HF_ENDPOINT points at a closed port).
    let r = common::eval_env(
        &out,
        &dir.path().join("ev"),
        &[],
        &[
            ("HF_HOME", &home),
            ("HF_ENDPOINT", std::path::Path::new("http://127.0.0.1:9")),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    // An empty cache offline: one line saying what to download.
    let r = fit(&dir.path().join("empty"));
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("capt-test/tiny-clip") && r.stderr.contains("huggingface-cli download"),
        "{}",
        r.stderr
    );
}
