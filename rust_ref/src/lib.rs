//! `residual_gpu_ref`: the float64 reference oracle for `residual_gpu`.
//!
//! Pure Rust maths over `ndarray` views lives in [`kernels`], [`residual`] and [`brute`]
//! (exact brute force), and [`tree`], [`hilbert`], [`tree_search`], [`certify`] and
//! [`tree_knn`] (the search tree of docs/tree.md in the Python engine's `parity` preset:
//! the same tree arrays bit for bit, the same counters, indices and distances); the
//! `python` feature (on by default, used by maturin) adds thin PyO3 wrappers.
//!
//! Python API (module `residual_gpu_ref`):
//! - `brute_knn(coords, v, p, *, kernel, lengthscale, variance, k, queries=None,
//!    predecessor=False) -> (indices int64 (q, k), distances float64 (q, k))`
//! - `covariance_block(x1, x2, *, kernel, lengthscale, variance) -> (n1, n2) float64`
//! - `residual_distance_block(coords, v, p, rows, cols, *, kernel, lengthscale, variance)
//!    -> (len(rows), len(cols)) float64`
//! - `tree_build(coords, v, p, transform, *, lengthscale, leaf_size=16, dense_ratio=1/64)
//!    -> dict` of the `SearchTree` arrays (perm, node_start, ..., node_zabs) and `dense_cut`
//! - `tree_knn(coords, v, p, transform, *, kernel, lengthscale, variance, k, queries=None,
//!    predecessor=False, leaf_size=16, tile_size=32, pop_batch=8, dense_ratio=1/64)
//!    -> (indices, distances, counters: dict[str, int])`
//! - `__version__`

pub mod brute;
pub mod certify;
pub mod hilbert;
pub mod kernels;
pub mod residual;
pub mod tree;
pub mod tree_knn;
pub mod tree_search;

#[cfg(test)]
mod test_util;

#[cfg(feature = "python")]
mod python;

pub use brute::{brute_knn, KnnResult};
pub use kernels::{covariance_block, Kernel, KernelParams};
pub use residual::{dot2, ResidualProblem};
pub use tree::{build_tree, SearchTree, Transform, TreeParams};
pub use tree_knn::{tree_knn, tree_knn_with, Telemetry, TreeKnnOptions, TreeKnnResult};

/// Invalid input; the message starts with the offending argument's name and shows its value.
/// The Python wrappers raise it as `ValueError`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputError(pub String);

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

/// A shape written the way Python prints a tuple: `(3,)`, `(4, 2)`, `()`.
pub fn fmt_shape(shape: &[usize]) -> String {
    match shape {
        [a] => format!("({a},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
