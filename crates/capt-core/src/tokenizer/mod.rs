//! CLIP's byte-level BPE tokenizer (49,408 tokens, SOT 49406, EOT 49407, 77-token context),
//! equal to open_clip's `SimpleTokenizer` / `open_clip.tokenize`.
//!
//! The vocabulary is OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT), bundled in the crate, so
//! [`ClipTokenizer::bundled`] works offline; [`ClipTokenizer::from_file`] takes the BPE model from
//! a Hugging Face CLIP `tokenizer.json` instead. Either way the text goes through open_clip's
//! cleaning ([`clean_text`]: ftfy fixes, HTML unescaping, whitespace collapse, lower case), then
//! CLIP's pre-tokenizer regex, byte-level mapping and BPE with the `</w>` end-of-word suffix.
//!
//! Differences from open_clip, both deliberate: ftfy's heuristic mojibake repair is not done,
//! and special-token literals in the text ("<start_of_text>") are tokenized as plain text,
//! never turned into SOT/EOT (a class name must not be able to move the EOT pooling position).

mod clean;

use std::io::Read;
use std::path::Path;

use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::models::ModelWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{Model, SplitDelimiterBehavior, Tokenizer};

pub use clean::clean_text;

/// OpenAI's CLIP BPE merges (from open_clip 3.3; MIT, see assets/README.md).
const BUNDLED_BPE_GZ: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");
/// CLIP uses the first 49152 - 256 - 2 merges of the file (the line after the header onwards).
const NUM_MERGES: usize = 49152 - 256 - 2;
const END_OF_WORD: &str = "</w>";
/// CLIP's pre-tokenizer regex (open_clip's, minus its special-token alternatives).
const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub const SOT_TOKEN: &str = "<|startoftext|>";
pub const EOT_TOKEN: &str = "<|endoftext|>";
/// CLIP's text context length.
pub const CONTEXT_LENGTH: usize = 77;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {source_name}: {reason}")]
    Load { source_name: String, reason: String },
    #[error("{source_name} is not a CLIP BPE tokenizer: {reason}; use a CLIP tokenizer.json (e.g. openai/clip-vit-base-patch32) or ClipTokenizer::bundled()")]
    NotClip { source_name: String, reason: String },
    #[error("cannot tokenize {text:?}: {reason}")]
    Encode { text: String, reason: String },
    #[error("context length {context_len} cannot hold SOT and EOT; use at least 2 (CLIP uses 77)")]
    ContextTooSmall { context_len: usize },
}

/// Token ids of a batch of texts, padded with 0 to `context_len`, row-major `[n, context_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    pub ids: Vec<u32>,
    /// Index of EOT in each row (where CLIP pools the text feature).
    pub eot_positions: Vec<usize>,
    pub n: usize,
    pub context_len: usize,
}

impl TokenBatch {
    pub fn shape(&self) -> [usize; 2] {
        [self.n, self.context_len]
    }

    pub fn row(&self, i: usize) -> &[u32] {
        &self.ids[i * self.context_len..(i + 1) * self.context_len]
    }
}

/// CLIP tokenizer. Building one parses 49k merges (about 0.2 s in release): build it once and
/// share it (`Send + Sync + Clone`).
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    sot: u32,
    eot: u32,
    vocab_size: usize,
    /// byte-level alphabet char -> byte, for `decode`.
    byte_of: std::collections::HashMap<char, u8>,
    source: String,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size)
            .field("sot", &self.sot)
            .field("eot", &self.eot)
            .finish()
    }
}

