"""InternLM2 / InternLM2.5 checkpoints, converted losslessly to transformers' native Llama layout.

InternLM2 publishes its model as remote code (modeling_internlm2.py next to the weights) and that
code does not load under transformers 5 (its config reads rope_scaling["type"], which transformers 5
renames; its list-valued _tied_weights_keys breaks save_pretrained). The architecture itself is
Llama's with other tensor names and a fused QKV projection, so the base stage converts it once and
every later stage loads a plain LlamaForCausalLM, without remote code:

  model.tok_embeddings                 -> model.embed_tokens
  model.layers.N.attention.wqkv        -> self_attn.q_proj / k_proj / v_proj   (split, see below)
  model.layers.N.attention.wo          -> self_attn.o_proj
  model.layers.N.feed_forward.w1/w3/w2 -> mlp.gate_proj / up_proj / down_proj
  model.layers.N.attention_norm        -> input_layernorm
  model.layers.N.ffn_norm              -> post_attention_layernorm
  model.norm, output                   -> model.norm, lm_head

wqkv's rows are grouped per KV head g: the num_attention_heads / num_key_value_heads query heads
of group g, then g's key head, then g's value head, head_dim rows each. Query head h*groups+i is
row block i of group h, which is the order Llama's q_proj and its repeat of the KV heads expect.
Tensors are copied bit for bit (same dtype); the config becomes a LlamaConfig (rope_theta,
rms_norm_eps, dynamic-NTK or linear RoPE scaling, attention bias from `bias`), the sentencepiece
tokenizer a fast (tokenizers) one with the same ids, added specials and chat template.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from stages.common import StageError

MODEL_TYPE = "internlm2"      # InternLM2.5 publishes the same model_type and code
SIMPLE_NAMES = [  # (published name pattern, Llama name template)
    (r"model\.tok_embeddings\.weight", "model.embed_tokens.weight"),
    (r"model\.norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"model\.layers\.(\d+)\.attention\.wo\.(weight|bias)", "model.layers.{0}.self_attn.o_proj.{1}"),
    (r"model\.layers\.(\d+)\.feed_forward\.w1\.weight", "model.layers.{0}.mlp.gate_proj.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.w3\.weight", "model.layers.{0}.mlp.up_proj.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.w2\.weight", "model.layers.{0}.mlp.down_proj.weight"),
    (r"model\.layers\.(\d+)\.attention_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"model\.layers\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
]
WQKV = r"model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)"
DERIVED = r".*rotary_emb\.inv_freq"  # buffers some .bin checkpoints carry; rebuilt from the config


def is_internlm2(folder: str | Path) -> bool:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text(encoding="utf-8"))
    return config.get("model_type") == MODEL_TYPE or "InternLM2ForCausalLM" in (config.get("architectures") or [])


# --- config -----------------------------------------------------------------------------------

def rope_parameters(config: dict) -> dict:
    """InternLM2's rope_theta + rope_scaling as transformers 5's rope_parameters (same formulas:
    dynamic NTK rescales the base once a sequence outgrows max_position_embeddings, linear divides
    the positions by the factor)."""
    theta = float(config.get("rope_theta", 10000))
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("type") or scaling.get("rope_type") or "default"
    if kind == "default":
        return {"rope_type": "default", "rope_theta": theta}
    if kind in ("dynamic", "linear"):
        return {"rope_type": kind, "factor": float(scaling["factor"]), "rope_theta": theta}
    raise StageError(f"InternLM2 rope_scaling {scaling}: only dynamic and linear scaling map onto Llama's RoPE")


def llama_config(config: dict):
    from transformers import LlamaConfig

    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if config["hidden_size"] % heads or heads % kv_heads:
        raise StageError(f"InternLM2 config: hidden_size {config['hidden_size']}, {heads} heads, {kv_heads} KV heads "
                         "do not divide evenly")
    llama = LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=config["hidden_size"] // heads,
        hidden_act=config.get("hidden_act", "silu"), max_position_embeddings=config["max_position_embeddings"],
        initializer_range=config.get("initializer_range", 0.02), rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        use_cache=config.get("use_cache", True), pad_token_id=config.get("pad_token_id"),
        bos_token_id=config.get("bos_token_id"), eos_token_id=config.get("eos_token_id"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_parameters=rope_parameters(config), attention_bias=bool(config.get("bias", False)), mlp_bias=False,
        dtype=config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    llama.architectures = ["LlamaForCausalLM"]
    return llama


def expected_names(llama) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not llama.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(llama.num_hidden_layers):
        layer = f"model.layers.{i}"
        names |= {f"{layer}.{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                  "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                                                  "input_layernorm", "post_attention_layernorm")}
        if llama.attention_bias:
            names |= {f"{layer}.self_attn.{m}.bias" for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    return names


# --- weights ----------------------------------------------------------------------------------

def split_wqkv(tensor, heads: int, kv_heads: int, head_dim: int):
    """Fused wqkv weight [(heads + 2*kv_heads)*head_dim, hidden] (or its bias) -> q, k, v."""
    groups = heads // kv_heads
    rows = (heads + 2 * kv_heads) * head_dim
    if tensor.shape[0] != rows:
        raise StageError(f"wqkv has {tensor.shape[0]} rows, the config says {rows} "
                         f"(({heads} + 2*{kv_heads}) heads x {head_dim})")
    blocks = tensor.reshape(kv_heads, groups + 2, head_dim, *tensor.shape[1:])
    q = blocks[:, :groups].reshape(heads * head_dim, *tensor.shape[1:])
    k = blocks[:, groups].reshape(kv_heads * head_dim, *tensor.shape[1:])
    v = blocks[:, groups + 1].reshape(kv_heads * head_dim, *tensor.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def convert_tensors(tensors, llama):
    """(published name, tensor) -> (Llama name, tensor), bit for bit; unknown names are errors."""
    head_dim = llama.head_dim
    for name, tensor in tensors:
        if re.fullmatch(DERIVED, name):
            continue
        if m := re.fullmatch(WQKV, name):
            q, k, v = split_wqkv(tensor, llama.num_attention_heads, llama.num_key_value_heads, head_dim)
            layer, kind = m.groups()
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                yield f"model.layers.{layer}.self_attn.{proj}.{kind}", part
            continue
        for pattern, template in SIMPLE_NAMES:
            if m := re.fullmatch(pattern, name):
                yield template.format(*m.groups()), tensor
                break
        else:
            raise StageError(f"InternLM2 checkpoint: tensor {name!r} has no Llama counterpart")


def weight_files(src: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).is_file():
            weight_map = json.loads((src / index).read_text(encoding="utf-8"))["weight_map"]
            return [src / name for name in sorted(set(weight_map.values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (src / single).is_file():
            return [src / single]
    raise StageError(f"{src}: no InternLM2 weights (model*.safetensors or pytorch_model*.bin)")


def read_file(path: Path):
    """(name, tensor) of one checkpoint file, in the file's order."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        import torch

        yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()


