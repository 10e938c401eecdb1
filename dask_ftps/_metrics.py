"""Prometheus metrics of the parameter server, beside distributed's on ``/metrics``.

distributed registers its collectors in ``prometheus_client``'s global
registry, once per process, and serves that registry on the scheduler's
``/metrics``. This module does the same with one collector,
:class:`FTPSMetricCollector`, registered while at least one
:class:`~dask_ftps.ParameterServer` is attached (:func:`attach` in its
``start``, :func:`detach` in its ``close``): a server registered again
replaces the one before in the collector, never adds a second collector
(``prometheus_client`` refuses duplicated names).

Like distributed's collectors, it reports one scheduler: the one whose server
attached last (a process normally runs one scheduler). The names are
``<namespace>_ftps_*``, the namespace being distributed's
(``distributed.dashboard.prometheus.namespace``, ``dask``):

- ``version``: the published model version;
- ``updates_total``: accepted (durable) updates, a counter;
- ``updates_per_second``: over the last ``RATE_WINDOW`` seconds;
- ``incarnation``; ``failed`` (1 once the server refuses everything);
- ``journal_records``, ``journal_snapshots``, ``journal_bytes`` (see
  :mod:`dask_ftps._dashboard`);
- ``recovery_seconds``, ``recovery_replayed_updates``: the last rebuild;
- ``shard_staleness{shard}`` (versions) and ``shard_lag{shard}`` (steps) for
  the current run's shards (see :mod:`dask_ftps._dashboard`);
- ``info{mode, store, run_id}``.

A sharded server (``ParameterServer(..., shards=S)``) reports, from the last
sample of its shard servers (see :mod:`dask_ftps._dashboard`), ``version`` (the
lowest shard version), ``updates_total`` (the fewest a shard accepted),
``updates_per_second``, ``failed`` and ``info`` as above, and for each shard
server, labelled ``shard`` (its part of the parameters, 0 to S-1):

- ``shard_version{shard}``; ``shard_incarnation{shard}``;
- ``shard_updates_total{shard}`` (a counter), ``shard_updates_per_second{shard}``;
- ``shard_served{shard}`` (0 while its server is lost, until served again);
- ``shard_recovery_seconds{shard}``: from its last loss to its server being
  served again (none before a loss).

It has no ``shard_staleness`` or ``shard_lag`` (the run's data shards) and no
``journal_*`` or ``recovery_*`` of its own.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import dask.config

from dask_ftps._dashboard import ShardsTracker, Tracker, current_tracker

if TYPE_CHECKING:
    from dask_ftps._scheduler_plugin import ParameterServer

logger = logging.getLogger(__name__)


class FTPSMetricCollector:
    """A ``prometheus_client`` collector of the attached parameter servers."""

    def __init__(self) -> None:
        # Oldest first; weak: a plugin dropped without close() goes by itself.
        self._plugins: list[weakref.ref[ParameterServer]] = []

    def attach(self, plugin: ParameterServer) -> None:
        """Report ``plugin``, in place of any other of its scheduler."""
        self._plugins = [
            ref
            for ref in self._plugins
            if (p := ref()) is not None and p.scheduler is not plugin.scheduler
        ]
        self._plugins.append(weakref.ref(plugin))

    def detach(self, plugin: ParameterServer) -> bool:
        """Stop reporting ``plugin``; whether any plugin is left."""
        self._plugins = [
            ref for ref in self._plugins if (p := ref()) is not None and p is not plugin
        ]
        return bool(self._plugins)

    def tracker(self) -> Tracker | ShardsTracker | None:
        """The tracker of the newest attached plugin still serving."""
        for ref in reversed(self._plugins):
            plugin = ref()
            if plugin is None:
                continue
            tracker = current_tracker(plugin.scheduler)
            if tracker is not None and tracker is getattr(plugin, "_tracker", None):
                return tracker
        return None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, InfoMetricFamily

        tracker = self.tracker()
        if tracker is None:
            return
        view = tracker.view()
        namespace = dask.config.get("distributed.dashboard.prometheus.namespace")
        prefix = f"{namespace}_ftps_" if namespace else "ftps_"

        if view.get("sharded"):
            yield from _gauge(
                prefix,
                "version",
                "Model version: the lowest shard version",
                view["version"],
            )
            if view["updates"] is not None:
                yield CounterMetricFamily(
                    prefix + "updates",
                    "Updates accepted (durable) by the shard with the fewest",
                    value=view["updates"],
                )
        else:
            yield from _gauge(
                prefix, "version", "Published model version", view["version"]
            )
            yield CounterMetricFamily(
                prefix + "updates",
                "Updates accepted (durable in the store)",
                value=view["updates"],
            )
        yield from _gauge(
            prefix,
            "updates_per_second",
            f"Updates accepted per second over the last {view['rate_window']:g}s",
            view["updates_per_second"],
        )
        if view.get("sharded"):
            yield from _shard_servers(prefix, view["servers"])
        else:
            yield from _one_server(prefix, view)
        yield from _gauge(
            prefix,
            "failed",
            "1 if the server refuses every request (restart it)",
            int(view["failed"] is not None),
        )
        info = InfoMetricFamily(prefix.removesuffix("_"), "The parameter server")
        info.add_metric(
            [],
            {
                "mode": view["mode"],
                "store": view["store"] or "",
                "run_id": view["run_id"] or "",
            },
        )
        yield info


def _gauge(prefix: str, name: str, doc: str, value: float | None) -> Iterator[Any]:
    """A gauge ``<prefix><name>`` of ``value``; none where it is None."""
    from prometheus_client.core import GaugeMetricFamily

    if value is not None:
        yield GaugeMetricFamily(prefix + name, doc, value=value)


def _one_server(prefix: str, view: dict) -> Iterator[Any]:
    """The metrics of one server's view (:meth:`Tracker.view`) but the common ones."""
    from prometheus_client.core import GaugeMetricFamily

    yield from _gauge(
        prefix, "incarnation", "Server incarnation on its store", view["incarnation"]
    )
    journal = view["journal"]
    if journal is not None:
        yield from _gauge(
            prefix,
            "journal_records",
            "Log records the server holds",
            journal["records"],
        )
        yield from _gauge(
            prefix, "journal_snapshots", "Snapshots the log lists", journal["snapshots"]
        )
        yield from _gauge(
            prefix,
            "journal_bytes",
            "Bytes of the log records, commit payloads and kept snapshots",
            journal["bytes"],
        )
    recovery = view["recovery"]
    if recovery is not None:
        yield from _gauge(
            prefix,
            "recovery_seconds",
            "Seconds the last rebuild from the store took",
            recovery["seconds"],
        )
        yield from _gauge(
            prefix,
            "recovery_replayed_updates",
            "Updates the last rebuild replayed",
            recovery["replayed"],
        )
    staleness = GaugeMetricFamily(
        prefix + "shard_staleness",
        "Versions since the shard's last accepted update (current run)",
        labels=["shard"],
    )
    lag = GaugeMetricFamily(
        prefix + "shard_lag",
        "Steps the shard is behind the run's fastest shard (current run)",
        labels=["shard"],
    )
    for shard in view["shards"]:
        if shard["staleness"] is not None:
            staleness.add_metric([str(shard["shard"])], shard["staleness"])
        lag.add_metric([str(shard["shard"])], shard["lag"])
    yield staleness
    yield lag


