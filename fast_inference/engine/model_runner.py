"""ModelRunner: owns the model and its paged KV cache; turns a scheduled batch into one varlen forward."""

import logging

import torch

from fast_inference.models.config import ModelConfig
from fast_inference.models.loader import load_model
from fast_inference.ops.attention_metadata import AttentionMetadata, build_metadata

from .sequence import Sequence

logger = logging.getLogger("fast_inference.engine")

_GIB = 1 << 30


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * _GIB


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        block_size: int,
        kv_cache_memory: int | None,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enforce_eager: bool = False,
        tensor_parallel=None,
    ):
        """tensor_parallel: this rank's models.parallel_layers.TensorParallel (engine/distributed.py's
        runner passes it); the model, and so the KV cache, are then this rank's share."""
        self.cfg = cfg
        self.device = cfg.device
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.model = load_model(cfg, tensor_parallel)
        kv_heads = self.model.config.num_kv_heads  # this rank's KV heads under tensor parallelism
        self.model.prepack()
        # Bytes of key + value for one token across all layers.
        self.kv_bytes_per_token = (
            2 * cfg.num_layers * kv_heads * cfg.head_dim * torch.empty((), dtype=cfg.dtype).element_size()
        )
        bytes_per_block = self.kv_bytes_per_token * block_size
        if kv_cache_memory is None:
            kv_cache_memory = self._default_cache_bytes(max_num_seqs, max_num_batched_tokens)
        self.num_blocks = kv_cache_memory // bytes_per_block
        if self.num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory ({kv_cache_memory} bytes) holds {self.num_blocks} blocks of "
                f"{bytes_per_block} bytes; need at least one block"
            )
        shape = (self.num_blocks, block_size, kv_heads, cfg.head_dim)
        # Zeroed: touched once now (resident memory stays flat afterwards) and never NaN in padding reads.
        self.key_caches = [
            torch.zeros(shape, dtype=cfg.dtype, device=self.device) for _ in range(cfg.num_layers)
        ]
        self.value_caches = [
            torch.zeros(shape, dtype=cfg.dtype, device=self.device) for _ in range(cfg.num_layers)
        ]
        self.model.bind_kv_cache(self.key_caches, self.value_caches)
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB, %s %s)",
            self.num_blocks,
            block_size,
            self.num_blocks * block_size,
            self.num_blocks * bytes_per_block / (1 << 20),
            cfg.dtype,
            self.device,
        )
        self.max_blocks_per_seq = -(-cfg.max_model_len // block_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if self.device.type == "cuda" and not enforce_eager:
            self._capture_cuda_graphs()

    def _default_cache_bytes(self, max_num_seqs: int, max_num_batched_tokens: int) -> int:
        free = available_memory(self.device)
        # No use for more than every sequence at full length.
        useful = self.kv_bytes_per_token * max_num_seqs * self.cfg.max_model_len
        if self.device.type == "cuda":
            # Leave room for activations of the largest step and the sampler's float32 logits.
            act = (
                max_num_batched_tokens * (self.cfg.hidden_size * 16 + self.cfg.intermediate_size * 8)
                + max_num_seqs * self.cfg.vocab_size * 16
            )
            return max(min(int(free * 0.85) - act, useful), 0)
        # CPU: the machine is shared with the rest of the process and other programs.
        return min(int(free * 0.25), 4 * _GIB, useful)

    # ---- inputs ---------------------------------------------------------------------------------
    def prepare(
        self, seqs: list[Sequence], num_new: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten the step's sequences into input_ids/positions and the paged-attention metadata."""
        input_ids: list[int] = []
        starts: list[int] = []
        for seq, n in zip(seqs, num_new):
            start = seq.num_computed
            starts.append(start)
            if n == 1:
                input_ids.append(seq.token_ids[start])
            else:
                input_ids.extend(seq.token_ids[start : start + n])
        positions, meta = build_metadata(
            [seq.block_table for seq in seqs], starts, num_new, self.block_size, self.device
        )
        ids = torch.tensor(input_ids, dtype=torch.int64).to(self.device, non_blocking=True)
        return ids, positions, meta

    # ---- execution ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, seqs: list[Sequence], num_new: list[int], token_rows: list[int]) -> torch.Tensor | None:
        """Run the step; return float32 logits [len(token_rows), vocab] of the given new tokens (flat
        indices into the step's new tokens, in batch order), or None when none is asked for."""
        if self.graphs and sum(num_new) == len(seqs) and len(seqs) <= self._max_graph_bs:
            logits = self._replay(seqs)  # a decode step: new token i is batch row i
            if not token_rows:
                return None
            if len(token_rows) == len(seqs) and token_rows == list(range(len(seqs))):
                return logits
            return logits[torch.tensor(token_rows, device=self.device)]
        input_ids, positions, meta = self.prepare(seqs, num_new)
        hidden = self.model(input_ids, positions, meta)
        if not token_rows:
            return None
        return self.model.compute_logits(hidden[torch.tensor(token_rows, device=self.device)])

    @torch.inference_mode()
    def last_hidden_states(
        self, token_id_lists: list[list[int]], block_tables: list[list[int]]
    ) -> torch.Tensor:
        """Final hidden state [len(token_id_lists), hidden] of each input's last token; each input is
        computed whole, from position 0, into its own blocks (embeddings)."""
        lens = [len(ids) for ids in token_id_lists]
        positions, meta = build_metadata(block_tables, [0] * len(lens), lens, self.block_size, self.device)
        ids = torch.tensor([t for ids in token_id_lists for t in ids], dtype=torch.int64).to(self.device)
        hidden = self.model(ids, positions, meta)
        last = torch.tensor(lens, dtype=torch.int64).cumsum(0) - 1
        return hidden[last.to(self.device)]

    # ---- CUDA graphs (decode only) -------------------------------------------------------------
    def _capture_cuda_graphs(self) -> None:
        """Capture the decode step (model + lm_head) for a ladder of batch sizes; a batch runs in the
        smallest graph that holds it, padded with rows that write nowhere (slot -1)."""
        max_bs = min(self.max_num_seqs, 256)
        sizes = [b for b in (1, 2, 4, 8) if b <= max_bs] + list(range(16, max_bs + 1, 16))
        if max_bs not in sizes:
            sizes.append(max_bs)
        dev = self.device
        self._max_graph_bs = max(sizes)
        n = self._max_graph_bs
        self._g_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self._g_pos = torch.zeros(n, dtype=torch.int64, device=dev)
        self._g_slots = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self._g_tables = torch.zeros((n, self.max_blocks_per_seq), dtype=torch.int32, device=dev)
        self._g_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self._g_cu = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self._g_out: dict[int, torch.Tensor] = {}
        pool = None
        try:
            with torch.inference_mode():
                for b in sorted(sizes, reverse=True):
                    meta = AttentionMetadata(
                        self._g_slots[:b],
                        self._g_tables[:b],
                        self._g_lens[:b],
                        self._g_cu[: b + 1],
                    )
                    hidden = self.model(self._g_ids[:b], self._g_pos[:b], meta)  # warm-up outside capture
                    self.model.compute_logits(hidden)
                    torch.cuda.synchronize(dev)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        hidden = self.model(self._g_ids[:b], self._g_pos[:b], meta)
                        self._g_out[b] = self.model.compute_logits(hidden)
                    if pool is None:
                        pool = graph.pool()
                    self.graphs[b] = graph
            torch.cuda.synchronize(dev)
            self._graph_sizes = sorted(self.graphs)
            logger.info("captured CUDA graphs for decode batch sizes %s", self._graph_sizes)
        except RuntimeError as e:  # a kernel that cannot be captured: run eagerly instead
            logger.warning("CUDA graph capture failed (%s); running decode steps eagerly", e)
            self.graphs.clear()
            self._g_out.clear()

    def _replay(self, seqs: list[Sequence]) -> torch.Tensor:
        b = len(seqs)
        size = next(s for s in self._graph_sizes if s >= b)
        bs = self.block_size
        ids, pos, slots, lens = [], [], [], []
        for seq in seqs:
            p = seq.num_computed
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            lens.append(p + 1)
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor(
            [s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32
        )
        pad = size - b
        self._g_ids[:size].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        self._g_pos[:size].copy_(torch.tensor(pos + [0] * pad), non_blocking=True)
        self._g_slots[:size].copy_(torch.tensor(slots + [-1] * pad), non_blocking=True)
        self._g_lens[:size].copy_(torch.tensor(lens + [1] * pad, dtype=torch.int32), non_blocking=True)
        self._g_tables[:b, :width].copy_(tables, non_blocking=True)
        self._g_tables[b:size].zero_()
        self.graphs[size].replay()
        return self._g_out[size][:b]
