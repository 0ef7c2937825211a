"""The MLflow model that register logs: tunepipe's chat model as a pyfunc.

Logged as "models from code": MLflow copies this file into the logged model (code/) and runs it
when the model is loaded, so it imports nothing from tunepipe, only mlflow, torch, transformers
and peft. Its artifacts are either

- `adapter` only (register.log_weights: adapter): load_context loads the base the model version
  names (model_config base_path if that folder exists, else the Hugging Face id base_model_id at
  base_revision) in its saved dtype and applies the adapter with peft. Where the base lives
  elsewhere: mlflow.pyfunc.load_model(uri, model_config={"base_path": "/path/to/base"}).
- `merged` (register.log_weights: merged; the adapter is logged beside it): the merged model as
  it is, loaded in its saved dtype.

predict takes a list of user messages and returns the greedy replies, each rendered with the
tokenizer's chat template (the pipeline's ChatML) and stopped at its stop token.
"""
from __future__ import annotations

import os
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


def base_location(config: dict) -> tuple[str, dict]:
    """(folder or hub id, from_pretrained kwargs) of the base a logged adapter applies to."""
    load = {"trust_remote_code": bool(config.get("trust_remote_code", False))}
    path = config.get("base_path")
    if path and os.path.isdir(path):
        return path, load
    if config.get("base_model_id"):
        return config["base_model_id"], dict(load, revision=config.get("base_revision") or None)
    raise FileNotFoundError(f"the base model of this adapter is not at {path!r} and has no Hugging Face id: load "
                            f"it with model_config={{'base_path': <the base model's folder>}}")


class TunepipeChatModel(PythonModel):
    def load_context(self, context) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = context.model_config or {}
        artifacts = context.artifacts
        if "merged" in artifacts:
            self.tokenizer = AutoTokenizer.from_pretrained(artifacts["merged"])
            self.model = AutoModelForCausalLM.from_pretrained(artifacts["merged"], dtype="auto")
        else:
            from peft import PeftModel

            source, load = base_location(config)
            if os.path.exists(os.path.join(artifacts["adapter"], "tokenizer_config.json")):  # train saves it there
                self.tokenizer = AutoTokenizer.from_pretrained(artifacts["adapter"])
            else:
                self.tokenizer = AutoTokenizer.from_pretrained(source, **load)
            base = AutoModelForCausalLM.from_pretrained(source, dtype="auto", **load)
            self.model = PeftModel.from_pretrained(base, artifacts["adapter"])
        self.model.eval()
        self.max_new_tokens = int(config.get("max_new_tokens", 128))

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        import torch

        stops = self.model.generation_config.eos_token_id
        stops = sorted({self.tokenizer.eos_token_id, *(stops if isinstance(stops, list) else [stops])} - {None})
        replies = []
        for message in model_input:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                      add_generation_prompt=True)
            batch = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
            with torch.no_grad():
                out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          eos_token_id=stops, pad_token_id=self.tokenizer.pad_token_id)
            replies.append(self.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True))
        return replies


mlflow.models.set_model(TunepipeChatModel())
