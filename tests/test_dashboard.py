"""The ``/ftps`` dashboard page, its JSON view and the Prometheus metrics."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from collections.abc import Awaitable, Callable

import pytest
from distributed.utils_test import gen_cluster
from tornado.httpclient import AsyncHTTPClient

import dask_ftps
from dask_ftps import SGD, ParameterServer
from dask_ftps._core import check_reply
from dask_ftps._dashboard import NO_SERVER, FTPSPage, Sample, _rules
from dask_ftps.models import SoftmaxRegression

from .conftest import digits
from .test_plugin import MODEL, SPEC, holder_of, push

#: The module to list in ``distributed.scheduler.http.routes``.
ROUTES = "dask_ftps._dashboard"


async def fetch(port: int, path: str) -> tuple[int, str, str]:
    """``(code, content type, body)`` of a GET on the scheduler's HTTP server."""
    response = await AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}/{path.lstrip('/')}", raise_error=False
    )
    return (
        response.code,
        response.headers.get("Content-Type", ""),
        response.body.decode(),
    )


async def view(port: int, prefix: str = "/") -> dict:
    code, kind, body = await fetch(port, prefix + "ftps/status.json")
    assert code == 200, body
    assert kind.startswith("application/json")
    return json.loads(body)


async def metrics(port: int) -> dict[str, list]:
    """The ``dask_ftps_*`` samples of ``/metrics``: ``{name: [(labels, value)]}``."""
    from prometheus_client.parser import text_string_to_metric_families

    code, _, body = await fetch(port, "/metrics")
    assert code == 200
    out: dict[str, list] = {}
    families = [
        f
        for f in text_string_to_metric_families(body)
        if f.name.startswith("dask_ftps")
    ]
    names = [f.name for f in families]
    assert len(names) == len(set(names)), names  # one collector
    for family in families:
        for sample in family.samples:
            if sample.name.startswith("dask_ftps"):
                out.setdefault(sample.name, []).append((sample.labels, sample.value))
    assert "dask_scheduler_workers" in body  # distributed's own metrics are there too
    return out


def page_routes(s) -> int:
    return sum(
        1
        for target, _ in _rules(s.http_application)
        if isinstance(target, type) and issubclass(target, FTPSPage)
    )


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.2)


