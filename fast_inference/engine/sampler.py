"""Sampler: turns a step's logits into tokens through the sampling ops (grammar mask, penalties, bias, sample,
logprobs)."""

from dataclasses import dataclass

import torch

from fast_inference import ops

from .sequence import Sequence


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    # Only when some row asked for logprobs: per row (chosen logprob, rank, top ids, top logprobs) or None.
    logprobs: list[tuple[float, int, list[int], list[float]] | None] | None = None


def _cu(lengths: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0, out=cu[1:])
    return cu


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device

    def __call__(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        token_bitmask: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SamplerOutput:
        """logits: float32 [B, V], row b belongs to seqs[b] (raw model output; modified in place).
        token_bitmask: structured outputs' (int32 [B, ceil(V / 32)] bitmask, int32 rows it constrains)."""
        dev = self.device
        temps, top_ks, top_ps, min_ps, seeds, offsets = [], [], [], [], [], []
        any_penalty = any_bias = False
        want_logprobs = 0
        for seq in seqs:
            p = seq.request.params
            temps.append(p.temperature)
            top_ks.append(p.top_k)
            top_ps.append(p.top_p)
            min_ps.append(p.min_p)
            seeds.append(seq.seed)
            offsets.append(seq.num_output_tokens)
            if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
                any_penalty = True
            if seq.request.bias_ids or (
                seq.num_output_tokens < p.min_tokens and seq.request.min_tokens_mask_ids
            ):
                any_bias = True
            if p.logprobs is not None:
                want_logprobs = max(want_logprobs, p.logprobs + 1)
        # Logprobs report the model's distribution: taken from the logits before any of this processing.
        raw = logits.clone() if want_logprobs and (any_penalty or any_bias or token_bitmask) else logits
        if token_bitmask is not None:
            # First, so penalties and bias act on the tokens the grammar allows (-inf stays -inf).
            ops.apply_token_bitmask(logits, *token_bitmask)
        if any_penalty:
            prompt_lists = [seq.token_ids[: seq.num_prompt_tokens] for seq in seqs]
            output_lists = [seq.token_ids[seq.num_prompt_tokens :] for seq in seqs]
            ops.apply_penalties(
                logits,
                torch.tensor([t for ids in prompt_lists for t in ids], dtype=torch.int64).to(dev),
                _cu([len(ids) for ids in prompt_lists]).to(dev),
                torch.tensor([t for ids in output_lists for t in ids], dtype=torch.int64).to(dev),
                _cu([len(ids) for ids in output_lists]).to(dev),
                torch.tensor([s.request.params.presence_penalty for s in seqs], dtype=torch.float32).to(dev),
                torch.tensor([s.request.params.frequency_penalty for s in seqs], dtype=torch.float32).to(dev),
                torch.tensor([s.request.params.repetition_penalty for s in seqs], dtype=torch.float32).to(
                    dev
                ),
            )
        if any_bias:
            ids: list[int] = []
            values: list[float] = []
            lens: list[int] = []
            for seq in seqs:
                req = seq.request
                before = len(ids)
                ids.extend(req.bias_ids)
                values.extend(req.bias_values)
                if seq.num_output_tokens < req.params.min_tokens:
                    # min_tokens: the sequence may not end yet, so its stop tokens are masked out.
                    ids.extend(req.min_tokens_mask_ids)
                    values.extend([float("-inf")] * len(req.min_tokens_mask_ids))
                lens.append(len(ids) - before)
            ops.apply_logit_bias(
                logits,
                torch.tensor(ids, dtype=torch.int64).to(dev),
                torch.tensor(values, dtype=torch.float32).to(dev),
                _cu(lens).to(dev),
            )
        sampled = ops.sample(
            logits,
            torch.tensor(temps, dtype=torch.float32).to(dev),
            torch.tensor(top_ks, dtype=torch.int32).to(dev),
            torch.tensor(top_ps, dtype=torch.float32).to(dev),
            torch.tensor(min_ps, dtype=torch.float32).to(dev),
            torch.tensor(seeds, dtype=torch.int64).to(dev),
            torch.tensor(offsets, dtype=torch.int64).to(dev),
        )
        out = SamplerOutput(token_ids=sampled.tolist())
        if want_logprobs:
            ks = [seq.request.params.logprobs for seq in seqs]
            out.logprobs = token_logprobs(raw, sampled, ks)
        return out


def token_logprobs(
    raw: torch.Tensor, token_ids: torch.Tensor, ks: list[int | None]
) -> list[tuple[float, int, list[int], list[float]] | None]:
    """raw: float32 [B, V] model logits; token_ids: int64 [B]. Per row with ks[b] not None: (logprob of
    token_ids[b], its rank in the raw distribution (1 = most likely), the ks[b] top ids, their logprobs)."""
    num_top = max(k for k in ks if k is not None)
    chosen_lp, top_ids, top_lps = ops.compute_logprobs(raw, token_ids, num_top)
    chosen_logit = raw.gather(1, token_ids.view(-1, 1))
    ranks = ((raw > chosen_logit).sum(dim=1) + 1).tolist()
    chosen_lp, top_ids, top_lps = chosen_lp.tolist(), top_ids.tolist(), top_lps.tolist()
    return [
        (chosen_lp[b], ranks[b], top_ids[b][:k], top_lps[b][:k]) if k is not None else None
        for b, k in enumerate(ks)
    ]
