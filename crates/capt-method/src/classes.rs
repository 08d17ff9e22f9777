//! The class set of a tuned model, one rule for every edit (docs/METHOD.md §6): [`retarget`]
//! takes the per-class state (class embeddings and, for CAPT, the candidate tables) from one
//! class list to another. `capt-train eval` on a superset of the trained classes,
//! `capt-export --classes all|FILE` and `capt-edge add-class` / `remove-class` all call it;
//! each brings its own [`PromptEncoder`] (candle in the trainer, the exported text encoder on
//! tract at the edge).
//!
//! What a class keeps and gets:
//! - a class of the old list keeps its embedding `t_c` and its candidate partners in order
//!   (with their weights, pair embeddings and bank cells), minus partners that left the list;
//! - a new class gets `t_c` from the encoder (learned contexts), candidates from the
//!   text-similarity prior over the zero-shot embeddings of the whole list, their SEM pair
//!   embeddings from the encoder, and empty cells;
//! - every row holds `K = min(sem.k_cand, C - 1)` candidates: a row short of `K` is filled
//!   from the prior; slots a kept row gains carry weight 0 (its trained weights are bank
//!   evidence, the prior's are not), a new row carries the prior's weights.

use std::collections::{HashMap, HashSet};

use capt_graph::HostTensor;

use crate::bank::{text_similarity_prior, top_candidates, BankError};
use crate::head::HeadTables;

/// A text to encode, by prompt family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// The class prompt with the learned context (`t_c`).
    Class(String),
    /// The zero-shot template (the prior's text similarity).
    ZeroShot(String),
    /// SEM's commonality prompt of the pair (a, b).
    Com(String, String),
    /// SEM's difference prompt of the pair (a, b).
    Dif(String, String),
}

#[derive(Debug, thiserror::Error)]
pub enum ClassError {
    #[error("{0}")]
    Input(String),
    #[error("text encoder: {0}")]
    Encoder(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Bank(#[from] BankError),
    #[error(transparent)]
    Graph(#[from] capt_graph::Error),
}

type Result<T> = std::result::Result<T, ClassError>;

/// Turns prompts into text embeddings `[D]` (unnormalised, as the text encoder outputs them).
pub trait PromptEncoder {
    fn encode(&mut self, prompts: &[Prompt]) -> Result<Vec<Vec<f32>>>;
}

/// The head's settings a retarget needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadRule {
    /// `sem.k_cand`.
    pub k_cand: usize,
    pub prior_beta: f32,
    pub prior_temperature: f32,
}

/// One candidate slot of a class's row.
#[derive(Debug, Clone, PartialEq)]
struct Cand {
    j: usize,
    w: f32,
    com: Vec<f32>,
    dif: Vec<f32>,
    rev: Vec<f32>,
    cells: Vec<i64>,
}

/// The per-class state: class names, class embeddings `[C, D]`, and the CAPT tables.
#[derive(Debug, Clone)]
pub struct ClassTables {
    pub names: Vec<String>,
    /// F32 `[C, D]`.
    pub class_emb: HostTensor,
    /// The head's tables (`None` without a CAPT head); the pool is shared by all classes.
    pub head: Option<HeadTables<HostTensor>>,
}

/// Checks a class list: not empty, no blank or repeated names.
pub fn check_names(names: &[String]) -> Result<()> {
    if names.is_empty() {
        return Err(ClassError::Input("no class names given".into()));
    }
    let mut seen = HashSet::new();
    for n in names {
        if n.trim().is_empty() {
            return Err(ClassError::Input("a class name is empty".into()));
        }
        if !seen.insert(n.as_str()) {
            return Err(ClassError::Input(format!("`{n}` is given twice")));
        }
    }
    Ok(())
}

fn floats<'t>(t: &'t HostTensor, what: &str) -> Result<&'t [f32]> {
    t.as_f32()
        .ok_or_else(|| ClassError::Input(format!("`{what}` is not float32")))
}

