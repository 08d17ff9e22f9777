//! CPython's `random` module (3.x): MT19937 seeded by `random.seed(int)`, `getrandbits`,
//! `_randbelow`, `random()`, `shuffle`, `sample` and `choices`.
//!
//! CoOp/Dassl draw few-shot subsets with `random.sample` after `random.seed(seed)`, so the
//! only way to reproduce their subsets bit for bit is to reproduce this generator and the
//! exact consumption pattern of each call. `tools/ref_fewshot.py` checks it against Python.

use std::collections::HashSet;

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// Python's `random.Random` state.
#[derive(Clone)]
pub struct PyRandom {
    mt: [u32; N],
    index: usize,
}

impl std::fmt::Debug for PyRandom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyRandom")
            .field("index", &self.index)
            .finish()
    }
}

impl PyRandom {
    /// `random.seed(seed)` for a Python int: the absolute value split into 32-bit words,
    /// least significant first, fed to `init_by_array` (at least one word, so 0 gives `[0]`).
    pub fn seed(seed: i64) -> Self {
        let mut n = seed.unsigned_abs();
        let mut key = Vec::with_capacity(2);
        loop {
            key.push(n as u32);
            n >>= 32;
            if n == 0 {
                break;
            }
        }
        Self::from_key(&key)
    }

    fn init_genrand(s: u32) -> Self {
        let mut mt = [0u32; N];
        mt[0] = s;
        for i in 1..N {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        Self { mt, index: N }
    }

    /// MT19937 `init_by_array`.
    pub fn from_key(key: &[u32]) -> Self {
        let mut r = Self::init_genrand(19_650_218);
        let mt = &mut r.mt;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        r
    }

    fn twist(&mut self) {
        let mt = &mut self.mt;
        for kk in 0..N {
            let y = (mt[kk] & UPPER_MASK) | (mt[(kk + 1) % N] & LOWER_MASK);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            mt[kk] = mt[(kk + M) % N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    /// One tempered 32-bit output (`genrand_uint32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// `random.getrandbits(k)` for `1 <= k <= 32`.
    pub fn getrandbits(&mut self, k: u32) -> u32 {
        debug_assert!((1..=32).contains(&k));
        self.next_u32() >> (32 - k)
    }

    /// `random.random()`: 53-bit float in [0, 1).
    pub fn random(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67_108_864.0 + b) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `Random._randbelow_with_getrandbits(n)`: rejection sampling on `n.bit_length()` bits.
    /// `n` must be in `1..=u32::MAX`.
    pub fn randbelow(&mut self, n: usize) -> usize {
        assert!(
            n >= 1 && n <= u32::MAX as usize,
            "randbelow needs 1 <= n < 2^32"
        );
        let k = usize::BITS - n.leading_zeros();
        loop {
            let r = self.getrandbits(k) as usize;
            if r < n {
                return r;
            }
        }
    }

    /// `random.shuffle(x)` (in place, Fisher-Yates from the end).
    pub fn shuffle<T>(&mut self, x: &mut [T]) {
        for i in (1..x.len()).rev() {
            let j = self.randbelow(i + 1);
            x.swap(i, j);
        }
    }

    /// Indices chosen by `random.sample(range(n), k)`, in selection order. CPython picks a
    /// pool (partial shuffle) when `n` is small relative to `k`'s set-table size and
    /// rejection against a set otherwise; both consume the generator differently, so the
    /// same rule is reproduced here. Returns `None` if `k > n`.
    pub fn sample_indices(&mut self, n: usize, k: usize) -> Option<Vec<usize>> {
        if k > n {
            return None;
        }
        let mut setsize = 21usize;
        if k > 5 {
            // 4 ** ceil(log(k * 3, 4)); math.log(x, b) is log(x) / log(b) in doubles.
            let e = ((k * 3) as f64).ln() / 4f64.ln();
            setsize += 4usize.pow(e.ceil() as u32);
        }
        let mut out = Vec::with_capacity(k);
        if n <= setsize {
            let mut pool: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = self.randbelow(n - i);
                out.push(pool[j]);
                pool[j] = pool[n - i - 1];
            }
        } else {
            let mut selected = HashSet::with_capacity(k);
            for _ in 0..k {
                let mut j = self.randbelow(n);
                while selected.contains(&j) {
                    j = self.randbelow(n);
                }
                selected.insert(j);
                out.push(j);
            }
        }
        Some(out)
    }

    /// `random.sample(population, k)`; `None` if `k > len`.
    pub fn sample<T: Clone>(&mut self, population: &[T], k: usize) -> Option<Vec<T>> {
        self.sample_indices(population.len(), k)
            .map(|idx| idx.into_iter().map(|i| population[i].clone()).collect())
    }

    /// `random.choices(population, k=k)` (uniform, with replacement):
    /// `population[floor(random() * n)]`. Empty population gives an empty result.
    pub fn choices<T: Clone>(&mut self, population: &[T], k: usize) -> Vec<T> {
        if population.is_empty() {
            return Vec::new();
        }
        let n = population.len() as f64;
        (0..k)
            .map(|_| {
                population[((self.random() * n).floor() as usize).min(population.len() - 1)].clone()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference values printed by CPython 3.11.7:
    //   random.seed(1); [random.getrandbits(32) for _ in range(3)]  (== next_u32)
    //   random.seed(1); random.random()
    #[test]
    fn matches_cpython_first_outputs() {
        let mut r = PyRandom::seed(1);
        assert_eq!(
            [r.next_u32(), r.next_u32(), r.next_u32()],
            [577_090_037, 2_444_712_010, 3_639_700_191]
        );
        let mut r = PyRandom::seed(1);
        assert_eq!(r.random(), 0.134_364_244_112_401_22);
    }

    // random.seed(2); random.sample(range(100), 5) -> [7, 11, 10, 46, 21]  (set branch)
    // random.seed(3); random.sample(range(10), 4)  -> [3, 8, 2, 7]        (pool branch)
    #[test]
    fn sample_matches_cpython_both_branches() {
        let mut r = PyRandom::seed(2);
        assert_eq!(r.sample_indices(100, 5).unwrap(), vec![7, 11, 10, 46, 21]);
        let mut r = PyRandom::seed(3);
        assert_eq!(r.sample_indices(10, 4).unwrap(), vec![3, 8, 2, 7]);
        assert!(r.sample_indices(3, 4).is_none());
    }

    // random.seed(5); x = list(range(8)); random.shuffle(x) -> x
    // random.seed(5); random.choices(range(7), k=4)
    #[test]
    fn shuffle_and_choices_match_cpython() {
        let mut r = PyRandom::seed(5);
        let mut x: Vec<usize> = (0..8).collect();
        r.shuffle(&mut x);
        assert_eq!(x, SHUFFLE_5);
        let mut r = PyRandom::seed(5);
        assert_eq!(r.choices(&(0..7).collect::<Vec<usize>>(), 4), CHOICES_5);
    }

    #[test]
    fn big_and_negative_seeds_use_abs_and_all_words() {
        let a = PyRandom::seed(-7).next_u32();
        let b = PyRandom::seed(7).next_u32();
        assert_eq!(a, b);
        let mut r = PyRandom::seed(1 << 40);
        assert_eq!(r.next_u32(), BIG_SEED_FIRST);
    }

    const SHUFFLE_5: [usize; 8] = [6, 3, 1, 0, 7, 2, 5, 4];
    const CHOICES_5: [usize; 4] = [4, 5, 5, 6];
    // random.seed(1 << 40); random.getrandbits(32)
    const BIG_SEED_FIRST: u32 = 445_128_065;
}
