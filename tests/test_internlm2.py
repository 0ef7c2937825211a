"""InternLM2 checkpoints converted by the base stage to transformers' Llama layout (stages/internlm2.py).

The published-layout model is the project's own tiny InternLM2 package
(tests/remote_code_fixture.py write_internlm2: remote code, fused wqkv, sentencepiece tokenizer
with a slow remote tokenizer class). Checked: the converted LlamaForCausalLM gives the logits of
the remote-code model; the converted fast tokenizer gives the ids of the original tokenizer (its
remote class, and sentencepiece run directly); the manifest; refusals; lmdeploy's AWQ on the result.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_stage, write_params
from remote_code_fixture import AGENT_SPECIALS, INTERNLM2_CHAT_TEMPLATE, TEXTS, write_internlm2
from stages.common import IM_END, StageError, resolve_base

spm = pytest.importorskip("sentencepiece", reason="sentencepiece (envs/core.txt) builds the test tokenizer: ./setup.sh")
torch = pytest.importorskip("torch")

LMDEPLOY_PY = REPO / ".venvs" / "lmdeploy" / "bin" / "python"
# hidden 256 / 4 heads / 2 KV heads: head_dim 64 (a TurboMind kernel size), two KV groups (so the
# order of wqkv's rows matters), every linear's in_features a multiple of AWQ's group of 128
SHAPE = dict(hidden_size=256, heads=4, kv_heads=2, intermediate_size=256, layers=2)

CONVERSATIONS = [
    [{"role": "system", "content": "You are a careful pharmacist. Answer in one sentence."},
     {"role": "user", "content": "What is the usual adult dose of paracetamol?"},
     {"role": "assistant", "content": "Take 500 mg to 1 g every four to six hours, at most 4 g a day."}],
    [{"role": "user", "content": "头痛三天了，需要看医生吗？"},
     {"role": "assistant", "content": "如果头痛持续或加重，请及时就医。💊"}],
    [{"role": "user", "content": "  two leading spaces,\ttabs\tand\nnew lines\n\n"},
     {"role": "assistant", "content": "def dose(kg):\n    return 15 * kg  # mg"},
     {"role": "user", "content": "And <|plugin|> or <|im_end|> typed as text?"},
     {"role": "assistant", "content": ""}],
]


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def token_ids():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 400, (2, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0   # left padding in the second row
    return ids, mask


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    # InternLM2.5-chat's RoPE settings (dynamic NTK, factor 2), a shorter context
    return write_internlm2(tmp_path_factory.mktemp("internlm2") / "internlm2-chat-tiny", **SHAPE,
                           rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def converted(published, tmp_path_factory) -> Path:
    """The base stage on the published folder (base.source hf, a local folder, no remote code)."""
    work = tmp_path_factory.mktemp("base")
    write_params(work, {"base": {"source": "hf", "model_id": str(published)}})
    run_stage(work, "base")
    return work / "models/base"


def test_converted_model_gives_the_remote_code_models_logits(published, converted):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    original = AutoModelForCausalLM.from_pretrained(published, trust_remote_code=True).eval()
    llama = AutoModelForCausalLM.from_pretrained(converted).eval()  # no remote code
    assert type(llama) is LlamaForCausalLM
    ids, mask = token_ids()
    assert (logits(original, ids) - logits(llama, ids)).abs().max() < 1e-5
    both = logits(original, ids, mask), logits(llama, ids, mask)
    assert (both[0] - both[1])[mask.bool()].abs().max() < 1e-5


def test_wqkv_rows_are_split_per_kv_group(published, converted):
    """The same comparison is sensitive to the split: q, k, v taken as three contiguous blocks of
    wqkv (the wrong layout) give other logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(converted).eval()
    ids, _ = token_ids()
    right = logits(llama, ids)
    state = load_file(published / "model.safetensors")
    q_rows, kv_rows = SHAPE["heads"] * 64, SHAPE["kv_heads"] * 64
    with torch.no_grad():
        for layer in range(SHAPE["layers"]):
            wqkv = state[f"model.layers.{layer}.attention.wqkv.weight"]
            attn = llama.model.layers[layer].self_attn
            attn.q_proj.weight.copy_(wqkv[:q_rows])
            attn.k_proj.weight.copy_(wqkv[q_rows:q_rows + kv_rows])
            attn.v_proj.weight.copy_(wqkv[q_rows + kv_rows:])
    assert (logits(llama, ids) - right).abs().max() > 1e-3


