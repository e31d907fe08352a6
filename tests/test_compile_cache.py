"""JAX's persistent compilation cache, as `ufmjax` turns it on: a second `ufmjax sweep` of the
same shape, in a new process, compiles nothing (every program is read back from the cache)."""

import json
import subprocess
import sys

from ufmjax.cli import main
from ufmjax.common import compile_cache_dir

# A child process: `ufmjax sweep ...` with the cache at argv[1], counting JAX's own cache events.
# The threshold is lowered to 0 s (JAX's own variable, which ufmjax leaves alone) so that EVERY
# compilation is cached: then a second run must
# have no miss at all (with the default 0.2 s, programs that compile faster are not stored).
CHILD = r"""
import json, os, sys
os.environ["UFMJAX_COMPILE_CACHE"] = sys.argv[1]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
import jax, jax.monitoring
events = {}
jax.monitoring.register_event_listener(lambda name, **kw: events.__setitem__(name, events.get(name, 0) + 1))
from ufmjax.cli import main
rc = main(sys.argv[2:])
print(json.dumps({"rc": rc, "hits": events.get("/jax/compilation_cache/cache_hits", 0),
                  "misses": events.get("/jax/compilation_cache/cache_misses", 0)}))
"""


def _sweep(cache, run, out):
    argv = ["sweep", str(run), "--target", "1", "--alphas", "-5:5:33", "--quiet", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(cache), *argv], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_sweep_of_the_same_shape_compiles_nothing(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "ufm", "--vocab", "9", "--concepts", "3", "--dim", "12", "--seed", "1",
                 "--out", str(run), "--quiet"]) == 0
    cache = tmp_path / "cache"
    first = _sweep(cache, run, tmp_path / "a.npz")
    entries = sorted(p.name for p in cache.iterdir())
    assert first["rc"] == 0 and first["misses"] > 0 and entries
    second = _sweep(cache, run, tmp_path / "b.npz")
    assert second["rc"] == 0 and second["hits"] >= first["misses"] and second["misses"] == 0, (first, second)
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing new was compiled and stored


def test_cache_folder_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("UFMJAX_COMPILE_CACHE", "off")
    assert compile_cache_dir() is None
    monkeypatch.setenv("UFMJAX_COMPILE_CACHE", str(tmp_path / "c"))
    assert compile_cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("UFMJAX_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == str(tmp_path / "xdg" / "ufmjax" / "jax")
    assert compile_cache_dir(tmp_path / "given") == str(tmp_path / "given")
