"""The promotion gate: may a newly registered model version become the model's @champion?

register calls decide() before it creates the version. The new version's eval scores are compared
with the base model's scores of the same run, and with the scores of the model's current champion
(its version tags `eval.<set>.<model>.<metric>`, written by register). A version that passes every
rule gets @champion; one that fails keeps only @candidate. The first version of a model has no
champion to meet: the rules against the champion are skipped and it passes on the others.

Every score is one (name, value) pair, the name `<set>.<model>.<metric>`: eval_scores() is the one
place that knows the shape of metrics/eval.json, tag_scores() reads a version's tags back.

Rules (register.gate; scores in the eval's own points, e.g. ROUGE 0-100):
- beats_base: on every set the model's main metric is above the base model's
- main_metric: on every set the model's main metric is not below the champion's
- max_drop: no score of the model or its quantized artifact falls more than max_drop below the champion's
- max_quantized_gap: the quantized artifact trails the model by at most this, per set and metric
"""
from __future__ import annotations

from dataclasses import dataclass

from stages.common import Params, StageError

Score = tuple[str, float]


class GateParams(Params):
    main_metric: str = "rougeL"
    model: str = "merged"                      # the eval model abbr the version is judged by
    base: str = "base"                         # the eval model abbr of the base model
    # the quantized artifact's abbrs, the first one evaluated is judged (served through the API, else
    # dequantized: stages/eval_served.py); rules on it are skipped if none was evaluated
    quantized: list[str] = ["turbomind_w4a16_served", "turbomind_w4a16_dequant"]
    max_drop: float = 1.0
    max_quantized_gap: float = 3.0


@dataclass(frozen=True)
class Outcome:
    rule: str
    status: str   # pass | fail | skipped
    detail: str

    def text(self) -> str:
        return f"{self.status}: {self.detail}"


def eval_scores(tree: dict) -> list[Score]:
    """metrics/eval.json, {set: {model: {metric: value}}}, as (set.model.metric, value) pairs."""
    return [(f"{dataset}.{model}.{metric}", float(value))
            for dataset, models in tree.items() if isinstance(models, dict)
            for model, metrics in models.items() if isinstance(metrics, dict)
            for metric, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]


def tag_scores(tags: dict) -> list[Score]:
    """A version's `eval.<set>.<model>.<metric>` tags as (set.model.metric, value) pairs."""
    scores = []
    for key, value in tags.items():
        if key.startswith("eval.") and key.count(".") >= 3:
            try:
                scores.append((key.removeprefix("eval."), float(value)))
            except ValueError:
                continue
    return scores


def by_model(scores: list[Score], model: str) -> dict[tuple[str, str], float]:
    """{(set, metric): value} of one model's scores."""
    found = {}
    for name, value in scores:
        rest, _, metric = name.rpartition(".")
        dataset, _, owner = rest.rpartition(".")
        if owner == model and dataset:
            found[(dataset, metric)] = value
    return found


def beats_base(new: list[Score], gate: GateParams) -> Outcome:
    mine, base = main_scores(new, gate.model, gate), main_scores(new, gate.base, gate)
    pairs = {s: (mine[s], base[s]) for s in mine if s in base}
    if not pairs:
        return Outcome("beats_base", "skipped", f"no {gate.base} scores")
    worse = [f"{s} {m:g} <= {gate.base} {b:g}" for s, (m, b) in pairs.items() if m <= b]
    shown = "; ".join(f"{s} {m:g} > {gate.base} {b:g}" for s, (m, b) in pairs.items())
    return Outcome("beats_base", "fail" if worse else "pass", "; ".join(worse) or shown)


