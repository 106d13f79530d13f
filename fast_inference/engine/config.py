"""EngineArgs (what a user may set) and the resolved cache/scheduler configuration of one engine."""

from dataclasses import dataclass

import torch

from fast_inference.models.config import ModelConfig, load_model_config  # noqa: F401  (re-exported)
from fast_inference.sizes import parse_memory  # noqa: F401  (re-exported)


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return dev


DEFAULT_TARGET_ITL_MS = 100.0


@dataclass
class EngineArgs:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # the most tokens one step computes; None: 2048
    # A step that carries decodes takes prompt tokens only while its modelled cost stays within
    # max(target_itl_ms, 2 x its decodes' cost) (Scheduler): long prompts are chunked, decodes never wait.
    target_itl_ms: float = DEFAULT_TARGET_ITL_MS
    kv_cache_memory: str | int | None = None  # None: a fraction of the device's free memory
    block_size: int = 16
    enable_prefix_caching: bool = True
    seed: int = 0
    tokenizer: str | None = None
    chat_template: str | None = None  # the Jinja template text (not a path); None: the tokenizer's
    enforce_eager: bool = False  # CUDA: do not capture decode steps into CUDA graphs
    quantization: str | None = None  # "q8_0" / "q4_0": quantize an HF checkpoint's weights at load
    # Tensor parallelism (engine/distributed.py): ranks in all, nodes they span, this node, rendezvous.
    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: any free port (one node only)

    def validate(self) -> None:
        if not isinstance(self.model, str | bytes) and not hasattr(self.model, "__fspath__"):
            raise ValueError(
                f"model must be a path to a Hugging Face model directory or a .gguf file, got {self.model!r}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if not self.target_itl_ms >= 0:
            raise ValueError(f"target_itl_ms must be >= 0, got {self.target_itl_ms}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory is not None:
            parse_memory(self.kv_cache_memory)
        tp, nnodes = self.tensor_parallel_size, self.nnodes
        if tp < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {tp}")
        if nnodes < 1 or tp % nnodes:
            raise ValueError(f"nnodes ({nnodes}) must be at least 1 and divide tensor_parallel_size ({tp})")
        if not 0 <= self.node_rank < nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes), got {self.node_rank} with nnodes={nnodes}")
        if not 0 <= self.master_port < 65536:
            raise ValueError(f"master_port must be in 0..65535, got {self.master_port}")
        if nnodes > 1 and self.master_port == 0:
            raise ValueError("master_port must be given (the same on every node) when nnodes > 1")


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    enable_prefix_caching: bool
    target_itl_ms: float = DEFAULT_TARGET_ITL_MS
