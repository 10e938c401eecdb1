"""The parameter server's page on the Dask dashboard: ``/ftps``.

Two routes, registered the way distributed's own HTTP pages are (a ``routes``
list of ``(url, handler, kwargs)``):

- ``ftps``: a small HTML page that polls the JSON view every second;
- ``ftps/status.json``: the view itself (:meth:`Tracker.view`).

A :class:`~dask_ftps.ParameterServer` registered on a running scheduler adds
them to the scheduler's ``http_application`` (:func:`install`), once: a server
registered again finds them there. They may also be served from the
scheduler's start by listing this module in ``distributed.scheduler.http.routes``.
The handlers look the server up at each request (the scheduler's ``ftps``
plugin), so that a replacing server is the one shown, and a closed or
unregistered one answers "no parameter server".

What the view says
------------------
``updates_per_second``
    Accepted (durable) updates per second over the last ``RATE_WINDOW``
    seconds, from the samples the tracker takes every ``SAMPLE_INTERVAL``;
    None until two samples half a second apart exist.
``shards[].staleness``
    For each shard of the current (newest) run: the published model version
    minus the version the shard's last accepted update took part in, i.e. how
    many versions the model moved on since that shard last contributed (0: the
    published model holds its latest update, or the open sync round will).
    None before its first accepted update of the run (or when that update's
    row was trimmed from memory, ``ftps.retention.memory-rows``). The state
    does not keep the version an update was computed from, so this is the
    staleness of the shard's contribution, not of its gradient. As of the
    tracker's last read of the rows: the JSON view reads them first, the
    metrics take the last sample's (at most ``SAMPLE_INTERVAL`` old). The first
    ``MAX_SHARDS`` shards are listed.
``shards[].lag``
    Steps the shard is behind the run's fastest shard on the run's clock (in
    ``"ssp"`` mode, the ``staleness`` bound limits how far the fastest shard
    runs ahead of the slowest one).
``journal``
    Log records the server holds, commit records among them, snapshots the
    log lists, and ``bytes``: the log records' own bytes plus the chunks of the
    retained commit payloads and of the kept snapshots (the newest
    ``ftps.store.snapshots-kept``). Counted from the log in memory, with no
    store I/O (a remote store's listing costs requests); the arrays'
    ``zarr.json`` documents are not counted.
``recovery``
    How the server rebuilt the run its store held (source, start version,
    updates replayed, seconds); None for a memory-only server or a new store.

A sharded server
----------------
With ``ParameterServer(..., shards=S)`` the scheduler holds no server: a
:class:`ShardsTracker` samples the coordinator's ``status()`` (a call to each
shard server) every ``SAMPLE_INTERVAL`` seconds, and the view (``"sharded":
true``) says, beside the run and the events:

``version``, ``versions``, ``updates``, ``updates_per_second``
    The lowest shard version, the version of each shard (the version vector),
    and the accepted updates of the shard with the fewest, with their rate.
``servers[]``
    Each shard server, as of the last sample: ``address`` (the worker serving
    it), ``version``, ``incarnation``, ``updates``, ``updates_per_second``,
    ``snapshots`` (those its log lists), ``rebuild`` (how it opened its part of
    the store, as its ``status()`` says: given for a new store too); and as of
    now: ``served``, ``lost_s``
    (seconds since its server was lost, while it is not served again) and
    ``recovery_s``, the seconds from its last loss to its server being served
    again (None: never lost). A shard server's journal size is not sampled.
``missed``, ``sampled_s``
    Why the last sample was missed (a shard not served, or a shard server not
    answering within ``STATUS_TIMEOUT`` seconds; None: it was taken) and the
    age of the last sample taken.

The run's own (data) shards, their lag and staleness are not shown for a
sharded server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import dask.config
from distributed.http.utils import RequestHandler, get_handlers

from dask_ftps._core import UpdateKey
from dask_ftps._exceptions import InvalidUpdate

if TYPE_CHECKING:
    from distributed import Scheduler

    from dask_ftps._coordinator import Coordinator
    from dask_ftps._server import Server
    from dask_ftps._store import Journal

logger = logging.getLogger(__name__)

#: Seconds between the samples of version and accepted updates.
SAMPLE_INTERVAL = 1.0
#: Seconds over which ``updates_per_second`` is measured.
RATE_WINDOW = 10.0
#: Samples kept for the page's sparkline (at ``SAMPLE_INTERVAL``: two minutes).
HISTORY = 120
#: Shards of the current run the view lists (and the metrics label).
MAX_SHARDS = 256
#: Rows of the global dataset a new tracker reads back (a rebuilt run's shards).
INITIAL_ROWS = 4096
#: Events of the ``ftps`` topic the view lists, newest first.
EVENTS = 8

#: Seconds a sharded server's status may take before its sample is missed.
STATUS_TIMEOUT = 5.0
#: What the view says of the newest run.
RUN_FIELDS = (
    "run",
    "name",
    "n_shards",
    "finished",
    "accepted",
    "minibatches",
    "base_version",
)

NO_SERVER = "no parameter server"


@dataclasses.dataclass(frozen=True)
class Sample:
    """The server's progress at one moment."""

    time: float  # time.time()
    version: int
    updates: int


