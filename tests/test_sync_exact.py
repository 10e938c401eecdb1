"""Sync mode is reproducible with a store: the journal changes no bit.

In sync mode a shard's pull for a round waits until the version that closed the
round before it is published, and with a store a version is published only once
it is durable. A pull served before that (the model of the round before) would
make runs with a store differ from each other and from a memory-only run. Each
store is also recovered bit for bit.
"""

from __future__ import annotations

import numpy as np
from distributed.utils_test import gen_cluster

import dask_ftps
from dask_ftps import SGD, ParameterServer
from dask_ftps.models import MLP

from .conftest import digits, same_as_offline

MODEL = MLP(n_features=64, hidden=(16,), n_classes=10, seed=0)


@gen_cluster(client=True, timeout=240, nthreads=[("127.0.0.1", 1)] * 3)
async def test_sync_runs_with_and_without_a_store_are_bit_identical(
    c, s, a, b, w, tmp_path
):
    X, _, y, _ = digits()
    stores = [None, *(str(tmp_path / f"run{k}.zarr") for k in range(3))]
    results = []
    for k, store in enumerate(stores):
        # A durable store makes each commit slow: a pull served before the round
        # before it is durable would see the older model.
        await c.register_plugin(
            ParameterServer(
                store, model=MODEL, optimizer=SGD(lr=0.1, momentum=0.9), mode="sync",
                durable=store is not None and k % 2 == 1,
            )
        )  # fmt: skip
        result = await dask_ftps.train(
            c, X[:480], y[:480], epochs=2, batch_size=20, seed=0, n_shards=3,
            progress=False,
        )  # fmt: skip
        assert result.minibatches == 2 * 3 * 8
        version, params = await dask_ftps.get_model(c)
        assert version == 2 * 8  # one version per round
        if store is not None:
            await same_as_offline(c, store)
        results.append(params)
    for k, params in enumerate(results[1:], 1):
        for name, value in results[0].items():
            np.testing.assert_array_equal(params[name], value, err_msg=f"run {k}")
