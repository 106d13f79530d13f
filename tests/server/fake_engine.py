"""A deterministic stand-in for LLMEngine with exactly its interface (no model compute), for server tests."""

import math
import random
from types import SimpleNamespace

import torch

from fast_inference.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from fast_inference.engine.sampling_params import SamplingParams


class _Seq:
    def __init__(self, index: int, params: SamplingParams, request_id: str) -> None:
        self.index = index
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason = None
        seed = params.seed if params.seed is not None else hash((request_id, index)) & 0xFFFF
        self.rng = random.Random(seed * 1000 + index if params.seed is not None else seed)


class _Req:
    def __init__(self, request_id, prompt, prompt_ids, params, arrival):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.seqs = [_Seq(i, params, request_id) for i in range(params.n)]
        self.metrics = RequestMetrics(arrival_time=arrival or 0.0)
        self.blocks = 0


class FakeEngine:
    """Generates token (31 * last + 7 * position + 3) % vocab (greedy); blocks are accounted like a paged cache."""

    def __init__(self, args) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(args.model))
        vocab = len(self.tokenizer)
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.model_config = SimpleNamespace(
            max_model_len=args.max_model_len or 256, vocab_size=vocab, eos_token_ids=[eos],
            dtype=torch.float32, device=torch.device("cpu"), architecture="LlamaForCausalLM",
            hidden_size=16, model_path=str(args.model))
        self.supports_generation = True
        self.block_size = args.block_size
        self.num_total_blocks = 4096
        self.max_num_seqs = args.max_num_seqs
        self._free = self.num_total_blocks
        self._requests: dict[str, _Req] = {}
        self._order: list[str] = []
        self.stats_calls = 0
        self.embed_calls: list[int] = []

    def add_request(self, request_id, prompt, params, arrival_time=None) -> None:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt must not be empty")
        if len(ids) >= self.model_config.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds max_model_len {self.model_config.max_model_len}")
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id}")
        req = _Req(request_id, prompt if isinstance(prompt, str) else None, ids, params, arrival_time)
        req.blocks = params.n * math.ceil(len(ids) / self.block_size)
        self._free -= req.blocks
        self._requests[request_id] = req
        self._order.append(request_id)

    def abort_request(self, request_id) -> None:
        req = self._requests.pop(request_id, None)
        if req is not None:
            self._order.remove(request_id)
            self._free += req.blocks

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def _next(self, req: _Req, seq: _Seq) -> tuple[int, dict[int, Logprob] | None]:
        vocab = self.model_config.vocab_size
        ids = req.prompt_ids + seq.token_ids
        pos = len(ids)
        base = (31 * ids[-1] + 7 * pos + 3) % vocab
        p = req.params
        cands = [(base + k * 13) % vocab for k in range(5)]
        if p.temperature > 0:
            token = cands[seq.rng.randrange(len(cands))]
        else:
            token = base
        if len(seq.token_ids) < p.min_tokens or p.ignore_eos:
            eos = set(self.model_config.eos_token_ids)
            if token in eos:
                token = (token + 1) % vocab
        if p.logit_bias:
            best = max(p.logit_bias.items(), key=lambda kv: kv[1])
            if best[1] >= 50:
                token = best[0]
        lp = None
        if p.logprobs is not None:
            lp = {c: Logprob(-0.5 - k, rank=k + 1, decoded_token=self.tokenizer.decode([c])) for k, c in
                  enumerate(cands[: max(p.logprobs, 1)])}
            if token not in lp:
                lp[token] = Logprob(-9.0, rank=50, decoded_token=self.tokenizer.decode([token]))
        return token, lp

    def step(self) -> list[RequestOutput]:
        outputs = []
        for request_id in list(self._order[: self.max_num_seqs]):
            req = self._requests[request_id]
            p = req.params
            for seq in req.seqs:
                if seq.finish_reason is not None:
                    continue
                token, lp = self._next(req, seq)
                seq.token_ids.append(token)
                if lp is not None:
                    seq.logprobs.append(lp)
                    seq.cumulative_logprob += lp[token].logprob
                total = len(req.prompt_ids) + len(seq.token_ids)
                if total % self.block_size == 1:
                    req.blocks += 1
                    self._free -= 1
                text = self.tokenizer.decode(seq.token_ids, skip_special_tokens=p.skip_special_tokens)
                if text.endswith("\ufffd"):
                    text = seq.text  # hold back an incomplete UTF-8 sequence
                seq.text = text
                eos = not p.ignore_eos and token in self.model_config.eos_token_ids
                if len(seq.token_ids) >= p.min_tokens:
                    if eos or (p.stop_token_ids and token in p.stop_token_ids):
                        seq.finish_reason, seq.stop_reason = "stop", (None if eos else token)
                    for s in p.stop_strings:
                        at = seq.text.find(s)
                        if at >= 0:
                            seq.text = seq.text[:at]
                            seq.finish_reason, seq.stop_reason = "stop", s
                            break
                max_tokens = p.max_tokens if p.max_tokens is not None else 10**9
                if seq.finish_reason is None and (len(seq.token_ids) >= max_tokens
                                                  or total >= self.model_config.max_model_len):
                    seq.finish_reason = "length"
            finished = all(s.finish_reason is not None for s in req.seqs)
            outputs.append(RequestOutput(
                request_id, req.prompt, req.prompt_ids,
                [CompletionOutput(s.index, s.text, list(s.token_ids), s.cumulative_logprob if s.logprobs is not None
                                  else None, list(s.logprobs) if s.logprobs is not None else None,
                                  s.finish_reason, s.stop_reason) for s in req.seqs],
                finished, req.metrics))
            if finished:
                self.abort_request(request_id)
        return outputs

    def stats(self) -> dict:
        self.stats_calls += 1
        running = min(len(self._order), self.max_num_seqs)
        return {"num_running": running, "num_waiting": len(self._order) - running,
                "num_free_blocks": self._free, "num_total_blocks": self.num_total_blocks,
                "kv_cache_usage": 1.0 - self._free / self.num_total_blocks, "prefix_cache_hit_rate": 0.0,
                "num_prompt_tokens": 0, "num_generation_tokens": 0}

    def embed(self, token_id_lists: list[list[int]]) -> torch.Tensor:
        self.embed_calls.append(len(token_id_lists))
        out = torch.zeros(len(token_id_lists), 16)
        for i, ids in enumerate(token_id_lists):
            for t in ids:
                out[i, t % 16] += 1.0
        return torch.nn.functional.normalize(out, dim=-1)
