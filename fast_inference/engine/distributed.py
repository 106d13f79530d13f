"""Tensor parallelism over torch.distributed: process-group set-up (one node or several), the worker
processes and their step loop, the per-step input message, failure detection and shutdown.

Rank 0 is the engine process: it schedules, broadcasts each step's forward inputs as one packed int32
message, runs its share of the forward like every other rank, and samples from the gathered logits. The
other ranks run `worker_main`: receive a message, run the same forward, repeat until told to stop. Model
collectives run on the default group (gloo on CPU, NCCL on CUDA); the step messages on a separate gloo
group, so that a worker idling in its wait for the next step never hits the model group's timeout."""

import atexit
import base64
import datetime
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import fast_inference
from fast_inference.models.config import ModelConfig, load_model_config
from fast_inference.models.parallel_layers import TensorParallel, check_tensor_parallel
from fast_inference.models.parallel_loader import check_gguf_shards
from fast_inference.ops.attention_metadata import build_metadata

from .config import EngineArgs, resolve_device
from .model_runner import ModelRunner

logger = logging.getLogger("fast_inference.engine")

# Rendezvous and model collectives: how long a rank waits for the others (a node that is still starting,
# a step's all-reduce behind a slow peer's long prefill chunk). A worker that dies before it joins is
# therefore noticed by rank 0 only at this timeout. Step messages wait as long as the server idles.
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=10)
_IDLE_TIMEOUT = datetime.timedelta(days=365)

# Step message kinds (word 1 of the message).
_FORWARD, _HIDDEN, _STOP = 1, 2, 3
_HEADER = 6  # length, kind, num_seqs, num_tokens, num_rows, table width
# Words of the fixed-size message buffer: a step whose inputs fit is ONE broadcast of this many int32
# (4 KiB: a decode step of 64 sequences with 8-block tables is ~800 words); a larger step (a long prefill,
# a wide batch) sends a second broadcast of its exact size, which the first one's header announces.
MESSAGE_WORDS = 1024


class TensorParallelError(RuntimeError):
    """The tensor-parallel group is broken (a worker died or a collective failed): the engine cannot run
    another step. `fatal` tells AsyncEngine to mark the engine failed at once instead of retrying."""

    fatal = True


@dataclass(slots=True)
class ParallelPlan:
    """Where this process sits: TP degree, nodes, rendezvous address."""

    world_size: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"


def plan_from_args(args: EngineArgs) -> ParallelPlan:
    """The ranks' layout from flags EngineArgs.validate has checked; picks the rendezvous port if free to."""
    port = args.master_port
    if port == 0:  # one node (validate refuses 0 with several): any free port on loopback
        with socket.socket() as s:
            s.bind((args.master_addr, 0))
            port = s.getsockname()[1]
    return ParallelPlan(args.tensor_parallel_size, args.nnodes, args.node_rank, args.master_addr, port)