def _rate(samples: Sequence[Sample]) -> float | None:
    """Updates per second over the last ``RATE_WINDOW`` seconds of ``samples``
    (oldest first); None until two samples half a ``SAMPLE_INTERVAL`` apart."""
    if len(samples) < 2:
        return None
    newest = samples[-1]
    oldest = newest
    for sample in reversed(samples):
        oldest = sample
        if newest.time - sample.time >= RATE_WINDOW:
            break
    elapsed = newest.time - oldest.time
    if elapsed < SAMPLE_INTERVAL / 2:
        return None
    return max(0.0, (newest.updates - oldest.updates) / elapsed)


@dataclasses.dataclass(frozen=True)
class JournalSize:
    """What a store's log holds, as the server knows it (see the module)."""

    records: int
    commits: int
    snapshots: int
    bytes: int


def journal_size(
    journal: Journal, snapshots_kept: int, cache: dict[int, int] | None = None
) -> JournalSize:
    """Count ``journal``'s retained records and the bytes of what they name.

    ``cache`` keeps each record's bytes by serial between calls (a record
    never changes); serials no longer retained are dropped from it.
    """
    cache = {} if cache is None else cache
    sizes = {}
    commits = 0
    for serial, record in journal.records.items():
        size = cache.get(serial)
        if size is None:
            size = len(record.encode())
            if record.kind == "commit":
                rows, n = record.body.data.shape
                size += 4 * rows * n + 4  # float32 values and a CRC-32C
        sizes[serial] = size
        commits += record.kind == "commit"
    cache.clear()
    cache.update(sizes)
    n_bytes = sum(sizes.values())
    snapshots = journal.snapshots()
    for record in snapshots[:snapshots_kept]:
        array = record.body.array
        n_bytes += 4 * array.n + 4 * len(array.crcs)  # a CRC per chunk
    return JournalSize(len(sizes), commits, len(snapshots), n_bytes)


