"""The CPU RMSNorm ops against their pure-PyTorch references (fast_inference.ops.reference)."""

import pytest
import torch

from fast_inference import ops
from fast_inference.ops import reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_rms_norm_matches_reference(dtype, rows):
    torch.manual_seed(rows)
    x = (torch.randn(rows, 576) * 3).to(dtype)
    w = torch.randn(576).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_updates_residual(dtype):
    torch.manual_seed(0)
    big = torch.randn(4, 2 * 96).to(dtype)
    x = big[:, :96]  # a strided view, as a slice of a fused projection would be
    residual = torch.randn(4, 96).to(dtype)
    w = torch.randn(96).to(dtype)
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
