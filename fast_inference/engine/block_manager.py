"""BlockManager: paged KV-cache blocks with ref counts and automatic prefix caching (hash chain + LRU)."""

from collections import OrderedDict

from .sequence import Sequence


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """Hash of a full block, chained on its parent's hash so it names the whole token prefix."""
    return hash((parent, tokens))


class BlockManager:
    """Owns block ids [0, num_blocks). Free blocks sit in an LRU: blocks without cached content at the
    front (taken first), freed cached blocks at the back, so a cached prefix is evicted only when needed."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hit_tokens = 0
        self.queried_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation -----------------------------------------------------------------------------
    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.hashes[block]
        if h is not None:  # evict its cached content
            if self.cached.get(h) == block:
                del self.cached[h]
            self.hashes[block] = None
        self.ref_counts[block] = 1
        return block

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Can seq's table cover num_tokens tokens with the free blocks left?"""
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= len(self.free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_needed(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_free())

    def free_seq(self, seq: Sequence) -> None:
        self.give_back(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0

    def borrow(self, num_tokens: int) -> list[int] | None:
        """Blocks for num_tokens tokens outside any sequence (an embedding forward), or None when too few
        are free. Return them with give_back."""
        need = self.blocks_needed(num_tokens)
        if need > len(self.free):
            return None
        return [self._take_free() for _ in range(need)]

    def give_back(self, blocks: list[int]) -> None:
        # Reverse order: a prefix's tail blocks are less likely to be shared, so they are evicted first.
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if self.hashes[block] is None:
                    self.free.move_to_end(block, last=False)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share parent's full blocks with child (ref counts). A partly filled last block is not shared:
        the child recomputes those few tokens into a block of its own at its next step."""
        num_full = parent.num_computed // self.block_size
        child.block_table = parent.block_table[:num_full]
        child.block_hashes = parent.block_hashes[:num_full]
        child.num_computed = num_full * self.block_size
        for block in child.block_table:
            self.ref_counts[block] += 1

    # ---- prefix caching -------------------------------------------------------------------------
    def lookup(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Cached blocks holding seq's leading full blocks, (blocks, hashes). At least one token is left
        uncached so the step that finishes the prefill has a logit row to sample from."""
        if not self.enable_prefix_caching:
            return [], []
        bs = self.block_size
        tokens = seq.token_ids
        max_blocks = (len(tokens) - 1) // bs
        blocks: list[int] = []
        hashes: list[int] = []
        parent = None
        for i in range(max_blocks):
            h = block_hash(parent, tuple(tokens[i * bs : (i + 1) * bs]))
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def num_free_after_hits(self, hits: list[int]) -> int:
        return len(self.free) - sum(1 for b in hits if self.ref_counts[b] == 0)

    def take_hits(self, seq: Sequence, blocks: list[int], hashes: list[int]) -> None:
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
        seq.block_table = list(blocks)
        seq.block_hashes = list(hashes)
        seq.num_computed = len(blocks) * self.block_size

    def record_query(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.queried_tokens += num_prompt_tokens
        self.hit_tokens += num_hit_tokens

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish seq's newly computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = seq.num_computed // bs
        hashes = seq.block_hashes
        tokens = seq.token_ids
        for i in range(len(hashes), num_full):
            h = block_hash(hashes[-1] if hashes else None, tuple(tokens[i * bs : (i + 1) * bs]))
            hashes.append(h)
            block = seq.block_table[i]
            if self.hashes[block] is None and h not in self.cached:
                self.hashes[block] = h
                self.cached[h] = block
