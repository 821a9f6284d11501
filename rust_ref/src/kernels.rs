//! Stationary covariance functions k(x, y) = s2 * g(r), r = ||(x - y) / l||.
//!
//! The float64 evaluation order is part of the contract (Python engines reproduce it
//! to ~1e-15):
//! `r2 = sum_t ((x[t] - y[t]) / l[t])^2` accumulated for t = 0..d-1 in order, `r = sqrt(r2)`,
//! then the kernel formula below.

use crate::InputError;
use ndarray::{Array2, ArrayView1, ArrayView2};
use rayon::prelude::*;

const SQRT3: f64 = 1.732_050_807_568_877_2_f64; // == 3f64.sqrt()
const SQRT5: f64 = 2.236_067_977_499_79_f64; // == 5f64.sqrt()

const LOG2E: f64 = 1.442_695_040_888_963_4;
/// fdlibm's split of ln 2: n * LN2_HI is exact for |n| < 2^11.
const LN2_HI: f64 = 6.931_471_803_691_238_164_90e-1;
const LN2_LO: f64 = 1.908_214_929_270_587_700_02e-10;
/// 1.5 * 2^52: adding it rounds to an integer kept in the low bits.
const ROUND_SHIFT: f64 = 6_755_399_441_055_744.0;
/// 1/i! for i = 0..=13, each a correctly rounded quotient (as `1.0 / math.factorial(i)`).
const EXP_COEF: [f64; 14] = [
    1.0,
    1.0,
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
    1.0 / 40320.0,
    1.0 / 362880.0,
    1.0 / 3628800.0,
    1.0 / 39916800.0,
    1.0 / 479001600.0,
    1.0 / 6227020800.0,
];

/// exp(x) from IEEE +, -, * and an exact power of two, in one fixed order: bit for bit
/// `residual_gpu._numba_math.portable_exp` on every CPU, whatever libm the process links.
/// Cody-Waite reduction x = n ln2 + r, the degree-13 Taylor polynomial by Horner's rule (no
/// FMA: Rust never contracts), times 2^n. Relative error below 3u (docs/precision.md);
/// 0 below -708, inf above 709, nan for nan.
pub fn portable_exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x < -708.0 {
        return 0.0;
    }
    if x > 709.0 {
        return f64::INFINITY;
    }
    let t = x * LOG2E + ROUND_SHIFT;
    let nf = t - ROUND_SHIFT;
    let r = (x - nf * LN2_HI) - nf * LN2_LO;
    let mut p = EXP_COEF[13] * r + EXP_COEF[12];
    for c in EXP_COEF[..12].iter().rev() {
        p = p * r + c;
    }
    // n in [-1021, 1023]: 2^n is a normal number and the product is exact
    let n = nf as i64;
    p * f64::from_bits(((n + 1023) as u64) << 52)
}

/// The supported covariance families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// s2 * exp(-r^2 / 2)
    Rbf,
    /// s2 * exp(-r)
    Matern12,
    /// s2 * (1 + sqrt3 r) exp(-sqrt3 r)
    Matern32,
    /// s2 * (1 + sqrt5 r + 5/3 r^2) exp(-sqrt5 r)
    Matern52,
}

