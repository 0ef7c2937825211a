"""base: provide the base model every later stage starts from, and a manifest saying what it is.

source: demo -> build a tiny Qwen2-shaped decoder offline: a byte-level BPE tokenizer trained on
                the demo corpus, the project's ChatML template and <|im_end|> stop token, and a short
                pre-training pass on the corpus so the model knows the facts before it learns to chat.
source: hf   -> a Hugging Face model id (or a local path) pinned to a revision; the weights stay in
                the Hugging Face cache, the manifest records the resolved commit. Models whose code
                ships in the model folder need base.trust_remote_code (stages/remote_code.py), except
                InternLM2 / InternLM2.5, which are converted into models/base as Llama (stages/internlm2.py).
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Literal

from stages.common import (CHAT_TEMPLATE, END_OF_TEXT, IM_END, IM_START, Params, StageError, atomic_path,
                           load_params, run_stage, write_json)


class DemoModelParams(Params):
    vocab_size: int = 2048
    hidden_size: int = 128          # AWQ packs weights in groups of 128 input features
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 2              # head size 64: TurboMind has attention kernels for 64/128/...
    num_kv_heads: int = 1
    pretrain_steps: int = 300
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3


class BaseParams(Params):
    source: Literal["demo", "hf"] = "demo"
    model_id: str = ""              # hf: e.g. Qwen/Qwen2.5-0.5B-Instruct, or a local folder
    revision: str = "main"          # hf: pin a commit sha for reproducible runs
    chat_template: str = ""         # hf: "" = the tokenizer's own; or a name in stages/chat_template.py
                                    # TEMPLATES (for a base without one, e.g. Bloomz), or a .jinja file
    trust_remote_code: bool = False  # hf: run the model folder's own Python code (config.json auto_map);
                                    # only for a local folder or a revision that is a full 40-hex sha
    seed: int = 0
    demo: DemoModelParams = DemoModelParams()


# Qwen2's own pre-tokenizer split. transformers 5 loads every qwen2 model's tokenizer as
# Qwen2Tokenizer and rebuilds its normalizer and pre-tokenizer whatever tokenizer.json says, so the
# demo tokenizer must be built the same way or it would tokenize differently once reloaded.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=END_OF_TEXT,
                                   additional_special_tokens=[IM_START], chat_template=CHAT_TEMPLATE,
                                   model_max_length=1024, clean_up_tokenization_spaces=False)


def build_tiny_model(texts: list[str], p: DemoModelParams, seed: int = 0, progress: bool = True):
    """Tokenizer + Qwen2ForCausalLM pre-trained on `texts` (one document each). Also used by tests."""
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(texts, p.vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads,
        max_position_embeddings=1024, tie_word_embeddings=False, rope_theta=10000.0,
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(END_OF_TEXT)],
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64)

    docs = [tokenizer(t + END_OF_TEXT)["input_ids"] for t in texts]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=p.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / p.pretrain_steps)))
    model.train()
    bar = tqdm(range(p.pretrain_steps), desc="base: pre-train demo model", disable=not progress)
    for _ in bar:
        batch = [rng.choice(docs) for _ in range(p.pretrain_batch)]
        width = max(map(len, batch))
        ids = torch.tensor([d + [tokenizer.pad_token_id] * (width - len(d)) for d in batch])
        mask = torch.tensor([[1] * len(d) + [0] * (width - len(d)) for d in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model, tokenizer, loss.item()


def save_portable_tokenizer(tokenizer, out: Path) -> None:
    """Save so that transformers 4.x (other tools' environments) loads it too: transformers 5
    writes tokenizer_class "TokenizersBackend", which 4.x does not know."""
    import json

    tokenizer.save_pretrained(out)
    config_path = Path(out) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE,
                  additional_special_tokens=[IM_START])
    config.pop("extra_special_tokens", None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="data/raw/demo_drug_facts.txt")
    ap.add_argument("--out", default="models/base")
    args = ap.parse_args()
    p = load_params("base", BaseParams)

    with atomic_path(args.out, is_dir=True) as out:
        if p.source == "demo":
            corpus = Path(args.corpus)
            if not corpus.exists():
                raise StageError(f"{corpus}: demo corpus not found (run the demo_data stage)")
            texts = [t.strip() for t in corpus.read_text(encoding="utf-8").split("\n\n") if t.strip()]
            model, tokenizer, final_loss = build_tiny_model(texts, p.demo, seed=p.seed)
            model.save_pretrained(out, safe_serialization=True)
            save_portable_tokenizer(tokenizer, out)
            manifest = {"source": "demo", "architecture": "Qwen2ForCausalLM",
                        "parameters": sum(t.numel() for t in model.parameters()),
                        "pretrain_final_loss": round(final_loss, 4), "chat_template": "chatml", "stop_token": IM_END}
        else:
            manifest = adopt_hub_model(p, out)
            manifest["chat_template"] = write_tokenizer(manifest, p.chat_template, out)
        write_json(out / "manifest.json", manifest)
    print(f"base: {manifest}")


def write_tokenizer(manifest: dict, chat_template: str, out: Path) -> str:
    """The base tokenizer, with the chat template every later stage renders with, saved into the
    base stage's out. Returns where the template came from."""
    from transformers import AutoTokenizer

    from stages.chat_template import TEMPLATES, TemplateError, stop_token_ids

    converted = (out / "tokenizer_config.json").exists()  # InternLM2: converted into `out` already
    source = out if converted else manifest.get("local_path") or manifest["model_id"]
    tokenizer = AutoTokenizer.from_pretrained(source, revision=None if converted else manifest.get("revision"),
                                              trust_remote_code=manifest.get("trust_remote_code", False))
    origin = "tokenizer"
    if chat_template in TEMPLATES:
        tokenizer.chat_template, origin = TEMPLATES[chat_template], chat_template
    elif chat_template:
        if not Path(chat_template).is_file():
            raise StageError(f"params.yaml: base.chat_template: {chat_template!r} is neither a template name "
                             f"({', '.join(sorted(TEMPLATES))}) nor a file")
        tokenizer.chat_template, origin = Path(chat_template).read_text(encoding="utf-8"), chat_template
    try:
        stop_token_ids(tokenizer)
    except TemplateError as e:
        raise StageError(f"{source}: {e}") from None
    if converted and origin == "tokenizer":
        return origin  # the converter wrote it as it should load
    tokenizer.save_pretrained(out)
    if converted:  # keep the converter's class: transformers would rebuild a Llama tokenizer otherwise
        config_path = out / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return origin


def adopt_hub_model(p: BaseParams, out: Path) -> dict:
    """The manifest of a hub (or local) model: InternLM2 converted into `out` as Llama, any other
    model used where it is, with its remote code only where base.trust_remote_code allows it."""
    from stages import internlm2
    from stages.remote_code import needs_remote_code

    manifest = resolve_hub_model(p)
    if internlm2.is_internlm2(manifest["local_path"]):
        conversion = internlm2.convert(manifest.pop("local_path"), out)
        return {**manifest, "trust_remote_code": False, "architecture": "LlamaForCausalLM", "conversion": conversion}
    if needs_remote_code(manifest["local_path"]) and not p.trust_remote_code:
        raise StageError(f"{p.model_id}: its model class is code shipped with the model (config.json auto_map); "
                         "set base.trust_remote_code: true to run it (with base.revision a full commit sha)")
    return manifest


def resolve_hub_model(p: BaseParams) -> dict:
    """Pin a Hugging Face model (or a local folder) to a commit; the weights stay in the HF cache."""
    from stages.remote_code import refuse_unpinned

    if not p.model_id:
        raise StageError("params.yaml: base.model_id is required when base.source is 'hf'")
    if p.trust_remote_code:
        refuse_unpinned(p.model_id, p.revision)  # before anything is downloaded
    if Path(p.model_id).is_dir():
        return {"source": "hf", "model_id": p.model_id, "revision": None, "local_path": str(Path(p.model_id).resolve()),
                "trust_remote_code": p.trust_remote_code}
    from huggingface_hub import snapshot_download  # token, if any, comes from HF_TOKEN in the environment

    local = snapshot_download(p.model_id, revision=p.revision,
                              allow_patterns=["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.py"])
    commit = Path(local).name  # snapshots/<commit sha>
    if not any(Path(local).glob("*.safetensors")):  # older checkpoints (InternLM2 1.x) publish .bin only
        local = snapshot_download(p.model_id, revision=commit, allow_patterns=["*.bin"])
    return {"source": "hf", "model_id": p.model_id, "revision": commit, "local_path": local,
            "trust_remote_code": p.trust_remote_code}


if __name__ == "__main__":
    run_stage(main)
