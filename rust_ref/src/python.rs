//! Thin PyO3 wrappers: convert and validate arguments, release the GIL, call the pure
//! Rust functions, and return new numpy arrays. Inputs are only ever read.

use crate::brute;
use crate::kernels::{self, Kernel, KernelParams};
use crate::residual::ResidualProblem;
use crate::tree::{self, SearchTree, Transform, TreeParams};
use crate::tree_knn::{self as knn, TreeKnnOptions};
use crate::{fmt_shape, InputError};
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Ix1, Ix2};
use numpy::{AllowTypeChange, IntoPyArray, PyArray2, PyArrayLikeDyn, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

type FloatArray<'py> = PyArrayLikeDyn<'py, f64, AllowTypeChange>;
type KnnArrays<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<f64>>);
type TreeKnnOut<'py> = (
    Bound<'py, PyArray2<i64>>,
    Bound<'py, PyArray2<f64>>,
    Bound<'py, PyDict>,
);

impl From<InputError> for PyErr {
    fn from(e: InputError) -> PyErr {
        PyValueError::new_err(e.0)
    }
}

fn value_error(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}

/// A 2-D float64 view of `arr`, or ValueError naming `what` and the shape.
fn view2<'a>(
    arr: &'a FloatArray<'_>,
    what: &str,
    shape_doc: &str,
) -> PyResult<ArrayView2<'a, f64>> {
    let view = arr.as_array();
    let shape = view.shape().to_vec();
    view.into_dimensionality::<Ix2>().map_err(|_| {
        value_error(format!(
            "{what} must be a 2-D array of shape {shape_doc}, got shape {}",
            fmt_shape(&shape)
        ))
    })
}

/// A 1-D float64 view of `arr`, or ValueError naming `what` and the shape.
fn view1<'a>(
    arr: &'a FloatArray<'_>,
    what: &str,
    shape_doc: &str,
) -> PyResult<ArrayView1<'a, f64>> {
    let view = arr.as_array();
    let shape = view.shape().to_vec();
    view.into_dimensionality::<Ix1>().map_err(|_| {
        value_error(format!(
            "{what} must be a 1-D array of shape {shape_doc}, got shape {}",
            fmt_shape(&shape)
        ))
    })
}

/// Kernel parameters from Python arguments. `lengthscale` is a scalar (used for every
/// dimension) or a 1-D array of length `d`.
fn kernel_params(
    kernel: &Bound<'_, PyAny>,
    lengthscale: &FloatArray<'_>,
    variance: f64,
    d: usize,
    coords_name: &str,
) -> PyResult<KernelParams> {
    let name = kernel.downcast::<PyString>().map_err(|_| {
        value_error(format!(
            "kernel must be one of {:?}, got {}",
            Kernel::NAMES,
            kernel.repr().map(|r| r.to_string()).unwrap_or_default()
        ))
    })?;
    let kern = Kernel::from_name(name.to_str()?)?;
    let ls = lengthscale.as_array();
    let ls: Vec<f64> = match ls.ndim() {
        0 => vec![ls.iter().copied().next().unwrap_or(f64::NAN); d],
        1 if ls.len() == d => ls.iter().copied().collect(),
        _ => {
            return Err(value_error(format!(
                "lengthscale must be a scalar or a 1-D array of length d = {d} (the number of \
                 columns of {coords_name}), got shape {} ({:?})",
                fmt_shape(ls.shape()),
                ls.iter().take(16).collect::<Vec<_>>()
            )));
        }
    };
    Ok(KernelParams::new(kern, ls, variance)?)
}

