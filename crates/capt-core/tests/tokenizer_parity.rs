//! The bundled CLIP tokenizer against open_clip's ids (tests/fixtures/core/tokenizer_cases.json,
//! made by tools/ref_core.py), and `from_file` against the same cases when the shared HF
//! tokenizer.json is present.

use std::path::{Path, PathBuf};

use capt_core::tokenizer::{ClipTokenizer, TokenizerError, CONTEXT_LENGTH};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    sot: u32,
    eot: u32,
    vocab_size: usize,
    context_length: usize,
    cases: Vec<Case>,
    not_reproduced: Vec<Divergent>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    tokenize77_prefix: Vec<u32>,
    eot_pos: usize,
    hf_equal: bool,
}

#[derive(Deserialize)]
struct Divergent {
    text: String,
    open_clip_ids: Vec<u32>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture() -> Fixture {
    let path = repo_root().join("tests/fixtures/core/tokenizer_cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("tokenizer_cases.json")
}

fn check_all(tok: &ClipTokenizer, fx: &Fixture) {
    assert_eq!(fx.context_length, CONTEXT_LENGTH);
    let mut failures = Vec::new();
    for case in &fx.cases {
        let ids = tok.encode(&case.text).unwrap();
        if ids != case.ids {
            failures.push(format!(
                "{:?}\n  open_clip {:?}\n  capt      {:?}",
                case.text, case.ids, ids
            ));
            continue;
        }
        let (padded, eot_pos) = tok.encode_padded(&case.text, CONTEXT_LENGTH).unwrap();
        assert_eq!(padded.len(), CONTEXT_LENGTH);
        assert_eq!(eot_pos, case.eot_pos, "{:?}", case.text);
        assert_eq!(
            &padded[..=eot_pos],
            case.tokenize77_prefix.as_slice(),
            "{:?}",
            case.text
        );
        assert!(
            padded[eot_pos + 1..].iter().all(|&v| v == 0),
            "{:?}",
            case.text
        );
        assert_eq!(padded[eot_pos], fx.eot);
        let phrase = tok.token_ids_of_phrase(&case.text).unwrap();
        assert_eq!(phrase.as_slice(), &case.ids[1..case.ids.len() - 1]);
    }
    assert!(
        failures.is_empty(),
        "{} of {} differ from open_clip:\n{}",
        failures.len(),
        fx.cases.len(),
        failures.join("\n")
    );
}

#[test]
fn bundled_equals_open_clip() {
    let fx = fixture();
    assert!(fx.cases.len() >= 30);
    // The fixture must exercise what HF's fast tokenizer gets wrong, or it proves little.
    assert!(fx.cases.iter().any(|c| !c.hf_equal));
    assert!(fx.cases.iter().any(|c| c.ids.len() > CONTEXT_LENGTH));
    let tok = ClipTokenizer::bundled().unwrap();
    assert_eq!(
        (tok.sot(), tok.eot(), tok.vocab_size()),
        (fx.sot, fx.eot, fx.vocab_size)
    );
    check_all(&tok, &fx);

    let texts: Vec<&str> = fx.cases.iter().map(|c| c.text.as_str()).collect();
    let batch = tok.encode_batch(&texts, CONTEXT_LENGTH).unwrap();
    for (i, case) in fx.cases.iter().enumerate() {
        assert_eq!(batch.eot_positions[i], case.eot_pos);
        assert_eq!(
            &batch.row(i)[..=case.eot_pos],
            case.tokenize77_prefix.as_slice()
        );
    }
}

/// Documented divergences stay what the docs say: mojibake is not repaired and special-token
/// literals never become SOT/EOT.
#[test]
fn documented_divergences() {
    let fx = fixture();
    let tok = ClipTokenizer::bundled().unwrap();
    for d in &fx.not_reproduced {
        let ids = tok.encode(&d.text).unwrap();
        assert_ne!(
            ids, d.open_clip_ids,
            "{:?} now matches open_clip; update the docs",
            d.text
        );
        assert_eq!(
            ids.iter().filter(|&&i| i == fx.sot).count(),
            1,
            "{:?}",
            d.text
        );
    }
}

#[test]
fn from_hf_tokenizer_json_equals_bundled() {
    let path = repo_root()
        .join("../shared/data/clip_tokenizer/hf_openai-clip-vit-base-patch32/tokenizer.json");
    if !path.exists() {
        eprintln!("skipping: {} not present", path.display());
        return;
    }
    let tok = ClipTokenizer::from_file(&path).unwrap();
    let fx = fixture();
    assert_eq!(
        (tok.sot(), tok.eot(), tok.vocab_size()),
        (fx.sot, fx.eot, fx.vocab_size)
    );
    check_all(&tok, &fx);
}

#[test]
fn bad_tokenizer_files_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.json");
    let err = ClipTokenizer::from_file(&missing).unwrap_err();
    assert!(matches!(err, TokenizerError::Load { .. }), "{err}");
    assert!(err.to_string().contains("nope.json"), "{err}");

    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, b"{ not json").unwrap();
    let err = ClipTokenizer::from_file(&garbage).unwrap_err();
    assert!(err.to_string().contains("garbage.json"), "{err}");

    // A valid tokenizer.json whose model is not CLIP's BPE.
    let wordlevel = dir.path().join("wordlevel.json");
    std::fs::write(
        &wordlevel,
        r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
            "pre_tokenizer":null,"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"a":0,"[UNK]":1},"unk_token":"[UNK]"}}"#,
    )
    .unwrap();
    let err = ClipTokenizer::from_file(&wordlevel).unwrap_err();
    assert!(matches!(err, TokenizerError::NotClip { .. }), "{err}");
    assert!(err.to_string().contains("wordlevel.json"), "{err}");
}