def tensor_digest(name: str, tensor) -> str:
    import torch

    h = hashlib.sha256(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
    h.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_sha256(digests: dict[str, str]) -> str:
    """One hash of all converted tensors (names, dtypes, shapes, bytes), whatever the sharding."""
    return hashlib.sha256("".join(f"{n} {d}\n" for n, d in sorted(digests.items())).encode()).hexdigest()


def convert_weights(src: Path, out: Path, llama) -> dict:
    """One output shard per input file (memory stays at one shard's size)."""
    from safetensors.torch import save_file

    files = weight_files(src)
    digests, weight_map, total, params = {}, {}, 0, 0
    for i, path in enumerate(files, start=1):
        shard = "model.safetensors" if len(files) == 1 else f"model-{i:05d}-of-{len(files):05d}.safetensors"
        converted = dict(convert_tensors(read_file(path), llama))
        for name, tensor in converted.items():
            if name in digests:
                raise StageError(f"InternLM2 checkpoint: {name} appears twice")
            digests[name] = tensor_digest(name, tensor)
            weight_map[name] = shard
            total += tensor.numel() * tensor.element_size()
            params += tensor.numel()
        save_file(converted, str(out / shard), metadata={"format": "pt"})
    missing, extra = expected_names(llama) - set(digests), set(digests) - expected_names(llama)
    if missing or extra:
        raise StageError(f"InternLM2 checkpoint in {src}: missing {sorted(missing)[:4]}, unexpected {sorted(extra)[:4]}")
    if len(files) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n",
            encoding="utf-8")
    return {"weights_sha256": weights_sha256(digests), "tensors": len(digests), "parameters": params,
            "bytes": total}


# --- tokenizer --------------------------------------------------------------------------------

