"""Quantized-weight ops (quantize, dequantize, quant_linear, interleave_rows) against gguf's own codecs and the
references."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from fast_inference import ops
from fast_inference.ops import quant
from fast_inference.ops import reference as ref

ALL_QTYPES = [quant.Q4_0, quant.Q4_1, quant.Q5_0, quant.Q5_1, quant.Q8_0, quant.Q4_K, quant.Q5_K, quant.Q6_K]
IDS = [quant.QTYPE_NAMES[q] for q in ALL_QTYPES]


def random_qweight(qtype: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A valid uint8 [n, row_bytes] weight: quantized random data, or random Q5 / K-quant bytes with tame scales."""
    gen = torch.Generator().manual_seed(seed)
    if qtype in quant.WRITABLE_QTYPES:
        return ref.quantize(torch.randn(n, k, generator=gen), qtype)
    _, nbytes = quant.BLOCK_LAYOUT[qtype]
    blocks = torch.randint(
        0, 256, (n, quant.row_bytes(qtype, k) // nbytes, nbytes), dtype=torch.uint8, generator=gen
    )

    def scales() -> torch.Tensor:  # per row and block, so a kernel reading another row's scale fails
        values = 0.005 + 0.01 * torch.rand(blocks.shape[:2], generator=gen)
        return values.to(torch.float16).unsqueeze(-1).view(torch.uint8)

    if qtype == quant.Q6_K:
        blocks[..., 208:210] = scales()
    else:  # d and dmin (Q5_1: d and m; Q5_0: d, then two qh bytes)
        blocks[..., 0:2] = scales()
        blocks[..., 2:4] = scales()
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("qtype", ALL_QTYPES, ids=IDS)
def test_dequantize_matches_gguf_bit_for_bit(qtype, device):
    k = 512
    qw = random_qweight(qtype, 24, k)
    expected = torch.from_numpy(quants.dequantize(qw.numpy(), GGMLQuantizationType(qtype)).astype(np.float32))
    torch.testing.assert_close(ops.dequantize(qw.to(device), qtype, k).cpu(), expected, rtol=0, atol=0)
    torch.testing.assert_close(ref.dequantize(qw, qtype, k), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "qtype", quant.WRITABLE_QTYPES, ids=[quant.QTYPE_NAMES[q] for q in quant.WRITABLE_QTYPES]
)
def test_quantize_matches_gguf_bit_for_bit(qtype, device):
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(1))
    w[3] = 0.0  # an all-zero block: scale 0
    expected = torch.from_numpy(quants.quantize(w.numpy(), GGMLQuantizationType(qtype)))
    assert torch.equal(ops.quantize(w.to(device), qtype).cpu(), expected)
    assert torch.equal(ref.quantize(w, qtype), expected)


@pytest.mark.parametrize(
    "qtype", quant.WRITABLE_QTYPES, ids=[quant.QTYPE_NAMES[q] for q in quant.WRITABLE_QTYPES]
)
def test_quantize_pads_odd_k_with_zeros(qtype):
    w = torch.randn(5, 45)
    qw = ops.quantize(w, qtype)
    assert qw.shape == (5, quant.row_bytes(qtype, 45))
    padded = ops.dequantize(qw, qtype, 64)
    if (
        qtype != quant.Q4_1
    ):  # symmetric formats store zeros exactly; Q4_1's min offset moves them by < one step
        assert torch.all(padded[:, 45:] == 0)
    torch.testing.assert_close(ops.dequantize(qw, qtype, 45), ref.dequantize(qw, qtype, 45), rtol=0, atol=0)


def kernel_view(x: torch.Tensor) -> torch.Tensor:
    """x as ops.quant_linear multiplies it on CPU: at M <= 8 the AVX2 / AVX-512 GEMVs quantize the activations
    to 32-value int8 blocks (as llama.cpp does; 0.5-2.3% off the exact product with these random weights), so
    the reference is taken on that; larger M (and the portable path) dequantize the weight exactly."""
    return ref.int8_activation_blocks(x) if x.shape[0] <= 8 and ops.cpu_isa() != "portable" else x


