"""Run a hyperparameter search: Ray Tune trials of HaWoR training runs, Optuna TPE proposals, ASHA stops.

    python run_search.py --space search_spaces/loss_weights.yaml
    python run_search.py --space search_spaces/full.yaml --num-samples 32 --address ray://head:10001 \
        --storage /shared/results
    python run_search.py --space search_spaces/loss_weights.yaml --resume   # continue the latest one

Bad input (a space file, a --set override, a flag, the data) or a full disk prints one line naming what is wrong
and exits 2; Ctrl-C stops the trials, prints the command that continues the search and exits 130; anything
else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import socket
import sys
import time
from pathlib import Path

from hawor_tune.cli import ArgumentParser, UsageError, fail, format_flag, format_value, positive_int
from hawor_tune.errors import HaworTuneError

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command that Ctrl-C stopped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--space", required=True, help="search-space YAML (its format: docs/search.md)")
    p.add_argument("--num-samples", type=positive_int, help="trials to run (default: the space's)")
    p.add_argument("--max-concurrent", type=positive_int, help="trials at once (default: the space's)")
    p.add_argument("--storage", default="./results", help="results folder (made if missing), on a shared filesystem for a cluster (default: %(default)s)")
    p.add_argument("--name", help="experiment name (default: <space>-<date>-<time>; with --resume: the latest)")
    p.add_argument("--seed", type=int, help="search seed (default: the space's search.seed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override the base training config, e.g. --set train.epochs=4 (repeatable)")
    p.add_argument("--address", help="join this Ray cluster (e.g. auto, or ray://host:10001) instead of starting one")
    p.add_argument("--resume", action="store_true", help="continue the named (or latest) experiment")
    p.add_argument("--verbose", action="store_true",
                   help="Ray Tune's own output (every result of every trial) instead of the compact live table")
    p.add_argument("--warm-start", metavar="EXPERIMENT",
                   help="seed Optuna's sampler with an earlier search's trials (its folder, or its name under "
                        "--storage); the spaces must match")
    p.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                   help="log every trial to MLflow (optional extra): a tracking URI or folder "
                        "(default: the local file store <storage>/mlruns)")
    p.add_argument("--dashboard-port", type=_port, default=8265,
                   help="local dashboard port, 0 for any free one (default: %(default)s)")
    return p.parse_args(argv)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535 (0: any free port), got {value}")
    return value


def check_dashboard_port(port: int) -> None:
    """Refuse a dashboard port another program already listens on, before the local Ray starts (Ray would
    fail later with a traceback from its dashboard process)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as e:
            raise UsageError(f"--dashboard-port {port}: 127.0.0.1:{port} is in use ({e.strerror}; another Ray "
                             f"dashboard?); pass a free port, or 0 for any free one") from None


def _experiment_name(args: argparse.Namespace, space_path: Path, storage: Path) -> str:
    stem = space_path.stem
    if args.name:
        if not args.resume and (storage / args.name).exists():
            raise UsageError(f"--name {args.name}: {storage / args.name} already exists "
                             f"(add --resume to continue it, or choose another name)")
        return args.name
    if not args.resume:
        return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidates = sorted((d for d in storage.glob(f"{stem}-*") if d.is_dir()), key=lambda d: d.stat().st_mtime)
    if not candidates:
        raise UsageError(f"--resume: no experiment of {space_path.name} under {storage} (name one with --name)")
    return candidates[-1].name


