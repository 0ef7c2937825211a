"""Workers of benchmarks/gpu_pipeline.py, run in the stages' python (torch, transformers, pydantic):
`python -c` imports this module and calls worker_<kind>(spec) with a JSON spec; the result is JSON too."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker_write_model(spec: dict) -> dict:
    """A random-init bf16 model of spec's shape with a tokenizer and chat template at spec['out']."""
    import torch
    import transformers

    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    shape, out, dev = spec["shape"], Path(spec["out"]), torch.device(spec["device"])
    info = {"torch": torch.__version__, "transformers": transformers.__version__}
    torch.manual_seed(0)
    if shape["arch"] == "internlm2":
        try:
            if not (REPO / "stages/internlm2.py").exists():
                raise ImportError("this checkout's base stage has no InternLM2 conversion (stages/internlm2.py)")
            from remote_code_fixture import write_internlm2
        except ImportError as e:
            info["note"] = f"no InternLM2 fixture: {e}"
        else:
            return dict(info, note=write_internlm2_scaled(write_internlm2, shape, out, dev))
    import families  # tests/families.py: the project's tokenizers with the families' chat templates

    families.CORPUS = [m["content"] for line in open(spec["train"], encoding="utf-8")
                       for m in json.loads(line)["messages"]]  # build_tokenizer trains on this: the train split
    family = families.FAMILIES["qwen2.5"]  # ChatML, <|im_end|> ends a turn
    tokenizer = families.build_tokenizer(family, vocab_size=spec["tokenizer_vocab"])
    ids = tokenizer.convert_tokens_to_ids
    assert shape["vocab"] >= len(tokenizer), (shape["vocab"], len(tokenizer))
    name = "Qwen2" if shape["arch"] == "qwen2" else "Llama"
    config = getattr(transformers, f"{name}Config")(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=shape["tie"],
        bos_token_id=None, eos_token_id=ids(family.eos), pad_token_id=ids(family.pad))
    with dev:  # random init on the GPU: seconds instead of minutes on the CPU
        model = getattr(transformers, f"{name}ForCausalLM")(config).to(torch.bfloat16)
        # The rows of ids no token maps to are zeros, as real checkpoints' unused rows are near zero: random rows
        # there make greedy decoding emit ids the tokenizer decodes to nothing, and an OpenAI-compatible server
        # then answers without content, which OpenCompass's API model fails the whole eval on.
        for weights in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
            weights.data[len(tokenizer):] = 0
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=[ids(family.stop), ids(family.pad)], pad_token_id=ids(family.pad), do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())  # as families.write_family_model:
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers loads the trained BPE as saved
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    what = f"{name}ForCausalLM, byte-level BPE ({len(tokenizer)} tokens) trained on the train split, ChatML"
    return dict(info, note=what if name == "Qwen2" else f"{info['note']}; built directly as {what}")


def write_internlm2_scaled(write_internlm2, shape: dict, out: Path, dev) -> str:
    """The project's InternLM2 remote-code fixture at shape's sizes, its vocabulary padded to shape's."""
    import inspect
    import safetensors.torch as st
    import torch

    sizes = dict(hidden_size=shape["hidden"], layers=shape["layers"], heads=shape["heads"], kv_heads=shape["kv_heads"],
                 intermediate_size=shape["intermediate"], dtype="bfloat16")
    original = st.save_file
    if "vocab_size" in inspect.signature(write_internlm2).parameters:
        sizes["vocab_size"] = shape["vocab"]
    else:  # the fixture sizes its vocabulary to its tiny tokenizer: add random rows as it saves
        def padded(state, path, metadata=None):
            state = {k: v.cpu() for k, v in state.items()}
            for k in ("model.tok_embeddings.weight", "output.weight"):
                extra = torch.randn(shape["vocab"] - len(state[k]), state[k].shape[1], device=dev) * 0.05
                state[k] = torch.cat([state[k], extra.to(state[k].dtype).cpu()])
            return original(state, path, metadata=metadata)
        st.save_file = padded  # write_internlm2 imports it when called
    try:
        with dev:
            write_internlm2(out, **sizes)
    finally:
        st.save_file = original
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, vocab_size=shape["vocab"]), indent=2))
    return ("InternLM2 remote-code folder (tests/remote_code_fixture.write_internlm2, its own sentencepiece "
            "tokenizer), converted to Llama by the base stage")


def worker_check_params(spec: dict) -> dict:
    """spec's params as this checkout's stages take them: keys a stage lacks are left out (and named);
    step_tokens auto becomes the shape's fixed budget where train has no auto."""
    import importlib

    sys.path.insert(0, str(REPO))
    params, dropped, notes = {}, {}, []
    for section, values in spec["params"].items():
        schema = getattr(importlib.import_module(f"stages.{section}"), section.capitalize() + "Params")
        params[section] = {k: v for k, v in values.items() if k in schema.model_fields}
        dropped[section] = sorted(set(values) - set(params[section]))
        if dropped[section]:
            notes.append(f"{section}: this checkout's stage has no {', '.join(dropped[section])} (left out)")
        if values.get("step_tokens") == "auto":
            try:
                schema.model_validate(params[section])
            except ValueError:
                params[section]["step_tokens"] = spec["step_tokens_fallback"]
                notes.append(f"train: no step_tokens auto in this checkout: {spec['step_tokens_fallback']}")
        schema.model_validate(params[section])
    return {"params": params, "dropped": dropped, "notes": notes}