@gen_cluster(client=True, timeout=240)
async def test_status_json_and_metrics_follow_training(c, s, a, b, tmp_path):
    """While train() runs, the JSON view and /metrics move; a server registered
    again shows its recovery without a second route or collector; after close()
    the page answers "no parameter server"."""
    store = str(tmp_path / "run.zarr")
    port = s.http_server.port
    X_train, _, y_train, _ = digits()
    await c.register_plugin(
        ParameterServer(
            store,
            model=SoftmaxRegression(64, 10),
            optimizer=SGD(lr=0.1),
            snapshot_every=25,
        )
    )
    assert page_routes(s) == 1
    code, kind, body = await fetch(port, "/ftps")
    assert code == 200 and kind.startswith("text/html") and "ftps/status.json" in body
    code, _, sitemap = await fetch(port, "/sitemap.json")
    assert "/ftps" in json.loads(sitemap)["paths"]

    enough = threading.Event()  # set once the test saw what it needs: train() stops
    training = asyncio.ensure_future(
        dask_ftps.train(
            c,
            X_train,
            y_train,
            epochs=1000,
            batch_size=16,
            progress=False,
            callbacks=[lambda epoch, record: enough.is_set()],
        )
    )
    versions: list[int] = []
    rates: list[float] = []
    scraped: list[float] = []

    async def moving() -> bool:
        assert not training.done(), training.result()  # still training
        v = await view(port)
        assert v["status"] == "OK"
        if v["version"] > (versions[-1] if versions else 0):
            versions.append(v["version"])
        if v["updates_per_second"]:
            rates.append(v["updates_per_second"])
        m = await metrics(port)
        if m and m["dask_ftps_version"][0][1] > (scraped[-1] if scraped else 0):
            scraped.append(m["dask_ftps_version"][0][1])
        return (
            len(versions) >= 3
            and len(scraped) >= 3
            and bool(rates)
            and all(sh["staleness"] is not None for sh in v["shards"])
        )

    await wait_until(moving, timeout=120)
    v = await view(port)
    m = await metrics(port)
    enough.set()
    result = await training
    assert result.stopped_early

    assert v["mode"] == "async" and v["incarnation"] == 1 and v["store"]
    assert v["model"] == "SoftmaxRegression"
    assert len(v["shards"]) == result.n_shards == 3  # a thread each
    for shard in v["shards"]:
        assert 0 <= shard["staleness"] <= v["version"]
        assert shard["lag"] >= 0
    assert v["journal"]["records"] > 0 and v["journal"]["bytes"] > 0
    assert v["recovery"] is None  # a new store: nothing to recover
    actions = [e["action"] for e in v["events"]]  # the newest, newest first
    assert "snapshot" in actions and set(actions) <= {"run-started", "snapshot"}
    times = [e["time"] for e in v["events"]]
    assert times == sorted(times, reverse=True)
    assert len(v["history"]) >= 2
    assert {labels["shard"] for labels, _ in m["dask_ftps_shard_lag"]} == {
        "0",
        "1",
        "2",
    }
    assert m["dask_ftps_updates_total"][0][1] > 0
    assert m["dask_ftps_incarnation"][0][1] == 1
    assert m["dask_ftps_journal_records"][0][1] > 0
    (info,) = m["dask_ftps_info"]
    assert info[0]["mode"] == "async"

    # A server registered again rebuilds from the store: the same page shows it.
    await c.register_plugin(ParameterServer(store))
    assert page_routes(s) == 1
    v = await view(port)
    assert v["incarnation"] == 2
    assert v["version"] == result.version
    recovery = v["recovery"]
    assert recovery["source"] in {"snapshot", a.address, b.address}
    # async: one version per update, from the start version on
    assert recovery["start_version"] + recovery["replayed"] == result.version
    assert recovery["seconds"] >= 0
    assert v["events"][0]["action"] == "recovered"
    m = await metrics(port)
    assert m["dask_ftps_incarnation"][0][1] == 2
    assert m["dask_ftps_version"][0][1] == result.version
    assert "dask_ftps_recovery_seconds" in m

    await s.plugins["ftps"].close()
    assert await view(port) == {"status": NO_SERVER}
    code, _, body = await fetch(port, "/ftps")
    assert code == 200 and "<h1>Parameter server</h1>" in body
    assert await metrics(port) == {}
    assert dask_ftps._metrics._COLLECTOR is None  # unregistered


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_staleness_lag_and_rate_as_defined(c, s, a):
    """Staleness is the version minus the version the shard's last update took
    part in; lag, the steps behind the fastest shard."""
    port = s.http_server.port
    await c.register_plugin(ParameterServer(model=MODEL, mode="async"))
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")  # 2 shards
    v = await view(port)
    assert v["version"] == 0 and v["updates"] == 0 and v["journal"] is None
    assert [(sh["staleness"], sh["lag"]) for sh in v["shards"]] == [(None, 0)] * 2
    await push(c, "0:0:0:0")  # version 1
    await push(c, "0:0:1:0")  # version 2
    await push(c, "0:0:0:1")  # version 3: shard 0 is done with its epoch
    v = await view(port)
    assert v["version"] == 3 and v["updates"] == 3
    assert [(sh["staleness"], sh["lag"]) for sh in v["shards"]] == [(0, 0), (1, 1)]
    assert [(sh["epoch"], sh["step"]) for sh in v["shards"]] == [(1, 0), (0, 1)]
    m = await metrics(port)
    assert sorted(
        (lab["shard"], val) for lab, val in m["dask_ftps_shard_staleness"]
    ) == [
        ("0", 0.0),
        ("1", 1.0),
    ]
    assert m["dask_ftps_updates_total"] == [({}, 3.0)]
    tracker = s.plugins["ftps"]._tracker

    async def rated() -> bool:
        await tracker.refresh()
        return tracker.rate() is not None

    await wait_until(rated, timeout=10)
    assert tracker.rate() >= 0
    # Samples are the rate's basis: three updates between two samples one
    # second apart are three per second.
    tracker.samples.clear()
    tracker.samples.extend(
        [
            Sample(100.0, 3, 3),
            Sample(101.0, 6, 6),
        ]
    )
    assert tracker.rate() == pytest.approx(3.0)


