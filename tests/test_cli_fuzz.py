"""Property-based fuzzing of the `ufmjax` command (hypothesis).

Two properties, over every option of every command and over damaged run folders:
a command line either gets through validation or ends with exit status 2 and ONE error line
(argparse's own errors: its usage, then one error line); never a traceback, never another
exception. To keep hundreds of cases fast, the expensive work after validation is replaced by
a sentinel (training's loop, the kernel sweep, the optimiser's problem, reproduce, bench):
reaching it counts as success, since everything the user typed was accepted by then.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ufmjax import cli
from ufmjax.cli import build_parser, main

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Reached(BaseException):
    """The sentinel standing for the expensive work (BaseException: main does not catch it)."""


def _reach(*args, **kwargs):
    raise Reached


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, reference_run):
    """A copy of a finished UFM run (the fuzz may try to write over it), a user folder, a
    plain file and the paths the options are drawn from."""
    root = tmp_path_factory.mktemp("fuzz")
    run = root / "run"
    shutil.copytree(reference_run.path, run)
    user = root / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("a user's file\n")
    plain = root / "plain.txt"
    plain.write_text("not a folder\n")
    (root / "dir.npz").mkdir()
    return {"root": root, "run": run, "user": user, "plain": plain, "source": reference_run.path}


def _restore_run(box) -> None:
    """Put the run copy back if a fuzzed `train --force --out RUN` replaced it."""
    run = box["run"]
    if not (run / "metrics.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(box["source"], run)


@contextlib.contextmanager
def _patched(cwd):
    """Replace the expensive work by the sentinel, and work in `cwd` (relative outputs land
    there, not in the checkout), for the duration of a test."""
    reproduce_mod = importlib.import_module("ufmjax.report.reproduce")  # the name is also a function
    from ufmjax.runs import gpt, steer, ufm

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        for target, name in ((ufm, "train"), (gpt, "train"), (steer.Steering, "sweep"),
                             (steer.Steering, "problem"), (cli, "reproduce"), (reproduce_mod, "reproduce_hf"),
                             (cli, "load_bench")):
            mp.setattr(target, name, _reach)
        yield


def _run(argv) -> tuple[int | str, str]:
    """(exit status or "reached", stderr) of `ufmjax argv`, in process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except Reached:
            rc = "reached"
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, err.getvalue()


