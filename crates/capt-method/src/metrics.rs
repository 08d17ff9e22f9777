//! Evaluation metrics (docs/METHOD.md §7): top-1, macro-F1, base/novel harmonic mean, the
//! confusion matrix, confusable pairs of a baseline and the Correction Rate against it. (The
//! confusion heatmaps are drawn by capt-train's report code.)

use serde::{Deserialize, Serialize};

/// Row = true class, column = predicted class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    pub num_classes: usize,
    pub counts: Vec<u64>,
}

impl ConfusionMatrix {
    pub fn new(num_classes: usize) -> Self {
        Self {
            num_classes,
            counts: vec![0; num_classes * num_classes],
        }
    }

    /// A matrix from `(truth, predicted, count)` cells (tests, hand-computed cases).
    pub fn from_cells(num_classes: usize, cells: &[(usize, usize, u64)]) -> Self {
        let mut m = Self::new(num_classes);
        for &(i, j, n) in cells {
            m.counts[i * num_classes + j] += n;
        }
        m
    }

    pub fn add(&mut self, truth: usize, predicted: usize) {
        self.counts[truth * self.num_classes + predicted] += 1;
    }

    pub fn get(&self, truth: usize, predicted: usize) -> u64 {
        self.counts[truth * self.num_classes + predicted]
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Top-1 accuracy in percent (0 for an empty matrix).
    pub fn accuracy(&self) -> f64 {
        let total = self.total();
        if total == 0 {
            return 0.0;
        }
        let correct: u64 = (0..self.num_classes).map(|c| self.get(c, c)).sum();
        100.0 * correct as f64 / total as f64
    }

    /// Macro-averaged F1 in percent over classes that occur as truth or prediction.
    pub fn macro_f1(&self) -> f64 {
        let c = self.num_classes;
        let mut sum = 0.0;
        let mut n = 0usize;
        for k in 0..c {
            let tp = self.get(k, k) as f64;
            let row: u64 = (0..c).map(|j| self.get(k, j)).sum();
            let col: u64 = (0..c).map(|i| self.get(i, k)).sum();
            if row == 0 && col == 0 {
                continue;
            }
            let denom = row as f64 + col as f64;
            sum += if denom > 0.0 { 2.0 * tp / denom } else { 0.0 };
            n += 1;
        }
        if n == 0 {
            0.0
        } else {
            100.0 * sum / n as f64
        }
    }

    /// Off-diagonal cells with at least `min_errors` errors: the "confusable pairs" of a
    /// baseline run (the paper uses 2).
    pub fn confusable_pairs(&self, min_errors: u64) -> Vec<(usize, usize)> {
        let c = self.num_classes;
        let mut pairs = Vec::new();
        for i in 0..c {
            for j in 0..c {
                if i != j && self.get(i, j) >= min_errors {
                    pairs.push((i, j));
                }
            }
        }
        pairs
    }

    /// `CR = 1 - sum_pairs after[i,j] / sum_pairs before[i,j]`, in percent; `None` when the
    /// baseline has no confusable pairs.
    pub fn correction_rate(before: &Self, after: &Self, pairs: &[(usize, usize)]) -> Option<f64> {
        let b: u64 = pairs.iter().map(|&(i, j)| before.get(i, j)).sum();
        if b == 0 {
            return None;
        }
        let a: u64 = pairs.iter().map(|&(i, j)| after.get(i, j)).sum();
        Some(100.0 * (1.0 - a as f64 / b as f64))
    }

    /// The `n` largest off-diagonal cells, largest first.
    pub fn top_confusions(&self, n: usize) -> Vec<(usize, usize, u64)> {
        let c = self.num_classes;
        let mut cells: Vec<(usize, usize, u64)> = (0..c)
            .flat_map(|i| (0..c).map(move |j| (i, j)))
            .filter(|&(i, j)| i != j)
            .map(|(i, j)| (i, j, self.get(i, j)))
            .filter(|&(_, _, v)| v > 0)
            .collect();
        cells.sort_by(|a, b| b.2.cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
        cells.truncate(n);
        cells
    }
}

/// Harmonic mean of base and novel accuracy, `2BN / (B + N)` (0 when both are 0).
pub fn harmonic_mean(base: f64, novel: f64) -> f64 {
    if base + novel == 0.0 {
        0.0
    } else {
        2.0 * base * novel / (base + novel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(c: usize, cells: &[(usize, usize, u64)]) -> ConfusionMatrix {
        ConfusionMatrix::from_cells(c, cells)
    }

    #[test]
    fn accuracy_and_macro_f1_by_hand() {
        // class 0: 3 right, 1 -> class 1; class 1: 2 right.
        let m = matrix(2, &[(0, 0, 3), (0, 1, 1), (1, 1, 2)]);
        assert!((m.accuracy() - 500.0 / 6.0).abs() < 1e-9);
        // F1_0 = 2*3/(4+3) = 6/7, F1_1 = 2*2/(2+3) = 4/5
        let expect = 100.0 * (6.0 / 7.0 + 0.8) / 2.0;
        assert!((m.macro_f1() - expect).abs() < 1e-9);
    }

    #[test]
    fn correction_rate_over_confusable_pairs() {
        let before = matrix(3, &[(0, 1, 4), (1, 2, 2), (2, 0, 1)]);
        let pairs = before.confusable_pairs(2);
        assert_eq!(pairs, vec![(0, 1), (1, 2)]);
        let after = matrix(3, &[(0, 1, 1), (1, 2, 2), (2, 0, 5)]);
        let cr = ConfusionMatrix::correction_rate(&before, &after, &pairs).unwrap();
        assert!((cr - 50.0).abs() < 1e-9);
        assert!(ConfusionMatrix::correction_rate(&after, &after, &[]).is_none());
    }

    #[test]
    fn harmonic_mean_matches_table() {
        assert!((harmonic_mean(69.34, 74.22) - 71.70).abs() < 0.01);
        assert_eq!(harmonic_mean(0.0, 0.0), 0.0);
    }

    #[test]
    fn top_confusions_sorted() {
        let m = matrix(3, &[(0, 1, 4), (1, 2, 2), (2, 0, 5), (1, 1, 9)]);
        assert_eq!(m.top_confusions(2), vec![(2, 0, 5), (0, 1, 4)]);
    }
}
