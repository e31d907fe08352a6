"""Progress bars on stderr, drawn by `rich.progress` (installed with Flax).

`with Progress(total, desc) as bar: bar.update(n, loss=...)` shows the description, a bar,
done/total, the rate and the time left. Bars opened while another is open (a training inside
a `reproduce` section) join the open display as extra lines, since rich draws one live display
per console; such inner bars disappear when they finish, the outermost stays as a summary line.

A bar is drawn only when stderr is a terminal: logs and pipes stay clean. Set the environment
variable UFMJAX_PROGRESS=1 to draw them anyway (one final line per bar), or 0 for never.
"""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.table import Column
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichProgress
from rich.text import Text

ENV = "UFMJAX_PROGRESS"


class _Rate(ProgressColumn):
    """Steps per second (or seconds per step when slower than one a second)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("", style="progress.data.speed")
        text = f"{speed:.3g}/s" if speed >= 1 else f"{1 / speed:.3g} s/it"
        return Text(text, style="progress.data.speed")


def wanted(enabled: bool, stream=None) -> bool:
    """Whether a bar is drawn: asked for, and stderr a terminal unless UFMJAX_PROGRESS says."""
    if not enabled:
        return False
    env = os.environ.get(ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


_display: dict = {}  # the one live rich display per stream: {"progress": ..., "users": n}


class Progress:
    """A progress bar for `total` steps; a no-op when not drawn (see `wanted`).

    Args:
      total: steps expected (at least 1).
      desc: the label on the left.
      enabled: False never draws (the library's `progress=False`).
      stream: where to draw (stderr by default).
    """

    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream=None):
        self.total, self.desc = max(1, int(total)), desc
        self.stream = stream or sys.stderr
        self.enabled = wanted(enabled, self.stream)
        self.n, self.t0 = 0, time.perf_counter()
        self._task = None
        self._outer = False
        self._info = ""

    def __enter__(self):
        if not self.enabled:
            return self
        key = id(self.stream)
        if key not in _display:
            console = Console(file=self.stream, force_terminal=self.stream.isatty() or None)
            rich = _RichProgress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                 _Rate(), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, ratio=1,
                                                                                     overflow="ellipsis")),
                                 console=console, refresh_per_second=5, expand=True,
                                 # stdout stays stdout: a piped command's printed summary must not
                                 # move to stderr because a bar is drawn there.
                                 redirect_stdout=False, redirect_stderr=False)
            rich.start()
            _display[key] = {"progress": rich, "users": 0}
            self._outer = True
        entry = _display[key]
        entry["users"] += 1
        self._rich = entry["progress"]
        self._task = self._rich.add_task(self.desc, total=self.total, info="")
        return self

    def update(self, n: int = 1, **info) -> None:
        """Advance by n steps; keyword values are shown after the bar (floats to 4 digits)."""
        self.n += n
        if self._task is None:
            return
        fields = {}
        if info:
            fields["info"] = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in info.items())
        # New text is drawn at once: a step shorter than the 0.2 s refresh would never be seen.
        refresh = bool(fields) and fields["info"] != self._info
        self._info = fields.get("info", self._info)
        self._rich.update(self._task, advance=n, refresh=refresh, **fields)

    def __exit__(self, exc_type, exc, tb):
        if self._task is None:
            return False
        key = id(self.stream)
        if exc_type is not None:  # say where it stopped, never "done"
            why = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
            self._rich.update(self._task, description=f"{self.desc} ({why})")
        elif not self._outer:
            self._rich.remove_task(self._task)
        entry = _display[key]
        entry["users"] -= 1
        if self._outer:
            self._rich.stop()
            del _display[key]
        self._task = None
        return False
