//! The tree's select pass (docs/tree.md sections 2-4; `residual_gpu/tree/`'s `TreeSearcher.run`
//! / `_traverse_tile` and `backends/cpu.py`'s `_eval_block`), in the parity preset's arithmetic.
//!
//! A select over a set of queries keeps, per query, the `keep` largest |rho| it evaluated
//! (a bounded min-heap whose array layout is part of the result: certification breaks ties
//! by position in it) and `a_dropped`, an upper bound on every admissible |rho| it did not
//! keep: values pushed out of or never entering the heap, and the bounds of pruned nodes.
//! Queries are put in Hilbert order and cut into tiles of `tile_size`; tiles are
//! independent (parallel with rayon; the result does not depend on the thread count).
//!
//! Every evaluated value is the accurate |rho| (Dot2, the value [`ResidualProblem::rho`]
//! and certification compute), so the pruning decisions of both engines see the same bits.

use crate::hilbert::hilbert_order;
use crate::kernels::Kernel;
use crate::residual::ResidualProblem;
use crate::tree::{nmax, nmin, SearchTree, Transform, U};
use rayon::prelude::*;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// The parity preset's tile size and frontier pop batch.
pub const PARITY_TILE_SIZE: usize = 32;
pub const PARITY_POP_BATCH: usize = 8;

/// A pool entry marking "no admissible point / already accounted for" (tree.traversal.NOADM).
const NOADM: f64 = f64::NEG_INFINITY;

/// gamma_(m+2) = (m + 2) u / (1 - (m + 2) u) (precision.gamma(m)).
pub fn gamma(m: usize) -> f64 {
    let nu = (m as f64 + 2.0) * U;
    nu / (1.0 - nu)
}

/// kappa_d = (4 d + 64) u (precision.kernel_error).
pub fn kernel_error(d: usize) -> f64 {
    (4.0 * d as f64 + 64.0) * U
}

/// Counters of the traversal, summed over tiles (the two maxima are maxima);
/// names as in `tree.traversal.COUNTERS`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeCounters {
    pub nodes_visited: u64,
    pub bound_evaluations: u64,
    pub bound_products: u64,
    pub prunes_bound: u64,
    pub prunes_predecessor: u64,
    pub frontier_sum: u64,
    pub frontier_max: u64,
    pub rounds: u64,
    pub yields: u64,
    pub blocks: u64,
    pub block_pairs: u64,
    pub block_pairs_max: u64,
    pub leaves_evaluated: u64,
    pub dense_pairs: u64,
}

impl TreeCounters {
    pub fn add(&mut self, o: &TreeCounters) {
        self.nodes_visited += o.nodes_visited;
        self.bound_evaluations += o.bound_evaluations;
        self.bound_products += o.bound_products;
        self.prunes_bound += o.prunes_bound;
        self.prunes_predecessor += o.prunes_predecessor;
        self.frontier_sum += o.frontier_sum;
        self.frontier_max = self.frontier_max.max(o.frontier_max);
        self.rounds += o.rounds;
        self.yields += o.yields;
        self.blocks += o.blocks;
        self.block_pairs += o.block_pairs;
        self.block_pairs_max = self.block_pairs_max.max(o.block_pairs_max);
        self.leaves_evaluated += o.leaves_evaluated;
        self.dense_pairs += o.dense_pairs;
    }

