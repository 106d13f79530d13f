"""The CPU RMSNorm, RoPE and SiLU-and-mul ops against their pure-PyTorch references (fast_inference.ops.reference),
on every CPU kernel path (AVX-512, AVX2, portable)."""

import pytest
import torch

from fast_inference import ops
from fast_inference.ops import reference


@pytest.fixture(autouse=True, params=["this_cpu", "avx2", "portable"])
def isa(request, monkeypatch):
    """FI_CPU_ISA lowers the kernels (avx2 = what an AVX2-only CPU such as Zen 1 runs)."""
    if request.param != "this_cpu":
        monkeypatch.setenv("FI_CPU_ISA", request.param)
    return ops.cpu_isa()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("hidden", [576, 100])  # 100: a tail after the vector loop (100 % 16 = 4)
def test_rms_norm_matches_reference(dtype, rows, hidden):
    torch.manual_seed(rows)
    x = (torch.randn(rows, hidden) * 3).to(dtype)
    w = torch.randn(hidden).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [96, 99])
def test_add_rms_norm_updates_residual(dtype, hidden):
    torch.manual_seed(0)
    big = torch.randn(4, 2 * hidden).to(dtype)
    x = big[:, :hidden]  # a strided view, as a slice of a fused projection would be
    residual = torch.randn(4, hidden).to(dtype)
    w = torch.randn(hidden).to(dtype)
    res_ref = residual.clone()
    expected = reference.add_rms_norm(x, res_ref, w, 1e-6)
    out = ops.add_rms_norm(x, residual, w, 1e-6)
    torch.testing.assert_close(residual, res_ref, atol=0, rtol=0)  # the add rounds like torch's
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


def test_rms_norm_rejects_bad_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(x, torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="residual"):
        ops.add_rms_norm(x, torch.randn(3, 8), torch.randn(8), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 20])  # 20: half = 10, a tail after the vector loop
def test_rotary_embedding_matches_reference(dtype, d):
    torch.manual_seed(1)
    tokens, heads = 5, 6
    qkv = torch.randn(tokens, (heads + 2) * d).to(dtype)
    x = qkv[:, : heads * d].view(tokens, heads, d)  # strided rows, as in the model
    angles = torch.randn(tokens, d // 2)
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(dtype)
    sin = torch.cat((-angles.sin(), angles.sin()), -1).to(dtype)
    expected = x.clone()
    reference.rotary_embedding(expected, cos, sin)
    untouched = qkv[:, heads * d :].clone()
    ops.rotary_embedding(x, cos, sin)
    torch.testing.assert_close(x, expected, atol=0, rtol=0)  # same rounding points as the torch ops
    torch.testing.assert_close(qkv[:, heads * d :], untouched, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 64])  # 64 rows: split across threads
def test_silu_and_mul_matches_reference(dtype, rows):
    torch.manual_seed(2)
    x = (torch.randn(rows, 2 * 100) * 4).to(dtype)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, float("nan")])  # exp under/overflow, zero, NaN
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(
        ops.silu_and_mul(x), reference.silu_and_mul(x), atol=tol, rtol=tol, equal_nan=True
    )


def test_fused_elementwise_reject_bad_arguments():
    with pytest.raises(RuntimeError, match="cos"):
        ops.rotary_embedding(torch.randn(2, 3, 8), torch.randn(2, 6), torch.randn(2, 6))
    with pytest.raises(RuntimeError, match="even"):
        ops.silu_and_mul(torch.randn(2, 7))
