//! Exact kNN through the search tree in the parity preset: the query flow of
//! `ResidualIndex.query` for method "tree" (`residual_gpu/index.py`), with
//! `TreeSearcher.query_groups`, `search.exact_knn` and `certify.certify_and_rank`.
//!
//! 1. Queries are grouped by the index block their limit falls in, ordered along the
//!    Hilbert curve within a block, and each block's run is cut into near-equal groups of
//!    at most [`QUERY_CHUNK`] (np.array_split).
//! 2. Per group (exact_knn): rows stably sorted by limit, chunks of QUERY_CHUNK, a select
//!    pass with keep = k + max(8, k / 2) (capped by the largest limit), certification;
//!    uncertified rows are searched again with 4x the keep.
//!
//! Every query goes through the tree (no brute-force routing), so the result and every
//! counter depend only on the inputs, never on the thread count.

use crate::certify::certify_row;
use crate::hilbert::hilbert_order;
use crate::residual::ResidualProblem;
use crate::tree::{build_tree, SearchTree, Transform, TreeParams};
use crate::tree_search::{TreeCounters, TreeSearcher, PARITY_POP_BATCH, PARITY_TILE_SIZE};
use crate::InputError;
use ndarray::Array2;
use rayon::prelude::*;

/// Queries per exact_knn chunk (search.QUERY_CHUNK).
pub const QUERY_CHUNK: usize = 4096;
/// Most (query, kept candidate) slots of one select (search.CANDIDATE_SLOTS).
pub const CANDIDATE_SLOTS: usize = 1 << 22;

/// Candidates kept per query in the first pass (search.initial_keep).
pub fn initial_keep(k: usize) -> usize {
    k + (k / 2).max(8)
}

/// Options of [`tree_knn`] (defaults: the parity preset).
#[derive(Clone, Copy, Debug)]
pub struct TreeKnnOptions {
    pub tree: TreeParams,
    pub tile_size: usize,
    pub pop_batch: usize,
}

impl Default for TreeKnnOptions {
    fn default() -> Self {
        TreeKnnOptions {
            tree: TreeParams::default(),
            tile_size: PARITY_TILE_SIZE,
            pop_batch: PARITY_POP_BATCH,
        }
    }
}

/// What a query call did: the fields of residual_gpu's `Telemetry` that the tree fills.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Telemetry {
    pub tree: TreeCounters,
    /// pairs of every evaluated block, all passes (= tree.block_pairs: no brute routing)
    pub distance_evaluations: u64,
    pub accurate_evaluations: u64,
    pub recertified_queries: u64,
    pub block_requests: u64,
    pub tree_queries: u64,
    pub brute_queries: u64,
    pub keep: u64,
}

impl Telemetry {
    /// (name, value) pairs: the tree counters, then the driver's.
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        let mut out: Vec<(&'static str, u64)> = self.tree.named().to_vec();
        out.extend([
            ("distance_evaluations", self.distance_evaluations),
            ("accurate_evaluations", self.accurate_evaluations),
            ("recertified_queries", self.recertified_queries),
            ("block_requests", self.block_requests),
            ("tree_queries", self.tree_queries),
            ("brute_queries", self.brute_queries),
            ("keep", self.keep),
        ]);
        out
    }
}

/// Result of [`tree_knn`].
#[derive(Clone, Debug)]
pub struct TreeKnnResult {
    pub indices: Array2<i64>,
    pub distances: Array2<f64>,
    pub telemetry: Telemetry,
}

/// np.array_split(run, pieces): the first len % pieces parts get one element more.
fn array_split<T: Clone>(run: &[T], pieces: usize) -> Vec<Vec<T>> {
    let (each, extra) = (run.len() / pieces, run.len() % pieces);
    let mut out = Vec::with_capacity(pieces);
    let mut start = 0;
    for p in 0..pieces {
        let len = each + usize::from(p < extra);
        out.push(run[start..start + len].to_vec());
        start += len;
    }
    out
}