    /// (name, value) pairs in `tree.traversal.COUNTERS` order.
    pub fn named(&self) -> [(&'static str, u64); 14] {
        [
            ("nodes_visited", self.nodes_visited),
            ("bound_evaluations", self.bound_evaluations),
            ("bound_products", self.bound_products),
            ("prunes_bound", self.prunes_bound),
            ("prunes_predecessor", self.prunes_predecessor),
            ("frontier_sum", self.frontier_sum),
            ("frontier_max", self.frontier_max),
            ("rounds", self.rounds),
            ("yields", self.yields),
            ("blocks", self.blocks),
            ("block_pairs", self.block_pairs),
            ("block_pairs_max", self.block_pairs_max),
            ("leaves_evaluated", self.leaves_evaluated),
            ("dense_pairs", self.dense_pairs),
        ]
    }
}

/// One query of a select: a dataset point, its admissible limit (candidates j < limit),
/// and its per-query factors.
#[derive(Clone, Debug)]
pub struct QueryRow {
    pub id: usize,
    pub limit: usize,
    /// a_q = T^-T V_q
    pub a: Vec<f64>,
    pub rn: f64,
    pub na: f64,
    /// 1 / sqrt(p_q)
    pub ip: f64,
    /// the certification margin E_q (precision.query_margins)
    pub marg: f64,
}

/// The result of a select pass, rows in the caller's order.
#[derive(Clone, Debug)]
pub struct Candidates {
    pub keep: usize,
    /// (q, keep) heap layout: the first `count` slots are a min-heap, the rest -1.0 / -1
    pub abs_rho: Vec<f64>,
    pub index: Vec<i64>,
    pub a_dropped: Vec<f64>,
    pub counters: TreeCounters,
}

/// A frontier entry; the frontier pops the smallest (key, size, node) first.
struct Entry {
    key: f64,
    size: usize,
    node: usize,
    /// per tile row: the node's bound, or NOADM
    ub: Vec<f64>,
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        // reversed: BinaryHeap is a max-heap. Keys are sums of squares, never NaN.
        other
            .key
            .partial_cmp(&self.key)
            .expect("finite frontier keys")
            .then(other.size.cmp(&self.size))
            .then(other.node.cmp(&self.node))
    }
}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Entry {}

/// Push (a, j) into the min-heap (ha, hi) of `size` entries (backends/cpu.py `_heap_push`).
fn heap_push(ha: &mut [f64], hi: &mut [i64], size: usize, a: f64, j: i64) {
    let mut pos = size;
    ha[pos] = a;
    hi[pos] = j;
    while pos > 0 {
        let parent = (pos - 1) / 2;
        if ha[parent] <= ha[pos] {
            break;
        }
        ha.swap(pos, parent);
        hi.swap(pos, parent);
        pos = parent;
    }
}

/// Restore the min-heap after its root was replaced (backends/cpu.py `_sift_down`).
fn sift_down(ha: &mut [f64], hi: &mut [i64], size: usize) {
    let mut pos = 0;
    loop {
        let mut child = 2 * pos + 1;
        if child >= size {
            break;
        }
        if child + 1 < size && ha[child + 1] < ha[child] {
            child += 1;
        }
        if ha[child] >= ha[pos] {
            break;
        }
        ha.swap(pos, child);
        hi.swap(pos, child);
        pos = child;
    }
}

/// Fold `a` into the min-heap `ka` of the largest values seen (backends.cpu `_kth_push`).
fn kth_push(ka: &mut [f64], size: usize, a: f64) -> usize {
    let kk = ka.len();
    if size < kk {
        let mut pos = size;
        ka[pos] = a;
        while pos > 0 {
            let parent = (pos - 1) / 2;
            if ka[parent] <= ka[pos] {
                break;
            }
            ka.swap(pos, parent);
            pos = parent;
        }
        return size + 1;
    }
    if a <= ka[0] {
        return size;
    }
    ka[0] = a;
    let mut pos = 0;
    loop {
        let mut child = 2 * pos + 1;
        if child >= size {
            break;
        }
        if child + 1 < size && ka[child + 1] < ka[child] {
            child += 1;
        }
        if ka[child] >= ka[pos] {
            break;
        }
        ka.swap(pos, child);
        pos = child;
    }
    size
}

/// (min, max) over the box [lo, hi] of the scaled squared distance to xq.
#[inline]
fn box_distances(xq: &[f64], inv_scale: &[f64], lo: &[f64], hi: &[f64]) -> (f64, f64) {
    let mut mind2 = 0.0;
    let mut maxd2 = 0.0;
    for t in 0..xq.len() {
        let x = xq[t];
        let mut gap = nmax(lo[t] - x, x - hi[t]);
        gap = nmax(gap, 0.0);
        gap *= inv_scale[t];
        let mut far = nmax((x - lo[t]).abs(), (hi[t] - x).abs());
        far *= inv_scale[t];
        mind2 += gap * gap;
        maxd2 += far * far;
    }
    (mind2, maxd2)
}

