"""What the engine returns: per-request output DELTAS in the vLLM shape, and how consumers fold them up."""

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    """One candidate token at one position: its log-probability under the model's raw distribution."""

    logprob: float
    rank: int | None = None  # 1 = most likely token
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    """One of the n sequences of a request.

    From the engine it is a delta: the text, token ids and logprobs added since that sequence's previous
    output. After RequestOutput.add has folded the deltas together it holds everything so far."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # over all tokens so far (not only this delta's)
    # One dict per token of this output: the chosen token and the top-n candidates, by token id.
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    """What one engine step added to one request (only the sequences that changed are listed)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    # SamplingParams.prompt_logprobs: one entry per prompt token, the first None (nothing predicts it).
    # Sent once, in the delta of the step that finished the prompt.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    extra: dict = field(default_factory=dict)

    def add(self, delta: "RequestOutput") -> None:
        """Fold a later delta of the same request into this output, which then holds both."""
        mine = {c.index: c for c in self.outputs}
        for c in delta.outputs:
            acc = mine.get(c.index)
            if acc is None:
                acc = CompletionOutput(
                    c.index, c.text, list(c.token_ids), c.cumulative_logprob,
                    list(c.logprobs) if c.logprobs is not None else None, c.finish_reason, c.stop_reason,
                )  # fmt: skip
                self.outputs.append(acc)
                mine[c.index] = acc
                continue
            acc.text += c.text
            acc.token_ids.extend(c.token_ids)
            if c.logprobs is not None:
                if acc.logprobs is None:
                    acc.logprobs = []
                acc.logprobs.extend(c.logprobs)
            acc.cumulative_logprob = c.cumulative_logprob
            acc.finish_reason = c.finish_reason
            acc.stop_reason = c.stop_reason
        if len(self.outputs) > 1:
            self.outputs.sort(key=lambda c: c.index)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.finished = delta.finished
        self.metrics = delta.metrics
        self.num_cached_tokens = delta.num_cached_tokens
