"""Prometheus metrics in the text exposition format (0.0.4), kept by hand: counters, gauges, histograms."""

import bisect
from collections.abc import Callable

_PREFIX = "fast_inference"
TTFT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)


class Histogram:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times

    def render(self, name: str, labels: str = "") -> list[str]:
        lines = []
        cumulative = 0
        sep = "," if labels else ""
        for bound, count in zip(self.bounds, self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_sum{suffix} {self.sum!r}")
        lines.append(f"{name}_count{suffix} {self.count}")
        return lines


class Metrics:
    """Everything /metrics exposes. Updated on the event loop thread only, so no locks."""

    def __init__(self, model_name: str, api_server: int | None = None) -> None:
        # With several API server processes each counts its own traffic: the label says whose it is.
        self.labels = f'model_name="{_escape(model_name)}"' + (
            f',api_server="{api_server}"' if api_server is not None else ""
        )
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}  # finish reason -> count
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def request_done(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def finish(self, reason: str) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1

    def render(self, gauges: Callable[[], dict], replicas: list[dict] | None = None) -> str:
        """`replicas`: DataParallelEngine.replica_states(); the engine gauges are then one series per
        replica (label replica="i"), and each replica's liveness, restarts and engine counters come too."""
        p = _PREFIX
        lab = self.labels
        out: list[str] = []

        def head(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {p}_{name} {help_text}")
            out.append(f"# TYPE {p}_{name} {kind}")

        head("requests_total", "counter", "HTTP API requests by endpoint and status code.")
        for (endpoint, status), count in sorted(self.requests.items()):
            out.append(f'{p}_requests_total{{{lab},endpoint="{endpoint}",status="{status}"}} {count}')
        head("request_success_total", "counter", "Finished generations by finish reason.")
        for reason, count in sorted(self.finished.items()):
            out.append(f'{p}_request_success_total{{{lab},finished_reason="{reason}"}} {count}')
        head("prompt_tokens_total", "counter", "Prompt tokens processed.")
        out.append(f"{p}_prompt_tokens_total{{{lab}}} {self.prompt_tokens}")
        head("generation_tokens_total", "counter", "Tokens generated.")
        out.append(f"{p}_generation_tokens_total{{{lab}}} {self.generation_tokens}")
        head("time_to_first_token_seconds", "histogram", "Time from request arrival to its first token.")
        out.extend(self.ttft.render(f"{p}_time_to_first_token_seconds", lab))
        head("inter_token_latency_seconds", "histogram", "Time between consecutive output tokens.")
        out.extend(self.itl.render(f"{p}_inter_token_latency_seconds", lab))
        head("e2e_request_latency_seconds", "histogram", "Time from request arrival to its last token.")
        out.extend(self.e2e.render(f"{p}_e2e_request_latency_seconds", lab))
        values = gauges()
        per_replica = {
            "num_requests_running": "num_running",
            "num_requests_waiting": "num_waiting",
            "kv_cache_usage_perc": "kv_cache_usage",
            "prefix_cache_hit_rate": "prefix_cache_hit_rate",
            "num_kv_cache_blocks": "num_total_blocks",
        }
        for name, help_text in (
            ("num_requests_running", "Requests in the running batch."),
            ("num_requests_waiting", "Requests waiting to be scheduled."),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)."),
            ("prefix_cache_hit_rate", "Fraction of prompt tokens served from the prefix cache (0-1)."),
            ("num_kv_cache_blocks", "Total KV-cache blocks."),
            ("num_open_connections", "Open HTTP connections."),
        ):
            if replicas and name in per_replica:
                series = [
                    (r["replica"], r["stats"][per_replica[name]])
                    for r in replicas
                    if per_replica[name] in r["stats"]
                ]
                if series:
                    head(name, "gauge", help_text)
                    for replica, value in series:
                        out.append(f'{p}_{name}{{{lab},replica="{replica}"}} {float(value)!r}')
            elif name in values:
                head(name, "gauge", help_text)
                out.append(f"{p}_{name}{{{lab}}} {float(values[name])!r}")
        for name, kind, help_text, value in (
            ("replica_up", "gauge", "1 while the engine replica serves, else 0.", lambda r: int(r["state"] == "ready")),
            ("replica_restarts_total", "counter", "Times the engine replica's process was restarted.", lambda r: r["restarts"]),
            ("replica_routed_requests_total", "counter", "Requests this API server sent to the replica.", lambda r: r["routed_requests"]),
            ("replica_engine_steps_total", "counter", "Engine steps the replica ran (its current process).", lambda r: r["stats"].get("num_steps")),
            ("replica_generation_tokens_total", "counter", "Tokens the replica generated (its current process).", lambda r: r["stats"].get("generation_tokens_total")),
            ("replica_requests_finished_total", "counter", "Requests the replica finished (its current process).", lambda r: r["stats"].get("num_requests_finished")),
        ):  # fmt: skip
            series = [(r["replica"], value(r)) for r in replicas or ()]
            series = [(replica, v) for replica, v in series if v is not None]
            if series:
                head(name, kind, help_text)
                for replica, v in series:
                    out.append(f'{p}_{name}{{{lab},replica="{replica}"}} {v}')
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
