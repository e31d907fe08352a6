"""The fixtures rebuilt with the installed transformers: ufmjax still equals it.

`test_families.py` compares ufmjax with the committed reference outputs and needs no torch;
this test regenerates every variant (`make_fixtures.build`: a tiny random model made with
transformers' own classes, saved with `save_pretrained`, and transformers' logits, hidden
states and hook-steered probabilities) into a temporary folder and runs the same comparison,
so a transformers release that changes a family's maths or its saved format is caught here.
Skipped where torch or transformers is not installed.
"""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from . import make_fixtures  # noqa: E402
from .test_families import FIXTURES, compare_with_reference  # noqa: E402


@pytest.mark.parametrize("variant", list(make_fixtures.VARIANTS))
def test_rebuilt_fixture_equals_transformers(tmp_path, variant):
    folder = make_fixtures.build(variant, tmp_path / variant)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "reference.npz"):
        assert (folder / name).is_file(), name
    worst = compare_with_reference(folder)
    assert worst["logits"] < 1e-4, worst
    assert worst["hidden"] < 1e-4, worst
    assert worst["steered_all"] < 1e-5, worst
    assert worst["steered_last"] < 1e-5, worst

    # The build is seeded: the same prompts as the committed fixture, and (on the transformers the
    # fixtures were made with) the same outputs up to float rounding of another build.
    committed = np.load(FIXTURES / variant / "reference.npz")
    rebuilt = np.load(folder / "reference.npz")
    n = int(committed["num_prompts"])
    assert int(rebuilt["num_prompts"]) == n
    for i in range(n):
        np.testing.assert_array_equal(rebuilt[f"prompt_{i}"], committed[f"prompt_{i}"])
