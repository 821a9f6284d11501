//! Exact brute-force k-nearest-neighbour search under the residual correlation distance.
//!
//! For query i (a dataset index) the candidates are all j != i, restricted to j < i in
//! predecessor mode. They are ordered by (distance ascending, index ascending) and the first
//! k are returned. A row with fewer than k admissible candidates is padded with index -1
//! and distance +inf.

use crate::residual::ResidualProblem;
use crate::InputError;
use ndarray::Array2;
use rayon::prelude::*;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Brute-force result: `indices` (q, k) int64 and `distances` (q, k) float64.
#[derive(Clone, Debug, PartialEq)]
pub struct KnnResult {
    pub indices: Array2<i64>,
    pub distances: Array2<f64>,
}

/// A candidate ordered by (distance, index): the total order the results are sorted by.
#[derive(Clone, Copy, Debug)]
struct Cand {
    d: f64,
    j: usize,
}

impl Ord for Cand {
    fn cmp(&self, other: &Self) -> Ordering {
        self.d.total_cmp(&other.d).then(self.j.cmp(&other.j))
    }
}
impl PartialOrd for Cand {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Cand {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Cand {}

/// Checks k against the problem size and mode and returns it as usize.
pub fn check_k(k: i64, n: usize, predecessor: bool) -> Result<usize, InputError> {
    if predecessor {
        if k < 1 {
            return Err(InputError(format!("k must be >= 1, got {k}")));
        }
    } else if k < 1 || (k as u64) > (n as u64).saturating_sub(1) {
        return Err(InputError(format!(
            "k must satisfy 1 <= k <= n - 1 = {} outside predecessor mode (n = {n}), got {k}",
            n as i64 - 1
        )));
    }
    usize::try_from(k).map_err(|_| InputError(format!("k is too large: {k}")))
}

/// The k nearest admissible neighbours of dataset point `i`, written into the two
/// output rows (length k), padded with (-1, +inf).
fn knn_one(
    prob: &ResidualProblem,
    i: usize,
    predecessor: bool,
    out_idx: &mut [i64],
    out_d: &mut [f64],
) {
    let k = out_idx.len();
    let n = prob.n();
    let end = if predecessor { i.min(n) } else { n };
    let admissible = if predecessor { end } else { n - 1 };
    // Candidates in blocks: distances of a block first (interleaved Dot2), then selection.
    const BLOCK: usize = 256;
    let mut js: Vec<usize> = Vec::with_capacity(BLOCK);
    let mut ds: Vec<f64> = vec![0.0; BLOCK];
    let mut blocks = (0..end).filter(|&j| j != i);
    let mut next_block = |js: &mut Vec<usize>, ds: &mut Vec<f64>| -> bool {
        js.clear();
        js.extend(blocks.by_ref().take(BLOCK));
        ds.resize(js.len(), 0.0);
        prob.dist_many(i, js, ds);
        !js.is_empty()
    };
    let sorted: Vec<Cand> = if admissible <= k {
        // Everything is returned: compute all, sort.
        let mut all: Vec<Cand> = Vec::with_capacity(admissible);
        while next_block(&mut js, &mut ds) {
            all.extend(js.iter().zip(&ds).map(|(&j, &d)| Cand { d, j }));
        }
        all.sort_unstable();
        all
    } else {
        // Bounded max-heap of the k best so far; its top is the current k-th.
        let mut heap: BinaryHeap<Cand> = BinaryHeap::with_capacity(k + 1);
        while next_block(&mut js, &mut ds) {
            for (&j, &d) in js.iter().zip(&ds) {
                let c = Cand { d, j };
                if heap.len() < k {
                    heap.push(c);
                } else if let Some(mut top) = heap.peek_mut() {
                    if c < *top {
                        *top = c;
                    }
                }
            }
        }
        heap.into_sorted_vec()
    };
    for (a, (oi, od)) in out_idx.iter_mut().zip(out_d.iter_mut()).enumerate() {
        match sorted.get(a) {
            Some(c) => {
                *oi = c.j as i64;
                *od = c.d;
            }
            None => {
                *oi = -1;
                *od = f64::INFINITY;
            }
        }
    }
}

/// Exact kNN for `queries` (dataset indices, repeats allowed; `None` = every point, query
/// a = point a). Queries are processed in parallel; the result does not depend on the
/// number of threads.
pub fn brute_knn(
    prob: &ResidualProblem,
    k: i64,
    queries: Option<&[i64]>,
    predecessor: bool,
) -> Result<KnnResult, InputError> {
    let n = prob.n();
    let k = check_k(k, n, predecessor)?;
    if let Some(q) = queries {
        prob.check_indices(q, "queries")?;
    }
    let nq = queries.map_or(n, |q| q.len());
    if nq
        .checked_mul(k)
        .map_or(true, |len| len > isize::MAX as usize / 8)
    {
        return Err(InputError(format!(
            "k is too large: {nq} queries x k = {k} neighbours do not fit in memory"
        )));
    }
    let mut idx = vec![0i64; nq * k];
    let mut dst = vec![0f64; nq * k];
    idx.par_chunks_mut(k)
        .zip(dst.par_chunks_mut(k))
        .enumerate()
        .for_each(|(a, (oi, od))| {
            let i = queries.map_or(a, |q| q[a] as usize);
            knn_one(prob, i, predecessor, oi, od);
        });
    Ok(KnnResult {
        indices: Array2::from_shape_vec((nq, k), idx).expect("shape"),
        distances: Array2::from_shape_vec((nq, k), dst).expect("shape"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{Kernel, KernelParams};
    use crate::test_util::{random_problem_arrays, ProblemArrays, SplitMix64};
    use ndarray::{s, Array1, Array2};

    /// Naive reference: full distance row, full sort by (distance, index).
    fn naive(
        prob: &ResidualProblem,
        i: usize,
        k: usize,
        predecessor: bool,
    ) -> (Vec<i64>, Vec<f64>) {
        let mut all: Vec<(f64, usize)> = (0..prob.n())
            .filter(|&j| j != i && (!predecessor || j < i))
            .map(|j| (prob.dist(i, j), j))
            .collect();
        all.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap().then(a.1.cmp(&b.1)));
        let mut ids = vec![-1i64; k];
        let mut ds = vec![f64::INFINITY; k];
        for (a, (d, j)) in all.into_iter().take(k).enumerate() {
            ids[a] = j as i64;
            ds[a] = d;
        }
        (ids, ds)
    }

    fn check_against_naive(
        prob: &ResidualProblem,
        res: &KnnResult,
        queries: &[usize],
        k: usize,
        pred: bool,
    ) {
        assert_eq!(res.indices.shape(), &[queries.len(), k]);
        assert_eq!(res.distances.shape(), &[queries.len(), k]);
        for (a, &i) in queries.iter().enumerate() {
            let (ids, ds) = naive(prob, i, k, pred);
            assert_eq!(
                res.indices.row(a).to_vec(),
                ids,
                "query {i} k {k} pred {pred}"
            );
            assert_eq!(
                res.distances.row(a).to_vec(),
                ds,
                "query {i} k {k} pred {pred}"
            );
        }
    }

    fn make(seed: u64, n: usize, d: usize, m: usize, kern: Kernel) -> ProblemArrays {
        random_problem_arrays(seed, n, d, m, kern)
    }

    #[test]
    fn matches_naive_full_sort() {
        let kernels = [
            Kernel::Rbf,
            Kernel::Matern12,
            Kernel::Matern32,
            Kernel::Matern52,
        ];
        for (s, &kern) in kernels.iter().enumerate() {
            for &d in &[1usize, 2, 3, 8] {
                let n = 60;
                let (x, v, p, params) = make(100 + s as u64 * 10 + d as u64, n, d, 6, kern);
                let prob = ResidualProblem::new(x.view(), v.view(), p.view(), params).unwrap();
                let all: Vec<usize> = (0..n).collect();
                for &k in &[1usize, 2, 7, 30, n - 2, n - 1] {
                    for pred in [false, true] {
                        let res = brute_knn(&prob, k as i64, None, pred).unwrap();
                        check_against_naive(&prob, &res, &all, k, pred);
                    }
                }
                // Query subset with repeats.
                let qs: Vec<i64> = vec![5, 0, 59, 5, 17, 17, 1];
                let qu: Vec<usize> = qs.iter().map(|&q| q as usize).collect();
                for pred in [false, true] {
                    let res = brute_knn(&prob, 9, Some(&qs), pred).unwrap();
                    check_against_naive(&prob, &res, &qu, 9, pred);
                    // Repeated queries give identical rows.
                    assert_eq!(res.indices.row(0), res.indices.row(3));
                    assert_eq!(res.distances.row(4), res.distances.row(5));
                }
            }
        }
    }

    #[test]
    fn rows_are_sorted_and_exclude_self() {
        let (x, v, p, params) = make(7, 80, 2, 4, Kernel::Matern52);
        let prob = ResidualProblem::new(x.view(), v.view(), p.view(), params).unwrap();
        let res = brute_knn(&prob, 12, None, false).unwrap();
        for i in 0..80 {
            let ids = res.indices.row(i);
            let ds = res.distances.row(i);
            assert!(!ids.iter().any(|&j| j == i as i64));
            for a in 1..12 {
                assert!(ds[a - 1] < ds[a] || (ds[a - 1] == ds[a] && ids[a - 1] < ids[a]));
            }
            let mut u = ids.to_vec();
            u.sort();
            u.dedup();
            assert_eq!(u.len(), 12);
        }
    }

    #[test]
    fn predecessor_mode_restricts_and_pads() {
        let (x, v, p, params) = make(8, 20, 3, 3, Kernel::Rbf);
        let prob = ResidualProblem::new(x.view(), v.view(), p.view(), params).unwrap();
        let k = 5;
        let res = brute_knn(&prob, k as i64, None, true).unwrap();
        for i in 0..20usize {
            let ids = res.indices.row(i);
            let ds = res.distances.row(i);
            let filled = i.min(k);
            for a in 0..k {
                if a < filled {
                    assert!(ids[a] >= 0 && (ids[a] as usize) < i, "row {i}: {ids:?}");
                    assert!(ds[a].is_finite());
                } else {
                    assert_eq!(ids[a], -1, "row {i}");
                    assert_eq!(ds[a], f64::INFINITY, "row {i}");
                }
            }
            if i <= k {
                // Everything admissible is returned.
                let mut got: Vec<i64> = ids.iter().copied().filter(|&j| j >= 0).collect();
                got.sort();
                assert_eq!(got, (0..i as i64).collect::<Vec<_>>());
            }
        }
        // Row 0 is all padding; k larger than n is fine in predecessor mode.
        let res = brute_knn(&prob, 25, None, true).unwrap();
        assert!(res.indices.row(0).iter().all(|&j| j == -1));
        assert_eq!(res.indices.row(19).iter().filter(|&&j| j >= 0).count(), 19);
        assert_eq!(res.indices[[19, 19]], -1);
        assert_eq!(res.distances[[19, 24]], f64::INFINITY);
    }

    #[test]
    fn ties_broken_by_smaller_index_with_duplicated_points() {
        // Every point appears three times (at indices b, b + 15, b + 30) with identical
        // coordinates, V rows and p: distances to copies tie exactly.
        let (x0, v0, p0, params) = make(21, 15, 2, 3, Kernel::Matern32);
        let x = ndarray::concatenate![ndarray::Axis(0), x0, x0, x0];
        let v = ndarray::concatenate![ndarray::Axis(0), v0, v0, v0];
        let p = ndarray::concatenate![ndarray::Axis(0), p0, p0, p0];
        let prob = ResidualProblem::new(x.view(), v.view(), p.view(), params).unwrap();
        let n = 45;
        for pred in [false, true] {
            for &k in &[1usize, 2, 5, 13, 44] {
                let res = brute_knn(&prob, k as i64, None, pred).unwrap();
                let all: Vec<usize> = (0..n).collect();
                check_against_naive(&prob, &res, &all, k, pred);
                for i in 0..n {
                    let ids = res.indices.row(i);
                    let ds = res.distances.row(i);
                    for a in 1..k {
                        if ids[a] >= 0 && ds[a] == ds[a - 1] {
                            assert!(ids[a - 1] < ids[a], "tie order row {i}: {ids:?}");
                        }
                    }
                }
            }
        }
        // Copies of point 3 are 18 and 33; their distance to 3 ties with each other (same
        // bits); with k = 1 the smaller index wins.
        assert_eq!(prob.dist(3, 18), prob.dist(3, 33));
        assert_eq!(prob.dist(33, 3), prob.dist(33, 18));
        // A point's own copies are its nearest neighbours (tied), smaller index first.
        let res = brute_knn(&prob, 2, Some(&[33, 18, 3]), false).unwrap();
        assert_eq!(res.indices.row(0).to_vec(), vec![3, 18]);
        assert_eq!(res.indices.row(1).to_vec(), vec![3, 33]);
        assert_eq!(res.indices.row(2).to_vec(), vec![18, 33]);
        assert_eq!(res.distances[[0, 0]], res.distances[[0, 1]]);
        let res = brute_knn(&prob, 1, Some(&[33]), true).unwrap();
        assert_eq!(res.indices[[0, 0]], 3);
    }

    #[test]
    fn exact_ties_with_zero_distance() {
        // Points that are copies of each other with zero low-rank part: d = 0 between
        // copies. Query 2 has copies 0, 1, 2, 3 -> neighbours 0, 1, 3 in index order.
        let x = ndarray::array![[0.0], [0.0], [0.0], [0.0], [5.0], [9.0]];
        let v = Array2::<f64>::zeros((6, 1));
        let p = Array1::from_elem(6, 1.0);
        let params = KernelParams::new(Kernel::Rbf, vec![1.0], 1.0).unwrap();
        let prob = ResidualProblem::new(x.view(), v.view(), p.view(), params).unwrap();
        let res = brute_knn(&prob, 3, Some(&[2, 3, 0]), false).unwrap();
        assert_eq!(res.indices.row(0).to_vec(), vec![0, 1, 3]);
        assert_eq!(res.indices.row(1).to_vec(), vec![0, 1, 2]);
        assert_eq!(res.indices.row(2).to_vec(), vec![1, 2, 3]);
        assert!(res.distances.slice(s![.., ..]).iter().all(|&d| d == 0.0));
        let res = brute_knn(&prob, 4, Some(&[3]), true).unwrap();
        assert_eq!(res.indices.row(0).to_vec(), vec![0, 1, 2, -1]);
    }

    #[test]
    fn k_and_queries_are_validated() {
        let (x, v, p, params) = make(1, 10, 2, 2, Kernel::Rbf);
        let prob = ResidualProblem::new(x.view(), v.view(), p.view(), params).unwrap();
        for bad in [0i64, -3, 10, 11] {
            let e = brute_knn(&prob, bad, None, false).unwrap_err().0;
            assert!(e.starts_with("k ") && e.contains(&bad.to_string()), "{e}");
        }
        assert!(brute_knn(&prob, 9, None, false).is_ok());
        assert!(brute_knn(&prob, 0, None, true)
            .unwrap_err()
            .0
            .starts_with("k "));
        assert!(brute_knn(&prob, 100, None, true).is_ok());
        let e = brute_knn(&prob, 2, Some(&[0, 10]), false).unwrap_err().0;
        assert!(e.starts_with("queries") && e.contains("10"), "{e}");
        let e = brute_knn(&prob, 2, Some(&[-1]), true).unwrap_err().0;
        assert!(e.starts_with("queries") && e.contains("-1"), "{e}");
        let res = brute_knn(&prob, 2, Some(&[]), false).unwrap();
        assert_eq!(res.indices.shape(), &[0, 2]);
    }

    #[test]
    fn independent_of_thread_count() {
        let (x, v, p, params) = make(33, 120, 3, 8, Kernel::Matern12);
        let prob = ResidualProblem::new(x.view(), v.view(), p.view(), params).unwrap();
        let a = brute_knn(&prob, 10, None, true).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let b = pool.install(|| brute_knn(&prob, 10, None, true).unwrap());
        assert_eq!(a, b);
        let mut rng = SplitMix64::new(3);
        let qs: Vec<i64> = (0..50).map(|_| (rng.next_u64() % 120) as i64).collect();
        let c = brute_knn(&prob, 10, Some(&qs), true).unwrap();
        for (r, &q) in qs.iter().enumerate() {
            assert_eq!(c.indices.row(r), a.indices.row(q as usize));
        }
    }
}
