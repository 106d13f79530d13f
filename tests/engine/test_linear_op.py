"""ops.linear (the batch-1 decode projection) against a float64 reference, and its argument checks."""

import pytest
import torch

from fast_inference import ops


@pytest.mark.parametrize(
    "m,n,k", [(1, 3072, 576), (2, 100, 577), (3, 5, 40), (4, 1000, 1536), (5, 64, 64), (1, 7, 1)]
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_reference(m, n, k, with_bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if with_bias else None
    ref = x.double() @ w.double().t() + (b.double() if with_bias else 0)
    out = ops.linear(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    # One bf16 rounding of an f32-accumulated dot product.
    torch.testing.assert_close(out.double(), ref, atol=0.02 * ref.abs().max().item(), rtol=1e-2)


def test_linear_strided_input_and_other_dtypes():
    x = torch.randn(2, 130).bfloat16()[:, :128]  # row stride 130
    w = torch.randn(16, 128).bfloat16()
    torch.testing.assert_close(ops.linear(x, w).float(), (x.float() @ w.float().t()), atol=0.1, rtol=1e-2)
    xf, wf = torch.randn(3, 8), torch.randn(5, 8)
    torch.testing.assert_close(ops.linear(xf, wf), torch.nn.functional.linear(xf, wf))


def test_linear_bad_arguments():
    w = torch.randn(4, 8).bfloat16()
    with pytest.raises(RuntimeError, match="K="):
        ops.linear(torch.randn(1, 9).bfloat16(), w)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        ops.linear(torch.randn(8).bfloat16(), w)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.linear(torch.randn(1, 8), w)
    with pytest.raises(RuntimeError, match="bias"):
        ops.linear(torch.randn(1, 8).bfloat16(), w, torch.randn(5).bfloat16())
