"""LLMEngine: requests in (checked by intake.py), one step at a time (schedule -> run -> update -> sample ->
process -> finish), RequestOutput deltas out; single-threaded."""

import ctypes
import logging
import random
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from fast_inference.models.gguf import gguf_tokenizer, is_gguf_file

from .block_manager import BlockManager
from .config import EngineArgs, SchedulerConfig, load_model_config, parse_memory, resolve_device
from .detokenizer import init_offsets
from .embed_batches import packed_batches
from .intake import InvalidRequestError, check_embedding_inputs, check_generation, check_token_ids
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .outputs import RequestMetrics, RequestOutput
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import SEED_MASK, Request, Sequence, child_seed
from .structured_outputs import SequenceGrammar, StructuredOutputs

logger = logging.getLogger("fast_inference.engine")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def load_tokenizer(path: str, chat_template: str | None = None):
    local = Path(path)
    tokenizer = gguf_tokenizer(local) if is_gguf_file(local) else _hf_tokenizer(path)
    if chat_template is not None:  # the template's text (the CLI reads --chat-template's file)
        tokenizer.chat_template = chat_template
    return tokenizer


def _return_freed_heap() -> None:
    """Hand the heap that loading freed back to the OS. Building a tokenizer from a GGUF's vocabulary and merges
    allocates and frees ~30 MiB of Python and Rust temporaries; glibc keeps freed heap memory mapped (resident)
    unless it is trimmed, so a served model would carry it for its whole life. No-op where there is no glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _hf_tokenizer(path: str):
    from transformers import AutoTokenizer

    local = Path(path)
    if local.is_dir() and not any((local / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"no tokenizer in {path!r}: expected one of {', '.join(_TOKENIZER_FILES)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {path!r}: {e}") from e
    if len(tokenizer) <= 1:
        raise ValueError(
            f"the tokenizer loaded from {path!r} is empty (missing or unreadable tokenizer files)"
        )
    return tokenizer


class LLMEngine:
    """Not thread-safe: one thread calls add_request / abort_request / step / embed."""

    supports_generation = True

    def __init__(self, args: EngineArgs):
        args.validate()
        device = resolve_device(args.device)
        self.args = args
        self.model_config = load_model_config(
            args.model, args.dtype, device, args.max_model_len, args.quantization
        )
        cfg = self.model_config
        self.tokenizer = load_tokenizer(args.tokenizer or args.model, args.chat_template)
        if not cfg.eos_token_ids and self.tokenizer.eos_token_id is not None:
            cfg.eos_token_ids = {int(self.tokenizer.eos_token_id)}
        self.block_size = args.block_size
        max_batched = args.max_num_batched_tokens or 2048
        kv_bytes = parse_memory(args.kv_cache_memory) if args.kv_cache_memory is not None else None
        if args.tensor_parallel_size > 1:
            from .distributed import start_tensor_parallel  # workers started, rank 0's share loaded

            self.runner = start_tensor_parallel(args, cfg)
        else:
            self.runner = ModelRunner(
                cfg,
                args.block_size,
                kv_bytes,
                args.max_num_seqs,
                max_batched,
                enforce_eager=args.enforce_eager,
            )
        self.num_total_blocks = self.runner.num_blocks
        self.block_manager = BlockManager(self.num_total_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=max_batched,
                max_model_len=cfg.max_model_len,
                block_size=args.block_size,
                enable_prefix_caching=args.enable_prefix_caching,
                target_itl_ms=args.target_itl_ms,
            ),
            self.block_manager,
        )
        self.sampler = Sampler(device)
        self.structured = StructuredOutputs(
            self.tokenizer, cfg.vocab_size, cfg.eos_token_ids, device, args.max_num_seqs
        )
        self.outputs = OutputProcessor(self.tokenizer, cfg)
        self.requests: dict[str, Request] = {}
        self._aborts: list[str] = []
        self._rng = random.Random(args.seed)
        self.num_prompt_tokens = 0
        self.num_requests_finished = 0
        _return_freed_heap()
        logger.info(
            "engine ready: %s (%s) on %s, %s, max_model_len %d, KV cache %d blocks = %d tokens",
            cfg.architecture,
            cfg.model_path,
            device,
            cfg.dtype,
            cfg.max_model_len,
            self.num_total_blocks,
            self.num_total_blocks * self.block_size,
        )

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent; a single-process engine holds nothing)."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    # ---- requests -------------------------------------------------------------------------------
    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (temperature, top_p, ...)."""
        return SamplingParams(**self.model_config.generation_defaults)

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        *,
        max_tokens_must_fit: bool = False,
    ) -> None:
        """Queue a request; refusals raise InvalidRequestError (a ValueError naming the field). max_tokens
        is capped to the room the prompt leaves, or with max_tokens_must_fit refused when it does not fit."""
        if params is None:
            params = self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(
                f"params must be a SamplingParams, got {type(params).__name__}", "params"
            )
        if request_id in self.requests:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use", "request_id")
        cfg = self.model_config
        if isinstance(prompt, str):
            prompt_text: str | None = prompt
            token_ids = self.tokenize(prompt)
            if not token_ids:
                raise InvalidRequestError("prompt is empty", "prompt")
        elif isinstance(prompt, list | tuple):
            prompt_text = None
            token_ids = check_token_ids(prompt, cfg.vocab_size, "prompt")
        else:
            raise InvalidRequestError(
                f"prompt must be a string or a list of token ids, got {type(prompt).__name__}", "prompt"
            )
        max_tokens = check_generation(
            len(token_ids),
            params,
            vocab_size=cfg.vocab_size,
            max_model_len=cfg.max_model_len,
            kv_capacity=self.num_total_blocks * self.block_size,
            max_tokens_must_fit=max_tokens_must_fit,
        )
        spec = params.structured_outputs
        grammar = self.structured.compile(spec) if spec is not None else None  # refuses a bad one
        stop_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop_ids |= cfg.eos_token_ids
        req = Request(
            request_id=request_id,
            prompt=prompt_text,
            prompt_token_ids=token_ids,
            params=params,
            metrics=RequestMetrics(arrival_time=arrival_time if arrival_time is not None else time.time()),
            pending_forks=params.n - 1,
            stop_token_ids=frozenset(stop_ids),
            seed=params.seed & SEED_MASK if params.seed is not None else self._rng.getrandbits(63),
        )
        if params.logit_bias:
            req.bias_ids = [int(t) for t in params.logit_bias]
            req.bias_values = [float(b) for b in params.logit_bias.values()]
        if params.min_tokens > 0:
            req.min_tokens_mask_ids = sorted(stop_ids)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        seq = Sequence(
            request=req,
            index=0,
            token_ids=list(token_ids),
            num_prompt_tokens=len(token_ids),
            seed=child_seed(req.seed, 0),
            max_tokens=max_tokens,
            grammar=SequenceGrammar(grammar) if grammar is not None else None,
        )
        init_offsets(seq)
        req.seqs.append(seq)
        self.requests[request_id] = req
        self.scheduler.add(seq)
        self.num_prompt_tokens += len(token_ids)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Abort one or more requests; their blocks are freed by the next step, which reports them."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self._aborts.extend(ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step: schedule -> run -> update (counts, prefix-cache blocks, forks) -> sample -> process
        (tokens, text, stops, logprobs) -> finish (free what ended); returns the changed requests' deltas."""
        outputs = self._process_aborts() if self._aborts else []
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return outputs
        sample_rows = batch.sample_token_rows()
        prompt_rows = self.outputs.prompt_logprob_rows(batch)
        filling = self.structured.start_fill(batch)  # grammar bitmasks, on a thread while the model runs
        logits = self.runner.execute(
            batch.seqs, batch.num_new_tokens, sample_rows + [r[1] for r in prompt_rows]
        )
        masks = self.structured.finish_fill(filling)
        samplers, rows = self.scheduler.update(batch)
        if prompt_rows:
            self.outputs.add_prompt_logprobs(prompt_rows, logits[len(sample_rows) :])
        if samplers:
            forked = len(rows) != len(sample_rows)
            picked = logits[torch.tensor(rows, device=logits.device)] if forked else logits[: len(rows)]
            bitmask = masks.select(samplers, rows) if masks is not None else None
            deltas, finished = self.outputs.process(samplers, self.sampler(picked, samplers, bitmask))
            for seq in finished:
                self.scheduler.finish(seq)
            outputs.extend(deltas)
            for delta in deltas:
                if delta.finished:
                    self._retire(self.requests[delta.request_id])
        self.scheduler.observe_step(batch, time.perf_counter() - started)  # the step cost model's input
        return outputs

    def _retire(self, req: Request) -> None:
        req.metrics.finished_time = time.time()
        self.requests.pop(req.request_id, None)
        self.num_requests_finished += 1

    def _process_aborts(self) -> list[RequestOutput]:
        outputs = []
        ids, self._aborts = self._aborts, []
        for rid in ids:
            req = self.requests.get(rid)
            if req is None:
                continue  # finished already, or never existed
            live = [seq for seq in req.seqs if not seq.finished]
            for seq in live:
                self.scheduler.finish(seq)
                self.outputs.abort(seq)
            req.pending_forks = 0
            outputs.append(self.outputs.delta(req, live))
            self._retire(req)
        return outputs

    # ---- introspection --------------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_requests": len(self.requests),
            "num_free_blocks": bm.num_free_blocks,
            "num_total_blocks": bm.num_blocks,
            "kv_cache_usage": bm.usage(),
            "prefix_cache_hit_rate": bm.hit_tokens / bm.queried_tokens if bm.queried_tokens else 0.0,
            "prompt_tokens_total": self.num_prompt_tokens,
            "generation_tokens_total": self.outputs.num_generation_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_requests_finished": self.num_requests_finished,
        }

    # ---- embeddings -----------------------------------------------------------------------------
    def embed(
        self, token_id_lists: list[list[int]], truncate_prompt_tokens: int | None = None
    ) -> torch.Tensor:
        """Last-token pooled, L2-normalised final hidden states, float32 [N, hidden]. Runs the same paged
        forward in batches under the token budget, on blocks borrowed for the call and given back."""
        cfg = self.model_config
        lists = check_embedding_inputs(
            token_id_lists,
            vocab_size=cfg.vocab_size,
            max_model_len=cfg.max_model_len,
            truncate_prompt_tokens=truncate_prompt_tokens,
        )
        out = torch.empty(len(lists), cfg.hidden_size, dtype=torch.float32)
        lens = [len(ids) for ids in lists]
        limits = self.scheduler.config
        for start, end in packed_batches(lens, limits.max_num_batched_tokens, limits.max_num_seqs):
            i = start
            while i < end:
                tables: list[list[int]] = []  # borrowed until the forward is done
                while i + len(tables) < end:
                    blocks = self.block_manager.borrow(lens[i + len(tables)])
                    if blocks is None:
                        break  # KV cache busy with generations: embed what fits, then the rest
                    tables.append(blocks)
                if not tables:
                    raise RuntimeError(
                        f"not enough free KV-cache blocks to embed input {i} ({lens[i]} tokens); "
                        "retry when the engine is less busy"
                    )
                try:
                    hidden = self.runner.last_hidden_states(lists[i : i + len(tables)], tables)
                    out[i : i + len(tables)] = torch.nn.functional.normalize(hidden.float(), dim=-1).cpu()
                finally:
                    for blocks in tables:
                        self.block_manager.give_back(blocks)
                i += len(tables)
        return out
