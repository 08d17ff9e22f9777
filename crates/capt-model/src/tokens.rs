//! Token rows for `text_encoder.onnx`: tokenizer ids mapped into the model's vocabulary and
//! padded to the context length, exactly as capt-train builds its prompt rows.

use capt_graph::HostTensor;

use crate::error::{ModelError, Result};

/// The CLIP tokenizer's vocabulary size (ids of real checkpoints map to themselves).
pub const CLIP_VOCAB: usize = 49408;
/// `<|startoftext|>` and `<|endoftext|>` of the CLIP tokenizer.
pub const SOT: u32 = 49406;
pub const EOT: u32 = 49407;

/// Tokenizer id -> model vocabulary. Real CLIP checkpoints (49,408 entries) keep the id;
/// small test models fold ids like capt-train's `TokenMap`: EOT -> V-1 (still the row
/// maximum, where CLIP pools), SOT -> V-2, others -> id mod (V-2).
pub fn map_token(id: u32, model_vocab: usize) -> u32 {
    if !(3..CLIP_VOCAB).contains(&model_vocab) {
        id
    } else if id == EOT {
        (model_vocab - 1) as u32
    } else if id == SOT {
        (model_vocab - 2) as u32
    } else {
        id % (model_vocab - 2) as u32
    }
}

/// `[M, len]` I64 rows from `SOT .. EOT` id lists (tokenizer ids), mapped and zero-padded.
/// `room` context tokens will be spliced after SOT, so every row must end before
/// `len - room`; longer texts are an error naming the text.
pub fn rows(
    lists: &[(String, Vec<u32>)],
    model_vocab: usize,
    len: usize,
    room: usize,
) -> Result<HostTensor> {
    let mut ids = Vec::with_capacity(lists.len() * len);
    for (text, row) in lists {
        if row.len() + room > len {
            return Err(ModelError::Spec(format!(
                "{text:?} is {} tokens; with {room} learned context tokens at most {} fit the {len}-token context — use a shorter name",
                row.len(),
                len.saturating_sub(room)
            )));
        }
        ids.extend(row.iter().map(|&t| map_token(t, model_vocab) as i64));
        ids.extend(std::iter::repeat_n(0i64, len - row.len()));
    }
    Ok(HostTensor::i64(vec![lists.len(), len], ids)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folding_keeps_eot_the_row_maximum() {
        assert_eq!(map_token(320, CLIP_VOCAB), 320);
        assert_eq!(map_token(EOT, 600), 599);
        assert_eq!(map_token(SOT, 600), 598);
        assert_eq!(map_token(1000, 600), 1000 % 598);
        let r = rows(&[("a".into(), vec![SOT, 320, EOT])], 600, 8, 2).unwrap();
        assert_eq!(r.as_i64().unwrap(), &[598, 320, 599, 0, 0, 0, 0, 0]);
        let err = rows(&[("long".into(), vec![1; 7])], 600, 8, 2).unwrap_err();
        assert!(err.to_string().contains("shorter name"));
    }
}
