"""The ``residual-gpu`` command line (residual_gpu.cli.main) through click's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import residual_gpu as rg
from residual_gpu.cli import main

N = 200


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def coords():
    return np.random.default_rng(5).random((N, 2))


@pytest.fixture
def npy_file(tmp_path, coords):
    path = tmp_path / "coords.npy"
    np.save(path, coords)
    return path


@pytest.fixture
def csv_file(tmp_path, coords):
    path = tmp_path / "coords.csv"
    np.savetxt(path, coords, delimiter=",", fmt="%.17g")  # round-trips float64 exactly
    return path


def run_knn(runner, coords_file, out, *extra):
    args = ["knn", str(coords_file), "-o", str(out), "-k", "5", "--inducing", "20", "--lengthscale", "0.3",
            "--no-progress", "--backend", "cpu", *extra]
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert out.exists()
    with np.load(out) as data:
        assert set(data.files) == {"indices", "distances"}
        return data["indices"], data["distances"], result.output


# --------------------------------------------------------------------------------------
# info / version / help
# --------------------------------------------------------------------------------------


def test_info_lists_backends_and_auto(runner, monkeypatch):
    monkeypatch.delenv("RESIDUAL_GPU_BACKEND", raising=False)
    result = runner.invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    out = result.output
    avail = rg.available_backends()
    for name, (ok, reason) in avail.items():
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(name + " ")), None)
        assert line is not None, f"no line for backend {name}:\n{out}"
        assert ("unavailable" in line) == (not ok), line
        assert reason in line
    expected = "cuda" if avail["cuda"][0] else "cpu"
    assert f"auto resolves to: {expected}" in out
    assert rg.__version__ in out


def test_info_auto_honours_env(runner, monkeypatch):
    monkeypatch.setenv("RESIDUAL_GPU_BACKEND", "cpu")
    result = runner.invoke(main, ["info"])
    assert result.exit_code == 0
    assert "auto resolves to: cpu" in result.output


def test_version_and_help(runner):
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and rg.__version__ in result.output
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for cmd in ("info", "knn", "bench"):
        assert cmd in result.output


# --------------------------------------------------------------------------------------
# knn
# --------------------------------------------------------------------------------------


def test_knn_npy_matches_residual_knn(runner, npy_file, coords, tmp_path):
    out = tmp_path / "out.npz"
    idx, dist, text = run_knn(runner, npy_file, out)
    ref_idx, ref_dist = rg.residual_knn(coords, 5, rg.Matern52(0.3), inducing=20, backend="cpu")
    assert idx.shape == (N, 5) and idx.dtype == np.int64 and dist.dtype == np.float64
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dist, ref_dist)
    assert str(out) in text and "backend=cpu" in text


def test_knn_csv_matches_residual_knn(runner, csv_file, coords, tmp_path):
    out = tmp_path / "out_csv.npz"
    idx, dist, _ = run_knn(runner, csv_file, out)
    ref_idx, ref_dist = rg.residual_knn(coords, 5, rg.Matern52(0.3), inducing=20, backend="cpu")
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dist, ref_dist)


def test_knn_predecessor(runner, npy_file, coords, tmp_path):
    out = tmp_path / "pred.npz"
    idx, dist, _ = run_knn(runner, npy_file, out, "--predecessor")
    ref_idx, ref_dist = rg.residual_knn(coords, 5, rg.Matern52(0.3), inducing=20, predecessor=True, backend="cpu")
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dist, ref_dist)
    # predecessor structure: row i only has j < i, padded with -1 / inf
    rows = np.arange(N)[:, None]
    assert np.all((idx < rows) | (idx == -1))
    np.testing.assert_array_equal(idx[0], [-1] * 5)
    assert np.all(np.isinf(dist[idx == -1]))


def test_knn_ard_lengthscale(runner, npy_file, coords, tmp_path):
    out = tmp_path / "ard.npz"
    args = ["knn", str(npy_file), "-o", str(out), "-k", "5", "--inducing", "20", "--lengthscale", "0.2,0.4",
            "--no-progress", "--backend", "cpu"]
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with np.load(out) as data:
        idx, dist = data["indices"], data["distances"]
    ref_idx, ref_dist = rg.residual_knn(coords, 5, rg.Matern52([0.2, 0.4]), inducing=20, backend="cpu")
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dist, ref_dist)
    # and it is not the isotropic answer
    iso_idx, _ = rg.residual_knn(coords, 5, rg.Matern52(0.2), inducing=20, backend="cpu")
    assert not np.array_equal(idx, iso_idx)


def test_knn_kernel_variance_seed_options(runner, npy_file, coords, tmp_path):
    out = tmp_path / "opts.npz"
    idx, dist, _ = run_knn(runner, npy_file, out, "--kernel", "rbf", "--variance", "2.5", "--seed", "3")
    ref_idx, ref_dist = rg.residual_knn(coords, 5, rg.RBF(0.3, 2.5), inducing=20, seed=3, backend="cpu")
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dist, ref_dist)


def test_knn_query_coords(runner, npy_file, coords, tmp_path):
    xq = np.random.default_rng(9).random((7, 2))
    qpath = tmp_path / "q.npy"
    np.save(qpath, xq)
    out = tmp_path / "q.npz"
    idx, dist, _ = run_knn(runner, npy_file, out, "--query-coords", str(qpath))
    problem = rg.ResidualProblem(coords, kernel=rg.Matern52(0.3), inducing=20)
    res = rg.ResidualIndex(problem, backend="cpu").query(5, query_coords=xq)
    np.testing.assert_array_equal(idx, res.indices)
    np.testing.assert_array_equal(dist, res.distances)


def test_knn_missing_file(runner, tmp_path):
    missing = tmp_path / "nope.npy"
    result = runner.invoke(main, ["knn", str(missing), "-o", str(tmp_path / "o.npz")])
    assert result.exit_code != 0
    assert "no such file" in result.output and "nope.npy" in result.output
    assert not (tmp_path / "o.npz").exists()


def test_knn_unsupported_extension(runner, tmp_path):
    path = tmp_path / "coords.parquet"
    path.write_text("x")
    result = runner.invoke(main, ["knn", str(path), "-o", str(tmp_path / "o.npz")])
    assert result.exit_code != 0
    assert "coords.parquet" in result.output


def test_knn_bad_kernel_name(runner, npy_file, tmp_path):
    result = runner.invoke(main, ["knn", str(npy_file), "-o", str(tmp_path / "o.npz"), "--kernel", "cosine",
                                  "--inducing", "20"])
    assert result.exit_code != 0
    assert "cosine" in result.output and "--kernel" in result.output
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("extra,needle", [
    (["-k", "0"], "k=0"),
    (["-k", str(N)], f"k={N}"),
    (["--inducing", str(N + 1)], f"inducing={N + 1}"),
    (["--lengthscale", "-0.3"], "lengthscale"),
    (["--lengthscale", "0.2,0.4,0.5"], "lengthscale"),
    (["--variance", "0"], "variance"),
    (["--backend", "gpu9"], "backend='gpu9'"),
])
def test_knn_library_errors_are_clean_messages(runner, npy_file, tmp_path, extra, needle):
    args = ["knn", str(npy_file), "-o", str(tmp_path / "o.npz"), "-k", "5", "--inducing", "20", "--no-progress",
            *extra]
    result = runner.invoke(main, args)
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # a click error, not a traceback
    assert "Error" in result.output and needle in result.output
    assert not (tmp_path / "o.npz").exists()


def test_knn_non_numeric_lengthscale_is_a_usage_error(runner, npy_file, tmp_path):
    result = runner.invoke(main, ["knn", str(npy_file), "-o", str(tmp_path / "o.npz"), "--lengthscale", "abc"])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)
    assert "lengthscale" in result.output


# --------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------


def test_bench_smoke_json(runner):
    result = runner.invoke(main, ["bench", "--suite", "smoke", "--n", "300", "--repeats", "1", "--json",
                                  "--backend", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["suite"] == "smoke"
    assert data["n"] == 300
    assert isinstance(data["rows"], list) and data["rows"]
    for row in data["rows"]:
        for key in ("method", "backend", "gflops", "gemm_gflops", "distance_evaluations"):
            assert key in row, key
        assert row["method"] == "brute" and row["backend"] == "cpu"
        assert row["gflops"] > 0 and row["gemm_gflops"] > 0
        assert isinstance(row["distance_evaluations"], int) and row["distance_evaluations"] > 0
        # smoke runs in predecessor mode: at most n(n-1)/2 admissible pairs per pass
        assert row["predecessor"] is True
    assert data["k"] == 10


def test_bench_both_precisions_with_their_yardsticks(runner):
    result = runner.invoke(main, ["bench", "--suite", "smoke", "--n", "300", "--repeats", "1", "--json", "--backend",
                                  "cpu", "--precision", "float64", "--precision", "float32"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["gemm_gflops"] > 0 and data["gemm_gflops_float32"] > 0 and data["gemm_repeats"] >= 3
    assert [r["precision"] for r in data["rows"]] == ["float64", "float32"]
    for row, key in zip(data["rows"], ("gemm_gflops", "gemm_gflops_float32")):
        assert row["gemm_gflops"] == data[key]  # each row against the GEMM of its own precision
    f64, f32 = data["rows"]
    assert f32["speedup_vs_brute"] == pytest.approx(f64["total_seconds"] / f32["total_seconds"])
    table = runner.invoke(main, ["bench", "--suite", "smoke", "--n", "300", "--repeats", "1", "--backend", "cpu",
                                 "--precision", "auto"])
    assert table.exit_code == 0 and "GEMM yardstick" in table.output and "float32" in table.output
    assert "precision auto" in table.output
    bad = runner.invoke(main, ["bench", "--suite", "smoke", "--precision", "half"])
    assert bad.exit_code != 0 and "half" in bad.output


def test_bench_table_and_bad_suite(runner):
    result = runner.invoke(main, ["bench", "--suite", "smoke", "--n", "120", "--repeats", "1", "--backend", "cpu"])
    assert result.exit_code == 0, result.output
    assert "suite=smoke" in result.output and "n=120" in result.output
    result = runner.invoke(main, ["bench", "--suite", "nosuch"])
    assert result.exit_code != 0 and "nosuch" in result.output
    result = runner.invoke(main, ["bench", "--suite", "smoke", "--n", "1", "--repeats", "1"])
    assert result.exit_code != 0 and "n=1" in result.output


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("repeats", ["0", "-1"])
def test_bench_rejects_non_positive_repeats(runner, repeats):
    result = runner.invoke(main, ["bench", "--suite", "smoke", "--n", "60", "--repeats", repeats, "--backend", "cpu"])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "repeats" in result.output


def test_info_survives_a_bad_env_var(runner, monkeypatch):
    monkeypatch.setenv("RESIDUAL_GPU_BACKEND", "tpu")
    result = runner.invoke(main, ["info"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "tpu" in result.output


def test_knn_writes_exactly_the_output_path(runner, npy_file, tmp_path):
    out = tmp_path / "neighbours.dat"
    result = runner.invoke(main, ["knn", str(npy_file), "-o", str(out), "-k", "3", "--inducing", "10",
                                  "--no-progress", "--backend", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert out.exists()