/// Scaled squared distance between the tile's box and a node's box (the frontier key).
#[inline]
fn box_key(tlo: &[f64], thi: &[f64], lo: &[f64], hi: &[f64], inv_scale: &[f64]) -> f64 {
    let mut s = 0.0;
    for t in 0..tlo.len() {
        let mut gap = nmax(lo[t] - thi[t], tlo[t] - hi[t]);
        if gap > 0.0 {
            gap *= inv_scale[t];
            s += gap * gap;
        }
    }
    s
}

/// Sequential dot products `(a . mid, |a| . rad)`, summed from 0.0 in index order.
#[inline]
fn bound_products(a: &[f64], mid: &[f64], rad: &[f64]) -> (f64, f64) {
    let mut s0 = 0.0;
    let mut sr = 0.0;
    for t in 0..a.len() {
        s0 += a[t] * mid[t];
    }
    for t in 0..a.len() {
        sr += a[t].abs() * rad[t];
    }
    (s0, sr)
}

/// Per-tile search state, rows local to the tile.
struct TileState {
    keep: usize,
    kk: usize,
    heap_a: Vec<f64>,
    heap_i: Vec<i64>,
    count: Vec<usize>,
    a_dropped: Vec<f64>,
    kth_a: Vec<f64>,
    kth_n: Vec<usize>,
}

impl TileState {
    fn new(nt: usize, keep: usize, kk: usize) -> Self {
        TileState {
            keep,
            kk,
            heap_a: vec![-1.0; nt * keep],
            heap_i: vec![-1; nt * keep],
            count: vec![0; nt],
            a_dropped: vec![-1.0; nt],
            kth_a: vec![f64::NEG_INFINITY; nt * kk],
            kth_n: vec![0; nt],
        }
    }

    /// Pruning threshold of tile row i (tree.traversal `_threshold`): the k-th largest value
    /// evaluated so far minus twice the row's margin, once k values are known.
    #[inline]
    fn threshold(&self, i: usize, marg: f64) -> f64 {
        if self.kk == 0 {
            // no k: the keep-th kept value once the heap is full
            return if self.count[i] == self.keep {
                self.heap_a[i * self.keep]
            } else {
                f64::NEG_INFINITY
            };
        }
        if self.kth_n[i] == self.kk {
            self.kth_a[i * self.kk] - 2.0 * marg
        } else {
            f64::NEG_INFINITY
        }
    }
}

/// A tree bound to its problem, with the constants of the bound (TreeSearcher).
pub struct TreeSearcher<'a, 'p> {
    pub prob: &'a ResidualProblem<'p>,
    pub tree: &'a SearchTree,
    pub transform: &'a Transform,
    pub tile_size: usize,
    pub pop_batch: usize,
    pub inv_scale: Vec<f64>,
    /// box of the scaled coordinates of every point (Hilbert keys)
    pub box_lo: Vec<f64>,
    pub box_hi: Vec<f64>,
    /// 1 / sqrt(p_j) and ||V_j|| (sequential) for every point
    pub ip: Vec<f64>,
    pub vnorm: Vec<f64>,
    pub kernel: Kernel,
    pub variance: f64,
    pub tnorm: f64,
    pub kerr: f64,
    pub eps_d: f64,
    pub gam: f64,
    /// problem-wide maxima for the margins (search._candidate_maxima)
    pub w_max: f64,
    pub ip_max: f64,
}