@pytest.mark.parametrize("isa", ["best", "avx2"])
@pytest.mark.parametrize("qtype", ALL_QTYPES, ids=IDS)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 64])
@pytest.mark.parametrize("blocks", ["even", "odd"])
def test_quant_linear_matches_reference(qtype, m, isa, blocks, monkeypatch):
    if isa == "avx2":
        monkeypatch.setenv("FI_CPU_ISA", "avx2")
        if ops.cpu_isa() != "avx2":
            pytest.skip(f"this CPU cannot run the AVX2 kernels (best: {ops.cpu_isa()})")
    # K not a multiple of the block; an odd block count leaves the 512-bit kernels' last block pair half empty.
    k = {"even": 300, "odd": 200}[blocks] if qtype >= quant.Q4_K else {"even": 100, "odd": 80}[blocks]
    qw = random_qweight(qtype, 70, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(70)
    got, expected = ops.quant_linear(x, qw, qtype, bias), ref.quant_linear(kernel_view(x), qw, qtype, bias)
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("qtype", [quant.Q4_1, quant.Q6_K], ids=["Q4_1", "Q6_K"])
def test_quant_linear_on_device_and_in_bfloat16(qtype, device):
    k = 256
    qw = random_qweight(qtype, 33, k)
    for m in (1, 5, 20, 130):  # GEMV, f32 slabs, bf16 slabs (M >= 32 on AVX-512 BF16)
        x = torch.randn(m, k).to(torch.bfloat16)
        got = ops.quant_linear(x.to(device), qw.to(device), qtype)
        assert got.dtype == torch.bfloat16 and got.shape == (m, 33)
        expected = ref.quant_linear(x.float(), qw, qtype)
        rel = ((got.cpu().float() - expected).norm() / expected.norm()).item()
        assert rel < 3e-2, (m, rel)


INTERLEAVED = list(quant.BLOCK_LAYOUT)  # every format has the layout
INTERLEAVED_IDS = [quant.QTYPE_NAMES[q] for q in INTERLEAVED]


@pytest.mark.parametrize("qtype", INTERLEAVED, ids=INTERLEAVED_IDS)
def test_interleave_rows_matches_reference_and_dequantizes_the_same(qtype, device):
    elems, nbytes = quant.BLOCK_LAYOUT[qtype]
    k = 2 * elems + 16  # 3 blocks a row, K not a multiple of the block
    qw = random_qweight(qtype, 48, k)  # 3 tiles
    tiles = ops.interleave_rows(qw.to(device), qtype).cpu()
    assert torch.equal(tiles, ref.interleave_rows(qw, qtype))
    assert tiles.shape == (3, 3, 16 * nbytes)
    assert torch.equal(ref.dequantize(tiles, qtype, k), ref.dequantize(qw, qtype, k))
    got = ops.dequantize(tiles.to(device), qtype, k, torch.bfloat16).cpu()
    assert torch.equal(got, ops.dequantize(qw, qtype, k, torch.bfloat16))


@pytest.mark.parametrize("isa", ["best", "avx2"])
@pytest.mark.parametrize("qtype", INTERLEAVED, ids=INTERLEAVED_IDS)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 64, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
# 96 % 32 == 0: bf16 above 8 rows takes the AMX slabs where the CPU has AMX; 544: the K-quants' 3 super-blocks
@pytest.mark.parametrize("k", [80, 96, 544])
def test_quant_linear_on_interleaved_weights_matches_reference(qtype, m, isa, dtype, k, monkeypatch):
    if isa == "avx2":
        monkeypatch.setenv("FI_CPU_ISA", "avx2")
        if ops.cpu_isa() != "avx2":
            pytest.skip(f"this CPU cannot run the AVX2 kernels (best: {ops.cpu_isa()})")
    n = 80  # 5 tiles: the M = 1 kernel's 4-unit step leaves a remainder, AMX's 32-row slabs a 16-row one
    qw = random_qweight(qtype, n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to(dtype)
    bias = torch.randn(n).to(dtype)
    got = ops.quant_linear(x, ops.interleave_rows(qw, qtype), qtype, bias)
    assert got.dtype == dtype and got.shape == (m, n)
    expected = ref.quant_linear(kernel_view(x.float()), qw, qtype, bias.float())
    rel = ((got.float() - expected).norm() / expected.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel


def test_opcheck():
    qw = random_qweight(quant.Q8_0, 16, 64)
    x = torch.randn(2, 64)
    torch.library.opcheck(torch.ops.fast_inference.quant_linear, (x, qw, quant.Q8_0, None))
    torch.library.opcheck(torch.ops.fast_inference.dequantize, (qw, quant.Q8_0, 64, torch.float32))
    torch.library.opcheck(torch.ops.fast_inference.quantize, (torch.randn(16, 64), quant.Q8_0))
    tiles = ops.interleave_rows(qw, quant.Q8_0)
    torch.library.opcheck(torch.ops.fast_inference.interleave_rows, (qw, quant.Q8_0))
    torch.library.opcheck(torch.ops.fast_inference.quant_linear, (x, tiles, quant.Q8_0, None))
    torch.library.opcheck(torch.ops.fast_inference.dequantize, (tiles, quant.Q8_0, 64, torch.float32))


def test_bad_arguments_name_the_argument():
    qw = random_qweight(quant.Q4_1, 8, 64)
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="qtype 9 is not a supported.*Q4_0=2"):
        ops.quant_linear(x, qw, 9)
    with pytest.raises(ValueError, match="qweight has .* bytes per row"):
        ops.quant_linear(torch.randn(1, 96), qw, quant.Q4_1)
    with pytest.raises(ValueError, match="qweight must be uint8"):
        ops.quant_linear(x, qw.to(torch.int32), quant.Q4_1)
    with pytest.raises(ValueError, match="x must be float32, bfloat16 or float16"):
        ops.quant_linear(x.to(torch.int64), qw, quant.Q4_1)
    with pytest.raises(ValueError, match="bias must be"):
        ops.quant_linear(x, qw, quant.Q4_1, torch.zeros(3))
    with pytest.raises(ValueError, match="can be read but not written"):
        ops.quantize(torch.randn(4, 256), quant.Q4_K)
    with pytest.raises(ValueError, match="in_features must be positive"):
        ops.dequantize(qw, quant.Q4_1, 0)
    with pytest.raises(ValueError, match="multiple of 16 rows"):
        ops.interleave_rows(qw, quant.Q4_1)  # 8 rows
    with pytest.raises(ValueError, match="not whole blocks of qtype 12"):
        ops.interleave_rows(random_qweight(quant.Q4_1, 16, 256), quant.Q4_K)  # 160-byte rows, 144-byte blocks
    tiles = ops.interleave_rows(random_qweight(quant.Q4_1, 16, 64), quant.Q4_1)
    with pytest.raises(ValueError, match=r"interleaved qweight must be \[N / 16, 3, 320\]"):
        ops.quant_linear(torch.randn(1, 96), tiles, quant.Q4_1)
    with pytest.raises(ValueError, match=r"interleaved qweight must be \[N / 16, 1, 2304\] for qtype 12"):
        ops.quant_linear(torch.randn(1, 64), tiles, quant.Q4_K)