@gen_cluster(
    client=True,
    nthreads=[("127.0.0.1", 1)],
    config={
        "distributed.scheduler.http.routes": [
            "distributed.http.scheduler.prometheus",
            "distributed.http.health",
            ROUTES,
        ]
    },
    scheduler_kwargs={"http_prefix": "/dask"},
)
async def test_routes_listed_in_config_under_a_prefix(c, s, a):
    """Listed in distributed.scheduler.http.routes, the page is there from the
    scheduler's start (under its prefix); a server adds no second route, and a
    server registered again (memory only) is shown in place of the first."""
    port = s.http_server.port
    assert page_routes(s) == 1
    assert await view(port, "/dask/") == {"status": NO_SERVER}
    await c.register_plugin(ParameterServer(model=MODEL))
    check_reply(await c.scheduler.ftps_begin_run(spec=SPEC), "begin")
    await push(c, "0:0:0:0")
    assert (await view(port, "/dask/"))["version"] == 1
    # The pushes' call holds the run: it ends before a fresh server may replace it.
    server_id = (await dask_ftps.status(c))["server_id"]
    check_reply(
        await c.scheduler.ftps_end_run(server_id=server_id, run=0, holder=holder_of(c)),
        "end",
    )
    await c.register_plugin(ParameterServer(model=MODEL))  # a fresh one: version 0
    assert page_routes(s) == 1
    v = await view(port, "/dask/")
    assert (v["version"], v["shards"], v["store"]) == (0, [], None)
    plugin = s.plugins["ftps"]
    await c.unregister_scheduler_plugin("ftps")  # not closed, but not the server
    assert await view(port, "/dask/") == {"status": NO_SERVER}
    await plugin.close()
    code, _, _ = await fetch(port, "/ftps")
    assert code == 404  # only under the prefix


# -- a real browser -------------------------------------------------------------------


