"""The ``residual-gpu`` command: info, knn and bench."""

from __future__ import annotations

import json
import logging
import platform
import sys
from pathlib import Path

import click
import numpy as np

from . import __version__
from .backends import available_backends, resolve_backend_name
from .errors import ResidualGPUError
from .kernels import KERNELS, make_kernel
from .suites import SUITES


def _fail(exc: Exception):
    raise click.ClickException(str(exc)) from exc


@click.group()
@click.version_option(__version__, prog_name="residual-gpu")
@click.option("-v", "--verbose", is_flag=True, help="Log backend resolution and progress details.")
def main(verbose: bool):
    """Exact residual-correlation nearest neighbours for Vecchia / VIF Gaussian processes."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


@main.command()
def info():
    """Version, backends (and why one is unavailable), devices and thread pools."""
    import numba
    from threadpoolctl import threadpool_info

    click.echo(f"residual_gpu {__version__}  python {platform.python_version()}  {platform.machine()}")
    click.echo(f"numpy {np.__version__}  numba {numba.__version__}  threading layer: "
               f"{numba.config.THREADING_LAYER}  numba threads: {numba.config.NUMBA_NUM_THREADS}")
    click.echo("backends:")
    for name, (usable, reason) in available_backends().items():
        click.echo(f"  {name:5s} {'available' if usable else 'unavailable'}: {reason}")
    try:
        click.echo(f"auto resolves to: {resolve_backend_name('auto')}")
    except ResidualGPUError as exc:
        click.echo(f"auto does not resolve: {exc}")
    click.echo("thread pools:")
    for pool in threadpool_info():
        click.echo(f"  {pool.get('internal_api')} {pool.get('version')} threads={pool.get('num_threads')} "
                   f"arch={pool.get('architecture')} ({pool.get('filepath')})")


def _load_array(path: str, name: str) -> np.ndarray:
    p = Path(path)
    if not p.exists():
        raise click.BadParameter(f"no such file: {path}", param_hint=name)
    if p.suffix not in (".npy", ".csv", ".txt"):
        raise click.BadParameter(f"expected a .npy or .csv file, got {path}", param_hint=name)
    try:
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False)
        return np.loadtxt(p, delimiter="," if p.suffix == ".csv" else None, ndmin=2)
    except (ValueError, OSError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint=name) from None


@main.command()
@click.argument("coords_path", metavar="COORDS")
@click.option("-o", "--output", required=True, help="Output .npz (indices, distances).")
@click.option("-k", "--k", "k", type=int, default=30, show_default=True, help="Neighbours per query.")
@click.option("--kernel", type=click.Choice(sorted(KERNELS)), default="matern52", show_default=True)
@click.option("--lengthscale", type=str, default="1.0", show_default=True,
              help="A float, or comma-separated floats (one per dimension, ARD).")
@click.option("--variance", type=float, default=1.0, show_default=True)
@click.option("--inducing", type=int, default=None,
              help="Inducing points chosen from the data [default: min(256, n // 2)].")
@click.option("--inducing-method", type=click.Choice(["kmeans++", "kmeans"]), default="kmeans++", show_default=True,
              help="kmeans++: data points; kmeans: kmeans++ then Lloyd iterations (centroids).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--predecessor/--no-predecessor", default=False, show_default=True,
              help="Restrict neighbours of point i to j < i (Vecchia ordering).")
@click.option("--query-coords", type=str, default=None, help="New locations (.npy/.csv) to query instead.")
@click.option("--backend", type=str, default="auto", show_default=True)
@click.option("--method", type=click.Choice(["auto", "brute", "tree"]), default="auto", show_default=True,
              help="Search method (auto: the documented rule, see docs/tree.md).")
@click.option("--telemetry", "telemetry_path", type=str, default=None, help="Append telemetry as JSONL to this file.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def knn(coords_path, output, k, kernel, lengthscale, variance, inducing, inducing_method, seed, predecessor, query_coords,
        backend, method, telemetry_path, progress):
    """Neighbours of every point of COORDS (.npy or .csv), written to an .npz file."""
    from .index import ResidualIndex
    from .problem import ResidualProblem

    coords = _load_array(coords_path, "COORDS")
    try:
        ls = [float(x) for x in lengthscale.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected a float or comma-separated floats, got {lengthscale!r}",
                                 param_hint="--lengthscale") from None
    try:
        kern = make_kernel(kernel, lengthscale=ls[0] if len(ls) == 1 else np.array(ls), variance=variance)
        problem = ResidualProblem(coords, kernel=kern, inducing=inducing, seed=seed, inducing_method=inducing_method,
                                  backend=backend)
        index = ResidualIndex(problem, backend=backend, method=method, progress=progress)
        qc = None if query_coords is None else _load_array(query_coords, "--query-coords")
        res = index.query(k, query_coords=qc, predecessor=predecessor, progress=progress,
                          telemetry_path=telemetry_path)
    except ResidualGPUError as exc:
        _fail(exc)
    with open(output, "wb") as fh:  # a file object: np.savez would append ".npz" to a bare name
        np.savez(fh, indices=res.indices, distances=res.distances)
    click.echo(f"wrote {output}: {res.indices.shape[0]} queries x k={k} "
               f"(backend={index.backend}, method={index.method}, {res.telemetry.seconds['query']:.2f}s)")


@main.command()
@click.option("--suite", type=click.Choice(sorted(SUITES)), default="smoke", show_default=True)
@click.option("--n", type=int, default=None, help="Override the suite's number of points.")
@click.option("--method", "methods", multiple=True, default=("brute",), show_default=True,
              type=click.Choice(["brute", "tree", "auto"]), help="Search method(s) to run (repeatable).")
@click.option("--precision", "precisions", multiple=True, default=("auto",), show_default=True,
              type=click.Choice(["auto", "float64", "float32"]),
              help="Precision(s) of the fast pass to run (repeatable); answers are float64-certified in all.")
@click.option("--backend", type=str, default="auto", show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Timed repeats (median reported).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable results.")
def bench(suite, n, methods, precisions, backend, repeats, as_json):
    """Run a benchmark suite and print a table (or JSON)."""
    from .bench import format_table, run_suite

    try:
        result = run_suite(suite, n=n, backend=backend, methods=methods, precisions=precisions, repeats=repeats,
                           progress=False)
    except ResidualGPUError as exc:
        _fail(exc)
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        click.echo(format_table(result))


@main.command()
@click.option("--suite", type=click.Choice(sorted(SUITES)), default="gold", show_default=True)
@click.option("--n", type=int, default=None, help="Override the suite's number of points.")
@click.option("--backend", type=str, default="auto", show_default=True)
@click.option("--method", "methods", type=click.Choice(["brute", "tree"]), multiple=True,
              help="Compare brute force, the tree in the parity preset, or both (default: both).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable results.")
def parity(suite, n, backend, methods, as_json):
    """Run a suite on the Python engine and on the Rust oracle and compare them."""
    from .bench import format_parity, run_parity

    try:
        result = run_parity(suite, n=n, backend=backend, methods=methods or ("brute", "tree"))
    except ResidualGPUError as exc:
        _fail(exc)
    click.echo(json.dumps(result, indent=2) if as_json else format_parity(result))


if __name__ == "__main__":  # pragma: no cover
    main()
