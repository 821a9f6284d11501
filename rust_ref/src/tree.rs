//! The search tree (docs/tree.md, section 1), built the way `residual_gpu/tree/` (layout.py, bounds.py) builds it
//! in its `parity` preset, so that every array is identical bit for bit.
//!
//! - Points with `p_j < dense_ratio * median(p)` are kept out of the tree (`dense`).
//! - The others are split by dataset index into blocks `0, s0, 2 s0, 4 s0, ..., n`
//!   (`s0 = max(ceil(n / 16), 32 * leaf_size)`), one kd-tree per non-empty block.
//! - A node with more than `leaf_size` points splits on the dimension of largest
//!   lengthscale-scaled extent (first such), its points ordered by that coordinate stably
//!   from index order; the first `count / 2` go left. Leaves hold their points in ascending
//!   dataset index. Nodes are numbered in preorder, block after block.
//! - Node summaries of `z_j = (T V_j) / sqrt(p_j)`: interval centre / radius per coordinate,
//!   the range of `1 / sqrt(p_j)`, `zeta = max ||V_j|| / sqrt(p_j)` and the norm of
//!   `max(|zlo|, |zhi|)`, with the rounding slack of tree/bounds.py.
//!
//! Parity arithmetic: every sum is a plain sequential sum from 0.0 in ascending index order,
//! and Rust never contracts `a * b + c` into an FMA, so the Python engine's `parity` preset
//! (Numba without fastmath) computes the same bits.

use crate::residual::ResidualProblem;
use crate::InputError;
use ndarray::ArrayView2;
use rayon::prelude::*;

/// Unit roundoff of float64, 2^-53.
pub const U: f64 = 1.0 / 9_007_199_254_740_992.0;
/// Points with p_j < DENSE_RATIO * median(p) are evaluated densely, not through the tree.
pub const DENSE_RATIO: f64 = 1.0 / 64.0;
/// The parity preset's leaf size.
pub const PARITY_LEAF_SIZE: usize = 16;

/// `min(acc, v)` as Numba (and Python) evaluate it: `v if v < acc else acc`.
#[inline(always)]
pub(crate) fn nmin(acc: f64, v: f64) -> f64 {
    if v < acc {
        v
    } else {
        acc
    }
}

/// `max(acc, v)` as Numba (and Python) evaluate it: `v if v > acc else acc`.
#[inline(always)]
pub(crate) fn nmax(acc: f64, v: f64) -> f64 {
    if v > acc {
        v
    } else {
        acc
    }
}

/// Sum of squares accumulated sequentially from 0.0.
#[inline]
pub(crate) fn seq_sumsq(x: &[f64]) -> f64 {
    let mut s = 0.0;
    for &a in x {
        s += a * a;
    }
    s
}