def _require(what: str, found: object) -> None:
    """Skip without ``what``, unless on CI (which installs it): fail there."""
    if found:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing (CI installs it)")
    pytest.skip(f"{what} is missing")


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _chromium() -> Callable[[], object]:
    """What starts a headless Chromium driven by Selenium (skipped without one,
    off CI); Selenium Manager is never asked: the driver's path is given."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    _require("selenium", webdriver)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    _require("chromium", chromium)
    chromedriver = shutil.which("chromedriver")
    _require("chromedriver", chromedriver)
    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)

    def start():
        return webdriver.Chrome(
            service=Service(executable_path=chromedriver), options=options
        )

    return start


#: A run name that is markup: the page must show it as text, never parse it.
HOSTILE = "<img src=x onerror=document.title='pwned'><b id=injected>bold</b>"


@pytest.mark.slow
def test_a_hostile_run_name_is_text_in_a_headless_browser(loop):
    """Chromium shows a run name made of markup as its literal text, in the run
    line (set by the page's ``text()``) and in the events table (its ``row()``):
    no element is made of it, no handler of it runs."""
    start_browser = _chromium()
    from distributed import Client, LocalCluster
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    X_train, _, y_train, _ = digits()
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            dashboard_address="127.0.0.1:0",
            loop=loop,
        ) as cluster,
        Client(cluster, loop=loop) as client,
    ):
        client.register_plugin(
            ParameterServer(model=SoftmaxRegression(64, 10), optimizer=SGD(lr=0.1))
        )
        result = dask_ftps.train(
            client, X_train[:64], y_train[:64], epochs=1, batch_size=32,
            run_name=HOSTILE, progress=False,
        )  # fmt: skip
        url = f"http://127.0.0.1:{cluster.scheduler.http_server.port}/ftps"
        driver = start_browser()
        try:
            driver.get(url)
            wait = WebDriverWait(driver, 60, poll_frequency=0.25)

            def shown(element_id: str) -> str:
                return driver.find_element(By.ID, element_id).text

            # The page has drawn this run and its events (whatever it made of them).
            wait.until(lambda _: f"run {result.run} " in shown("run"))
            wait.until(lambda _: "run-started" in shown("events"))
            assert HOSTILE in shown("run"), shown("run")
            assert HOSTILE in shown("events"), shown("events")
            injected = driver.find_elements(By.CSS_SELECTOR, "img, #injected")
            assert injected == [], [e.get_attribute("outerHTML") for e in injected]
            assert driver.title != "pwned"
        finally:
            driver.quit()


@pytest.mark.slow
def test_page_in_a_headless_browser_follows_training(loop):
    """Chromium shows /ftps of a cluster of processes while train() runs: the
    version on the page moves; after close() it says "no parameter server"."""
    start_browser = _chromium()
    from distributed import Client, LocalCluster
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    X_train, _, y_train, _ = digits()
    enough = threading.Event()
    outcome: list = []

    def train(client: Client) -> None:
        try:
            outcome.append(
                dask_ftps.train(
                    client,
                    X_train,
                    y_train,
                    epochs=1000,
                    batch_size=16,
                    progress=False,
                    callbacks=[lambda epoch, record: enough.is_set()],
                )
            )
        except BaseException as e:  # noqa: BLE001 - reported by the test
            outcome.append(e)

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address="127.0.0.1:0",
            loop=loop,
        ) as cluster,
        Client(cluster, loop=loop) as client,
    ):
        client.register_plugin(
            ParameterServer(model=SoftmaxRegression(64, 10), optimizer=SGD(lr=0.1))
        )
        url = f"http://127.0.0.1:{cluster.scheduler.http_server.port}/ftps"
        trainer = threading.Thread(target=train, args=(client,), daemon=True)
        trainer.start()
        driver = None
        try:
            driver = start_browser()
            driver.get(url)
            wait = WebDriverWait(driver, 120, poll_frequency=0.25)

            def shown(element_id: str) -> str:
                return driver.find_element(By.ID, element_id).text

            first = wait.until(lambda _: _int(shown("version")) or None)  # above 0
            later = wait.until(
                lambda _: (v := _int(shown("version"))) is not None and v > first and v
            )
            assert not outcome, outcome  # train() was running all along
            assert later > first
            wait.until(lambda _: (_float(shown("rate")) or 0) > 0)
            rows = driver.find_elements(By.CSS_SELECTOR, "#shards tbody tr")
            assert len(rows) == 2
            assert shown("mode") == "async"
            assert shown("store") == "memory only"
            assert "run-started" in shown("events")
            enough.set()
            trainer.join(timeout=180)
            assert not trainer.is_alive()
            (result,) = outcome
            assert not isinstance(result, BaseException), result
            wait.until(lambda _: _int(shown("version")) == result.version)

            async def close(dask_scheduler) -> None:
                await dask_scheduler.plugins["ftps"].close()

            client.run_on_scheduler(close)
            wait.until(lambda _: shown("state") == NO_SERVER)
            assert shown("version") == ""
        finally:
            enough.set()
            if driver is not None:
                driver.quit()
            trainer.join(timeout=180)


# -- a sharded server ----------------------------------------------------------------

#: A worker that may serve shards (``ftps.shards.resource``).
SHARD_SERVER = {"resources": {"ftps-server": 1}}


def by_shard(samples: list) -> dict[str, float]:
    """``{shard label: value}`` of one metric's samples."""
    return {labels["shard"]: value for labels, value in samples}


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1, SHARD_SERVER)] * 3, timeout=240)
async def test_sharded_page_and_metrics_show_each_shard(c, s, a, b, w, tmp_path):
    """A sharded server's JSON view lists each shard server (host, version,
    incarnation, updates, updates/s, snapshots, last recovery) as
    ``dask_ftps.status`` says, with the version vector; /metrics labels the same
    values by shard; a shard whose worker left shows its recovery."""
    from dask_ftps.models import MLP

    port = s.http_server.port
    X_train, _, y_train, _ = digits()
    await c.register_plugin(
        ParameterServer(
            str(tmp_path / "run.zarr"),
            model=MLP(64, (32,), 10, seed=0),
            shards=2,
            snapshot_every=10,
        )
    )
    assert s.plugins["ftps"].coordinator is not None  # no server in the scheduler
    assert page_routes(s) == 1
    code, kind, body = await fetch(port, "/ftps")
    assert code == 200 and kind.startswith("text/html")
    assert '<table id="servers" hidden>' in body and "ftps/status.json" in body

    async def sampled() -> bool:
        v = await view(port)
        assert v["status"] == "OK" and v["sharded"] is True
        return v["versions"] == [0, 0]

    await wait_until(sampled, timeout=60)  # a sample before the run: the rate's base
    result = await dask_ftps.train(
        c, X_train, y_train, epochs=1, batch_size=32, n_shards=2, progress=False
    )
    assert result.version > 0

    async def agrees() -> tuple[dict, dict] | None:
        """The view, when it shows what ``status()`` says now (a sample is at
        most half a second old), with that status."""
        v = await view(port)
        st = await dask_ftps.status(c)
        servers = v["servers"]
        if [sh["version"] for sh in servers] != list(st["versions"]):
            return None
        for sh, expect in zip(servers, st["shards"], strict=True):
            assert sh["shard"] == expect["shard"]
            if (
                sh["address"],
                sh["incarnation"],
                sh["updates"],
                sh["snapshots"],
            ) != (
                expect["address"],
                expect["incarnation"],
                expect["updates"],
                len(expect["snapshots"]),
            ):
                return None
        return v, st

    seen: list = []

    async def check() -> bool:
        seen[:] = [await agrees()]
        return seen[0] is not None

    await wait_until(check, timeout=30)
    v, st = seen[0]
    assert v["version"] == st["version"] == result.version
    assert v["versions"] == list(st["versions"]) == [result.version] * 2
    assert v["updates"] == st["updates"]
    assert {sh["address"] for sh in v["servers"]} <= {a.address, b.address, w.address}
    assert len({sh["address"] for sh in v["servers"]}) == 2  # spread
    for sh in v["servers"]:
        assert sh["served"] and sh["lost_s"] is None
        assert sh["incarnation"] == 1 and sh["updates"] == result.version
        assert sh["snapshots"] >= 1  # snapshot_every=10
        assert sh["updates_per_second"] > 0  # the run is within the rate's window
        assert sh["recovery_s"] is None  # never lost
    assert v["updates_per_second"] > 0
    assert v["recoveries"] == [] and v["missed"] is None
    assert v["run"]["run"] == result.run and v["run"]["finished"]
    assert v["mode"] == "async" and v["model"] == "MLP"
    assert "shards" not in v and "journal" not in v  # the run's shards: not known
    assert v["events"] and all("shard" in e for e in v["events"])  # the shards'

    m = await metrics(port)
    assert m["dask_ftps_version"] == [({}, result.version)]
    assert m["dask_ftps_updates_total"] == [({}, st["updates"])]
    assert by_shard(m["dask_ftps_shard_version"]) == {
        str(k): version for k, version in enumerate(st["versions"])
    }
    assert by_shard(m["dask_ftps_shard_updates_total"]) == {
        str(sh["shard"]): sh["updates"] for sh in st["shards"]
    }
    assert by_shard(m["dask_ftps_shard_incarnation"]) == {"0": 1, "1": 1}
    assert by_shard(m["dask_ftps_shard_served"]) == {"0": 1, "1": 1}
    assert set(by_shard(m["dask_ftps_shard_updates_per_second"])) == {"0", "1"}
    assert "dask_ftps_shard_recovery_seconds" not in m  # no loss yet
    assert "dask_ftps_shard_lag" not in m and "dask_ftps_journal_bytes" not in m
    (info,) = m["dask_ftps_info"]
    assert info[0]["mode"] == "async" and info[0]["store"].endswith("run.zarr")

    # The worker serving shard 0 leaves: the shard is served again elsewhere.
    lost = st["shards"][0]["address"]
    await next(x for x in (a, b, w) if x.address == lost).close()

    async def recovered() -> bool:
        v = await view(port)
        sh = v["servers"][0]
        return sh["recovery_s"] is not None and sh["incarnation"] == 2

    await wait_until(recovered, timeout=120)
    await wait_until(check, timeout=30)
    v, st = seen[0]
    (event,) = st["recoveries"]  # the client's copy: tuples for lists
    assert event["shard"] == 0 and event["address"] != lost
    assert [sorted(e) for e in v["recoveries"]] == [sorted(event)]
    assert v["recoveries"][0]["since_lost_s"] == event["since_lost_s"]
    shard0, shard1 = v["servers"]
    assert shard0["address"] == event["address"] == st["shards"][0]["address"]
    assert shard0["recovery_s"] == event["since_lost_s"] > 0
    assert shard0["served"] and shard0["lost_s"] is None
    assert shard0["version"] == result.version  # rebuilt from its store
    rebuild = st["shards"][0]["recovery"]
    assert shard0["rebuild"]["replayed"] == rebuild["replayed"]
    assert shard0["rebuild"]["start_version"] == rebuild["start_version"]
    assert shard1["incarnation"] == 1 and shard1["recovery_s"] is None
    actions = [e["action"] for e in v["events"]]  # newest first
    assert actions.index("shard-served") < actions.index("shard-lost")
    m = await metrics(port)
    assert by_shard(m["dask_ftps_shard_recovery_seconds"]) == {
        "0": event["since_lost_s"]
    }
    assert by_shard(m["dask_ftps_shard_incarnation"]) == {"0": 2, "1": 1}
    assert by_shard(m["dask_ftps_shard_served"]) == {"0": 1, "1": 1}

    await s.plugins["ftps"].close()
    assert await view(port) == {"status": NO_SERVER}
    assert await metrics(port) == {}


