"""The kernel's argument checks, grids, top-k ends, sinks and output sizes (issue 12).

Small closures throughout (`linear_steered`: logits = base + alpha * direction, whose
answers are known by hand), so each test runs in well under a second once compiled.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ufmjax.kernel import (
    ArraySink,
    Evaluator,
    Grid,
    check_alphas,
    check_grid,
    drive,
    make_measure,
    output_bytes,
    parse_alphas,
    parse_grid,
    plan_sweep,
    sweep,
    top_tokens,
)
from ufmjax.steering import linear_steered

CONCEPT_OF = np.array([0, 0, 1, 1, 2])
GRID = np.linspace(-3, 3, 8)  # one grid length (and so one compiled chunk) for most tests


def ramp():
    """Two rows over 5 tokens: +alpha favours token 4, -alpha token 0 (direction 0..4)."""
    return linear_steered(np.zeros((2, 5)), np.arange(5.0) - 2.0)


# ---------------------------------------------------------------- alphas and grids

@pytest.mark.parametrize("alphas, match", [
    (np.array([0.0, 1.0 + 1e-3j]), "alphas must be real numbers, got complex"),
    ([1j], "complex"),
    (["0.5", "1"], "alphas must be real numbers"),
    ([0.0, None], "alphas must be"),  # None reads as NaN
    ([True, False], "alphas must be real numbers"),
])
def test_alphas_that_are_not_real_numbers_are_refused(alphas, match):
    """Today complex alphas are cast to real with a warning and strings are parsed: refused by name."""
    with pytest.raises(ValueError, match=match):
        check_alphas(alphas)
    with pytest.raises(ValueError, match="alphas"):
        sweep(ramp(), alphas, concept_of=CONCEPT_OF)
    # Real numbers of any float type pass, ml_dtypes' bfloat16 (numpy kind "V") included.
    np.testing.assert_array_equal(check_alphas(jnp.asarray([0.5, 2.0], jnp.bfloat16)), [0.5, 2.0])


def test_grids_must_increase_but_kernel_points_may_come_in_any_order():
    """A sweep file's grid (check_grid: Steering.sweep, ufm/gpt/hf sweeps, the CLI) is strictly
    increasing; the kernel's own sweep evaluates points in any order (find_peaks' Newton
    iterates), each alpha as if alone."""
    for bad, where in (([1.0, 0.0], "alphas\\[0\\] = 1 >= alphas\\[1\\] = 0"), ([0.0, 2.0, 1.0], "alphas\\[1\\]"),
                       ([0.0, 0.0], "strictly increasing")):
        with pytest.raises(ValueError, match=where):
            check_grid(bad)
    np.testing.assert_array_equal(check_grid([-1, 0, 2]), [-1.0, 0.0, 2.0])
    points = np.random.default_rng(0).permutation(GRID)
    order = np.argsort(points)
    shuffled = sweep(ramp(), points, concept_of=CONCEPT_OF)
    ordered = sweep(ramp(), points[order], concept_of=CONCEPT_OF)
    for key in ("delta_p", "d_delta_p", "delta_ce", "kl"):
        np.testing.assert_allclose(shuffled[key][order], ordered[key], rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("spec, match", [
    ("-1e308:1e308:11", "START:STOP spans more than float64 holds"),  # today: "found NaN or inf"
    ("1:1.0000000000000002:5", "too narrow for NUM distinct"),
    ("0:1:1e3", "NUM an integer"),
    ("3:1:5", "STOP must exceed START"),
    ("0:1:0", "NUM must be >= 1"),
])
def test_grid_specs_are_refused_with_their_reason(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        parse_grid(spec)
    assert "alphas" in str(e.value)


def test_a_grid_is_sized_before_it_is_built():
    """parse_grid builds nothing (1e12 points cost no memory); values() is np.linspace exactly."""
    huge = parse_grid("0:1:1000000000000")
    assert huge == Grid(0.0, 1.0, 10**12) and huge.size == 10**12
    grid = parse_grid("-2.5:7:37")
    np.testing.assert_array_equal(grid.values(), np.linspace(-2.5, 7, 37))
    np.testing.assert_array_equal(parse_alphas("-2.5:7:37"), np.linspace(-2.5, 7, 37))
    np.testing.assert_array_equal(parse_grid("1e308:1.7e308:3").values(), np.linspace(1e308, 1.7e308, 3))
    np.testing.assert_array_equal(parse_grid("4:4:1").values(), [4.0])


# ---------------------------------------------------------------- devices

def test_devices_are_checked_by_name():
    """An empty device list, or things that are not devices, are refused naming devices by
    sweep, plan_sweep and Evaluator alike; one device is taken as a list of one."""
    steered = ramp()
    measure = make_measure(steered, concept_of=CONCEPT_OF)
    for devices, match in (([], "devices must name at least one device"), ((), "at least one device"),
                           (["cpu"], "devices must be jax devices"), (3, "devices must be a sequence"),
                           ([jax.devices()[0]] * 2, "distinct")):
        with pytest.raises(ValueError, match=match):
            sweep(steered, [0.0, 1.0], concept_of=CONCEPT_OF, devices=devices)
        with pytest.raises(ValueError, match=match):
            Evaluator(steered, measure, devices=devices)
        with pytest.raises(ValueError, match=match):
            plan_sweep(steered, [0.0], measure, derivatives=0, chunk_size=None, dtype=jnp.float32,
                       devices=devices, method="auto")
    one = sweep(steered, GRID, concept_of=CONCEPT_OF, devices=jax.devices()[0])
    np.testing.assert_array_equal(one["delta_p"], sweep(steered, GRID, concept_of=CONCEPT_OF)["delta_p"])


# ---------------------------------------------------------------- top-k at a named end

def test_top_tokens_at_a_named_end():
    """+alpha favours the high tokens, -alpha the low ones: max, min and both name which."""
    steered, grid = ramp(), np.linspace(-10, 10, 21)  # symmetric: the largest |alpha| is -10 first
    np.testing.assert_array_equal(top_tokens(steered, grid, 2), [3, 4])
    np.testing.assert_array_equal(top_tokens(steered, grid, 2, "max"), [3, 4])
    np.testing.assert_array_equal(top_tokens(steered, grid, 2, "min"), [0, 1])
    both = top_tokens(steered, grid, 2, "both")
    np.testing.assert_array_equal(both, [0, 1, 3, 4])
    assert both.dtype == np.int64
    # A Grid gives the same ends without being built; a one-point grid has one end.
    np.testing.assert_array_equal(top_tokens(steered, parse_grid("-10:10:21"), 2, "both"), both)
    np.testing.assert_array_equal(top_tokens(steered, [5.0], 1, "both"), [4])
    # The ends are the grid's smallest and largest alphas, wherever they sit in it.
    np.testing.assert_array_equal(top_tokens(steered, [0.0, 6.0, -6.0], 1, "min"), [0])
    with pytest.raises(ValueError, match="top_k_at must be one of max, min, both"):
        top_tokens(steered, grid, 2, "largest")
    for k in (0, 6, True, 2.0):
        with pytest.raises(ValueError, match="top_k"):
            top_tokens(steered, grid, k)


# ---------------------------------------------------------------- sinks and sizes

class RecordingSink(ArraySink):
    """An ArraySink that records every slice written (to check what drive sends a sink)."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def allocate(self, name, shape, dtype):
        sink = self

        class Slot:
            def __init__(self):
                self.array = np.empty(shape, dtype)
                sink[name] = self.array

            def __setitem__(self, index, values):
                sink.writes.append((name, index.start, index.stop))
                self.array[index] = values

        return Slot()


