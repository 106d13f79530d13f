"""Structured outputs: grammars compiled once per (kind, spec) in a bounded cache, one matcher per sequence,
and each step's token bitmask, filled on a worker thread while the model runs and applied to the logits
by ops.apply_token_bitmask before penalties and sampling (the grammar engine is xgrammar)."""

import json
import re
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .intake import InvalidRequestError
from .sampling_params import StructuredOutputsParams

# Compiled grammars kept (least recently used dropped first): a compiled JSON schema holds per-token
# tables of a few hundred KB on a 150k vocabulary.
GRAMMAR_CACHE_SIZE = 128
# Whitespace between JSON elements is free (models write pretty JSON; 16 indents 7 levels) but bounded, so a model cannot
# spend its whole budget on newlines, a failure mode of unbounded JSON grammars.
MAX_JSON_WHITESPACE = 16
# xgrammar prefixes its errors with "[time] file.cc:line: " and check macros; the reason follows.
_ERROR_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s*\S+:\d+:\s*(Check failed: .*? is false: )?")


def grammar_key(spec: StructuredOutputsParams) -> tuple[str, str]:
    """(kind, spec text): the cache key, also what the grammar is compiled from."""
    if spec.json is not None:
        return "json", spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
    if spec.json_object:
        return "json_object", ""
    if spec.regex is not None:
        return "regex", spec.regex
    if spec.choice is not None:
        return "choice", json.dumps(spec.choice, ensure_ascii=False)
    return "grammar", spec.grammar


