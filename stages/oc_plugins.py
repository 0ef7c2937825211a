"""OpenCompass evaluators for tunepipe's own eval sets (imported by OpenCompass from eval's config, by
import path, in .venvs/opencompass; the eval stage puts the repository on PYTHONPATH).

- OptionAccuracyEvaluator: multiple-choice accuracy; each prediction's option letter is read with
  stages.mcq.option_letter (a generated reply, or the label a perplexity run picked).
- ToolCallEvaluator: the tool-call check of stages.tool_calls.
"""
from __future__ import annotations

from opencompass.openicl.icl_evaluator import BaseEvaluator

from stages import tool_calls
from stages.mcq import option_letter


class OptionAccuracyEvaluator(BaseEvaluator):
    def __init__(self, options: str = "ABCD") -> None:
        super().__init__()
        self.options = options

    def score(self, predictions: list, references: list) -> dict:
        if len(predictions) != len(references):
            return {"error": f"{len(predictions)} predictions for {len(references)} references"}
        details = [{"pred": option_letter(str(p), self.options), "answer": r} for p, r in zip(predictions, references)]
        for d in details:
            d["correct"] = d["pred"] == d["answer"]
        accuracy = 100.0 * sum(d["correct"] for d in details) / max(1, len(details))
        return {"accuracy": round(accuracy, 4), "details": details}


class ToolCallEvaluator(BaseEvaluator):
    def score(self, predictions: list, references: list) -> dict:
        if len(predictions) != len(references):
            return {"error": f"{len(predictions)} predictions for {len(references)} references"}
        return tool_calls.score(predictions, references)
