"""residual_gpu.distributed on a LocalCluster (2 worker processes, 1 thread each): the same bits as
the single process, a killed worker, bad input. The cluster starts once for the module."""

from __future__ import annotations

import operator
import os
import signal
import threading

import numpy as np
import pytest

import residual_gpu as rg

distributed = pytest.importorskip("distributed")
import residual_gpu.distributed as rgd

#: every cluster call of a test must finish within this many seconds (a hang fails, not blocks)
TIMEOUT = 300


@pytest.fixture(scope="module")
def client():
    # set_as_default=False: client=None must find no default client (test_no_client)
    with (distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
          distributed.Client(cluster, set_as_default=False, timeout="60s") as cl):
        yield cl


def bounded(fn, *args, **kw):
    """fn(*args, **kw) or a failure after TIMEOUT seconds (a daemon thread: a hang fails the
    test and does not keep the process alive)."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 (re-raised in the test's thread)
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    if thread.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not finish within {TIMEOUT} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


def assert_same(res, want):
    np.testing.assert_array_equal(res.indices, want.indices)
    assert np.array_equal(res.distances, want.distances), "distances differ in their bits"


# the randomised corpus: (coords seed, n, d, kernel, inducing, shards, some shards far from a chunk)
CORPUS = [
    (0, 1500, 2, rg.Matern32(lengthscale=0.08), 30, 1, False),
    (1, 1500, 2, rg.Matern12(lengthscale=0.1, variance=2.0), 25, 2, False),
    (2, 1200, 3, rg.RBF(lengthscale=np.array([0.2, 0.4, 0.3])), 40, 7, False),  # long lengthscales: no pruning
    (3, 900, 1, rg.Matern52(lengthscale=0.05), "data", 7, True),  # inducing points among the data: tiny p
    (4, 2500, 2, rg.Matern32(lengthscale=0.03), 40, 7, True),
]


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: f"seed{c[0]}-P{c[5]}")
def test_equals_single_process(client, case):
    seed, n, d, kern, inducing, parts, far = case
    rng = np.random.default_rng(seed)
    x = rng.random((n, d))
    u = x[rng.choice(n, 20, replace=False)] if inducing == "data" else inducing
    prob = rg.ResidualProblem(x, kernel=kern, inducing=u, seed=seed)
    single = rg.ResidualIndex(prob, backend="cpu", method="brute")
    index = bounded(rgd.DistributedIndex, x, kern, u, client=client, shards=parts, seed=seed, backend="cpu",
                    chunk_size=256)
    assert index.shards == parts
    np.testing.assert_array_equal(index.inducing, prob.inducing)
    # new locations: a compact cluster (far shards hold none of its neighbours) and points
    # spread beyond the data box
    new = np.concatenate([0.1 * rng.random((60, d)), rng.uniform(-0.2, 1.2, (40, d))])
    queries = rng.integers(0, n, 300)  # with repeats
    for kw in ({"predecessor": True}, {"queries": queries}, {"queries": queries, "predecessor": True},
               {"query_coords": new}):
        res = bounded(index.query, 12, **kw)
        assert_same(res, single.query(12, **kw))
    if far:
        tel = bounded(index.query, 12, query_coords=new).telemetry
        assert sum(tel.pruned) > 0, "some shard of some chunk is pruned"
        assert tel.pairs_searched > 0, "some other shard is searched"
    index.close()


def test_tree_shards_and_one_call(client):
    """Shards searched by the tree (leaf blocks, pruning inside the shard) and residual_knn's one
    call with kmeans++ inducing points give the single process's bits."""
    x = np.random.default_rng(11).random((5000, 2))
    kern = rg.Matern52(lengthscale=0.05)
    got = bounded(rgd.residual_knn, x, 10, kern, inducing=40, predecessor=True, client=client, shards=3,
                  method="tree")
    want = rg.residual_knn(x, 10, kern, inducing=40, predecessor=True, method="tree")
    np.testing.assert_array_equal(got[0], want[0])
    assert np.array_equal(got[1], want[1])


