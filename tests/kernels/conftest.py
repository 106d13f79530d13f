"""Shared fixtures of the kernel tests: the devices to run on (CPU always, CUDA when a GPU is present)."""

import pytest
import torch


def available_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


DEVICES = available_devices()


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param
