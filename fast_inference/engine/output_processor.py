"""OutputProcessor: sampled tokens -> RequestOutput deltas. It owns incremental detokenization, the stop
rules (EOS, stop token ids, stop strings, a completed grammar, max_tokens, max_model_len) and logprob
entries, whose token text is decoded here once per token id (cached) and nowhere else."""

import logging
import time

import torch

from .detokenizer import decode_new_text, find_stop, flush_text, held_back
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampler import SamplerOutput, token_logprobs
from .scheduler import SchedulerOutput
from .sequence import Request, Sequence

logger = logging.getLogger("fast_inference.engine")


class TokenText:
    """Token id -> its text on its own, cached (the same ids recur in every request's logprobs)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id])
        return text


class OutputProcessor:
    def __init__(self, tokenizer, model_config) -> None:
        self.tokenizer = tokenizer
        self.model_config = model_config  # eos_token_ids and max_model_len, read when used
        self.token_text = TokenText(tokenizer)
        self.num_generation_tokens = 0

    def logprob_entry(self, chosen: int, chosen_lp: float, rank: int, top_ids, top_lps) -> dict[int, Logprob]:
        """The top candidates by rank, plus the chosen token when it is not among them."""
        entry = {t: Logprob(lp, r + 1, self.token_text(t)) for r, (t, lp) in enumerate(zip(top_ids, top_lps))}
        if chosen not in entry:
            entry[chosen] = Logprob(chosen_lp, rank, self.token_text(chosen))
        return entry

    @staticmethod
    def prompt_logprob_rows(batch: SchedulerOutput) -> list[tuple[Request, int, int]]:
        """(request, flat new-token index, prompt position) of each prompt position this step computes
        whose prompt logprob is still missing: position p gives the logprob of prompt token p + 1."""
        rows = []
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            req = seq.request
            if req.prompt_logprobs is not None:
                start = seq.num_computed
                for p in range(
                    max(start, len(req.prompt_logprobs) - 1), min(start + n, seq.num_prompt_tokens - 1)
                ):
                    rows.append((req, offset + p - start, p))
            offset += n
        return rows

    def add_prompt_logprobs(self, rows: list[tuple[Request, int, int]], logits: torch.Tensor) -> None:
        """logits: float32 [len(rows), V], the raw logits at each row's position."""
        targets = [req.prompt_token_ids[p + 1] for req, _, p in rows]
        ks = [req.params.prompt_logprobs for req, _, _ in rows]
        results = token_logprobs(logits, torch.tensor(targets, dtype=torch.int64, device=logits.device), ks)
        for (req, _, _), target, (chosen, rank, top_ids, top_lps) in zip(rows, targets, results):
            req.prompt_logprobs.append(self.logprob_entry(target, chosen, rank, top_ids, top_lps))

    def process(
        self, seqs: list[Sequence], sampled: SamplerOutput
    ) -> tuple[list[RequestOutput], list[Sequence]]:
        """Append each sequence's sampled token; return the step's deltas and the sequences that finished."""
        finished: list[Sequence] = []
        touched: dict[str, list[Sequence]] = {}
        lps = sampled.logprobs
        now = time.time()
        for i, (seq, token) in enumerate(zip(seqs, sampled.token_ids)):
            req = seq.request
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            if self._append(seq, token, lps[i] if lps is not None else None):
                finished.append(seq)
            touched.setdefault(req.request_id, []).append(seq)
        self.num_generation_tokens += len(seqs)
        return [self.delta(changed[0].request, changed) for changed in touched.values()], finished

    def abort(self, seq: Sequence) -> None:
        seq.finish_reason = "abort"
        seq.visible_len = len(seq.text)

    def delta(self, req: Request, seqs: list[Sequence]) -> RequestOutput:
        """What `seqs` (the request's sequences that changed this step) gained since their last output."""
        want_lp = req.params.logprobs is not None
        comps = []
        for seq in seqs:
            start = seq.num_prompt_tokens + seq.num_sent_tokens
            text = seq.text[seq.num_sent_chars : seq.visible_len]
            comps.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=seq.token_ids[start:],
                    cumulative_logprob=seq.cumulative_logprob if want_lp else None,
                    logprobs=seq.new_logprobs if want_lp else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
            seq.num_sent_tokens = seq.num_output_tokens
            seq.num_sent_chars = seq.visible_len
            if want_lp:
                seq.new_logprobs = []
        prompt_logprobs = None
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent and comps:
            prompt_logprobs = req.prompt_logprobs
            req.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=comps,
            finished=req.finished,
            metrics=req.metrics,
            num_cached_tokens=req.num_cached_tokens,
            prompt_logprobs=prompt_logprobs,
        )

    # ---- one token -------------------------------------------------------------------------------
    def _append(self, seq: Sequence, token: int, lp) -> bool:
        """Append token (and its logprobs), decode the new text, apply the stop rules; True if it finished."""
        req = seq.request
        params = req.params
        seq.token_ids.append(token)
        if seq.grammar is not None and not seq.grammar.accept(token):
            logger.warning("request %s: the grammar refused sampled token %d", req.request_id, token)
        if lp is not None:
            chosen, rank, top_ids, top_lps = lp
            seq.new_logprobs.append(self.logprob_entry(token, chosen, rank, top_ids, top_lps))
            seq.cumulative_logprob += chosen
        generated = seq.num_output_tokens
        checks = generated >= params.min_tokens
        skip = params.skip_special_tokens
        stops = params.stop_strings
        finish: str | None = None
        stop_reason: int | str | None = None
        if checks and token in req.stop_token_ids:
            finish = "stop"
            explicit = params.stop_token_ids is not None and token in params.stop_token_ids
            stop_reason = None if token in self.model_config.eos_token_ids and not explicit else token
            if params.include_stop_str_in_output:
                self._add_text(seq, flush_text(self.tokenizer, seq, skip), stops, False)
            else:
                # Release text still pending before the stop token (e.g. a trailing partial character).
                seq.token_ids.pop()
                self._add_text(seq, flush_text(self.tokenizer, seq, skip), stops, False)
                seq.token_ids.append(token)
        else:
            found = self._add_text(seq, decode_new_text(self.tokenizer, seq, skip), stops, checks)
            if found is not None:
                finish, stop_reason = "stop", found
            elif seq.grammar is not None and seq.grammar.only_stop_allowed():
                finish = "stop"  # the grammar is complete (a finished JSON value): nothing else may follow
                stop_reason = self._add_text(seq, flush_text(self.tokenizer, seq, skip), stops, checks)
            elif generated >= seq.max_tokens or seq.num_tokens >= self.model_config.max_model_len:
                finish = "length"
                found = self._add_text(seq, flush_text(self.tokenizer, seq, skip), stops, checks)
                if found is not None:
                    finish, stop_reason = "stop", found
        if finish is None:
            seq.visible_len = len(seq.text) - held_back(seq.text, stops) if stops else len(seq.text)
            return False
        seq.visible_len = len(seq.text)
        seq.finish_reason = finish
        seq.stop_reason = stop_reason
        return True

    @staticmethod
    def _add_text(seq: Sequence, delta: str, stops: list[str], check: bool) -> str | None:
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
        keep = idx + len(stop) if seq.request.params.include_stop_str_in_output else idx
        seq.text = seq.text[:keep]
        return stop
