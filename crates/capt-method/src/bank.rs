//! The Confusion Bank (docs/METHOD.md §1): which classes a model confuses, how often, and
//! with which training samples. Counts live in a dense `C x C` matrix; every (true, confused)
//! cell is a ring buffer of at most `M` indices into one capped pool of sample features, so
//! a feature stored for a cell is stored once and evicted once.

use std::collections::{BTreeMap, VecDeque};

use safetensors::tensor::{Dtype, TensorView};

use crate::config::BankConfig;

#[derive(Debug, thiserror::Error)]
pub enum BankError {
    #[error("confusion bank: {0}")]
    Shape(String),
    #[error("confusion bank data in {source_name} is unreadable: {message}; re-run training to rebuild it")]
    Corrupt {
        source_name: String,
        message: String,
    },
}

/// What one observed training view did to the bank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observation {
    /// Top-1 was the true class with a comfortable margin: nothing stored.
    Correct,
    /// Top-1 was `predicted != label`: `N[label, predicted] += 1`, sample stored in that cell.
    Miss { predicted: usize },
    /// Top-1 was right but the runner-up came within `delta`: `N[label, rival] += 0.5`.
    NearMiss { rival: usize },
}

/// Per-class candidate partners taken from the prior-smoothed bank (`Nhat`).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidates {
    /// Candidates per class (`min(K_cand, C - 1)`).
    pub k: usize,
    /// `[C, k]` partner class indices, strongest first.
    pub index: Vec<u32>,
    /// `[C, k]` their `Nhat` values.
    pub weight: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConfusionBank {
    num_classes: usize,
    dim: usize,
    local_tokens: usize,
    cell_size: usize,
    pool_size: usize,
    delta: f32,
    decay: f32,
    counts: Vec<f32>,
    cells: BTreeMap<(u32, u32), VecDeque<u32>>,
    pool_global: Vec<f32>,
    pool_local: Vec<f32>,
    /// Per pool slot: the cell holding it (or `None` once evicted from its cell) and its
    /// insertion sequence number, used to evict the oldest entry when the pool is full.
    slot_owner: Vec<Option<(u32, u32)>>,
    slot_seq: Vec<u64>,
    /// Per pool slot: the training sample (image index) it came from, -1 when unknown.
    /// Training retrieves leave-one-out: a view never retrieves entries of its own image.
    slot_sample: Vec<i64>,
    next_seq: u64,
}