class FakeCoordinator:
    """What :class:`~dask_ftps._dashboard.ShardsTracker` reads of a coordinator,
    with a ``status()`` that answers ``reply``: a dict, an exception to raise,
    or None (it never answers)."""

    def __init__(self) -> None:
        from dask_ftps.models import MLP

        self.shards = 2
        self.placement = {0: "tcp://a:1", 1: "tcp://b:1"}
        self.lost_at: dict[int, float] = {}
        self.recoveries: list[dict] = []
        self.model = MLP(64, (32,), 10)
        self.resource = "ftps-server"
        self.server_id = "f" * 32
        self.shard_spec = {"mode": "async", "staleness": 0, "store": "memory://x"}
        self.reply: object = None
        self.calls = 0
        self.closed = False

    async def status(self) -> dict:
        self.calls += 1
        if self.reply is None:
            await asyncio.sleep(3600)
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.reply

    def ok(self, versions: list[int]) -> dict:
        return {
            "status": "OK",
            "version": min(versions),
            "versions": versions,
            "updates": min(versions),
            "run": None,
            "failed": None,
            "shards": [
                {
                    "shard": k,
                    "address": self.placement.get(k),
                    "version": v,
                    "incarnation": 1,
                    "updates": v,
                    "snapshots": [0],
                    "store": f"memory://x/shards/{k}",
                    "recovery": None,
                    "params": 10,
                }
                for k, v in enumerate(versions)
            ],
        }


