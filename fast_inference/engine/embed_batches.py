"""packed_batches: how both engines cut a list of embedding inputs into forwards (token budget, sequence cap)."""

from collections.abc import Iterator


def packed_batches(lens: list[int], max_tokens: int, max_seqs: int) -> Iterator[tuple[int, int]]:
    """(start, end) ranges of consecutive inputs, each at most max_seqs inputs and max_tokens tokens
    (an input longer than max_tokens goes alone); inputs keep their order."""
    start = 0
    while start < len(lens):
        end, tokens = start, 0
        while (
            end < len(lens) and end - start < max_seqs and (end == start or tokens + lens[end] <= max_tokens)
        ):
            tokens += lens[end]
            end += 1
        yield start, end
        start = end