impl Kernel {
    pub const NAMES: [&'static str; 4] = ["rbf", "matern12", "matern32", "matern52"];

    /// Parse a kernel name: one of "rbf", "matern12", "matern32", "matern52".
    pub fn from_name(name: &str) -> Result<Kernel, InputError> {
        match name {
            "rbf" => Ok(Kernel::Rbf),
            "matern12" => Ok(Kernel::Matern12),
            "matern32" => Ok(Kernel::Matern32),
            "matern52" => Ok(Kernel::Matern52),
            _ => Err(InputError(format!(
                "kernel must be one of {:?}, got {:?}",
                Kernel::NAMES,
                name
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Rbf => "rbf",
            Kernel::Matern12 => "matern12",
            Kernel::Matern32 => "matern32",
            Kernel::Matern52 => "matern52",
        }
    }

    /// k as a function of the scaled squared distance r2 (variance s2 included).
    #[inline(always)]
    pub fn from_r2(self, r2: f64, s2: f64) -> f64 {
        match self {
            Kernel::Rbf => s2 * portable_exp(-r2 / 2.0),
            Kernel::Matern12 => {
                let r = r2.sqrt();
                s2 * portable_exp(-r)
            }
            Kernel::Matern32 => {
                let r = r2.sqrt();
                s2 * ((1.0 + SQRT3 * r) * portable_exp(-SQRT3 * r))
            }
            Kernel::Matern52 => {
                let r = r2.sqrt();
                s2 * ((1.0 + SQRT5 * r + (5.0 / 3.0) * r2) * portable_exp(-SQRT5 * r))
            }
        }
    }
}

/// Kernel hyper-parameters: family, per-dimension lengthscale and variance.
#[derive(Clone, Debug)]
pub struct KernelParams {
    pub kernel: Kernel,
    pub lengthscale: Vec<f64>,
    pub variance: f64,
}

impl KernelParams {
    /// Validates lengthscale (finite, > 0) and variance (finite, > 0).
    pub fn new(kernel: Kernel, lengthscale: Vec<f64>, variance: f64) -> Result<Self, InputError> {
        if let Some(bad) = lengthscale.iter().find(|l| !(l.is_finite() && **l > 0.0)) {
            return Err(InputError(format!(
                "lengthscale must be finite and > 0, got {bad} in {lengthscale:?}"
            )));
        }
        if !(variance.is_finite() && variance > 0.0) {
            return Err(InputError(format!(
                "variance must be finite and > 0, got {variance}"
            )));
        }
        Ok(KernelParams {
            kernel,
            lengthscale,
            variance,
        })
    }

    /// Number of input dimensions the lengthscale is for.
    pub fn dim(&self) -> usize {
        self.lengthscale.len()
    }

    /// Scaled squared distance sum_t ((x[t] - y[t]) / l[t])^2, in order of t.
    #[inline(always)]
    pub fn r2(&self, x: &[f64], y: &[f64]) -> f64 {
        debug_assert_eq!(x.len(), self.lengthscale.len());
        debug_assert_eq!(y.len(), self.lengthscale.len());
        let mut r2 = 0.0;
        for ((a, b), l) in x.iter().zip(y).zip(&self.lengthscale) {
            let z = (a - b) / l;
            r2 += z * z;
        }
        r2
    }

    /// k(x, y).
    #[inline(always)]
    pub fn cov(&self, x: &[f64], y: &[f64]) -> f64 {
        self.kernel.from_r2(self.r2(x, y), self.variance)
    }

    /// k(x, y) for two ndarray rows (any strides).
    pub fn cov_view(&self, x: ArrayView1<f64>, y: ArrayView1<f64>) -> f64 {
        let x = x.to_vec();
        let y = y.to_vec();
        self.cov(&x, &y)
    }
}

/// Checks that a finite-valued array has no NaN or infinity; `what` names it in the error.
pub(crate) fn check_finite<'a, I>(values: I, what: &str) -> Result<(), InputError>
where
    I: IntoIterator<Item = &'a f64>,
{
    if let Some(bad) = values.into_iter().find(|v| !v.is_finite()) {
        return Err(InputError(format!(
            "{what} must contain only finite values, found {bad}"
        )));
    }
    Ok(())
}

/// Dense covariance block K(x1, x2), shape (n1, n2). Rows are computed in parallel.
pub fn covariance_block(
    x1: ArrayView2<f64>,
    x2: ArrayView2<f64>,
    params: &KernelParams,
) -> Result<Array2<f64>, InputError> {
    let d = params.dim();
    if x1.ncols() != d {
        return Err(InputError(format!(
            "x1 must have shape (n1, {d}) to match lengthscale, got shape {}",
            crate::fmt_shape(x1.shape())
        )));
    }
    if x2.ncols() != d {
        return Err(InputError(format!(
            "x2 must have shape (n2, {d}) to match lengthscale, got shape {}",
            crate::fmt_shape(x2.shape())
        )));
    }
    check_finite(x1.iter(), "x1")?;
    check_finite(x2.iter(), "x2")?;
    let x1 = x1.as_standard_layout();
    let x2 = x2.as_standard_layout();
    let (n1, n2) = (x1.nrows(), x2.nrows());
    let mut out = vec![0f64; n1 * n2];
    if n2 > 0 {
        let x1s = x1.as_slice().expect("standard layout");
        let x2s = x2.as_slice().expect("standard layout");
        out.par_chunks_mut(n2).enumerate().for_each(|(a, row)| {
            let xa = &x1s[a * d..(a + 1) * d];
            for (b, o) in row.iter_mut().enumerate() {
                *o = params.cov(xa, &x2s[b * d..(b + 1) * d]);
            }
        });
    }
    Ok(Array2::from_shape_vec((n1, n2), out).expect("shape"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1e-300)
    }

    #[test]
    fn constants_are_correctly_rounded() {
        assert_eq!(SQRT3, 3f64.sqrt());
        assert_eq!(SQRT5, 5f64.sqrt());
    }

    #[test]
    fn names_round_trip_and_reject_unknown() {
        for n in Kernel::NAMES {
            assert_eq!(Kernel::from_name(n).unwrap().name(), n);
        }
        let e = Kernel::from_name("matern72").unwrap_err();
        assert!(
            e.0.contains("kernel") && e.0.contains("matern72"),
            "{}",
            e.0
        );
    }

    // Hand-written values at x = (0, 0), y = (0.75, -0.5), l = (0.5, 2.0), s2 = 1.7:
    // r2 = (0.75/0.5)^2 + (0.5/2)^2 = 2.25 + 0.0625 = 2.3125 (exact in binary), r = 1.52069...
    // Reference numbers computed independently with Python's decimal module at 40 digits.
    #[test]
    fn kernels_match_hand_values() {
        let x = [0.0, 0.0];
        let y = [0.75, -0.5];
        let ls = vec![0.5, 2.0];
        let s2 = 1.7;
        let cases = [
            (Kernel::Rbf, 0.534_928_733_731_380_3),
            (Kernel::Matern12, 0.371_553_512_229_064_5),
            (Kernel::Matern32, 0.443_536_563_557_276_9),
            (Kernel::Matern52, 0.468_145_227_804_786_4),
        ];
        for (kern, want) in cases {
            let p = KernelParams::new(kern, ls.clone(), s2).unwrap();
            assert_eq!(p.r2(&x, &y), 2.3125);
            let got = p.cov(&x, &y);
            assert!(
                close(got, want, 1e-14),
                "{kern:?}: got {got:.17e} want {want:.17e}"
            );
            // Symmetric and equal to the variance at r = 0.
            assert_eq!(p.cov(&y, &x), got);
            assert_eq!(p.cov(&x, &x), s2);
        }
    }

    #[test]
    fn kernels_match_closed_forms_at_r_equal_one() {
        // r = 1 exactly: x - y = l.
        let p = |k| KernelParams::new(k, vec![0.5], 2.0).unwrap();
        let x = [0.75];
        let y = [0.25];
        assert!(close(p(Kernel::Rbf).cov(&x, &y), 2.0 * (-0.5f64).exp(), 1e-15));
        assert!(close(p(Kernel::Matern12).cov(&x, &y), 2.0 * (-1f64).exp(), 1e-15));
        let want32 = 2.0 * (1.0 + 3f64.sqrt()) * (-(3f64.sqrt())).exp();
        assert!(close(p(Kernel::Matern32).cov(&x, &y), want32, 1e-15));
        let want52 = 2.0 * (1.0 + 5f64.sqrt() + 5.0 / 3.0) * (-(5f64.sqrt())).exp();
        assert!(close(p(Kernel::Matern52).cov(&x, &y), want52, 1e-15));
    }

    #[test]
    fn portable_exp_is_within_its_bound_of_libm() {
        // |portable - exact| < 3u |exact| and |libm - exact| <= 1u |exact| (half an ulp, plus
        // glibc's documented slack), so the two differ by at most 4u relative.
        let u = f64::EPSILON / 2.0;
        let mut worst = 0.0f64;
        for i in 0..200_000 {
            let x = -745.0 + 1454.0 * (i as f64) / 200_000.0;
            if !(-708.0..=709.0).contains(&x) {
                continue;
            }
            let (got, want) = (portable_exp(x), x.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 4.0 * u, "worst relative difference {worst:e}");
        assert_eq!(portable_exp(0.0), 1.0);
        assert_eq!(portable_exp(-708.5), 0.0);
        assert_eq!(portable_exp(710.0), f64::INFINITY);
        assert!(portable_exp(f64::NAN).is_nan());
        assert_eq!(portable_exp(f64::NEG_INFINITY), 0.0);
    }

    #[test]
    fn params_are_validated() {
        assert!(KernelParams::new(Kernel::Rbf, vec![1.0, 0.0], 1.0)
            .unwrap_err()
            .0
            .contains("lengthscale"));
        assert!(KernelParams::new(Kernel::Rbf, vec![f64::NAN], 1.0)
            .unwrap_err()
            .0
            .contains("lengthscale"));
        assert!(KernelParams::new(Kernel::Rbf, vec![1.0], -1.0)
            .unwrap_err()
            .0
            .contains("variance"));
    }

    #[test]
    fn covariance_block_matches_pointwise_and_checks_shapes() {
        let p = KernelParams::new(Kernel::Matern52, vec![0.3, 0.7], 1.3).unwrap();
        let x1 = array![[0.0, 0.1], [0.5, -0.2], [1.0, 1.0]];
        let x2 = array![[0.2, 0.2], [0.5, -0.2]];
        let k = covariance_block(x1.view(), x2.view(), &p).unwrap();
        assert_eq!(k.shape(), &[3, 2]);
        for a in 0..3 {
            for b in 0..2 {
                assert_eq!(k[[a, b]], p.cov_view(x1.row(a), x2.row(b)));
            }
        }
        assert_eq!(k[[1, 1]], 1.3);
        // Fortran-ordered / strided input gives the same answer.
        let x1t = x1.t().to_owned();
        let k2 = covariance_block(x1t.t(), x2.view(), &p).unwrap();
        assert_eq!(k, k2);
        let bad = array![[0.0, 0.1, 0.2]];
        let e = covariance_block(bad.view(), x2.view(), &p).unwrap_err();
        assert!(e.0.starts_with("x1"), "{}", e.0);
        let e = covariance_block(x1.view(), bad.view(), &p).unwrap_err();
        assert!(e.0.starts_with("x2"), "{}", e.0);
    }
}