/// Rows of the batch (dataset ids with their limits) in groups of at most `size`, each
/// spatially compact (TreeSearcher.query_groups).
pub fn query_groups(
    s: &TreeSearcher,
    ids: &[usize],
    limits: &[usize],
    size: usize,
) -> Vec<Vec<usize>> {
    let q = ids.len();
    let tr = s.tree;
    // block of a limit: number of upper ends (root_lo[1:], then +inf) below it
    let upper: Vec<i64> = if tr.root_lo.is_empty() {
        vec![0]
    } else {
        tr.root_lo[1..]
            .iter()
            .map(|&r| r as i64)
            .chain([i64::MAX])
            .collect()
    };
    let block: Vec<usize> = limits
        .iter()
        .map(|&l| upper.partition_point(|&u| u < l as i64))
        .collect();
    let curve: Vec<usize> = if q > 1 {
        let x = s.scaled_coords(ids.iter().copied());
        hilbert_order(&x, s.prob.dim(), &s.box_lo, &s.box_hi)
    } else {
        (0..q).collect()
    };
    let mut rank = vec![0usize; q];
    for (r, &row) in curve.iter().enumerate() {
        rank[row] = r;
    }
    let mut order: Vec<usize> = (0..q).collect();
    order.sort_by_key(|&r| (block[r], rank[r]));
    let mut groups = Vec::new();
    let mut start = 0;
    while start < q {
        let mut end = start + 1;
        while end < q && block[order[end]] == block[order[start]] {
            end += 1;
        }
        let run = &order[start..end];
        groups.extend(array_split(run, run.len().div_ceil(size).max(1)));
        start = end;
    }
    groups.retain(|g| !g.is_empty());
    groups
}

/// search.exact_knn over one group: rows `group` of the batch; writes their results.
#[allow(clippy::too_many_arguments)]
fn exact_knn(
    s: &TreeSearcher,
    ids: &[usize],
    limits: &[usize],
    group: &[usize],
    k: usize,
    tel: &mut Telemetry,
    out_index: &mut [i64],
    out_dist: &mut [f64],
) {
    // positions into `group`, stably sorted by limit
    let mut order: Vec<usize> = (0..group.len()).collect();
    order.sort_by_key(|&r| limits[group[r]]);
    tel.keep = initial_keep(k) as u64;
    let mut work: Vec<(Vec<usize>, usize)> = order
        .chunks(QUERY_CHUNK)
        .map(|c| (c.to_vec(), initial_keep(k)))
        .rev()
        .collect();
    while let Some((mut rows, keep)) = work.pop() {
        let most = rows.iter().map(|&r| limits[group[r]]).max().unwrap_or(0);
        let keep = keep.min(most);
        if keep == 0 {
            // predecessor mode, first point(s): nothing admissible, rows stay padded
            continue;
        }
        let fits = (CANDIDATE_SLOTS / keep).max(1);
        if rows.len() > fits {
            work.push((rows[fits..].to_vec(), keep));
            rows.truncate(fits);
        }
        let sub: Vec<_> = rows
            .par_iter()
            .map(|&r| s.query_row(ids[group[r]], limits[group[r]]))
            .collect();
        let cand = s.run(&sub, keep, k);
        tel.tree.add(&cand.counters);
        tel.tree_queries += sub.len() as u64;
        tel.distance_evaluations += cand.counters.block_pairs;
        tel.block_requests += 1;
        let certified: Vec<_> = sub
            .par_iter()
            .enumerate()
            .map(|(a, qr)| {
                certify_row(
                    s.prob,
                    qr.id,
                    k,
                    &cand.index[a * keep..(a + 1) * keep],
                    &cand.abs_rho[a * keep..(a + 1) * keep],
                    cand.a_dropped[a],
                    qr.marg,
                )
            })
            .collect();
        let mut failed = Vec::new();
        for (&r, res) in rows.iter().zip(certified) {
            match res {
                Some(c) => {
                    tel.accurate_evaluations += c.contenders as u64;
                    let row = group[r];
                    out_index[row * k..(row + 1) * k].copy_from_slice(&c.index);
                    out_dist[row * k..(row + 1) * k].copy_from_slice(&c.dist);
                }
                None => failed.push(r),
            }
        }
        if !failed.is_empty() {
            tel.recertified_queries += failed.len() as u64;
            work.push((failed, keep * 4));
        }
    }
}

/// Checks 1 <= k <= n - 1 (in both modes, as ResidualIndex.query) and returns k as usize.
pub fn check_k(k: i64, n: usize) -> Result<usize, InputError> {
    if k < 1 || (k as u64) > (n as u64).saturating_sub(1) {
        return Err(InputError(format!(
            "k must satisfy 1 <= k <= n - 1 = {} (n = {n}), got {k}",
            n as i64 - 1
        )));
    }
    Ok(k as usize)
}

/// Checks the query arguments before any work: k, queries, tile_size, pop_batch.
fn check_query_args(
    prob: &ResidualProblem,
    k: i64,
    queries: Option<&[i64]>,
    opts: &TreeKnnOptions,
) -> Result<usize, InputError> {
    let k = check_k(k, prob.n())?;
    if let Some(q) = queries {
        prob.check_indices(q, "queries")?;
    }
    if opts.tile_size < 1 {
        return Err(InputError(format!(
            "tile_size must be >= 1, got {}",
            opts.tile_size
        )));
    }
    if opts.pop_batch < 1 {
        return Err(InputError(format!(
            "pop_batch must be >= 1, got {}",
            opts.pop_batch
        )));
    }
    let nq = queries.map_or(prob.n(), |q| q.len());
    if nq
        .checked_mul(k)
        .map_or(true, |len| len > isize::MAX as usize / 8)
    {
        return Err(InputError(format!(
            "k is too large: {nq} queries x k = {k} neighbours do not fit in memory"
        )));
    }
    Ok(k)
}