def test_weights_are_copied_bit_for_bit_and_hashed(published, converted):
    from safetensors.torch import load_file

    from stages.internlm2 import tensor_digest, weights_sha256

    before = load_file(published / "model.safetensors")
    after = load_file(converted / "model.safetensors")
    assert torch.equal(after["model.embed_tokens.weight"], before["model.tok_embeddings.weight"])
    assert torch.equal(after["lm_head.weight"], before["output.weight"])
    assert torch.equal(after["model.layers.1.mlp.gate_proj.weight"], before["model.layers.1.feed_forward.w1.weight"])
    assert torch.equal(after["model.layers.1.mlp.up_proj.weight"], before["model.layers.1.feed_forward.w3.weight"])
    assert torch.equal(after["model.layers.1.mlp.down_proj.weight"], before["model.layers.1.feed_forward.w2.weight"])
    assert torch.equal(after["model.layers.0.post_attention_layernorm.weight"],
                       before["model.layers.0.ffn_norm.weight"])
    wqkv = before["model.layers.0.attention.wqkv.weight"].reshape(2, 4, 64, 256)  # 2 groups of [q, q, k, v]
    assert torch.equal(after["model.layers.0.self_attn.q_proj.weight"], wqkv[:, :2].reshape(256, 256))
    assert torch.equal(after["model.layers.0.self_attn.k_proj.weight"], wqkv[:, 2].reshape(128, 256))
    assert torch.equal(after["model.layers.0.self_attn.v_proj.weight"], wqkv[:, 3].reshape(128, 256))
    assert sum(t.numel() for t in after.values()) == sum(t.numel() for t in before.values())
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["conversion"]["weights_sha256"] == weights_sha256(
        {name: tensor_digest(name, t) for name, t in after.items()})


def test_manifest_and_folder_need_no_remote_code(published, converted):
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["source"] == "hf" and manifest["model_id"] == str(published)
    assert manifest["trust_remote_code"] is False and manifest["architecture"] == "LlamaForCausalLM"
    conversion = manifest["conversion"]
    assert conversion["from_model_type"] == "internlm2" and conversion["from_architectures"] == ["InternLM2ForCausalLM"]
    assert conversion["to_architecture"] == "LlamaForCausalLM" and conversion["eos_token"] == IM_END
    assert re.fullmatch(r"[0-9a-f]{64}", conversion["weights_sha256"])
    assert resolve_base(converted) == (str(converted), {"revision": None, "trust_remote_code": False})
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and config["tie_word_embeddings"] is False
    assert config["rope_parameters"] == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}
    assert config["max_position_embeddings"] == 4096 and config["rms_norm_eps"] == 1e-5
    tok_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert "auto_map" not in tok_config and tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not list(converted.glob("*.py")) and not (converted / "tokenizer.model").exists()
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation == json.loads((published / "generation_config.json").read_text())  # eos: </s>, <|im_end|>


