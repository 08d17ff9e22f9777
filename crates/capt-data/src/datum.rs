//! Dassl's `Datum` (image path, label, class name), the three splits, and the problems a
//! reader finds in them.

use std::collections::BTreeMap;
use std::fmt;

/// One labelled image. `impath` is relative to the dataset's image folder (as in CoOp's
/// split files), with `/` separators.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Datum {
    pub impath: String,
    pub label: usize,
    pub classname: String,
}

impl Datum {
    pub fn new(impath: impl Into<String>, label: usize, classname: impl Into<String>) -> Self {
        Self {
            impath: impath.into(),
            label,
            classname: classname.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    /// The key used in split files.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Train / val / test lists in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Splits {
    pub train: Vec<Datum>,
    pub val: Vec<Datum>,
    pub test: Vec<Datum>,
}

impl Splits {
    pub fn get(&self, split: Split) -> &[Datum] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
            Split::Test => &self.test,
        }
    }

    pub fn get_mut(&mut self, split: Split) -> &mut Vec<Datum> {
        match split {
            Split::Train => &mut self.train,
            Split::Val => &mut self.val,
            Split::Test => &mut self.test,
        }
    }

    /// Class name per label over all splits (first name seen wins; `check_labels`
    /// reports disagreements).
    pub fn label_names(&self) -> BTreeMap<usize, String> {
        let mut names = BTreeMap::new();
        for split in Split::ALL {
            for d in self.get(split) {
                names.entry(d.label).or_insert_with(|| d.classname.clone());
            }
        }
        names
    }

    /// Label/class name consistency over all splits: a label must keep one class name and a
    /// class name one label. Each conflict is reported once, at its first entry, with the
    /// number of entries involved. `source` names the file the entries came from.
    pub fn check_labels(&self, source: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut by_label: BTreeMap<usize, (String, String)> = BTreeMap::new();
        let mut by_name: BTreeMap<String, (usize, String)> = BTreeMap::new();
        // (label, name) -> (first entry, its path, the other side's first entry, count)
        let mut name_conflicts: BTreeMap<(usize, String), (String, String, String, usize)> =
            BTreeMap::new();
        let mut label_conflicts: BTreeMap<(String, usize), (String, String, String, usize)> =
            BTreeMap::new();
        for split in Split::ALL {
            for (i, d) in self.get(split).iter().enumerate() {
                let here = format!("{split}[{i}]");
                let (name, first) = by_label
                    .entry(d.label)
                    .or_insert_with(|| (d.classname.clone(), here.clone()));
                if *name != d.classname {
                    let e = name_conflicts
                        .entry((d.label, d.classname.clone()))
                        .or_insert_with(|| {
                            (
                                here.clone(),
                                d.impath.clone(),
                                format!("{first} named it {name:?}"),
                                0,
                            )
                        });
                    e.3 += 1;
                }
                let (label, first) = by_name
                    .entry(d.classname.clone())
                    .or_insert_with(|| (d.label, here.clone()));
                if *label != d.label {
                    let e = label_conflicts
                        .entry((d.classname.clone(), d.label))
                        .or_insert_with(|| {
                            (
                                here.clone(),
                                d.impath.clone(),
                                format!("{first} gave it label {label}"),
                                0,
                            )
                        });
                    e.3 += 1;
                }
            }
        }
        let more = |n: usize| {
            if n > 1 {
                format!(" (and {} more entries)", n - 1)
            } else {
                String::new()
            }
        };
        for ((label, name), (here, impath, other, n)) in name_conflicts {
            problems.push(Problem::error(format!(
                "{source}: {here} ({impath:?}) gives label {label} the class name {name:?}{}, but {other}; \
                 one label must have one class name, fix the label or class name",
                more(n)
            )));
        }
        for ((name, label), (here, impath, other, n)) in label_conflicts {
            problems.push(Problem::error(format!(
                "{source}: {here} ({impath:?}) gives class {name:?} label {label}{}, but {other}; \
                 one class name must have one label, fix the label or class name",
                more(n)
            )));
        }
        if let Some(&max) = by_label.keys().next_back() {
            let missing: Vec<usize> = (0..=max).filter(|l| !by_label.contains_key(l)).collect();
            if !missing.is_empty() {
                problems.push(Problem::warning(format!(
                    "{source}: labels {} have no entries in any split (labels are 0..{max}); \
                     their class names are unknown",
                    short_list(&missing)
                )));
            }
        }
        problems
    }
}

fn short_list(v: &[usize]) -> String {
    let shown: Vec<String> = v.iter().take(10).map(|x| x.to_string()).collect();
    if v.len() > 10 {
        format!("{} ... ({} in all)", shown.join(", "), v.len())
    } else {
        shown.join(", ")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

/// A problem found while reading or checking a dataset. The message names the file, entry
/// or image and says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub message: String,
}

impl Problem {
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            message: message.into(),
        }
    }

    pub fn warning(message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            message: message.into(),
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        write!(f, "{tag}: {}", self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_name_mismatch_is_reported_with_entry() {
        let splits = Splits {
            train: vec![Datum::new("a/1.jpg", 0, "a"), Datum::new("b/1.jpg", 1, "b")],
            val: vec![Datum::new("a/2.jpg", 0, "aa")],
            test: vec![Datum::new("b/2.jpg", 0, "b")],
        };
        let p = splits.check_labels("s.json");
        assert_eq!(p.iter().filter(|p| p.is_error()).count(), 3, "{p:?}");
        assert!(p[0].message.contains("val[0]") && p[0].message.contains("\"aa\""));
        assert!(p.iter().any(|p| p.message.contains("test[0]")));

        // One conflict over many entries is one problem.
        let many = Splits {
            train: (0..5)
                .map(|i| Datum::new(format!("{i}"), 0, if i == 0 { "x" } else { "y" }))
                .collect(),
            ..Default::default()
        };
        let p = many.check_labels("s.json");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].message.contains("train[1]") && p[0].message.contains("and 3 more"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn label_gaps_are_a_warning() {
        let splits = Splits {
            train: vec![Datum::new("a", 0, "a"), Datum::new("c", 2, "c")],
            ..Default::default()
        };
        let p = splits.check_labels("s.json");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].severity, Severity::Warning);
        assert!(p[0].message.contains("labels 1 have"));
    }
}
