//! Tests of the head executed by candle on CPU, against hand computations and a plain-Rust
//! f64 reference of docs/METHOD.md §2-§4.

use std::collections::BTreeMap;

use candle_core::{DType as CDType, Device, Tensor, Var};
use capt_graph::{CandleOps, DType, Ops};

use super::*;
use crate::config::{CaptConfig, Method};

const C: usize = 5;
const D: usize = 8;
const G: usize = 4;
const K: usize = 3;
const M: usize = 2;
const KP: usize = 2;
const KS: usize = 3;
const P: usize = 6;

type Res<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

fn capt_config(method: Method) -> CaptConfig {
    let mut c = CaptConfig {
        method,
        ..CaptConfig::default()
    };
    c.sem.k_cand = K;
    c.sem.k_pairs = KP;
    c.sam.k_samples = KS;
    c.sam.reduction = 2;
    c.bank.cell_size = M;
    c
}

fn head_cfg(method: Method) -> HeadConfig {
    HeadConfig::from_config(&capt_config(method), C, D, G).unwrap()
}

/// Deterministic values in [-1, 1) (splitmix64).
fn values(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

/// All inputs, tables and parameters of one test case, on the host in f64.
#[derive(Clone)]
struct Case {
    cfg: HeadConfig,
    n: usize,
    f: Vec<f64>,
    l: Vec<f64>,
    t: Vec<f64>,
    logit_scale: f64,
    cand: Vec<i64>,
    nhat: Vec<f64>,
    t_com: Vec<f64>,
    t_dif: Vec<f64>,
    t_dif_rev: Vec<f64>,
    p: usize,
    pool_g: Vec<f64>,
    pool_l: Vec<f64>,
    cells: Vec<i64>,
    params: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
}

/// Images of classes 0, 2 and 4 (by construction the argmax). Class 0's cells are mostly
/// filled, class 2 has one valid slot per candidate (fewer than K_s after pairing), class 4's
/// cells are all empty. Parameters start at their initial values.
fn case(method: Method) -> Case {
    let cfg = head_cfg(method);
    let t = values(1, C * D);
    let classes = [0usize, 2, 4];
    let noise = values(2, classes.len() * D);
    let f: Vec<f64> = classes
        .iter()
        .enumerate()
        .flat_map(|(n, &c)| (0..D).map(move |d| (n, c, d)))
        .map(|(n, c, d)| 1.5 * t[c * D + d] + 0.3 * noise[n * D + d])
        .collect();
    let cand = (0..C)
        .flat_map(|c| [1usize, 3, 4].map(|o| ((c + o) % C) as i64))
        .collect();
    let nhat = values(3, C * K)
        .iter()
        .map(|v| 0.2 + 0.8 * v.abs())
        .collect();
    let mut cells = vec![-1i64; C * K * 2 * M];
    for (i, cell) in cells.iter_mut().enumerate() {
        let (c, m, dir) = (i / (K * 2 * M), i % M, (i / M) % 2);
        let slot = ((i * 5 + 1) % P) as i64;
        *cell = match c {
            4 => -1,
            2 if dir == 0 && m == 0 => slot,
            2 => -1,
            _ if i % 5 == 3 => -1,
            _ => slot,
        };
    }
    let mut params = BTreeMap::new();
    for (name, shape, data) in init_head_params(&cfg, 11) {
        params.insert(name, (shape, data.iter().map(|&v| v as f64).collect()));
    }
    Case {
        n: classes.len(),
        l: values(4, classes.len() * G * D),
        t,
        f,
        logit_scale: 20f64.ln(),
        cand,
        nhat,
        t_com: values(5, C * K * D),
        t_dif: values(6, C * K * D),
        t_dif_rev: values(7, C * K * D),
        p: P,
        pool_g: values(8, P * D),
        pool_l: values(9, P * G * D),
        cells,
        params,
        cfg,
    }
}

/// `case` with every parameter non-zero (a "trained" head): experts active, router non-flat.
fn trained(method: Method) -> Case {
    let mut c = case(method);
    for (i, (name, (_, data))) in c.params.iter_mut().enumerate() {
        let r = values(100 + i as u64, data.len());
        for (v, r) in data.iter_mut().zip(r) {
            *v = match name.as_str() {
                GAINS => 0.0,
                ALPHA => 0.4,
                n if n.ends_with("fc2.weight") => 0.6 * r,
                n if n.ends_with("fc2.bias") => 0.1 * r,
                ROUTER => 1.5 * r,
                _ => *v,
            };
        }
    }
    c.set(GAINS, &[0.8, -0.6, 1.1]);
    c
}

impl Case {
    fn set(&mut self, name: &str, v: &[f64]) {
        let p = self.params.get_mut(name).expect("known parameter");
        assert_eq!(p.1.len(), v.len());
        p.1 = v.to_vec();
    }

    fn param(&self, name: &str) -> &[f64] {
        &self.params[name].1
    }

    /// Host tensors by name: parameters and every float input/table.
    fn floats(&self) -> Vec<(String, Vec<usize>, Vec<f64>)> {
        let (n, c, p) = (self.n, C, self.p);
        let mut v = vec![
            ("image_global".into(), vec![n, D], self.f.clone()),
            ("image_local".into(), vec![n, G, D], self.l.clone()),
            ("class_emb".into(), vec![c, D], self.t.clone()),
            ("logit_scale".into(), vec![1], vec![self.logit_scale]),
            ("cand_weight".into(), vec![c, K], self.nhat.clone()),
            ("t_com".into(), vec![c, K, D], self.t_com.clone()),
            ("t_dif".into(), vec![c, K, D], self.t_dif.clone()),
            ("t_dif_rev".into(), vec![c, K, D], self.t_dif_rev.clone()),
            ("pool_global".into(), vec![p, D], self.pool_g.clone()),
            ("pool_local".into(), vec![p, G, D], self.pool_l.clone()),
        ];
        for (name, (shape, data)) in &self.params {
            v.push((name.clone(), shape.clone(), data.clone()));
        }
        v
    }

    /// Candle values; with `vars`, every float tensor the training graph would differentiate
    /// (parameters, image features, class / COM / DIF tables) is a `Var` (returned by name);
    /// the bank pool, `Nhat` and `logit_scale` stay constants, as in training.
    fn build(&self, dt: CDType, vars: bool) -> Built {
        let dev = Device::Cpu;
        let mut by_name = BTreeMap::new();
        let mut var_list = Vec::new();
        for (name, shape, data) in self.floats() {
            let t = Tensor::from_vec(data, shape, &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let constant = ["pool_global", "pool_local", "cand_weight", "logit_scale"];
            let t = if vars && !constant.contains(&name.as_str()) {
                let v = Var::from_tensor(&t).unwrap();
                let t = v.as_tensor().clone();
                var_list.push((name.clone(), v));
                t
            } else {
                t
            };
            by_name.insert(name, t);
        }
        let fdt = if dt == CDType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let mut ops = CandleOps::new(&dev, fdt).unwrap();
        for name in self.params.keys() {
            ops.insert(name.clone(), by_name[name].clone());
        }
        let idx = |v: &[i64], shape: &[usize]| Tensor::from_slice(v, shape, &dev).unwrap();
        let get = |n: &str| by_name[n].clone();
        Built {
            x: HeadInputs {
                image_global: get("image_global"),
                image_local: get("image_local"),
                class_emb: get("class_emb"),
                logit_scale: get("logit_scale"),
            },
            t: HeadTables {
                cand_index: idx(&self.cand, &[C, K]),
                cand_weight: get("cand_weight"),
                t_com: get("t_com"),
                t_dif: get("t_dif"),
                t_dif_rev: get("t_dif_rev"),
                pool_global: get("pool_global"),
                pool_local: get("pool_local"),
                cells: idx(&self.cells, &[C, K, 2, M]),
            },
            ops,
            vars: var_list,
        }
    }

    fn run(&self, dt: CDType) -> Out {
        let b = self.build(dt, false);
        let o = capt_head(&b.ops, &self.cfg, &b.x, &b.t).unwrap();
        Out {
            logits: host(&o.logits),
            base: host(&o.base_logits),
            gates: host(&o.gates),
            pairs: o.pairs.flatten_all().unwrap().to_vec1::<i64>().unwrap(),
        }
    }
}

struct Built {
    ops: CandleOps,
    x: HeadInputs<Tensor>,
    t: HeadTables<Tensor>,
    vars: Vec<(String, Var)>,
}

#[derive(Debug)]
struct Out {
    logits: Vec<f64>,
    base: Vec<f64>,
    gates: Vec<f64>,
    pairs: Vec<i64>,
}

fn host(t: &Tensor) -> Vec<f64> {
    t.to_dtype(CDType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}[{i}]: got {g}, want {w}\n got {got:?}\nwant {want:?}"
        );
    }
}

