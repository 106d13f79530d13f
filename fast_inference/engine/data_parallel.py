"""Engine replicas behind one front-end: DataParallelEngine (AsyncEngine's surface over N engine processes)
and PrefixAffinityRouter (each request to the replica whose prefix cache most likely holds its prompt's
first KV blocks, the least loaded one on a tie)."""

import asyncio
import os
import threading
from collections import OrderedDict

from .async_engine import EngineDeadError, RequestStream
from .engine_client import EngineClient
from .engine_process import Supervisor
from .sampling_params import SamplingParams

# The first full KV blocks of a prompt decide its replica: a shared system prompt or few-shot header
# sits there. Eight 16-token blocks is enough to tell apart the prefixes that matter.
AFFINITY_BLOCKS = 8
_TABLE_SIZE = 1 << 16  # block hashes remembered per replica (least recently routed ones forgotten)


class PrefixAffinityRouter:
    """Remembers, per replica, the chained hashes of the leading full blocks of the prompts sent there.

    A request goes to the live replica that shares the longest run of leading blocks with it (its prefix
    cache most likely still holds them), and among equals to the least loaded one (in-flight requests,
    then in-flight prompt tokens). The table is this front-end's: with several API server processes each
    learns from its own traffic."""

    def __init__(self, num_replicas: int, block_size: int = 16) -> None:
        self.block_size = block_size
        self._seen: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_replicas)]

    def block_hashes(self, prompt: str | list[int]) -> list[int]:
        """Chained hashes of the prompt's first full blocks (block i's hash covers blocks 0..i)."""
        if isinstance(prompt, str):
            return []  # the server always sends token ids; text prompts are routed by load alone
        size = self.block_size
        hashes = []
        chained = 0
        for start in range(0, min(len(prompt) // size, AFFINITY_BLOCKS) * size, size):
            chained = hash((chained, tuple(prompt[start : start + size])))
            hashes.append(chained)
        return hashes

    def choose(self, hashes: list[int], loads: list[tuple[int, int] | None]) -> int:
        """The replica for a prompt; loads[i] is (requests, tokens) in flight, None for a replica that
        cannot take requests. Records the choice so that the next prompt with this prefix follows."""
        best = None
        best_key = None
        for replica, load in enumerate(loads):
            if load is None:
                continue
            seen = self._seen[replica]
            matched = 0
            for h in hashes:
                if h not in seen:
                    break
                matched += 1
            key = (-matched, load)
            if best_key is None or key < best_key:
                best, best_key = replica, key
        if best is None:
            raise EngineDeadError("no engine replica is ready")
        table = self._seen[best]
        for h in hashes:
            table[h] = None
            table.move_to_end(h)
        while len(table) > _TABLE_SIZE:
            table.popitem(last=False)
        return best

    def forget(self, replica: int) -> None:
        """A restarted replica starts with an empty cache."""
        self._seen[replica].clear()


class DataParallelEngine:
    """AsyncEngine's surface (what the server uses) over engine replicas in their own processes.

    The replicas are EngineClients on this front-end's loop; when `supervisor` is given this object also
    owns the processes (start, restart, stop), otherwise someone else does (several API servers).
    state: ready while any replica is ready (requests go to the ready ones), loading while none is ready
    and some may still become so, failed when every replica failed to load."""

    def __init__(self, addresses: list[str], supervisor: Supervisor | None = None) -> None:
        self.clients = [EngineClient(a, i, self._replica_changed) for i, a in enumerate(addresses)]
        self.router = PrefixAffinityRouter(len(addresses))
        self._supervisor = supervisor
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()  # every replica has left 'loading' (ServerThread waits on it)
        self._info: dict | None = None
        self._known_incarnation = [0] * len(addresses)

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if self._supervisor is not None:
            self._supervisor.start()
        for client in self.clients:
            client.start(loop)

    async def wait_ready(self, timeout: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self._ready.wait, timeout):
            raise TimeoutError("the engine replicas did not become ready in time")
        if self.state != "ready":
            raise EngineDeadError(f"engine failed to start: {self.error}")

    def _replica_changed(self, client: EngineClient) -> None:
        if client.info is not None and self._info is None:
            self._info = client.info
            self.router.block_size = client.info["kv_cache_blocks"][1]
        if client.incarnation != self._known_incarnation[client.replica] or client.state == "dead":
            self._known_incarnation[client.replica] = client.incarnation
            self.router.forget(client.replica)
        if all(c.state in ("ready", "failed") for c in self.clients):
            self._ready.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Blocking (Server.shutdown runs it in an executor): drop the connections, stop the processes."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            closing = asyncio.run_coroutine_threadsafe(self._close_clients(), loop)
            try:
                closing.result(timeout)
            except Exception:
                pass
        if self._supervisor is not None:
            self._supervisor.stop(timeout)

    async def _close_clients(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))

    # -- state -----------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        states = [c.state for c in self.clients]
        if "ready" in states:
            return "ready"
        if all(s == "stopped" for s in states):
            return "stopped"
        if all(s in ("failed", "stopped") for s in states):
            return "failed"
        return "loading"

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def error(self) -> str | None:
        errors = [f"replica {c.replica}: {c.error}" for c in self.clients if c.error and c.state != "ready"]
        return "; ".join(errors) or None

    def replica_states(self) -> list[dict]:
        """Per replica: state, pid, restarts, the error if any, this front-end's load on it, the engine's
        stats (for /health and /metrics)."""
        return [
            {
                "replica": c.replica,
                "state": c.state,
                "pid": c.pid,
                "restarts": c.incarnation,
                "error": c.error if c.state != "ready" else None,
                "in_flight": c.num_requests,
                "routed_requests": c.routed_requests,
                "stats": c.stats_snapshot,
            }
            for c in self.clients
        ]

    @property
    def stats_snapshot(self) -> dict:
        """The replicas' stats added up (KV-cache usage over all blocks, hit rate averaged)."""
        stats = [c.stats_snapshot for c in self.clients if c.stats_snapshot]
        if not stats:
            return {}
        total: dict = {}
        for key in ("num_running", "num_waiting", "num_requests", "num_free_blocks", "num_total_blocks"):
            if all(key in s for s in stats):
                total[key] = sum(s[key] for s in stats)
        blocks = total.get("num_total_blocks")
        if blocks:
            total["kv_cache_usage"] = (
                sum(s.get("kv_cache_usage", 0.0) * s["num_total_blocks"] for s in stats) / blocks
            )
        rates = [s["prefix_cache_hit_rate"] for s in stats if "prefix_cache_hit_rate" in s]
        if rates:
            total["prefix_cache_hit_rate"] = sum(rates) / len(rates)
        return total

    @property
    def step_count(self) -> int:
        return sum(c.stats_snapshot.get("num_steps", 0) for c in self.clients)

    @property
    def num_requests(self) -> int:
        return sum(c.num_requests for c in self.clients)

    # -- the served model (every replica serves the same one) -------------------------------------------
    def _model_info(self) -> dict:
        if self._info is None:
            raise EngineDeadError("no engine replica has loaded yet")
        return self._info

    @property
    def tokenizer(self):
        return self._model_info()["tokenizer"]

    @property
    def model_config(self):
        return self._model_info()["model_config"]

    @property
    def supports_generation(self) -> bool:
        return self._model_info()["supports_generation"]

    @property
    def kv_cache_blocks(self) -> tuple[int, int]:
        """(blocks in all replicas together, tokens per block)."""
        blocks = sum(c.info["kv_cache_blocks"][0] for c in self.clients if c.info is not None)
        return blocks, self._model_info()["kv_cache_blocks"][1]

    # -- requests --------------------------------------------------------------------------------------
    def _loads(self) -> list[tuple[int, int] | None]:
        return [(c.num_requests, c.inflight_tokens) if c.state == "ready" else None for c in self.clients]

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        max_tokens_must_fit: bool = False,
    ) -> RequestStream:
        replica = self.router.choose(self.router.block_hashes(prompt), self._loads())
        return await self.clients[replica].add_request(
            request_id, prompt, params, max_tokens_must_fit=max_tokens_must_fit
        )

    def abort(self, request_id: str) -> None:
        for client in self.clients:
            if request_id in client._streams:
                client.abort(request_id)

    async def embed(
        self, token_id_lists: list[list[int]], truncate_prompt_tokens: int | None = None
    ) -> list[list[float]]:
        replica = self.router.choose([], self._loads())
        return await self.clients[replica].embed(token_id_lists, truncate_prompt_tokens)

    async def get_stats(self) -> dict:
        await asyncio.gather(*(c.get_stats() for c in self.clients), return_exceptions=True)
        return self.stats_snapshot  # the clients keep the fresh per-replica snapshots


def socket_dir() -> str:
    """A fresh directory only this user can enter, for the engine processes' sockets."""
    import tempfile

    return tempfile.mkdtemp(prefix=f"fast-inference-{os.getpid()}-")