/// Dataset indices as a Vec<i64>: any 1-D integer array-like (lists included).
fn index_vec(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<i64>> {
    let py = obj.py();
    let np = py.import("numpy")?;
    let arr = np.call_method1("asarray", (obj,))?;
    let ndim: usize = arr.getattr("ndim")?.extract()?;
    let size: usize = arr.getattr("size")?.extract()?;
    if ndim != 1 {
        let shape: Vec<usize> = arr.getattr("shape")?.extract()?;
        return Err(value_error(format!(
            "{what} must be a 1-D array of integer indices, got shape {}",
            fmt_shape(&shape)
        )));
    }
    let kind: String = arr.getattr("dtype")?.getattr("kind")?.extract()?;
    if size > 0 && kind != "i" && kind != "u" {
        let dtype = arr.getattr("dtype")?.str()?.to_string();
        return Err(value_error(format!(
            "{what} must be an integer array of dataset indices, got dtype {dtype}"
        )));
    }
    let arr = arr.call_method1("astype", ("int64",))?;
    let ro: PyReadonlyArray1<i64> = arr.extract()?;
    Ok(ro.as_array().to_vec())
}

/// Exact brute-force residual-correlation kNN in float64.
///
/// Returns (indices int64 (q, k), distances float64 (q, k)), ascending by distance, ties
/// by smaller index; rows with fewer than k admissible candidates are padded with -1/inf.
#[pyfunction]
#[pyo3(signature = (coords, v, p, *, kernel, lengthscale, variance, k, queries=None, predecessor=false))]
#[allow(clippy::too_many_arguments)]
fn brute_knn<'py>(
    py: Python<'py>,
    coords: FloatArray<'py>,
    v: FloatArray<'py>,
    p: FloatArray<'py>,
    kernel: &Bound<'py, PyAny>,
    lengthscale: FloatArray<'py>,
    variance: f64,
    k: i64,
    queries: Option<&Bound<'py, PyAny>>,
    predecessor: bool,
) -> PyResult<KnnArrays<'py>> {
    let coords_v = view2(&coords, "coords", "(n, d)")?;
    let v_v = view2(&v, "v", "(n, m)")?;
    let p_v = view1(&p, "p", "(n,)")?;
    let params = kernel_params(kernel, &lengthscale, variance, coords_v.ncols(), "coords")?;
    let queries = queries.map(|q| index_vec(q, "queries")).transpose()?;
    let res = py.allow_threads(|| -> Result<brute::KnnResult, InputError> {
        let prob = ResidualProblem::new(coords_v, v_v, p_v, params)?;
        brute::brute_knn(&prob, k, queries.as_deref(), predecessor)
    })?;
    Ok((res.indices.into_pyarray(py), res.distances.into_pyarray(py)))
}

/// Dense covariance block K(x1, x2) of shape (n1, n2), float64.
#[pyfunction]
#[pyo3(signature = (x1, x2, *, kernel, lengthscale, variance))]
fn covariance_block<'py>(
    py: Python<'py>,
    x1: FloatArray<'py>,
    x2: FloatArray<'py>,
    kernel: &Bound<'py, PyAny>,
    lengthscale: FloatArray<'py>,
    variance: f64,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let x1_v = view2(&x1, "x1", "(n1, d)")?;
    let x2_v = view2(&x2, "x2", "(n2, d)")?;
    let params = kernel_params(kernel, &lengthscale, variance, x1_v.ncols(), "x1")?;
    let out = py.allow_threads(|| kernels::covariance_block(x1_v, x2_v, &params))?;
    Ok(out.into_pyarray(py))
}

/// Residual correlation distances between dataset points rows[a] and cols[b], shape
/// (len(rows), len(cols)); exactly 0 where rows[a] == cols[b].
#[pyfunction]
#[pyo3(signature = (coords, v, p, rows, cols, *, kernel, lengthscale, variance))]
#[allow(clippy::too_many_arguments)]
fn residual_distance_block<'py>(
    py: Python<'py>,
    coords: FloatArray<'py>,
    v: FloatArray<'py>,
    p: FloatArray<'py>,
    rows: &Bound<'py, PyAny>,
    cols: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    lengthscale: FloatArray<'py>,
    variance: f64,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let coords_v = view2(&coords, "coords", "(n, d)")?;
    let v_v = view2(&v, "v", "(n, m)")?;
    let p_v = view1(&p, "p", "(n,)")?;
    let params = kernel_params(kernel, &lengthscale, variance, coords_v.ncols(), "coords")?;
    let rows = index_vec(rows, "rows")?;
    let cols = index_vec(cols, "cols")?;
    let out = py.allow_threads(|| {
        let prob = ResidualProblem::new(coords_v, v_v, p_v, params)?;
        prob.distance_block(&rows, &cols)
    })?;
    Ok(out.into_pyarray(py))
}

