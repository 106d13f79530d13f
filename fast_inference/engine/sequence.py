"""Sequence (one generated continuation and its KV blocks) and Request (a prompt with its n sequences)."""

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .outputs import Logprob, RequestMetrics
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .structured_outputs import SequenceGrammar

SEED_MASK = (1 << 63) - 1
_seq_ids = itertools.count()


def child_seed(seed: int, index: int) -> int:
    """Seed of output `index` of a request: distinct streams for the n outputs, reproducible from `seed`."""
    return seed if index == 0 else hash((seed, index)) & SEED_MASK


class SequenceStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass(slots=True, eq=False)
class Sequence:
    request: "Request"
    index: int  # which of the request's n outputs this is
    token_ids: list[int]  # prompt + generated
    num_prompt_tokens: int
    seed: int
    max_tokens: int  # already capped to fit max_model_len
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0  # tokens whose keys/values are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # prefix-chain hashes of the leading full blocks
    # Text state (see detokenizer.py): full decoded output text and the incremental-decode offsets.
    text: str = ""
    visible_len: int = 0  # text[:visible_len] is what outputs show (stop-string prefixes held back)
    prefix_offset: int = 0
    read_offset: int = 0
    # What has been reported in outputs so far (each output is the delta past these).
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    new_logprobs: list[dict[int, Logprob]] = field(default_factory=list)  # not reported yet
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    grammar: "SequenceGrammar | None" = None  # structured outputs: the matcher of the output so far

    def fork(self, index: int) -> "Sequence":
        """Output `index` of an n > 1 request, made when this (output 0) has just computed the prompt."""
        return Sequence(
            request=self.request,
            index=index,
            token_ids=list(self.token_ids),
            num_prompt_tokens=self.num_prompt_tokens,
            seed=child_seed(self.request.seed, index),
            max_tokens=self.max_tokens,
            status=SequenceStatus.RUNNING,
            prefix_offset=self.prefix_offset,
            read_offset=self.read_offset,
            grammar=self.grammar.fork(self.output_token_ids) if self.grammar is not None else None,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seqs: list[Sequence] = field(default_factory=list)
    # n > 1: the first sequence prefills the prompt alone and is forked into n once its prefill completes.
    pending_forks: int = 0
    num_cached_tokens: int = 0
    seed: int = 0  # the request's seed (given, or drawn from the engine's seeded RNG)
    stop_token_ids: frozenset[int] = frozenset()  # EOS (unless ignore_eos) + params.stop_token_ids
    # Per-row tensors for logit bias + min_tokens masking, built once: (token_ids, biases).
    bias_ids: list[int] = field(default_factory=list)
    bias_values: list[float] = field(default_factory=list)
    min_tokens_mask_ids: list[int] = field(default_factory=list)
    # params.prompt_logprobs: filled as the prompt's chunks are computed ([None] + one dict per token).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        return self.pending_forks == 0 and all(s.finished for s in self.seqs)