def test_dask_array_in_lazy_result_out_and_the_default_inducing_count(client):
    """coords as a dask array, results as dask arrays (compute=False) in query order, and
    inducing=None taking default_inducing(n) as the single process does: the same bits."""
    da = pytest.importorskip("dask.array")
    x = np.random.default_rng(6).random((1200, 2))
    kern = rg.Matern32(lengthscale=0.1)
    index = bounded(rgd.DistributedIndex, da.from_array(x, chunks=300), kern, 20, client=client, shards=3,
                    backend="cpu", chunk_size=200)
    single = rg.ResidualIndex(rg.ResidualProblem(x, kernel=kern, inducing=20), backend="cpu", method="brute")
    queries = np.random.default_rng(7).integers(0, 1200, 333)
    for kw in ({"predecessor": True}, {"queries": queries}):
        lazy = bounded(index.query, 9, compute=False, **kw)
        assert isinstance(lazy.indices, da.Array) and isinstance(lazy.distances, da.Array)
        idx, dist = bounded(lambda lazy=lazy: client.gather(client.compute([lazy.indices, lazy.distances])))
        want = single.query(9, **kw)
        np.testing.assert_array_equal(idx, want.indices)
        assert np.array_equal(dist, want.distances)
    index.close()
    small = x[:300]
    got = bounded(rgd.residual_knn, small, 5, kern, client=client, shards=2, backend="cpu")
    want = rg.residual_knn(small, 5, kern, backend="cpu", method="brute")
    np.testing.assert_array_equal(got[0], want[0])
    assert np.array_equal(got[1], want[1])


def test_inducing_sample_is_kmeanspp_on_the_sample(client):
    x = np.random.default_rng(5).random((800, 2))
    kern = rg.RBF(lengthscale=0.2)
    index = bounded(rgd.DistributedIndex, x, kern, 15, client=client, inducing_sample=300, seed=4)
    sample = x[np.sort(np.random.default_rng(4).choice(800, 300, replace=False))]
    np.testing.assert_array_equal(index.inducing, rg.ResidualProblem(sample, kernel=kern, inducing=15, seed=4).inducing)
    index.close()


def test_polling_never_cancels_a_gather(client, monkeypatch):
    """The engine checks its workers every LOST_WORKER_POLL_S while it waits for a chunk; at a
    poll of 1 ms many waits end just as their task finishes. A gather cancelled then (as
    fut.result(timeout=...) did) poisoned the client's shared pending gather, and every later
    gather of that client failed with an UnboundLocalError (CI, 2026-12-07): here the queries
    still give the single process's bits and the client stays usable."""
    monkeypatch.setattr(rgd.engine, "LOST_WORKER_POLL_S", 1e-3)
    x = np.random.default_rng(12).random((3000, 2))
    kern = rg.Matern32(lengthscale=0.05)
    want = rg.ResidualIndex(rg.ResidualProblem(x, kernel=kern, inducing=30, seed=0), backend="cpu",
                            method="brute").query(8, predecessor=True)
    index = bounded(rgd.DistributedIndex, x, kern, 30, client=client, shards=4, backend="cpu", method="brute",
                    chunk_size=100)
    for _ in range(3):
        assert_same(bounded(index.query, 8, predecessor=True), want)
    index.close()
    assert bounded(client.submit(operator.add, 1, 2, pure=False).result, timeout=TIMEOUT) == 3


def test_killed_worker_gives_the_same_answer(client):
    """A worker killed (SIGKILL) after the first chunk of a query came back, the others in flight:
    Dask rebuilds its shards and reruns its tasks (all pure), and the answer is the single
    process's, bit for bit; the index stays usable."""
    x = np.random.default_rng(8).random((4000, 2))
    kern = rg.Matern32(lengthscale=0.05)
    prob = rg.ResidualProblem(x, kernel=kern, inducing=30, seed=0)
    want = rg.ResidualIndex(prob, backend="cpu", method="brute").query(8, predecessor=True)
    index = bounded(rgd.DistributedIndex, x, kern, 30, client=client, shards=4, backend="cpu", method="brute",
                    chunk_size=100)
    victim = min(client.who_has(index._futures[0])[index._futures[0].key])
    pid = client.run(os.getpid, workers=[victim])[victim]
    collect = index._collect
    killed = []

    def collect_then_kill(*args):
        collect(*args)
        if not killed:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    index._collect = collect_then_kill
    res = bounded(index.query, 8, predecessor=True)
    assert killed and res.telemetry.chunks > 1 and res.telemetry.reruns >= 1
    assert victim not in client.scheduler_info()["workers"], "the victim is gone (the nanny starts a new worker)"
    assert_same(res, want)
    client.wait_for_workers(2, timeout=TIMEOUT)
    assert_same(bounded(index.query, 8, predecessor=True), want)
    index.close()


