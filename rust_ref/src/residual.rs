//! Residual correlation distance between dataset points.
//!
//! For points i, j with coordinates x, low-rank factors V (rows V_i, length m) and residual
//! variances p:
//!
//! ```text
//! k    = kernel(x_i, x_j)                      (see kernels.rs for the evaluation order)
//! s    = V_i . V_j                             (compensated Dot2, returned as s_hi + s_lo)
//! c    = (k - s_hi) - s_lo
//! rho  = clamp(c / sqrt(p_i * p_j), -1, 1)
//! dist = sqrt(1 - |rho|)                      (exactly 0 when i == j)
//! ```

use crate::kernels::{check_finite, KernelParams};
use crate::InputError;
use ndarray::{Array2, ArrayView, ArrayView1, ArrayView2, CowArray, Dimension, Ix1, Ix2};
use rayon::prelude::*;

/// Knuth's branch-free TwoSum: a + b = s + err exactly.
#[inline(always)]
pub fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    let err = (a - (s - bb)) + (b - bb);
    (s, err)
}

/// TwoProduct with a fused multiply-add: a * b = h + e exactly.
#[inline(always)]
pub fn two_product(a: f64, b: f64) -> (f64, f64) {
    let h = a * b;
    let e = a.mul_add(b, -h);
    (h, e)
}

#[inline(always)]
fn dot2_impl(a: &[f64], b: &[f64]) -> (f64, f64) {
    let mut s_hi = 0.0f64;
    let mut s_lo = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        let (h, e) = two_product(*x, *y);
        let (s, q) = two_sum(s_hi, h);
        s_hi = s;
        s_lo += q + e;
    }
    (s_hi, s_lo)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn dot2_fma(a: &[f64], b: &[f64]) -> (f64, f64) {
    dot2_impl(a, b)
}

/// Four Dot2 products of `a` with `b[0..4]` at once: four independent chains, each doing
/// exactly the operations of [`dot2`] in the same order, so every result equals
/// `dot2(a, b[c])` bit for bit. Interleaving only hides the latency of the TwoSum chain.
#[inline(always)]
fn dot2x4_impl(a: &[f64], b: [&[f64]; 4]) -> [(f64, f64); 4] {
    let m = a.len();
    let (b0, b1, b2, b3) = (&b[0][..m], &b[1][..m], &b[2][..m], &b[3][..m]);
    let mut hi = [0.0f64; 4];
    let mut lo = [0.0f64; 4];
    for t in 0..m {
        let x = a[t];
        let y = [b0[t], b1[t], b2[t], b3[t]];
        for c in 0..4 {
            let (h, e) = two_product(x, y[c]);
            let (s, q) = two_sum(hi[c], h);
            hi[c] = s;
            lo[c] += q + e;
        }
    }
    [
        (hi[0], lo[0]),
        (hi[1], lo[1]),
        (hi[2], lo[2]),
        (hi[3], lo[3]),
    ]
}

/// AVX2 version of [`dot2x4_impl`]: lane c runs chain c. Every lane operation (mul, fused
/// multiply-subtract, add, sub) is the IEEE operation the scalar code does, in the same
/// order, so the results are identical bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
unsafe fn dot2x4_avx2(a: &[f64], b: [&[f64]; 4]) -> [(f64, f64); 4] {
    use std::arch::x86_64::*;
    let m = a.len();
    let (b0, b1, b2, b3) = (&b[0][..m], &b[1][..m], &b[2][..m], &b[3][..m]);
    let mut hi = _mm256_setzero_pd();
    let mut lo = _mm256_setzero_pd();
    for t in 0..m {
        let x = _mm256_set1_pd(a[t]);
        let y = _mm256_set_pd(b3[t], b2[t], b1[t], b0[t]); // lane 0 = b0
                                                           // TwoProduct: h = x*y, e = fma(x, y, -h)
        let h = _mm256_mul_pd(x, y);
        let e = _mm256_fmsub_pd(x, y, h);
        // TwoSum(hi, h), then lo += q + e
        let s = _mm256_add_pd(hi, h);
        let bb = _mm256_sub_pd(s, hi);
        let q = _mm256_add_pd(
            _mm256_sub_pd(hi, _mm256_sub_pd(s, bb)),
            _mm256_sub_pd(h, bb),
        );
        hi = s;
        lo = _mm256_add_pd(lo, _mm256_add_pd(q, e));
    }
    let mut h = [0.0f64; 4];
    let mut l = [0.0f64; 4];
    _mm256_storeu_pd(h.as_mut_ptr(), hi);
    _mm256_storeu_pd(l.as_mut_ptr(), lo);
    [(h[0], l[0]), (h[1], l[1]), (h[2], l[2]), (h[3], l[3])]
}

