"""AttentionMetadata: the per-forward batch description every attention layer reads (paged KV layout),
and build_metadata, the one place it is built (the decoder's model runner and the encoder engine)."""

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """One forward's flattened, unpadded batch: where new tokens go in the cache and what they attend to.

    Built once per forward; every layer uses the same tensors.
    """

    slot_mapping: torch.Tensor  # int64 [num_tokens]: cache slot of each new token (negative = padding)
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor  # int32 [num_seqs]: context length including this forward's tokens
    cu_query_lens: torch.Tensor  # int32 [num_seqs + 1]: prefix sums of this forward's tokens per sequence
    causal: bool = True  # False for bidirectional (encoder) attention


def build_metadata(
    block_tables: list[list[int]],
    starts: list[int],
    num_new: list[int],
    block_size: int,
    device: torch.device,
    causal: bool = True,
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Sequence s computes num_new[s] tokens from position starts[s], its KV in block_tables[s] (ragged:
    padded with block 0, never read past seq_lens). Returns the tokens' positions (int64 [sum(num_new)])
    and the metadata, both on device."""
    num_seqs = len(num_new)
    width = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
    if sum(num_new) == num_seqs:  # one token each (a decode step): plain list arithmetic, five small tensors
        slot_list = [t[p // block_size] * block_size + p % block_size for t, p in zip(block_tables, starts)]
        positions = torch.tensor(starts, dtype=torch.int64)
        slots = torch.tensor(slot_list, dtype=torch.int64)
        seq_lens = torch.tensor([p + 1 for p in starts], dtype=torch.int32)
        cu = torch.arange(num_seqs + 1, dtype=torch.int32)
    else:
        q_lens = torch.tensor(num_new, dtype=torch.int32)
        starts_t = torch.tensor(starts, dtype=torch.int64)
        cu = torch.zeros(num_seqs + 1, dtype=torch.int32)
        torch.cumsum(q_lens, 0, out=cu[1:])
        seq_index = torch.repeat_interleave(torch.arange(num_seqs), q_lens.long())
        positions = torch.arange(int(cu[-1])) - cu[:-1].long()[seq_index] + starts_t[seq_index]
        slots = tables[seq_index, positions // block_size].long() * block_size + positions % block_size
        seq_lens = (starts_t + q_lens).to(torch.int32)
    meta = AttentionMetadata(
        slot_mapping=slots.to(device, non_blocking=True),
        block_tables=tables.to(device, non_blocking=True),
        seq_lens=seq_lens.to(device, non_blocking=True),
        cu_query_lens=cu.to(device, non_blocking=True),
        causal=causal,
    )
    return positions.to(device, non_blocking=True), meta