/// `np.median`: the middle element, or the mean `(a + b) / 2` of the two middle ones.
/// NaN for an empty input (numpy warns and returns NaN).
pub fn median(values: &[f64]) -> f64 {
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    let mut s = values.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Dataset-index boundaries of the blocks: 0, s0, 2 s0, 4 s0, ..., n.
pub fn block_bounds(n: usize, leaf_size: usize) -> Vec<usize> {
    let s0 = n.div_ceil(16).max(32 * leaf_size);
    let mut out = vec![0];
    let mut b = s0;
    while b < n {
        out.push(b);
        b *= 2;
    }
    out.push(n);
    out
}

/// The factor T with T V_j = k(U, x_j): a lower-triangular (m, m) Cholesky factor, or the
/// identity (a (0, 0) array on the Python side, for problems without inducing points).
#[derive(Clone, Debug)]
pub enum Transform {
    Identity,
    /// Row-major (m, m), lower triangular with a non-zero diagonal.
    Lower {
        m: usize,
        t: Vec<f64>,
    },
}

impl Transform {
    /// Validates `t`: shape (m, m) or (0, 0) (the identity), finite, lower triangular with
    /// a non-zero diagonal.
    pub fn new(t: ArrayView2<f64>, m: usize) -> Result<Transform, InputError> {
        let shape = t.shape();
        if shape == [0, 0] {
            return Ok(Transform::Identity);
        }
        if shape != [m, m] {
            return Err(InputError(format!(
                "transform must have shape ({m}, {m}) to match v's columns, or (0, 0) for the \
                 identity, got shape {}",
                crate::fmt_shape(shape)
            )));
        }
        crate::kernels::check_finite(t.iter(), "transform")?;
        for u in 0..m {
            if t[[u, u]] == 0.0 {
                return Err(InputError(format!(
                    "transform must have a non-zero diagonal, got transform[{u}, {u}] = 0"
                )));
            }
            for w in u + 1..m {
                if t[[u, w]] != 0.0 {
                    return Err(InputError(format!(
                        "transform must be lower triangular, got transform[{u}, {w}] = {}",
                        t[[u, w]]
                    )));
                }
            }
        }
        Ok(Transform::Lower {
            m,
            t: t.iter().copied().collect(),
        })
    }

    pub fn is_identity(&self) -> bool {
        matches!(self, Transform::Identity)
    }

    /// `z = (T v) * y` with `(T v)_u = sum_{w <= u} T[u, w] v[w]` summed sequentially.
    pub fn apply_scaled(&self, v: &[f64], y: f64, z: &mut [f64]) {
        match self {
            Transform::Identity => {
                for (zu, &vu) in z.iter_mut().zip(v) {
                    *zu = vu * y;
                }
            }
            Transform::Lower { m, t } => {
                for u in 0..*m {
                    let row = &t[u * m..u * m + u + 1];
                    let mut s = 0.0;
                    for (tw, vw) in row.iter().zip(v) {
                        s += tw * vw;
                    }
                    z[u] = s * y;
                }
            }
        }
    }

    /// `tnorm = ||T||_F (1 + (m + 2) u)` over every entry in row-major order;
    /// sqrt(m) for the identity.
    pub fn tnorm(&self, m: usize) -> f64 {
        match self {
            Transform::Identity => (m as f64).sqrt(),
            Transform::Lower { t, .. } => seq_sumsq(t).sqrt() * (1.0 + (m as f64 + 2.0) * U),
        }
    }

    /// Per-query factors `(a, rn, na)` of docs/tree.md section 2: `a = T^-T v` by back
    /// substitution, `rn` a bound on `||v - T^T a||` plus the solve's error, `na = ||a||`
    /// with its rounding factor. `gam` and `tnorm` are the bound's constants.
    pub fn query_factors(&self, v: &[f64], gam: f64, tnorm: f64, a: &mut [f64]) -> (f64, f64) {
        let m = v.len();
        let grow = 1.0 + (m as f64 + 2.0) * U;
        match self {
            Transform::Identity => {
                a.copy_from_slice(v);
                (0.0, seq_sumsq(a).sqrt() * grow)
            }
            Transform::Lower { t, .. } => {
                for u in (0..m).rev() {
                    let mut s = v[u];
                    for w in u + 1..m {
                        s -= t[w * m + u] * a[w];
                    }
                    a[u] = s / t[u * m + u];
                }
                // the residual r = v - T^T a, (T^T a)_u = sum_{w >= u} T[w, u] a[w]
                let mut rsq = 0.0;
                for u in 0..m {
                    let mut back = 0.0;
                    for w in u..m {
                        back += t[w * m + u] * a[w];
                    }
                    let r = v[u] - back;
                    rsq += r * r;
                }
                let na = seq_sumsq(a).sqrt() * grow;
                let rn = rsq.sqrt() * grow + gam * tnorm * na;
                (rn, na)
            }
        }
    }
}

/// The flat arrays of the forest (field names as in tree/layout.py's `SearchTree`).
/// Points and nodes are `usize` here; the Python wrapper returns int64 arrays.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchTree {
    pub n: usize,
    pub d: usize,
    pub m: usize,
    pub leaf_size: usize,
    pub dense_ratio: f64,
    pub dense_cut: f64,
    /// tree position -> dataset index
    pub perm: Vec<usize>,
    pub node_start: Vec<usize>,
    pub node_end: Vec<usize>,
    /// child ids, -1 for a leaf
    pub node_left: Vec<i64>,
    pub node_right: Vec<i64>,
    /// (nodes, d) row-major coordinate boxes
    pub node_lo: Vec<f64>,
    pub node_hi: Vec<f64>,
    pub node_min: Vec<usize>,
    pub roots: Vec<usize>,
    pub root_lo: Vec<usize>,
    /// dataset indices kept out of the tree, ascending
    pub dense: Vec<usize>,
    /// (nodes, m) row-major
    pub node_mid: Vec<f64>,
    pub node_rad: Vec<f64>,
    pub node_ymin: Vec<f64>,
    pub node_ymax: Vec<f64>,
    pub node_zeta: Vec<f64>,
    pub node_zabs: Vec<f64>,
}

