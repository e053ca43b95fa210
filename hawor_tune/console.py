"""A compact live view of a search: one row per trial, redrawn in place on a terminal, periodic lines in a log.

Ray Tune 2.x's default output engine prints every reported result of every trial (here a table of ~60
per-joint metrics per epoch) and ignores a ``progress_reporter`` unless ``RAY_AIR_NEW_OUTPUT=0`` brings back
its legacy engine (``ray.tune.experimental.output.get_air_verbosity``); the legacy ``CLIReporter`` shows
last values only (no best so far, no scheduler stop) and appends a whole new table at every report. So the
search runs Ray silent (``verbose=0``) and :class:`LiveConsole`, a Tune ``Callback``, draws the view; the
per-epoch metrics stay in ``epochs.parquet`` and TensorBoard.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from ray.tune import Callback

TTY_INTERVAL_S = 1.0   # a terminal redraws in place, so often is cheap
LOG_INTERVAL_S = 30.0  # a log gets a new block at most this often, and only when a row changed
# Cursor up to the first line of the previous block, then clear to the end of the screen (ECMA-48 CPL, ED).
_REDRAW = "\x1b[{n}F\x1b[J"


@dataclass
class _Row:
    epoch: int = 0
    now: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    diverged: bool = False
    status: str | None = None  # set when the trial ended (Ray keeps its own status until then)
    stopped_at: int | None = None


def short_names(paths: Iterable[str]) -> dict[str, str]:
    """Column names for dotted parameter paths: the last part (``optim.lr`` -> ``lr``), the whole path where
    two parameters share a last part."""
    paths = list(paths)
    last = [p.rsplit(".", 1)[-1] for p in paths]
    return {p: name if last.count(name) == 1 else p for p, name in zip(paths, last)}


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


class LiveConsole(Callback):
    """Tune callback on the driver that prints the search's trials as one compact table.

    Columns: trial, status (DIVERGED for a trial whose loss went non-finite), epoch of max_epochs, each
    objective's value at the last epoch and best so far, the epoch ASHA stopped the trial at, and the searched
    parameters under :func:`short_names`. A header line says the elapsed time, the trials per status and the
    best trial. On a terminal the block is redrawn in place every :data:`TTY_INTERVAL_S`; otherwise a new
    block is printed at most every :data:`LOG_INTERVAL_S`, and only when a row changed; the search's end
    prints the last state.

    Args:
        objectives: (metric, mode) of every objective; the first ranks the header's best trial.
        max_epochs: the epochs a trial runs when no scheduler stops it.
        param_paths: the searched parameters (dotted paths, as in the trials' configs).
        stream: where to print (default: ``sys.stdout`` at each print).
        tty: redraw in place (default: whether the stream is a terminal).
        interval_s: least time between two blocks (default by ``tty``).
        clock: seconds, monotonic (tests pass a fake).
    """

    def __init__(self, *, objectives: Sequence[tuple[str, str]], max_epochs: int, param_paths: Iterable[str],
                 stream: TextIO | None = None, tty: bool | None = None, interval_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.objectives = list(objectives)
        self.max_epochs = max_epochs
        self.params = short_names(param_paths)
        self._stream, self._tty, self._interval, self._clock = stream, tty, interval_s, clock
        self._rows: dict[str, _Row] = {}
        self._start = clock()
        self._last_print: float | None = None
        self._last_table: list[str] | None = None
        self._drawn = 0  # lines of the block on screen (terminal only)

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    @property
    def tty(self) -> bool:
        if self._tty is None:
            isatty = getattr(self.stream, "isatty", None)
            self._tty = bool(isatty and isatty())
        return self._tty

    @property
    def interval_s(self) -> float:
        return self._interval if self._interval is not None else TTY_INTERVAL_S if self.tty else LOG_INTERVAL_S

    # --- Tune's callback hooks --------------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        self._start = self._clock()  # also on a restored run, whose callbacks were unpickled

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        row = self._rows.setdefault(trial.trial_id, _Row())
        row.epoch = int(result.get("training_iteration", result.get("epoch", row.epoch)))
        row.diverged = row.diverged or bool(result.get("diverged", False))
        for metric, mode in self.objectives:
            value = result.get(metric)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            row.now[metric] = float(value)
            if math.isfinite(value):
                old = row.best.get(metric)
                better = old is None or (value < old if mode == "min" else value > old)
                row.best[metric] = float(value) if better else old

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self._rows.setdefault(trial.trial_id, _Row())
        row.status = "DIVERGED" if row.diverged else "TERMINATED"
        if not row.diverged and 0 < row.epoch < self.max_epochs:
            row.stopped_at = row.epoch

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._rows.setdefault(trial.trial_id, _Row()).status = "ERROR"

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = self._clock()
        if self._last_print is not None and now - self._last_print < self.interval_s:
            return
        self.show(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.show(trials)

    # --- drawing -----------------------------------------------------------------------------------------

    def table(self, trials: Sequence[Any]) -> list[str]:
        """The rows (header first) for Ray's trials, as text lines, columns aligned."""
        header = ["trial", "status", "epoch"]
        for metric, _ in self.objectives:
            header += [metric, "best"]
        header += ["asha stop", *self.params.values()]
        body = []
        for t in trials:
            row = self._rows.get(t.trial_id, _Row())
            status = row.status or ("DIVERGED" if row.diverged else str(t.status))
            cells = [str(t.trial_id), status, f"{row.epoch}/{self.max_epochs}" if row.epoch else ""]
            for metric, _ in self.objectives:
                cells += [_fmt(row.now.get(metric)), _fmt(row.best.get(metric))]
            config = getattr(t, "config", {}) or {}
            cells += [str(row.stopped_at) if row.stopped_at else "", *(_fmt(config.get(p)) for p in self.params)]
            body.append(cells)
        widths = [max(len(c[i]) for c in [header, *body]) for i in range(len(header))]
        return ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [header, *body]]

    def summary(self, trials: Sequence[Any]) -> str:
        """One line: elapsed time, trials per status, the best trial by the first objective."""
        elapsed = int(self._clock() - self._start)
        counts: dict[str, int] = {}
        for t in trials:
            row = self._rows.get(t.trial_id, _Row())
            status = row.status or ("DIVERGED" if row.diverged else str(t.status))
            counts[status] = counts.get(status, 0) + 1
        line = f"[{elapsed // 3600:d}:{elapsed % 3600 // 60:02d}:{elapsed % 60:02d}] {len(trials)} trials: " + \
            ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        metric, mode = self.objectives[0]
        scored = [(row.best[metric], tid) for tid, row in self._rows.items() if metric in row.best]
        if scored:
            value, tid = (min if mode == "min" else max)(scored)
            line += f"; best {metric} {_fmt(value)} (trial {tid})"
        return line

    def show(self, trials: Sequence[Any]) -> None:
        """Print the block now: redraw it in place on a terminal; in a log only when a row changed."""
        self._last_print = self._clock()
        if not trials:
            return
        table = self.table(trials)
        if not self.tty and table == self._last_table:
            return
        self._last_table = table
        lines = [self.summary(trials), *table]
        out = self.stream
        if self.tty and self._drawn:
            out.write(_REDRAW.format(n=self._drawn))
        out.write("\n".join(lines) + "\n")
        out.flush()
        self._drawn = len(lines) if self.tty else 0