impl ClipTokenizer {
    /// The tokenizer built from the bundled OpenAI vocabulary; needs no file.
    pub fn bundled() -> Result<Self, TokenizerError> {
        let source = "bundled bpe_simple_vocab_16e6.txt.gz";
        let bad = |reason: String| TokenizerError::NotClip {
            source_name: source.to_string(),
            reason,
        };
        let mut text = String::new();
        flate2::read::GzDecoder::new(BUNDLED_BPE_GZ)
            .read_to_string(&mut text)
            .map_err(|e| bad(format!("cannot decompress: {e}")))?;
        let merges: Merges = text
            .split('\n')
            .skip(1)
            .take(NUM_MERGES)
            .map(|line| {
                line.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(format!("merge line {line:?} is not two symbols")))
            })
            .collect::<Result<_, _>>()?;
        if merges.len() != NUM_MERGES {
            return Err(bad(format!(
                "{} merges, expected {NUM_MERGES}",
                merges.len()
            )));
        }
        let alphabet = byte_alphabet();
        let tokens = alphabet
            .iter()
            .map(|&(_, c)| c.to_string())
            .chain(alphabet.iter().map(|&(_, c)| format!("{c}{END_OF_WORD}")))
            .chain(merges.iter().map(|(a, b)| format!("{a}{b}")))
            .chain([SOT_TOKEN.to_string(), EOT_TOKEN.to_string()]);
        let vocab: Vocab = tokens.zip(0u32..).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .end_of_word_suffix(END_OF_WORD.to_string())
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Self::with_model(bpe, None, source)
    }

    /// Takes the BPE model (vocabulary and merges) from a Hugging Face CLIP `tokenizer.json`;
    /// cleaning and pre-tokenization stay open_clip's, whatever the file configures.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let source = path.display().to_string();
        if let Err(e) = std::fs::metadata(path) {
            return Err(TokenizerError::Load {
                source_name: source,
                reason: e.to_string(),
            });
        }
        let file = Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            source_name: source.clone(),
            reason: e.to_string(),
        })?;
        let ModelWrapper::BPE(bpe) = file.get_model() else {
            return Err(TokenizerError::NotClip {
                source_name: source,
                reason: "its model is not BPE".into(),
            });
        };
        let mut bpe = bpe.clone();
        bpe.dropout = None;
        Self::with_model(bpe, Some(&file), &source)
    }

    fn with_model(
        bpe: BPE,
        file: Option<&Tokenizer>,
        source: &str,
    ) -> Result<Self, TokenizerError> {
        let bad = |reason: String| TokenizerError::NotClip {
            source_name: source.to_string(),
            reason,
        };
        if bpe.end_of_word_suffix.as_deref() != Some(END_OF_WORD) {
            return Err(bad(format!(
                "its BPE end-of-word suffix is {:?}, CLIP's is {END_OF_WORD:?}",
                bpe.end_of_word_suffix
            )));
        }
        let alphabet = byte_alphabet();
        for &(_, c) in &alphabet {
            for sym in [c.to_string(), format!("{c}{END_OF_WORD}")] {
                if bpe.token_to_id(&sym).is_none() {
                    return Err(bad(format!("byte-level symbol {sym:?} is missing")));
                }
            }
        }
        let special = |name: &str| {
            file.and_then(|t| t.token_to_id(name))
                .or_else(|| bpe.token_to_id(name))
                .ok_or_else(|| bad(format!("it has no {name} token")))
        };
        let (sot, eot) = (special(SOT_TOKEN)?, special(EOT_TOKEN)?);
        let vocab_size = bpe.get_vocab_size();
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.to_string()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| bad(format!("pre-tokenizer regex: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ])));
        Ok(Self {
            inner,
            sot,
            eot,
            vocab_size,
            byte_of: alphabet.into_iter().map(|(b, c)| (c, b)).collect(),
            source: source.to_string(),
        })
    }

    pub fn sot(&self) -> u32 {
        self.sot
    }

    pub fn eot(&self) -> u32 {
        self.eot
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Ids of `text` without SOT/EOT: for prompt-context initialisation ("a photo of a") and
    /// for splicing class-name tokens after learned contexts.
    pub fn token_ids_of_phrase(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let cleaned = clean_text(text);
        if cleaned.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .inner
            .encode_fast(cleaned.as_str(), false)
            .map_err(|e| TokenizerError::Encode {
                text: preview(text),
                reason: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// `[SOT] ids [EOT]`, unpadded and untruncated.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::with_capacity(CONTEXT_LENGTH);
        ids.push(self.sot);
        ids.extend(self.token_ids_of_phrase(text)?);
        ids.push(self.eot);
        Ok(ids)
    }

    /// `context_len` ids padded with 0, and the EOT position. Over-long text is cut and its
    /// last slot overwritten with EOT, as `open_clip.tokenize` does.
    pub fn encode_padded(
        &self,
        text: &str,
        context_len: usize,
    ) -> Result<(Vec<u32>, usize), TokenizerError> {
        if context_len < 2 {
            return Err(TokenizerError::ContextTooSmall { context_len });
        }
        let mut ids = self.encode(text)?;
        if ids.len() > context_len {
            ids.truncate(context_len);
            ids[context_len - 1] = self.eot;
        }
        let eot_pos = ids.len() - 1;
        ids.resize(context_len, 0);
        Ok((ids, eot_pos))
    }

    /// [`encode_padded`](Self::encode_padded) for each text.
    pub fn encode_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
        context_len: usize,
    ) -> Result<TokenBatch, TokenizerError> {
        let mut ids = Vec::with_capacity(texts.len() * context_len);
        let mut eot_positions = Vec::with_capacity(texts.len());
        for text in texts {
            let (row, eot) = self.encode_padded(text.as_ref(), context_len)?;
            ids.extend(row);
            eot_positions.push(eot);
        }
        Ok(TokenBatch {
            ids,
            eot_positions,
            n: texts.len(),
            context_len,
        })
    }

    /// Text of `ids` as open_clip decodes it (`</w>` becomes a space), skipping SOT and stopping
    /// at EOT, so padded rows decode too. Unknown ids become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids.iter().take_while(|&&id| id != self.eot) {
            if id == self.sot {
                continue;
            }
            match self.inner.id_to_token(id) {
                Some(tok) => {
                    let (body, word_end) = match tok.strip_suffix(END_OF_WORD) {
                        Some(body) => (body.to_string(), true),
                        None => (tok, false),
                    };
                    for c in body.chars() {
                        match self.byte_of.get(&c) {
                            Some(&b) => bytes.push(b),
                            None => bytes.extend_from_slice(c.to_string().as_bytes()),
                        }
                    }
                    if word_end {
                        bytes.push(b' ');
                    }
                }
                None => bytes.extend_from_slice("\u{fffd}".as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).trim_end().to_string()
    }
}

/// GPT-2/CLIP byte-level alphabet in vocabulary order: printable Latin-1 bytes map to
/// themselves, the other 68 bytes to U+0100 onwards.
fn byte_alphabet() -> Vec<(u8, char)> {
    let printable = |b: u8| matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
    let mut out: Vec<(u8, char)> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(|b| (b, char::from(b)))
        .collect();
    let shifted = (0..=255u8)
        .filter(|&b| !printable(b))
        .zip((0x100u32..).filter_map(char::from_u32));
    out.extend(shifted);
    out
}

fn preview(text: &str) -> String {
    let mut p: String = text.chars().take(60).collect();
    if p.len() < text.len() {
        p.push('…');
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    fn tok() -> &'static ClipTokenizer {
        static TOK: OnceLock<ClipTokenizer> = OnceLock::new();
        TOK.get_or_init(|| ClipTokenizer::bundled().expect("bundled tokenizer"))
    }

    #[test]
    fn shareable_across_threads() {
        fn is_send_sync<T: Send + Sync + Clone>() {}
        is_send_sync::<ClipTokenizer>();
    }

    #[test]
    fn bundled_has_clip_layout() {
        let t = tok();
        assert_eq!((t.vocab_size(), t.sot(), t.eot()), (49408, 49406, 49407));
        assert_eq!(byte_alphabet().len(), 256);
    }

    #[test]
    fn phrase_and_padding() {
        let t = tok();
        // open_clip: tokenize("a photo of a") -> 49406 320 1125 539 320 49407
        assert_eq!(
            t.token_ids_of_phrase("a photo of a").unwrap(),
            [320, 1125, 539, 320]
        );
        let (ids, eot) = t.encode_padded("a photo of a", 77).unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(eot, 5);
        assert_eq!(&ids[..6], &[49406, 320, 1125, 539, 320, 49407]);
        assert!(ids[6..].iter().all(|&v| v == 0));
        let (ids, eot) = t.encode_padded("a photo of a", 4).unwrap();
        assert_eq!((ids, eot), (vec![49406, 320, 1125, 49407], 3));
        assert!(matches!(
            t.encode_padded("x", 1),
            Err(TokenizerError::ContextTooSmall { .. })
        ));
    }

    #[test]
    fn batch_rows_match_single() {
        let t = tok();
        let b = t
            .encode_batch(&["a dog", "", "a photo of a cat."], 77)
            .unwrap();
        assert_eq!(b.shape(), [3, 77]);
        assert_eq!(b.eot_positions, vec![3, 1, 7]);
        assert_eq!(
            b.row(2),
            t.encode_padded("a photo of a cat.", 77)
                .unwrap()
                .0
                .as_slice()
        );
    }

    #[test]
    fn decode_round_trips_cleaned_text() {
        let t = tok();
        let (ids, _) = t.encode_padded("A Photo of a Café, 3 😀!", 77).unwrap();
        // open_clip decode gives the same (plus a trailing space, trimmed here).
        assert_eq!(t.decode(&ids), "a photo of a café , 3 😀!");
    }

    #[test]
    fn special_literals_stay_text() {
        let ids = tok().token_ids_of_phrase("<|endoftext|>").unwrap();
        assert!(!ids.contains(&49407) && !ids.is_empty());
    }
}
