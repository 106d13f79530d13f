"""Tests of paged_attention against the pure-PyTorch reference: decode, prefill, chunked prefill, GQA/MQA."""

import pytest
import torch
from paged_batch import TOLERANCE, make_batch
from paged_batch import check_against_reference as check

from fast_inference import ops
from fast_inference.ops import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# decode, decode at exactly a block, full prefill, chunked prefill over a cached prefix, one past a
# block, a single-token context, and a sequence with no new tokens in this step
MIXED_QUERY_LENS = [1, 1, 33, 7, 17, 1, 0]
MIXED_SEQ_LENS = [50, 16, 33, 40, 17, 1, 9]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_mixed_batch(device, dtype, causal):
    args = make_batch(
        MIXED_QUERY_LENS,
        MIXED_SEQ_LENS,
        num_heads=8,
        num_kv_heads=2,
        head_size=64,
        block_size=16,
        dtype=dtype,
        device=device,
    )
    check(args, causal=causal, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
def test_head_sizes(device, dtype, head_size):
    args = make_batch(
        [1, 5, 20],
        [37, 21, 20],
        num_heads=4,
        num_kv_heads=1,
        head_size=head_size,
        block_size=16,
        dtype=dtype,
        device=device,
    )
    check(args, dtype=dtype)


@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128])
def test_block_sizes(device, block_size):
    lens = [1, block_size, block_size + 1, 3 * block_size - 1]
    args = make_batch(
        [1, 1, 4, block_size],
        lens,
        num_heads=8,
        num_kv_heads=4,
        head_size=64,
        block_size=block_size,
        dtype=torch.bfloat16,
        device=device,
    )
    check(args, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# (32, 2) and (40, 8): groups of 16 and 5 heads, the CUDA decode kernel's 8-head groups full and partial;
# (9, 3) and (14, 2): SmolLM2's and Qwen2-0.5B's groups of 3 and 7, whose rows start off a multiple of four
@pytest.mark.parametrize(
    "num_heads,num_kv_heads",
    [(4, 4), (6, 2), (9, 3), (8, 2), (12, 4), (14, 2), (16, 2), (8, 1), (32, 1), (32, 2), (40, 8)],
)
def test_gqa_ratios(device, dtype, num_heads, num_kv_heads):
    # decode past the 512-token split, a one-token context, chunked prefill, full prefill, long chunk
    args = make_batch(
        [1, 1, 5, 30, 40],
        [530, 1, 70, 30, 300],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_size=128,
        block_size=16,
        dtype=dtype,
        device=device,
        extra_table_blocks=2,  # spare block-table columns past each sequence's blocks are never read
    )
    check(args, dtype=dtype)
    check(args, causal=False, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_context_split_kv(device, dtype):
    # one or two sequences with long contexts: too few work items, so the KV axis is split and merged
    args = make_batch(
        [1, 3],
        [3000, 1100],
        num_heads=8,
        num_kv_heads=8,
        head_size=128,
        block_size=16,
        dtype=dtype,
        device=device,
    )
    check(args, dtype=dtype)
    check(args, causal=False, dtype=dtype)


def test_large_scores_are_stable(device):
    # a large scale makes exp overflow without the running max subtraction
    args = make_batch(
        [1, 40],
        [300, 300],
        num_heads=4,
        num_kv_heads=2,
        head_size=64,
        block_size=16,
        dtype=torch.float32,
        device=device,
    )
    out = check(args, scale=3.0)
    assert torch.isfinite(out).all()


def test_strided_query_and_out(device):
    # query sliced out of a fused qkv projection; out written into a strided view
    num_heads, num_kv_heads, head = 8, 2, 64
    q, kc, vc, bt, sl, cu = make_batch(
        [1, 6, 12],
        [20, 30, 12],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_size=head,
        block_size=16,
        dtype=torch.float16,
        device=device,
    )
    qkv = torch.randn(q.shape[0], (num_heads + 2 * num_kv_heads) * head, dtype=q.dtype, device=device)
    query = qkv[:, : num_heads * head].view(-1, num_heads, head)
    assert not query.is_contiguous()
    big_out = torch.zeros(q.shape[0], num_heads, 2 * head, dtype=q.dtype, device=device)
    out = big_out[:, :, :head]
    ops.paged_attention(query, kc, vc, bt, sl, cu, 0.125, out=out)
    want = ref.paged_attention(query.contiguous(), kc, vc, bt, sl, cu, 0.125)
    rtol, atol = TOLERANCE[torch.float16]
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol)
    assert (big_out[:, :, head:] == 0).all()  # nothing written outside the view


def test_thread_count_does_not_change_result():
    args = make_batch(
        MIXED_QUERY_LENS,
        MIXED_SEQ_LENS,
        num_heads=8,
        num_kv_heads=2,
        head_size=64,
        block_size=16,
        dtype=torch.bfloat16,
        device="cpu",
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.paged_attention(*args, 0.125)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(ops.paged_attention(*args, 0.125), one, rtol=0, atol=0)


def test_opcheck(device):
    args = make_batch(
        [1, 4],
        [20, 9],
        num_heads=4,
        num_kv_heads=2,
        head_size=64,
        block_size=8,
        dtype=torch.float32,
        device=device,
    )
    out = torch.empty_like(args[0])
    torch.library.opcheck(torch.ops.fast_inference.paged_attention.default, (*args, 0.125, True, out))


# The lower instruction-set paths (the kernel reads FI_CPU_ISA at each call); the default path is the
# best this CPU has, which every other test runs. A path this CPU cannot run is skipped, never replaced.
@pytest.mark.parametrize("isa", ["portable", "avx2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_other_isa_paths(monkeypatch, isa, dtype):
    monkeypatch.setenv("FI_CPU_ISA", isa)
    if ops.cpu_isa() != isa:
        pytest.skip(f"this CPU cannot run the {isa} kernels (it runs {ops.cpu_isa()})")
    # GQA groups of 4, 1 and 3 (SmolLM2's); head size 40 ends in a half chunk on AVX2.
    for heads, kv, hs, bs, causal in [(8, 2, 64, 16, True), (6, 6, 80, 8, False), (9, 3, 40, 16, True)]:
        args = make_batch(
            MIXED_QUERY_LENS,
            MIXED_SEQ_LENS,
            num_heads=heads,
            num_kv_heads=kv,
            head_size=hs,
            block_size=bs,
            dtype=dtype,
            device="cpu",
        )
        check(args, causal=causal, dtype=dtype)
    check(
        make_batch(
            [1], [700], num_heads=4, num_kv_heads=1, head_size=64, block_size=16, dtype=dtype, device="cpu"
        ),
        dtype=dtype,
    )


# ---- bad input: an exception that names the argument ----------------------------------------------


def good_args(device="cpu"):
    return list(
        make_batch(
            [1, 3],
            [20, 9],
            num_heads=4,
            num_kv_heads=2,
            head_size=64,
            block_size=8,
            dtype=torch.float16,
            device=device,
        )
    )


def run(args, *, out=None):
    return ops.paged_attention(*args, 0.125, out=out)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(0, a[0].float()), "key_cache dtype"),
        (lambda a: a.__setitem__(0, a[0][..., :32]), "head_size"),
        (lambda a: a.__setitem__(0, a[0][:, :3]), "num_heads 3 must be a positive multiple"),
        (lambda a: a.__setitem__(0, a[0].unsqueeze(0)), "query must be 3-D"),
        (lambda a: a.__setitem__(0, a[0].to(torch.int32)), "query must be float32"),
        (
            lambda a: a.__setitem__(0, a[0].transpose(1, 2).contiguous().transpose(1, 2)),
            "query must have unit stride",
        ),
        (
            lambda a: a.__setitem__(1, a[1].transpose(0, 1).contiguous().transpose(0, 1)),
            "key_cache must be contiguous",
        ),
        (lambda a: a.__setitem__(2, a[2][:-1]), "value_cache shape"),
        (lambda a: a.__setitem__(2, a[2].bfloat16()), "value_cache dtype"),
        (lambda a: a.__setitem__(3, a[3].long()), "block_tables must be int32"),
        (lambda a: a.__setitem__(3, a[3][0]), "block_tables must be 2-D"),
        (lambda a: a.__setitem__(4, a[4].long()), "seq_lens must be int32"),
        (lambda a: a.__setitem__(4, a[4][:1]), "seq_lens must be"),
        (lambda a: a.__setitem__(5, a[5][:2]), "cu_query_lens must be"),
        (lambda a: a.__setitem__(5, a[5].long()), "cu_query_lens must be int32"),
    ],
)
def test_bad_metadata_names_the_argument(device, mutate, match):
    args = good_args(device)
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        run(args)


def test_bad_out_names_the_argument(device):
    args = good_args(device)
    with pytest.raises(RuntimeError, match="out dtype"):
        run(args, out=torch.empty_like(args[0], dtype=torch.float32))
    with pytest.raises(RuntimeError, match="out shape"):
        run(args, out=torch.empty_like(args[0])[:1])


def test_unsupported_sizes_name_the_argument():
    args = good_args()
    args[1] = args[1][..., :12]
    args[2] = args[2][..., :12]
    args[0] = args[0][..., :12]
    with pytest.raises(RuntimeError, match="head_size"):
        run([a.contiguous() for a in args])
    args = good_args()
    args[1] = args[1][:, :6].contiguous()
    args[2] = args[2][:, :6].contiguous()
    with pytest.raises(RuntimeError, match="block_size 6 is not supported"):
        run(args)


@pytest.mark.cuda
def test_mixed_devices_name_the_argument():
    args = good_args()
    args[3] = args[3].cuda()
    with pytest.raises(RuntimeError, match="block_tables is on"):
        run(args)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a[3].__setitem__((0, 1), 10_000), r"block_tables\[0, 1\] = 10000 is out of range"),
        (lambda a: a[3].__setitem__((1, 0), -1), r"block_tables\[1, 0\] = -1 is out of range"),
        (lambda a: a[4].__setitem__(0, 10_000), r"seq_lens\[0\] = 10000 exceeds the block_tables capacity"),
        (lambda a: a[4].__setitem__(1, 2), r"seq_lens\[1\] = 2 is shorter than its query length 3"),
        (
            lambda a: a[5].__setitem__(2, 3),
            r"cu_query_lens\[-1\] = 3 must equal the number of query tokens 4",
        ),
        (lambda a: a[5].__setitem__(0, 1), r"cu_query_lens\[0\] must be 0"),
        (lambda a: a[5].__setitem__(1, 5), "cu_query_lens must be non-decreasing"),
    ],
)
def test_bad_values_name_the_argument(mutate, match):
    args = good_args()
    mutate(args)
    with pytest.raises(ValueError, match=match):
        run(args)


def test_bad_scale_names_the_argument():
    args = good_args()
    with pytest.raises(RuntimeError, match="scale"):
        ops.paged_attention(*args, float("nan"))