fn ints<'t>(t: &'t HostTensor, what: &str) -> Result<&'t [i64]> {
    t.as_i64()
        .ok_or_else(|| ClassError::Input(format!("`{what}` is not int64")))
}

/// The candidate rows of `t` (`[C, K]` / `[C, K, D]` / `[C, K, 2, M]`) and the cell width.
fn read_rows(t: &HeadTables<HostTensor>, d: usize) -> Result<(usize, Vec<Vec<Cand>>)> {
    let (c, k) = match t.cand_index.dims() {
        [c, k] => (*c, *k),
        dims => {
            return Err(ClassError::Input(format!(
                "`cand_index` has shape {dims:?}, expected [C, K]"
            )))
        }
    };
    let index = ints(&t.cand_index, "cand_index")?;
    let w = floats(&t.cand_weight, "cand_weight")?;
    let (com, dif, rev) = (
        floats(&t.t_com, "t_com")?,
        floats(&t.t_dif, "t_dif")?,
        floats(&t.t_dif_rev, "t_dif_rev")?,
    );
    let cells = ints(&t.cells, "cells")?;
    let m2 = cells.len() / (c * k).max(1);
    let sized = |v: &[f32], n: usize| v.len() == c * k * n;
    if index.len() != c * k || !sized(w, 1) || !sized(com, d) || !sized(dif, d) || !sized(rev, d) {
        return Err(ClassError::Input(format!(
            "the CAPT tables do not hold {c} classes x {k} candidates x {d} dims"
        )));
    }
    let rows = (0..c)
        .map(|y| {
            (0..k)
                .map(|i| {
                    let r = y * k + i;
                    Cand {
                        j: index[r] as usize,
                        w: w[r],
                        com: com[r * d..(r + 1) * d].to_vec(),
                        dif: dif[r * d..(r + 1) * d].to_vec(),
                        rev: rev[r * d..(r + 1) * d].to_vec(),
                        cells: cells[r * m2..(r + 1) * m2].to_vec(),
                    }
                })
                .collect()
        })
        .collect();
    Ok((m2, rows))
}

/// The tables of `rows` (the pool tensors are kept from `old`).
fn write_rows(
    old: HeadTables<HostTensor>,
    rows: &[Vec<Cand>],
    k: usize,
    d: usize,
    m2: usize,
) -> Result<HeadTables<HostTensor>> {
    let c = rows.len();
    let all = || rows.iter().flatten();
    let table = |f: fn(&Cand) -> &[f32]| {
        HostTensor::f32(vec![c, k, d], all().flat_map(|x| f(x).to_vec()).collect())
    };
    Ok(HeadTables {
        cand_index: HostTensor::i64(vec![c, k], all().map(|x| x.j as i64).collect())?,
        cand_weight: HostTensor::f32(vec![c, k], all().map(|x| x.w).collect())?,
        t_com: table(|x| &x.com)?,
        t_dif: table(|x| &x.dif)?,
        t_dif_rev: table(|x| &x.rev)?,
        pool_global: old.pool_global,
        pool_local: old.pool_local,
        cells: HostTensor::i64(
            vec![c, k, 2, m2 / 2],
            all().flat_map(|x| x.cells.clone()).collect(),
        )?,
    })
}

fn normalise(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter().map(|x| x / n).collect()
}

/// Prior-only `Nhat` (no confusion counts) from the classes' zero-shot embeddings.
fn prior(rule: &HeadRule, zs: &[Vec<f32>]) -> Result<Vec<f32>> {
    let zs: Vec<Vec<f32>> = zs.iter().map(|v| normalise(v)).collect();
    let c = zs.len();
    let mut sim = vec![0.0f32; c * c];
    for i in 0..c {
        for j in 0..c {
            sim[i * c + j] = zs[i].iter().zip(&zs[j]).map(|(a, b)| a * b).sum();
        }
    }
    Ok(text_similarity_prior(
        &vec![0.0; c * c],
        c,
        &sim,
        rule.prior_beta,
        rule.prior_temperature,
    )?)
}