def test_a_missed_sample_of_a_sharded_server_is_no_failure(monkeypatch):
    """A shard not served, an error reply, an exception or no answer within
    STATUS_TIMEOUT: the sample is missed and the view says why (and which shard
    is lost), keeping the last sample; a shard's rate is its updates over time."""
    from distributed.core import error_message

    from dask_ftps import _dashboard
    from dask_ftps._exceptions import ShardUnavailable

    monkeypatch.setattr(_dashboard, "STATUS_TIMEOUT", 0.05)
    monkeypatch.setattr(_dashboard, "SAMPLE_INTERVAL", 0.0)  # every refresh asks
    coordinator = FakeCoordinator()
    tracker = _dashboard.ShardsTracker(coordinator)

    async def sample(reply: object) -> dict:
        coordinator.reply = reply
        await tracker.refresh()
        return tracker.view()

    async def go() -> None:
        # Shard 1 is not served: status() would wait for it, so it is not asked.
        del coordinator.placement[1]
        coordinator.lost_at[1] = time.monotonic() - 2.0
        v = await sample(coordinator.ok([1, 1]))
        assert coordinator.calls == 0
        assert v["missed"] == "shards [1] are not served"
        assert v["version"] is None and v["history"] == []
        assert [sh["served"] for sh in v["servers"]] == [True, False]
        assert v["servers"][1]["lost_s"] >= 2.0
        coordinator.placement[1] = "tcp://c:1"
        del coordinator.lost_at[1]
        v = await sample(coordinator.ok([3, 4]))
        assert v["missed"] is None and v["versions"] == [3, 4]
        assert [sh["address"] for sh in v["servers"]] == ["tcp://a:1", "tcp://c:1"]
        assert [sh["snapshots"] for sh in v["servers"]] == [1, 1]
        for reply, why in [
            (
                error_message(ShardUnavailable("shard 1: gone")),
                "ShardUnavailable('shard 1: gone')",
            ),
            (OSError("connection refused"), "connection refused"),
            (None, "no status within 0.05s"),
        ]:
            v = await sample(reply)
            assert v["missed"] == why
            assert v["versions"] == [3, 4]  # the last sample's
            assert [sh["version"] for sh in v["servers"]] == [3, 4]
        assert len(tracker.samples) == 1

    asyncio.run(go())
    tracker.shard_samples[0].clear()
    tracker.shard_samples[0].extend([Sample(100.0, 3, 3), Sample(101.0, 6, 6)])
    assert tracker.servers()[0]["updates_per_second"] == pytest.approx(3.0)
    assert tracker.servers()[1]["updates_per_second"] is None  # one sample
    assert not tracker.stopped
    coordinator.closed = True
    assert tracker.stopped