def test_other_backends_on_the_workers(client):
    """backend= reaches every shard's problem build and search: JAX (on the CPU here) gives the
    single process's bits, as the cpu backend does."""
    usable, reason = rg.available_backends()["jax"]
    if not usable:
        pytest.skip(f"backend 'jax' unavailable: {reason}")
    x = np.random.default_rng(5).random((900, 2))
    kern = rg.Matern52(lengthscale=0.1)
    want = rg.ResidualIndex(rg.ResidualProblem(x, kernel=kern, inducing=20, seed=0), backend="cpu",
                            method="brute").query(7, predecessor=True)
    index = bounded(rgd.DistributedIndex, x, kern, 20, client=client, shards=3, backend="jax", method="brute")
    backends = client.gather([client.submit(lambda s: s.index.backend, f, pure=False) for f in index._futures])
    assert backends == ["jax"] * 3
    assert_same(bounded(index.query, 7, predecessor=True), want)
    index.close()


def test_bad_input(client):
    x = np.random.default_rng(0).random((50, 2))
    x_copy = x.copy()
    kern = rg.Matern32(lengthscale=0.3)
    with pytest.raises(rg.InvalidArgumentError, match=r"client= is required.*got client=None"):
        rgd.DistributedIndex(x, kern, 5)
    with pytest.raises(rg.InvalidTypeError, match=r"client must be a dask.distributed.Client, got client='tcp://x:1'"):
        rgd.residual_knn(x, 3, kern, 5, client="tcp://x:1")
    with pytest.raises(rg.InvalidArgumentError, match=r"inducing must have 2 column\(s\), got inducing.shape=\(5, 3\)"):
        rgd.DistributedIndex(x, kern, np.zeros((5, 3)), client=client)
    with pytest.raises(rg.InvalidArgumentError, match=r"not positive definite with jitter=0.0"):
        rgd.DistributedIndex(x, kern, np.zeros((5, 2)), client=client, jitter=0.0)
    with pytest.raises(rg.InvalidArgumentError, match=r"inducing must be in \[1, 50\], got inducing=51"):
        rgd.DistributedIndex(x, kern, 51, client=client)
    with pytest.raises(rg.InvalidArgumentError, match=r"shards must be in \[1, 50\] \(every shard needs at least one "
                                                      r"point\), got shards=51"):
        rgd.DistributedIndex(x, kern, 5, client=client, shards=51)
    with pytest.raises(rg.InvalidArgumentError, match=r"shards must be in \[1, inf\], got shards=0"):
        rgd.DistributedIndex(x, kern, 5, client=client, shards=0)
    with pytest.raises(rg.InvalidArgumentError, match=r"inducing_sample needs an int inducing"):
        rgd.DistributedIndex(x, kern, x[:5], client=client, inducing_sample=20)
    index = bounded(rgd.DistributedIndex, x, kern, 5, client=client, shards=3)
    with pytest.raises(rg.InvalidArgumentError, match=r"k must be in \[1, 49\], got k=50"):
        index.query(50)
    with pytest.raises(rg.InvalidArgumentError, match=r"queries must be in \[0, 50\), got queries\[1\]=50"):
        index.query(3, queries=[0, 50])
    with pytest.raises(rg.InvalidArgumentError, match=r"predecessor=True needs dataset queries"):
        index.query(3, query_coords=x[:2], predecessor=True)
    with pytest.raises(rg.InvalidArgumentError, match=r"query_coords must have 2 column\(s\)"):
        index.query(3, query_coords=np.zeros((2, 3)))
    with pytest.raises(rg.InvalidTypeError, match=r"predecessor must be a bool, got predecessor=1"):
        index.query(3, predecessor=1)
    # k = n - 1 with shards of ~17 points: every row is complete and equals the single process
    res = bounded(index.query, 49, queries=[0, 7])
    want = rg.ResidualIndex(rg.ResidualProblem(x, kernel=kern, inducing=5), backend="cpu").query(49, queries=[0, 7])
    assert_same(res, want)
    index.close()
    np.testing.assert_array_equal(x, x_copy)
