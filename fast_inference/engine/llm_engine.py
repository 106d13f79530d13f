"""LLMEngine: requests in, one scheduler step at a time, cumulative RequestOutputs out (single-threaded)."""

import logging
import random
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from fast_inference.models.gguf import gguf_tokenizer, is_gguf_file

from .block_manager import BlockManager
from .config import EngineArgs, SchedulerConfig, load_model_config, parse_memory, resolve_device
from .detokenizer import decode_new_text, find_stop, flush_text, held_back, init_offsets
from .model_runner import ModelRunner
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Request, Sequence, SequenceStatus

logger = logging.getLogger("fast_inference.engine")

_SEED_MASK = (1 << 63) - 1
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def _child_seed(seed: int, index: int) -> int:
    """Seed of output `index` of a request: distinct streams for the n outputs, reproducible from `seed`."""
    return seed if index == 0 else hash((seed, index)) & _SEED_MASK


def load_tokenizer(path: str, chat_template: str | None = None):
    local = Path(path)
    tokenizer = gguf_tokenizer(local) if is_gguf_file(local) else _hf_tokenizer(path)
    if chat_template is not None:  # the template's text (the CLI reads --chat-template's file)
        tokenizer.chat_template = chat_template
    return tokenizer


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
        self.runner = ModelRunner(
            cfg, args.block_size, kv_bytes, args.max_num_seqs, max_batched, enforce_eager=args.enforce_eager
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
            ),
            self.block_manager,
        )
        self.sampler = Sampler(device)
        self.requests: dict[str, Request] = {}
        self._aborts: list[str] = []
        self._rng = random.Random(args.seed)
        self._next_seq_id = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_requests_finished = 0
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

    # ---- requests -------------------------------------------------------------------------------
    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (temperature, top_p, ...)."""
        return SamplingParams(**self.model_config.generation_defaults)

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def _check_token_ids(self, ids: list[int], what: str) -> list[int]:
        vocab = self.model_config.vocab_size
        out = []
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int):
                raise ValueError(f"{what} must be integers, got {t!r}")
            if not 0 <= t < vocab:
                raise ValueError(f"{what} contains token id {t}, outside the vocabulary [0, {vocab})")
            out.append(int(t))
        return out

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        if params is None:
            params = self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if isinstance(prompt, str):
            prompt_text: str | None = prompt
            token_ids = self.tokenize(prompt)
        elif isinstance(prompt, list | tuple):
            prompt_text = None
            token_ids = self._check_token_ids(list(prompt), "prompt token ids")
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt is empty")
        max_len = self.model_config.max_model_len
        capacity = min(max_len, self.num_total_blocks * self.block_size)
        if len(token_ids) >= capacity:
            limit = "max_model_len" if capacity == max_len else "KV cache capacity"
            raise ValueError(
                f"prompt has {len(token_ids)} tokens; the {limit} is {capacity} tokens, "
                f"which leaves no room for an output token"
            )
        room = capacity - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        vocab = self.model_config.vocab_size
        for name, ids in (
            ("logit_bias", params.logit_bias or {}),
            ("stop_token_ids", params.stop_token_ids or []),
        ):
            for t in ids:
                if not 0 <= t < vocab:
                    raise ValueError(f"{name} token id {t} is outside the vocabulary [0, {vocab})")
        stop_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop_ids |= self.model_config.eos_token_ids
        now = time.time()
        req = Request(
            request_id=request_id,
            prompt=prompt_text,
            prompt_token_ids=token_ids,
            params=params,
            metrics=RequestMetrics(arrival_time=arrival_time if arrival_time is not None else now),
            pending_forks=params.n - 1,
            stop_token_ids=frozenset(stop_ids),
        )
        if params.logit_bias:
            req.bias_ids = [int(t) for t in params.logit_bias]
            req.bias_values = [float(b) for b in params.logit_bias.values()]
        if params.min_tokens > 0:
            req.min_tokens_mask_ids = sorted(stop_ids)
        seed = params.seed & _SEED_MASK if params.seed is not None else self._rng.getrandbits(63)
        req.seqs.append(self._new_seq(req, 0, list(token_ids), _child_seed(seed, 0), max_tokens))
        req.seed = seed
        self.requests[request_id] = req
        self.scheduler.add(req.seqs[0])
        self.num_prompt_tokens += len(token_ids)

    def _new_seq(
        self, req: Request, index: int, token_ids: list[int], seed: int, max_tokens: int
    ) -> Sequence:
        seq = Sequence(
            seq_id=self._next_seq_id,
            request=req,
            index=index,
            token_ids=token_ids,
            num_prompt_tokens=len(req.prompt_token_ids),
            seed=seed,
            max_tokens=max_tokens,
        )
        self._next_seq_id += 1
        if req.params.logprobs is not None:
            seq.logprobs = []
        init_offsets(seq)
        return seq

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
        """Run one scheduler step; return the outputs of requests that got tokens or finished."""
        outputs: list[RequestOutput] = []
        if self._aborts:
            outputs.extend(self._process_aborts())
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return outputs
        now = time.time()
        rows: list[int] = []
        for i, (seq, n) in enumerate(zip(sched.seqs, sched.num_new_tokens)):
            metrics = seq.request.metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
            if seq.num_computed + n == seq.num_tokens:
                rows.append(i)
        logits = self.runner.execute(sched.seqs, sched.num_new_tokens, rows)
        bm = self.block_manager
        for seq, n in zip(sched.seqs, sched.num_new_tokens):
            seq.num_computed += n
            bm.register_full_blocks(seq)
        if not rows:
            return outputs
        sample_seqs = [sched.seqs[i] for i in rows]
        if any(seq.request.pending_forks for seq in sample_seqs):
            logits, sample_seqs = self._fork(logits, sample_seqs)
        result = self.sampler(logits, sample_seqs)
        touched: dict[str, Request] = {}
        lps = result.logprobs
        for i, (seq, token) in enumerate(zip(sample_seqs, result.token_ids)):
            self._append_token(seq, token, lps[i] if lps is not None else None)
            touched[seq.request.request_id] = seq.request
        for req in touched.values():
            outputs.append(self._make_output(req))
            if req.finished:
                self._retire(req)
        return outputs

    def _fork(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, list[Sequence]]:
        """n > 1: the first sequence finished prefilling the prompt; make the other n - 1 outputs now,
        sharing its full prompt blocks, and sample each of them from the same logits row."""
        row_index: list[int] = []
        out_seqs: list[Sequence] = []
        for row, seq in enumerate(seqs):
            row_index.append(row)
            out_seqs.append(seq)
            req = seq.request
            if not req.pending_forks:
                continue
            for index in range(1, req.pending_forks + 1):
                child = self._new_seq(
                    req, index, list(seq.token_ids), _child_seed(req.seed, index), seq.max_tokens
                )
                self.block_manager.fork(seq, child)
                child.status = SequenceStatus.RUNNING
                self.scheduler.running.append(child)
                req.seqs.append(child)
                row_index.append(row)
                out_seqs.append(child)
            req.pending_forks = 0
        return logits[torch.tensor(row_index, device=logits.device)], out_seqs

    def _append_token(self, seq: Sequence, token: int, lp) -> None:
        req = seq.request
        params = req.params
        seq.token_ids.append(token)
        self.num_generation_tokens += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = time.time()
        if lp is not None:
            chosen, rank, top_ids, top_lps = lp
            entry = {
                tid: Logprob(lpv, r + 1, self._decode_one(tid))
                for r, (tid, lpv) in enumerate(zip(top_ids, top_lps))
            }
            if token not in entry:
                entry[token] = Logprob(chosen, rank, self._decode_one(token))
            seq.logprobs.append(entry)
            seq.cumulative_logprob += chosen
        generated = seq.num_output_tokens
        checks = generated >= params.min_tokens
        finish: str | None = None
        stop_reason: int | str | None = None
        stops = params.stop_strings
        if checks and token in req.stop_token_ids:
            finish = "stop"
            stop_reason = (
                None
                if token in self.model_config.eos_token_ids
                and not (params.stop_token_ids and token in params.stop_token_ids)
                else token
            )
            if params.include_stop_str_in_output:
                self._add_text(seq, flush_text(self.tokenizer, seq, params.skip_special_tokens), stops, False)
            else:
                # Release text still pending before the stop token (e.g. a trailing partial character).
                seq.token_ids.pop()
                self._add_text(seq, flush_text(self.tokenizer, seq, params.skip_special_tokens), stops, False)
                seq.token_ids.append(token)
        else:
            found = self._add_text(
                seq, decode_new_text(self.tokenizer, seq, params.skip_special_tokens), stops, checks
            )
            if found is not None:
                finish, stop_reason = "stop", found
            elif generated >= seq.max_tokens or seq.num_tokens >= self.model_config.max_model_len:
                finish = "length"
                found = self._add_text(
                    seq, flush_text(self.tokenizer, seq, params.skip_special_tokens), stops, checks
                )
                if found is not None:
                    finish, stop_reason = "stop", found
        if finish is None:
            seq.visible_len = len(seq.text) - held_back(seq.text, stops) if stops else len(seq.text)
            return
        seq.visible_len = len(seq.text)
        seq.finish_reason = finish
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq)

    def _add_text(self, seq: Sequence, delta: str, stops: list[str], check: bool) -> str | None:
        """Append decoded text; on a stop string, cut the text there and return the stop string."""
        if not delta:
            return None
        start = len(seq.text)
        seq.text += delta
        if not (stops and check):
            return None
        found = find_stop(seq.text, start, stops)
        if found is None:
            return None
        idx, stop = found
        seq.text = (
            seq.text[: idx + len(stop)] if seq.request.params.include_stop_str_in_output else seq.text[:idx]
        )
        return stop

    def _decode_one(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _make_output(self, req: Request) -> RequestOutput:
        want_lp = req.params.logprobs is not None
        comps = [
            CompletionOutput(
                index=seq.index,
                text=seq.text[: seq.visible_len],
                token_ids=seq.token_ids[seq.num_prompt_tokens :],
                cumulative_logprob=seq.cumulative_logprob if want_lp else None,
                logprobs=list(seq.logprobs) if want_lp else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for seq in req.seqs
        ]
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=comps,
            finished=req.finished,
            metrics=req.metrics,
            num_cached_tokens=req.num_cached_tokens,
        )

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
            for seq in req.seqs:
                if not seq.finished:
                    self.scheduler.finish(seq)
                    seq.finish_reason = "abort"
                    seq.visible_len = len(seq.text)
            req.pending_forks = 0
            outputs.append(self._make_output(req))
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
            "generation_tokens_total": self.num_generation_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_requests_finished": self.num_requests_finished,
        }

    # ---- embeddings -----------------------------------------------------------------------------
    def embed(self, token_id_lists: list[list[int]]) -> torch.Tensor:
        """Last-token pooled, L2-normalised final hidden states, float32 [N, hidden]. Runs the same paged
        forward in batches under the token budget, on blocks borrowed for the call and given back."""
        cfg = self.model_config
        lists = []
        for i, ids in enumerate(token_id_lists):
            ids = self._check_token_ids(list(ids), f"input {i} token ids")
            if not ids:
                raise ValueError(f"input {i} is empty")
            if len(ids) > cfg.max_model_len:
                raise ValueError(
                    f"input {i} has {len(ids)} tokens, more than max_model_len ({cfg.max_model_len})"
                )
            lists.append(ids)
        out = torch.empty(len(lists), cfg.hidden_size, dtype=torch.float32)
        budget = self.scheduler.config.max_num_batched_tokens
        bm = self.block_manager
        dummy = Request("", None, [], SamplingParams(), RequestMetrics(0.0))
        i = 0
        while i < len(lists):
            batch: list[Sequence] = []
            tokens = 0
            while i + len(batch) < len(lists):
                ids = lists[i + len(batch)]
                if batch and (tokens + len(ids) > budget or len(batch) >= self.scheduler.config.max_num_seqs):
                    break
                seq = Sequence(
                    seq_id=-1,
                    request=dummy,
                    index=0,
                    token_ids=ids,
                    num_prompt_tokens=len(ids),
                    seed=0,
                    max_tokens=0,
                )
                if not bm.can_grow(seq, len(ids)):
                    if not batch:
                        raise RuntimeError(
                            f"not enough free KV-cache blocks to embed input {i} "
                            f"({len(ids)} tokens); retry when the engine is less busy"
                        )
                    break
                bm.grow(seq, len(ids))
                batch.append(seq)
                tokens += len(ids)
            try:
                hidden = self.runner.hidden_states(batch, [s.num_tokens for s in batch])
                out[i : i + len(batch)] = torch.nn.functional.normalize(hidden.float(), dim=-1).cpu()
            finally:
                for seq in batch:
                    bm.free_seq(seq)
            i += len(batch)
        return out