class Tracker:
    """What the page and the metrics show of one server, beyond its ``status()``.

    It samples the server's version and accepted updates (for the rate and the
    sparkline) and follows the global dataset's durable rows to know the
    version each shard's last accepted update took part in. :meth:`refresh`
    does both; the plugin calls it every ``SAMPLE_INTERVAL`` seconds.

    Parameters
    ----------
    server
        The running server.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.samples: deque[Sample] = deque(maxlen=HISTORY)
        # Global-dataset rows read so far: a rebuilt run's last rows only, so
        # that the first refresh (in the plugin's start) costs little.
        self._next_row = max(0, server.accepted - INITIAL_ROWS)
        self._run = -1  # the run whose shards _last follows
        self._last: dict[int, int] = {}  # shard: version of its last update
        self._version = int(server.published.version)  # when the rows were read
        self._record_bytes: dict[int, int] = {}  # journal_size()'s cache

    @property
    def stopped(self) -> bool:
        """Whether the server it follows stopped (no sample to take)."""
        return self.server.stopped

    async def refresh(self) -> None:
        """Read the rows made durable since the last call and take a sample."""
        server = self.server
        start, rows = await server.durable_rows(self._next_row)
        # No await since the rows were read: this version goes with them.
        self._version = int(server.published.version)
        self._next_row = max(self._next_row, start + len(rows))
        for update_id, _, version in rows:
            try:
                key = UpdateKey.parse(update_id)
            except InvalidUpdate:
                continue
            if key.run > self._run:
                self._run, self._last = key.run, {}
            if key.run == self._run:
                self._last[key.shard] = int(version)
        now = time.time()
        if not self.samples or now - self.samples[-1].time >= SAMPLE_INTERVAL / 2:
            self.samples.append(
                Sample(now, int(server.published.version), server.accepted)
            )

    def rate(self) -> float | None:
        """Accepted updates per second over the last ``RATE_WINDOW`` seconds."""
        return _rate(self.samples)

    def shards(self) -> list[dict]:
        """Each shard of the newest run: its clock, lag and staleness (as of
        the last :meth:`refresh`)."""
        version = self._version
        runs = self.server.state.runs
        if not runs:
            return []
        run = runs[-1]
        clocks = list(run.clocks)[:MAX_SHARDS]
        fastest = max(clocks)
        last = self._last if int(run.run) == self._run else {}
        out = []
        for shard, clock in enumerate(clocks):
            epoch, step = divmod(clock, run.spec.rounds_per_epoch)
            took_part = last.get(shard)
            out.append(
                {
                    "shard": shard,
                    "epoch": epoch,
                    "step": step,
                    "done": clock >= run.end,
                    "lag": fastest - clock,
                    "staleness": None
                    if took_part is None
                    else max(0, version - took_part),
                }
            )
        return out

    def view(self, scheduler: Scheduler | None = None) -> dict:
        """The JSON view: ``status()`` and what the tracker knows (see the module)."""
        server = self.server
        status = server.status()
        version = int(status["version"])
        run = status.get("run")
        journal = (
            None
            if server.journal is None
            else journal_size(
                server.journal, server.config.snapshots_kept, self._record_bytes
            )
        )
        t0 = self.samples[-1].time if self.samples else time.time()
        return {
            "status": "OK",
            "version": version,
            "updates": server.accepted,
            "updates_per_second": self.rate(),
            "rate_window": RATE_WINDOW,
            "mode": status["mode"],
            "staleness_bound": status["staleness"],
            "incarnation": status["incarnation"],
            "store": status["store"],
            "run_id": status["run_id"],
            "failed": status["failed"],
            "model": type(server.state.model_spec).__name__,
            "n_params": status["n_params"],
            "workers": None if scheduler is None else len(scheduler.workers),
            "run": None if run is None else {k: run[k] for k in RUN_FIELDS},
            "shards": self.shards(),
            "journal": None if journal is None else dataclasses.asdict(journal),
            "snapshots": status["snapshots"],
            "recovery": status["recovery"] if server.recovered else None,
            "history": [[round(s.time - t0, 3), s.version] for s in self.samples],
            "events": [] if scheduler is None else _events(scheduler),
        }


class ShardsTracker:
    """What the page and the metrics show of a sharded server.

    The scheduler holds no server then: every ``SAMPLE_INTERVAL`` seconds
    :meth:`refresh` asks the coordinator's ``status()`` (one call to each shard
    server) and keeps each shard's version and accepted updates (for the rates
    and the sparkline). Where a shard is not served, or a shard server does not
    answer within ``STATUS_TIMEOUT`` seconds, the sample is missed (no error):
    the view shows the last one, and which shards are lost now.

    Parameters
    ----------
    coordinator
        The plugin's coordinator.
    """

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        #: The lowest shard version and accepted updates (the sparkline, the rate).
        self.samples: deque[Sample] = deque(maxlen=HISTORY)
        #: Each shard's version and accepted updates.
        self.shard_samples: dict[int, deque[Sample]] = {}
        #: The coordinator's last ``status()`` reply (None before the first).
        self.last: dict | None = None
        #: Why the last sample was missed (None: it was taken).
        self.missed: str | None = None
        self._tried = -math.inf  # time.time() of the last call to status()
        self._lock = asyncio.Lock()

    @property
    def stopped(self) -> bool:
        """Whether the coordinator it follows closed (no sample to take)."""
        return bool(self.coordinator.closed)

    async def refresh(self) -> None:
        """Take a sample, unless one was tried less than half a
        ``SAMPLE_INTERVAL`` ago (a page polled by many browsers asks no more)."""
        async with self._lock:
            now = time.time()
            if now - self._tried < SAMPLE_INTERVAL / 2:
                return
            self._tried = now
            coordinator = self.coordinator
            missing = sorted(
                set(range(coordinator.shards)) - set(coordinator.placement)
            )
            if missing:  # status() would wait until they are served
                self._miss(f"shards {missing} are not served")
                return
            try:
                reply = await asyncio.wait_for(coordinator.status(), STATUS_TIMEOUT)
            except TimeoutError:
                self._miss(f"no status within {STATUS_TIMEOUT:g}s")
                return
            except Exception as e:  # noqa: BLE001 - a missed sample is no failure
                self._miss(str(e) or type(e).__name__, exc_info=True)
                return
            if not isinstance(reply, dict) or reply.get("status") != "OK":
                # The handler's error reply, as made (never sent: not decoded).
                why = reply.get("exception_text") if isinstance(reply, dict) else None
                self._miss(str(why or f"status() answered {reply!r:.200}"))
                return
            self.missed = None
            self.last = reply
            now = time.time()
            self.samples.append(
                Sample(now, int(reply["version"]), int(reply["updates"]))
            )
            for shard in reply["shards"]:
                samples = self.shard_samples.setdefault(
                    int(shard["shard"]), deque(maxlen=HISTORY)
                )
                samples.append(
                    Sample(now, int(shard["version"]), int(shard["updates"]))
                )

    def _miss(self, why: str, exc_info: bool = False) -> None:
        self.missed = why
        logger.debug(
            "A sample of the sharded server was missed: %s", why, exc_info=exc_info
        )

    def rate(self) -> float | None:
        """Accepted updates per second over the last ``RATE_WINDOW`` seconds (on
        the shard with the fewest)."""
        return _rate(self.samples)

    def servers(self) -> list[dict]:
        """Each shard server, as of the last sample (``served``, ``lost_s`` and
        the recoveries as of now)."""
        coordinator = self.coordinator
        now = time.monotonic()
        sampled = (
            {} if self.last is None else {s["shard"]: s for s in self.last["shards"]}
        )
        recovered = {event["shard"]: event for event in coordinator.recoveries}
        out = []
        for k in range(min(coordinator.shards, MAX_SHARDS)):
            shard = sampled.get(k, {})
            lost = coordinator.lost_at.get(k)
            recovery = recovered.get(k)
            snapshots = shard.get("snapshots")
            out.append(
                {
                    "shard": k,
                    "address": shard.get("address"),
                    "served": k in coordinator.placement,
                    "lost_s": None if lost is None else round(now - lost, 3),
                    "version": shard.get("version"),
                    "incarnation": shard.get("incarnation"),
                    "updates": shard.get("updates"),
                    "updates_per_second": _rate(self.shard_samples.get(k, ())),
                    "snapshots": None if snapshots is None else len(snapshots),
                    "params": shard.get("params"),
                    "store": shard.get("store"),
                    "rebuild": shard.get("recovery"),
                    "recovery_s": None
                    if recovery is None
                    else recovery.get("since_lost_s"),
                }
            )
        return out

    def view(self, scheduler: Scheduler | None = None) -> dict:
        """The JSON view of a sharded server (see the module)."""
        coordinator = self.coordinator
        last = self.last or {}
        run = last.get("run")
        spec = coordinator.shard_spec
        t0 = self.samples[-1].time if self.samples else time.time()
        return {
            "status": "OK",
            "sharded": True,
            "version": last.get("version"),
            "versions": last.get("versions"),
            "updates": last.get("updates"),
            "updates_per_second": self.rate(),
            "rate_window": RATE_WINDOW,
            "mode": spec["mode"],
            "staleness_bound": spec["staleness"],
            "store": spec["store"],
            "run_id": coordinator.server_id,
            "failed": last.get("failed"),
            "model": type(coordinator.model).__name__,
            "n_params": coordinator.model.n_params(),
            "workers": None if scheduler is None else len(scheduler.workers),
            "resource": coordinator.resource,
            "run": None if run is None else {k: run.get(k) for k in RUN_FIELDS},
            "servers": self.servers(),
            "recoveries": list(coordinator.recoveries[-EVENTS:]),
            "sampled_s": None
            if not self.samples
            else round(time.time() - self.samples[-1].time, 3),
            "missed": self.missed,
            "history": [[round(s.time - t0, 3), s.version] for s in self.samples],
            "events": [] if scheduler is None else _events(scheduler),
        }


def _events(scheduler: Scheduler) -> list[dict]:
    events = scheduler.get_events("ftps")[-EVENTS:]
    return [{"time": t, **msg} for t, msg in reversed(events) if isinstance(msg, dict)]


def current_tracker(scheduler: Scheduler) -> Tracker | ShardsTracker | None:
    """The tracker of the scheduler's running parameter server, if any."""
    plugin = getattr(scheduler, "plugins", {}).get("ftps")
    tracker = getattr(plugin, "_tracker", None)
    if not isinstance(tracker, Tracker | ShardsTracker) or tracker.stopped:
        return None
    return tracker