/// Exact kNN of dataset queries through `tree`, already built for `prob` and `transform`
/// (`opts.tree` is not used). `queries` = None means every point; predecessor mode
/// restricts query i to j < i. 1 <= k <= n - 1 in both modes (as ResidualIndex.query).
pub fn tree_knn_with(
    prob: &ResidualProblem,
    tree: &SearchTree,
    transform: &Transform,
    k: i64,
    queries: Option<&[i64]>,
    predecessor: bool,
    opts: TreeKnnOptions,
) -> Result<TreeKnnResult, InputError> {
    let k = check_query_args(prob, k, queries, &opts)?;
    let (n, d, m) = (prob.n(), prob.dim(), prob.rank());
    if (tree.n, tree.d, tree.m) != (n, d, m) {
        return Err(InputError(format!(
            "tree was built for (n, d, m) = ({}, {}, {}), the problem has ({n}, {d}, {m})",
            tree.n, tree.d, tree.m
        )));
    }
    let ids: Vec<usize> = match queries {
        Some(q) => q.iter().map(|&i| i as usize).collect(),
        None => (0..n).collect(),
    };
    let limits: Vec<usize> = if predecessor {
        ids.clone()
    } else {
        vec![n; ids.len()]
    };
    let nq = ids.len();
    let s = TreeSearcher::new(prob, tree, transform, opts.tile_size, opts.pop_batch);
    let mut out_index = vec![-1i64; nq * k];
    let mut out_dist = vec![f64::INFINITY; nq * k];
    let mut tel = Telemetry::default();
    for group in query_groups(&s, &ids, &limits, QUERY_CHUNK) {
        exact_knn(
            &s,
            &ids,
            &limits,
            &group,
            k,
            &mut tel,
            &mut out_index,
            &mut out_dist,
        );
    }
    Ok(TreeKnnResult {
        indices: Array2::from_shape_vec((nq, k), out_index).expect("shape"),
        distances: Array2::from_shape_vec((nq, k), out_dist).expect("shape"),
        telemetry: tel,
    })
}

