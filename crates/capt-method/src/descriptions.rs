//! The optional descriptions file of the Semantic Confusion Miner (docs/METHOD.md §2): JSON
//! whose keys are a class name (`"beagle": [...]`) or an ordered pair (`"beagle|basset
//! hound": [...]`) and whose values are sentences, e.g. written offline by an LLM. Their
//! sentence embeddings are averaged and added to the learned embeddings of that class/pair.

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum DescriptionsError {
    #[error("descriptions file {path} is not a JSON object of string lists: {message}")]
    Format { path: String, message: String },
    #[error("descriptions file {path}: key `{key}` names unknown class `{class}`; keys must be class names or `a|b` pairs of class names")]
    UnknownClass {
        path: String,
        key: String,
        class: String,
    },
}

/// Parsed descriptions, resolved against a class list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Descriptions {
    /// Sentences per class index.
    pub classes: BTreeMap<usize, Vec<String>>,
    /// Sentences per ordered class pair `(a, b)`.
    pub pairs: BTreeMap<(usize, usize), Vec<String>>,
}

impl Descriptions {
    pub fn parse(
        text: &str,
        class_names: &[String],
        source_name: &str,
    ) -> Result<Self, DescriptionsError> {
        let raw: BTreeMap<String, Vec<String>> =
            serde_json::from_str(text).map_err(|e| DescriptionsError::Format {
                path: source_name.to_string(),
                message: e.to_string(),
            })?;
        let index = |key: &str, name: &str| {
            let wanted = name.trim().to_lowercase();
            class_names
                .iter()
                .position(|c| c.to_lowercase() == wanted)
                .ok_or_else(|| DescriptionsError::UnknownClass {
                    path: source_name.to_string(),
                    key: key.to_string(),
                    class: name.trim().to_string(),
                })
        };
        let mut out = Descriptions::default();
        for (key, sentences) in raw {
            let sentences: Vec<String> = sentences
                .into_iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            if sentences.is_empty() {
                continue;
            }
            match key.split_once('|') {
                Some((a, b)) => {
                    let pair = (index(&key, a)?, index(&key, b)?);
                    out.pairs.entry(pair).or_default().extend(sentences);
                }
                None => {
                    let c = index(&key, &key)?;
                    out.classes.entry(c).or_default().extend(sentences);
                }
            }
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.classes.is_empty() && self.pairs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        ["beagle", "Basset Hound", "pug"].map(String::from).to_vec()
    }

    #[test]
    fn parses_classes_and_ordered_pairs() {
        let d = Descriptions::parse(
            r#"{"beagle|basset hound": ["longer legs", " "], "pug": ["flat face"], "basset hound|beagle": ["droopy ears"]}"#,
            &names(),
            "d.json",
        )
        .unwrap();
        assert_eq!(d.pairs[&(0, 1)], vec!["longer legs".to_string()]);
        assert_eq!(d.pairs[&(1, 0)], vec!["droopy ears".to_string()]);
        assert_eq!(d.classes[&2], vec!["flat face".to_string()]);
    }

    #[test]
    fn unknown_class_and_bad_json_name_the_file() {
        let e = Descriptions::parse(r#"{"beagle|corgi": ["x"]}"#, &names(), "d.json").unwrap_err();
        assert!(
            e.to_string().contains("corgi") && e.to_string().contains("d.json"),
            "{e}"
        );
        let e = Descriptions::parse(r#"{"beagle": "x"}"#, &names(), "d.json").unwrap_err();
        assert!(e.to_string().contains("d.json"), "{e}");
    }
}