impl<'a, 'p> TreeSearcher<'a, 'p> {
    pub fn new(
        prob: &'a ResidualProblem<'p>,
        tree: &'a SearchTree,
        transform: &'a Transform,
        tile_size: usize,
        pop_batch: usize,
    ) -> Self {
        let (n, d, m) = (prob.n(), prob.dim(), prob.rank());
        let inv_scale = crate::tree::inv_scale(prob);
        let x = prob.coords_slice();
        let mut box_lo = vec![0.0; d];
        let mut box_hi = vec![1.0; d];
        if n > 0 {
            for t in 0..d {
                box_lo[t] = x[t] * inv_scale[t];
                box_hi[t] = box_lo[t];
            }
            for j in 0..n {
                for t in 0..d {
                    let s = x[j * d + t] * inv_scale[t];
                    box_lo[t] = nmin(box_lo[t], s);
                    box_hi[t] = nmax(box_hi[t], s);
                }
            }
        }
        let ip: Vec<f64> = prob.p_slice().iter().map(|p| 1.0 / p.sqrt()).collect();
        let vnorm = crate::tree::v_norms(prob);
        // max over j of ||V_j|| / sqrt(p_j), as max(v_norms * ip)
        let w_max = vnorm
            .iter()
            .zip(&ip)
            .map(|(w, y)| w * y)
            .fold(f64::NEG_INFINITY, nmax);
        let ip_max = ip.iter().copied().fold(f64::NEG_INFINITY, nmax);
        let params = prob.params();
        TreeSearcher {
            prob,
            tree,
            transform,
            tile_size,
            pop_batch,
            inv_scale,
            box_lo,
            box_hi,
            ip,
            vnorm,
            kernel: params.kernel,
            variance: params.variance,
            tnorm: transform.tnorm(m),
            kerr: kernel_error(d) * params.variance,
            eps_d: 4.0 * (d as f64 + 8.0) * U,
            gam: 2.0 * gamma(m + 4),
            w_max: if n > 0 { w_max } else { 0.0 },
            ip_max: if n > 0 { ip_max } else { 0.0 },
        }
    }

    /// Certification margin E_q of a dataset query (precision.query_margins).
    pub fn margin(&self, q: usize) -> f64 {
        let (m, d) = (self.prob.rank(), self.prob.dim());
        let ip_q = 1.0 / self.prob.p_slice()[q].sqrt();
        let e = gamma(m) * (self.vnorm[q] * ip_q) * self.w_max
            + kernel_error(d) * self.variance * ip_q * self.ip_max;
        1.25 * e + 32.0 * U
    }

    /// The query row of dataset point `id` with admissible limit `limit`.
    pub fn query_row(&self, id: usize, limit: usize) -> QueryRow {
        let mut a = vec![0.0; self.prob.rank()];
        let (rn, na) =
            self.transform
                .query_factors(self.prob.vrow(id), self.gam, self.tnorm, &mut a);
        QueryRow {
            id,
            limit,
            a,
            rn,
            na,
            ip: self.ip[id],
            marg: self.margin(id),
        }
    }

    /// Scaled coordinates `x_q / l` of dataset points, row-major.
    pub fn scaled_coords(&self, ids: impl Iterator<Item = usize>) -> Vec<f64> {
        let d = self.prob.dim();
        let x = self.prob.coords_slice();
        let mut out = Vec::new();
        for j in ids {
            for t in 0..d {
                out.push(x[j * d + t] * self.inv_scale[t]);
            }
        }
        out
    }

    /// Upper bound U on |rho| between query `q` and every point of node `nd`
    /// (tree.bounds.residual_bound), with `s0 = a . mid` and `sr = |a| . rad`.
    pub fn node_bound(&self, q: &QueryRow, nd: usize) -> f64 {
        let tr = self.tree;
        let (s0, sr) = bound_products(&q.a, tr.mid(nd), tr.rad(nd));
        let (mind2, maxd2) =
            box_distances(self.prob.x(q.id), &self.inv_scale, tr.lo(nd), tr.hi(nd));
        let (var, kerr, gam, tnorm) = (self.variance, self.kerr, self.gam, self.tnorm);
        let kmax = self.kernel.from_r2(mind2 * (1.0 - self.eps_d), var) * (1.0 + 4.0 * U) + kerr;
        let kmin = self.kernel.from_r2(maxd2 * (1.0 + self.eps_d), var) * (1.0 - 4.0 * U) - kerr;
        let kmin = nmax(kmin, 0.0);
        let ky_hi = kmax * tr.node_ymax[nd] * (1.0 + 4.0 * U);
        let ky_lo = kmin * tr.node_ymin[nd] * (1.0 - 4.0 * U);
        let err = tr.node_zeta[nd] * (q.rn + gam * q.na * tnorm)
            + 2.0 * gam * q.na * tr.node_zabs[nd]
            + 4.0 * U * (s0.abs() + sr);
        let hi_num = ky_hi - s0 + sr + err;
        let lo_num = ky_lo - s0 - sr - err;
        let num = nmax(-lo_num, hi_num);
        let u = num * q.ip * (1.0 + 16.0 * U);
        nmin(1.0, u)
    }

