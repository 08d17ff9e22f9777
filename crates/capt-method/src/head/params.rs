//! Learned parameters of the head: names, shapes, initialisations, and deterministic initial
//! values (so the trainer's candle `Var`s and the exporter's initializers share names).

use super::{HeadConfig, NUM_EXPERTS};

/// Prefix of the global-branch adapter MLP (`.fc1.weight`, `.fc1.bias`, `.fc2.weight`,
/// `.fc2.bias`).
pub const SAM_GLOBAL: &str = "capt.sam.global";
/// Prefix of the local-branch adapter MLP.
pub const SAM_LOCAL: &str = "capt.sam.local";
/// `a` of `alpha = sigmoid(a)`, `[1]`.
pub const ALPHA: &str = "capt.sam.alpha";
/// Router `R`, `[3, 3D]` (no bias).
pub const ROUTER: &str = "capt.mgde.router";
/// Expert gains, `[3]`.
pub const GAINS: &str = "capt.mgde.gains";

/// Standard deviation of the adapter MLPs' output weights (`fc2.weight`).
///
/// The spec asks for both a zero-initialised last adapter layer and a zero expert gain. With
/// both at zero the sample expert is dead: `dz_2 = 0` because `h = 0`, so
/// `d loss / d gains[2] = g_2 * dz_2 = 0`, and every logit path into the adapter carries the
/// factor `gains[2] = 0`. Only rounding and the load-balance term (through the router's
/// `f_sam` input, ~1e-7) ever reach it (measured in capt-train's `tests/grad.rs`: `gains[2]`
/// ~4e-10 after a step instead of ~1e-4). One of the two must start off zero. Keeping the gain at 0 keeps logits at init *bit for bit* equal to the base
/// model's (`z_base + g * 0 * dz`, which a non-zero gain times `dz = tau (norm(f + 0) - f)
/// . T` would not: `norm(norm(f))` differs from `norm(f)` in the last bits), so the output
/// layer gets a small random init instead: step 1 gives `gains[2]` a gradient through
/// `dz_2 != 0`, and from step 2 on the adapter learns through `gains[2] != 0`, as the
/// semantic experts' contexts do through `gains[0..2]`. 0.01 keeps the initial shift small
/// (`|h| ~ 0.03` for ViT-B/16 features, against `|f| = 1`).
pub const ADAPTER_OUT_INIT_STD: f32 = 0.01;

/// How a parameter starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamInit {
    Zeros,
    Const(f32),
    Normal {
        std: f32,
    },
    /// torch `nn.Linear`'s default (`kaiming_uniform_(a = sqrt 5)`, also used for its bias):
    /// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
    KaimingUniform {
        fan_in: usize,
    },
    /// Each row (last axis) a random unit vector (normalised N(0, 1) draws) times `scale`.
    RandomUnitRows {
        scale: f32,
    },
}

/// One learned tensor of the head.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: ParamInit,
}

/// The head's parameters for `cfg`, in a fixed order. Only parameters the configuration reads
/// are listed: the adapter (`capt.sam.*`) only with `use_sam`, the router only with
/// `learned_router`; the gains always.
pub fn head_params(cfg: &HeadConfig) -> Vec<ParamSpec> {
    let spec = |name: String, shape: Vec<usize>, init| ParamSpec { name, shape, init };
    let (d, h) = (cfg.dim, cfg.hidden);
    let mut out = Vec::new();
    if cfg.use_sam {
        for prefix in [SAM_GLOBAL, SAM_LOCAL] {
            let fc1 = ParamInit::KaimingUniform { fan_in: d };
            out.push(spec(format!("{prefix}.fc1.weight"), vec![h, d], fc1));
            out.push(spec(format!("{prefix}.fc1.bias"), vec![h], fc1));
            out.push(spec(
                format!("{prefix}.fc2.weight"),
                vec![d, h],
                ParamInit::Normal {
                    std: ADAPTER_OUT_INIT_STD,
                },
            ));
            // Zero bias: an image with no retrieved sample still gets h = 0 exactly (it is
            // masked anyway), and the bias learns once gains[2] moves.
            out.push(spec(
                format!("{prefix}.fc2.bias"),
                vec![d],
                ParamInit::Zeros,
            ));
        }
        out.push(spec(ALPHA.into(), vec![1], ParamInit::Zeros));
    }
    if cfg.learned_router {
        let init = ParamInit::RandomUnitRows {
            scale: cfg.router_init_scale,
        };
        out.push(spec(ROUTER.into(), vec![NUM_EXPERTS, 3 * d], init));
    }
    // Zero gains: training starts exactly at the base model.
    out.push(spec(GAINS.into(), vec![NUM_EXPERTS], ParamInit::Zeros));
    out
}

/// Initial values of [`head_params`] as `(name, shape, row-major f32 data)`, deterministic in
/// `seed`. Each parameter draws from its own stream (seed mixed with its name), so adding a
/// parameter never changes the others.
pub fn init_head_params(cfg: &HeadConfig, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    head_params(cfg)
        .into_iter()
        .map(|p| {
            let mut rng = SplitMix64::new(seed ^ fnv1a(p.name.as_bytes()));
            let data = sample(&p.init, &p.shape, &mut rng);
            (p.name, p.shape, data)
        })
        .collect()
}