impl SearchTree {
    pub fn nodes(&self) -> usize {
        self.node_start.len()
    }

    pub fn is_leaf(&self, nd: usize) -> bool {
        self.node_left[nd] < 0
    }

    pub fn lo(&self, nd: usize) -> &[f64] {
        &self.node_lo[nd * self.d..(nd + 1) * self.d]
    }

    pub fn hi(&self, nd: usize) -> &[f64] {
        &self.node_hi[nd * self.d..(nd + 1) * self.d]
    }

    pub fn mid(&self, nd: usize) -> &[f64] {
        &self.node_mid[nd * self.m..(nd + 1) * self.m]
    }

    pub fn rad(&self, nd: usize) -> &[f64] {
        &self.node_rad[nd * self.m..(nd + 1) * self.m]
    }

    /// Dataset indices of a node's points (index-sorted for a leaf).
    pub fn points(&self, nd: usize) -> &[usize] {
        &self.perm[self.node_start[nd]..self.node_end[nd]]
    }
}

/// Parameters of the build.
#[derive(Clone, Copy, Debug)]
pub struct TreeParams {
    pub leaf_size: usize,
    pub dense_ratio: f64,
}

impl Default for TreeParams {
    fn default() -> Self {
        TreeParams {
            leaf_size: PARITY_LEAF_SIZE,
            dense_ratio: DENSE_RATIO,
        }
    }
}

impl TreeParams {
    pub fn check(&self) -> Result<(), InputError> {
        if self.leaf_size < 1 {
            return Err(InputError(format!(
                "leaf_size must be >= 1, got {}",
                self.leaf_size
            )));
        }
        if !(self.dense_ratio.is_finite() && self.dense_ratio >= 0.0) {
            return Err(InputError(format!(
                "dense_ratio must be finite and >= 0, got {}",
                self.dense_ratio
            )));
        }
        Ok(())
    }
}

/// The kd split of one block (tree/layout.py `_build_kd`, written recursively: left subtree first,
/// which numbers the nodes in the same preorder as the explicit stack there).
struct KdBuilder<'a> {
    x: &'a [f64],
    d: usize,
    inv_scale: &'a [f64],
    leaf_size: usize,
    tree: &'a mut SearchTree,
}

impl KdBuilder<'_> {
    /// Builds the node over `work[a..b]` (tree positions `start0 + a ..`); returns its id.
    fn node(&mut self, work: &mut [usize], a: usize, b: usize, start0: usize) -> usize {
        let (x, d) = (self.x, self.d);
        let me = self.tree.node_start.len();
        let mut seg = work[a..b].to_vec();
        seg.sort_unstable(); // by dataset index
        let tr = &mut *self.tree;
        tr.node_start.push(start0 + a);
        tr.node_end.push(start0 + b);
        tr.node_min.push(seg[0]);
        tr.node_left.push(-1);
        tr.node_right.push(-1);
        let mut best_t = 0;
        let mut best_w = -1.0;
        for t in 0..d {
            let mut lo = x[seg[0] * d + t];
            let mut hi = lo;
            for &j in &seg {
                let v = x[j * d + t];
                lo = nmin(lo, v);
                hi = nmax(hi, v);
            }
            tr.node_lo.push(lo);
            tr.node_hi.push(hi);
            let w = (hi - lo) * self.inv_scale[t];
            if w > best_w {
                best_w = w;
                best_t = t;
            }
        }
        if b - a <= self.leaf_size {
            work[a..b].copy_from_slice(&seg);
            return me;
        }
        // stable: equal coordinates keep index order (partial_cmp: -0.0 == 0.0, as numpy)
        seg.sort_by(|&i, &j| {
            x[i * d + best_t]
                .partial_cmp(&x[j * d + best_t])
                .expect("finite coordinates")
        });
        work[a..b].copy_from_slice(&seg);
        let half = (b - a) / 2;
        let left = self.node(work, a, a + half, start0);
        let right = self.node(work, a + half, b, start0);
        self.tree.node_left[me] = left as i64;
        self.tree.node_right[me] = right as i64;
        me
    }
}

