"""Choosing the best checkpoint of a run: `metric_for_best_model`, `greater_is_better` (HF Trainer's names), and
the record of the choice, `output_dir/best.json`.

The metric is one eval value, `<set>/<mode>/<metric>` (e.g. `domain/all/ndcg@10`; the set named by config.eval is
`eval`), or a weighted sum of such values, `0.7*domain/all/ndcg@10 + 0.3*general/dense/ndcg@10` (weights: any
finite numbers; a term without `W*` has weight 1). Empty: the first eval set's mode that scores with the trained
heads (`default_mode`: `all` for all three, `dense+sparse`, or the one head; dense when two heads have no combined
mode) and its nDCG@10 -- `all/ndcg@10` for a run that trains all three heads, and for `m3jax merge --grid` (whose
models carry all three heads). A mode or metric the set does not evaluate falls back to its first mode / metric.
The metric is named, with its value, in the log at start, after every eval and in the final summary.

best.json (written by process 0 after every eval, atomically) holds the choice and every eval it was made from:
    {"metric_for_best_model": ..., "greater_is_better": ..., "step": S, "value": V, "metrics": {name: value},
     "history": [{"step", "value", "metrics"}, ...], "base": {"step": 0, "value", "metrics"} | null}
The base model's eval (eval_on_start, step 0) is a reference, never a candidate: there is no checkpoint of it.
A resumed run reads best.json and forgets the evals after the step it resumed from (they are redone).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Sequence

from m3jax.core import storage
from m3jax.evaluation.options import parse_metrics, parse_modes
from m3jax.io.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

BEST_NAME = "best.json"

_TERM = re.compile(r"\s*(?:(?P<weight>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*)?"
                   r"(?P<set>[A-Za-z0-9_.-]+)/(?P<mode>[^/\s*]+)/(?P<metric>(?:ndcg|recall|mrr)@\d+)\s*")


@dataclasses.dataclass(frozen=True)
class MetricExpression:
    text: str
    terms: tuple[tuple[float, str], ...]  # (weight, "<set>/<mode>/<metric>")
    why: str = ""  # how the metric was chosen: "given", or the default's reason

    def value(self, metrics: dict[str, float]) -> float:
        return float(sum(w * metrics[name] for w, name in self.terms))


@dataclasses.dataclass(frozen=True)
class SelectionSettings:
    """How a run picks its best checkpoint (m3jax.config.selection_settings)."""

    metric_for_best_model: MetricExpression | None  # resolved (parse_metric); None when the run evaluates nothing
    greater_is_better: bool


DEFAULT_METRIC = "ndcg@10"


def default_mode(heads: Sequence[str]) -> str:
    """The eval mode that scores with the trained heads: all three -> all, dense + sparse -> dense+sparse, one head
    -> that head; dense + colbert or sparse + colbert (no combined mode) -> dense, or colbert without dense."""
    chosen = set(heads)
    if chosen == {"dense", "sparse", "colbert"}:
        return "all"
    if chosen == {"dense", "sparse"}:
        return "dense+sparse"
    if len(chosen) == 1:
        return next(iter(chosen))
    return "dense" if "dense" in chosen else "colbert"


def parse_metric(text: str, specs: Sequence = (), *, extra_modes: Sequence[str] = (),
                 heads: Sequence[str] = ("dense", "sparse", "colbert")) -> MetricExpression:
    """Parse `metric_for_best_model`; with `specs` (evaluate.EvalSetSpec list) check each term names a set, one of its
    modes (or a Matryoshka mode in `extra_modes`) and one of its metrics. Raises ValueError saying what is wrong.
    Empty `text`: the first set's default_mode(heads) and nDCG@10 (its first mode / metric when it has not those)."""
    text = str(text).strip()
    if not text:
        if not specs:
            raise ValueError("no eval set to take a metric from")
        s = specs[0]
        wanted = f"{default_mode(heads)}/{DEFAULT_METRIC}"
        mode = default_mode(heads) if default_mode(heads) in s.modes else s.modes[0]
        metric = DEFAULT_METRIC if DEFAULT_METRIC in s.metrics else s.metrics[0]
        name = f"{s.name}/{mode}/{metric}"
        why = f"the default for the trained heads {', '.join(heads)}"
        if f"{mode}/{metric}" != wanted:
            why += f"; eval set {s.name!r} has no {wanted}, so its first mode / metric"
        return MetricExpression(name, ((1.0, name),), why=why)
    terms, pos = [], 0
    while pos < len(text):
        match = _TERM.match(text, pos)
        if not match:
            raise ValueError(f"cannot read {text[pos:]!r}: expected [WEIGHT*]SET/MODE/METRIC terms joined by '+', "
                             f"e.g. 0.7*domain/all/ndcg@10 + 0.3*general/dense/ndcg@10")
        pos = match.end()
        if pos < len(text):
            if text[pos] != "+":
                raise ValueError(f"expected '+' between terms at {text[pos:]!r}")
            pos += 1
            if pos >= len(text.rstrip()):
                raise ValueError("a term is missing after the last '+'")
        weight = float(match.group("weight")) if match.group("weight") else 1.0
        if not math.isfinite(weight) or weight == 0:
            raise ValueError(f"weight {match.group('weight')!r} must be a finite non-zero number")
        try:
            mode = parse_modes(match.group("mode"))[0]
            metric = parse_metrics(match.group("metric"))[0]
        except ValueError as e:
            raise ValueError(str(e)) from None
        name = f"{match.group('set')}/{mode}/{metric}"
        if specs:
            by_name = {s.name: s for s in specs}
            spec = by_name.get(match.group("set"))
            if spec is None:
                raise ValueError(f"no eval set {match.group('set')!r} (sets: {', '.join(by_name)})")
            if mode not in spec.modes and mode not in extra_modes:
                raise ValueError(f"eval set {spec.name!r} has no mode {mode!r} (modes: {', '.join(spec.modes)})")
            if metric not in spec.metrics:
                raise ValueError(f"eval set {spec.name!r} has no metric {metric!r} (metrics: "
                                 f"{', '.join(spec.metrics)})")
        terms.append((weight, name))
    if not terms:
        raise ValueError("empty")
    return MetricExpression(text, tuple(terms), why="given")