    /// Evaluates the index-sorted points `pts` for tile rows `rows` (backends.cpu
    /// `_eval_block`): each row takes its admissible prefix and skips itself. Returns the
    /// pairs of the block computed, `rows.len()` x the longest prefix.
    fn eval_block(
        &self,
        st: &mut TileState,
        q: &[&QueryRow],
        rows: &[usize],
        pts: &[usize],
    ) -> u64 {
        let prefix = |limit: usize| pts.partition_point(|&j| j < limit);
        let width = rows.iter().map(|&i| prefix(q[i].limit)).max().unwrap_or(0);
        if width == 0 {
            return 0;
        }
        let (keep, kk) = (st.keep, st.kk);
        for &i in rows {
            let qr = q[i];
            let w = prefix(qr.limit);
            if w == 0 {
                continue;
            }
            let me = qr.id;
            // position of the query itself in the admissible prefix, if there
            let skip = if me < qr.limit {
                let pos = pts[..w].partition_point(|&j| j < me);
                (pos < w && pts[pos] == me).then_some(pos)
            } else {
                None
            };
            let mut dropped = st.a_dropped[i];
            let mut kn = st.kth_n[i];
            let mut size = st.count[i];
            let ha = &mut st.heap_a[i * keep..(i + 1) * keep];
            let hi = &mut st.heap_i[i * keep..(i + 1) * keep];
            let ka = &mut st.kth_a[i * kk..(i + 1) * kk];
            for (b, &j) in pts[..w].iter().enumerate() {
                if Some(b) == skip {
                    continue;
                }
                let a = self.prob.rho(me, j).abs();
                if size == keep && a <= ha[0] {
                    // below the keep-th (so below the k-th) kept value
                    dropped = nmax(dropped, a);
                    continue;
                }
                if kk > 0 {
                    kn = kth_push(ka, kn, a);
                }
                if size < keep {
                    heap_push(ha, hi, size, a, j as i64);
                    size += 1;
                } else {
                    dropped = nmax(dropped, ha[0]);
                    ha[0] = a;
                    hi[0] = j as i64;
                    sift_down(ha, hi, size);
                }
            }
            st.a_dropped[i] = dropped;
            st.kth_n[i] = kn;
            st.count[i] = size;
        }
        (rows.len() * width) as u64
    }