impl ConfusionBank {
    /// An empty bank for `num_classes` classes whose samples carry a `dim` global feature and
    /// `local_tokens x dim` local tokens.
    pub fn new(num_classes: usize, dim: usize, local_tokens: usize, cfg: &BankConfig) -> Self {
        Self {
            num_classes,
            dim,
            local_tokens,
            cell_size: cfg.cell_size,
            pool_size: cfg.pool_size,
            delta: cfg.delta,
            decay: cfg.decay,
            counts: vec![0.0; num_classes * num_classes],
            cells: BTreeMap::new(),
            pool_global: Vec::new(),
            pool_local: Vec::new(),
            slot_owner: Vec::new(),
            slot_seq: Vec::new(),
            slot_sample: Vec::new(),
            next_seq: 0,
        }
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn local_tokens(&self) -> usize {
        self.local_tokens
    }
    pub fn cell_size(&self) -> usize {
        self.cell_size
    }
    /// Dense `C x C` confusion counts, row = true class.
    pub fn counts(&self) -> &[f32] {
        &self.counts
    }
    pub fn count(&self, y: usize, j: usize) -> f32 {
        self.counts[y * self.num_classes + j]
    }
    /// Number of pool slots in use (some may be orphaned by cell eviction).
    pub fn pool_len(&self) -> usize {
        self.slot_owner.len()
    }
    /// `[pool_len, dim]` global features.
    pub fn pool_global(&self) -> &[f32] {
        &self.pool_global
    }
    /// `[pool_len, local_tokens, dim]` local tokens.
    pub fn pool_local(&self) -> &[f32] {
        &self.pool_local
    }
    /// Pool slots of cell (y, j), oldest first.
    pub fn cell(&self, y: usize, j: usize) -> Vec<u32> {
        self.cells
            .get(&(y as u32, j as u32))
            .map(|c| c.iter().copied().collect())
            .unwrap_or_default()
    }
    /// Per pool slot, the training sample it was stored for (-1: unknown).
    pub fn slot_samples(&self) -> &[i64] {
        &self.slot_sample
    }
    pub fn global_of(&self, slot: u32) -> &[f32] {
        let s = slot as usize * self.dim;
        &self.pool_global[s..s + self.dim]
    }

    /// Starts a refresh pass: old counts decay (`N <- decay * N`) and the new pass adds to them.
    /// Cells keep their entries; newer ones push the oldest out.
    pub fn begin_refresh(&mut self) {
        for c in &mut self.counts {
            *c *= self.decay;
        }
    }

    /// Records one training view of class `label` with predicted probabilities `probs`,
    /// its global feature and its (pooled) local tokens (sample unknown).
    pub fn observe(
        &mut self,
        label: usize,
        probs: &[f32],
        global: &[f32],
        local: &[f32],
    ) -> Result<Observation, BankError> {
        self.observe_sample(label, probs, global, local, None)
    }

    /// As [`Self::observe`], recording which training sample the view belongs to, so training
    /// can retrieve leave-one-out ([`Self::slot_samples`]).
    pub fn observe_sample(
        &mut self,
        label: usize,
        probs: &[f32],
        global: &[f32],
        local: &[f32],
        sample: Option<usize>,
    ) -> Result<Observation, BankError> {
        let c = self.num_classes;
        if label >= c || probs.len() != c {
            return Err(BankError::Shape(format!(
                "observation has label {label} and {} probabilities for a {c}-class bank",
                probs.len()
            )));
        }
        if global.len() != self.dim || local.len() != self.local_tokens * self.dim {
            return Err(BankError::Shape(format!(
                "sample features have {} global / {} local values, expected {} / {}",
                global.len(),
                local.len(),
                self.dim,
                self.local_tokens * self.dim
            )));
        }
        let top = argmax_excluding(probs, None);
        let obs = if top != label {
            self.counts[label * c + top] += 1.0;
            self.store(label, top, global, local, sample);
            Observation::Miss { predicted: top }
        } else if c > 1 {
            let rival = argmax_excluding(probs, Some(label));
            if probs[label] - probs[rival] < self.delta {
                self.counts[label * c + rival] += 0.5;
                self.store(label, rival, global, local, sample);
                Observation::NearMiss { rival }
            } else {
                Observation::Correct
            }
        } else {
            Observation::Correct
        };
        Ok(obs)
    }

    fn store(&mut self, y: usize, j: usize, global: &[f32], local: &[f32], sample: Option<usize>) {
        let key = (y as u32, j as u32);
        let slot = self.take_slot();
        let (d, ld) = (self.dim, self.local_tokens * self.dim);
        let s = slot as usize;
        self.pool_global[s * d..(s + 1) * d].copy_from_slice(global);
        self.pool_local[s * ld..(s + 1) * ld].copy_from_slice(local);
        self.slot_owner[s] = Some(key);
        self.slot_seq[s] = self.next_seq;
        self.slot_sample[s] = sample.map_or(-1, |v| v as i64);
        self.next_seq += 1;
        let cell = self.cells.entry(key).or_default();
        cell.push_back(slot);
        if cell.len() > self.cell_size {
            let old = cell.pop_front().expect("cell is non-empty");
            self.slot_owner[old as usize] = None;
        }
    }

    /// A free pool slot: an orphaned one, a new one while under capacity, else the oldest
    /// entry (removed from its cell).
    fn take_slot(&mut self) -> u32 {
        if let Some(free) = self.slot_owner.iter().position(Option::is_none) {
            return free as u32;
        }
        if self.slot_owner.len() < self.pool_size {
            self.slot_owner.push(None);
            self.slot_seq.push(0);
            self.slot_sample.push(-1);
            self.pool_global
                .resize(self.slot_owner.len() * self.dim, 0.0);
            self.pool_local
                .resize(self.slot_owner.len() * self.local_tokens * self.dim, 0.0);
            return (self.slot_owner.len() - 1) as u32;
        }
        let oldest = (0..self.slot_seq.len())
            .min_by_key(|&s| self.slot_seq[s])
            .expect("pool is non-empty");
        let key = self.slot_owner[oldest]
            .take()
            .expect("full pool slots are owned");
        if let Some(cell) = self.cells.get_mut(&key) {
            cell.retain(|&s| s as usize != oldest);
            if cell.is_empty() {
                self.cells.remove(&key);
            }
        }
        oldest as u32
    }

    /// `Nhat = normalise_row(N + beta * softmax(S_text / temperature))`, diagonal excluded;
    /// `text_sim` is the `C x C` cosine similarity of the frozen zero-shot class embeddings.
    /// Rows with few counts (and classes never trained) are carried by the prior.
    pub fn prior(
        &self,
        text_sim: &[f32],
        beta: f32,
        temperature: f32,
    ) -> Result<Vec<f32>, BankError> {
        text_similarity_prior(&self.counts, self.num_classes, text_sim, beta, temperature)
    }

    /// Dense `[C, k, 2, M]` table of pool slots (-1 padded) for the cells (c, cand) and
    /// (cand, c) of every class and candidate: what the Sample Confusion Miner retrieves from.
    pub fn cell_table(&self, cands: &Candidates) -> Vec<i64> {
        let (c, k, m) = (self.num_classes, cands.k, self.cell_size);
        let mut table = vec![-1i64; c * k * 2 * m];
        for y in 0..c {
            for i in 0..k {
                let j = cands.index[y * k + i] as usize;
                for (dir, (a, b)) in [(y, j), (j, y)].into_iter().enumerate() {
                    let base = ((y * k + i) * 2 + dir) * m;
                    for (n, slot) in self.cell(a, b).into_iter().enumerate() {
                        table[base + n] = slot as i64;
                    }
                }
            }
        }
        table
    }

    /// Masks (sets to -1) the entries of a [`Self::cell_table`] whose pool slot was stored for
    /// one of `samples`: a training view then never retrieves its own image (whose entry has
    /// cosine 1 and a zero difference, which teaches the adapter nothing).
    pub fn leave_out(slot_sample: &[i64], table: &mut [i64], samples: &[usize]) {
        if samples.is_empty() {
            return;
        }
        for v in table.iter_mut() {
            if *v >= 0 {
                let owner = slot_sample.get(*v as usize).copied().unwrap_or(-1);
                if owner >= 0 && samples.contains(&(owner as usize)) {
                    *v = -1;
                }
            }
        }
    }

    /// Serialises the bank (counts, cells, pool) as safetensors bytes for checkpoints.
    pub fn to_safetensors(&self) -> Vec<u8> {
        let c = self.num_classes;
        let mut cell_rows: Vec<i64> = Vec::with_capacity(self.cells.len() * (2 + self.cell_size));
        for (&(y, j), slots) in &self.cells {
            cell_rows.push(y as i64);
            cell_rows.push(j as i64);
            for n in 0..self.cell_size {
                cell_rows.push(slots.get(n).map_or(-1, |&s| s as i64));
            }
        }
        let slots: Vec<i64> = self
            .slot_owner
            .iter()
            .zip(&self.slot_seq)
            .flat_map(|(o, &seq)| match o {
                Some((y, j)) => [*y as i64, *j as i64, seq as i64],
                None => [-1, -1, seq as i64],
            })
            .collect();
        let meta: Vec<i64> = vec![
            c as i64,
            self.dim as i64,
            self.local_tokens as i64,
            self.cell_size as i64,
            self.pool_size as i64,
            self.next_seq as i64,
        ];
        let params: Vec<f32> = vec![self.delta, self.decay];
        let p = self.slot_owner.len();
        let tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
            (
                "bank.counts",
                Dtype::F32,
                vec![c, c],
                bytes_f32(&self.counts),
            ),
            (
                "bank.cells",
                Dtype::I64,
                vec![self.cells.len(), 2 + self.cell_size],
                bytes_i64(&cell_rows),
            ),
            ("bank.slots", Dtype::I64, vec![p, 3], bytes_i64(&slots)),
            (
                "bank.slot_sample",
                Dtype::I64,
                vec![p],
                bytes_i64(&self.slot_sample),
            ),
            (
                "bank.pool_global",
                Dtype::F32,
                vec![p, self.dim],
                bytes_f32(&self.pool_global),
            ),
            (
                "bank.pool_local",
                Dtype::F32,
                vec![p, self.local_tokens, self.dim],
                bytes_f32(&self.pool_local),
            ),
            ("bank.meta", Dtype::I64, vec![meta.len()], bytes_i64(&meta)),
            (
                "bank.params",
                Dtype::F32,
                vec![params.len()],
                bytes_f32(&params),
            ),
        ];
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, dt, shape, data)| {
                let view = TensorView::new(*dt, shape.clone(), data).expect("shape matches data");
                (name.to_string(), view)
            })
            .collect();
        safetensors::serialize(views, None).expect("in-memory serialisation cannot fail")
    }

    /// Restores a bank written by [`ConfusionBank::to_safetensors`]; `source_name` names the
    /// file in errors.
    pub fn from_safetensors(bytes: &[u8], source_name: &str) -> Result<Self, BankError> {
        let corrupt = |message: String| BankError::Corrupt {
            source_name: source_name.to_string(),
            message,
        };
        let st =
            safetensors::SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
        let get = |name: &str, dt: Dtype| -> Result<(Vec<usize>, Vec<u8>), BankError> {
            let t = st
                .tensor(name)
                .map_err(|_| corrupt(format!("tensor `{name}` is missing")))?;
            if t.dtype() != dt {
                return Err(corrupt(format!(
                    "tensor `{name}` has dtype {:?}, expected {dt:?}",
                    t.dtype()
                )));
            }
            Ok((t.shape().to_vec(), t.data().to_vec()))
        };
        let (_, meta) = get("bank.meta", Dtype::I64)?;
        let meta = to_i64(&meta);
        if meta.len() != 6 || meta.iter().any(|&v| v < 0) {
            return Err(corrupt("bank.meta must hold 6 non-negative values".into()));
        }
        let [c, dim, lt, m, pool_size, next_seq] =
            [meta[0], meta[1], meta[2], meta[3], meta[4], meta[5]].map(|v| v as usize);
        let (_, params) = get("bank.params", Dtype::F32)?;
        let params = to_f32(&params);
        if params.len() != 2 {
            return Err(corrupt("bank.params must hold delta and decay".into()));
        }
        let (cs, counts) = get("bank.counts", Dtype::F32)?;
        if cs != [c, c] {
            return Err(corrupt(format!(
                "bank.counts has shape {cs:?}, expected [{c}, {c}]"
            )));
        }
        let (ss, slots) = get("bank.slots", Dtype::I64)?;
        let p = ss.first().copied().unwrap_or(0);
        if ss != [p, 3] || p > pool_size {
            return Err(corrupt(format!("bank.slots has shape {ss:?}")));
        }
        let (gs, pool_global) = get("bank.pool_global", Dtype::F32)?;
        let (ls, pool_local) = get("bank.pool_local", Dtype::F32)?;
        if gs != [p, dim] || ls != [p, lt, dim] {
            return Err(corrupt(format!(
                "pool shapes {gs:?} / {ls:?} do not match {p} slots of dim {dim}"
            )));
        }
        let (rs, rows) = get("bank.cells", Dtype::I64)?;
        let rows = to_i64(&rows);
        let n_cells = rs.first().copied().unwrap_or(0);
        if rs != [n_cells, 2 + m] {
            return Err(corrupt(format!(
                "bank.cells has shape {rs:?}, expected [_, {}]",
                2 + m
            )));
        }
        // Banks written before leave-one-out retrieval have no sample ids: unknown (-1).
        let slot_sample = match st.tensor("bank.slot_sample") {
            Ok(_) => {
                let (shape, data) = get("bank.slot_sample", Dtype::I64)?;
                if shape != [p] {
                    return Err(corrupt(format!(
                        "bank.slot_sample has shape {shape:?}, expected [{p}]"
                    )));
                }
                to_i64(&data)
            }
            Err(_) => vec![-1; p],
        };
        let slots = to_i64(&slots);
        let mut slot_owner = Vec::with_capacity(p);
        let mut slot_seq = Vec::with_capacity(p);
        for s in slots.chunks(3) {
            let in_range = |v: i64| v >= 0 && (v as usize) < c;
            slot_owner.push(if in_range(s[0]) && in_range(s[1]) {
                Some((s[0] as u32, s[1] as u32))
            } else {
                None
            });
            slot_seq.push(s[2].max(0) as u64);
        }
        let mut cells = BTreeMap::new();
        for row in rows.chunks(2 + m) {
            let (y, j) = (row[0], row[1]);
            if y < 0 || j < 0 || y as usize >= c || j as usize >= c {
                return Err(corrupt(format!("cell ({y}, {j}) is outside {c} classes")));
            }
            let mut cell = VecDeque::new();
            for &s in row[2..].iter().filter(|&&s| s >= 0) {
                if s as usize >= p {
                    return Err(corrupt(format!(
                        "cell ({y}, {j}) points at pool slot {s} of {p}"
                    )));
                }
                cell.push_back(s as u32);
            }
            cells.insert((y as u32, j as u32), cell);
        }
        Ok(Self {
            num_classes: c,
            dim,
            local_tokens: lt,
            cell_size: m,
            pool_size,
            delta: params[0],
            decay: params[1],
            counts: to_f32(&counts),
            cells,
            pool_global: to_f32(&pool_global),
            pool_local: to_f32(&pool_local),
            slot_owner,
            slot_seq,
            slot_sample,
            next_seq: next_seq as u64,
        })
    }

    /// Grows the bank to `new_classes` classes (classes added after training): their rows and
    /// columns get zero counts and empty cells, so the text prior alone picks their partners.
    pub fn extend_classes(&mut self, new_classes: usize) {
        if new_classes <= self.num_classes {
            return;
        }
        let (old, new) = (self.num_classes, new_classes);
        let mut counts = vec![0.0; new * new];
        for y in 0..old {
            counts[y * new..y * new + old].copy_from_slice(&self.counts[y * old..(y + 1) * old]);
        }
        self.counts = counts;
        self.num_classes = new;
    }
}

