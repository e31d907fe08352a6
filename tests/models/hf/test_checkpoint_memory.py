"""Loading a whole model (`load_decoder`: memory-mapped, tensor by tensor, arrays kept) costs
about the checkpoint once over the process's baseline, not twice: measured in a fresh
subprocess by benchmarks/load_memory.py on a generated 512 MiB float32 Llama checkpoint."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def load_memory_module():
    """benchmarks/load_memory.py lives outside the package: loaded from the checkout."""
    spec = importlib.util.spec_from_file_location("load_memory", ROOT / "benchmarks" / "load_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_peak_memory_of_loading_512mb(tmp_path):
    result = load_memory_module().measure(512, tmp_path)
    assert not list(tmp_path.iterdir())  # the generated checkpoint is deleted
    assert 500 < result["checkpoint_mb"] < 530
    assert result["largest_tensor_mb"] < 0.15 * result["checkpoint_mb"]
    assert result["ratio"] < 1.3, result
