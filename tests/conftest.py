from __future__ import annotations

import ast
import asyncio
import functools
import os
import sys
import threading
import time

# Before distributed.utils_test: its helpers reset dask's config to what it held
# when it was imported, so jobqueue's defaults must be there by then.
import dask_jobqueue  # noqa: F401
import numpy as np
import pytest
from distributed.utils import open_port
from distributed.utils_test import cleanup, loop, loop_in_thread  # noqa: F401
from zarr.core.sync import sync

if (3, 11) <= sys.version_info < (3, 11, 8) or (3, 12) <= sys.version_info < (3, 12, 2):
    # CPython gh-106905: ast.parse's recursion-depth bookkeeping races between
    # threads ("SystemError: AST constructor recursion depth mismatch"); pytest's
    # assertion rewriting and hypothesis parse while our tests run threads.
    _ast_parse, _ast_lock = ast.parse, threading.RLock()

    def _locked_parse(*args, **kwargs):
        with _ast_lock:
            return _ast_parse(*args, **kwargs)

    ast.parse = _locked_parse


def _start_zarr_threads() -> None:
    """Start zarr's I/O loop and all its worker threads now.

    ``dask_ftps.recover``/``inspect`` run on zarr's own loop (a thread that lives
    as long as the process), whose default executor starts threads on demand:
    started inside a test, distributed's leak check would count them.
    """

    async def busy() -> None:
        n = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default
        await asyncio.gather(*(asyncio.to_thread(time.sleep, 0.05) for _ in range(n)))

    sync(busy())


_start_zarr_threads()


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits, scaled to [0, 1]: X_train, X_test, y_train, y_test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype(np.float32)
    return tuple(train_test_split(X, y, test_size=0.25, random_state=0, stratify=y))


@pytest.fixture
def digits_split():
    return digits()


async def same_as_offline(c, store) -> tuple[int, dict]:
    """The live server's model equals ``recover(store)``, bit for bit; return it."""
    import dask_ftps

    version, params = await dask_ftps.get_model(c)
    offline_version, offline = dask_ftps.recover(store)
    assert version == offline_version
    for name, value in params.items():
        np.testing.assert_array_equal(offline[name], value)
    return version, params


BUCKET = "ftps-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with an empty bucket: its storage options
    (skipped without moto and s3fs)."""
    pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    from dask_ftps._processes import Process

    port = open_port()
    args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    log = tmp_path_factory.mktemp("moto") / "moto.log"  # it logs every request
    with Process(args, log):
        options = {
            "endpoint_url": f"http://127.0.0.1:{port}",
            "key": "testing",
            "secret": "testing",
        }
        deadline = time.monotonic() + 60
        while True:
            try:
                s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield options
