"""A run on S3: a real S3 server (moto's server mode) on 127.0.0.1, a real
scheduler SIGKILLed and restarted with the preload and storage options."""

from __future__ import annotations

import time

import numpy as np
import pytest
from distributed import Client
from distributed.utils import open_port

import dask_ftps
from dask_ftps import SGD, ParameterServer

from .conftest import BUCKET
from .test_scheduler_loss import (
    MODEL,
    expected_ids,
    kill_after,
    scheduler,
    train,
    train_until_killed,
    wait_for_workers,
    workers,
)

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


def test_an_s3_url_or_store_object_holds_the_run_across_a_scheduler_kill(s3):
    from zarr.storage import FsspecStore

    url = f"s3://{BUCKET}/run-{time.time_ns()}.zarr"
    store_object = FsspecStore.from_url(url, storage_options=s3)
    port = open_port()
    address = f"tcp://127.0.0.1:{port}"
    total = len(expected_ids())
    with (
        scheduler(port, url, storage_options=s3) as first,  # no run yet: no server
        workers(address),
        Client(address, timeout="60s") as client,
    ):
        wait_for_workers(client, 2)
        client.register_plugin(  # a Zarr store object, pickled to the scheduler
            ParameterServer(
                store_object, model=MODEL, optimizer=SGD(lr=0.05, momentum=0.5),
                snapshot_every=40,
            )
        )  # fmt: skip
        assert dask_ftps.status(client)["store"] == url

        kill_after(client, first, total // 3)
        train_until_killed(client, first)
        for _ in range(3):  # any number of times in one process
            before = dask_ftps.inspect(url, storage_options=s3)
        assert 0 < before["updates"] < total
        assert dask_ftps.inspect(store_object)["updates"] == before["updates"]

        with scheduler(port, url, storage_options=s3), workers(address):
            wait_for_workers(client, 2)
            status = dask_ftps.status(client)
            assert status["incarnation"] == 2
            assert (status["version"], status["updates"]) == (
                before["version"], before["updates"],
            )  # fmt: skip
            result = train(client)
            assert result.version == total
            version, params = dask_ftps.get_model(client)
            for _ in range(2):
                offline_version, offline = dask_ftps.recover(url, storage_options=s3)
            assert version == offline_version == total
            for name, value in params.items():
                np.testing.assert_array_equal(offline[name], value)


def test_an_s3_url_without_a_run_is_a_clear_error(s3):
    with pytest.raises(dask_ftps.StoreFormatError, match="holds no committed"):
        dask_ftps.recover(f"s3://{BUCKET}/nothing.zarr", storage_options=s3)
    with pytest.raises(TypeError, match="storage_options must be a dict"):
        dask_ftps.inspect(f"s3://{BUCKET}/nothing.zarr", storage_options="x")