async def status_view(scheduler: Scheduler) -> dict:
    """The JSON view of the scheduler's parameter server (refreshed first)."""
    tracker = current_tracker(scheduler)
    if tracker is None:
        return {"status": NO_SERVER}
    await tracker.refresh()  # the rows since the last one: cheap
    return tracker.view(scheduler)


# -- HTTP ---------------------------------------------------------------------------


class StatusJSON(RequestHandler):
    """``/ftps/status.json``: :func:`status_view`."""

    async def get(self) -> None:
        view = await status_view(self.server)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(_finite(view), default=str, allow_nan=False))


class FTPSPage(RequestHandler):
    """``/ftps``: the page (static; its script polls ``ftps/status.json``)."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.write(PAGE)


routes: list[tuple] = [
    ("ftps", FTPSPage, {}),
    ("ftps/status.json", StatusJSON, {}),
]


def install(scheduler: Scheduler) -> bool:
    """Add :data:`routes` to a running scheduler's HTTP application, unless it
    has them (from an earlier server, or from ``distributed.scheduler.http.routes``).

    Returns whether they were added.
    """
    app = getattr(scheduler, "http_application", None)
    if app is None:  # a scheduler without an HTTP server
        return False
    targets = [target for target, _ in _rules(app)]
    if any(isinstance(t, type) and issubclass(t, FTPSPage) for t in targets):
        return False
    prefix = _prefix(app)
    app.add_handlers(".*$", get_handlers(scheduler, [__name__], prefix=prefix))
    logger.debug("Serving the parameter server's page at %sftps", prefix)
    return True


def _rules(app: Any) -> Iterator[tuple[Any, str | None]]:
    """Every ``(target, path pattern)`` of a tornado application's routers."""
    import tornado.routing

    seen: set[int] = set()

    def walk(router: tornado.routing.RuleRouter) -> Iterator[tuple[Any, str | None]]:
        if id(router) in seen:
            return
        seen.add(id(router))
        for rule in router.rules:
            if isinstance(rule.target, tornado.routing.RuleRouter):
                yield from walk(rule.target)
            else:
                matcher = rule.matcher
                pattern = (
                    matcher.regex.pattern
                    if isinstance(matcher, tornado.routing.PathMatches)
                    else None
                )
                yield rule.target, pattern

    yield from walk(app.default_router)