/// The prior-smoothed bank `Nhat` (see [`ConfusionBank::prior`]) for any `C x C` counts.
pub fn text_similarity_prior(
    counts: &[f32],
    c: usize,
    text_sim: &[f32],
    beta: f32,
    temperature: f32,
) -> Result<Vec<f32>, BankError> {
    if counts.len() != c * c || text_sim.len() != c * c {
        return Err(BankError::Shape(format!(
            "prior needs {c}x{c} counts and text similarities, got {} and {}",
            counts.len(),
            text_sim.len()
        )));
    }
    let mut nhat = vec![0.0f32; c * c];
    for y in 0..c {
        let row = &text_sim[y * c..(y + 1) * c];
        let max = (0..c)
            .filter(|&j| j != y)
            .map(|j| row[j] / temperature)
            .fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = (0..c)
            .map(|j| {
                if j == y {
                    0.0
                } else {
                    ((row[j] / temperature) - max).exp()
                }
            })
            .collect();
        let z: f32 = exps.iter().sum();
        let out = &mut nhat[y * c..(y + 1) * c];
        for j in 0..c {
            if j != y {
                out[j] = counts[y * c + j] + beta * exps[j] / z.max(f32::MIN_POSITIVE);
            }
        }
        let total: f32 = out.iter().sum();
        if total > 0.0 {
            out.iter_mut().for_each(|v| *v /= total);
        }
    }
    Ok(nhat)
}