def sentencepiece_ids(folder: Path, text: str) -> list[int]:
    """The original tokenizer, run by hand: sentencepiece on each stretch between added tokens."""
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    added = {t["content"]: int(i) for i, t in
             json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"].items()}
    ids = []
    for part in re.split("(" + "|".join(map(re.escape, sorted(added, key=len, reverse=True))) + ")", text):
        if part in added:
            ids.append(added[part])
        elif part:
            ids += sp.encode(part)
    return ids


def assert_same_tokenizer(published: Path, converted: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    original = AutoTokenizer.from_pretrained(published, trust_remote_code=True)
    fast = AutoTokenizer.from_pretrained(converted)
    assert type(original).__name__ == "InternLM2Tokenizer" and isinstance(fast, PreTrainedTokenizerFast)
    assert fast.chat_template == INTERNLM2_CHAT_TEMPLATE
    for messages in CONVERSATIONS:
        for prompt in (messages, messages[:-1]):
            text = original.apply_chat_template(prompt, tokenize=False, add_generation_prompt=prompt is not messages)
            assert fast.apply_chat_template(prompt, tokenize=False, add_generation_prompt=prompt is not messages) == text
            want = sentencepiece_ids(published, text)
            assert want[0] == fast.bos_token_id  # the template puts <s> first
            assert original(text, add_special_tokens=False)["input_ids"] == want
            assert fast(text, add_special_tokens=False)["input_ids"] == want
    for text in TEXTS:  # plain text: bos added, as by the original
        assert fast(text)["input_ids"] == original(text)["input_ids"] == [1] + sentencepiece_ids(published, text)
    for token in AGENT_SPECIALS + ["<|im_start|>", IM_END]:
        assert fast.convert_tokens_to_ids(token) == original.convert_tokens_to_ids(token)
    assert len(fast) == len(original)


def test_converted_tokenizer_gives_the_original_ids(published, converted):
    from transformers import AutoTokenizer

    assert_same_tokenizer(published, converted)
    fast = AutoTokenizer.from_pretrained(converted)
    assert fast.eos_token == IM_END and fast.pad_token == "</s>" and fast.bos_token == "<s>"
    sp = spm.SentencePieceProcessor(model_file=str(published / "tokenizer.model"))
    for answer in ("Take 500 mg, 头痛 💊.", "  two spaces\tand a tab\n"):  # byte fallback, whitespace kept
        assert fast.decode(fast(answer, add_special_tokens=False)["input_ids"]) == sp.decode(sp.encode(answer)) == answer


@pytest.mark.parametrize("variant", [
    dict(rope_scaling={"type": "dynamic", "factor": 2.0}, rope_theta=10000.0, max_position_embeddings=32,
         add_dummy_prefix=False),
    dict(rope_scaling={"type": "linear", "factor": 3.0}, rope_theta=10000.0, bias=True, kv_heads=1),
    dict(dtype="bfloat16", kv_heads=4),
], ids=["dynamic-ntk-no-dummy-prefix", "linear-bias-mqa", "bf16-mha"])
def test_variants_convert_exactly(tmp_path, variant):
    from transformers import AutoModelForCausalLM

    from stages.internlm2 import convert

    src = write_internlm2(tmp_path / "src", **{**SHAPE, **variant})
    out = tmp_path / "out"
    out.mkdir()
    info = convert(src, out)
    dtype = torch.float32  # bf16 weights compared in fp32 compute: same weights, same math
    original = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True, dtype=dtype).eval()
    llama = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    ids = torch.randint(5, 400, (2, 80), generator=torch.Generator().manual_seed(1))  # 80 > 32 positions
    assert (logits(original, ids) - logits(llama, ids)).abs().max() < 1e-5
    if "rope_scaling" in variant:  # the scaling is what makes them agree
        assert info["rope_parameters"]["rope_type"] == variant["rope_scaling"]["type"]
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, rope_parameters={
            "rope_type": "default", "rope_theta": variant["rope_theta"]}).eval()
        assert (logits(plain, ids) - logits(llama, ids)).abs().max() > 1e-4
    if "dtype" in variant:
        assert info["dtype"] == "bfloat16"
        assert next(AutoModelForCausalLM.from_pretrained(out).parameters()).dtype == torch.bfloat16
    assert_same_tokenizer(src, out)