class SequenceGrammar:
    """The grammar state of one sequence: an xgrammar matcher that has accepted its output tokens."""

    __slots__ = ("grammar", "matcher", "num_accepted")

    def __init__(self, grammar: "CompiledGrammar") -> None:
        import xgrammar

        self.grammar = grammar
        self.matcher = xgrammar.GrammarMatcher(grammar.compiled)
        self.num_accepted = 0  # tokens given to accept(), refused ones included

    def fork(self, output_token_ids: list[int]) -> "SequenceGrammar":
        """A copy in the same state (n > 1 forks), replayed from the tokens rather than sharing the parent's
        matcher, which the mask thread may be reading."""
        child = SequenceGrammar(self.grammar)
        child.sync(output_token_ids)
        return child

    def accept(self, token: int) -> bool:
        """Advance by one sampled token; False (state unchanged) if the grammar refuses it, which the mask
        rules out."""
        self.num_accepted += 1
        return self.matcher.accept_token(token)

    def sync(self, output_token_ids: list[int]) -> None:
        """Make the matcher's state that of these output tokens: a no-op when it has accepted exactly them
        (preemption by recompute keeps the generated tokens), else rebuilt by replaying them."""
        if self.num_accepted == len(output_token_ids):
            return
        self.matcher.reset()
        self.num_accepted = 0
        for token in output_token_ids:
            self.accept(token)

    def fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the allowed next tokens into bitmask[row]; False when every token is allowed."""
        return self.matcher.fill_next_token_bitmask(bitmask, row)

    def only_stop_allowed(self) -> bool:
        """The grammar is complete and allows nothing but a stop token (EOS): the output is done."""
        if self.matcher.is_terminated():
            return True
        if not self.matcher.is_completed():
            return False
        scratch = self.grammar.scratch
        self.matcher.fill_next_token_bitmask(scratch, 0)
        return not bool((scratch[0] & self.grammar.non_stop_words).any())


class CompiledGrammar:
    """A compiled grammar and what its matchers share: the scratch row and the mask of non-stop tokens."""

    __slots__ = ("compiled", "scratch", "non_stop_words")

    def __init__(self, compiled, scratch: torch.Tensor, non_stop_words: torch.Tensor) -> None:
        self.compiled = compiled
        self.scratch = scratch
        self.non_stop_words = non_stop_words


class GrammarMasks:
    """One step's bitmasks: row r belongs to the r-th sampling sequence of the batch (forks share their
    parent's row). `rows` lists the filled rows that restrict anything."""

    def __init__(self, bitmask: torch.Tensor, device: torch.device) -> None:
        self.bitmask = bitmask
        self.device = device
        self.rows: set[int] = set()

    def select(self, seqs, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(bitmask [len(seqs), W], int32 indices of the constrained rows) on the logits' device, for the
        sampler's rows (rows[i] is seqs[i]'s row), or None when no row is restricted."""
        picked = [
            i for i, (seq, row) in enumerate(zip(seqs, rows)) if seq.grammar is not None and row in self.rows
        ]
        if not picked:
            return None
        # Without forks the rows are 0..len-1: a view; forks repeat their parent's row: a gather.
        in_order = rows == list(range(len(rows)))
        bitmask = self.bitmask[: len(rows)] if in_order else self.bitmask[torch.tensor(rows)]
        return bitmask.to(self.device), torch.tensor(picked, dtype=torch.int32).to(self.device)


class StructuredOutputs:
    """The engine's grammar side. compile() at intake (a bad spec raises InvalidRequestError naming
    structured_outputs, which the server answers with a 400 and the grammar engine's reason);
    start_fill() each step before the forward, its result handed to the sampler."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        stop_token_ids: set[int],
        device: torch.device,
        max_num_seqs: int,
        overlap: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width: the bitmask covers it, the tokenizer may be shorter
        self.stop_token_ids = sorted(stop_token_ids)
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.overlap = overlap  # fill bitmasks on a worker thread while the model runs
        self._compiler = None
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._bitmask: torch.Tensor | None = None
        self._pool: ThreadPoolExecutor | None = None

    # ---- intake ---------------------------------------------------------------------------------
    def _ensure_compiler(self):
        if self._compiler is None:
            import xgrammar

            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids or None
            )
            # Our cache bounds what is kept; xgrammar's own would grow without limit.
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            self._bitmask = xgrammar.allocate_token_bitmask(self.max_num_seqs, self.vocab_size)
            if self.device.type == "cuda":
                self._bitmask = self._bitmask.pin_memory()
            words = self._bitmask.shape[1]
            non_stop = torch.full((words * 32,), True)
            non_stop[self.vocab_size :] = False
            non_stop[self.stop_token_ids] = False
            weights = (1 << torch.arange(32, dtype=torch.int64)).view(1, 32)
            packed = (non_stop.view(words, 32).to(torch.int64) * weights).sum(1)
            self._non_stop_words = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
        return self._compiler

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        key = grammar_key(spec)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        compiler = self._ensure_compiler()
        kind, text = key
        try:
            if kind == "json":
                if isinstance(spec.json, str):
                    json.loads(text)  # a clear error for text that is not JSON at all
                compiled = compiler.compile_json_schema(
                    text, any_whitespace=True, max_whitespace_cnt=MAX_JSON_WHITESPACE
                )
            elif kind == "json_object":
                compiled = compiler.compile_json_schema(
                    '{"type": "object"}',
                    any_whitespace=True,
                    max_whitespace_cnt=MAX_JSON_WHITESPACE,
                    strict_mode=False,
                )
            elif kind == "regex":
                compiled = compiler.compile_regex(text)
            elif kind == "choice":
                # JSON string escapes are the grammar's literal escapes.
                alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
                compiled = compiler.compile_grammar(f"root ::= {alternatives}")
            else:
                compiled = compiler.compile_grammar(text)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(
                f"structured_outputs.json is not valid JSON: {exc}", "structured_outputs"
            ) from None
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = (
                _ERROR_PREFIX.sub("", str(exc)).strip().splitlines()[0]
                if str(exc).strip()
                else type(exc).__name__
            )
            raise InvalidRequestError(
                f"invalid {_KIND_NAMES[kind]}: {reason}", "structured_outputs"
            ) from None
        scratch = torch.empty(1, self._bitmask.shape[1], dtype=torch.int32)
        grammar = CompiledGrammar(compiled, scratch, self._non_stop_words)
        self._cache[key] = grammar
        while len(self._cache) > GRAMMAR_CACHE_SIZE:
            self._cache.popitem(last=False)
        return grammar

    # ---- each step ------------------------------------------------------------------------------
    def start_fill(self, batch) -> "Future[GrammarMasks] | GrammarMasks | None":
        """Begin filling the bitmask rows of this step's constrained sampling sequences (row r = the r-th
        sequence of the batch that samples, as in batch.sample_token_rows()); None when there are none."""
        work: list[tuple[int, object]] = []
        row = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.num_computed + n == seq.num_tokens:
                if seq.grammar is not None:
                    work.append((row, seq))
                row += 1
        if not work:
            return None
        masks = GrammarMasks(self._bitmask, self.device)
        if not self.overlap:
            return self._fill(masks, work)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        return self._pool.submit(self._fill, masks, work)

    @staticmethod
    def _fill(masks: GrammarMasks, work) -> GrammarMasks:
        for row, seq in work:
            grammar = seq.grammar
            grammar.sync(seq.output_token_ids)
            if grammar.fill(masks.bitmask, row):
                masks.rows.add(row)
        return masks

    @staticmethod
    def finish_fill(pending) -> GrammarMasks | None:
        """Wait for start_fill's work (before the scheduler forks sequences whose matchers it reads)."""
        return pending.result() if isinstance(pending, Future) else pending


_KIND_NAMES = {
    "json": "JSON schema",
    "json_object": "json_object",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
}
