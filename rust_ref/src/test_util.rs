//! Deterministic pseudo-random test data (no rand crate): SplitMix64.

use crate::kernels::{Kernel, KernelParams};
use ndarray::{Array1, Array2};

pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// (coords, v, p, params) of a test problem.
pub type ProblemArrays = (Array2<f64>, Array2<f64>, Array1<f64>, KernelParams);

/// A random but valid residual problem (kernel variance 1.3): coords uniform in [0, 1)^d,
/// lengthscales in [0.2, 0.5), m inducing points drawn uniformly, L = chol(K_uu + jitter I),
/// V_i = L^-1 k(U, x_i), p_i = max(1.3 - ||V_i||^2, 1e-10).
/// Returns (coords, v, p, params).
pub fn random_problem_arrays(
    seed: u64,
    n: usize,
    d: usize,
    m: usize,
    kernel: Kernel,
) -> ProblemArrays {
    random_problem_with_factor(seed, n, d, m, kernel).0
}

/// [`random_problem_arrays`] and its Cholesky factor L (the tree's transform T).
pub fn random_problem_with_factor(
    seed: u64,
    n: usize,
    d: usize,
    m: usize,
    kernel: Kernel,
) -> (ProblemArrays, Array2<f64>) {
    let mut rng = SplitMix64::new(seed);
    let x = Array2::from_shape_simple_fn((n, d), || rng.uniform());
    let u = Array2::from_shape_simple_fn((m, d), || rng.uniform());
    let ls: Vec<f64> = (0..d).map(|_| 0.2 + 0.3 * rng.uniform()).collect();
    let params = KernelParams::new(kernel, ls, 1.3).unwrap();
    // Cholesky of K_uu + jitter I.
    let mut l = Array2::<f64>::zeros((m, m));
    for a in 0..m {
        for b in 0..=a {
            let mut s = params.cov_view(u.row(a), u.row(b));
            if a == b {
                s += 1e-6 * 1.3;
            }
            for c in 0..b {
                s -= l[[a, c]] * l[[b, c]];
            }
            l[[a, b]] = if a == b { s.sqrt() } else { s / l[[b, b]] };
        }
    }
    // Forward substitution per point.
    let mut v = Array2::<f64>::zeros((n, m));
    for i in 0..n {
        for a in 0..m {
            let mut s = params.cov_view(u.row(a), x.row(i));
            for c in 0..a {
                s -= l[[a, c]] * v[[i, c]];
            }
            v[[i, a]] = s / l[[a, a]];
        }
    }
    let p = Array1::from_iter(v.rows().into_iter().map(|r| (1.3 - r.dot(&r)).max(1e-10)));
    ((x, v, p, params), l)
}