def _assert_clean(argv, rc, err) -> None:
    """Only success or exit 2 with one error line; never a traceback."""
    assert "Traceback" not in err, (argv, err)
    assert "Exception ignored" not in err, (argv, err)
    if rc in ("reached", 0):
        return
    assert rc == 2, (argv, rc, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, (argv, "exit 2 without a message")
    if lines[0].startswith("usage:"):  # argparse: its usage block, then exactly one error line
        assert lines[-1].startswith("ufmjax") and ": error: " in lines[-1], (argv, err)
        assert sum(": error: " in line for line in lines) == 1, (argv, err)
    else:
        assert len(lines) == 1 and lines[0].startswith("ufmjax ") and ": error: " in lines[0], (argv, err)


# ---------------------------------------------------------------- the command line

def _commands() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every (sub)command path of the parser with its own parser."""
    found = {}

    def walk(path, parser):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found[path] = parser
            return
        for name, child in subs[0].choices.items():
            walk(path + (name,), child)

    walk((), build_parser())
    return found


COMMANDS = _commands()
NASTY = ["-1", "0", "1", "3", "2.5", "1e308", "-1e308", "nan", "inf", "-inf", "abc", "", " ", "1,2", "0,0,0",
         "-20:20:41", "5:1:3", "0:1:0", "0:1:2:3", "-1e308:1e308:11", "0:nan:5", "1e-300", "x" * 300, "é",
         "0:1:100000000", "uppercase", "evil", "joy", "float32", "bfloat16", "max", "min"]


def _paths(box) -> list[str]:
    r = box["root"]
    return [str(r / "out.npz"), str(r / "out.json"), str(r / "dir.npz"), str(box["plain"] / "x.npz"),
            "/proc/ufmjax_fuzz.npz", "/sys/ufmjax_fuzz.json", str(r / ("y" * 300) / "o.npz"),
            str(box["run"] / "config.json"), str(box["run"] / "checkpoints" / "x.npz"), str(box["user"]),
            str(r / "new_run"), str(r / "missing" / "deep" / "o.json"), str(box["plain"]), "relative.npz"]


@st.composite
def command_lines(draw, box):
    path = draw(st.sampled_from(sorted(COMMANDS)))
    parser = COMMANDS[path]
    argv = list(path)
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    positionals = [a for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]
    paths = _paths(box)
    for _ in positionals:
        if draw(st.booleans()):
            argv.append(draw(st.sampled_from([str(box["run"])] * 4 + paths)))
    for action in draw(st.lists(st.sampled_from(options), max_size=6, unique_by=lambda a: a.dest)):
        flag = draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:
            argv.append(flag)
            continue
        pool = list(NASTY)
        if action.choices:
            pool += list(action.choices) * 3
        if action.dest == "out" or action.metavar in ("FILE", "DIR"):
            pool += paths * 2
        if action.dest == "hf":
            pool += [str(Path(__file__).parent / "fixtures" / "hf" / "qwen3")]
        argv += [flag, draw(st.sampled_from(pool))]
    # Most runs name an output where one is required, so validation goes past that point.
    if "--out" not in argv and path[0] in ("train", "sweep", "optimize") and draw(st.integers(0, 3)):
        argv += ["--out", draw(st.sampled_from(paths))]
    if path[0] in ("sweep", "optimize") and "--target" not in argv and draw(st.integers(0, 2)):
        argv += ["--target", draw(st.sampled_from(["0", "1", "2", "3", "-1", "x"]))]
    return argv


def test_command_lines_fuzz(sandbox):
    """Random command lines: success or exit 2 with one line, no traceback."""
    seen = {"reached": 0, 2: 0}

    @FUZZ
    @given(st.data())
    def check(data):
        argv = data.draw(command_lines(sandbox))
        rc, err = _run(argv)
        _assert_clean(argv, rc, err)
        seen[rc] = seen.get(rc, 0) + 1
        assert (sandbox["user"] / "notes.txt").is_file(), (argv, "a user's file was removed")
        _restore_run(sandbox)

    with _patched(sandbox["root"]):
        check()
    # Both outcomes happen: the fuzz reaches the work and is refused, not one of them only.
    assert seen["reached"] >= 10 and seen[2] >= 100, seen


# ---------------------------------------------------------------- damaged run folders

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4),
                    max_leaves=12)


def _leaf_paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaf_paths(v, prefix + (k,))
    yield prefix


@st.composite
def damaged(draw, good: bytes):
    """Bytes for a JSON file of a run: random bytes, a truncated copy, random JSON, or the good
    file with one entry replaced, removed or retyped."""
    kind = draw(st.sampled_from(["bytes", "truncated", "json", "mutated", "mutated", "mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "truncated":
        return good[: draw(st.integers(0, len(good) - 1))]
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    obj = json.loads(good)
    path = draw(st.sampled_from([p for p in _leaf_paths(obj) if p]))
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON)
    return json.dumps(obj).encode()


def test_damaged_run_folders_fuzz(sandbox, tmp_path):
    """config.json / metrics.json damaged at random, read by sweep, optimize and train: the run
    loads, or the command ends with exit 2 and one line naming the problem."""
    run = sandbox["run"]
    files = {name: (run / name).read_bytes() for name in ("config.json", "metrics.json")}
    out = tmp_path / "s.npz"

    @settings(FUZZ, max_examples=250)
    @given(st.sampled_from(sorted(files)), st.data(),
           st.sampled_from([["sweep", "{run}", "--target", "0", "--alphas", "0:1:3", "--out", "{out}"],
                            ["optimize", "{run}", "--target", "1", "--out", "{out}.json"],
                            ["train", "ufm", "--out", "{run}", "--quiet"]]))
    def check(name, data, template):
        blob = data.draw(damaged(files[name]))
        (run / name).write_bytes(blob)
        try:
            argv = [a.format(run=run, out=out) for a in template]
            rc, err = _run(argv)
            _assert_clean(argv + [f"<{name}: {blob[:80]!r}>"], rc, err)
        finally:
            for n, good in files.items():
                (run / n).write_bytes(good)

    with _patched(tmp_path):
        check()