/// `[dot2(a, b[0]), .., dot2(a, b[3])]`, bit for bit, computed faster.
#[inline]
pub fn dot2x4(a: &[f64], b: [&[f64]; 4]) -> [(f64, f64); 4] {
    for bc in &b {
        assert_eq!(bc.len(), a.len(), "dot2x4: length mismatch");
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2")
        {
            // SAFETY: the CPU supports FMA and AVX2 (checked just above).
            return unsafe { dot2x4_avx2(a, b) };
        }
    }
    dot2x4_impl(a, b)
}

/// Compensated dot product Dot2 (Ogita, Rump & Oishi 2005), returned unevaluated as
/// (s_hi, s_lo); the sum is as accurate as if computed in twice the working precision.
///
/// `f64::mul_add` is always a correctly rounded fused multiply-add, so the result is the
/// same bit for bit with or without a hardware FMA; the FMA path is only faster.
#[inline]
pub fn dot2(a: &[f64], b: &[f64]) -> (f64, f64) {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports FMA (checked just above).
            return unsafe { dot2_fma(a, b) };
        }
    }
    dot2_impl(a, b)
}

/// Borrow `a` if it is C-contiguous, else copy it into C order.
fn standard<'a, D: Dimension>(a: ArrayView<'a, f64, D>) -> CowArray<'a, f64, D> {
    if a.is_standard_layout() {
        CowArray::from(a)
    } else {
        CowArray::from(a.as_standard_layout().into_owned())
    }
}

/// A residual problem over n dataset points: coordinates (n, d), V (n, m), p (n,),
/// and the kernel. Arrays are held in standard (C-contiguous) layout; borrowed without a
/// copy when they already are.
pub struct ResidualProblem<'a> {
    coords: CowArray<'a, f64, Ix2>,
    v: CowArray<'a, f64, Ix2>,
    p: CowArray<'a, f64, Ix1>,
    params: KernelParams,
}

impl<'a> ResidualProblem<'a> {
    /// Validates shapes and values: coords (n, d) with d = len(lengthscale), v (n, m),
    /// p (n,) finite and > 0; coords and v finite.
    pub fn new(
        coords: ArrayView2<'a, f64>,
        v: ArrayView2<'a, f64>,
        p: ArrayView1<'a, f64>,
        params: KernelParams,
    ) -> Result<Self, InputError> {
        let n = coords.nrows();
        let d = params.dim();
        if coords.ncols() != d {
            return Err(InputError(format!(
                "coords must have shape (n, {d}) to match lengthscale of length {d}, got shape {}",
                crate::fmt_shape(coords.shape())
            )));
        }
        if v.nrows() != n {
            return Err(InputError(format!(
                "v must have shape ({n}, m) to match coords, got shape {}",
                crate::fmt_shape(v.shape())
            )));
        }
        if p.len() != n {
            return Err(InputError(format!(
                "p must have shape ({n},) to match coords, got shape {}",
                crate::fmt_shape(p.shape())
            )));
        }
        check_finite(coords.iter(), "coords")?;
        check_finite(v.iter(), "v")?;
        if let Some((i, bad)) = p
            .iter()
            .enumerate()
            .find(|(_, x)| !(x.is_finite() && **x > 0.0))
        {
            return Err(InputError(format!(
                "p must be finite and > 0, got p[{i}] = {bad}"
            )));
        }
        Ok(ResidualProblem {
            coords: standard(coords),
            v: standard(v),
            p: standard(p),
            params,
        })
    }

    pub fn n(&self) -> usize {
        self.coords.nrows()
    }

    pub fn dim(&self) -> usize {
        self.coords.ncols()
    }

    pub fn rank(&self) -> usize {
        self.v.ncols()
    }

    pub fn params(&self) -> &KernelParams {
        &self.params
    }

    /// Coordinates, row-major (n, d).
    pub fn coords_slice(&self) -> &[f64] {
        self.coords.as_slice().expect("standard layout")
    }

    /// V, row-major (n, m).
    pub fn v_slice(&self) -> &[f64] {
        self.v.as_slice().expect("standard layout")
    }

    /// Residual variances p (n,).
    pub fn p_slice(&self) -> &[f64] {
        self.p.as_slice().expect("standard layout")
    }

    /// Coordinates of point i.
    #[inline(always)]
    pub fn x(&self, i: usize) -> &[f64] {
        let d = self.dim();
        &self.coords.as_slice().expect("standard layout")[i * d..(i + 1) * d]
    }