def test_sharded_and_bin_checkpoints_convert_alike(published, converted, tmp_path):
    """Published 7B checkpoints come in shards with an index (safetensors, or .bin for the first
    InternLM2 release): the same tensors give the same hash and an index of their own."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from stages.internlm2 import convert

    state = load_file(published / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for kind in ("sharded", "bin"):
        src = tmp_path / kind
        src.mkdir()
        for f in published.iterdir():
            if f.name != "model.safetensors":
                (src / f.name).write_bytes(f.read_bytes())
        if kind == "sharded":
            for shard, part in shards.items():
                save_file({n: state[n] for n in part}, str(src / shard), metadata={"format": "pt"})
            (src / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {}, "weight_map": {n: shard for shard, part in shards.items() for n in part}}))
        else:
            torch.save(state, src / "pytorch_model.bin")
        (tmp_path / f"{kind}-out").mkdir()
        info = convert(src, tmp_path / f"{kind}-out")
        assert info["weights_sha256"] == json.loads((converted / "manifest.json").read_text())["conversion"]["weights_sha256"]
    index = json.loads((tmp_path / "sharded-out/model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(shards)
    ids, _ = token_ids()
    reference = logits(AutoModelForCausalLM.from_pretrained(converted).eval(), ids)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "sharded-out").eval(), ids), reference)


def test_what_cannot_be_converted_exactly_is_refused(tmp_path):
    from stages.internlm2 import convert_tokenizer, rope_parameters

    with pytest.raises(StageError, match="only dynamic and linear"):
        rope_parameters({"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    src = tmp_path / "nfkc"
    src.mkdir()
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 10), model_writer=buf, vocab_size=300,
                                   model_type="bpe", hard_vocab_limit=False, minloglevel=2)  # nmt_nfkc, collapses spaces
    (src / "tokenizer.model").write_bytes(buf.getvalue())
    (src / "tokenizer_config.json").write_text("{}")
    with pytest.raises(StageError) as err:
        convert_tokenizer(src, tmp_path / "out")
    assert "\n" not in str(err.value) and "nmt_nfkc" in str(err.value)


def test_unknown_tensors_are_refused(published, tmp_path):
    from safetensors.torch import load_file, save_file

    from stages.internlm2 import convert

    src = tmp_path / "src"
    src.mkdir()
    for f in published.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    state = load_file(published / "model.safetensors")
    state["model.layers.0.attention.extra_proj.weight"] = torch.zeros(4, 4)
    save_file(state, str(src / "model.safetensors"))
    (tmp_path / "out").mkdir()
    with pytest.raises(StageError, match="extra_proj.weight' has no Llama counterpart"):
        convert(src, tmp_path / "out")


def test_converted_model_trains_and_merges_without_remote_code(converted, tmp_path):
    """train (hf) and merge on the converted base: the InternLM2 template (<s> first) renders the
    training ids, the loss is on the answers and their <|im_end|> only."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.train import IGNORE, tokenize_conversation

    shutil.copytree(converted, tmp_path / "models/base")
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
            for i in range(24)]
    for name, part in (("train", rows[:20]), ("val", rows[20:])):
        (tmp_path / f"data/split/{name}.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"data/split/{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    write_params(tmp_path, {"train": {"batch_size": 4, "max_length": 128}, "merge": {"check_rows": 4}})
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "models/base")
    example = tokenize_conversation(tokenizer, rows[3]["messages"], 128)
    assert example["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.decode([t for t in example["labels"] if t != IGNORE]) == "3 plus 3 is 6." + IM_END
    run_stage(tmp_path, "train", "--base", "models/base")
    run_stage(tmp_path, "merge", "--base", "models/base", "--adapter", "models/adapter")
    metrics = json.loads((tmp_path / "metrics/train.json").read_text())
    assert metrics["val_loss_after"] < metrics["val_loss_before"]
    assert json.loads((tmp_path / "metrics/merge.json").read_text())["max_abs_logit_diff"] < 1e-3
    assert not list((tmp_path / "models/merged").glob("*.py"))
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "models/merged")).__name__ == "LlamaForCausalLM"


@pytest.mark.skipif(not LMDEPLOY_PY.exists(), reason=".venvs/lmdeploy is missing: TUNEPIPE_ENVS=lmdeploy ./setup.sh")
def test_lmdeploy_awq_quantizes_the_converted_layout(converted, tmp_path):
    """The turbomind stage, as dvc runs it, on the converted model: lmdeploy's auto_awq with its
    LlamaForCausalLM mapping, TurboMind's layout check, lmdeploy rendering InternLM2's own template
    (<s> first) and stopping at <|im_end|>, the dequantized logits."""
    rows = [{"id": f"r{i}", "messages": CONVERSATIONS[i % 2]} for i in range(24)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"turbomind": {"calib_samples": 16, "calib_seqlen": 64,
                                                                        "eval_rows": 4}}))
    proc = subprocess.run([str(LMDEPLOY_PY), "-m", "stages.turbomind", "--merged", str(converted), "--train",
                           str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "turbomind"), "--metrics",
                           str(tmp_path / "metrics.json")], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "TUNEPIPE_PARAMS": str(tmp_path / "params.yaml")},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["quantized_linears"] == SHAPE["layers"] * 7
    assert 0 < metrics["logits_rel_error_mean"] < 0.5 and metrics["top1_agreement"] > 0.5, metrics
    config = json.loads((tmp_path / "turbomind/config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["quantization_config"]["bits"] == 4
