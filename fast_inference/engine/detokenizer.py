"""Incremental, streaming-safe detokenization and stop-string matching for one sequence at a time."""

from .sequence import Sequence

# How many prompt tokens give the first output tokens their context, so tokenizers that decide on
# leading spaces from the previous token (SentencePiece) decode the first token as they would in context.
_PREFIX_CONTEXT = 5


def init_offsets(seq: Sequence) -> None:
    seq.prefix_offset = max(seq.num_prompt_tokens - _PREFIX_CONTEXT, 0)
    seq.read_offset = seq.num_prompt_tokens


def decode_new_text(tokenizer, seq: Sequence, skip_special_tokens: bool) -> str:
    """Text added by the tokens appended since the last call; "" while the tail is an incomplete
    UTF-8 character (it shows up once the rest of its bytes arrive)."""
    ids = seq.token_ids
    prefix_text = tokenizer.decode(
        ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=skip_special_tokens
    )
    new_text = tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=skip_special_tokens)
    if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
        return ""
    seq.prefix_offset = seq.read_offset
    seq.read_offset = len(ids)
    return new_text[len(prefix_text) :]


def flush_text(tokenizer, seq: Sequence, skip_special_tokens: bool) -> str:
    """At the end of a sequence: whatever is still pending (e.g. a truncated multi-byte character)."""
    ids = seq.token_ids
    if seq.read_offset >= len(ids):
        return ""
    prefix_text = tokenizer.decode(
        ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=skip_special_tokens
    )
    new_text = tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=skip_special_tokens)
    seq.prefix_offset = seq.read_offset = len(ids)
    return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


def find_stop(text: str, start: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string occurrence in text that ends after index `start`: (index, stop)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        idx = text.find(stop, max(0, start - len(stop) + 1))
        if idx >= 0 and (best is None or idx < best[0]):
            best = (idx, stop)
    return best


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that could be the start of a stop string (not shown yet)."""
    keep = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:k]):
                keep = k
                break
    return keep
