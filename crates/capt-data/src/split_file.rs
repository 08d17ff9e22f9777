//! CoOp's split files, `split_zhou_<Name>.json`:
//! `{"train"|"val"|"test": [[relative_path, label, classname], ...]}`.
//! The same format holds the few-shot cache (`train`/`val` only).

use std::path::Path;

use serde_json::Value;

use crate::datum::{Datum, Problem, Split, Splits};
use crate::error::{DataError, Result};

pub const SPLIT_FORMAT: &str =
    r#"{"train": [[relative_path, label, classname], ...], "val": [...], "test": [...]}"#;

/// Reads a split file. Structural failures (missing file, not JSON, not an object) are
/// errors; bad entries and label/class-name disagreements are returned as problems so a
/// checker can list them all.
pub fn read_split_file(path: &Path) -> Result<(Splits, Vec<Problem>)> {
    let (splits, mut problems) = read_split_entries(path)?;
    problems.extend(splits.check_labels(&path.display().to_string()));
    Ok((splits, problems))
}

/// `read_split_file` without the label/class-name consistency check.
pub(crate) fn read_split_entries(path: &Path) -> Result<(Splits, Vec<Problem>)> {
    let root = read_json_object(path)?;
    let name = path.display().to_string();
    let mut splits = Splits::default();
    let mut problems = Vec::new();
    for split in Split::ALL {
        match root.get(split.as_str()) {
            Some(v) => {
                let (rows, p) = parse_rows(v, &name, split.as_str());
                *splits.get_mut(split) = rows;
                problems.extend(p);
            }
            None => problems.push(Problem::error(format!(
                "{name}: no {:?} list; a split file must have train, val and test lists ({SPLIT_FORMAT})",
                split.as_str()
            ))),
        }
    }
    Ok((splits, problems))
}

pub(crate) fn read_json_object(path: &Path) -> Result<serde_json::Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| DataError::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
        expected: SPLIT_FORMAT.to_string(),
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(DataError::Json {
            path: path.to_path_buf(),
            reason: format!("top level is {}", json_kind(&other)),
            expected: SPLIT_FORMAT.to_string(),
        }),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Parses one `[[impath, label, classname], ...]` list. Malformed rows are skipped and
/// reported with their index. Labels may be written as integers or integral floats, as
/// Python's `int(label)` accepts.
pub(crate) fn parse_rows(value: &Value, source: &str, key: &str) -> (Vec<Datum>, Vec<Problem>) {
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    let Some(list) = value.as_array() else {
        problems.push(Problem::error(format!(
            "{source}: {key:?} is {}, expected a list of [relative_path, label, classname]",
            json_kind(value)
        )));
        return (rows, problems);
    };
    for (i, row) in list.iter().enumerate() {
        match parse_row(row) {
            Ok(d) => rows.push(d),
            Err(why) => problems.push(Problem::error(format!(
                "{source}: {key}[{i}] = {} is not a valid entry ({why}); expected [relative_path, label, classname]",
                truncate(&row.to_string(), 120)
            ))),
        }
    }
    (rows, problems)
}

fn parse_row(row: &Value) -> Result<Datum, String> {
    let items = row
        .as_array()
        .ok_or_else(|| format!("it is {}", json_kind(row)))?;
    if items.len() != 3 {
        return Err(format!("it has {} fields", items.len()));
    }
    let impath = items[0]
        .as_str()
        .ok_or("the path is not a string")?
        .trim_start_matches('/')
        .to_string();
    if impath.is_empty() {
        return Err("the path is empty".into());
    }
    let label = match &items[1] {
        Value::Number(n) => match (n.as_u64(), n.as_f64()) {
            (Some(u), _) => u as usize,
            (None, Some(f)) if f >= 0.0 && f.fract() == 0.0 => f as usize,
            _ => return Err(format!("label {n} is not a non-negative integer")),
        },
        Value::String(s) => s
            .trim()
            .parse::<usize>()
            .map_err(|_| format!("label {s:?} is not a non-negative integer"))?,
        other => return Err(format!("label is {}", json_kind(other))),
    };
    let classname = items[2].as_str().ok_or("the class name is not a string")?;
    Ok(Datum::new(impath, label, classname))
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(n).collect::<String>())
    }
}

pub(crate) fn rows_to_json(rows: &[Datum]) -> Value {
    Value::Array(
        rows.iter()
            .map(|d| {
                Value::Array(vec![
                    d.impath.clone().into(),
                    d.label.into(),
                    d.classname.clone().into(),
                ])
            })
            .collect(),
    )
}

/// Serialises lists under the given keys with Dassl's `write_json` layout (4-space indent).
pub(crate) fn to_pretty_json(lists: &[(&str, &[Datum])]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    for (k, rows) in lists {
        map.insert((*k).to_string(), rows_to_json(rows));
    }
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    serde::Serialize::serialize(&Value::Object(map), &mut ser)
        .expect("JSON values always serialise");
    out
}

/// Writes a split file (atomically: temp file + rename).
pub fn write_split_file(path: &Path, splits: &Splits) -> Result<()> {
    let bytes = to_pretty_json(&[
        ("train", &splits.train),
        ("val", &splits.val),
        ("test", &splits.test),
    ]);
    capt_core::fs::write_atomic(path, &bytes).map_err(DataError::write(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_bad_rows_listed_together() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("split.json");
        let splits = Splits {
            train: vec![Datum::new("a/1.jpg", 0, "a"), Datum::new("b/1.jpg", 1, "b")],
            val: vec![Datum::new("a/2.jpg", 0, "a")],
            test: vec![],
        };
        write_split_file(&p, &splits).unwrap();
        let (back, problems) = read_split_file(&p).unwrap();
        assert_eq!(back, splits);
        assert!(problems.is_empty(), "{problems:?}");

        std::fs::write(
            &p,
            r#"{"train": [["x.jpg", 0, "a"], ["y.jpg", -1, "a"], ["z.jpg", 1], 5, ["w.jpg", 2.0, "c"]],
                "val": [["v.jpg", "0", "a"]]}"#,
        )
        .unwrap();
        let (back, problems) = read_split_file(&p).unwrap();
        assert_eq!(back.train.len(), 2);
        assert_eq!(back.train[1], Datum::new("w.jpg", 2, "c"));
        assert_eq!(back.val[0].label, 0);
        let msgs: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert!(
            msgs.iter()
                .any(|m| m.contains("train[1]") && m.contains("-1")),
            "{msgs:?}"
        );
        assert!(msgs
            .iter()
            .any(|m| m.contains("train[2]") && m.contains("2 fields")));
        assert!(msgs.iter().any(|m| m.contains("train[3]")));
        assert!(msgs.iter().any(|m| m.contains("no \"test\" list")));
    }

    #[test]
    fn missing_and_malformed_files_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope.json");
        let e = read_split_file(&p).unwrap_err().to_string();
        assert!(e.contains("nope.json"), "{e}");
        std::fs::write(&p, "[1, 2").unwrap();
        let e = read_split_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("nope.json") && e.contains("not valid JSON"),
            "{e}"
        );
    }
}