def _prefix(app: Any) -> str:
    """The dashboard's path prefix (``dask scheduler --dashboard-prefix``): where
    the scheduler serves distributed's own routes; ``/`` by default."""
    import importlib

    known: dict[type, str] = {}
    for module in dask.config.get("distributed.scheduler.http.routes", []):
        with contextlib.suppress(ImportError, AttributeError):
            for url, cls, _ in importlib.import_module(module).routes:
                known.setdefault(cls, url.lstrip("/") + "$")
    for target, pattern in _rules(app):
        suffix = known.get(target) if isinstance(target, type) else None
        if suffix and pattern and pattern.endswith(suffix):
            prefix = pattern[: -len(suffix)]
            if prefix.startswith("/"):
                return prefix if prefix.endswith("/") else prefix + "/"
    return "/"


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>dask_ftps: parameter server</title>
<link rel="icon" href="data:,">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; }
  h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
  table { border-collapse: collapse; }
  th, td { padding: .2em .8em .2em 0; text-align: left; vertical-align: top; }
  td { font-variant-numeric: tabular-nums; }
  td.n { text-align: right; }
  #shards th, #shards td, #servers th, #servers td { border-bottom: 1px solid #ddd; }
  #state { color: #666; }
  #failed { color: #b00; font-weight: bold; }
  .note { color: #666; font-size: .9em; max-width: 52em; }
  svg polyline { fill: none; stroke: #1f77b4; stroke-width: 1.5; }
</style>
</head>
<body>
<h1>Parameter server</h1>
<div id="state">loading&hellip;</div>
<div id="failed"></div>
<table id="summary">
  <tr><th>Model version</th><td id="version">&ndash;</td>
      <td><svg id="spark" width="240" height="32" role="img"
           aria-label="model version over the last minutes">
           <polyline points=""/></svg></td></tr>
  <tr id="versions-row" hidden><th>Version vector</th>
      <td colspan="2" id="versions">&ndash;</td></tr>
  <tr><th>Updates/s</th><td id="rate">&ndash;</td>
      <td id="rate-note"></td></tr>
  <tr><th>Updates accepted</th><td id="updates">&ndash;</td><td></td></tr>
  <tr><th>Model</th><td colspan="2" id="model">&ndash;</td></tr>
  <tr><th>Mode</th><td id="mode">&ndash;</td><td></td></tr>
  <tr id="incarnation-row"><th>Incarnation</th><td id="incarnation">&ndash;</td>
      <td></td></tr>
  <tr><th>Store</th><td colspan="2" id="store">&ndash;</td></tr>
  <tr><th>Run</th><td colspan="2" id="run">&ndash;</td></tr>
  <tr id="journal-row"><th>Journal</th><td colspan="2" id="journal">&ndash;</td></tr>
  <tr><th>Last recovery</th><td colspan="2" id="recovery">&ndash;</td></tr>
</table>
<h2 id="servers-title" hidden>Shard servers</h2>
<table id="servers" hidden>
  <thead><tr><th>Shard</th><th>Host</th><th>Version</th><th>Incarnation</th>
    <th>Updates</th><th>Updates/s</th><th>Snapshots</th><th>Last recovery</th></tr>
  </thead>
  <tbody></tbody>
</table>
<h2 id="shards-title">Shards of the current run</h2>
<table id="shards">
  <thead><tr><th>Shard</th><th>Epoch</th><th>Step</th><th>Lag</th>
    <th>Staleness</th></tr></thead>
  <tbody></tbody>
</table>
<h2>Events</h2>
<table id="events"><tbody></tbody></table>
<p class="note"><b>Staleness</b>: the model version minus the version the
shard's last accepted update took part in: how many versions the model moved on
since the shard last contributed (0: its latest update is in the model).
<b>Lag</b>: steps the shard is behind the run's fastest shard (in ssp mode,
the staleness bound limits it). <b>Updates/s</b>: accepted updates over the last seconds.
<b>Journal</b>: log records the server holds and the bytes of those records,
their commit payloads and the kept snapshots, counted without store I/O.</p>
<p class="note" id="servers-note" hidden><b>Shard servers</b>: each serves a part
of the parameters on a worker with the resource <span id="resource"></span>.
<b>Model version</b>: the lowest shard version (the version vector lists each).
<b>Last recovery</b>: seconds from the loss of the shard's server to its being
served again. Sampled every second from the shard servers.</p>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const text = (id, value) => { $(id).textContent = value; };
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function row(tbody, cells) {
  const tr = document.createElement("tr");
  for (const [value, numeric] of cells) {
    const td = document.createElement("td");
    td.textContent = value;
    if (numeric) td.className = "n";
    tr.appendChild(td);
  }
  tbody.appendChild(tr);
}
function spark(history) {
  const line = $("spark").querySelector("polyline");
  if (history.length < 2) { line.setAttribute("points", ""); return; }
  const t0 = history[0][0], t1 = history[history.length - 1][0];
  const vs = history.map((h) => h[1]);
  const lo = Math.min(...vs), hi = Math.max(...vs);
  const x = (t) => (t1 > t0 ? (t - t0) / (t1 - t0) : 1) * 238 + 1;
  const y = (v) => 31 - (hi > lo ? (v - lo) / (hi - lo) : 0.5) * 30;
  line.setAttribute("points",
    history.map((h) => x(h[0]).toFixed(1) + "," + y(h[1]).toFixed(1)).join(" "));
}
function clear() {
  for (const id of ["version", "rate", "updates", "mode", "incarnation", "store",
                    "run", "journal", "recovery", "rate-note", "failed", "model",
                    "versions"]) text(id, "");
  $("shards").tBodies[0].replaceChildren();
  $("servers").tBodies[0].replaceChildren();
  $("events").tBodies[0].replaceChildren();
  spark([]);
}
function layout(sharded) {
  for (const id of ["shards-title", "shards", "incarnation-row", "journal-row"]) {
    $(id).hidden = sharded;
  }
  for (const id of ["servers-title", "servers", "versions-row", "servers-note"]) {
    $(id).hidden = !sharded;
  }
}
const dash = (v) => (v === null || v === undefined ? "\\u2013" : v);
const fixed = (v, digits, unit) => (v === null || v === undefined ? "\\u2013"
                                    : v.toFixed(digits) + (unit || ""));
function runText(r) {
  return r === null ? "none" : "run " + r.run + (r.name ? " \\u201c" + r.name
       + "\\u201d" : "") + ": " + r.accepted + " of " + r.minibatches
       + " minibatches, " + r.n_shards + " shards" + (r.finished ? ", finished" : "");
}
function showEvents(list) {
  const events = $("events").tBodies[0];
  events.replaceChildren();
  for (const e of list) {
    const rest = Object.entries(e).filter(([k]) => k !== "time" && k !== "action")
      .map(([k, v]) => k + "=" + (typeof v === "number" && !Number.isInteger(v)
           ? v.toFixed(3) : JSON.stringify(v))).join(" ");
    row(events, [[new Date(e.time * 1000).toLocaleTimeString(), false],
                 [e.action, false], [rest, false]]);
  }
}
function showSharded(s) {
  layout(true);
  text("state", "updated " + new Date().toLocaleTimeString() + (s.missed === null
       ? "" : " (last sample missed: " + s.missed + ")"));
  text("failed", s.failed ? "Failed: " + s.failed : "");
  text("version", dash(s.version));
  text("versions", s.versions === null ? "\\u2013" : "[" + s.versions.join(", ") + "]");
  spark(s.history);
  text("rate", fixed(s.updates_per_second, 1));
  text("rate-note", "over the last " + s.rate_window + " s");
  text("updates", dash(s.updates));
  text("mode", s.mode + (s.mode === "ssp" ? " (bound " + s.staleness_bound + ")" : ""));
  text("model", s.model + ", " + s.n_params + " parameters over "
       + s.servers.length + " shard servers");
  text("resource", s.resource);
  text("store", s.store);
  text("run", runText(s.run));
  const last = s.recoveries.length ? s.recoveries[s.recoveries.length - 1] : null;
  text("recovery", last === null ? "none" : "shard " + last.shard + " served at "
       + last.address + " " + fixed(last.since_lost_s, 3, " s") + " after its loss"
       + " (incarnation " + last.incarnation + ", version " + last.version + ")");
  const servers = $("servers").tBodies[0];
  servers.replaceChildren();
  for (const sh of s.servers) {
    const host = sh.lost_s === null ? dash(sh.address) : "lost " + sh.lost_s.toFixed(1)
      + " s ago" + (sh.address ? " (was " + sh.address + ")" : "");
    row(servers, [[sh.shard, true], [host, false], [dash(sh.version), true],
                  [dash(sh.incarnation), true], [dash(sh.updates), true],
                  [fixed(sh.updates_per_second, 1), true], [dash(sh.snapshots), true],
                  [fixed(sh.recovery_s, 3, " s"), true]]);
  }
  showEvents(s.events);
}
function show(s) {
  if (s.status !== "OK") { clear(); text("state", s.status); return; }
  if (s.sharded === true) { showSharded(s); return; }
  layout(false);
  text("state", "updated " + new Date().toLocaleTimeString());
  text("failed", s.failed ? "Failed: " + s.failed : "");
  text("version", s.version);
  spark(s.history);
  text("rate", s.updates_per_second === null ? "\\u2013"
                                              : s.updates_per_second.toFixed(1));
  text("rate-note", "over the last " + s.rate_window + " s");
  text("updates", s.updates);
  text("mode", s.mode + (s.mode === "ssp" ? " (bound " + s.staleness_bound + ")" : ""));
  text("model", s.model + ", " + s.n_params + " parameters");
  text("incarnation", s.incarnation);
  text("store", s.store === null ? "memory only" : s.store);
  text("run", runText(s.run));
  const j = s.journal;
  text("journal", j === null ? "none (memory only)" : j.records + " log records ("
       + j.commits + " commits), " + j.snapshots + " snapshots, " + bytes(j.bytes));
  const rec = s.recovery;
  text("recovery", rec === null ? "none" : "from the " + (rec.source === "snapshot"
       ? "snapshot" : "model copy of " + rec.source) + " at version "
       + rec.start_version + ", " + rec.replayed + " updates replayed in "
       + rec.seconds.toFixed(3) + " s");
  const shards = $("shards").tBodies[0];
  shards.replaceChildren();
  for (const sh of s.shards) {
    row(shards, [[sh.shard, true], [sh.epoch, true], [sh.done ? "done" : sh.step, true],
                 [sh.lag, true], [sh.staleness === null ? "\\u2013" : sh.staleness, true]]);
  }
  showEvents(s.events);
}
async function poll() {
  try {
    const response = await fetch("ftps/status.json", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    show(await response.json());
  } catch (e) {
    text("state", "disconnected (" + e.message + ")");
  }
  setTimeout(poll, 1000);
}
poll();
</script>
</body>
</html>
"""


def tracker_for(plugin: Any) -> Tracker | ShardsTracker:
    """What the page and the metrics follow of a started plugin: its server, or
    a sharded server's coordinator (the scheduler holds no server then)."""
    coordinator = getattr(plugin, "coordinator", None)
    if coordinator is not None:
        return ShardsTracker(coordinator)
    return Tracker(plugin.server)
