"""What ``--resume`` does with each trial of an interrupted search that failed: run it again from its last
checkpoint when its environment failed, leave it failed when it failed on its own (:mod:`hawor_tune.failures`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hawor_tune.failures import OWN
from hawor_tune.results import TRIALS_FILE, StorageError, read_rows


@dataclass(frozen=True)
class FailedTrial:
    """A trial that errored (``errored``) or diverged, and whether ``--resume`` runs it again."""

    trial_id: str
    runs_again: bool
    why: str
    errored: bool = True
    from_epoch: int | None = None  # the epoch of the checkpoint it continues from (None: from epoch 1)

    def line(self) -> str:
        """What the resume says about it, in one line."""
        if self.runs_again:
            start = f"from its checkpoint of epoch {self.from_epoch}" if self.from_epoch else "from epoch 1"
            return f"resume: trial {self.trial_id} failed because its environment did ({self.why}): runs again {start}"
        return f"resume: trial {self.trial_id} failed on its own ({self.why}): stays failed"


def resume_plan(exp_dir: str | os.PathLike) -> list[FailedTrial]:
    """Each trial of the experiment that errored or diverged, and whether ``--resume`` runs it again.

    Ray restores the trials of its last state snapshot, which a search stopped by a full disk or a crash may
    have written before a trial's error: a trial counts as errored when Ray's record or ``trials.parquet``
    says so (``Tuner.restore`` runs an unfinished one again anyway). Why it failed is its ``failed_by`` in
    ``trials.parquet``, written as it failed; an error that could not be written (the disk was full) counts
    as the environment's: a trial that failed on its own fails the same way again. A diverged trial failed
    on its own.
    """
    from ray.tune import ExperimentAnalysis

    exp_dir = Path(exp_dir)
    rows = {str(r["trial_id"]): r for r in read_rows(exp_dir / TRIALS_FILE)} if (exp_dir / TRIALS_FILE).is_file() else {}
    try:
        trials = ExperimentAnalysis(str(exp_dir)).trials
    except (ValueError, OSError) as e:  # a file of Ray's cut short by a full disk before it wrote atomically
        raise StorageError(f"--resume: Ray's record in {exp_dir} cannot be read ({type(e).__name__}: "
                           f"{str(e).splitlines()[0]}); start the search again under a new name") from None
    plan = []
    for trial in trials:
        row = rows.get(trial.trial_id, {})
        if trial.status == "ERROR" or (trial.status != "TERMINATED" and row.get("status") == "ERROR"):
            why = row.get("error") or "no error recorded"
            if row.get("failed_by") == OWN:
                plan.append(FailedTrial(trial.trial_id, False, why))
                continue
            checkpoint = trial.latest_checkpoint_result
            epoch = checkpoint.metrics.get("training_iteration") if checkpoint is not None else None
            plan.append(FailedTrial(trial.trial_id, True, why, from_epoch=int(epoch) if epoch else None))
        elif trial.status == "TERMINATED" and row.get("diverged"):
            plan.append(FailedTrial(trial.trial_id, False, "diverged", errored=False))
    return plan