/// A count argument (leaf_size, tile_size, pop_batch) that must be >= 1.
fn positive(value: i64, what: &str) -> PyResult<usize> {
    if value < 1 {
        return Err(value_error(format!(
            "{what} must be >= 1, got {what}={value}"
        )));
    }
    usize::try_from(value).map_err(|_| value_error(format!("{what} is too large: {value}")))
}

/// The transform T as an owned (m, m) array, or None / a (0, 0) array for the identity.
fn transform_array(obj: &Bound<'_, PyAny>) -> PyResult<Option<Array2<f64>>> {
    if obj.is_none() {
        return Ok(None);
    }
    let arr: FloatArray = obj.extract().map_err(|_| {
        value_error(format!(
            "transform must be a 2-D float array of shape (m, m), (0, 0) or None, got {}",
            obj.repr().map(|r| r.to_string()).unwrap_or_default()
        ))
    })?;
    let view = view2(&arr, "transform", "(m, m) or (0, 0)")?;
    Ok(Some(view.to_owned()))
}

fn make_transform(t: &Option<Array2<f64>>, m: usize) -> Result<Transform, InputError> {
    match t {
        None => Ok(Transform::Identity),
        Some(t) => Transform::new(t.view(), m),
    }
}

fn usize_array(v: &[usize]) -> Array1<i64> {
    v.iter().map(|&x| x as i64).collect()
}

fn tree_dict<'py>(py: Python<'py>, tree: &SearchTree) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    let nn = tree.nodes();
    let (d, m) = (tree.d, tree.m);
    let mat =
        |a: &[f64], cols: usize| Array2::from_shape_vec((nn, cols), a.to_vec()).expect("shape");
    out.set_item("perm", usize_array(&tree.perm).into_pyarray(py))?;
    out.set_item("node_start", usize_array(&tree.node_start).into_pyarray(py))?;
    out.set_item("node_end", usize_array(&tree.node_end).into_pyarray(py))?;
    out.set_item(
        "node_left",
        Array1::from(tree.node_left.clone()).into_pyarray(py),
    )?;
    out.set_item(
        "node_right",
        Array1::from(tree.node_right.clone()).into_pyarray(py),
    )?;
    out.set_item("node_lo", mat(&tree.node_lo, d).into_pyarray(py))?;
    out.set_item("node_hi", mat(&tree.node_hi, d).into_pyarray(py))?;
    out.set_item("node_min", usize_array(&tree.node_min).into_pyarray(py))?;
    out.set_item("roots", usize_array(&tree.roots).into_pyarray(py))?;
    out.set_item("root_lo", usize_array(&tree.root_lo).into_pyarray(py))?;
    out.set_item("dense", usize_array(&tree.dense).into_pyarray(py))?;
    out.set_item("node_mid", mat(&tree.node_mid, m).into_pyarray(py))?;
    out.set_item("node_rad", mat(&tree.node_rad, m).into_pyarray(py))?;
    out.set_item(
        "node_ymin",
        Array1::from(tree.node_ymin.clone()).into_pyarray(py),
    )?;
    out.set_item(
        "node_ymax",
        Array1::from(tree.node_ymax.clone()).into_pyarray(py),
    )?;
    out.set_item(
        "node_zeta",
        Array1::from(tree.node_zeta.clone()).into_pyarray(py),
    )?;
    out.set_item(
        "node_zabs",
        Array1::from(tree.node_zabs.clone()).into_pyarray(py),
    )?;
    out.set_item("dense_cut", tree.dense_cut)?;
    Ok(out)
}