def test_drive_streams_whole_chunks_in_order_into_any_sink():
    """With a chunk of 8 on 20 alphas: 3 consecutive slices per output (the last one short),
    the same values as the kernel's own sweep, and progress told 8 + 8 + 4 alphas."""
    steered, alphas = ramp(), np.linspace(-3, 3, 20)
    measure = make_measure(steered, concept_of=CONCEPT_OF)
    plan = plan_sweep(steered, alphas, measure, derivatives=2, chunk_size=8, dtype=jnp.float32, devices=None,
                      method="auto")
    np.testing.assert_array_equal(np.concatenate([plan.chunk(i) for i in range(plan.num_chunks)]), plan.padded())
    ev = Evaluator(steered, measure, order=2, method=plan.method, devices=plan.devices, alphas_per_call=8)
    told = []
    sink = drive(ev, plan, RecordingSink(), told.append)
    reference = sweep(steered, alphas, concept_of=CONCEPT_OF, chunk_size=8)
    assert told == [8, 8, 4] and type(reference) is dict  # the public sweep: still a plain dict
    assert len(sink) == 21 and set(sink) < set(reference)  # 7 quantities x 3 orders
    for key in sink:
        np.testing.assert_array_equal(sink[key], reference[key], err_msg=key)
        assert [(lo, hi) for name, lo, hi in sink.writes if name == key] == [(0, 8), (8, 16), (16, 20)]
    assert type(drive(ev, plan)) is ArraySink


def test_output_bytes_are_the_bytes_sweep_returns():
    """The up-front estimate is exact for the kernel's own arrays; in float64 the quantities
    take twice the bytes (the alphas, tokens, weights are float64 / int64 anyway)."""
    out = sweep(ramp(), GRID, concept_of=CONCEPT_OF)
    per_alpha, fixed = output_bytes(rows=2, vocab=5, concepts=3, tokens=5)
    assert per_alpha * GRID.size + fixed == sum(v.nbytes for v in out.values())
    assert per_alpha == 8 + 4 * 3 * sum(out[k][0].size for k in ("delta_p", "concept_prob", "delta_p_concept",
                                                                  "delta_ce", "delta_ce_ctx", "kl", "entropy"))
    per64, fixed64 = output_bytes(rows=2, vocab=5, concepts=3, tokens=5, dtype=jnp.float64)
    assert per64 - 8 == 2 * (per_alpha - 8) and fixed64 - fixed == 4 * 2 * 5  # probs_base [M, V]
    per0, _ = output_bytes(rows=2, vocab=5, concepts=3, tokens=2, derivatives=0)
    assert per0 == 8 + 4 * (2 * 2 + 2 * 3 * 2 + 1 + 3 * 2)  # delta_p [M, K], two [M, G], delta_ce, three [M]
