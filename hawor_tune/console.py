"""A compact live view of a search: one row per trial, redrawn in place on a terminal, periodic lines in a log.

Ray Tune 2.x's default output engine prints every reported result of every trial (here a table of ~60
per-joint metrics per epoch) and ignores a ``progress_reporter`` unless ``RAY_AIR_NEW_OUTPUT=0`` brings back
its legacy engine (``ray.tune.experimental.output.get_air_verbosity``); the legacy ``CLIReporter`` shows
last values only (no best so far, no scheduler stop) and appends a whole new table at every report. So the
search runs Ray silent (``verbose=0``) and :class:`LiveConsole`, a Tune ``Callback``, draws the view; the
per-epoch metrics stay in ``epochs.parquet`` and TensorBoard.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from ray.tune import Callback

from hawor_tune.cli import format_flag, format_value
from hawor_tune.results import best_trial, summarize_trials

TTY_INTERVAL_S = 1.0   # a terminal redraws in place, so often is cheap
LOG_INTERVAL_S = 30.0  # a log gets a new block at most this often, and only when a row changed
# Cursor up to the first line of the previous block, then clear to the end of the screen (ECMA-48 CPL, ED).
_REDRAW = "\x1b[{n}F\x1b[J"


@dataclass
class _Last:
    """What a trial reported last (the table's epoch and "now" columns), and how it ended."""

    epoch: int = 0
    now: dict[str, float] = field(default_factory=dict)
    status: str | None = None  # TERMINATED or ERROR once the trial ended (Ray keeps its own status until then)


def short_names(paths: Iterable[str]) -> dict[str, str]:
    """Column names for dotted parameter paths: the last part (``optim.lr`` -> ``lr``), the whole path where
    two parameters share a last part."""
    paths = list(paths)
    last = [p.rsplit(".", 1)[-1] for p in paths]
    return {p: name if last.count(name) == 1 else p for p, name in zip(paths, last)}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class LiveConsole(Callback):
    """Tune callback on the driver that prints the search's trials as one compact table.

    Columns: trial, status (DIVERGED for a trial whose loss went non-finite), epoch of max_epochs, each
    objective's value at the last epoch and best so far, the epoch ASHA stopped the trial at, and the searched
    parameters under :func:`short_names`. A header line says the elapsed time, the trials per status and the
    best trial. The best values, the ASHA stops and the best trial come from the epochs reported so far by
    :func:`hawor_tune.results.summarize_trials` and :func:`~hawor_tune.results.best_trial`, the rules of
    ``trials.parquet`` and run_best.py, so the console names the trial run_best.py would retrain. On a terminal the block is redrawn in place every :data:`TTY_INTERVAL_S`; otherwise a new
    block is printed at most every :data:`LOG_INTERVAL_S`, and only when a row changed; the search's end
    prints the last state.

    Args:
        objectives: (metric, mode) of every objective; the first ranks the header's best trial.
        max_epochs: the epochs a trial runs when no scheduler stops it.
        param_paths: the searched parameters (dotted paths, as in the trials' configs).
        constraints: the reported names of the space's constraints; a "met" column says whether a trial
            meets them at its best epoch, and the best trial is one that does when any does.
        stream: where to print (default: ``sys.stdout`` at each print).
        tty: redraw in place (default: whether the stream is a terminal).
        interval_s: least time between two blocks (default by ``tty``).
        clock: seconds, monotonic (tests pass a fake).
    """

    def __init__(self, *, objectives: Sequence[tuple[str, str]], max_epochs: int, param_paths: Iterable[str],
                 constraints: Sequence[str] = (), stream: TextIO | None = None, tty: bool | None = None,
                 interval_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.objectives = list(objectives)
        self.constraints = list(constraints)
        self.max_epochs = max_epochs
        self.params = short_names(param_paths)
        self._stream, self._tty, self._interval, self._clock = stream, tty, interval_s, clock
        self._last: dict[str, _Last] = {}
        self._epochs: dict[tuple[str, int], dict[str, Any]] = {}  # the objectives' rows of epochs.parquet
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
        last = self._last.setdefault(trial.trial_id, _Last())
        last.epoch = int(result.get("training_iteration", result.get("epoch", last.epoch)))
        row = {"trial_id": trial.trial_id, "epoch": last.epoch, "diverged": bool(result.get("diverged", False))}
        for metric, _ in self.objectives:
            value = result.get(metric)
            if _number(value):
                last.now[metric] = row[metric] = float(value)
        for name in self.constraints:
            value = result.get(name)
            row[name] = float(value) if _number(value) else None
        self._epochs[(trial.trial_id, last.epoch)] = row

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._last.setdefault(trial.trial_id, _Last()).status = "TERMINATED"

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._last.setdefault(trial.trial_id, _Last()).status = "ERROR"

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = self._clock()
        if self._last_print is not None and now - self._last_print < self.interval_s:
            return
        self.show(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.show(trials)

    # --- drawing -----------------------------------------------------------------------------------------

    def trial_rows(self, trials: Sequence[Any]) -> dict[str, dict[str, Any]]:
        """Per trial id, its row as ``trials.parquet`` would hold it now (:func:`summarize_trials`), for the
        objectives only."""
        statuses = {t.trial_id: str(t.status) for t in trials}
        meta = {tid: {"status": self._last.get(tid, _Last()).status or statuses.get(tid, "RUNNING")}
                for tid in {*statuses, *self._last}}
        metric, mode = self.objectives[0]
        rows = summarize_trials([self._epochs[k] for k in sorted(self._epochs)], meta, metric=metric, mode=mode,
                                max_epochs=self.max_epochs, param_paths=(), objectives=self.objectives)
        return {r["trial_id"]: r for r in rows}

    def best(self, trials: Sequence[Any]) -> Mapping[str, Any] | None:
        """The best trial's row by the first objective, as run_best.py chooses it: :func:`best_trial` over the
        trials (over the Pareto-optimal ones when there are several objectives); None when no trial counts."""
        rows = list(self.trial_rows(trials).values())
        if len(self.objectives) > 1:
            rows = [r for r in rows if r.get("pareto")]
        return best_trial(rows, *self.objectives[0])

    def table(self, trials: Sequence[Any]) -> list[str]:
        """The rows (header first) for Ray's trials, as text lines, columns aligned."""
        summary = self.trial_rows(trials)
        header = ["trial", "status", "epoch"]
        for metric, _ in self.objectives:
            header += [metric, "best"]
        header += ["asha stop", *(["met"] if self.constraints else []), *self.params.values()]
        body = []
        for t in trials:
            last, row = self._last.get(t.trial_id, _Last()), summary.get(t.trial_id, {})
            cells = [str(t.trial_id), self._status(t, row), f"{last.epoch}/{self.max_epochs}" if last.epoch else ""]
            for metric, _ in self.objectives:
                cells += [format_value(last.now.get(metric)), format_value(row.get(f"best/{metric}"))]
            config = getattr(t, "config", {}) or {}
            met = [format_flag(row.get("feasible"))] if self.constraints else []
            cells += [format_value(row.get("stopped_at_epoch")), *met, *(format_value(config.get(p)) for p in self.params)]
            body.append(cells)
        widths = [max(len(c[i]) for c in [header, *body]) for i in range(len(header))]
        return ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [header, *body]]

    def _status(self, trial: Any, row: Mapping[str, Any]) -> str:
        ended = self._last.get(trial.trial_id, _Last()).status
        if row.get("diverged") and ended != "ERROR":
            return "DIVERGED"
        return ended or str(trial.status)

    def summary(self, trials: Sequence[Any]) -> str:
        """One line: elapsed time, trials per status, the best trial by the first objective (:meth:`best`)."""
        elapsed = int(self._clock() - self._start)
        summary = self.trial_rows(trials)
        counts: dict[str, int] = {}
        for t in trials:
            status = self._status(t, summary.get(t.trial_id, {}))
            counts[status] = counts.get(status, 0) + 1
        line = f"[{elapsed // 3600:d}:{elapsed % 3600 // 60:02d}:{elapsed % 60:02d}] {len(trials)} trials: " + \
            ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        metric = self.objectives[0][0]
        best = self.best(trials)
        if self.constraints:
            met = sum(1 for r in summary.values() if r.get("feasible"))
            line += f"; {met} meet the constraints"
        if best is not None:
            line += f"; best {metric} {format_value(best[f'best/{metric}'])} (trial {best['trial_id']})"
        else:
            line += f"; no best {metric} yet (errored and diverged trials do not count)"
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