/// kd-trees over `tree_points` (ascending dataset indices), one per index block.
fn build_forest(tree: &mut SearchTree, x: &[f64], inv_scale: &[f64], tree_points: &[usize]) {
    let bounds = block_bounds(tree.n, tree.leaf_size);
    let mut perm = tree_points.to_vec();
    let mut pos = 0;
    for w in bounds.windows(2) {
        let a = tree_points.partition_point(|&j| j < w[0]);
        let b = tree_points.partition_point(|&j| j < w[1]);
        if b <= a {
            continue;
        }
        tree.roots.push(tree.node_start.len());
        tree.root_lo.push(tree_points[a]);
        let mut builder = KdBuilder {
            x,
            d: tree.d,
            inv_scale,
            leaf_size: tree.leaf_size,
            tree,
        };
        builder.node(&mut perm[pos..pos + (b - a)], 0, b - a, pos);
        pos += b - a;
    }
    tree.perm = perm;
}

/// Leaf summaries before the rounding slack: (zlo, zhi, ymin, ymax, zeta) of
/// tree/bounds.py `_leaf_minmax` for the points of one leaf.
fn leaf_summary(
    points: &[usize],
    v: &[f64],
    m: usize,
    y_all: &[f64],
    vnorm: &[f64],
    transform: &Transform,
) -> (Vec<f64>, Vec<f64>, f64, f64, f64) {
    let mut zlo = vec![0.0; m];
    let mut zhi = vec![0.0; m];
    let mut z = vec![0.0; m];
    for (c, &j) in points.iter().enumerate() {
        transform.apply_scaled(&v[j * m..(j + 1) * m], y_all[j], &mut z);
        if c == 0 {
            zlo.copy_from_slice(&z);
            zhi.copy_from_slice(&z);
        } else {
            for t in 0..m {
                zlo[t] = nmin(zlo[t], z[t]);
                zhi[t] = nmax(zhi[t], z[t]);
            }
        }
    }
    let mut y0 = y_all[points[0]];
    let mut y1 = y0;
    let mut zt = 0.0;
    for &j in points {
        y0 = nmin(y0, y_all[j]);
        y1 = nmax(y1, y_all[j]);
        zt = nmax(zt, vnorm[j] * y_all[j]);
    }
    (zlo, zhi, y0, y1, zt)
}