def main_not_below_champion(new: list[Score], champion: list[Score] | None, gate: GateParams) -> Outcome:
    if champion is None:
        return Outcome("main_metric", "skipped", "no champion yet")
    mine, theirs = main_scores(new, gate.model, gate), main_scores(champion, gate.model, gate)
    pairs = {s: (mine[s], theirs[s]) for s in mine if s in theirs}
    if not pairs:
        return Outcome("main_metric", "skipped", f"the champion has no {gate.main_metric} on these sets")
    worse = [f"{s} {gate.main_metric} {m:g} < champion {c:g}" for s, (m, c) in pairs.items() if m < c]
    shown = "; ".join(f"{s} {gate.main_metric} {m:g} >= champion {c:g}" for s, (m, c) in pairs.items())
    return Outcome("main_metric", "fail" if worse else "pass", "; ".join(worse) or shown)


def no_large_drop(new: list[Score], champion: list[Score] | None, gate: GateParams) -> Outcome:
    if champion is None:
        return Outcome("max_drop", "skipped", "no champion yet")
    drops = []
    for model in (gate.model, quantized_abbr(new, gate)):
        mine, theirs = by_model(new, model), by_model(champion, model)
        drops += [(theirs[k] - mine[k], f"{k[0]}.{model}.{k[1]}") for k in mine if k in theirs]
    if not drops:
        return Outcome("max_drop", "skipped", "no score in common with the champion")
    drop, name = max(drops)
    status = "fail" if drop > gate.max_drop else "pass"
    return Outcome("max_drop", status, f"largest drop {drop:g} ({name}) {'>' if status == 'fail' else '<='} {gate.max_drop:g}")


def quantized_abbr(scores: list[Score], gate: GateParams) -> str:
    return next((abbr for abbr in gate.quantized if by_model(scores, abbr)), gate.quantized[0])


def quantized_gap(new: list[Score], gate: GateParams) -> Outcome:
    mine, quantized = by_model(new, gate.model), by_model(new, quantized_abbr(new, gate))
    gaps = [(mine[k] - quantized[k], f"{k[0]}.{k[1]}") for k in mine if k in quantized]
    if not gaps:
        return Outcome("max_quantized_gap", "skipped", f"no {' / '.join(gate.quantized)} scores")
    gap, name = max(gaps)
    status = "fail" if gap > gate.max_quantized_gap else "pass"
    return Outcome("max_quantized_gap", status, f"largest gap {gap:g} ({name}) "
                   f"{'>' if status == 'fail' else '<='} {gate.max_quantized_gap:g}")


def main_scores(scores: list[Score], model: str, gate: GateParams) -> dict[str, float]:
    """{set: value} of the main metric of one model."""
    return {s: v for (s, metric), v in by_model(scores, model).items() if metric == gate.main_metric}


def decide(new: list[Score], champion: list[Score] | None, gate: GateParams) -> tuple[bool, list[Outcome]]:
    """(passed, every rule's outcome). champion: the current champion's scores, None if there is none."""
    if not main_scores(new, gate.model, gate):
        raise StageError(f"register.gate: no eval score named <set>.{gate.model}.{gate.main_metric} "
                         f"(scores: {', '.join(sorted(n for n, _ in new)) or 'none'}): check gate.model and gate.main_metric")
    outcomes = [beats_base(new, gate), main_not_below_champion(new, champion, gate),
                no_large_drop(new, champion, gate), quantized_gap(new, gate)]
    return all(o.status != "fail" for o in outcomes), outcomes


def gate_tags(passed: bool, outcomes: list[Outcome], champion_version: str | None) -> dict[str, str]:
    """The decision and every rule's outcome as version tags."""
    return {"gate.decision": "pass" if passed else "fail", "gate.champion_before": champion_version or "none",
            **{f"gate.{o.rule}": o.text() for o in outcomes}}


def summary(passed: bool, outcomes: list[Outcome], champion_version: str | None) -> str:
    against = f"champion v{champion_version} and the base" if champion_version else "the base (no champion yet)"
    rules = "; ".join(f"{o.rule} {o.text()}" for o in outcomes)
    return f"gate {'pass' if passed else 'fail'} against {against}: {rules}"
