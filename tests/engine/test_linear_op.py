"""ops.linear (GEMV for decode batches, blocked GEMM above, AMX on VNNI tiles) against a float64 reference on
every CPU ISA path."""

import pytest
import torch

from fast_inference import ops


@pytest.fixture(params=["this_cpu", "avx512", "avx2", "portable"])
def isa(request, monkeypatch):
    """Each CPU kernel path: FI_CPU_ISA lowers the kernels (avx2 = what an AVX2-only CPU such as Zen 1 runs;
    avx512 turns AMX off on a CPU that has it)."""
    if request.param != "this_cpu":
        monkeypatch.setenv("FI_CPU_ISA", request.param)
    return ops.cpu_isa()


# (m, n, k): K tails of every length mod 16, M across the GEMV sizes (1..8) and the blocked GEMM (> 8),
# N not a multiple of the GEMV row block nor of the GEMM slab.
SHAPES = [
    (1, 3072, 576),
    (2, 100, 577),
    (3, 5, 40),
    (4, 1000, 1536),
    (5, 64, 64),
    (1, 7, 1),
    (7, 33, 15),
    (8, 130, 129),
    (9, 70, 576),
    (32, 300, 200),
    (77, 1100, 64),
]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_bf16_matches_reference(isa, m, n, k, with_bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if with_bias else None
    ref = x.double() @ w.double().t() + (b.double() if with_bias else 0)
    out = ops.linear(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    # One bf16 rounding of an f32-accumulated dot product.
    torch.testing.assert_close(out.double(), ref, atol=0.02 * ref.abs().max().item(), rtol=1e-2)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_f32_matches_reference(isa, m, n, k):
    g = torch.Generator().manual_seed(m * 7 + n + k)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    ref = x.double() @ w.double().t() + b.double()
    out = ops.linear(x, w, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-5)


def test_non_finite_weights_stay_in_their_row(isa):
    # A weight row's K tail is read through a zeroed buffer, never past the row: an inf in the next row
    # must not turn this row's output into NaN.
    w = torch.ones(3, 17).bfloat16()
    w[1:] = float("inf")
    out = ops.linear(torch.ones(1, 17).bfloat16(), w)
    assert out[0, 0].item() == 17.0 and torch.isinf(out[0, 1:]).all()


def test_strided_input(isa):
    x = torch.randn(2, 130).bfloat16()[:, :128]  # row stride 130
    w = torch.randn(16, 128).bfloat16()
    torch.testing.assert_close(ops.linear(x, w).float(), (x.float() @ w.float().t()), atol=0.1, rtol=1e-2)
    xs = torch.randn(12, 70).bfloat16()[:, 3:67]
    ws = torch.randn(20, 64).bfloat16()
    torch.testing.assert_close(ops.linear(xs, ws).float(), (xs.float() @ ws.float().t()), atol=0.1, rtol=1e-2)


def test_bad_arguments():
    w = torch.randn(4, 8).bfloat16()
    with pytest.raises(RuntimeError, match="K="):
        ops.linear(torch.randn(1, 9).bfloat16(), w)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        ops.linear(torch.randn(8).bfloat16(), w)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.linear(torch.randn(1, 8), w)
    with pytest.raises(RuntimeError, match="bias"):
        ops.linear(torch.randn(1, 8).bfloat16(), w, torch.randn(5).bfloat16())


def test_bf16_gate_follows_the_kernels_isa(monkeypatch):
    # The one bf16 gate: native only where our AVX-512 BF16 kernels run; FI_CPU_ISA=avx2 turns it off.
    monkeypatch.setenv("FI_CPU_ISA", "avx2")
    assert not ops.cpu_bf16_native()
    monkeypatch.delenv("FI_CPU_ISA")
    assert ops.cpu_bf16_native() == (ops.cpu_isa() == "avx512" and torch.cpu._is_avx512_bf16_supported())


# (m, n, k) for VNNI tiles (N % 16 == 0, K % 32 == 0): one or two A tiles (M <= 16, <= 32) with row tails, an odd
# number of column blocks (a single last block), M past the kernel's 256-row chunk.
# M across the AVX-512 tile kernel's 3-row and 8-row register tiles with remainders, and past its
# 256-row chunk; N in 3- and 4-block column groups with remainders.
TILE_SHAPES = [
    (1, 16, 32),
    (3, 48, 64),
    (4, 112, 32),
    (7, 176, 64),
    (16, 576, 576),
    (17, 80, 96),
    (32, 960, 576),
    (33, 112, 1536),
    (258, 80, 32),
    (300, 48, 64),
]


@pytest.mark.parametrize("m,n,k", TILE_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_vnni_tiles_match_reference(isa, m, n, k, with_bias):
    g = torch.Generator().manual_seed(m * 31 + n + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if with_bias else None
    ref = x.double() @ w.double().t() + (b.double() if with_bias else 0)
    out = ops.linear(x, ops.vnni_tiles(w), b)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    torch.testing.assert_close(out.double(), ref, atol=0.02 * ref.abs().max().item(), rtol=1e-2)
    wide = torch.zeros(m, k + 32).bfloat16()
    wide[:, :k] = x
    strided = ops.linear(wide[:, :k], ops.vnni_tiles(w), b)  # rows k + 32 apart
    torch.testing.assert_close(strided, out, atol=0, rtol=0)


def test_vnni_tiles_layout():
    w = torch.arange(32 * 64, dtype=torch.float32).view(32, 64).bfloat16()
    tiles = ops.vnni_tiles(w)
    assert tiles.shape == (2, 2, 512)
    for j, t, kp, n, i in [(0, 0, 0, 0, 1), (1, 0, 3, 5, 0), (0, 1, 15, 15, 1), (1, 1, 7, 2, 1)]:
        assert tiles[j, t, (kp * 16 + n) * 2 + i] == w[16 * j + n, 32 * t + 2 * kp + i]


def test_vnni_tiles_bad_arguments(isa):
    with pytest.raises(ValueError, match="N % 16"):
        ops.vnni_tiles(torch.randn(20, 32).bfloat16())
    with pytest.raises(ValueError, match="K % 32"):
        ops.vnni_tiles(torch.randn(16, 40).bfloat16())
    with pytest.raises(ValueError, match="bf16"):
        ops.vnni_tiles(torch.randn(16, 32))
    tiles = ops.vnni_tiles(torch.randn(32, 64).bfloat16())
    with pytest.raises(RuntimeError, match="VNNI tiles"):
        ops.linear(torch.randn(1, 64).bfloat16(), tiles.view(2, 4, 256))
    with pytest.raises(RuntimeError, match="K="):
        ops.linear(torch.randn(1, 32).bfloat16(), tiles)
    with pytest.raises(RuntimeError, match="bias"):
        ops.linear(torch.randn(1, 64).bfloat16(), tiles, torch.randn(16).bfloat16())


def test_amx_gate_follows_fi_cpu_isa(monkeypatch):
    if ops.cpu_amx():
        assert ops.cpu_isa() == "avx512"
    for lower in ("avx512", "avx2", "portable"):
        monkeypatch.setenv("FI_CPU_ISA", lower)
        assert not ops.cpu_amx()
