//! Bad input gives a clear error, a failure exit status, and never a half-written checkpoint.

mod common;

use common::{capt_train, data_root, fit, fit_with, names_in, repo};

#[test]
fn k_pairs_above_k_cand_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[sem]\nk_cand = 2\nk_pairs = 3\n").unwrap();
    let out = dir.path().join("out");
    let r = fit_with(&cfg, "tiny", &out, &[]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("sem.k_pairs (3) is larger than sem.k_cand (2)"),
        "{}",
        r.stderr
    );
    assert!(!out.exists(), "nothing written for a rejected config");
}

#[test]
fn unknown_method_lists_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let r = fit(&dir.path().join("out"), &["--method", "capt-plus"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("unknown method `capt-plus`") && r.stderr.contains("capt-no-sem"),
        "{}",
        r.stderr
    );
}

#[test]
fn checkpoint_of_another_backbone_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let r = fit(&out, &["--method", "coop", "--epochs", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let other = repo().join("tests/fixtures/clip/tiny-hf");
    let root = data_root().display().to_string();
    let r = capt_train(&[
        "eval",
        "--checkpoint",
        out.to_str().unwrap(),
        "--dataset",
        "dtd",
        "--root",
        &root,
        "--backbone",
        other.to_str().unwrap(),
        "--out",
        dir.path().join("ev").to_str().unwrap(),
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("was trained on backbone tiny") && r.stderr.contains("--backbone"),
        "{}",
        r.stderr
    );
    // Resuming it with the other backbone is refused too.
    let r = fit_with(
        &common::tiny_config(),
        other.to_str().unwrap(),
        &out,
        &["--method", "coop", "--epochs", "1", "--resume"],
    );
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("was trained on backbone tiny"),
        "{}",
        r.stderr
    );
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("explode.toml");
    // Epoch 1 warms up at a sane rate; epoch 2 jumps to an absurd one.
    std::fs::write(
        &cfg,
        std::fs::read_to_string(common::tiny_config())
            .unwrap()
            .replace(
                "warmup_epochs = 0\nlr = 0.05",
                "warmup_epochs = 1\nwarmup_lr = 0.01\nlr = 1e30\ngrad_clip = 1e30",
            )
            + "",
    )
    .unwrap();
    let out = dir.path().join("out");
    let r = fit_with(&cfg, "tiny", &out, &["--epochs", "3", "--method", "coop"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("loss is NaN") || r.stderr.contains("loss is inf"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("epoch 2"), "{}", r.stderr);
    assert!(r.stderr.contains("epoch-001"), "{}", r.stderr);
    let names = names_in(&out);
    assert!(names.contains(&"epoch-001".to_string()), "{names:?}");
    assert!(
        !names
            .iter()
            .any(|n| n.contains(".tmp-") || n == "epoch-002" || n == "checkpoint"),
        "{names:?}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("LATEST")).unwrap().trim(),
        "epoch-001"
    );
}

#[test]
fn unwritable_output_folder_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let r = fit(&file.join("out"), &["--method", "coop", "--epochs", "1"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("cannot create output folder"),
        "{}",
        r.stderr
    );
}

#[test]
fn missing_checkpoint_and_bad_subsample_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = data_root().display().to_string();
    let r = capt_train(&[
        "eval",
        "--checkpoint",
        dir.path().to_str().unwrap(),
        "--dataset",
        "dtd",
        "--root",
        &root,
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no checkpoint here"), "{}", r.stderr);
    let r = capt_train(&[
        "zeroshot",
        "--dataset",
        "dtd",
        "--root",
        &root,
        "--backbone",
        "tiny",
        "--subsample",
        "half",
    ]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("expected all, base, new or b2n"),
        "{}",
        r.stderr
    );
}

#[test]
fn classes_without_images_are_refused_by_name() {
    // The EuroSAT fixture's split names labels 0, 7 and 8 only: labels 1-6 have no image.
    let dir = tempfile::tempdir().unwrap();
    let root = data_root().display().to_string();
    let out = dir.path().join("out");
    for cmd in [&["fit", "--method", "coop"][..], &["zeroshot"][..]] {
        let mut args = cmd.to_vec();
        args.extend([
            "--dataset",
            "eurosat",
            "--root",
            &root,
            "--backbone",
            "tiny",
            "--out",
            out.to_str().unwrap(),
        ]);
        let r = capt_train(&args);
        assert_ne!(r.code, 0, "{cmd:?} accepted empty classes");
        assert!(
            r.stderr.contains("labels 1, 2, 3, 4, 5, 6 have no images"),
            "{cmd:?}: {}",
            r.stderr
        );
    }
}