/// Node summaries (tree/bounds.py `_summaries`): leaves from their points, internal nodes merged
/// up in reverse preorder, then mid / rad / zeta / zabs with their rounding slack.
fn summaries(tree: &mut SearchTree, v: &[f64], p: &[f64], vnorm: &[f64], transform: &Transform) {
    let m = tree.m;
    let nn = tree.nodes();
    let y_all: Vec<f64> = p.iter().map(|&pj| 1.0 / pj.sqrt()).collect();
    let leaves: Vec<usize> = (0..nn).filter(|&nd| tree.is_leaf(nd)).collect();
    let per_leaf: Vec<_> = leaves
        .par_iter()
        .map(|&nd| leaf_summary(tree.points(nd), v, m, &y_all, vnorm, transform))
        .collect();
    let mut zlo = vec![0.0; nn * m];
    let mut zhi = vec![0.0; nn * m];
    let mut ymin = vec![0.0; nn];
    let mut ymax = vec![0.0; nn];
    let mut zeta = vec![0.0; nn];
    for (&nd, (lo, hi, y0, y1, zt)) in leaves.iter().zip(per_leaf) {
        zlo[nd * m..(nd + 1) * m].copy_from_slice(&lo);
        zhi[nd * m..(nd + 1) * m].copy_from_slice(&hi);
        ymin[nd] = y0;
        ymax[nd] = y1;
        zeta[nd] = zt;
    }
    // children have larger ids (preorder): reverse order sees them first
    for nd in (0..nn).rev() {
        if tree.node_left[nd] < 0 {
            continue;
        }
        let a = tree.node_left[nd] as usize;
        let b = tree.node_right[nd] as usize;
        for t in 0..m {
            zlo[nd * m + t] = nmin(zlo[a * m + t], zlo[b * m + t]);
            zhi[nd * m + t] = nmax(zhi[a * m + t], zhi[b * m + t]);
        }
        ymin[nd] = nmin(ymin[a], ymin[b]);
        ymax[nd] = nmax(ymax[a], ymax[b]);
        zeta[nd] = nmax(zeta[a], zeta[b]);
    }
    let grow = 1.0 + (m as f64 + 2.0) * U;
    tree.node_mid = vec![0.0; nn * m];
    tree.node_rad = vec![0.0; nn * m];
    tree.node_zabs = vec![0.0; nn];
    let mut zabs = vec![0.0; m];
    for nd in 0..nn {
        for t in 0..m {
            let (lo, hi) = (zlo[nd * m + t], zhi[nd * m + t]);
            zabs[t] = lo.abs().max(hi.abs());
            tree.node_mid[nd * m + t] = (lo + hi) * 0.5;
            // [mid - rad, mid + rad] must contain [zlo, zhi] despite the rounding of mid, rad
            tree.node_rad[nd * m + t] = (hi - lo) * 0.5 + 4.0 * U * zabs[t];
        }
        tree.node_zabs[nd] = seq_sumsq(&zabs).sqrt() * grow;
    }
    tree.node_ymin = ymin;
    tree.node_ymax = ymax;
    tree.node_zeta = zeta.iter().map(|z| z * (1.0 + 4.0 * U)).collect();
}

/// `||V_j||` for every point, sequential sum of squares (the parity preset's v_norms).
pub fn v_norms(prob: &ResidualProblem) -> Vec<f64> {
    (0..prob.n())
        .map(|j| seq_sumsq(prob.vrow(j)).sqrt())
        .collect()
}

/// `1 / lengthscale`, elementwise.
pub fn inv_scale(prob: &ResidualProblem) -> Vec<f64> {
    prob.params().lengthscale.iter().map(|l| 1.0 / l).collect()
}

