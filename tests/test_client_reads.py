"""The client's reads of the server (status, model, records, model spec) survive one stale
pooled connection: after a scheduler restarted on the same address, the
client's connection pool may hand out a connection to the dead one."""

from __future__ import annotations

import asyncio

import pytest
from distributed.comm import CommClosedError

from dask_ftps._client import _get_model, _records, _status, model_spec


class _Scheduler:
    def __init__(self, closed: int) -> None:
        self.closed, self.calls = closed, 0

    async def _answer(self, **reply):
        self.calls += 1
        if self.calls <= self.closed:
            raise CommClosedError("in <TCP (closed) ConnectionPool>: Stream is closed")
        return {"status": "OK", **reply}

    async def ftps_status(self):
        return await self._answer(version=3)

    async def ftps_get_model(self):
        return await self._answer(version=3, params={})

    async def ftps_records(self):
        return await self._answer(**{"global": [], "download": []})

    async def ftps_model_spec(self):
        return await self._answer(server_id="s", model="the model")


class _Client:
    def __init__(self, closed: int) -> None:
        self.scheduler = _Scheduler(closed)


@pytest.mark.parametrize("read", [_status, _get_model, _records, model_spec])
def test_a_read_is_asked_again_once_on_a_closed_connection(read):
    client = _Client(closed=1)
    assert asyncio.run(read(client))
    assert client.scheduler.calls == 2
    client = _Client(closed=2)  # a scheduler that is gone: said so
    with pytest.raises(CommClosedError):
        asyncio.run(read(client))
    assert client.scheduler.calls == 2
