//! `data check`: reads a dataset leniently, counts images per split and class, opens every
//! image (in parallel) and lists every problem at once.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use capt_core::decode_image;
use rayon::prelude::*;

use crate::datum::{Problem, Severity, Split};
use crate::fsutil::join_rel;
use crate::readers::LoadOptions;
use crate::Dataset;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassCount {
    pub label: usize,
    pub classname: String,
    pub count: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitReport {
    pub split: Split,
    pub total: usize,
    pub classes: Vec<ClassCount>,
}

#[derive(Debug, Clone)]
pub struct CheckReport {
    pub dataset: String,
    pub source: Option<PathBuf>,
    pub image_dir: Option<PathBuf>,
    pub splits: Vec<SplitReport>,
    /// Distinct image files looked at.
    pub images_checked: usize,
    pub problems: Vec<Problem>,
}

impl CheckReport {
    pub fn errors(&self) -> usize {
        self.problems.iter().filter(|p| p.is_error()).count()
    }

    pub fn warnings(&self) -> usize {
        self.problems.len() - self.errors()
    }

    pub fn is_ok(&self) -> bool {
        self.errors() == 0
    }

    /// Human-readable report: counts per split and class, then every problem.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "dataset {}", self.dataset);
        if let Some(p) = &self.source {
            let _ = writeln!(s, "  splits from {}", p.display());
        }
        if let Some(p) = &self.image_dir {
            let _ = writeln!(s, "  images in   {}", p.display());
        }
        for sp in &self.splits {
            let _ = writeln!(
                s,
                "{}: {} images, {} classes",
                sp.split,
                sp.total,
                sp.classes.len()
            );
            for c in &sp.classes {
                let _ = writeln!(s, "  {:>5}  {:<40} {}", c.label, c.classname, c.count);
            }
        }
        let _ = writeln!(s, "images checked: {}", self.images_checked);
        if !self.problems.is_empty() {
            let _ = writeln!(s, "problems ({}):", self.problems.len());
            for p in &self.problems {
                let _ = writeln!(s, "  {p}");
            }
        }
        let _ = writeln!(
            s,
            "{}: {} error(s), {} warning(s)",
            if self.is_ok() { "OK" } else { "FAILED" },
            self.errors(),
            self.warnings()
        );
        s
    }
}

/// Checks a dataset folder. `decode` opens and decodes every image; without it only
/// existence is checked.
pub fn check_dataset(opts: &LoadOptions, decode: bool) -> CheckReport {
    let (ds, mut problems) = match Dataset::scan(opts) {
        Ok(x) => x,
        Err(e) => {
            return CheckReport {
                dataset: opts.kind.name().to_string(),
                source: None,
                image_dir: None,
                splits: Vec::new(),
                images_checked: 0,
                problems: vec![Problem::error(e.to_string())],
            }
        }
    };
    let splits = Split::ALL
        .iter()
        .map(|&split| {
            let mut per: BTreeMap<usize, usize> = BTreeMap::new();
            for d in ds.split(split) {
                *per.entry(d.label).or_default() += 1;
            }
            SplitReport {
                split,
                total: ds.split(split).len(),
                classes: per
                    .into_iter()
                    .map(|(label, count)| ClassCount {
                        label,
                        classname: ds.classnames.get(label).cloned().unwrap_or_default(),
                        count,
                    })
                    .collect(),
            }
        })
        .collect();
    // Each distinct file once (ImageNet's val is its test set; test-only sets list images twice).
    let mut seen = HashSet::new();
    let mut todo = Vec::new();
    for split in Split::ALL {
        for (i, d) in ds.split(split).iter().enumerate() {
            if seen.insert(d.impath.as_str()) {
                todo.push((split, i, d));
            }
        }
    }
    let source = ds.source.display().to_string();
    let image_problems: Vec<Problem> = todo
        .par_iter()
        .filter_map(|&(split, i, d)| {
            let path = join_rel(&ds.image_dir, &d.impath);
            let entry = format!("{split}[{i}] {:?} (label {}, {:?})", d.impath, d.label, d.classname);
            if !path.is_file() {
                return Some(Problem::error(format!(
                    "missing image {} for {entry}; restore the file or remove the entry from {source}",
                    path.display()
                )));
            }
            if decode {
                let why = match std::fs::read(&path) {
                    Err(e) => Some(format!("cannot read {}: {e}", path.display())),
                    Ok(bytes) if jpeg_truncated(&bytes) => Some(format!(
                        "{} is a truncated JPEG (no end-of-image marker; decoders fill the rest with grey)",
                        path.display()
                    )),
                    Ok(bytes) => decode_image(&bytes, &path.display().to_string())
                        .err()
                        .map(|e| e.to_string()),
                };
                if let Some(why) = why {
                    return Some(Problem::error(format!(
                        "undecodable image for {entry}: {why}; replace the file or remove the entry from {source}"
                    )));
                }
            }
            None
        })
        .collect();
    problems.extend(image_problems);
    problems.sort_by_key(|p| std::cmp::Reverse(p.severity == Severity::Error));
    CheckReport {
        dataset: format!("{} ({})", ds.name, ds.dataset_dir.display()),
        source: Some(ds.source.clone()),
        image_dir: Some(ds.image_dir.clone()),
        splits,
        images_checked: todo.len(),
        problems,
    }
}

/// A JPEG whose end-of-image marker (FF D9) is missing from its tail. Entropy-coded data
/// never contains FF D9 (FF is always stuffed or a restart marker), so a file cut short
/// has none near its end, while trailing padding after a real EOI is tolerated.
pub fn jpeg_truncated(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xff, 0xd8]) {
        return false;
    }
    let tail = &bytes[bytes.len().saturating_sub(4096)..];
    !tail.windows(2).any(|w| w == [0xff, 0xd9])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_jpeg_detection() {
        assert!(jpeg_truncated(&[0xff, 0xd8, 0xff, 0xe0, 1, 2, 3]));
        assert!(!jpeg_truncated(&[0xff, 0xd8, 0xff, 0xe0, 1, 0xff, 0xd9]));
        assert!(!jpeg_truncated(&[0xff, 0xd8, 1, 0xff, 0xd9, 0, 0, 0]));
        assert!(!jpeg_truncated(b"\x89PNG not a jpeg"));
    }
}
