"""Kernel microbenchmarks as a pytest-benchmark suite:
`pytest bench/ -o python_files="bench_*.py" --benchmark-json=out.json`.

On a GPU each measured call is a CUDA-graph replay of many back-to-back calls (launch gaps as in the
engine's frame graph), timed with CUDA events; on the CPU the suite runs the kernels in Triton's
interpreter at tiny sizes so that it cannot rot (those times mean nothing).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ._harness import Measure, device_info  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def info() -> dict:
    return device_info()


@pytest.fixture
def measure(benchmark, info) -> Measure:
    return Measure(benchmark, info)


def pytest_report_header(config):
    return f"moshi_fast benchmarks: {device_info()}"