def _shard_servers(prefix: str, servers: list[dict]) -> Iterator[Any]:
    """The per-shard metrics of a sharded server's view (``servers``, see
    :meth:`~dask_ftps._dashboard.ShardsTracker.servers`)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    version = GaugeMetricFamily(
        prefix + "shard_version", "Version of the shard's server", labels=["shard"]
    )
    incarnation = GaugeMetricFamily(
        prefix + "shard_incarnation",
        "Incarnation of the shard's server on its part of the store",
        labels=["shard"],
    )
    updates = CounterMetricFamily(
        prefix + "shard_updates",
        "Updates the shard's server accepted (durable in its part of the store)",
        labels=["shard"],
    )
    rate = GaugeMetricFamily(
        prefix + "shard_updates_per_second",
        "Updates the shard's server accepted per second, lately",
        labels=["shard"],
    )
    served = GaugeMetricFamily(
        prefix + "shard_served",
        "1 while the shard is served, 0 from the loss of its server until it is "
        "served again",
        labels=["shard"],
    )
    recovery = GaugeMetricFamily(
        prefix + "shard_recovery_seconds",
        "Seconds from the last loss of the shard's server to its being served again",
        labels=["shard"],
    )
    for server in servers:
        labels = [str(server["shard"])]
        for family, key in (
            (version, "version"),
            (incarnation, "incarnation"),
            (updates, "updates"),
            (rate, "updates_per_second"),
            (recovery, "recovery_s"),
        ):
            if server[key] is not None:
                family.add_metric(labels, server[key])
        served.add_metric(labels, int(server["served"]))
    yield from (version, incarnation, updates, rate, served, recovery)


_COLLECTOR: FTPSMetricCollector | None = None


def attach(plugin: ParameterServer) -> bool:
    """Report ``plugin`` on ``/metrics``; False without ``prometheus_client``
    (distributed serves no metrics then either)."""
    global _COLLECTOR
    try:
        import prometheus_client
    except ModuleNotFoundError:
        return False
    if _COLLECTOR is None:
        collector = FTPSMetricCollector()
        collector.attach(plugin)
        prometheus_client.REGISTRY.register(collector)
        _COLLECTOR = collector
    else:
        _COLLECTOR.attach(plugin)
    return True


def detach(plugin: ParameterServer) -> None:
    """Stop reporting ``plugin``; unregister the collector when none is left."""
    global _COLLECTOR
    if _COLLECTOR is None or _COLLECTOR.detach(plugin):
        return
    import prometheus_client

    prometheus_client.REGISTRY.unregister(_COLLECTOR)
    _COLLECTOR = None