fn sample(init: &ParamInit, shape: &[usize], rng: &mut SplitMix64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    match *init {
        ParamInit::Zeros => vec![0.0; n],
        ParamInit::Const(v) => vec![v; n],
        ParamInit::Normal { std } => (0..n).map(|_| (rng.normal() * std as f64) as f32).collect(),
        ParamInit::KaimingUniform { fan_in } => {
            let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
            (0..n)
                .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                .collect()
        }
        ParamInit::RandomUnitRows { scale } => {
            let row = shape.last().copied().unwrap_or(1).max(1);
            let mut out = Vec::with_capacity(n);
            for _ in 0..n / row {
                let v: Vec<f64> = (0..row).map(|_| rng.normal()).collect();
                let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
                out.extend(v.iter().map(|x| (x / norm * scale as f64) as f32));
            }
            out
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64: tiny, seedable, identical everywhere (no dependency on a rand version).
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(use_sam: bool, learned_router: bool) -> HeadConfig {
        HeadConfig {
            num_classes: 5,
            dim: 8,
            local_tokens: 4,
            k_cand: 3,
            k_pairs: 2,
            k_samples: 3,
            cell_size: 2,
            sam_temperature: 0.07,
            use_sem: true,
            use_sam,
            learned_router,
            hidden: 4,
            router_init_scale: 0.01,
        }
    }

    #[test]
    fn names_shapes_and_inits_follow_the_contract() {
        let specs = head_params(&cfg(true, true));
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "capt.sam.global.fc1.weight",
                "capt.sam.global.fc1.bias",
                "capt.sam.global.fc2.weight",
                "capt.sam.global.fc2.bias",
                "capt.sam.local.fc1.weight",
                "capt.sam.local.fc1.bias",
                "capt.sam.local.fc2.weight",
                "capt.sam.local.fc2.bias",
                "capt.sam.alpha",
                "capt.mgde.router",
                "capt.mgde.gains",
            ]
        );
        let by = |n: &str| specs.iter().find(|s| s.name == n).unwrap();
        assert_eq!(by("capt.sam.global.fc1.weight").shape, [4, 8]);
        assert_eq!(by("capt.sam.local.fc2.weight").shape, [8, 4]);
        // Small random output layers: with zero gains AND zero fc2 the adapter never learns.
        for n in ["capt.sam.global.fc2.weight", "capt.sam.local.fc2.weight"] {
            assert_eq!(by(n).init, ParamInit::Normal { std: 0.01 }, "{n}");
        }
        assert_eq!(by("capt.sam.local.fc2.bias").init, ParamInit::Zeros);
        assert_eq!(by("capt.mgde.router").shape, [3, 24]);
        assert_eq!(by("capt.mgde.gains").init, ParamInit::Zeros);
        // Ablations drop what they never read.
        let no_sam: Vec<String> = head_params(&cfg(false, false))
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(no_sam, ["capt.mgde.gains"]);
    }

    #[test]
    fn initial_values_are_deterministic_and_scaled() {
        let c = cfg(true, true);
        let a = init_head_params(&c, 7);
        assert_eq!(a, init_head_params(&c, 7));
        assert_ne!(a, init_head_params(&c, 8));
        for (name, shape, data) in &a {
            assert_eq!(data.len(), shape.iter().product::<usize>(), "{name}");
            match name.as_str() {
                "capt.mgde.router" => {
                    for row in data.chunks(24) {
                        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                        assert!((n - 0.01).abs() < 1e-6, "router row norm {n}");
                    }
                }
                n if n.ends_with("fc1.weight") || n.ends_with("fc1.bias") => {
                    let bound = 1.0 / 8f32.sqrt();
                    assert!(data.iter().all(|v| v.abs() <= bound));
                    assert!(data.iter().any(|v| v.abs() > 0.1 * bound));
                }
                n if n.ends_with("fc2.weight") => {
                    assert!(data.iter().all(|v| v.abs() < 0.1), "{name}");
                    assert!(data.iter().filter(|v| v.abs() > 0.001).count() > data.len() / 2);
                }
                _ => assert!(data.iter().all(|&v| v == 0.0), "{name} must start at 0"),
            }
        }
        // Streams are per name: the router does not move when the adapter is dropped.
        let router = |v: &[(String, Vec<usize>, Vec<f32>)]| {
            v.iter().find(|p| p.0 == ROUTER).unwrap().2.clone()
        };
        assert_eq!(router(&a), router(&init_head_params(&cfg(false, true), 7)));
    }

    #[test]
    fn normal_draws_have_the_requested_spread() {
        let v = sample(
            &ParamInit::Normal { std: 0.02 },
            &[4000],
            &mut SplitMix64::new(1),
        );
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.002, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 0.002, "std {}", var.sqrt());
        assert_eq!(
            sample(&ParamInit::Const(2.5), &[3], &mut SplitMix64::new(1)),
            [2.5; 3]
        );
    }
}
