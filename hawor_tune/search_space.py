"""Search-space files: the YAML contract of a hyperparameter search, checked before Ray starts.

A search-space file names the training config the trials start from (``base``, relative to the file),
fixed dotted ``overrides``, the ``metric`` every trial reports and its ``mode`` (or lists of both: a
multi-objective search), the trial budget
(``num_samples``, ``max_concurrent``), the ``search`` algorithm, the ``scheduler``, per-trial
``resources`` and the ``params`` to search (dotted paths into the training config)::

    base: ../configs/tiny.yaml
    overrides: {train.epochs: 8}
    metric: val/mpjpe
    mode: min
    num_samples: 16
    max_concurrent: 2
    search: {algorithm: optuna, seed: 0, stopped_as: complete, startup_trials: 4}   # optuna | random; ...
    scheduler: {type: asha, max_epochs: 8, grace_period: 1, reduction_factor: 3}   # asha | fifo
    resources: {cpu: 1, gpu: 0}
    params:
      optim.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-2}
      data.seq_len: {type: choice, values: [4, 8, 16]}

:func:`load_search_space` checks everything against the typed config (each param's type, bounds and
choices must fit its field, and the config must build at the corners of the space) and against the
metrics the trainer reports, so that a mistake fails in a second with one line naming the file, the key
and the fix, instead of inside a Ray worker. :class:`SearchSpace` then builds every trial's config
(:meth:`SearchSpace.trial_config`); :mod:`hawor_tune.tune_space` maps its params onto Ray Tune and Optuna.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import reduce
from pathlib import Path
from typing import Any

import yaml

from hawor_tune.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    field_info,
    load_config,
    parse_override,
)
from hawor_tune.epoch_metrics import OBJECTIVE, REPORTED_METRICS, check_objective, constraint_columns
from hawor_tune.errors import HaworTuneError

logger = logging.getLogger(__name__)

ALGORITHMS = ("optuna", "random")
# How Optuna is told of a trial the scheduler stopped early: COMPLETE with its last value (Ray's OptunaSearch),
# or PRUNED with its per-epoch values (hawor_tune.pruning_search).
STOPPED_AS = ("complete", "pruned")
DEFAULT_STOPPED_AS = "complete"
SCHEDULERS = ("asha", "fifo")
MODES = ("min", "max")
PARAM_TYPES = ("uniform", "loguniform", "quniform", "randint", "choice")

_TOP_KEYS = ("base", "overrides", "metric", "mode", "num_samples", "max_concurrent", "search", "scheduler",
             "resources", "params")
_REQUIRED_KEYS = ("base", "metric", "mode", "num_samples", "params")
_PARAM_KEYS = {"uniform": ("low", "high"), "loguniform": ("low", "high"), "quniform": ("low", "high", "q"),
               "randint": ("low", "high"), "choice": ("values",)}
# Which parameter types fit a config field of each declared type.
_TYPES_FOR_FIELD = {float: ("uniform", "loguniform", "quniform", "choice"), int: ("randint", "quniform", "choice"),
                    bool: ("choice",), str: ("choice",)}
_UNSEARCHABLE = {
    "train.epochs": "it is every trial's epoch budget, which the scheduler owns; fix it in overrides",
    "train.out_dir": "every trial writes into its own Tune trial folder",
    "train.threads": "every trial sets it from its CPU resources",
}
_SCALARS = (bool, int, float, str)


class SearchSpaceError(HaworTuneError, ValueError):
    """A search-space file is invalid; the single-line message names the file, the key and the fix."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter.

    Bounds are inclusive and typed like the config field: ints for ``randint`` and for ``quniform`` on an
    int field (then ``q`` is an int too), floats otherwise. ``quniform`` bounds are multiples of ``q``.
    ``values`` holds a ``choice``'s values, converted to the field's type.
    """

    path: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    q: float | int | None = None
    values: tuple[Any, ...] | None = None

    @property
    def is_integer(self) -> bool:
        """Whether the parameter takes integer values (``randint``, or ``quniform`` on an int field)."""
        return self.type == "randint" or (self.type == "quniform" and isinstance(self.q, int))


@dataclass
class SearchSpace:
    """A checked search-space file; build it with :func:`load_search_space`.

    ``overrides`` holds the file's overrides with the command line's ``--set`` values on top.
    ``base_config`` is the base file with those overrides applied, its relative paths resolved against the
    working directory at load time: every trial starts from it, and it travels with the space (into Ray
    workers, whose working directory is their trial folder, and into the experiment record), so that
    neither needs the files again. ``max_epochs`` is the most epochs a trial runs (ASHA's ``max_t``);
    trials are configured for ``train.epochs`` (from the base config and overrides), which is never below
    it. ``grace_period`` and ``reduction_factor`` are None for the fifo scheduler.
    """

    path: Path
    base: Path
    overrides: dict[str, Any]
    base_config: ExperimentConfig
    metric: str
    mode: str
    num_samples: int
    max_concurrent: int
    search_algorithm: str
    search_seed: int
    scheduler_type: str
    max_epochs: int
    grace_period: int | None
    reduction_factor: float | None
    resources_cpu: float
    resources_gpu: float
    params: dict[str, ParamSpec]
    # Every objective, in the file's order; ``metric``/``mode`` are the first (checkpoint ranking, the console).
    metrics: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()
    # How Optuna hears of a trial the scheduler stopped (``search.stopped_as``, one of STOPPED_AS).
    search_stopped_as: str = DEFAULT_STOPPED_AS
    # TPE's random start-up trials (``search.startup_trials``); None: :meth:`tpe_startup_trials`'s default.
    search_startup_trials: int | None = None

    def __post_init__(self) -> None:
        self.metrics = tuple(self.metrics) or (self.metric,)
        self.modes = tuple(self.modes) or (self.mode,)

    @property
    def tpe_startup_trials(self) -> int:
        """TPE's random start-up trials: ``search.startup_trials``, else a third of the trials, at least 2 and at
        most Optuna's default 10 (with Optuna's 10, TPE would never act in a 10-16 trial search)."""
        if self.search_startup_trials is not None:
            return self.search_startup_trials
        return max(2, min(10, self.num_samples // 3))

    @property
    def is_multi_objective(self) -> bool:
        """Whether the space optimises several metrics at once (``metric: [a, b]``)."""
        return len(self.metrics) > 1

    @property
    def objectives(self) -> tuple[tuple[str, str], ...]:
        """(metric, mode) of every objective."""
        return tuple(zip(self.metrics, self.modes))

    @property
    def constraints(self) -> tuple[str, ...]:
        """The reported names of the trials' constraints (``train.constraints``: ``constraint/<metric>``)."""
        return tuple(constraint_columns(self.base_config.train.constraints))

    def trial_config(self, params: Mapping[str, Any] | None = None,
                     overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
        """The training config of one trial: base file, then the space's overrides (both held in
        ``base_config``), then the trial's parameter values, then ``overrides``.

        Args:
            params: values of searched parameters keyed by dotted path (a Tune trial's config, or a row of
                trials.parquet). Values must lie in the space; float noise from quantised sampling
                (``0.30000000000000004``) is snapped onto the ``q`` grid and clipped into the bounds.
            overrides: dotted keys set last: the trainable's trial folder and threads, or the final
                retrain's full budget and command-line values.

        Raises:
            SearchSpaceError: a key that is not searched here, a value outside the space, or a config that
                does not build.
        """
        values = {}
        for key, value in (params or {}).items():
            spec = self.params.get(key)
            if spec is None:
                raise SearchSpaceError(f"{self.path}: params.{key}: not searched in this space; the searched "
                                       f"parameters are {', '.join(self.params)} (fix others in overrides)")
            values[key] = _into_space(spec, value, f"{self.path}: params.{key}")
        try:
            return load_config(self.base_config.to_dict(), {**values, **(overrides or {})})
        except ConfigError as e:
            raise SearchSpaceError(f"{self.path}: {e}") from None

    def default_point(self) -> dict[str, Any]:
        """The base config's own values of the searched parameters (Optuna's first point to evaluate).

        A value the space cannot take is moved to the nearest one it can, and the move is logged: a
        number is clipped into ``[low, high]`` (and, for ``quniform``, rounded to the nearest multiple of
        ``q``); a choice falls back to the numerically nearest value, or to the first value when the values
        are not numbers. So the point is always valid for
        :func:`hawor_tune.tune_space.optuna_distributions`.
        """
        cfg = self.base_config
        point = {}
        for key, spec in self.params.items():
            own = _get(cfg, key)
            point[key] = _nearest_in_space(spec, own)
            if point[key] != own:
                logger.info("default point: %s = %r from the base config is outside the space; using %r",
                            key, own, point[key])
        return point

    def to_dict(self) -> dict[str, Any]:
        """The space as JSON values (the experiment record's ``space``); :meth:`from_dict` reads it back."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(path=str(self.path), base=str(self.base), base_config=self.base_config.to_dict(),
                    params={key: dataclasses.asdict(spec) for key, spec in self.params.items()})
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        """Rebuild a space from :meth:`to_dict` output, without reading or checking its files again.

        Raises:
            KeyError, TypeError, ConfigError: ``data`` is not :meth:`to_dict` output.
        """
        params = {key: ParamSpec(**{**spec, "values": None if spec["values"] is None else tuple(spec["values"])})
                  for key, spec in data["params"].items()}
        return cls(**{**data, "path": Path(data["path"]), "base": Path(data["base"]),
                      "metrics": tuple(data.get("metrics", ())), "modes": tuple(data.get("modes", ())),
                      "base_config": config_from_dict(data["base_config"]), "params": params})


def load_search_space(path: str | os.PathLike, *, extra_overrides: Iterable[str] = ()) -> SearchSpace:
    """Read and check a search-space file.

    Args:
        path: the YAML file.
        extra_overrides: ``key=value`` strings (the CLI's ``--set``), applied on top of ``overrides``.

    Raises:
        SearchSpaceError: anything wrong; the message names the file, the key and the fix.
    """
    name = os.fspath(path)
    file = Path(path).resolve()
    if not file.is_file():
        raise SearchSpaceError(f"{name}: no such file; pass a search-space YAML such as search_spaces/lr_seq.yaml")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise SearchSpaceError(f"{name}: not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    check = _Checker(name)
    if not isinstance(raw, dict):
        raise SearchSpaceError(f"{name}: must be a mapping with keys {', '.join(_TOP_KEYS)}, got {raw!r}")
    unknown = sorted(str(k) for k in raw if k not in _TOP_KEYS)
    if unknown:
        raise check.error(unknown[0], f"unknown key; allowed keys are {', '.join(_TOP_KEYS)}")
    for key in _REQUIRED_KEYS:
        if key not in raw:
            raise check.error(key, f"missing; every search space sets {', '.join(_REQUIRED_KEYS)}")

    if not isinstance(raw["base"], str) or not raw["base"]:
        raise check.error("base", f"must be the path of a training config relative to this file, got {raw['base']!r}")
    base = (file.parent / raw["base"]).resolve()
    if not base.is_file():
        raise check.error("base", f"{base} does not exist; give the training config's path relative to this file")
    workdir = Path.cwd()
    overrides = check.overrides(raw.get("overrides"))
    fixed = dict(overrides)
    for item in extra_overrides:
        try:
            key, value = parse_override(item)
            field_info(key)
        except ConfigError as e:
            raise check.error(f"--set {item}", str(e)) from None
        fixed[key] = value

    def build(values: Mapping[str, Any], key: str, fix: str) -> ExperimentConfig:
        try:
            return load_config(base, values, base_dir=workdir)
        except ConfigError as e:
            raise check.error(key, f"{e}; {fix}") from None

    cfg = build({}, "base", f"fix the training config {raw['base']}")
    if overrides:
        cfg = build(overrides, "overrides", "fix that override")
    if fixed != overrides:
        cfg = build(fixed, "--set", "fix that --set value")

    metrics, modes = check.objectives(raw["metric"], raw["mode"], (*REPORTED_METRICS, OBJECTIVE))
    if OBJECTIVE in metrics:
        if not cfg.train.objective:
            raise check.error("metric", f"{OBJECTIVE} is the weighted objective the trials report when the training "
                              "config declares one: set train.objective in overrides, e.g. overrides: "
                              "{train.objective: {mpjpe: 1.0, w_mpjpe: 1.0, accel_error: 0.5}}")
        if modes[metrics.index(OBJECTIVE)] != "min":
            raise check.error("mode", f"{OBJECTIVE} is a sum of errors over the baseline's: its mode is min")
    try:
        check_objective(cfg.train.objective)
        check_objective(cfg.train.constraints, "train.constraints")
    except ConfigError as e:
        raise check.error("overrides", str(e)) from None
    num_samples = check.integer("num_samples", raw["num_samples"], low=1)
    max_concurrent = check.integer("max_concurrent", raw.get("max_concurrent", 1), low=1)

    search = check.section("search", raw.get("search"), ("algorithm", "seed", "stopped_as", "startup_trials"))
    algorithm = search.get("algorithm", "optuna")
    if algorithm not in ALGORITHMS:
        raise check.error("search.algorithm", f"must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    seed = check.integer("search.seed", search.get("seed", 0), low=0)
    stopped_as = search.get("stopped_as", DEFAULT_STOPPED_AS)
    if stopped_as not in STOPPED_AS:
        raise check.error("search.stopped_as", f"must be one of {', '.join(STOPPED_AS)}, got {stopped_as!r}")
    if "stopped_as" in search and algorithm != "optuna":
        raise check.error("search.stopped_as", f"{stopped_as!r}: only algorithm optuna is told how a stopped "
                          f"trial ended; remove it or use algorithm: optuna")
    startup_trials = None
    if "startup_trials" in search:
        startup_trials = check.integer("search.startup_trials", search["startup_trials"], low=0)
        if algorithm != "optuna":
            raise check.error("search.startup_trials", f"{startup_trials}: only algorithm optuna (TPE) has random "
                              f"start-up trials; remove it or use algorithm: optuna")

    sched = check.section("scheduler", raw.get("scheduler"), ("type", "max_epochs", "grace_period",
                                                              "reduction_factor"))
    # ASHA ranks trials by one metric, so a multi-objective space runs every trial to the end (fifo).
    sched_type = sched.get("type", "fifo" if len(metrics) > 1 else "asha")
    if sched_type not in SCHEDULERS:
        raise check.error("scheduler.type", f"must be one of {', '.join(SCHEDULERS)}, got {sched_type!r}")
    if sched_type == "asha" and len(metrics) > 1:
        raise check.error("scheduler.type", f"asha ranks trials by one metric and cannot stop a multi-objective "
                          f"search over {list(metrics)}; use type: fifo")
    epochs = cfg.train.epochs
    max_epochs = check.integer("scheduler.max_epochs", sched.get("max_epochs", epochs), low=1)
    if max_epochs > epochs:
        raise check.error("scheduler.max_epochs", f"{max_epochs} exceeds the trials' train.epochs ({epochs}); "
                          f"lower it or raise train.epochs in overrides")
    grace_period = reduction_factor = None
    if sched_type == "fifo":
        extra = sorted(set(sched) & {"grace_period", "reduction_factor"})
        if extra:
            raise check.error(f"scheduler.{extra[0]}", "only the asha scheduler uses it; remove it or use type: asha")
        if max_epochs != epochs:
            raise check.error("scheduler.max_epochs", f"fifo runs every trial for train.epochs ({epochs}), got "
                              f"{max_epochs}; remove max_epochs or set train.epochs in overrides")
    else:
        grace_period = check.integer("scheduler.grace_period", sched.get("grace_period", 1), low=1)
        if grace_period > max_epochs:
            raise check.error("scheduler.grace_period", f"{grace_period} exceeds scheduler.max_epochs "
                              f"({max_epochs}); use a grace period of 1..{max_epochs}")
        reduction_factor = check.number("scheduler.reduction_factor", sched.get("reduction_factor", 3), low=2)

    res = check.section("resources", raw.get("resources"), ("cpu", "gpu"))
    cpu = check.number("resources.cpu", res.get("cpu", 1), low=0)
    gpu = check.number("resources.gpu", res.get("gpu", 0), low=0)

    params = check.buildable(base, fixed, workdir, check.params(raw["params"], fixed))
    return SearchSpace(path=file, base=base, overrides=fixed, base_config=cfg, metric=metrics[0], mode=modes[0],
                       num_samples=num_samples, max_concurrent=max_concurrent, search_algorithm=algorithm,
                       search_seed=seed, scheduler_type=sched_type, max_epochs=max_epochs,
                       grace_period=grace_period, reduction_factor=reduction_factor, resources_cpu=cpu,
                       resources_gpu=gpu, params=params, metrics=metrics, modes=modes,
                       search_stopped_as=stopped_as, search_startup_trials=startup_trials)


class _Checker:
    """Reads the parts of one file, raising errors that start with the file's name and the key."""

    def __init__(self, name: str) -> None:
        self.name = name

    def error(self, key: str, problem: str) -> SearchSpaceError:
        return SearchSpaceError(f"{self.name}: {key}: {problem}")

    def section(self, key: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(key, f"must be a mapping with keys {', '.join(allowed)}, got {value!r}")
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise self.error(f"{key}.{unknown[0]}", f"unknown key; allowed keys are {', '.join(allowed)}")
        return value

    def integer(self, key: str, value: Any, *, low: int) -> int:
        number = _number(value, integer=True)
        if number is None or number < low:
            raise self.error(key, f"must be an integer >= {low}, got {value!r}")
        return number

    def number(self, key: str, value: Any, *, low: float) -> float:
        number = _number(value, integer=False)
        if number is None or number < low:
            raise self.error(key, f"must be a number >= {low}, got {value!r}")
        return number

    def objectives(self, metric: Any, mode: Any, reported: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``metric`` and ``mode``: one name and min/max, or two equally long lists (a multi-objective space)."""
        if isinstance(metric, list) != isinstance(mode, list):
            what = "metric is a list and mode is not" if isinstance(metric, list) else "mode is a list and metric is not"
            raise self.error("mode", f"{what} (metric {metric!r}, mode {mode!r}); give both as one value, or both "
                             f"as lists of the same length, e.g. metric: [val/mpjpe, val/cam_trans_error] with "
                             f"mode: [min, min]")
        metrics, modes = (metric, mode) if isinstance(metric, list) else ([metric], [mode])
        if not metrics:
            raise self.error("metric", f"an empty list; use one of {', '.join(reported)}, or a list of them")
        if len(modes) != len(metrics):
            raise self.error("mode", f"{mode!r} has {len(modes)} entries but metric {metric!r} has {len(metrics)}; "
                             f"give one min or max per metric")
        for i, m in enumerate(metrics):
            if not isinstance(m, str) or m not in reported:
                key = f"metric[{i}]" if isinstance(metric, list) else "metric"
                raise self.error(key, f"trials do not report {m!r}; use one of {', '.join(reported)}")
        if len(set(metrics)) < len(metrics):
            raise self.error("metric", f"{metric!r} repeats a metric; list each objective once")
        for i, m in enumerate(modes):
            if m not in MODES:
                key = f"mode[{i}]" if isinstance(mode, list) else "mode"
                raise self.error(key, f"must be min or max, got {m!r}")
        return tuple(metrics), tuple(modes)

    def overrides(self, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error("overrides", f"must be a mapping of dotted config keys to values, e.g. "
                             f"{{train.epochs: 8}}, got {value!r}")
        for key in value:
            try:
                field_info(str(key))
            except ConfigError as e:
                raise self.error(f"overrides.{key}", f"{e}; use dotted keys such as train.epochs") from None
        return {str(k): v for k, v in value.items()}

    def params(self, value: Any, fixed: Mapping[str, Any]) -> dict[str, ParamSpec]:
        if not isinstance(value, dict) or not value:
            raise self.error("params", f"must map dotted config keys to distributions, e.g. "
                             f"{{optim.lr: {{type: loguniform, low: 1.0e-4, high: 1.0e-2}}}}, got {value!r}")
        return {str(path): self.param(str(path), spec, fixed) for path, spec in value.items()}

    def param(self, path: str, spec: Any, fixed: Mapping[str, Any]) -> ParamSpec:
        key = f"params.{path}"
        try:
            ftype, f = field_info(path)
        except ConfigError as e:
            raise self.error(key, f"{e}; search a field of the training config") from None
        if path in _UNSEARCHABLE:
            raise self.error(key, f"cannot be searched: {_UNSEARCHABLE[path]}")
        if path in fixed:
            raise self.error(key, "is also fixed in overrides (or --set); remove it from one of them")
        if not isinstance(spec, dict) or spec.get("type") not in PARAM_TYPES:
            raise self.error(key, f"must be a mapping with a type among {', '.join(PARAM_TYPES)}, got {spec!r}")
        kind = spec["type"]
        fits = _TYPES_FOR_FIELD.get(ftype, ())
        if kind not in fits:
            hint = f"use {' or '.join(fits)}" if fits else "fix it in overrides instead"
            raise self.error(key, f"{kind} does not fit the config field's type {ftype.__name__}; {hint}")
        needed = _PARAM_KEYS[kind]
        for name in spec:
            if name != "type" and name not in needed:
                raise self.error(f"{key}.{name}", f"unknown key for {kind}; it takes {', '.join(needed)}")
        for name in needed:
            if name not in spec:
                raise self.error(key, f"{kind} needs {', '.join(needed)}; {name} is missing")
        if kind == "choice":
            return ParamSpec(path, kind, values=self.choice_values(key, spec["values"]))

        integer = ftype is int
        bounds = {}
        for name in needed:
            bounds[name] = _number(spec[name], integer=integer)
            if bounds[name] is None:
                what = "an integer" if integer else "a number"
                raise self.error(key, f"{kind} needs {name} to be {what} (the field is {ftype.__name__}), "
                                 f"got {name}={spec[name]!r}")
        low, high, q = bounds["low"], bounds["high"], bounds.get("q")
        if low >= high:
            raise self.error(key, f"{kind} needs low < high, got low={low}, high={high}")
        if kind == "loguniform" and low <= 0:
            raise self.error(key, f"loguniform needs low > 0, got low={low}; use uniform to include 0")
        if q is not None:
            if q <= 0:
                raise self.error(key, f"quniform needs q > 0, got q={q}")
            if any(_decimal(x) % _decimal(q) != 0 for x in (low, high)):
                raise self.error(key, f"quniform needs low and high to be multiples of q (Tune's grid is the "
                                 f"multiples of q), got low={low}, high={high}, q={q}")
        allowed_low, allowed_high = f.metadata.get("low"), f.metadata.get("high")
        if (allowed_low is not None and low < allowed_low) or (allowed_high is not None and high > allowed_high):
            allowed = f"[{'-inf' if allowed_low is None else allowed_low}, " \
                      f"{'inf' if allowed_high is None else allowed_high}]"
            raise self.error(key, f"bounds [{low}, {high}] leave the config's allowed range {allowed}; "
                             f"keep low and high inside it")
        return ParamSpec(path, kind, low=low, high=high, q=q)

    def choice_values(self, key: str, values: Any) -> tuple[Any, ...]:
        if not isinstance(values, list) or not values:
            raise self.error(key, f"choice needs a non-empty list of values, got {values!r}")
        if len(values) < 2:
            raise self.error(key, f"choice needs at least two values, got {values!r}; fix a single value in "
                             f"overrides instead")
        for value in values:
            if not isinstance(value, _SCALARS):
                raise self.error(key, f"choice values must be numbers, strings or booleans (Optuna stores "
                                 f"them), got {value!r}")
        return tuple(values)

    def buildable(self, base: Path, fixed: Mapping[str, Any], workdir: Path,
                  params: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        """Check that each value a parameter can reach builds alone, and the low and high corners together.

        Returns the params with each choice's values as the config holds them (``1`` becomes ``1.0`` on a
        float field), so that trials and Optuna see the field's own type.
        """
        def build(point: Mapping[str, Any]) -> ExperimentConfig:
            return load_config(base, {**fixed, **point}, base_dir=workdir)

        checked = {}
        for path, spec in params.items():
            reached = []
            for value in spec.values if spec.type == "choice" else (spec.low, spec.high):
                try:
                    reached.append(_get(build({path: value}), path))
                except ConfigError as e:
                    raise self.error(f"params.{path}", f"the config does not build with {value!r}: {e}; "
                                     f"remove or change that value") from None
            if spec.type == "choice" and len(set(reached)) < len(reached):
                raise self.error(f"params.{path}", f"choice values repeat as {reached}; list each once")
            checked[path] = dataclasses.replace(spec, values=tuple(reached)) if spec.type == "choice" else spec
        for end, index in (("low", 0), ("high", -1)):
            point = {path: spec.values[index] if spec.type == "choice" else getattr(spec, end)
                     for path, spec in checked.items()}
            try:
                build(point)
            except ConfigError as e:
                raise self.error("params", f"the config does not build with every parameter at its {end} "
                                 f"end ({point}): {e}; narrow the ranges") from None
        return checked


def _number(value: Any, *, integer: bool) -> float | int | None:
    """``value`` as a finite float (or int), or None when it is not one; booleans are not numbers here."""
    if isinstance(value, str) and not integer:  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    if not integer:
        return float(value)
    if isinstance(value, numbers.Integral) or float(value).is_integer():
        return int(value)
    return None


def _decimal(x: float | int) -> Decimal:
    # The shortest decimal that prints as x, so that 0.3 is a multiple of 0.1.
    return Decimal(repr(x))


def _get(cfg: ExperimentConfig, dotted: str) -> Any:
    return reduce(getattr, dotted.split("."), cfg)


def _snap(spec: ParamSpec, x: float | int) -> float | int:
    """Clip ``x`` into the bounds and, for quniform, round it to the nearest point of the ``q`` grid."""
    x = min(max(x, spec.low), spec.high)
    if spec.type == "quniform":
        k = round((x - spec.low) / spec.q)
        x = spec.low + k * spec.q if spec.is_integer else float(_decimal(spec.low) + k * _decimal(spec.q))
        x = min(x, spec.high)
    return int(x) if spec.is_integer else float(x)


def _into_space(spec: ParamSpec, value: Any, where: str) -> Any:
    """Check a sampled value against its parameter, removing float noise; raise when it is outside."""
    if spec.type == "choice":
        for choice in spec.values:
            if value == choice and isinstance(value, bool) == isinstance(choice, bool):
                return choice
        raise SearchSpaceError(f"{where}: {value!r} is not one of the choices {list(spec.values)}")
    x = _number(value, integer=spec.is_integer)
    tolerance = 1e-9 * max(1.0, abs(spec.low), abs(spec.high))
    if x is None or not spec.low - tolerance <= x <= spec.high + tolerance:
        kind = "an integer" if spec.is_integer else "a number"
        raise SearchSpaceError(f"{where}: {value!r} is outside the space; {spec.type} takes {kind} in "
                               f"[{spec.low}, {spec.high}]")
    return _snap(spec, x)


def _nearest_in_space(spec: ParamSpec, value: Any) -> Any:
    if spec.type != "choice":
        return _snap(spec, value)
    if value in spec.values:
        return value
    numeric = [v for v in spec.values if _number(v, integer=False) is not None and not isinstance(v, str)]
    if _number(value, integer=False) is None or isinstance(value, str) or not numeric:
        return spec.values[0]
    return min(numeric, key=lambda v: abs(v - value))
