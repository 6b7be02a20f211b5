"""Prometheus metrics of a rollout node (`--metrics-port`): read from the node's status at scrape time, so no
counter can drift from what GetStatus says."""

from __future__ import annotations

from services.rollout.node import RolloutNode

COUNTERS = {"env_steps": "environment steps taken", "fragments_pushed": "fragments written",
            "bytes_pushed": "fragment bytes written", "env_restarts": "env processes rebuilt",
            "episodes": "episodes finished", "worker_restarts": "rollout workers replaced after they died"}
GAUGES = {"env_steps_per_second": "env steps per second", "live_envs": "env processes",
          "inference_ms": "mean inference batch latency in ms", "model_version": "weights in use",
          "workers": "RolloutWorker actors"}


class RolloutMetrics:
    """A prometheus_client collector over one node."""

    def __init__(self, node: RolloutNode):
        self.node = node

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            st = self.node.status() or {}
        except Exception:
            st = {}
        labels = {"node": self.node.node_id}
        for name, doc in COUNTERS.items():
            c = CounterMetricFamily(f"mso_rollout_{name}", doc, labels=list(labels))
            c.add_metric(list(labels.values()), st.get(name, 0))
            yield c
        for name, doc in GAUGES.items():
            g = GaugeMetricFamily(f"mso_rollout_{name}", doc, labels=list(labels))
            g.add_metric(list(labels.values()), st.get(name, 0))
            yield g


def serve_metrics(node: RolloutNode, port: int) -> None:
    from prometheus_client import REGISTRY, start_http_server

    REGISTRY.register(RolloutMetrics(node))
    start_http_server(port)