def convert_tokenizer(src: Path, out: Path) -> dict:
    """tokenizer.model (sentencepiece) + tokenizer_config.json -> a fast tokenizer with the same ids.

    InternLM2's own (slow, remote) tokenizer runs sentencepiece on each stretch of text between
    added tokens. Its model is BPE with byte fallback and identity normalization; the fast
    equivalent is tokenizers' BPE with merges from the vocabulary (transformers' generate_merges,
    as its Llama conversion), byte fallback, and sentencepiece's dummy prefix as a per-stretch
    normalizer (transformers' 'legacy' Llama behaviour). A sentencepiece model that normalizes text
    otherwise (NFKC rules, collapsing whitespace) could not be converted exactly and is refused."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE, Unigram
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import import_protobuf
    from transformers.tokenization_utils_base import generate_merges

    path = src / "tokenizer.model"
    if not path.is_file():
        raise StageError(f"{src}: no tokenizer.model (InternLM2's sentencepiece tokenizer)")
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(path.read_bytes())
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces or norm.name not in ("identity", ""):
        raise StageError(f"{path}: sentencepiece normalization {norm.name!r} (remove_extra_whitespaces="
                         f"{norm.remove_extra_whitespaces}) has no exact fast-tokenizer equivalent")
    pieces = [(p.piece, p.score) for p in proto.pieces]
    kinds = [p.type for p in proto.pieces]   # 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
    if trainer.model_type == 2:       # BPE
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        merges = generate_merges(vocab, skip_tokens=[p for (p, _), k in zip(pieces, kinds) if k not in (1,)])
        model = BPE(vocab, merges, unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == 1:     # unigram
        model = Unigram(pieces, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    else:
        raise StageError(f"{path}: sentencepiece model type {trainer.model_type} is neither BPE nor unigram")
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if norm.add_dummy_prefix else []) + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []))

    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    # added tokens: sentencepiece's unknown/control/user-defined pieces, then what tokenizer_config
    # adds (InternLM2's specials sit inside the sentencepiece vocabulary or right after it)
    declared = {int(i): t for i, t in (config.get("added_tokens_decoder") or {}).items()}
    specials = {i: (p, True) for i, ((p, _), k) in enumerate(zip(pieces, kinds)) if k in (2, 3)}
    specials |= {i: (p, False) for i, ((p, _), k) in enumerate(zip(pieces, kinds)) if k == 4}
    for i, t in declared.items():
        content = t["content"] if isinstance(t, dict) else str(t)
        if i < len(pieces) and pieces[i][0] != content:
            raise StageError(f"{src}/tokenizer_config.json: added token {i} is {content!r}, "
                             f"tokenizer.model has {pieces[i][0]!r} there")
        specials[i] = (content, bool(t.get("special", True)) if isinstance(t, dict) else True)
    for i in sorted(specials):
        content, special = specials[i]
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
        if tok.token_to_id(content) != i:
            raise StageError(f"{src}: added token {content!r} should have id {i}, got {tok.token_to_id(content)} "
                             "(added tokens must follow the sentencepiece vocabulary without gaps)")

    bos, eos = str(config.get("bos_token") or "<s>"), str(config.get("eos_token") or "</s>")
    add_bos, add_eos = bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))
    single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in {bos, eos}])

    template = config.get("chat_template")
    if template is None and (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    # the pipeline stops generation at the token that ends an assistant turn (eos), as the
    # published generation_config does for InternLM2-chat (eos_token_id [</s>, <|im_end|>])
    turn_end = "<|im_end|>" if template and "<|im_end|>" in template and tok.token_to_id("<|im_end|>") else eos
    additional = [t for t in (config.get("additional_special_tokens") or []) if t not in (bos, eos, turn_end)]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=turn_end, unk_token=str(config.get("unk_token") or "<unk>"),
        pad_token=str(config.get("pad_token") or eos), additional_special_tokens=additional,
        add_bos_token=add_bos, add_eos_token=add_eos, chat_template=template,
        model_max_length=int(min(config.get("model_max_length") or 10**30, 10**30)),
        clean_up_tokenization_spaces=False)
    fast.save_pretrained(out)
    saved_path = out / "tokenizer_config.json"
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    saved.pop("auto_map", None)
    saved.pop("extra_special_tokens", None)
    # a class every transformers version knows, which takes tokenizer.json as it is
    saved.update(tokenizer_class="PreTrainedTokenizerFast", additional_special_tokens=additional)
    if template is not None:
        saved["chat_template"] = template
    saved_path.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"tokenizer": f"sentencepiece {'BPE' if trainer.model_type == 2 else 'unigram'} -> tokenizers "
                         f"(byte fallback {bool(trainer.byte_fallback)}, dummy prefix {bool(norm.add_dummy_prefix)})",
            "vocab_size": tok.get_vocab_size(), "eos_token": turn_end, "published_eos_token": eos}


# --- the whole folder -------------------------------------------------------------------------

def convert(src: str | Path, out: Path) -> dict:
    """Write the Llama-layout model (config, weights, tokenizer, generation config) into `out`;
    returns what the base manifest records about the conversion."""
    src = Path(src)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    llama = llama_config(config)
    llama.save_pretrained(out)
    info = convert_weights(src, out, llama)
    info |= convert_tokenizer(src, out)
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", out / "generation_config.json")
    return {"from_model_type": config.get("model_type"), "from_architectures": config.get("architectures"),
            "to_architecture": "LlamaForCausalLM", "by": "stages/internlm2.py",
            "rope_parameters": llama.rope_parameters, "dtype": str(llama.dtype).removeprefix("torch."), **info}