/// Builds the tree and answers the queries: the parity preset end to end.
pub fn tree_knn(
    prob: &ResidualProblem,
    transform: &Transform,
    k: i64,
    queries: Option<&[i64]>,
    predecessor: bool,
    opts: TreeKnnOptions,
) -> Result<TreeKnnResult, InputError> {
    check_query_args(prob, k, queries, &opts)?;
    let tree = build_tree(prob, transform, opts.tree)?;
    tree_knn_with(prob, &tree, transform, k, queries, predecessor, opts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::brute::brute_knn;
    use crate::kernels::Kernel;
    use crate::test_util::SplitMix64;
    use crate::tree::tests::test_problem;
    use crate::tree::DENSE_RATIO;

    #[test]
    fn array_split_like_numpy() {
        let v: Vec<usize> = (0..10).collect();
        let parts = array_split(&v, 3);
        assert_eq!(parts, vec![vec![0, 1, 2, 3], vec![4, 5, 6], vec![7, 8, 9]]);
        assert_eq!(array_split(&v[..0], 1), vec![Vec::<usize>::new()]);
        assert_eq!(initial_keep(1), 9);
        assert_eq!(initial_keep(30), 45);
    }

    /// Problem variants: the identity transform, duplicated points, tiny-p points.
    #[derive(Clone, Copy)]
    struct Variant {
        identity: bool,
        dup: bool,
        tiny: bool,
    }

    fn check_case(seed: u64, n: usize, d: usize, m: usize, kern: Kernel, var: Variant) {
        let Variant {
            identity,
            dup,
            tiny,
        } = var;
        let mut tp = test_problem(seed, n, d, m, kern);
        if dup {
            // exact duplicates: ties must break by index as in brute force
            for j in 0..n / 20 {
                let (src_x, src_v, src_p) =
                    (tp.x.row(j).to_owned(), tp.v.row(j).to_owned(), tp.p[j]);
                tp.x.row_mut(n / 2 + j).assign(&src_x);
                tp.v.row_mut(n / 2 + j).assign(&src_v);
                tp.p[n / 2 + j] = src_p;
            }
        }
        if tiny {
            // tiny-p points: dense, and queries whose bounds are vacuous
            for j in (3..n).step_by(41) {
                tp.p[j] = 1e-7;
            }
        }
        let prob =
            ResidualProblem::new(tp.x.view(), tp.v.view(), tp.p.view(), tp.params.clone()).unwrap();
        let tr = if identity {
            Transform::Identity
        } else {
            Transform::new(tp.t.view(), m).unwrap()
        };
        let mut rng = SplitMix64::new(seed + 7);
        let mut qs: Vec<i64> = (0..64)
            .map(|_| (rng.next_u64() % n as u64) as i64)
            .collect();
        qs[..4].copy_from_slice(&[0, 1, (n / 2) as i64, (n - 1) as i64]);
        for &(leaf, tile) in &[(16usize, 32usize), (4, 5)] {
            let opts = TreeKnnOptions {
                tree: TreeParams {
                    leaf_size: leaf,
                    dense_ratio: DENSE_RATIO,
                },
                tile_size: tile,
                pop_batch: 8,
            };
            for pred in [false, true] {
                for k in [1usize, 3, 10] {
                    let got = tree_knn(&prob, &tr, k as i64, Some(&qs), pred, opts).unwrap();
                    let want = brute_knn(&prob, k as i64, Some(&qs), pred).unwrap();
                    assert_eq!(
                        got.indices, want.indices,
                        "seed {seed} k {k} pred {pred} leaf {leaf}"
                    );
                    for (a, b) in got.distances.iter().zip(want.distances.iter()) {
                        assert_eq!(a.to_bits(), b.to_bits());
                    }
                    let t = got.telemetry;
                    // query 0 shares its group's select (limit 0 rows are padded, not skipped)
                    assert_eq!(t.tree_queries, 64 + t.recertified_queries);
                    assert_eq!(t.brute_queries, 0);
                    assert_eq!(t.distance_evaluations, t.tree.block_pairs);
                    assert_eq!(t.keep, initial_keep(k) as u64);
                    assert_eq!(t.tree.bound_products, 2 * t.tree.bound_evaluations);
                }
            }
        }
    }

    #[test]
    fn tree_knn_equals_brute_force() {
        let v = |identity, dup, tiny| Variant {
            identity,
            dup,
            tiny,
        };
        check_case(1, 600, 2, 8, Kernel::Matern52, v(false, true, false));
        check_case(2, 500, 1, 5, Kernel::Matern12, v(false, true, true));
        check_case(3, 400, 3, 6, Kernel::Rbf, v(true, false, true));
        check_case(4, 300, 8, 4, Kernel::Matern32, v(false, true, false));
    }

    #[test]
    fn every_query_and_thread_count_independent() {
        let tp = test_problem(11, 700, 2, 6, Kernel::Matern32);
        let prob =
            ResidualProblem::new(tp.x.view(), tp.v.view(), tp.p.view(), tp.params.clone()).unwrap();
        let tr = Transform::new(tp.t.view(), 6).unwrap();
        let opts = TreeKnnOptions::default();
        let a = tree_knn(&prob, &tr, 6, None, true, opts).unwrap();
        let b = brute_knn(&prob, 6, None, true).unwrap();
        assert_eq!(a.indices, b.indices);
        assert_eq!(a.distances, b.distances);
        // the tree actually prunes
        assert!(a.telemetry.tree.prunes_bound > 0);
        assert!(a.telemetry.tree.block_pairs < 700 * 699 / 2);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let c = pool.install(|| tree_knn(&prob, &tr, 6, None, true, opts).unwrap());
        assert_eq!(a.indices, c.indices);
        assert_eq!(a.telemetry, c.telemetry);
    }

    #[test]
    fn inputs_are_validated() {
        let tp = test_problem(12, 50, 2, 3, Kernel::Rbf);
        let prob =
            ResidualProblem::new(tp.x.view(), tp.v.view(), tp.p.view(), tp.params.clone()).unwrap();
        let tr = Transform::Identity;
        let o = TreeKnnOptions::default();
        for bad in [0i64, 50, -1] {
            let e = tree_knn(&prob, &tr, bad, None, true, o).unwrap_err().0;
            assert!(e.starts_with("k "), "{e}");
        }
        let e = tree_knn(&prob, &tr, 2, Some(&[0, 50]), false, o)
            .unwrap_err()
            .0;
        assert!(e.starts_with("queries") && e.contains("50"), "{e}");
        let mut o2 = o;
        o2.tile_size = 0;
        assert!(tree_knn(&prob, &tr, 2, None, false, o2)
            .unwrap_err()
            .0
            .starts_with("tile_size"));
        let mut o3 = o;
        o3.tree.leaf_size = 0;
        assert!(tree_knn(&prob, &tr, 2, None, false, o3)
            .unwrap_err()
            .0
            .starts_with("leaf_size"));
        let res = tree_knn(&prob, &tr, 2, Some(&[]), false, o).unwrap();
        assert_eq!(res.indices.shape(), &[0, 2]);
        assert_eq!(res.telemetry, Telemetry::default());
    }
}