/// The search tree of the parity preset (docs/tree.md), as a dict of the SearchTree
/// field names: int64 arrays perm, node_start, node_end, node_left, node_right, node_min,
/// roots, root_lo, dense; float64 node_lo, node_hi (nodes, d), node_mid, node_rad
/// (nodes, m), node_ymin, node_ymax, node_zeta, node_zabs; and the float dense_cut.
///
/// transform: the lower-triangular (m, m) factor T with T V_j = k(U, x_j), or a (0, 0)
/// array / None for the identity.
#[pyfunction]
#[pyo3(signature = (coords, v, p, transform, *, lengthscale, leaf_size=16, dense_ratio=1.0/64.0))]
#[allow(clippy::too_many_arguments)]
fn tree_build<'py>(
    py: Python<'py>,
    coords: FloatArray<'py>,
    v: FloatArray<'py>,
    p: FloatArray<'py>,
    transform: &Bound<'py, PyAny>,
    lengthscale: FloatArray<'py>,
    leaf_size: i64,
    dense_ratio: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let coords_v = view2(&coords, "coords", "(n, d)")?;
    let v_v = view2(&v, "v", "(n, m)")?;
    let p_v = view1(&p, "p", "(n,)")?;
    let d = coords_v.ncols();
    // the kernel does not enter the tree: only the lengthscales do
    let kernel = PyString::new(py, "rbf");
    let params = kernel_params(kernel.as_any(), &lengthscale, 1.0, d, "coords")?;
    let t = transform_array(transform)?;
    let tp = TreeParams {
        leaf_size: positive(leaf_size, "leaf_size")?,
        dense_ratio,
    };
    let tree = py.allow_threads(|| -> Result<SearchTree, InputError> {
        let prob = ResidualProblem::new(coords_v, v_v, p_v, params)?;
        let tr = make_transform(&t, prob.rank())?;
        tree::build_tree(&prob, &tr, tp)
    })?;
    tree_dict(py, &tree)
}

/// Exact residual-correlation kNN through the search tree in the parity preset: the same
/// indices, distances and counters as
/// `ResidualIndex(problem, backend="cpu", method="tree", preset="parity").query(...)`.
///
/// Returns (indices int64 (q, k), distances float64 (q, k), counters dict[str, int]).
/// 1 <= k <= n - 1 (predecessor mode included); rows with fewer than k admissible
/// candidates are padded with -1 / inf.
#[pyfunction]
#[pyo3(signature = (coords, v, p, transform, *, kernel, lengthscale, variance, k, queries=None,
                    predecessor=false, leaf_size=16, tile_size=32, pop_batch=8,
                    dense_ratio=1.0/64.0))]
#[allow(clippy::too_many_arguments)]
fn tree_knn<'py>(
    py: Python<'py>,
    coords: FloatArray<'py>,
    v: FloatArray<'py>,
    p: FloatArray<'py>,
    transform: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    lengthscale: FloatArray<'py>,
    variance: f64,
    k: i64,
    queries: Option<&Bound<'py, PyAny>>,
    predecessor: bool,
    leaf_size: i64,
    tile_size: i64,
    pop_batch: i64,
    dense_ratio: f64,
) -> PyResult<TreeKnnOut<'py>> {
    let coords_v = view2(&coords, "coords", "(n, d)")?;
    let v_v = view2(&v, "v", "(n, m)")?;
    let p_v = view1(&p, "p", "(n,)")?;
    let params = kernel_params(kernel, &lengthscale, variance, coords_v.ncols(), "coords")?;
    let t = transform_array(transform)?;
    let queries = queries.map(|q| index_vec(q, "queries")).transpose()?;
    let opts = TreeKnnOptions {
        tree: TreeParams {
            leaf_size: positive(leaf_size, "leaf_size")?,
            dense_ratio,
        },
        tile_size: positive(tile_size, "tile_size")?,
        pop_batch: positive(pop_batch, "pop_batch")?,
    };
    let res = py.allow_threads(|| -> Result<knn::TreeKnnResult, InputError> {
        let prob = ResidualProblem::new(coords_v, v_v, p_v, params)?;
        let tr = make_transform(&t, prob.rank())?;
        knn::tree_knn(&prob, &tr, k, queries.as_deref(), predecessor, opts)
    })?;
    let counters = PyDict::new(py);
    for (name, value) in res.telemetry.named() {
        counters.set_item(name, value)?;
    }
    Ok((
        res.indices.into_pyarray(py),
        res.distances.into_pyarray(py),
        counters,
    ))
}

/// Float64 reference oracle for residual_gpu: exact brute-force residual kNN, and the
/// search tree's parity preset.
#[pymodule]
fn residual_gpu_ref(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("KERNELS", Kernel::NAMES.to_vec())?;
    m.add_function(wrap_pyfunction!(brute_knn, m)?)?;
    m.add_function(wrap_pyfunction!(covariance_block, m)?)?;
    m.add_function(wrap_pyfunction!(residual_distance_block, m)?)?;
    m.add_function(wrap_pyfunction!(tree_build, m)?)?;
    m.add_function(wrap_pyfunction!(tree_knn, m)?)?;
    Ok(())
}