def flat_metrics(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """{set: {mode: {metric: v}}} -> {"<set>/<mode>/<metric>": v}."""
    return {f"{s}/{mode}/{metric}": v for s, modes in results.items() for mode, values in modes.items()
            for metric, v in values.items()}


class BestTracker:
    """The best eval so far (every process keeps one; the evals are the same on all). `protected()`: the step whose
    checkpoint save_total_limit must not remove."""

    def __init__(self, output_dir: str, expression: MetricExpression, greater_is_better: bool = True):
        self.path = storage.join(output_dir, BEST_NAME)
        self.expression, self.greater = expression, bool(greater_is_better)
        self.history: list[dict] = []
        self.base: dict | None = None
        logger.info("the best checkpoint is chosen by %s (%s; %s is better)", expression.text,
                    "metric_for_best_model" if expression.why == "given" else expression.why or "metric_for_best_model",
                    "greater" if self.greater else "lower")

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.greater else a < b

    @property
    def best(self) -> dict | None:
        best = None
        for entry in self.history:
            if best is None or self._better(entry["value"], best["value"]):
                best = entry
        return best

    def protected(self) -> set[int]:
        best = self.best
        return {best["step"]} if best else set()

    def resume(self, resume_step: int | None) -> None:
        """Read best.json of a resumed run, forgetting evals after `resume_step` (they will be redone)."""
        if resume_step is None or not storage.isfile(self.path):
            return
        try:
            saved = json.loads(storage.read_bytes(self.path))
        except (OSError, ValueError) as e:
            logger.warning("%s: unreadable (%s); the best checkpoint is chosen among the evals from now on",
                           self.path, e)
            return
        if saved.get("metric_for_best_model") != self.expression.text or saved.get("greater_is_better") != self.greater:
            logger.warning("%s: chosen by %r (greater_is_better=%s); this run uses %r (%s): earlier evals are "
                           "re-scored with it", self.path, saved.get("metric_for_best_model"),
                           saved.get("greater_is_better"), self.expression.text, self.greater)
        self.base = saved.get("base")
        for entry in saved.get("history", []):
            if entry["step"] <= resume_step:
                try:
                    value = self.expression.value(entry["metrics"])
                except KeyError:
                    continue
                self.history.append({"step": entry["step"], "value": value, "metrics": entry["metrics"]})

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Record the eval of `step`; True when it is the new best. Step 0 is the base model (a reference)."""
        value = self.expression.value(metrics)
        entry = {"step": int(step), "value": value, "metrics": dict(metrics)}
        if step == 0:
            self.base = entry
            logger.info("eval at step 0 (the base model): %s = %.5g", self.expression.text, value)
            return False
        previous = self.best
        self.history = [e for e in self.history if e["step"] != step] + [entry]
        improved = previous is None or self._better(value, previous["value"])
        logger.info("eval at step %d: %s = %.5g (%s)", step, self.expression.text, value,
                    "the best so far" if improved else f"the best is step {previous['step']}: {previous['value']:.5g}")
        return improved

    def record(self) -> dict:
        best = self.best
        return {"metric_for_best_model": self.expression.text, "greater_is_better": self.greater,
                "step": best["step"] if best else None, "value": best["value"] if best else None,
                "metrics": best["metrics"] if best else None, "history": self.history, "base": self.base}

    def write(self) -> None:
        with storage.atomic_file(self.path) as f:
            json.dump(self.record(), f, indent=2, sort_keys=True)
            f.write("\n")

    def summary(self) -> str:
        best = self.best
        if best is None:
            return "no eval of a trained step yet"
        first = self.base or self.history[0]
        what = "the base model (step 0)" if self.base else f"the first eval (step {first['step']})"
        delta = best["value"] - first["value"]
        return (f"best checkpoint: step {best['step']}, {self.expression.text} = {best['value']:.5g} "
                f"({delta:+.5g} vs {what}: {first['value']:.5g})")


def read_best(work_dir: str) -> dict:
    """best.json of a run directory. Raises CheckpointError when there is none."""
    path = storage.join(storage.resolve(work_dir), BEST_NAME)
    if not storage.isfile(path):
        raise CheckpointError(f"{path}: no such file; the best step is recorded by runs with eval sets "
                              f"(eval_steps > 0)")
    try:
        best = json.loads(storage.read_bytes(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    if not isinstance(best, dict) or not isinstance(best.get("step"), int):
        raise CheckpointError(f"{path}: no best step recorded yet (no eval of a trained step)")
    return best


def resolve_step(path, step):
    """`step` as an int: "best" (or "BEST") reads the run's best.json; None and ints pass through. `path`: a run
    directory, its checkpoints/ directory or a step directory."""
    if step is None or isinstance(step, int):
        return step
    if str(step).lower() != "best":
        return int(step)
    path = storage.resolve(path)
    for candidate in (path, storage.dirname(path), storage.dirname(storage.dirname(path))):
        if storage.isfile(storage.join(candidate, BEST_NAME)):
            return read_best(candidate)["step"]
    return read_best(path)["step"]  # raises, naming the expected file
