//! Certification and exact ranking of a select's candidates (`residual_gpu/certify.py`).
//!
//! D(a) = sqrt(1 - a). With E the query's margin, a_k the k-th largest kept value and
//! hi_k = D(a_k - E): if the dropped maximum has D(a_dropped + E) <= hi_k the query is not
//! certified (searched again with a larger keep); otherwise the kept candidates with
//! D(a + E) <= hi_k (the contenders) are re-evaluated accurately and sorted by
//! (distance, index). The values here are already the accurate ones, but the contender
//! count (`accurate_evaluations`) and the certification decisions follow certify.py.

use crate::residual::ResidualProblem;

/// Distance of an |rho| that may lie outside [0, 1] after adding a margin.
#[inline]
pub fn margin_dist(a: f64) -> f64 {
    if a <= 0.0 {
        1.0
    } else if a >= 1.0 {
        0.0
    } else {
        (1.0 - a).sqrt()
    }
}

/// A certified query: its top k (padded with -1 / +inf) and how many contenders were
/// re-evaluated.
pub struct Certified {
    pub index: Vec<i64>,
    pub dist: Vec<f64>,
    pub contenders: usize,
}

/// Certify one query's candidates (`cand_index` / `cand_a` in heap layout, kept ones first,
/// then -1) against its dropped maximum and margin; `None` when not certified.
#[allow(clippy::too_many_arguments)]
pub fn certify_row(
    prob: &ResidualProblem,
    query: usize,
    k: usize,
    cand_index: &[i64],
    cand_a: &[f64],
    a_dropped: f64,
    margin: f64,
) -> Option<Certified> {
    let kept = cand_index.iter().take_while(|&&j| j >= 0).count();
    let a = &cand_a[..kept];
    // argsort(-a, kind="mergesort"): descending, ties keep heap position order
    let mut order: Vec<usize> = (0..kept).collect();
    order.sort_by(|&x, &y| a[y].partial_cmp(&a[x]).expect("finite |rho|"));
    let e = margin;
    let hi_k = if kept >= k {
        margin_dist(a[order[k - 1]] - e)
    } else {
        f64::INFINITY
    };
    if a_dropped >= 0.0 && margin_dist(a_dropped + e) <= hi_k {
        return None;
    }
    let n_cont = order
        .iter()
        .take_while(|&&c| margin_dist(a[c] + e) <= hi_k)
        .count();
    // accurate distances of the contenders, ranked by (distance, index)
    let mut cont: Vec<(f64, i64)> = order[..n_cont]
        .iter()
        .map(|&c| {
            let j = cand_index[c];
            let acc = prob.rho(query, j as usize).abs();
            ((1.0 - acc).sqrt(), j)
        })
        .collect();
    cont.sort_by(|x, y| {
        x.0.partial_cmp(&y.0)
            .expect("finite distances")
            .then(x.1.cmp(&y.1))
    });
    let mut index = vec![-1i64; k];
    let mut dist = vec![f64::INFINITY; k];
    for (c, &(dj, j)) in cont.iter().take(k).enumerate() {
        index[c] = j;
        dist[c] = dj;
    }
    Some(Certified {
        index,
        dist,
        contenders: n_cont,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Kernel;
    use crate::test_util::random_problem_arrays;

    #[test]
    fn margin_dist_clamps() {
        assert_eq!(margin_dist(-0.5), 1.0);
        assert_eq!(margin_dist(0.0), 1.0);
        assert_eq!(margin_dist(1.0), 0.0);
        assert_eq!(margin_dist(7.0), 0.0);
        assert_eq!(margin_dist(0.75), 0.5);
    }

    #[test]
    fn certification_needs_a_gap_to_the_dropped_maximum() {
        let (x, v, p, params) = random_problem_arrays(3, 30, 2, 3, Kernel::Rbf);
        let prob = ResidualProblem::new(x.view(), v.view(), p.view(), params).unwrap();
        let q = 4;
        let mut cands: Vec<(f64, i64)> = (0..30)
            .filter(|&j| j != q)
            .map(|j| (prob.rho(q, j).abs(), j as i64))
            .collect();
        cands.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
        let keep = 6;
        // any layout works: certify sorts; put them in reverse
        let idx: Vec<i64> = cands[..keep].iter().rev().map(|c| c.1).collect();
        let val: Vec<f64> = cands[..keep].iter().rev().map(|c| c.0).collect();
        let k = 3;
        let ok = certify_row(&prob, q, k, &idx, &val, cands[keep].0, 1e-15).unwrap();
        assert_eq!(ok.index, cands[..k].iter().map(|c| c.1).collect::<Vec<_>>());
        assert!(ok.contenders >= k);
        // a dropped value as large as the k-th: not certified
        assert!(certify_row(&prob, q, k, &idx, &val, cands[k - 1].0, 1e-15).is_none());
        // nothing dropped, fewer than k kept: padded
        let res = certify_row(&prob, q, 8, &idx, &val, -1.0, 1e-15).unwrap();
        assert_eq!(res.index[6..], [-1, -1]);
        assert_eq!(res.dist[7], f64::INFINITY);
    }
}