    /// One tile of queries (tree.traversal `_traverse_tile`).
    fn traverse_tile(&self, q: &[&QueryRow], keep: usize, kk: usize) -> (TileState, TreeCounters) {
        let tr = self.tree;
        let nt = q.len();
        let d = self.prob.dim();
        let mut ctr = TreeCounters::default();
        let mut st = TileState::new(nt, keep, kk);
        // the tile's coordinate box, for the frontier key
        let mut tlo = self.prob.x(q[0].id).to_vec();
        let mut thi = tlo.clone();
        for qr in q {
            let x = self.prob.x(qr.id);
            for t in 0..d {
                tlo[t] = nmin(tlo[t], x[t]);
                thi[t] = nmax(thi[t], x[t]);
            }
        }
        let all_rows: Vec<usize> = (0..nt).collect();
        // 1. the dense points, one block for the whole tile
        if !tr.dense.is_empty() {
            let pairs = self.eval_block(&mut st, q, &all_rows, &tr.dense);
            if pairs > 0 {
                ctr.blocks += 1;
                ctr.block_pairs += pairs;
                ctr.dense_pairs += pairs;
                ctr.block_pairs_max = ctr.block_pairs_max.max(pairs);
            }
        }
        if tr.roots.is_empty() {
            return (st, ctr);
        }
        // 2. the roots with an admissible point for some row, masked by those rows
        let mut queued: Vec<(usize, Vec<bool>)> = Vec::new();
        for (b, &root) in tr.roots.iter().enumerate() {
            let mask: Vec<bool> = q.iter().map(|qr| tr.root_lo[b] < qr.limit).collect();
            ctr.prunes_predecessor += mask.iter().filter(|&&adm| !adm).count() as u64;
            if mask.iter().any(|&adm| adm) {
                queued.push((root, mask));
            }
        }
        let mut frontier: BinaryHeap<Entry> = BinaryHeap::new();
        let mut rows: Vec<usize> = Vec::with_capacity(nt);
        loop {
            // 3a. bound the queued nodes for the whole tile, prune per row, push survivors
            if !queued.is_empty() {
                let ne = queued.len() as u64;
                ctr.nodes_visited += ne;
                ctr.bound_evaluations += ne * nt as u64;
                ctr.bound_products += 2 * ne * nt as u64;
                for (nd, mask) in queued.drain(..) {
                    let mut ub = vec![NOADM; nt];
                    let mut alive = false;
                    for i in 0..nt {
                        if !mask[i] {
                            continue;
                        }
                        if tr.node_min[nd] >= q[i].limit {
                            ctr.prunes_predecessor += 1;
                            continue;
                        }
                        let u = self.node_bound(q[i], nd);
                        if u < st.threshold(i, q[i].marg) {
                            st.a_dropped[i] = nmax(st.a_dropped[i], u);
                            ctr.prunes_bound += 1;
                            continue;
                        }
                        ub[i] = u;
                        alive = true;
                    }
                    if alive {
                        frontier.push(Entry {
                            key: box_key(&tlo, &thi, tr.lo(nd), tr.hi(nd), &self.inv_scale),
                            size: tr.node_end[nd] - tr.node_start[nd],
                            node: nd,
                            ub,
                        });
                    }
                }
            }
            if frontier.is_empty() {
                break;
            }
            // 3b. pop a batch: evaluate leaves now, queue internal nodes' children
            ctr.rounds += 1;
            ctr.frontier_sum += frontier.len() as u64;
            ctr.frontier_max = ctr.frontier_max.max(frontier.len() as u64);
            let mut had_leaf = false;
            for _ in 0..self.pop_batch {
                let Some(entry) = frontier.pop() else { break };
                let nd = entry.node;
                rows.clear();
                for (i, &u) in entry.ub.iter().enumerate() {
                    if u == NOADM {
                        continue;
                    }
                    // thresholds rise as leaves are evaluated: re-check the stored bound
                    if u < st.threshold(i, q[i].marg) {
                        st.a_dropped[i] = nmax(st.a_dropped[i], u);
                        ctr.prunes_bound += 1;
                        continue;
                    }
                    rows.push(i);
                }
                if rows.is_empty() {
                    continue;
                }
                if tr.is_leaf(nd) {
                    let pairs = self.eval_block(&mut st, q, &rows, tr.points(nd));
                    had_leaf = true;
                    ctr.leaves_evaluated += 1;
                    if pairs > 0 {
                        ctr.blocks += 1;
                        ctr.block_pairs += pairs;
                        ctr.block_pairs_max = ctr.block_pairs_max.max(pairs);
                    }
                } else {
                    for child in [tr.node_left[nd], tr.node_right[nd]] {
                        let mut mask = vec![false; nt];
                        for &i in &rows {
                            mask[i] = true;
                        }
                        queued.push((child as usize, mask));
                    }
                }
            }
            if had_leaf {
                ctr.yields += 1;
            }
        }
        (st, ctr)
    }