/// Builds the residual-metric forest of a problem (tree/layout.py `build_tree`).
/// `transform` must be for the problem's rank m (see [`Transform::new`]).
pub fn build_tree(
    prob: &ResidualProblem,
    transform: &Transform,
    params: TreeParams,
) -> Result<SearchTree, InputError> {
    params.check()?;
    let (n, d, m) = (prob.n(), prob.dim(), prob.rank());
    if d == 0 {
        return Err(InputError(
            "coords must have at least one column (d >= 1), got d = 0".into(),
        ));
    }
    if let Transform::Lower { m: tm, .. } = transform {
        if *tm != m {
            return Err(InputError(format!(
                "transform must have shape ({m}, {m}) to match v, got ({tm}, {tm})"
            )));
        }
    }
    let p = prob.p_slice();
    let dense_cut = median(p) * params.dense_ratio;
    // `p < dense_cut` exactly as numpy: a NaN cut (no points) makes nothing dense
    let is_dense = |j: &usize| p[*j] < dense_cut;
    let tree_points: Vec<usize> = (0..n).filter(|j| !is_dense(j)).collect();
    let dense: Vec<usize> = (0..n).filter(is_dense).collect();
    let mut tree = SearchTree {
        n,
        d,
        m,
        leaf_size: params.leaf_size,
        dense_ratio: params.dense_ratio,
        dense_cut,
        perm: Vec::new(),
        node_start: Vec::new(),
        node_end: Vec::new(),
        node_left: Vec::new(),
        node_right: Vec::new(),
        node_lo: Vec::new(),
        node_hi: Vec::new(),
        node_min: Vec::new(),
        roots: Vec::new(),
        root_lo: Vec::new(),
        dense,
        node_mid: Vec::new(),
        node_rad: Vec::new(),
        node_ymin: Vec::new(),
        node_ymax: Vec::new(),
        node_zeta: Vec::new(),
        node_zabs: Vec::new(),
    };
    let inv = inv_scale(prob);
    build_forest(&mut tree, prob.coords_slice(), &inv, &tree_points);
    summaries(&mut tree, prob.v_slice(), p, &v_norms(prob), transform);
    Ok(tree)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::Kernel;
    use crate::test_util::random_problem_with_factor;
    use ndarray::{Array1, Array2};

    #[test]
    fn median_matches_numpy() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[1.0]), 1.0);
        assert!(median(&[]).is_nan());
        // (a + b) / 2, not a + (b - a) / 2
        let a = 0.1;
        let b = 0.7;
        assert_eq!(median(&[b, a]), (a + b) / 2.0);
    }

    #[test]
    fn block_bounds_double() {
        assert_eq!(block_bounds(1000, 16), vec![0, 512, 1000]);
        assert_eq!(block_bounds(100, 16), vec![0, 100]);
        assert_eq!(block_bounds(0, 16), vec![0, 0]);
        assert_eq!(
            block_bounds(16 * 1000, 1),
            vec![0, 1000, 2000, 4000, 8000, 16000]
        );
        assert_eq!(block_bounds(16 * 1000 + 1, 1)[1], 1001);
    }

    /// A random problem with a Cholesky factor T of K_UU + jitter (as `random_problem_with_factor`
    /// builds it), inducing points off the data, optional duplicates and tiny-p points.
    pub(crate) struct TestProblem {
        pub x: Array2<f64>,
        pub v: Array2<f64>,
        pub p: Array1<f64>,
        pub params: crate::kernels::KernelParams,
        pub t: Array2<f64>,
    }

    pub(crate) fn test_problem(
        seed: u64,
        n: usize,
        d: usize,
        m: usize,
        kern: Kernel,
    ) -> TestProblem {
        let ((x, v, p, params), l) = random_problem_with_factor(seed, n, d, m, kern);
        TestProblem {
            x,
            v,
            p,
            params,
            t: l,
        }
    }

    /// Every structural invariant docs/tree.md states.
    pub(crate) fn check_structure(tree: &SearchTree, x: &Array2<f64>, p: &Array1<f64>) {
        let (n, d) = (tree.n, tree.d);
        let nn = tree.nodes();
        // perm and dense partition the points
        let mut seen = vec![0; n];
        for &j in tree.perm.iter().chain(&tree.dense) {
            seen[j] += 1;
        }
        assert!(seen.iter().all(|&c| c == 1));
        assert!(tree.dense.windows(2).all(|w| w[0] < w[1]));
        for &j in &tree.dense {
            assert!(p[j] < tree.dense_cut);
        }
        for &j in &tree.perm {
            assert!(p[j] >= tree.dense_cut);
        }
        // blocks: roots in order, each block's points in one index range
        let bounds = block_bounds(n, tree.leaf_size);
        assert_eq!(tree.roots.len(), tree.root_lo.len());
        for (b, &r) in tree.roots.iter().enumerate() {
            assert_eq!(tree.node_min[r], tree.root_lo[b]);
            let end = if b + 1 < tree.roots.len() {
                tree.roots[b + 1]
            } else {
                nn
            };
            // the block's nodes are r..end and cover a contiguous range of positions
            assert_eq!(
                tree.node_start[r],
                if b == 0 {
                    0
                } else {
                    tree.node_end[tree.roots[b - 1]]
                }
            );
            let blk = bounds.iter().rposition(|&s| s <= tree.root_lo[b]).unwrap();
            for nd in r..end {
                for &j in tree.points(nd) {
                    assert!(bounds[blk] <= j && j < bounds[blk + 1]);
                }
            }
        }
        if let Some(&r) = tree.roots.last() {
            assert_eq!(tree.node_end[r], tree.perm.len());
        }
        for nd in 0..nn {
            let pts = tree.points(nd);
            let count = pts.len();
            assert!(count >= 1);
            assert_eq!(tree.node_min[nd], *pts.iter().min().unwrap());
            // boxes are the exact min / max
            for t in 0..d {
                let lo = pts.iter().map(|&j| x[[j, t]]).fold(f64::INFINITY, f64::min);
                let hi = pts
                    .iter()
                    .map(|&j| x[[j, t]])
                    .fold(f64::NEG_INFINITY, f64::max);
                assert_eq!(tree.lo(nd)[t], lo);
                assert_eq!(tree.hi(nd)[t], hi);
            }
            if tree.is_leaf(nd) {
                assert_eq!(tree.node_right[nd], -1);
                assert!(count <= tree.leaf_size);
                assert!(
                    pts.windows(2).all(|w| w[0] < w[1]),
                    "leaf {nd} not index-sorted"
                );
            } else {
                let (l, r) = (tree.node_left[nd] as usize, tree.node_right[nd] as usize);
                assert_eq!(l, nd + 1, "preorder");
                assert!(r > l);
                assert!(count > tree.leaf_size);
                assert_eq!(tree.node_start[l], tree.node_start[nd]);
                assert_eq!(tree.node_end[l] - tree.node_start[l], count / 2);
                assert_eq!(tree.node_start[r], tree.node_end[l]);
                assert_eq!(tree.node_end[r], tree.node_end[nd]);
                // min / max merge up, so the children's intervals are inside the parent's
                for t in 0..tree.m {
                    for c in [l, r] {
                        let (pm, pr) = (tree.mid(nd)[t], tree.rad(nd)[t]);
                        let (cm, cr) = (tree.mid(c)[t], tree.rad(c)[t]);
                        assert!(pm - pr <= cm - cr + 1e-12 && cm + cr <= pm + pr + 1e-12);
                    }
                }
                assert!(tree.node_ymin[nd] <= tree.node_ymin[l].min(tree.node_ymin[r]));
                assert!(tree.node_zeta[nd] >= tree.node_zeta[l].max(tree.node_zeta[r]));
            }
        }
    }

    /// The kd split rule: the split dimension has the largest scaled extent (first such),
    /// every left point is <= every right point on it, and ties keep index order.
    fn check_split_rule(tree: &SearchTree, x: &Array2<f64>, inv: &[f64]) {
        for nd in 0..tree.nodes() {
            if tree.is_leaf(nd) {
                continue;
            }
            let d = tree.d;
            let w: Vec<f64> = (0..d)
                .map(|t| (tree.hi(nd)[t] - tree.lo(nd)[t]) * inv[t])
                .collect();
            let best = (0..d).fold(0, |b, t| if w[t] > w[b] { t } else { b });
            let l = tree.node_left[nd] as usize;
            let r = tree.node_right[nd] as usize;
            let lmax = tree
                .points(l)
                .iter()
                .map(|&j| x[[j, best]])
                .fold(f64::NEG_INFINITY, f64::max);
            let rmin = tree
                .points(r)
                .iter()
                .map(|&j| x[[j, best]])
                .fold(f64::INFINITY, f64::min);
            assert!(lmax <= rmin, "node {nd}: split on {best} not ordered");
            if lmax == rmin {
                // equal coordinates straddle the split: the smaller indices went left
                let lj = tree
                    .points(l)
                    .iter()
                    .filter(|&&j| x[[j, best]] == lmax)
                    .max();
                let rj = tree
                    .points(r)
                    .iter()
                    .filter(|&&j| x[[j, best]] == rmin)
                    .min();
                assert!(lj < rj);
            }
        }
    }

    fn problem_of(tp: &TestProblem) -> ResidualProblem<'_> {
        ResidualProblem::new(tp.x.view(), tp.v.view(), tp.p.view(), tp.params.clone()).unwrap()
    }

    #[test]
    fn tree_structure_and_split_rules() {
        for (seed, n, d, leaf) in [
            (1u64, 700, 2, 16),
            (2, 300, 1, 4),
            (3, 1000, 3, 16),
            (4, 257, 8, 1),
            (5, 40, 2, 64),
        ] {
            let mut tp = test_problem(seed, n, d, 6, Kernel::Matern32);
            // duplicates (ties in every coordinate) and a few tiny-p points (dense)
            for j in 0..n / 10 {
                let src = tp.x.row(j).to_owned();
                tp.x.row_mut(n / 2 + j).assign(&src);
            }
            for j in (0..n).step_by(97) {
                tp.p[j] = 1e-9;
            }
            // a coordinate with many exact ties
            for j in 0..n {
                tp.x[[j, 0]] = (tp.x[[j, 0]] * 8.0).floor() / 8.0;
            }
            let prob = problem_of(&tp);
            let tr = Transform::new(tp.t.view(), 6).unwrap();
            let params = TreeParams {
                leaf_size: leaf,
                dense_ratio: DENSE_RATIO,
            };
            let tree = build_tree(&prob, &tr, params).unwrap();
            assert!(!tree.dense.is_empty());
            check_structure(&tree, &tp.x, &tp.p);
            check_split_rule(&tree, &tp.x, &inv_scale(&prob));
            // deterministic
            assert_eq!(tree, build_tree(&prob, &tr, params).unwrap());
        }
    }

    #[test]
    fn summaries_contain_every_point() {
        let tp = test_problem(8, 500, 2, 7, Kernel::Rbf);
        let prob = problem_of(&tp);
        for tr in [Transform::new(tp.t.view(), 7).unwrap(), Transform::Identity] {
            let tree = build_tree(&prob, &tr, TreeParams::default()).unwrap();
            let mut z = vec![0.0; 7];
            for nd in 0..tree.nodes() {
                let mut zeta: f64 = 0.0;
                for &j in tree.points(nd) {
                    let y = 1.0 / tp.p[j].sqrt();
                    tr.apply_scaled(tp.v.row(j).as_slice().unwrap(), y, &mut z);
                    for ((zt, mt), rt) in z.iter().zip(tree.mid(nd)).zip(tree.rad(nd)) {
                        assert!((zt - mt).abs() <= *rt);
                    }
                    assert!(tree.node_ymin[nd] <= y && y <= tree.node_ymax[nd]);
                    zeta = zeta.max(seq_sumsq(tp.v.row(j).as_slice().unwrap()).sqrt() * y);
                }
                assert!(tree.node_zeta[nd] >= zeta && tree.node_zeta[nd] <= zeta * (1.0 + 1e-15));
            }
        }
    }

    #[test]
    fn transform_factors_invert_t() {
        let tp = test_problem(9, 20, 2, 9, Kernel::Matern52);
        let tr = Transform::new(tp.t.view(), 9).unwrap();
        let gam = 1e-14;
        let tnorm = tr.tnorm(9);
        for j in 0..20 {
            let v = tp.v.row(j).to_vec();
            let mut a = vec![0.0; 9];
            let (rn, na) = tr.query_factors(&v, gam, tnorm, &mut a);
            // T^T a = v
            for (u, vu) in v.iter().enumerate() {
                let back: f64 = (u..9).map(|w| tp.t[[w, u]] * a[w]).sum();
                assert!((back - vu).abs() < 1e-9);
            }
            assert!((0.0..1e-6).contains(&rn));
            assert!((na - seq_sumsq(&a).sqrt()).abs() <= 1e-12 * na);
        }
        let (rn, na) =
            Transform::Identity.query_factors(&[3.0, 4.0], gam, 2f64.sqrt(), &mut [0.0; 2]);
        assert_eq!(rn, 0.0);
        assert_eq!(na, 5.0 * (1.0 + 4.0 * U));
        assert_eq!(Transform::Identity.tnorm(4), 2.0);
        // validation
        let bad = ndarray::array![[1.0, 2.0], [0.0, 1.0]];
        assert!(Transform::new(bad.view(), 2)
            .unwrap_err()
            .0
            .contains("lower triangular"));
        let bad = ndarray::array![[0.0, 0.0], [1.0, 1.0]];
        assert!(Transform::new(bad.view(), 2)
            .unwrap_err()
            .0
            .contains("diagonal"));
        let bad = Array2::<f64>::zeros((3, 3));
        assert!(Transform::new(bad.view(), 2)
            .unwrap_err()
            .0
            .starts_with("transform"));
        assert!(Transform::new(Array2::<f64>::zeros((0, 0)).view(), 5)
            .unwrap()
            .is_identity());
    }
}