    /// Row i of V.
    #[inline(always)]
    pub fn vrow(&self, i: usize) -> &[f64] {
        let m = self.rank();
        &self.v.as_slice().expect("standard layout")[i * m..(i + 1) * m]
    }

    /// Residual covariance c_ij = (k_ij - s_hi) - s_lo, with (s_hi, s_lo) = Dot2(V_i, V_j).
    #[inline]
    pub fn residual_cov(&self, i: usize, j: usize) -> f64 {
        let k = self.params.cov(self.x(i), self.x(j));
        let (s_hi, s_lo) = dot2(self.vrow(i), self.vrow(j));
        (k - s_hi) - s_lo
    }

    /// Residual correlation rho_ij clamped to [-1, 1] (not special-cased for i == j).
    #[inline]
    pub fn rho(&self, i: usize, j: usize) -> f64 {
        self.rho_from_cov(i, j, self.residual_cov(i, j))
    }

    #[inline(always)]
    fn rho_from_cov(&self, i: usize, j: usize, c: f64) -> f64 {
        let rho = c / (self.p[i] * self.p[j]).sqrt();
        rho.clamp(-1.0, 1.0)
    }

    #[inline(always)]
    fn dist_from_cov(&self, i: usize, j: usize, c: f64) -> f64 {
        if i == j {
            return 0.0;
        }
        (1.0 - self.rho_from_cov(i, j, c).abs()).sqrt()
    }

    /// `out[b] = dist(i, js[b])` for every b; identical to calling [`Self::dist`] one by
    /// one, but with four Dot2 chains interleaved.
    pub fn dist_many(&self, i: usize, js: &[usize], out: &mut [f64]) {
        assert_eq!(js.len(), out.len());
        let xi = self.x(i);
        let vi = self.vrow(i);
        let mut jc = js.chunks_exact(4);
        let mut oc = out.chunks_exact_mut(4);
        for (j4, o4) in (&mut jc).zip(&mut oc) {
            let s = dot2x4(
                vi,
                [
                    self.vrow(j4[0]),
                    self.vrow(j4[1]),
                    self.vrow(j4[2]),
                    self.vrow(j4[3]),
                ],
            );
            for c in 0..4 {
                let j = j4[c];
                let k = self.params.cov(xi, self.x(j));
                let (s_hi, s_lo) = s[c];
                o4[c] = self.dist_from_cov(i, j, (k - s_hi) - s_lo);
            }
        }
        for (&j, o) in jc.remainder().iter().zip(oc.into_remainder()) {
            *o = self.dist(i, j);
        }
    }

    /// Distance d_ij = sqrt(1 - |rho_ij|), exactly 0 when i == j. Indices must be < n.
    #[inline]
    pub fn dist(&self, i: usize, j: usize) -> f64 {
        if i == j {
            return 0.0;
        }
        (1.0 - self.rho(i, j).abs()).sqrt()
    }

    /// Checks dataset indices; `what` names the argument in the error.
    pub fn check_indices(&self, idx: &[i64], what: &str) -> Result<(), InputError> {
        let n = self.n();
        if let Some((a, bad)) = idx
            .iter()
            .enumerate()
            .find(|(_, i)| **i < 0 || **i as u64 >= n as u64)
        {
            return Err(InputError(format!(
                "{what} must hold dataset indices in [0, {n}), got {what}[{a}] = {bad}"
            )));
        }
        Ok(())
    }