/// Takes `t` from its class list to `target`, as the module documents. `rule` is required
/// when `t` has a head; `enc` encodes only what is new.
pub fn retarget(
    t: ClassTables,
    target: &[String],
    rule: Option<&HeadRule>,
    enc: &mut dyn PromptEncoder,
) -> Result<ClassTables> {
    check_names(target)?;
    let min = if t.head.is_some() { 2 } else { 1 };
    if target.len() < min {
        return Err(ClassError::Input(format!(
            "the new class list has {} class(es); the classifier needs at least {min}",
            target.len()
        )));
    }
    let d = match t.class_emb.dims() {
        [c, d] if *c == t.names.len() => *d,
        dims => {
            return Err(ClassError::Input(format!(
                "class embeddings of shape {dims:?} for {} classes",
                t.names.len()
            )))
        }
    };
    let old: HashMap<&str, usize> = t
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let was: Vec<Option<usize>> = target
        .iter()
        .map(|n| old.get(n.as_str()).copied())
        .collect();
    let new_at: HashMap<usize, usize> = was
        .iter()
        .enumerate()
        .filter_map(|(y, o)| o.map(|o| (o, y)))
        .collect();
    let emb = floats(&t.class_emb, "class_emb")?;
    let c = target.len();
    let rule = match (&t.head, rule) {
        (Some(_), None) => {
            return Err(ClassError::Input(
                "the CAPT tables need the head's k_cand and prior settings".into(),
            ))
        }
        (Some(_), Some(r)) => Some(*r),
        (None, _) => None,
    };
    let k = rule.map_or(0, |r| r.k_cand.min(c - 1));
    // Kept rows, remapped to the new indices, without partners that left.
    let (m2, mut rows) = match &t.head {
        Some(h) => {
            let (m2, old_rows) = read_rows(h, d)?;
            let rows: Vec<Vec<Cand>> = was
                .iter()
                .map(|o| match o {
                    Some(o) => old_rows[*o]
                        .iter()
                        .filter_map(|x| new_at.get(&x.j).map(|&j| Cand { j, ..x.clone() }))
                        .take(k)
                        .collect(),
                    None => Vec::new(),
                })
                .collect();
            (m2, rows)
        }
        None => (0, Vec::new()),
    };
    let fill = rows.iter().any(|r| r.len() < k);
    // One encoder run: the new classes' t_c, then (when rows need filling) every class's
    // zero-shot embedding for the prior.
    let mut prompts: Vec<Prompt> = target
        .iter()
        .zip(&was)
        .filter(|(_, o)| o.is_none())
        .map(|(n, _)| Prompt::Class(n.clone()))
        .collect();
    let n_new = prompts.len();
    if fill {
        prompts.extend(target.iter().map(|n| Prompt::ZeroShot(n.clone())));
    }
    let encoded = if prompts.is_empty() {
        vec![]
    } else {
        enc.encode(&prompts)?
    };
    if encoded.len() != prompts.len() || encoded.iter().any(|v| v.len() != d) {
        return Err(ClassError::Input(format!(
            "the text encoder returned {} embeddings for {} prompts (width {d} expected)",
            encoded.len(),
            prompts.len()
        )));
    }
    let (fresh, zs) = encoded.split_at(n_new);
    let mut fresh = fresh.iter();
    let class_emb: Vec<f32> = was
        .iter()
        .flat_map(|o| match o {
            Some(o) => emb[o * d..(o + 1) * d].to_vec(),
            None => fresh.next().expect("one embedding per new class").clone(),
        })
        .collect();
    let head = match (t.head, rule) {
        (Some(h), Some(rule)) => {
            if fill {
                let nhat = prior(&rule, zs)?;
                let order = top_candidates(&nhat, c, c - 1);
                let mut wanted: Vec<(usize, usize, f32)> = Vec::new();
                for (y, row) in rows.iter().enumerate() {
                    let have: HashSet<usize> = row.iter().map(|x| x.j).collect();
                    let kept = was[y].is_some();
                    let slots = &order.index[y * order.k..(y + 1) * order.k];
                    wanted.extend(
                        slots
                            .iter()
                            .map(|&j| j as usize)
                            .filter(|j| !have.contains(j))
                            .take(k - row.len())
                            .map(|j| (y, j, if kept { 0.0 } else { nhat[y * c + j] })),
                    );
                }
                let mut pairs = Vec::with_capacity(3 * wanted.len());
                for &(y, j, _) in &wanted {
                    let (a, b) = (&target[y], &target[j]);
                    pairs.push(Prompt::Com(a.clone(), b.clone()));
                    pairs.push(Prompt::Dif(a.clone(), b.clone()));
                    pairs.push(Prompt::Dif(b.clone(), a.clone()));
                }
                let pe = if pairs.is_empty() {
                    vec![]
                } else {
                    enc.encode(&pairs)?
                };
                if pe.len() != pairs.len() {
                    return Err(ClassError::Input(format!(
                        "the text encoder returned {} embeddings for {} pair prompts",
                        pe.len(),
                        pairs.len()
                    )));
                }
                for (n, &(y, j, w)) in wanted.iter().enumerate() {
                    rows[y].push(Cand {
                        j,
                        w,
                        com: pe[3 * n].clone(),
                        dif: pe[3 * n + 1].clone(),
                        rev: pe[3 * n + 2].clone(),
                        cells: vec![-1; m2],
                    });
                }
            }
            Some(write_rows(h, &rows, k, d, m2)?)
        }
        _ => None,
    };
    Ok(ClassTables {
        names: target.to_vec(),
        class_emb: HostTensor::f32(vec![c, d], class_emb)?,
        head,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes a prompt as a one-hot-ish vector derived from its text, counting calls.
    struct Fake {
        d: usize,
        calls: Vec<Vec<Prompt>>,
    }

    impl PromptEncoder for Fake {
        fn encode(&mut self, prompts: &[Prompt]) -> Result<Vec<Vec<f32>>> {
            self.calls.push(prompts.to_vec());
            Ok(prompts
                .iter()
                .map(|p| {
                    let s = format!("{p:?}");
                    (0..self.d)
                        .map(|i| {
                            ((s.len() * 7 + i * 13 + s.as_bytes()[i % s.len()] as usize) % 17)
                                as f32
                        })
                        .collect()
                })
                .collect())
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn tables(c: usize, k: usize, d: usize) -> ClassTables {
        let idx: Vec<i64> = (0..c)
            .flat_map(|y| (1..=k).map(move |s| ((y + s) % c) as i64))
            .collect();
        let f = |n: usize, base: f32| (0..n).map(|i| base + i as f32).collect::<Vec<f32>>();
        ClassTables {
            names: (0..c).map(|i| format!("c{i}")).collect(),
            class_emb: HostTensor::f32(vec![c, d], f(c * d, 0.5)).unwrap(),
            head: Some(HeadTables {
                cand_index: HostTensor::i64(vec![c, k], idx).unwrap(),
                cand_weight: HostTensor::f32(vec![c, k], f(c * k, 0.1)).unwrap(),
                t_com: HostTensor::f32(vec![c, k, d], f(c * k * d, 1.0)).unwrap(),
                t_dif: HostTensor::f32(vec![c, k, d], f(c * k * d, 2.0)).unwrap(),
                t_dif_rev: HostTensor::f32(vec![c, k, d], f(c * k * d, 3.0)).unwrap(),
                pool_global: HostTensor::f32(vec![1, d], vec![0.0; d]).unwrap(),
                pool_local: HostTensor::f32(vec![1, 1, d], vec![0.0; d]).unwrap(),
                cells: HostTensor::i64(vec![c, k, 2, 1], (0..(c * k * 2) as i64).collect())
                    .unwrap(),
            }),
        }
    }

    const RULE: HeadRule = HeadRule {
        k_cand: 8,
        prior_beta: 1.0,
        prior_temperature: 0.05,
    };

    #[test]
    fn add_then_remove_restores_and_kept_rows_gain_zero_weight() {
        let (c, d) = (4, 3);
        let t0 = tables(c, c - 1, d);
        let mut enc = Fake { d, calls: vec![] };
        let mut target = t0.names.clone();
        target.extend(names(&["new a", "new b"]));
        let t1 = retarget(t0.clone(), &target, Some(&RULE), &mut enc).unwrap();
        let h = t1.head.as_ref().unwrap();
        assert_eq!(h.cand_index.dims(), &[6, 5]);
        let idx = h.cand_index.as_i64().unwrap();
        let w = h.cand_weight.as_f32().unwrap();
        let old_idx = t0.head.as_ref().unwrap().cand_index.as_i64().unwrap();
        for y in 0..c {
            assert_eq!(
                &idx[y * 5..y * 5 + 3],
                &old_idx[y * 3..y * 3 + 3],
                "row {y} kept"
            );
            assert_eq!(
                &w[y * 5 + 3..y * 5 + 5],
                &[0.0, 0.0],
                "gained slots weigh 0"
            );
        }
        for y in c..6 {
            assert!(
                w[y * 5..y * 5 + 5].iter().all(|&v| v > 0.0),
                "new rows carry the prior"
            );
            let cells = &h.cells.as_i64().unwrap()[y * 10..y * 10 + 10];
            assert!(cells.iter().all(|&v| v == -1), "new rows have empty cells");
        }
        // Class embeddings of kept classes are untouched; two encoder runs (classes + prior,
        // then pairs), the first with the two new class prompts.
        assert_eq!(
            &t1.class_emb.as_f32().unwrap()[..c * d],
            t0.class_emb.as_f32().unwrap()
        );
        assert_eq!(enc.calls.len(), 2);
        assert_eq!(
            enc.calls[0][..2],
            [Prompt::Class("new a".into()), Prompt::Class("new b".into())]
        );
        // Removing them again gives back the original tables exactly.
        let t2 = retarget(t1, &t0.names, Some(&RULE), &mut enc).unwrap();
        assert_eq!(enc.calls.len(), 2, "nothing to encode on removal");
        let (a, b) = (t2.head.unwrap(), t0.head.unwrap());
        assert_eq!(a.cand_index, b.cand_index);
        assert_eq!(a.cand_weight, b.cand_weight);
        assert_eq!(a.t_dif_rev, b.t_dif_rev);
        assert_eq!(a.cells, b.cells);
        assert_eq!(t2.class_emb, t0.class_emb);
    }

    #[test]
    fn reorder_remaps_partners_and_bad_lists_are_named() {
        let t0 = tables(4, 3, 2);
        let mut enc = Fake {
            d: 2,
            calls: vec![],
        };
        let rev: Vec<String> = t0.names.iter().rev().cloned().collect();
        let t1 = retarget(t0.clone(), &rev, Some(&RULE), &mut enc).unwrap();
        assert!(enc.calls.is_empty(), "a reorder encodes nothing");
        let (i0, i1) = (
            t0.head.as_ref().unwrap().cand_index.as_i64().unwrap(),
            t1.head.as_ref().unwrap().cand_index.as_i64().unwrap(),
        );
        for y in 0..4 {
            for s in 0..3 {
                assert_eq!(i1[(3 - y) * 3 + s], 3 - i0[y * 3 + s]);
            }
        }
        let e = retarget(t0.clone(), &names(&["c0"]), Some(&RULE), &mut enc).unwrap_err();
        assert!(e.to_string().contains("at least 2"), "{e}");
        let e = retarget(t0.clone(), &names(&["c0", "c0"]), Some(&RULE), &mut enc).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = retarget(t0, &names(&["c0", "c1"]), None, &mut enc).unwrap_err();
        assert!(e.to_string().contains("k_cand"), "{e}");
    }
}
