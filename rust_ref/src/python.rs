//! Thin PyO3 wrappers: convert and validate arguments, release the GIL, call the pure
//! Rust functions, and return new numpy arrays. Inputs are only ever read.

use crate::brute;
use crate::kernels::{self, Kernel, KernelParams};
use crate::residual::ResidualProblem;
use crate::{fmt_shape, InputError};
use ndarray::{ArrayView1, ArrayView2, Ix1, Ix2};
use numpy::{AllowTypeChange, IntoPyArray, PyArray2, PyArrayLikeDyn, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyString;

type FloatArray<'py> = PyArrayLikeDyn<'py, f64, AllowTypeChange>;
type KnnArrays<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<f64>>);

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

/// Float64 reference oracle for residual_gpu (exact brute-force residual kNN).
#[pymodule]
fn residual_gpu_ref(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("KERNELS", Kernel::NAMES.to_vec())?;
    m.add_function(wrap_pyfunction!(brute_knn, m)?)?;
    m.add_function(wrap_pyfunction!(covariance_block, m)?)?;
    m.add_function(wrap_pyfunction!(residual_distance_block, m)?)?;
    Ok(())
}
