"""Huge-page weight arena: copies are exact, aligned, and keep their memory alive."""

import gc

import torch

from fast_inference.models.hugepages import huge_page_buffer, move_to_huge_pages


def test_move_to_huge_pages_copies_exactly_and_aligned():
    tensors = [torch.randn(3, 5).to(torch.bfloat16), torch.randn(7), torch.arange(11, dtype=torch.int32)]
    moved = move_to_huge_pages(tensors)
    gc.collect()  # the mapping must outlive the local buffer reference
    for src, dst in zip(tensors, moved, strict=True):
        assert dst.dtype == src.dtype and dst.shape == src.shape
        assert torch.equal(dst, src)
        assert dst.data_ptr() % 64 == 0
        assert dst.data_ptr() != src.data_ptr()


def test_huge_page_buffer_is_aligned_and_writable():
    buf = huge_page_buffer(3 << 20)
    assert buf.numel() == 3 << 20 and buf.data_ptr() % 4096 == 0
    buf.fill_(7)
    assert int(buf[-1]) == 7
    assert huge_page_buffer(0).numel() == 0