@pytest.mark.slow
def test_sharded_page_in_a_headless_browser(loop, tmp_path):
    """Chromium shows /ftps of a sharded server: a row per shard server with
    the values ``dask_ftps.status`` gives, the version vector, and no table of
    the run's shards."""
    start_browser = _chromium()
    from distributed import Client, LocalCluster
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    from dask_ftps.models import MLP

    X_train, _, y_train, _ = digits()
    with (
        LocalCluster(
            n_workers=3,
            threads_per_worker=1,
            processes=False,
            resources=SHARD_SERVER["resources"],
            dashboard_address="127.0.0.1:0",
            loop=loop,
        ) as cluster,
        Client(cluster, loop=loop) as client,
    ):
        client.register_plugin(
            ParameterServer(
                str(tmp_path / "run.zarr"), model=MLP(64, (32,), 10), shards=2
            )
        )
        result = dask_ftps.train(
            client, X_train, y_train, epochs=1, batch_size=32, n_shards=2,
            progress=False,
        )  # fmt: skip
        st = dask_ftps.status(client)
        url = f"http://127.0.0.1:{cluster.scheduler.http_server.port}/ftps"
        driver = start_browser()
        try:
            driver.get(url)
            wait = WebDriverWait(driver, 60, poll_frequency=0.25)

            def cells() -> list[list[str]]:
                return [
                    [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                    for tr in driver.find_elements(By.CSS_SELECTOR, "#servers tbody tr")
                ]

            expected = [
                [str(k), sh["address"], str(sh["version"]), "1", str(sh["updates"])]
                for k, sh in enumerate(st["shards"])
            ]
            wait.until(lambda _: [row[:5] for row in cells()] == expected)
            assert all(row[7] == "\u2013" for row in cells())  # never lost
            assert [row[6] for row in cells()] == [
                str(len(sh["snapshots"])) for sh in st["shards"]
            ]
            shown = driver.find_element(By.ID, "versions")
            assert shown.text == f"[{result.version}, {result.version}]"
            assert driver.find_element(By.ID, "version").text == str(result.version)
            assert driver.find_element(By.ID, "servers").is_displayed()
            assert not driver.find_element(By.ID, "shards").is_displayed()
            assert not driver.find_element(By.ID, "journal").is_displayed()
            assert "2 shard servers" in driver.find_element(By.ID, "model").text
        finally:
            driver.quit()
