"""Tiny random-init models of the model families users fine-tune, built offline for tests.

Each family gets its real transformers architecture class, a byte-level BPE tokenizer trained on a
few sentences with that family's special tokens, and the chat template this project writes from
the family's published format (stages/chat_template.py TEMPLATES). Bloom is published without a
template: the pipeline is given one in params (base.chat_template).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

CORPUS = [
    "Take ibuprofen with food to protect the stomach.",
    "Metformin is taken with meals; the usual starting dose is 500 mg.",
    "Amoxicillin is an antibiotic for bacterial infections such as otitis.",
    "Store insulin in the fridge and never freeze it.",
    "Paracetamol: at most 4 g a day for adults; less with liver disease.",
    "What is the dose? How should I take it? Is it safe in pregnancy?",
    "You are a careful pharmacist. Answer in one sentence.",
]


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str           # transformers class
    config_class: str
    template: str | None        # key of TEMPLATES; None: published without one
    specials: list[str]         # in id order, before the learned vocabulary
    bos: str | None
    eos: str
    pad: str | None
    stop: str                   # the end-of-turn token generation must stop at
    params_template: str = ""   # base.chat_template the pipeline is given
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    attn_implementation: str = "sdpa"  # train.attn_implementation (Gemma-2's soft-capping: eager only)
    config: dict = field(default_factory=dict)


FAMILIES = {f.name: f for f in [
    Family("qwen2.5", "Qwen2ForCausalLM", "Qwen2Config", "chatml", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
           None, "<|im_end|>", "<|endoftext|>", "<|im_end|>"),
    Family("llama3", "LlamaForCausalLM", "LlamaConfig", "llama3",
           ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
           "<|begin_of_text|>", "<|eot_id|>", None, "<|eot_id|>"),
    Family("glm4", "Glm4ForCausalLM", "Glm4Config", "glm4",
           ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
           None, "<|endoftext|>", "<|endoftext|>", "<|user|>"),
    Family("gemma2", "Gemma2ForCausalLM", "Gemma2Config", "gemma", ["<pad>", "<eos>", "<bos>", "<start_of_turn>",
           "<end_of_turn>"], "<bos>", "<eos>", "<pad>", "<end_of_turn>", config={"head_dim": 16},
           attn_implementation="eager"),
    Family("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", "gemma", ["<pad>", "<eos>", "<bos>",
           "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>", "<end_of_turn>", config={"head_dim": 16}),
    Family("mistral", "MistralForCausalLM", "MistralConfig", "mistral", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
           "<s>", "</s>", None, "</s>"),
    Family("bloom", "BloomForCausalLM", "BloomConfig", None, ["<unk>", "<s>", "</s>", "<pad>"], "<s>", "</s>", "<pad>",
           "</s>", params_template="human_assistant", target_modules=["query_key_value", "dense"],
           attn_implementation="eager"),
]}


def build_tokenizer(family: Family, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from stages.chat_template import TEMPLATES

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=family.specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    named = {family.bos, family.eos, family.pad}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos, pad_token=family.pad,
        additional_special_tokens=[t for t in family.specials if t not in named],
        chat_template=TEMPLATES[family.template] if family.template else None, clean_up_tokenization_spaces=False)


def build_model(family: Family, tokenizer, seed: int = 0, hidden: int = 64, heads: int = 4):
    import torch
    import transformers

    torch.manual_seed(seed)
    ids = lambda t: tokenizer.convert_tokens_to_ids(t) if t else None
    sizes = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=2,
                 num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=512)
    if family.name == "bloom":
        sizes = dict(vocab_size=len(tokenizer), hidden_size=hidden, n_layer=2, n_head=heads)
    config = getattr(transformers, family.config_class)(
        **sizes, **family.config, bos_token_id=ids(family.bos), eos_token_id=ids(family.eos), pad_token_id=ids(family.pad),
        tie_word_embeddings=False)
    return getattr(transformers, family.architecture)(config).eval()


def write_family_model(family: Family, folder: Path, **sizes) -> Path:
    """A loadable model folder (weights, tokenizer, chat template) for `family` at `folder`.
    sizes: hidden, heads (AWQ needs hidden sizes divisible by its group of 128)."""
    tokenizer = build_tokenizer(family)
    model = build_model(family, tokenizer, **sizes)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    # transformers 5 would otherwise rebuild a known family's tokenizer (e.g. Llama's Metaspace
    # pre-tokenizer) on load; the fixture's own BPE must load as saved
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2))
    return folder
