"""The search space: which hyp.yaml keys a study varies and over what values, read from one YAML file.

The same file drives the local Optuna study (`yolo-pipeline tune`) and the Katib Experiment
(`python -m pipelines tune`), so both search the same space:

    lr0: {low: 1.0e-5, high: 0.1, log: true}   # a range (log: sample on a log scale)
    mosaic: {choices: [0.0, 0.5, 1.0]}         # a set of values

Every bound and choice is checked against `Hyp`'s own rules when the file is read, so a trial can never
be handed a hyperparameter the train step would refuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from yolo.errors import UserError, did_you_mean
from yolo.hyp import Hyp

DEFAULT_SPACE = Path(__file__).with_name("default_space.yaml")
_RANGE_KEYS = {"low", "high", "log"}
HYP_KEYS = frozenset(f.name for f in fields(Hyp))


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter: a range [low, high] (optionally log-scaled) or a set of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        d: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            d["log"] = True
        return d


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]
    source: str  # the file it came from, for messages and tune.json

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {p.name: p.to_dict() for p in self.params}

    def suggest(self, trial) -> dict[str, float]:
        """The trial's values, drawn through Optuna's `trial.suggest_*` (so the sampler decides)."""
        values = {}
        for p in self.params:
            if p.choices is not None:
                values[p.name] = float(trial.suggest_categorical(p.name, list(p.choices)))
            else:
                values[p.name] = float(trial.suggest_float(p.name, p.low, p.high, log=p.log))
        return values

    def hyp_for(self, base: Hyp, values: dict[str, float]) -> Hyp:
        """`base` with a trial's values (whole numbers for `anchors`); a UserError if one is outside the space."""
        unknown = sorted(set(values) - set(self.names))
        if unknown:
            raise UserError(f"`{unknown[0]}` is not in the search space {self.source}")
        changes = {k: (round(v) if k == "anchors" else v) for k, v in values.items()}
        return base.replace(**changes)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _param(name: Any, spec: Any, source: str) -> Param:
    where = f"search space {source}, `{name}`"
    if not isinstance(name, str) or name not in HYP_KEYS:
        raise UserError(f"search space {source}: unknown hyp key `{name}`{did_you_mean(str(name), HYP_KEYS)}")
    if not isinstance(spec, dict):
        raise UserError(f"{where}: expected {{low: L, high: H}} or {{choices: [...]}}, got {spec!r}")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise UserError(f"{where}: `choices` cannot be combined with {sorted(set(spec) - {'choices'})}")
        raw = spec["choices"]
        if not isinstance(raw, list) or not raw:
            raise UserError(f"{where}: `choices` must be a non-empty list of numbers")
        choices = tuple(_number(v, where) for v in raw)
        if len(set(choices)) != len(choices):
            raise UserError(f"{where}: `choices` repeats a value")
        param = Param(name, choices=choices)
        checked = choices
    else:
        extra = sorted(set(spec) - _RANGE_KEYS)
        if extra or not {"low", "high"} <= set(spec):
            raise UserError(f"{where}: a range needs exactly `low`, `high` and optionally `log`"
                            + (f" (unexpected `{extra[0]}`)" if extra else ""))
        low, high = _number(spec["low"], where), _number(spec["high"], where)
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise UserError(f"{where}: `log` must be true or false, got {log!r}")
        if not low < high:
            raise UserError(f"{where}: `low` ({low:g}) must be below `high` ({high:g})")
        if log and low <= 0:
            raise UserError(f"{where}: a log range needs `low` > 0, got {low:g}")
        if name == "anchors":
            raise UserError(f"{where}: anchors per level is a whole number; give it as `choices: [2, 3, 4]`")
        param = Param(name, low=low, high=high, log=log)
        checked = (low, high)
    for value in checked:  # the train step's own rules (>= 0, probabilities <= 1, anchor_t > 1, ...)
        try:
            Hyp().replace(**{name: value})
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    return param


def load_space(path: str | Path | None) -> SearchSpace:
    """The search space in `path` (None: the default, upstream's evolve ranges)."""
    path = Path(path) if path is not None else DEFAULT_SPACE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"search space {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"search space {path} cannot be read: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"search space {path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"search space {path}: expected a mapping of hyp key: {{low, high}} with at least one key")
    return SearchSpace(tuple(_param(k, v, str(path)) for k, v in data.items()), str(path))