    /// A select pass (TreeSearcher.run): queries in Hilbert order, tiles of `tile_size`
    /// (in parallel), results back in the caller's order. Pruning uses the k-th largest
    /// value (k capped at keep) minus twice each row's margin.
    pub fn run(&self, rows: &[QueryRow], keep: usize, k: usize) -> Candidates {
        let q = rows.len();
        let d = self.prob.dim();
        let order: Vec<usize> = if q > 1 {
            let x = self.scaled_coords(rows.iter().map(|r| r.id));
            hilbert_order(&x, d, &self.box_lo, &self.box_hi)
        } else {
            (0..q).collect()
        };
        let ordered: Vec<&QueryRow> = order.iter().map(|&r| &rows[r]).collect();
        let kk = k.min(keep);
        let tiles: Vec<(TileState, TreeCounters)> = ordered
            .par_chunks(self.tile_size)
            .map(|tile| self.traverse_tile(tile, keep, kk))
            .collect();
        let mut out = Candidates {
            keep,
            abs_rho: vec![-1.0; q * keep],
            index: vec![-1; q * keep],
            a_dropped: vec![-1.0; q],
            counters: TreeCounters::default(),
        };
        for (t, (st, ctr)) in tiles.iter().enumerate() {
            out.counters.add(ctr);
            for i in 0..st.count.len() {
                let r = order[t * self.tile_size + i];
                out.abs_rho[r * keep..(r + 1) * keep]
                    .copy_from_slice(&st.heap_a[i * keep..(i + 1) * keep]);
                out.index[r * keep..(r + 1) * keep]
                    .copy_from_slice(&st.heap_i[i * keep..(i + 1) * keep]);
                out.a_dropped[r] = st.a_dropped[i];
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Kernel;
    use crate::tree::tests::test_problem;
    use crate::tree::{build_tree, TreeParams};

    #[test]
    fn heaps_keep_the_largest() {
        let vals = [0.3, 0.9, 0.1, 0.5, 0.5, 0.7, 0.2, 0.95, 0.0];
        let keep = 4;
        let mut ha = vec![-1.0; keep];
        let mut hi = vec![-1i64; keep];
        let mut size = 0;
        let mut ka = vec![f64::NEG_INFINITY; 3];
        let mut kn = 0;
        for (j, &a) in vals.iter().enumerate() {
            kn = kth_push(&mut ka, kn, a);
            if size < keep {
                heap_push(&mut ha, &mut hi, size, a, j as i64);
                size += 1;
            } else if a > ha[0] {
                ha[0] = a;
                hi[0] = j as i64;
                sift_down(&mut ha, &mut hi, size);
            }
            for c in 1..size {
                assert!(ha[(c - 1) / 2] <= ha[c]);
            }
        }
        let mut kept: Vec<f64> = ha.clone();
        kept.sort_by(|a, b| b.partial_cmp(a).unwrap());
        assert_eq!(kept, vec![0.95, 0.9, 0.7, 0.5]);
        assert_eq!(kn, 3);
        assert_eq!(ka[0], 0.7); // the 3rd largest
    }

    /// The bound is a bound: U >= |rho| for every point of every node, for queries in the
    /// data, with and without the transform, all kernels.
    #[test]
    fn bounds_never_below_rho() {
        for (seed, kern, d) in [
            (1u64, Kernel::Rbf, 1usize),
            (2, Kernel::Matern12, 2),
            (3, Kernel::Matern32, 3),
            (4, Kernel::Matern52, 2),
        ] {
            let mut tp = test_problem(seed, 300, d, 5, kern);
            for j in 0..20 {
                let src = tp.x.row(j).to_owned();
                tp.x.row_mut(150 + j).assign(&src);
            }
            let prob =
                ResidualProblem::new(tp.x.view(), tp.v.view(), tp.p.view(), tp.params.clone())
                    .unwrap();
            for tr in [Transform::new(tp.t.view(), 5).unwrap(), Transform::Identity] {
                let params = TreeParams {
                    leaf_size: 8,
                    dense_ratio: crate::tree::DENSE_RATIO,
                };
                let tree = build_tree(&prob, &tr, params).unwrap();
                let s = TreeSearcher::new(&prob, &tree, &tr, 32, 8);
                for qid in [0usize, 7, 150, 299] {
                    let row = s.query_row(qid, 300);
                    for nd in 0..tree.nodes() {
                        let u = s.node_bound(&row, nd);
                        assert!(u <= 1.0);
                        for &j in tree.points(nd) {
                            if j == qid {
                                continue;
                            }
                            let rho = prob.rho(qid, j).abs();
                            assert!(u >= rho, "seed {seed} q {qid} node {nd} j {j}: {u} < {rho}");
                        }
                    }
                }
            }
        }
    }
}
