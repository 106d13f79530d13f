"""Shared test fixtures: the device rule of CUDA cases, the `device` fixture, and tiny random-weight model dirs.

The one device rule: a test marked `cuda` (`pytest -m cuda` selects them all) is skipped when no GPU is
visible and FAILS when a GPU is visible but fast_inference._C was built without its CUDA kernels, so a
broken build cannot hide behind skips.
"""

from pathlib import Path

import pytest
import torch

from fast_inference.models.demo import build_model_dir
from fast_inference.ops import cuda_ops_available


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is None:
        return
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    if not cuda_ops_available():
        pytest.fail(
            "a GPU is visible but fast_inference._C has no CUDA kernels: rebuild it against a CUDA torch "
            "(FI_TARGET_DEVICE=cuda pip install --no-build-isolation .)",
            pytrace=False,
        )


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    """Every kernel test that takes `device` runs on the CPU and, under the rule above, on CUDA."""
    return request.param


# name -> build_model_dir keyword arguments. Together they cover every architecture, tied and untied
# embeddings, an explicit head_dim, each RoPE scaling type and a sharded checkpoint.
MODEL_SPECS: dict[str, dict] = {
    "llama": dict(
        architecture="LlamaForCausalLM",
        tie_word_embeddings=False,
        shard_size="60KB",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": dict(
        architecture="MistralForCausalLM",
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "qwen2": dict(architecture="Qwen2ForCausalLM", tie_word_embeddings=True),
    "qwen3": dict(architecture="Qwen3ForCausalLM", tie_word_embeddings=False, head_dim=32),
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Lazily built model dirs: model_dirs[name] builds on first use."""

    class _Dirs(dict):
        def __missing__(self, name: str) -> Path:
            path = build_model_dir(
                tmp_path_factory.mktemp(name), seed=sum(map(ord, name)), **MODEL_SPECS[name]
            )
            self[name] = path
            return path

    return _Dirs()


@pytest.fixture(scope="session")
def llama_dir(model_dirs) -> Path:
    return model_dirs["llama"]