/// The top `min(k, C - 1)` partners of every class in `nhat` (ties: lower class index first).
pub fn top_candidates(nhat: &[f32], c: usize, k: usize) -> Candidates {
    let k = k.min(c.saturating_sub(1));
    let mut index = Vec::with_capacity(c * k);
    let mut weight = Vec::with_capacity(c * k);
    for y in 0..c {
        let row = &nhat[y * c..(y + 1) * c];
        let mut order: Vec<usize> = (0..c).filter(|&j| j != y).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &j in order.iter().take(k) {
            index.push(j as u32);
            weight.push(row[j]);
        }
    }
    Candidates { k, index, weight }
}

fn argmax_excluding(v: &[f32], skip: Option<usize>) -> usize {
    let mut best = usize::MAX;
    for (i, &x) in v.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        if best == usize::MAX || x > v[best] {
            best = i;
        }
    }
    best
}

fn bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn bytes_i64(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}
fn to_i64(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(m: usize, pool: usize) -> BankConfig {
        BankConfig {
            cell_size: m,
            pool_size: pool,
            ..BankConfig::default()
        }
    }

    fn feat(v: f32, n: usize) -> Vec<f32> {
        vec![v; n]
    }

    #[test]
    fn counts_misses_and_near_misses() {
        let mut b = ConfusionBank::new(3, 2, 1, &cfg(8, 16));
        // Miss: true 0, predicted 2.
        let o = b
            .observe(0, &[0.2, 0.1, 0.7], &feat(1.0, 2), &feat(1.0, 2))
            .unwrap();
        assert_eq!(o, Observation::Miss { predicted: 2 });
        // Near miss: true 1 wins by 0.05 over 0.
        let o = b
            .observe(1, &[0.45, 0.5, 0.05], &feat(2.0, 2), &feat(2.0, 2))
            .unwrap();
        assert_eq!(o, Observation::NearMiss { rival: 0 });
        // Comfortable: nothing.
        let o = b
            .observe(2, &[0.1, 0.1, 0.8], &feat(3.0, 2), &feat(3.0, 2))
            .unwrap();
        assert_eq!(o, Observation::Correct);
        assert_eq!(b.count(0, 2), 1.0);
        assert_eq!(b.count(1, 0), 0.5);
        assert_eq!(b.counts().iter().sum::<f32>(), 1.5);
        assert_eq!(b.cell(0, 2).len(), 1);
        assert_eq!(b.global_of(b.cell(1, 0)[0]), &[2.0, 2.0]);
        b.begin_refresh();
        assert_eq!(b.count(0, 2), 0.5);
    }

    #[test]
    fn sample_ids_round_trip_and_leave_one_out_masks_own_entries() {
        let mut b = ConfusionBank::new(2, 1, 1, &cfg(4, 16));
        b.observe_sample(0, &[0.1, 0.9], &[1.0], &[1.0], Some(7))
            .unwrap();
        b.observe_sample(0, &[0.2, 0.8], &[2.0], &[2.0], Some(9))
            .unwrap();
        b.observe(0, &[0.3, 0.7], &[3.0], &[3.0]).unwrap();
        assert_eq!(b.slot_samples(), &[7, 9, -1]);
        let back = ConfusionBank::from_safetensors(&b.to_safetensors(), "t").unwrap();
        assert_eq!(back, b);
        let cands = Candidates {
            k: 1,
            index: vec![1, 0],
            weight: vec![1.0, 1.0],
        };
        let mut table = b.cell_table(&cands);
        assert_eq!(&table[..4], &[0, 1, 2, -1]);
        ConfusionBank::leave_out(b.slot_samples(), &mut table, &[9, 3]);
        assert_eq!(&table[..4], &[0, -1, 2, -1]);
    }

    #[test]
    fn cells_are_ring_buffers_keeping_the_newest() {
        let mut b = ConfusionBank::new(2, 1, 1, &cfg(3, 100));
        for i in 0..5 {
            b.observe(0, &[0.1, 0.9], &[i as f32], &[i as f32]).unwrap();
        }
        let kept: Vec<f32> = b.cell(0, 1).iter().map(|&s| b.global_of(s)[0]).collect();
        assert_eq!(kept, vec![2.0, 3.0, 4.0]);
        // Evicted slots are reused, so the pool does not grow past what cells hold + 1.
        assert!(b.pool_len() <= 4, "pool grew to {}", b.pool_len());
    }

    #[test]
    fn full_pool_evicts_the_oldest_entry_from_its_cell() {
        let mut b = ConfusionBank::new(3, 1, 1, &cfg(8, 2));
        b.observe(0, &[0.1, 0.9, 0.0], &[1.0], &[1.0]).unwrap(); // cell (0,1)
        b.observe(1, &[0.0, 0.1, 0.9], &[2.0], &[2.0]).unwrap(); // cell (1,2)
        b.observe(2, &[0.9, 0.0, 0.1], &[3.0], &[3.0]).unwrap(); // cell (2,0), evicts (0,1)
        assert_eq!(b.pool_len(), 2);
        assert!(b.cell(0, 1).is_empty());
        assert_eq!(b.cell(1, 2).len(), 1);
        assert_eq!(b.global_of(b.cell(2, 0)[0]), &[3.0]);
        assert_eq!(b.count(0, 1), 1.0, "counts outlive evicted features");
    }

    #[test]
    fn prior_is_row_normalised_and_carries_empty_rows() {
        // Class 0 is textually close to 1, far from 2; no counts at all.
        let sim = vec![1.0, 0.9, 0.1, 0.9, 1.0, 0.2, 0.1, 0.2, 1.0];
        let counts = vec![0.0; 9];
        let nhat = text_similarity_prior(&counts, 3, &sim, 1.0, 0.05).unwrap();
        let row0: f32 = nhat[0..3].iter().sum();
        assert!((row0 - 1.0).abs() < 1e-6);
        assert_eq!(nhat[0], 0.0, "diagonal excluded");
        // softmax([0.9, 0.1] / 0.05) = [1/(1+e^-16), e^-16/(1+e^-16)]
        let expect = 1.0 / (1.0 + (-16.0f32).exp());
        assert!((nhat[1] - expect).abs() < 1e-6);
        // Counts dominate the prior: 10 confusions of 0 with 2 outweigh text similarity.
        let mut counts = vec![0.0; 9];
        counts[2] = 10.0;
        let nhat = text_similarity_prior(&counts, 3, &sim, 1.0, 0.05).unwrap();
        assert!(nhat[2] > nhat[1]);
        assert!((nhat[2] - (10.0 + (1.0 - expect)) / 11.0).abs() < 1e-6);
    }

    #[test]
    fn candidates_are_sorted_and_capped() {
        let nhat = vec![0.0, 0.3, 0.7, 0.5, 0.0, 0.5, 0.2, 0.8, 0.0];
        let c = top_candidates(&nhat, 3, 8);
        assert_eq!(c.k, 2);
        assert_eq!(c.index, vec![2, 1, 0, 2, 1, 0]);
        assert_eq!(c.weight[0], 0.7);
    }

    #[test]
    fn cell_table_has_both_directions_padded() {
        let mut b = ConfusionBank::new(2, 1, 1, &cfg(2, 8));
        b.observe(0, &[0.2, 0.8], &[1.0], &[1.0]).unwrap();
        b.observe(1, &[0.7, 0.3], &[2.0], &[2.0]).unwrap();
        b.observe(1, &[0.7, 0.3], &[3.0], &[3.0]).unwrap();
        let cands = top_candidates(&[0.0, 1.0, 1.0, 0.0], 2, 8);
        let t = b.cell_table(&cands);
        // class 0, cand 1: (0,1) = [slot0, -1], (1,0) = [slot1, slot2]
        assert_eq!(&t[0..4], &[0, -1, 1, 2]);
        assert_eq!(&t[4..8], &[1, 2, 0, -1]);
    }

    #[test]
    fn safetensors_roundtrip_and_corrupt_input() {
        let mut b = ConfusionBank::new(3, 2, 2, &cfg(2, 3));
        for i in 0..6 {
            b.observe(
                i % 3,
                &[0.3, 0.3, 0.4],
                &feat(i as f32, 2),
                &feat(i as f32, 4),
            )
            .unwrap();
        }
        let bytes = b.to_safetensors();
        let back = ConfusionBank::from_safetensors(&bytes, "bank.safetensors").unwrap();
        assert_eq!(back, b);
        let err =
            ConfusionBank::from_safetensors(&bytes[..bytes.len() / 2], "ckpt/bank.safetensors")
                .unwrap_err();
        assert!(err.to_string().contains("ckpt/bank.safetensors"), "{err}");
    }

    #[test]
    fn bad_observations_are_errors() {
        let mut b = ConfusionBank::new(3, 2, 1, &cfg(8, 16));
        assert!(b
            .observe(5, &[0.3, 0.3, 0.4], &[0.0; 2], &[0.0; 2])
            .is_err());
        assert!(b.observe(0, &[0.3, 0.7], &[0.0; 2], &[0.0; 2]).is_err());
        assert!(b
            .observe(0, &[0.3, 0.3, 0.4], &[0.0; 3], &[0.0; 2])
            .is_err());
    }

    #[test]
    fn extending_classes_keeps_counts() {
        let mut b = ConfusionBank::new(2, 1, 1, &cfg(2, 8));
        b.observe(0, &[0.2, 0.8], &[1.0], &[1.0]).unwrap();
        b.extend_classes(3);
        assert_eq!(b.num_classes(), 3);
        assert_eq!(b.count(0, 1), 1.0);
        assert_eq!(b.count(2, 0), 0.0);
    }
}