def print_summary(experiment_dir: Path, metric: str, mode: str, resume_command: str | None = None) -> int:
    """Print the search's summary table, read back from trials.parquet (what a later reader sees too).

    Returns:
        How many trials did not finish (the search was interrupted); ``resume_command`` continues them.
    """
    from hawor_tune.failures import OWN
    from hawor_tune.results import EPOCHS_FILE, TRIALS_FILE, best_trial, read_rows

    rows = read_rows(experiment_dir / TRIALS_FILE)
    params = [k for k in (rows[0] if rows else {}) if k.startswith("param/")]
    best_key = f"best/{metric}"
    constrained = any(r.get("feasible") is not None for r in rows)
    header = ["trial", "status", "epochs", "asha stop", *(k[len("param/"):] for k in params), metric,
              *(["meets constraints"] if constrained else [])]
    table = [[r["trial_id"], r["status"] + (" (diverged)" if r["diverged"] else ""), str(r["epochs"]),
              "yes" if r["stopped_early"] else "", *(format_value(r[k]) for k in params),
              format_value(r.get(best_key)),
              *([format_flag(r.get("feasible"))] if constrained else [])] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    best = best_trial(rows, metric, mode)  # the trial run_best.py retrains
    if best is not None:
        print(f"\nbest trial {best['trial_id']}: {metric} = {best[best_key]:.3f} at epoch {best['best_epoch']} "
              f"(errored and diverged trials skipped)")
        if constrained:
            met = sum(1 for r in rows if r.get("feasible"))
            print(f"  {met} of {len(rows)} trials meet the constraints; "
                  + ("the best trial does" if best.get("feasible") else "none does: the best of all is shown"))
        for k in params:
            print(f"  {k[len('param/'):]} = {format_value(best[k])}")
    else:
        print(f"\nno trial completed an epoch with a finite {metric} (errored and diverged trials skipped)")
    pareto = [r["trial_id"] for r in rows if r.get("pareto")]
    if "pareto" in (rows[0] if rows else {}):
        print(f"Pareto-optimal trials ({len(pareto)}): {', '.join(pareto) or 'none'} (run_best.py --objective or "
              f"--trial picks one)")
    stopped = [r for r in rows if r["stopped_early"]]
    at = sorted(r["stopped_at_epoch"] for r in stopped)
    print(f"ASHA stopped {len(stopped)} of {len(rows)} trials" + (f" (at epochs {at})" if at else ""))
    unfinished = [r for r in rows if r["status"] not in ("TERMINATED", "ERROR")]
    resume_command = resume_command or f"python run_search.py --space <space> --name {experiment_dir.name} --resume"
    if unfinished:
        print(f"{len(unfinished)} trials did not finish (search interrupted): continue with {resume_command}")
    errored = [r for r in rows if r["status"] == "ERROR"]
    for r in errored:  # the verdict the resume acts on (hawor_tune/search/resume.py)
        error = r.get("error") or "no error recorded"
        print(f"trial {r['trial_id']} failed on its own ({error})" if r.get("failed_by") == OWN else
              f"trial {r['trial_id']} failed because its environment did ({error})")
    if any(r.get("failed_by") != OWN for r in errored):
        print(f"the trials whose environment failed run again from their last checkpoint with {resume_command}")
    print(f"trials: {experiment_dir / TRIALS_FILE}\nepochs: {experiment_dir / EPOCHS_FILE}")
    study = experiment_dir / "optuna_journal.log"
    if study.is_file():
        print(f"optuna: optuna-dashboard {study}")
    print(f"next:   python run_best.py --experiment {experiment_dir}")
    return len(unfinished)


def _resume_command(argv: list[str], name: str) -> str:
    """The command line that continues this search: the same arguments, its name and --resume."""
    args = [a for a in argv if a != "--resume"]
    if "--name" not in args and not any(a.startswith("--name=") for a in args):
        args += ["--name", name]
    return shlex.join(["python", "run_search.py", *args, "--resume"])


def _warm_start(args: argparse.Namespace, storage: Path, space: object) -> list:
    """The earlier search's finished trials for ``--warm-start`` (checked against the space before Ray starts)."""
    if args.resume:
        raise UsageError("--warm-start seeds a new search; a resumed one keeps its own sampler (drop one of them)")
    if space.search_algorithm != "optuna":
        raise UsageError(f"--warm-start seeds Optuna's sampler; {args.space} searches with "
                         f"{space.search_algorithm} (set search.algorithm: optuna)")
    from hawor_tune.optuna_study import warm_start_trials
    from hawor_tune.tune_space import optuna_distributions

    folder = Path(args.warm_start)
    if not folder.is_dir() and (storage / args.warm_start).is_dir():
        folder = storage / args.warm_start
    trials = warm_start_trials(folder, objectives=space.objectives, distributions=optuna_distributions(space.params))
    print(f"warm start: {len(trials)} finished trials of {folder}")
    return trials


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _search(args, argv)
    except HaworTuneError as e:
        return fail(e)
    except KeyboardInterrupt:  # a Ctrl-C before Ray Tune handles it, or a second one while it stops
        print("error: interrupted; if the experiment folder was made, continue it with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def _search(args: argparse.Namespace, argv: list[str]) -> int:
    from hawor_tune.results import check_resumable, check_storage

    # Where the search writes and the dashboard's port are checked first: cheap, and loading the space
    # imports torch.
    storage = check_storage(args.storage, label="--storage")
    if not args.address:
        check_dashboard_port(args.dashboard_port)
    name = _experiment_name(args, Path(args.space), storage)
    if args.resume:
        check_resumable(storage, name)
        from ray import tune
        if not tune.Tuner.can_restore(str(storage / name)):
            raise UsageError(f"--resume: {storage / name} holds no restorable Ray Tune experiment "
                             f"(the search stopped before Ray saved its state; start it again without --resume)")

    mlflow_uri = None
    if args.mlflow is not None:
        from hawor_tune.mlflow_tracking import tracking_uri
        mlflow_uri = tracking_uri(args.mlflow, storage)

    from hawor_tune.search_space import load_search_space

    space = load_search_space(args.space, extra_overrides=args.overrides)
    warm_trials = _warm_start(args, storage, space) if args.warm_start else None
    changes = {k: v for k, v in (("num_samples", args.num_samples), ("max_concurrent", args.max_concurrent),
                                 ("search_seed", args.seed)) if v is not None}
    space = dataclasses.replace(space, **changes)

    from hawor_tune.search import prepare_in_background, run_search, start_ray

    if args.address:  # missing shards first, one Ray task per sequence on the cluster's nodes
        from hawor_tune.data import prepare_dataset
        prepare_dataset(space.base_config, address=args.address)
    # The data check (on a first search: the data's generation and the pretraining) runs while Ray starts.
    preparing = prepare_in_background(space.base_config)
    try:
        url = start_ray(args.address, args.dashboard_port)
    except (ConnectionError, RuntimeError, ValueError) as e:
        if not args.address:
            raise  # starting a local Ray failed: not the user's input
        raise UsageError(f"--address {args.address}: cannot join the Ray cluster ({str(e).splitlines()[0]})") from e
    if url:
        print(f"Ray dashboard: {url}  (access token: run `ray get-auth-token`; paste it when the page asks)")
    print(f"experiment: {storage / name}")
    outcome = run_search(space, storage=storage, name=name, resume=args.resume, address=args.address,
                         dashboard_port=args.dashboard_port, verbose=1 if args.verbose else 0, mlflow_uri=mlflow_uri,
                         warm_trials=warm_trials, prepared=preparing)
    resume = _resume_command(argv, name)
    if print_summary(outcome.experiment_dir, space.metric, space.mode, resume):
        # Ray Tune stops on Ctrl-C (SIGINT) and returns: say so on stderr and in the exit status.
        print(f"error: search interrupted; continue with: {resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