    /// Dense distance block: out[a, b] = dist(rows[a], cols[b]). Rows in parallel.
    pub fn distance_block(&self, rows: &[i64], cols: &[i64]) -> Result<Array2<f64>, InputError> {
        self.check_indices(rows, "rows")?;
        self.check_indices(cols, "cols")?;
        let nc = cols.len();
        let mut out = vec![0f64; rows.len() * nc];
        if nc > 0 {
            out.par_chunks_mut(nc).zip(rows.par_iter()).for_each_init(
                || cols.iter().map(|&j| j as usize).collect::<Vec<usize>>(),
                |js, (orow, &i)| self.dist_many(i as usize, js, orow),
            );
        }
        Ok(Array2::from_shape_vec((rows.len(), nc), out).expect("shape"))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::Kernel;
    use crate::test_util::{random_problem_arrays, ProblemArrays, SplitMix64};
    use ndarray::array;

    #[test]
    fn two_sum_and_two_product_are_exact() {
        let (s, e) = two_sum(1.0, 1e-17);
        assert_eq!((s, e), (1.0, 1e-17));
        // 1e16 + 1 is not representable (ulp is 2): the 1 survives in the error term.
        assert_eq!(two_sum(1e16, 1.0), (1e16, 1.0));
        assert_eq!(two_sum(1.0, 1e16), (1e16, 1.0));
        let a = 1.0 + f64::EPSILON;
        let (h, e) = two_product(a, a);
        // (1 + u)^2 = 1 + 2u + u^2; u^2 is lost in h, kept in e.
        assert_eq!(h, 1.0 + 2.0 * f64::EPSILON);
        assert_eq!(e, f64::EPSILON * f64::EPSILON);
    }

    #[test]
    fn dot2_recovers_cancellation() {
        // Plain summation gives 0 here; the exact value is 2.
        let a = [1e16, 1.0, -1e16, 1.0];
        let b = [1.0, 1.0, 1.0, 1.0];
        let (hi, lo) = dot2(&a, &b);
        assert_eq!(hi + lo, 2.0);
        let mut rng = SplitMix64::new(5);
        let a: Vec<f64> = (0..100).map(|_| rng.normal()).collect();
        let b: Vec<f64> = (0..100).map(|_| rng.normal()).collect();
        assert_eq!(dot2(&a, &b), dot2_impl(&a, &b));
        let naive: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        let (hi, lo) = dot2(&a, &b);
        assert!((hi + lo - naive).abs() < 1e-12);
        assert_eq!(dot2(&[], &[]), (0.0, 0.0));
    }

    #[test]
    fn dot2x4_and_dist_many_match_single_bit_for_bit() {
        let mut rng = SplitMix64::new(17);
        for m in [0usize, 1, 3, 8, 33] {
            let rows: Vec<Vec<f64>> = (0..5)
                .map(|_| {
                    (0..m)
                        .map(|_| rng.normal() * 1e3f64.powf(rng.uniform()))
                        .collect()
                })
                .collect();
            let got = dot2x4(&rows[0], [&rows[1], &rows[2], &rows[3], &rows[4]]);
            let portable = dot2x4_impl(&rows[0], [&rows[1], &rows[2], &rows[3], &rows[4]]);
            for c in 0..4 {
                assert_eq!(got[c], dot2(&rows[0], &rows[c + 1]));
                assert_eq!(got[c], dot2_impl(&rows[0], &rows[c + 1]));
                assert_eq!(portable[c], got[c]);
            }
        }
        let (x, v, p, params) = problem(12, 50, 3, 7, Kernel::Matern32);
        let prob = ResidualProblem::new(x.view(), v.view(), p.view(), params).unwrap();
        let js: Vec<usize> = vec![4, 0, 49, 4, 17, 3, 3, 22, 9, 10, 11];
        for i in [0usize, 3, 4, 49] {
            for len in 0..=js.len() {
                let mut out = vec![f64::NAN; len];
                prob.dist_many(i, &js[..len], &mut out);
                for (o, &j) in out.iter().zip(&js[..len]) {
                    assert_eq!(o.to_bits(), prob.dist(i, j).to_bits());
                }
            }
        }
    }

    fn problem(seed: u64, n: usize, d: usize, m: usize, kern: Kernel) -> ProblemArrays {
        random_problem_arrays(seed, n, d, m, kern)
    }

    #[test]
    fn distance_block_is_symmetric_bounded_zero_diagonal() {
        for (seed, kern) in [
            (1, Kernel::Rbf),
            (2, Kernel::Matern12),
            (3, Kernel::Matern32),
            (4, Kernel::Matern52),
        ] {
            let (x, v, p, params) = problem(seed, 40, 3, 5, kern);
            let prob = ResidualProblem::new(x.view(), v.view(), p.view(), params).unwrap();
            let idx: Vec<i64> = (0..40).collect();
            let dblk = prob.distance_block(&idx, &idx).unwrap();
            for i in 0..40 {
                assert_eq!(dblk[[i, i]], 0.0);
                for j in 0..40 {
                    let v = dblk[[i, j]];
                    assert!((0.0..=1.0).contains(&v), "d[{i},{j}] = {v}");
                    assert_eq!(v, dblk[[j, i]], "asymmetric at ({i},{j})");
                    assert_eq!(v, prob.dist(i, j));
                }
            }
            // Some distances are strictly inside (0, 1): the problem is not degenerate.
            assert!(dblk.iter().any(|&v| v > 0.05 && v < 0.95));
            // Block with repeats and a sub-selection.
            let rows = [3i64, 3, 0, 39];
            let cols = [39i64, 3, 7];
            let sub = prob.distance_block(&rows, &cols).unwrap();
            for (a, &i) in rows.iter().enumerate() {
                for (b, &j) in cols.iter().enumerate() {
                    assert_eq!(sub[[a, b]], dblk[[i as usize, j as usize]]);
                }
            }
            assert_eq!(sub[[0, 1]], 0.0);
        }
    }

    #[test]
    fn distance_matches_plain_formula() {
        let (x, v, p, params) = problem(9, 30, 2, 4, Kernel::Matern32);
        let prob = ResidualProblem::new(x.view(), v.view(), p.view(), params.clone()).unwrap();
        for i in 0..30 {
            for j in 0..30 {
                if i == j {
                    continue;
                }
                let k = params.cov_view(x.row(i), x.row(j));
                let s = v.row(i).dot(&v.row(j));
                let rho = ((k - s) / (p[i] * p[j]).sqrt()).clamp(-1.0, 1.0);
                let want = (1.0 - rho.abs()).sqrt();
                assert!((prob.dist(i, j) - want).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn distance_of_duplicate_points_is_zero_and_clamped() {
        // Two copies of one point with zero low-rank part: rho = k / p = 1 -> d = 0.
        let x = array![[0.0, 0.0], [0.0, 0.0], [3.0, 0.0]];
        let v = Array2::<f64>::zeros((3, 2));
        let p = array![1.0, 1.0, 1.0];
        let params = KernelParams::new(Kernel::Rbf, vec![1.0, 1.0], 1.0).unwrap();
        let prob = ResidualProblem::new(x.view(), v.view(), p.view(), params).unwrap();
        assert_eq!(prob.dist(0, 1), 0.0);
        assert_eq!(prob.dist(0, 2), (1.0 - (-4.5f64).exp()).sqrt());
        // Residual variance smaller than the covariance: rho clamps to 1.
        let p = array![0.5, 0.5, 0.5];
        let params = KernelParams::new(Kernel::Rbf, vec![1.0, 1.0], 1.0).unwrap();
        let prob = ResidualProblem::new(x.view(), v.view(), p.view(), params).unwrap();
        assert_eq!(prob.rho(0, 1), 1.0);
        assert_eq!(prob.dist(0, 1), 0.0);
    }

    #[test]
    fn inputs_are_validated() {
        let (x, v, p, params) = problem(3, 10, 2, 3, Kernel::Rbf);
        fn err_of<'a>(
            params: &KernelParams,
            x: ArrayView2<'a, f64>,
            v: ArrayView2<'a, f64>,
            p: ArrayView1<'a, f64>,
        ) -> String {
            ResidualProblem::new(x, v, p, params.clone())
                .err()
                .unwrap()
                .0
        }
        assert!(
            err_of(&params, x.slice(ndarray::s![.., ..1]), v.view(), p.view())
                .starts_with("coords")
        );
        assert!(
            err_of(&params, x.view(), v.slice(ndarray::s![..9, ..]), p.view()).starts_with("v ")
        );
        assert!(err_of(&params, x.view(), v.view(), p.slice(ndarray::s![..9])).starts_with("p "));
        let mut p0 = p.clone();
        p0[4] = 0.0;
        let e = err_of(&params, x.view(), v.view(), p0.view());
        assert!(e.starts_with("p ") && e.contains("p[4]"), "{e}");
        let mut xn = x.clone();
        xn[[2, 1]] = f64::NAN;
        assert!(err_of(&params, xn.view(), v.view(), p.view()).starts_with("coords"));
        let prob = ResidualProblem::new(x.view(), v.view(), p.view(), params.clone()).unwrap();
        let e = prob.distance_block(&[0, 10], &[1]).unwrap_err().0;
        assert!(e.starts_with("rows") && e.contains("10"), "{e}");
        let e = prob.distance_block(&[0], &[-1]).unwrap_err().0;
        assert!(e.starts_with("cols") && e.contains("-1"), "{e}");
    }

    #[test]
    fn strided_inputs_give_identical_results() {
        let (x, v, p, params) = problem(11, 25, 3, 4, Kernel::Matern52);
        let a = ResidualProblem::new(x.view(), v.view(), p.view(), params.clone()).unwrap();
        let xf = x.t().to_owned();
        let vf = v.t().to_owned();
        let b = ResidualProblem::new(xf.t(), vf.t(), p.view(), params).unwrap();
        let idx: Vec<i64> = (0..25).collect();
        assert_eq!(
            a.distance_block(&idx, &idx).unwrap(),
            b.distance_block(&idx, &idx).unwrap()
        );
    }
}
