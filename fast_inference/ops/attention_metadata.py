"""AttentionMetadata: the per-step batch description that every attention layer reads (paged KV layout)."""

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """One step's flattened, unpadded batch: where new tokens go in the cache and what they attend to.

    The model runner builds it once per step; every layer uses the same tensors.
    """

    slot_mapping: torch.Tensor  # int64 [num_tokens]: cache slot of each new token (negative = padding)
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor  # int32 [num_seqs]: context length including this step's tokens
    cu_query_lens: torch.Tensor  # int32 [num_seqs + 1]: prefix sums of this step's tokens per sequence
    max_query_len: int = 1  # 1 for a pure decode step
    causal: bool = True  # False for bidirectional (encoder) attention

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1