def _device_of(args: EngineArgs, local_rank: int) -> torch.device:
    device = resolve_device(args.device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"tensor parallelism needs one GPU per rank on each node: local rank {local_rank}, "
                f"{torch.cuda.device_count()} GPU(s) visible"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


def _init_groups(plan: ParallelPlan, rank: int, device: torch.device) -> dist.ProcessGroup:
    """Join the world (default group: model collectives) and make the gloo group step messages travel on."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend,
        init_method=plan.init_method,
        rank=rank,
        world_size=plan.world_size,
        timeout=RENDEZVOUS_TIMEOUT,
        **kwargs,
    )
    # A gloo group even on CPU, where the default one is gloo too: it carries the idle wait, with its own
    # (long) timeout, and on CUDA keeps the step messages off the GPU.
    return dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)


@dataclass(slots=True)
class _Step:
    """One forward's inputs as every rank needs them (sampling inputs stay on rank 0, which samples)."""

    kind: int
    input_ids: list[int]
    starts: list[int]
    num_new: list[int]
    token_rows: list[int]
    block_tables: list[list[int]]


def pack_step(step: _Step) -> torch.Tensor:
    """The step as int32 words: header, input ids, starts, new-token counts, logit rows, padded tables."""
    width = max((len(t) for t in step.block_tables), default=0)
    words = [
        0,
        step.kind,
        len(step.starts),
        len(step.input_ids),
        len(step.token_rows),
        width,
        *step.input_ids,
        *step.starts,
        *step.num_new,
        *step.token_rows,
    ]
    for table in step.block_tables:
        words.extend(table)
        words.extend([0] * (width - len(table)))
    words[0] = len(words)
    return torch.tensor(words, dtype=torch.int32)


def unpack_step(words: torch.Tensor) -> _Step:
    w = words.tolist()
    kind, num_seqs, num_tokens, num_rows, width = w[1:_HEADER]
    at = _HEADER
    ids = w[at : at + num_tokens]
    at += num_tokens
    starts = w[at : at + num_seqs]
    at += num_seqs
    num_new = w[at : at + num_seqs]
    at += num_seqs
    rows = w[at : at + num_rows]
    at += num_rows
    tables = [w[at + i * width : at + (i + 1) * width] for i in range(num_seqs)]
    return _Step(kind, ids, starts, num_new, rows, tables)


class ParallelModelRunner(ModelRunner):
    """A ModelRunner over one rank's share of the model. On rank 0, execute / last_hidden_states first send
    the step to the workers; on a worker, serve_steps runs the steps rank 0 sends."""

    def __init__(
        self,
        cfg: ModelConfig,
        block_size: int,
        kv_cache_memory: int | None,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enforce_eager: bool,
        tp: TensorParallel,
        step_group: dist.ProcessGroup,
    ):
        self.tp = tp
        self.step_group = step_group
        self.workers: list[subprocess.Popen] = []  # rank 0: this node's worker processes
        self.broken: str | None = None
        self.closed = False
        self._buffer = torch.zeros(MESSAGE_WORDS, dtype=torch.int32)
        super().__init__(
            cfg, block_size, kv_cache_memory, max_num_seqs, max_num_batched_tokens, enforce_eager, tp
        )

    def _default_cache_bytes(self, max_num_seqs: int, max_num_batched_tokens: int) -> int:
        # Every rank must hold the same number of blocks (rank 0's block manager addresses them all):
        # the smallest of the ranks' own budgets.
        local = torch.tensor([super()._default_cache_bytes(max_num_seqs, max_num_batched_tokens)])
        dist.all_reduce(local, op=dist.ReduceOp.MIN, group=self.step_group)
        return int(local)

    # ---- rank 0 ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, seqs, num_new: list[int], token_rows: list[int]) -> torch.Tensor | None:
        ids: list[int] = []
        starts: list[int] = []
        for seq, n in zip(seqs, num_new):
            starts.append(seq.num_computed)
            ids.extend(seq.token_ids[seq.num_computed : seq.num_computed + n])
        step = _Step(_FORWARD, ids, starts, list(num_new), list(token_rows), [s.block_table for s in seqs])
        return self._lead(step)

    @torch.inference_mode()
    def last_hidden_states(
        self, token_id_lists: list[list[int]], block_tables: list[list[int]]
    ) -> torch.Tensor:
        lens = [len(ids) for ids in token_id_lists]
        last = torch.tensor(lens, dtype=torch.int64).cumsum(0) - 1
        ids = [t for ids in token_id_lists for t in ids]
        return self._lead(_Step(_HIDDEN, ids, [0] * len(lens), lens, last.tolist(), block_tables))

    def _lead(self, step: _Step) -> torch.Tensor | None:
        if self.broken is not None:
            raise TensorParallelError(f"the tensor-parallel group is down: {self.broken}")
        if any(p.poll() is not None for p in self.workers):
            # A local worker already exited: say so now rather than inside a collective (NCCL would only
            # notice at its watchdog timeout). One waitpid per worker, ~1 us each.
            self._fail(RuntimeError("a worker exited"))
            raise TensorParallelError(f"tensor-parallel step failed: {self.broken}")
        try:
            self._send(pack_step(step))
            return self.run_step(step)
        except (RuntimeError, OSError) as exc:  # gloo / NCCL: a peer went away or a collective failed
            self._fail(exc)
            raise TensorParallelError(f"tensor-parallel step failed: {self.broken}") from exc

    def _send(self, words: torch.Tensor) -> None:
        n = words.numel()
        self._buffer[:n] = words[:MESSAGE_WORDS] if n > MESSAGE_WORDS else words
        dist.broadcast(self._buffer, src=0, group=self.step_group)
        if n > MESSAGE_WORDS:  # the header told the workers the length
            dist.broadcast(words, src=0, group=self.step_group)

    def _fail(self, exc: BaseException) -> None:
        time.sleep(0.05)  # a peer's socket closes a moment before its exit status is there to read
        dead = [
            f"worker rank {rank} (pid {p.pid}) exited with code {p.poll()}"
            for rank, p in enumerate(self.workers, start=1)
            if p.poll() is not None
        ]
        self.broken = "; ".join(dead) if dead else f"{type(exc).__name__}: {exc}"
        logger.error("tensor-parallel group failed: %s", self.broken)
        self.closed = True
        self._stop_workers(send=False)

    # ---- every rank -----------------------------------------------------------------------------
    def run_step(self, step: _Step) -> torch.Tensor | None:
        """This rank's share of the forward; float32 logits of step.token_rows on rank 0 (hidden states
        for a _HIDDEN step), None elsewhere or when no row is asked for."""
        decode = step.kind == _FORWARD and len(step.input_ids) == len(step.starts)
        if self.graphs and decode and len(step.starts) <= self._max_graph_bs:
            logits = self._replay_step(step)
        else:
            positions, meta = build_metadata(
                step.block_tables, step.starts, step.num_new, self.block_size, self.device
            )
            ids = torch.tensor(step.input_ids, dtype=torch.int64).to(self.device, non_blocking=True)
            hidden = self.model(ids, positions, meta)
            if not step.token_rows:
                return None
            picked = hidden[torch.tensor(step.token_rows, device=self.device)]
            if step.kind == _HIDDEN:
                return picked
            logits = self.model.compute_logits(picked)  # a collective: every rank takes part
            return logits if self.tp.rank == 0 else None
        if not step.token_rows or self.tp.rank != 0:
            return None
        if step.token_rows == list(range(len(step.starts))):
            return logits
        return logits[torch.tensor(step.token_rows, device=self.device)]

    def _replay_step(self, step: _Step) -> torch.Tensor:
        """A decode step in the smallest captured CUDA graph that holds it (rows past the batch write nowhere)."""
        b = len(step.starts)
        size = next(s for s in self._graph_sizes if s >= b)
        bs, pad = self.block_size, size - b
        slots = [t[p // bs] * bs + p % bs for t, p in zip(step.block_tables, step.starts)]
        width = max(len(t) for t in step.block_tables)  # rank 0's tables are ragged, unpacked ones padded
        tables = [t + [0] * (width - len(t)) for t in step.block_tables]
        self._g_ids[:size].copy_(torch.tensor(step.input_ids + [0] * pad), non_blocking=True)
        self._g_pos[:size].copy_(torch.tensor(step.starts + [0] * pad), non_blocking=True)
        self._g_slots[:size].copy_(torch.tensor(slots + [-1] * pad), non_blocking=True)
        lens = [p + 1 for p in step.starts] + [1] * pad
        self._g_lens[:size].copy_(torch.tensor(lens, dtype=torch.int32), non_blocking=True)
        self._g_tables[:b, :width].copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)
        self._g_tables[b:size].zero_()
        self.graphs[size].replay()
        return self._g_out[size][:b]

    # ---- workers --------------------------------------------------------------------------------
    def serve_steps(self) -> None:
        """Run rank 0's steps until it says stop (a worker's whole life after loading)."""
        buffer = self._buffer
        with torch.inference_mode():
            while True:
                dist.broadcast(buffer, src=0, group=self.step_group)
                n = int(buffer[0])
                words = buffer
                if n > MESSAGE_WORDS:
                    words = torch.empty(n, dtype=torch.int32)
                    dist.broadcast(words, src=0, group=self.step_group)
                step = unpack_step(words)
                if step.kind == _STOP:
                    return
                self.run_step(step)

    # ---- shutdown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Rank 0: tell the workers to stop, wait for them (then terminate, then kill), leave the group."""
        if self.closed:
            return
        self.closed = True
        self._stop_workers(send=self.broken is None)

    def _stop_workers(self, send: bool) -> None:
        if send and self.tp.rank == 0 and dist.is_initialized():  # other nodes' ranks listen too
            try:
                self._send(pack_step(_Step(_STOP, [], [], [], [], [])))
            except (RuntimeError, OSError):
                pass
        _reap(self.workers, grace=10.0 if send else 1.0)
        self.workers = []
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except (RuntimeError, ValueError):
                pass


def _reap(processes: list[subprocess.Popen], grace: float) -> None:
    """Wait for each process to exit; still alive after `grace` s: SIGTERM, then SIGKILL."""
    deadline = time.monotonic() + grace
    for p in processes:
        _wait(p, max(deadline - time.monotonic(), 0.0))
    for p in processes:
        if p.poll() is None:
            p.terminate()
            _wait(p, 2.0)
        if p.poll() is None:
            p.kill()
            _wait(p, 2.0)


def _wait(p: subprocess.Popen, timeout: float) -> None:
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


def _runner_args(args: EngineArgs) -> dict:
    from fast_inference.sizes import parse_memory

    return dict(
        block_size=args.block_size,
        kv_cache_memory=parse_memory(args.kv_cache_memory) if args.kv_cache_memory is not None else None,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens or 2048,
        enforce_eager=args.enforce_eager,
    )


def _spawn_workers(args: EngineArgs, plan: ParallelPlan, local_ranks: range) -> list[subprocess.Popen]:
    """Start this node's worker ranks, each a fresh interpreter (never a fork: the parent has threads and
    maybe CUDA state; and unlike multiprocessing's spawn, the caller's __main__ is not re-imported, so a
    script without an `if __name__ == "__main__"` guard works)."""
    package_root = str(Path(fast_inference.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    procs = []
    for local in local_ranks:
        rank = plan.node_rank * plan.ranks_per_node + local
        payload = base64.b64encode(pickle.dumps((args, plan, rank, local, torch.get_num_threads())))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "fast_inference.engine.distributed", payload.decode()], env=env
            )
        )
    return procs


def start_tensor_parallel(args: EngineArgs, cfg: ModelConfig) -> ParallelModelRunner:
    """Rank 0 (the engine process, node 0): check the sizes, start this node's workers, join the group and
    load rank 0's share. Raises ValueError before any process starts when the model cannot be split."""
    plan = plan_from_args(args)
    check_tensor_parallel(cfg, plan.world_size)
    check_gguf_shards(cfg, plan.world_size)
    if dist.is_initialized():
        raise ValueError(
            "this process already holds a torch.distributed group (another tensor-parallel engine?): one "
            "tensor-parallel engine per process; close() the other first"
        )
    if cfg.device.type == "cuda":
        _device_of(args, plan.ranks_per_node - 1)  # every local rank has a GPU
        cfg.device = _device_of(args, 0)
    workers = _spawn_workers(args, plan, range(1, plan.ranks_per_node))
    logger.info(
        "tensor parallel: %d ranks on %d node(s), rendezvous %s, workers %s",
        plan.world_size,
        plan.nnodes,
        plan.init_method,
        [p.pid for p in workers],
    )
    try:
        step_group = _init_groups(plan, 0, cfg.device)
        runner = ParallelModelRunner(
            cfg, **_runner_args(args), tp=TensorParallel(0, plan.world_size), step_group=step_group
        )
    except BaseException as exc:
        dead = [f"pid {p.pid} exit code {p.poll()}" for p in workers if p.poll() is not None]
        _reap(workers, grace=0.0)
        if dist.is_initialized():
            dist.destroy_process_group()
        if isinstance(exc, ValueError):
            raise
        detail = f" (workers: {', '.join(dead)}; see their log)" if dead else ""
        raise TensorParallelError(f"tensor-parallel start-up failed: {exc}{detail}") from exc
    runner.workers = workers
    # A forgotten close() still stops the workers cleanly when the interpreter exits.
    atexit.register(_close_at_exit, weakref.ref(runner))
    return runner


def _close_at_exit(ref: "weakref.ref[ParallelModelRunner]") -> None:
    runner = ref()
    if runner is not None and dist.is_initialized():
        runner.close()


def _worker_process(
    args: EngineArgs, plan: ParallelPlan, rank: int, local_rank: int, num_threads: int
) -> None:
    code = worker_main(args, plan, rank, local_rank, num_threads)
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: a broken group's destructors can block on dead peers


def worker_main(args: EngineArgs, plan: ParallelPlan, rank: int, local_rank: int, num_threads: int) -> int:
    """A worker rank: join the group, load this rank's share, run steps until rank 0 stops (0) or the
    group breaks (1: rank 0 died or a collective failed)."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s tp-rank{rank}: %(message)s", stream=sys.stderr
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 decides
    torch.set_num_threads(num_threads)
    device = _device_of(args, local_rank)
    step_group = _init_groups(plan, rank, device)
    try:
        cfg = load_model_config(args.model, args.dtype, device, args.max_model_len, args.quantization)
        runner = ParallelModelRunner(
            cfg, **_runner_args(args), tp=TensorParallel(rank, plan.world_size), step_group=step_group
        )
        runner.serve_steps()
    except (RuntimeError, OSError) as exc:
        # Rank 0 went away (or a collective failed there first): nothing left to serve.
        logger.error("stopping: %s: %s", type(exc).__name__, (str(exc).splitlines() or [""])[0])
        return 1
    except Exception as exc:  # e.g. a checkpoint this rank cannot load; rank 0 reports its own copy
        logger.error("failed: %s: %s", type(exc).__name__, exc)
        return 1
    try:
        dist.destroy_process_group()
    except (RuntimeError, ValueError):
        pass
    return 0


def run_worker_node(args: EngineArgs) -> int:
    """A node other than 0 (`serve --node-rank K`): run its ranks as pure workers until rank 0 stops."""
    args.validate()
    plan = plan_from_args(args)
    device = resolve_device(args.device)
    cfg = load_model_config(args.model, args.dtype, device, args.max_model_len, args.quantization)
    check_tensor_parallel(cfg, plan.world_size)
    check_gguf_shards(cfg, plan.world_size)
    others = _spawn_workers(args, plan, range(1, plan.ranks_per_node))
    first = plan.node_rank * plan.ranks_per_node
    logger.info(
        "worker node %d: ranks %d..%d, rendezvous %s",
        plan.node_rank,
        first,
        first + plan.ranks_per_node - 1,
        plan.init_method,
    )

    def _on_term(signum, _frame):
        _reap(others, grace=0.0)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, _on_term)
    try:
        code = worker_main(args, plan, first, 0, torch.get_num_threads())
    finally:
        _reap(others, grace=10.0)
    return code


if __name__ == "__main__":  # a worker rank, started by _spawn_workers
    from fast_inference.engine import distributed as _module  # the importable copy (pickled types live there)

    _module._worker_process(*pickle.loads(base64.b64decode(sys.argv[1])))