// ---- plain-Rust reference (f64, loops) --------------------------------------------------

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(v: &[f64]) -> Vec<f64> {
    let n = dot(v, v).sqrt().max(1e-12);
    v.iter().map(|x| x / n).collect()
}

fn softmax(v: &[f64]) -> Vec<f64> {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = v.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// erf by its Taylor series (exact to ~1e-13 for the |x| < 4 seen here).
fn erf(x: f64) -> f64 {
    assert!(x.abs() < 4.0, "reference erf used outside its range: {x}");
    let (mut term, mut sum, mut n) = (x, x, 0.0);
    while term.abs() > 1e-17 {
        n += 1.0;
        term *= -x * x / n;
        sum += term / (2.0 * n + 1.0);
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

fn linear(x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
    b.iter()
        .enumerate()
        .map(|(o, bo)| bo + dot(&w[o * x.len()..(o + 1) * x.len()], x))
        .collect()
}

fn mlp(case: &Case, prefix: &str, x: &[f64]) -> Vec<f64> {
    let p = |n: &str| case.param(&format!("{prefix}.{n}"));
    let h: Vec<f64> = linear(x, p("fc1.weight"), p("fc1.bias"))
        .iter()
        .map(|&v| 0.5 * v * (1.0 + erf(v / 2f64.sqrt())))
        .collect();
    linear(&h, p("fc2.weight"), p("fc2.bias"))
}

fn row(v: &[f64], i: usize, len: usize) -> &[f64] {
    &v[i * len..(i + 1) * len]
}

/// Per image: everything the head computes, by the spec's formulas.
#[derive(Debug)]
struct RefImage {
    base: Vec<f64>,
    logits: Vec<f64>,
    gates: Vec<f64>,
    class: usize,
    /// Candidate positions and partner classes, best first.
    picks: Vec<(usize, usize)>,
    /// Retrieved (slot, weight), best first.
    samples: Vec<(usize, f64)>,
    f: Vec<f64>,
    f_sam: Vec<f64>,
    dz: [Vec<f64>; 3],
}

fn reference(case: &Case) -> Vec<RefImage> {
    let cfg = &case.cfg;
    let tau = case.logit_scale.exp();
    let tn: Vec<Vec<f64>> = (0..C).map(|c| norm(row(&case.t, c, D))).collect();
    (0..case.n)
        .map(|n| {
            let f = norm(row(&case.f, n, D));
            let base: Vec<f64> = tn.iter().map(|t| tau * dot(&f, t)).collect();
            let class = (0..C).fold(0, |b, c| if base[c] > base[b] { c } else { b });
            let p = softmax(&base);
            let score: Vec<f64> = (0..K)
                .map(|k| case.nhat[class * K + k] * p[case.cand[class * K + k] as usize])
                .collect();
            let mut order: Vec<usize> = (0..K).collect();
            order.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
            let picks: Vec<(usize, usize)> = order[..KP]
                .iter()
                .map(|&k| (k, case.cand[class * K + k] as usize))
                .collect();
            let mut support = vec![class];
            support.extend(picks.iter().map(|p| p.1));
            let tab = |v: &Vec<f64>, k: usize| norm(row(v, class * K + k, D));
            let on_support = |fnew: &[f64]| -> Vec<f64> {
                (0..C)
                    .map(|c| {
                        if support.contains(&c) {
                            tau * (dot(fnew, &tn[c]) - dot(&f, &tn[c]))
                        } else {
                            0.0
                        }
                    })
                    .collect()
            };

            // Semantic experts.
            let mut dz0 = vec![0.0; C];
            let mut dz1 = vec![0.0; C];
            if cfg.use_sem {
                for &(k, j) in &picks {
                    let e =
                        tau * (dot(&f, &tab(&case.t_dif, k)) - dot(&f, &tab(&case.t_dif_rev, k)));
                    dz0[class] += e / 2.0;
                    dz0[j] -= e / 2.0;
                }
                let mut v = f.clone();
                for &(k, _) in &picks {
                    let u = tab(&case.t_com, k);
                    let fu = dot(&f, &u);
                    v.iter_mut().zip(&u).for_each(|(a, b)| *a -= fu * b);
                }
                dz1 = on_support(&norm(&v));
            }

            // Sample Confusion Miner + adapter.
            let mut samples = vec![];
            let mut f_sam = f.clone();
            let mut dz2 = vec![0.0; C];
            if cfg.use_sam {
                let mut cands = vec![];
                for &(k, _) in &picks {
                    for i in 0..2 * M {
                        let slot = case.cells[(class * K + k) * 2 * M + i];
                        if slot >= 0 {
                            let g = norm(row(&case.pool_g, slot as usize, D));
                            cands.push((slot as usize, dot(&f, &g)));
                        }
                    }
                }
                cands.sort_by(|a, b| b.1.total_cmp(&a.1));
                cands.truncate(KS);
                let temp = cfg.sam_temperature as f64;
                let s: Vec<f64> = cands.iter().map(|c| c.1 / temp).collect();
                let w = softmax(&s);
                samples = cands.iter().zip(&w).map(|(c, &w)| (c.0, w)).collect();
                if !samples.is_empty() {
                    let mut agg_g = vec![0.0; D];
                    let mut agg_l = vec![0.0; D];
                    let lx = row(&case.l, n, G * D);
                    for &(slot, w) in &samples {
                        let g = norm(row(&case.pool_g, slot, D));
                        for d in 0..D {
                            agg_g[d] += w * (f[d] - g[d]);
                        }
                        let lr = row(&case.pool_l, slot, G * D);
                        for tok in 0..G {
                            let q = row(lx, tok, D);
                            let a = softmax(
                                &(0..G)
                                    .map(|u| dot(q, row(lr, u, D)) / (D as f64).sqrt())
                                    .collect::<Vec<_>>(),
                            );
                            for d in 0..D {
                                let rec: f64 = (0..G).map(|u| a[u] * lr[u * D + d]).sum();
                                agg_l[d] += w * (q[d] - rec) / G as f64;
                            }
                        }
                    }
                    let hg = mlp(case, SAM_GLOBAL, &agg_g);
                    let hl = mlp(case, SAM_LOCAL, &agg_l);
                    let alpha = 1.0 / (1.0 + (-case.param(ALPHA)[0]).exp());
                    let v: Vec<f64> = (0..D)
                        .map(|d| f[d] + alpha * hl[d] + (1.0 - alpha) * hg[d])
                        .collect();
                    f_sam = norm(&v);
                } else {
                    f_sam = norm(&f);
                }
                dz2 = on_support(&f_sam);
            }

            let gates = if cfg.learned_router {
                let mut x = f.clone();
                x.extend(&f_sam);
                let mut third = vec![0.0; D];
                if cfg.use_sem {
                    for &(k, _) in &picks {
                        let u = tab(&case.t_dif, k);
                        third
                            .iter_mut()
                            .zip(&u)
                            .for_each(|(a, b)| *a += b / KP as f64);
                    }
                }
                x.extend(third);
                let r = case.param(ROUTER);
                softmax(
                    &(0..3)
                        .map(|e| dot(row(r, e, 3 * D), &x))
                        .collect::<Vec<_>>(),
                )
            } else {
                vec![1.0 / 3.0; 3]
            };
            let gains = case.param(GAINS);
            let dz = [dz0, dz1, dz2];
            let logits = (0..C)
                .map(|c| base[c] + (0..3).map(|e| gates[e] * gains[e] * dz[e][c]).sum::<f64>())
                .collect();
            RefImage {
                base,
                logits,
                gates,
                class,
                picks,
                samples,
                f,
                f_sam,
                dz,
            }
        })
        .collect()
}

// ---- tests -------------------------------------------------------------------------------

#[test]
fn zero_gains_give_base_logits_exactly() -> Res {
    let c = case(Method::Capt);
    assert!(c.param(GAINS).iter().all(|&g| g == 0.0));
    let out = c.run(CDType::F32);
    assert_eq!(
        out.logits, out.base,
        "logits must equal base logits bit for bit at init"
    );
    // Base logits by hand: tau * norm(f) . norm(t_c).
    let tau = c.logit_scale.exp();
    let mut want = vec![];
    for n in 0..c.n {
        let f = row(&c.f, n, D);
        let nf = f.iter().map(|v| v * v).sum::<f64>().sqrt();
        for k in 0..C {
            let t = row(&c.t, k, D);
            let nt = t.iter().map(|v| v * v).sum::<f64>().sqrt();
            let mut s = 0.0;
            for d in 0..D {
                s += f[d] * t[d];
            }
            want.push(tau * s / (nf * nt));
        }
    }
    assert_close("base", &out.base, &want, 1e-5);
    // Also with every other parameter "trained": still exact while the gains are zero.
    let mut t = trained(Method::Capt);
    t.set(GAINS, &[0.0; 3]);
    let out = t.run(CDType::F32);
    assert_eq!(out.logits, out.base);
    Ok(())
}

#[test]
fn matches_the_f64_reference_for_every_method() -> Res {
    for method in [
        Method::Capt,
        Method::CaptNoSem,
        Method::CaptNoSam,
        Method::CaptNoRouting,
    ] {
        let c = trained(method);
        let r = reference(&c);
        let out = c.run(CDType::F64);
        let cat =
            |f: fn(&RefImage) -> &Vec<f64>| r.iter().flat_map(|i| f(i).clone()).collect::<Vec<_>>();
        assert_close("base", &out.base, &cat(|i| &i.base), 1e-10);
        assert_close(
            &format!("{method} logits"),
            &out.logits,
            &cat(|i| &i.logits),
            1e-9,
        );
        assert_close(
            &format!("{method} gates"),
            &out.gates,
            &cat(|i| &i.gates),
            1e-9,
        );
        let pairs: Vec<i64> = r
            .iter()
            .flat_map(|i| i.picks.iter().map(|p| p.1 as i64))
            .collect();
        assert_eq!(out.pairs, pairs, "{method}");
        // The test data exercises every expert: corrections are non-trivial.
        let moved = out
            .logits
            .iter()
            .zip(&out.base)
            .filter(|(a, b)| a != b)
            .count();
        assert!(moved >= c.n, "{method}: only {moved} logits moved");
        // F32 agrees with F64 to float precision.
        let out32 = c.run(CDType::F32);
        assert_close(&format!("{method} f32"), &out32.logits, &out.logits, 1e-4);
    }
    Ok(())
}

#[test]
fn corrections_stay_on_the_candidate_set() -> Res {
    let base_case = trained(Method::Capt);
    let r = reference(&base_case);
    for e in 0..3 {
        let mut c = base_case.clone();
        let mut g = [0.0; 3];
        g[e] = 0.9;
        c.set(GAINS, &g);
        let out = c.run(CDType::F32);
        let mut moved = 0;
        for (n, img) in r.iter().enumerate() {
            let mut s = vec![img.class];
            s.extend(img.picks.iter().map(|p| p.1));
            for k in 0..C {
                let (z, zb) = (out.logits[n * C + k], out.base[n * C + k]);
                if s.contains(&k) {
                    moved += (z != zb) as usize;
                } else {
                    assert_eq!(z, zb, "expert {e} moved class {k} outside S of image {n}");
                }
            }
        }
        assert!(moved >= 2, "expert {e} moved nothing on S");
    }
    Ok(())
}

#[test]
fn pairs_are_the_top_nhat_times_p_candidates() -> Res {
    let c = trained(Method::Capt);
    let b = c.build(CDType::F64, false);
    let tau = c.logit_scale.exp();
    for n in 0..c.n {
        // Scores by hand: softmax of the base logits, times Nhat of c's candidates.
        let f = norm(row(&c.f, n, D));
        let z: Vec<f64> = (0..C)
            .map(|k| tau * dot(&f, &norm(row(&c.t, k, D))))
            .collect();
        let p = softmax(&z);
        let cls = (0..C).max_by(|&a, &b| z[a].total_cmp(&z[b])).unwrap();
        let mut scored: Vec<(f64, i64)> = (0..K)
            .map(|k| {
                (
                    c.nhat[cls * K + k] * p[c.cand[cls * K + k] as usize],
                    c.cand[cls * K + k],
                )
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        assert!(
            scored[KP - 1].0 > scored[KP].0 * 1.01,
            "test data has a near tie"
        );
        let want: Vec<i64> = scored[..KP].iter().map(|s| s.1).collect();

        let zb = Tensor::from_vec(z.clone(), (1, C), &Device::Cpu)?;
        let pairs = select_pairs(&b.ops, &c.cfg, &zb, &b.t)?;
        assert_eq!(pairs.class.to_vec1::<i64>()?, vec![cls as i64]);
        assert_eq!(
            pairs.partners.flatten_all()?.to_vec1::<i64>()?,
            want,
            "image {n}"
        );
        let mut support = vec![0.0; C];
        support[cls] = 1.0;
        want.iter().for_each(|&j| support[j as usize] = 1.0);
        assert_eq!(host(&pairs.support), support);
    }
    Ok(())
}

#[test]
fn retrieval_takes_valid_slots_only_and_empty_cells_give_no_shift() -> Res {
    let c = trained(Method::Capt);
    let r = reference(&c);
    let b = c.build(CDType::F64, false);
    let f = b.ops.l2_normalize(&b.x.image_global, -1)?;
    let tn_t = b
        .ops
        .transpose(&b.ops.l2_normalize(&b.x.class_emb, -1)?, 0, 1)?;
    let z = b
        .ops
        .mul_scalar(&b.ops.matmul(&f, &tn_t)?, c.logit_scale.exp())?;
    let pairs = select_pairs(&b.ops, &c.cfg, &z, &b.t)?;
    let ret = retrieve(&b.ops, &c.cfg, &f, &pairs, &b.t)?;
    let slots = ret.slots.flatten_all()?.to_vec1::<i64>()?;
    let weights = host(&ret.weights);
    let any = host(&ret.any);
    let f_sam = host(&sample_feature(
        &b.ops,
        &c.cfg,
        &f,
        &b.x.image_local,
        &ret,
        &b.t,
    )?);
    let valid_counts: Vec<usize> = r.iter().map(|i| i.samples.len()).collect();
    // Image 0: full top-K_s; image 1 (class 2): fewer valid slots than K_s; image 2: none.
    assert_eq!(valid_counts, vec![KS, KP, 0]);
    for (n, img) in r.iter().enumerate() {
        for s in 0..KS {
            let (want_slot, want_w) = img.samples.get(s).copied().unwrap_or((0, 0.0));
            assert_eq!(slots[n * KS + s], want_slot as i64, "image {n} pick {s}");
            assert!(
                (weights[n * KS + s] - want_w).abs() < 1e-12,
                "image {n} weight {s}: {} vs {want_w}",
                weights[n * KS + s]
            );
        }
        let total: f64 = weights[n * KS..(n + 1) * KS].iter().sum();
        let has = !img.samples.is_empty();
        assert!(
            (total - has as u8 as f64).abs() < 1e-12,
            "image {n}: weights sum {total}"
        );
        assert_eq!(any[n], has as u8 as f64);
        assert_close(&format!("f_sam {n}"), row(&f_sam, n, D), &img.f_sam, 1e-10);
    }
    // Empty cells: h = 0, so f_sam = norm(f).
    assert_close(
        "f_sam of the empty image",
        row(&f_sam, 2, D),
        &r[2].f,
        1e-12,
    );
    assert!(r[2].dz[2].iter().all(|v| v.abs() < 1e-12));
    Ok(())
}

#[test]
fn an_empty_bank_produces_no_nan() -> Res {
    // What the exporter bakes for a bank that never saw a confusion: one zero pool row and
    // all cells -1. Every parameter non-zero, gradients included.
    let mut c = trained(Method::Capt);
    c.p = 1;
    c.pool_g = vec![0.0; D];
    c.pool_l = vec![0.0; G * D];
    c.cells = vec![-1; C * K * 2 * M];
    let b = c.build(CDType::F32, true);
    let o = capt_head(&b.ops, &c.cfg, &b.x, &b.t)?;
    let logits = host(&o.logits);
    assert!(logits.iter().all(|v| v.is_finite()), "{logits:?}");
    let grads = o.logits.sqr()?.sum_all()?.backward()?;
    for (name, v) in &b.vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            assert!(
                host(g).iter().all(|x| x.is_finite()),
                "NaN gradient for {name}"
            );
        }
    }
    // With no samples, the sample expert contributes (numerically) nothing.
    let mut s = c.clone();
    s.set(GAINS, &[0.0, 0.0, 5.0]);
    let out = s.run(CDType::F64);
    assert_close("logits", &out.logits, &out.base, 1e-12);
    Ok(())
}

/// A case small enough to check by hand: f = e0, tau = 10, classes
/// e0, e0 + e3, e0 + 2 e3, e4, -e0; class 0's candidates [3, 1, 2] with Nhat [0.5, 0.3, 0.2].
fn hand_case(method: Method) -> Case {
    let mut c = case(method);
    let e = |i: usize, s: f64| {
        let mut v = vec![0.0; D];
        v[i] = s;
        v
    };
    let add = |a: Vec<f64>, b: Vec<f64>| a.iter().zip(&b).map(|(x, y)| x + y).collect::<Vec<_>>();
    c.n = 1;
    c.f = e(0, 3.0);
    c.l = values(4, G * D);
    c.t = [
        e(0, 1.0),
        add(e(0, 1.0), e(3, 1.0)),
        add(e(0, 1.0), e(3, 2.0)),
        e(4, 1.0),
        e(0, -1.0),
    ]
    .concat();
    c.logit_scale = 10f64.ln();
    c.cand[..K].copy_from_slice(&[3, 1, 2]);
    c.nhat[..K].copy_from_slice(&[0.5, 0.3, 0.2]);
    let put =
        |tab: &mut Vec<f64>, k: usize, v: Vec<f64>| tab[k * D..(k + 1) * D].copy_from_slice(&v);
    // Pair (0, 1) is candidate position 1, pair (0, 2) position 2.
    put(&mut c.t_dif, 1, add(e(0, 0.6), e(1, 0.8)));
    put(&mut c.t_dif_rev, 1, e(1, 1.0));
    put(&mut c.t_dif, 2, e(0, 5.0));
    put(&mut c.t_dif_rev, 2, add(e(0, 0.8), e(1, 0.6)));
    put(&mut c.t_com, 1, add(e(0, 1.0), e(3, 1.0)));
    put(&mut c.t_com, 2, e(5, 2.0));
    c
}

#[test]
fn semantic_experts_on_a_hand_checkable_case() -> Res {
    // Scores: p_3 : p_1 : p_2 = 1 : e^7.07 : e^4.47, times Nhat 0.5, 0.3, 0.2 -> pairs (0,1), (0,2).
    // Difference expert: e_1 = 10 * (0.6 - 0) = 6, e_2 = 10 * (1 - 0.8) = 2, so
    // dz0 = [+4, -3, -1, 0, 0]; with uniform gates and gain 1.5 the shift is dz0 / 2.
    let mut c = hand_case(Method::CaptNoRouting);
    c.set(GAINS, &[1.5, 0.0, 0.0]);
    let out = c.run(CDType::F64);
    assert_eq!(out.pairs, vec![1, 2]);
    let shift: Vec<f64> = out
        .logits
        .iter()
        .zip(&out.base)
        .map(|(z, b)| z - b)
        .collect();
    assert_close(
        "difference expert",
        &shift,
        &[2.0, -1.5, -0.5, 0.0, 0.0],
        1e-12,
    );
    // Commonality expert: u_1 = (e0 + e3)/sqrt2, u_2 = e5 (orthogonal to f), so
    // f' = norm(e0 - (e0 + e3)/2) = (e0 - e3)/sqrt2 and dz1_s = 10 (f' - f) . norm(t_s) on S.
    c.set(GAINS, &[0.0, 1.5, 0.0]);
    let out = c.run(CDType::F64);
    let h = std::f64::consts::FRAC_1_SQRT_2;
    let dz1 = [
        10.0 * (h - 1.0),
        10.0 * (-h),
        10.0 * (-h - 1.0) / 5f64.sqrt(),
        0.0,
        0.0,
    ];
    let shift: Vec<f64> = out
        .logits
        .iter()
        .zip(&out.base)
        .map(|(z, b)| z - b)
        .collect();
    let want: Vec<f64> = dz1.iter().map(|v| v * 0.5).collect();
    assert_close("commonality expert", &shift, &want, 1e-12);
    Ok(())
}

#[test]
fn underflowed_scores_fall_back_to_candidate_order() -> Res {
    // tau = 1000: every partner's p underflows to exactly 0 (f32 and f64), so all scores tie;
    // the pairs must then be the first candidates of class 0's list, [3, 1], on any backend.
    let mut c = hand_case(Method::Capt);
    c.logit_scale = 1000f64.ln();
    for dt in [CDType::F32, CDType::F64] {
        assert_eq!(c.run(dt).pairs, vec![3, 1], "{dt:?}");
    }
    // With tau = 10 the scores decide: [1, 2] (see the hand-checkable case).
    c.logit_scale = 10f64.ln();
    assert_eq!(c.run(CDType::F32).pairs, vec![1, 2]);
    Ok(())
}

#[test]
fn router_gates_and_load_balance() -> Res {
    // Uniform gates without the learned router.
    let out = trained(Method::CaptNoRouting).run(CDType::F32);
    assert!(
        out.gates.iter().all(|&g| g == (1.0f32 / 3.0) as f64),
        "{:?}",
        out.gates
    );
    // Learned router: a softmax per image, not uniform once R is trained.
    let c = trained(Method::Capt);
    let b = c.build(CDType::F64, false);
    let o = capt_head(&b.ops, &c.cfg, &b.x, &b.t)?;
    let g = host(&o.gates);
    for n in 0..c.n {
        let s: f64 = g[n * 3..n * 3 + 3].iter().sum();
        assert!((s - 1.0).abs() < 1e-12, "gates of image {n} sum to {s}");
    }
    assert!(g.iter().any(|&v| (v - 1.0 / 3.0).abs() > 0.01), "{g:?}");
    // load_balance_loss = E * sum_e mean_n(g_e)^2, by hand.
    let mut want = 0.0;
    for e in 0..3 {
        let m: f64 = (0..c.n).map(|n| g[n * 3 + e]).sum::<f64>() / c.n as f64;
        want += m * m;
    }
    want *= 3.0;
    let lb = load_balance_loss(&b.ops, &o.gates)?;
    assert_eq!(lb.rank(), 0);
    assert!((lb.to_scalar::<f64>()? - want).abs() < 1e-12);
    // Uniform gates give exactly 1; one-expert gates give E.
    let one = Tensor::from_vec(vec![1.0f64, 0.0, 0.0, 1.0, 0.0, 0.0], (2, 3), &Device::Cpu)?;
    assert!((load_balance_loss(&b.ops, &one)?.to_scalar::<f64>()? - 3.0).abs() < 1e-12);
    let uni = Tensor::full(1.0f64 / 3.0, (4, 3), &Device::Cpu)?;
    assert!((load_balance_loss(&b.ops, &uni)?.to_scalar::<f64>()? - 1.0).abs() < 1e-12);
    Ok(())
}

#[test]
fn ablations_switch_off_the_right_experts() -> Res {
    // Without SEM: gains on experts 0 and 1 change nothing; the sample expert still works.
    // The semantic tables are not read at all (placeholders of the wrong shape are fine).
    let mut c = trained(Method::CaptNoSem);
    assert!(!c.cfg.use_sem && c.cfg.use_sam && c.cfg.learned_router);
    c.set(GAINS, &[2.0, 2.0, 0.0]);
    let mut b = c.build(CDType::F32, false);
    let dummy = Tensor::zeros((1, 1), CDType::F32, &Device::Cpu)?;
    (b.t.t_com, b.t.t_dif, b.t.t_dif_rev) = (dummy.clone(), dummy.clone(), dummy.clone());
    let o = capt_head(&b.ops, &c.cfg, &b.x, &b.t)?;
    assert_eq!(host(&o.logits), host(&o.base_logits));
    c.set(GAINS, &[0.0, 0.0, 2.0]);
    let out = c.run(CDType::F32);
    assert_ne!(out.logits, out.base);

    // Without SAM: the sample expert is off (f_sam = f) and the bank is not read.
    let mut c = trained(Method::CaptNoSam);
    assert!(c.cfg.use_sem && !c.cfg.use_sam);
    assert!(
        !c.params.contains_key(ALPHA),
        "no adapter parameters without SAM"
    );
    c.set(GAINS, &[0.0, 0.0, 2.0]);
    let mut b = c.build(CDType::F32, false);
    (b.t.pool_global, b.t.pool_local, b.t.cells) = (dummy.clone(), dummy.clone(), dummy.clone());
    let o = capt_head(&b.ops, &c.cfg, &b.x, &b.t)?;
    assert_eq!(host(&o.logits), host(&o.base_logits));
    for g in [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]] {
        c.set(GAINS, &g);
        let out = c.run(CDType::F32);
        assert_ne!(out.logits, out.base, "gains {g:?}");
    }
    // Without routing: no router parameter, uniform gates.
    let c = trained(Method::CaptNoRouting);
    assert!(!c.params.contains_key(ROUTER));
    Ok(())
}

/// A scalar training-like loss of the head: weighted logits plus a quadratic term (so
/// every logit matters) plus the load-balance term (so the router gets a direct signal).
fn loss(o: &HeadOutput<Tensor>, ops: &CandleOps) -> Tensor {
    let (n, c) = o.logits.dims2().unwrap();
    let w = Tensor::from_vec(values(77, n * c), (n, c), &Device::Cpu)
        .unwrap()
        .to_dtype(o.logits.dtype())
        .unwrap();
    let lin = (&o.logits * &w).unwrap().sum_all().unwrap();
    let quad = (o.logits.sqr().unwrap().sum_all().unwrap() * 0.01).unwrap();
    let lb = load_balance_loss(ops, &o.gates).unwrap();
    ((lin + quad).unwrap() + lb).unwrap()
}

#[test]
fn gradients_reach_every_parameter_and_table() -> Res {
    // At init (zero gains) only the gains can move the logits: they must get a gradient.
    let c = case(Method::Capt);
    let b = c.build(CDType::F32, true);
    let o = capt_head(&b.ops, &c.cfg, &b.x, &b.t)?;
    let grads = loss(&o, &b.ops).backward()?;
    let gsum = |name: &str, grads: &candle_core::backprop::GradStore| -> f64 {
        let v = &b.vars.iter().find(|v| v.0 == name).unwrap().1;
        grads
            .get(v.as_tensor())
            .map_or(0.0, |g| host(g).iter().map(|x| x.abs()).sum())
    };
    // Every expert's gain, the sample expert's included: its correction must already be
    // non-zero at init (adapter output layer not zero), or gains[2] would never move.
    let v = &b.vars.iter().find(|v| v.0 == GAINS).unwrap().1;
    let g = host(grads.get(v.as_tensor()).expect("gains gradient"));
    assert!(g.iter().all(|x| x.abs() > 1e-4), "gains at init: {g:?}");
    assert!(gsum(GAINS, &grads) > 1e-4, "gains get no gradient at init");

    // Trained: every capt.* parameter and the class / COM / DIF tables.
    for method in [
        Method::Capt,
        Method::CaptNoSem,
        Method::CaptNoSam,
        Method::CaptNoRouting,
    ] {
        let c = trained(method);
        let b = c.build(CDType::F32, true);
        let o = capt_head(&b.ops, &c.cfg, &b.x, &b.t)?;
        let grads = loss(&o, &b.ops).backward()?;
        let mut names: Vec<&str> = c.params.keys().map(String::as_str).collect();
        names.push("class_emb");
        if c.cfg.use_sem {
            names.extend(["t_com", "t_dif", "t_dif_rev"]);
        }
        for name in names {
            let v = &b.vars.iter().find(|v| v.0 == name).unwrap().1;
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{method}: no gradient for {name}"));
            let g = host(g);
            assert!(
                g.iter().all(|x| x.is_finite()),
                "{method}: {name} gradient not finite"
            );
            let s: f64 = g.iter().map(|x| x.abs()).sum();
            // Ablations zero the gains of disabled experts; the rest must move.
            assert!(s > 1e-6, "{method}: {name} gradient is zero");
        }
    }
    Ok(())
}

/// From the initial parameters, two plain gradient steps: by the second one every head
/// parameter must get a gradient (the first moves the gains off zero; a parameter whose only
/// path runs through a gain that can never move, as with a zero adapter output layer and a
/// zero gain, fails here).
#[test]
fn every_parameter_learns_within_two_steps_from_init() -> Res {
    for method in [
        Method::Capt,
        Method::CaptNoSem,
        Method::CaptNoSam,
        Method::CaptNoRouting,
    ] {
        let mut c = case(method);
        let mut seen: BTreeMap<String, f64> = BTreeMap::new();
        for step in 0..2 {
            let b = c.build(CDType::F64, true);
            let o = capt_head(&b.ops, &c.cfg, &b.x, &b.t)?;
            let grads = loss(&o, &b.ops).backward()?;
            for (name, (_, data)) in c.params.iter_mut() {
                let v = &b.vars.iter().find(|v| &v.0 == name).unwrap().1;
                let g = grads.get(v.as_tensor()).map_or(vec![0.0; data.len()], host);
                *seen.entry(name.clone()).or_default() += g.iter().map(|x| x.abs()).sum::<f64>();
                if step == 0 {
                    for (p, g) in data.iter_mut().zip(&g) {
                        *p -= 0.1 * g;
                    }
                }
            }
        }
        for (name, s) in &seen {
            assert!(*s > 1e-6, "{method}: {name} never gets a gradient ({s:e})");
        }
        // Each enabled expert's gain moved in step 1; a disabled one's got exactly nothing.
        let g = c.param(GAINS);
        let on = [c.cfg.use_sem, c.cfg.use_sem, c.cfg.use_sam];
        for (&ge, on) in g.iter().zip(on) {
            let ok = if on { ge.abs() > 1e-6 } else { ge == 0.0 };
            assert!(ok, "{method}: gains after one step {g:?}");
        }
    }
    Ok(())
}

#[test]
fn gradients_match_finite_differences() -> Res {
    let c = trained(Method::Capt);
    let b = c.build(CDType::F64, true);
    let o = capt_head(&b.ops, &c.cfg, &b.x, &b.t)?;
    let grads = loss(&o, &b.ops).backward()?;
    let checks: [(&str, &[usize]); 10] = [
        (GAINS, &[0, 1, 2]),
        (ALPHA, &[0]),
        (ROUTER, &[0, 9, 20, 47, 70]),
        ("capt.sam.global.fc1.weight", &[0, 13, 31]),
        ("capt.sam.global.fc2.bias", &[2, 5]),
        ("capt.sam.local.fc1.bias", &[1, 3]),
        ("capt.sam.local.fc2.weight", &[0, 17]),
        ("class_emb", &[0, 19, 33]),
        ("t_dif", &[8, 9, 40]),
        ("t_com", &[8, 50]),
    ];
    let eps = 1e-6;
    let mut worst = 0f64;
    for (name, elems) in checks {
        let v = &b.vars.iter().find(|v| v.0 == name).unwrap().1;
        let g = host(grads.get(v.as_tensor()).expect("gradient"));
        let orig = v.as_tensor().copy()?;
        let shape = orig.dims().to_vec();
        let base = host(&orig);
        let eval = |data: Vec<f64>| -> Res<f64> {
            v.set(&Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)?)?;
            let o = capt_head(&b.ops, &c.cfg, &b.x, &b.t)?;
            Ok(loss(&o, &b.ops).to_scalar::<f64>()?)
        };
        for &i in elems {
            let (mut plus, mut minus) = (base.clone(), base.clone());
            plus[i] += eps;
            minus[i] -= eps;
            let fd = (eval(plus)? - eval(minus)?) / (2.0 * eps);
            let err = (fd - g[i]).abs() / fd.abs().max(1.0);
            worst = worst.max(err);
            assert!(
                err < 1e-6,
                "{name}[{i}]: autograd {} vs finite difference {fd}",
                g[i]
            );
        }
        v.set(&orig)?;
    }
    eprintln!("head grad check: worst relative error {worst:.2e}");
    Ok(())
}

#[test]
fn config_caps_and_input_errors() -> Res {
    let mut cc = capt_config(Method::Capt);
    cc.sem.k_cand = 8;
    cc.sem.k_pairs = 3;
    cc.sam.k_samples = 4;
    cc.bank.cell_size = 1;
    let h = HeadConfig::from_config(&cc, 3, 512, 16)?;
    assert_eq!((h.k_cand, h.k_pairs, h.k_samples, h.hidden), (2, 2, 4, 256));
    let h = HeadConfig::from_config(&cc, 2, 512, 16)?;
    assert_eq!((h.k_cand, h.k_pairs, h.k_samples), (1, 1, 2));
    let d = HeadConfig::from_config(&CaptConfig::default(), 100, 512, 16)?;
    assert_eq!((d.k_cand, d.k_pairs, d.k_samples, d.hidden), (8, 3, 4, 128));
    assert!(d.use_sem && d.use_sam && d.learned_router);
    let coop = capt_config(Method::Coop);
    assert!(HeadConfig::from_config(&coop, 10, 8, 4)
        .unwrap_err()
        .to_string()
        .contains("coop"));
    assert!(HeadConfig::from_config(&cc, 1, 8, 4).is_err());

    // Shape errors name the tensor.
    let c = trained(Method::Capt);
    let mut b = c.build(CDType::F32, false);
    b.t.cells = Tensor::zeros((C, K, 2, M + 1), CDType::I64, &Device::Cpu)?;
    let e = capt_head(&b.ops, &c.cfg, &b.x, &b.t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`cells`") && e.contains("[5, 3, 2, 2]"), "{e}");
    let mut b = c.build(CDType::F32, false);
    b.t.cand_index = b.t.cand_index.to_dtype(CDType::F32)?;
    let e = capt_head(&b.ops, &c.cfg, &b.x, &b.t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`cand_index`") && e.contains("I64"), "{e}");
    let mut b = c.build(CDType::F32, false);
    b.x.image_local = Tensor::zeros((2, G, D), CDType::F32, &Device::Cpu)?;
    let e = capt_head(&b.ops, &c.cfg, &b.x, &b.t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`image_local`"), "{e}");
    // A missing parameter names it.
    let b = c.build(CDType::F32, false);
    let bare = CandleOps::new(&Device::Cpu, DType::F32)?;
    let e = capt_head(&bare, &c.cfg, &b.x, &b.t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("capt."), "{e}");
    Ok(())
}
