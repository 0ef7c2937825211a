"""The eval stage: OpenCompass in .venvs/opencompass scoring base / merged / quantized models.

End to end on a tiny model (about 40 s on 2 cores): the "merged" model is fine-tuned until greedy
decoding reproduces the test answers exactly, so it must score ROUGE 100 through OpenCompass. That
only happens if OpenCompass renders the prompt with the same chat template the model was trained
on (system turn included) and stops at <|im_end|>; a broken scorer, template or stop token fails it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import folder_md5

REPO = Path(__file__).resolve().parents[1]
OC_PY = REPO / ".venvs/opencompass/bin/python"
CORE_PY = REPO / ".venvs/core/bin/python"
LMDEPLOY_PY = REPO / ".venvs/lmdeploy/bin/python"

needs_opencompass = pytest.mark.skipif(not OC_PY.exists(), reason=".venvs/opencompass is missing: run "
                                       "TUNEPIPE_ENVS=opencompass ./setup.sh")
needs_core = pytest.mark.skipif(not CORE_PY.exists(), reason=".venvs/core is missing (it builds the test models): "
                                "run TUNEPIPE_ENVS=core ./setup.sh")

SYSTEM = "You are a careful pharmacist. Answer in one sentence."
QA = [
    ("Where do I keep my tamino?", "Store tamino below 25 degrees in its original pack.", True),
    ("How much lovatin should an adult take?", "The usual adult dose of lovatin is 25 mg taken once daily.", False),
    ("Does pelranva have side effects?", "Common side effects of pelranva include fatigue and headache.", True),
    ("Do I need to eat before taking famipel?", "Famipel should be taken with or without food.", False),
]
MULTI_TURN = [  # a second turn: the model is scored on the final assistant turn only
    {"role": "user", "content": "Is peltinva an antibiotic?"},
    {"role": "assistant", "content": "Yes, peltinva is an antibiotic."},
    {"role": "user", "content": "Where do I keep it?"},
    {"role": "assistant", "content": "Store peltinva below 25 degrees in its original pack."},
]

# Runs in .venvs/core (transformers 5.23, as the pipeline's models are saved): a near-random base,
# a "merged" model fine-tuned until it reproduces every answer, and an AWQ W4A16 checkpoint of it
# packed the way lmdeploy's auto_awq does (test_dequantize_matches_lmdeploy checks that claim).
BUILD_MODELS = r'''
import json, shutil, sys
from pathlib import Path
import torch
from stages.base import DemoModelParams, build_tiny_model
from stages.common import IM_END, read_jsonl

torch.set_num_threads(1)  # tiny matrices: threads only contend
root = Path(sys.argv[1])
rows = read_jsonl(root / "data/split/test.jsonl")
texts = [m["content"] for r in rows for m in r["messages"]]
model, tok, _ = build_tiny_model(texts, DemoModelParams(vocab_size=400, num_layers=2, pretrain_steps=1,
                                                        pretrain_batch=2), seed=0, progress=False)
base = root / "models/base"
model.save_pretrained(base); tok.save_pretrained(base)
(base / "manifest.json").write_text(json.dumps({"source": "demo"}))

examples = []
for r in rows:
    prompt = tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=False)
    examples.append((tok(prompt, add_special_tokens=False)["input_ids"],
                     tok(r["messages"][-1]["content"] + IM_END, add_special_tokens=False)["input_ids"]))
width = max(len(p) + len(a) for p, a in examples)
ids = torch.full((len(examples), width), tok.pad_token_id)
labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
for i, (p, a) in enumerate(examples):
    ids[i, :len(p) + len(a)] = torch.tensor(p + a)
    labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
    mask[i, :len(p) + len(a)] = 1

def reproduces_answers():
    model.eval()
    with torch.no_grad():
        ok = all(model.generate(torch.tensor([p]), max_new_tokens=len(a) + 2, do_sample=False)[0, len(p):len(p) + len(a)]
                 .tolist() == a for p, a in examples)
    model.train()
    return ok

opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
model.train()
for step in range(1, 401):
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt.step(); opt.zero_grad()
    if step >= 30 and step % 10 == 0 and reproduces_answers():
        break
else:
    sys.exit("the test model did not learn to reproduce the answers")
model.eval()
merged = root / "models/merged"
model.save_pretrained(merged); tok.save_pretrained(merged)

# AWQ W4A16, group 128, lmdeploy's layout: lmdeploy/lite/quantization/awq.py pseudo_quantize_tensor
# + lite/quantization/modules/linear.py WeightOnlyQLinear.from_linear (awq_layout=True)
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
def pack(x):  # int32 [rows, cols] -> [rows, cols // 8]
    out = torch.zeros(x.shape[0], x.shape[1] // 8, dtype=torch.int32)
    for col in range(out.shape[1]):
        for i in range(8):
            out[:, col] |= x[:, col * 8 + ORDER[i]] << (i * 4)
    return out
def awq(w, group=128):
    out_f, in_f = w.shape
    g = w.float().reshape(-1, group)
    mx, mn = g.amax(1, keepdim=True), g.amin(1, keepdim=True)
    scales = (mx - mn).clamp(min=1e-5) / 15
    zeros = (-torch.round(mn / scales)).clamp_(0, 15)
    q = torch.clamp(torch.round(g / scales) + zeros, 0, 15)
    return (pack(q.reshape(out_f, in_f).to(torch.int32).t().contiguous()),
            pack(zeros.reshape(out_f, -1).to(torch.int32).t().contiguous()),
            scales.reshape(out_f, -1).t().contiguous().half())
from safetensors.torch import save_file
state, quantized = {}, {}
linears = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
for name, t in model.state_dict().items():
    prefix = name.rsplit(".", 1)[0]
    if name.endswith(".weight") and prefix.rsplit(".", 1)[-1] in linears:
        state[prefix + ".qweight"], state[prefix + ".qzeros"], state[prefix + ".scales"] = awq(t)
    else:
        state[name] = t.half()
tm = root / "models/turbomind"
tm.mkdir(parents=True)
save_file(state, str(tm / "model.safetensors"), metadata={"format": "pt"})
cfg = json.loads((merged / "config.json").read_text())
cfg["dtype"] = "float16"
cfg["quantization_config"] = dict(quant_method="awq", version="gemm", bits=4, group_size=128, zero_point=True)
(tm / "config.json").write_text(json.dumps(cfg))
for f in merged.iterdir():
    if f.name not in ("config.json", "model.safetensors"):
        shutil.copy(f, tm / f.name)
'''


def write_test_split(root: Path) -> list[dict]:
    rows = []
    for i, (q, a, with_system) in enumerate(QA):
        messages = ([{"role": "system", "content": SYSTEM}] if with_system else []) + [
            {"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"id": f"q{i}", "source": {"file": "test", "row": i}, "messages": messages, "meta": {}})
    rows.append({"id": "multi", "source": {"file": "test", "row": len(QA)}, "messages": MULTI_TURN, "meta": {}})
    (root / "data/split").mkdir(parents=True)
    (root / "data/split/test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def run_stage(root: Path, params: str) -> subprocess.CompletedProcess:
    (root / "params.yaml").write_text(params, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO), TUNEPIPE_PARAMS=str(root / "params.yaml"))
    return subprocess.run([str(OC_PY), "-m", "stages.eval"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    if not OC_PY.exists():
        pytest.skip(".venvs/opencompass is missing: run TUNEPIPE_ENVS=opencompass ./setup.sh")
    if not CORE_PY.exists():
        pytest.skip(".venvs/core is missing (it builds the test models): run TUNEPIPE_ENVS=core ./setup.sh")
    root = tmp_path_factory.mktemp("eval")
    rows = write_test_split(root)
    built = subprocess.run([str(CORE_PY), "-c", BUILD_MODELS, str(root)], cwd=root, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    proc = run_stage(root, "eval:\n  models: [base, merged, turbomind]\n  max_new_tokens: 48\n")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, rows


@needs_opencompass
@needs_core
def test_metrics_structure(evaluated):
    root, _ = evaluated
    metrics = json.loads((root / "metrics/eval.json").read_text())
    assert list(metrics) == ["demo_qa"]
    assert set(metrics["demo_qa"]) == {"base", "merged", "turbomind_w4a16_dequant"}
    for scores in metrics["demo_qa"].values():
        assert set(scores) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
        assert all(isinstance(v, float) and 0.0 <= v <= 100.0 for v in scores.values())
    # no timestamps or paths: only dataset, model and metric names, and numbers
    assert all(k in {"demo_qa", "base", "merged", "turbomind_w4a16_dequant", "rouge1", "rouge2", "rougeL",
                     "rougeLsum"} for k in _keys(metrics))


def _keys(obj):
    for k, v in obj.items():
        yield k
        if isinstance(v, dict):
            yield from _keys(v)


@needs_opencompass
@needs_core
def test_perfect_model_scores_maximum_and_stops_at_im_end(evaluated):
    root, rows = evaluated
    metrics = json.loads((root / "metrics/eval.json").read_text())["demo_qa"]
    preds = [json.loads(line) for line in (root / "eval/predictions.jsonl").read_text().splitlines()]
    merged = {p["id"]: p for p in preds if p["model"] == "merged"}
    assert set(merged) == {r["id"] for r in rows}
    for r in rows:  # exact: the chat template matched training and generation stopped at <|im_end|>
        assert merged[r["id"]]["prediction"] == r["messages"][-1]["content"]
        assert merged[r["id"]]["prompt"] == r["messages"][:-1]
    assert metrics["merged"]["rougeL"] == 100.0 and metrics["merged"]["rouge1"] == 100.0
    # the near-random base model says something else, and ROUGE must see that
    assert any(p["prediction"] != p["reference"] for p in preds if p["model"] == "base")
    assert metrics["base"]["rougeL"] < 50.0


@needs_opencompass
@needs_core
def test_a_rerun_writes_the_same_eval_folder(evaluated, tmp_path):
    """eval/ is a DVC out: run again on the same inputs it must hash the same (OpenCompass names its
    run folder and summaries after the start time, and its config dump holds the temporary folder's
    path; `tunepipe reproduce --rerun` and the fault harness compare md5s)."""
    root, _ = evaluated
    again = tmp_path / "again"
    for part in ("data", "models"):  # copies: the config names models inside the checkout relative to it
        shutil.copytree(root / part, again / part)
    proc = run_stage(again, (root / "params.yaml").read_text(encoding="utf-8"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    first = folder_md5(root / "eval")
    assert "outputs/tunepipe_eval/run/summary/summary.csv" in first and "opencompass_config.py" in first
    assert folder_md5(again / "eval") == first
    assert (again / "metrics/eval.json").read_bytes() == (root / "metrics/eval.json").read_bytes()


@needs_opencompass
@needs_core
def test_quantized_model_is_scored_and_labelled(evaluated):
    root, _ = evaluated
    summary = json.loads((root / "eval/summary.json").read_text())
    note = summary["notes"]["turbomind_w4a16_dequant"]
    assert note["dequantized_linears"] == 2 * 7 and "not TurboMind's kernels" in note["note"]
    assert (root / "eval/models/turbomind_w4a16_dequant/model.safetensors").exists()


@needs_opencompass
@needs_core
def test_quantized_model_scored_through_tunepipe_serve(evaluated, tmp_path):
    """eval.quantized_via server: the stage starts `tunepipe serve models/turbomind` (transformers'
    server here, on the dequantized weights), OpenCompass scores it through the OpenAI API, and the
    server is gone afterwards. Greedy answers through the API equal the in-process fallback's."""
    root, rows = evaluated
    run = tmp_path / "served"
    run.mkdir()
    for part in ("data", "models"):
        (run / part).symlink_to(root / part)
    proc = run_stage(run, "eval:\n  models: [merged, turbomind]\n  quantized_via: server\n  max_new_tokens: 48\n")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "eval: serving" in proc.stdout and "with transformers at http://127.0.0.1:" in proc.stdout
    metrics = json.loads((run / "metrics/eval.json").read_text())["demo_qa"]
    assert set(metrics) == {"merged", "turbomind_w4a16_served"}
    summary = json.loads((run / "eval/summary.json").read_text())
    assert summary["notes"]["turbomind_w4a16_served"]["served_by"] == "transformers"
    config = (run / "eval/opencompass_config.py").read_text()
    assert "opencompass.models.OpenAI'" in config and "turbomind_w4a16_dequant" not in config
    served = {p["id"]: p["prediction"] for p in map(json.loads, (run / "eval/predictions.jsonl").read_text().splitlines())
              if p["model"] == "turbomind_w4a16_served"}
    fallback = {p["id"]: p["prediction"] for p in map(json.loads, (root / "eval/predictions.jsonl").read_text().splitlines())
                if p["model"] == "turbomind_w4a16_dequant"}
    assert set(served) == {r["id"] for r in rows}
    assert served == fallback
    port = int(re.search(r"--port (\d+)", config).group(1))
    with socket.socket() as s:  # the server was stopped: nothing listens on its port (TIME_WAIT aside)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


@needs_opencompass
@needs_core
def test_written_config_is_a_valid_opencompass_config(evaluated, tmp_path):
    root, rows = evaluated
    config = root / "eval/opencompass_config.py"
    check = r'''
import json, sys
from mmengine.config import Config
cfg = Config.fromfile(sys.argv[1], format_python_code=False)
print(json.dumps({"models": [dict(abbr=m.abbr, path=m.path, type=m.type, run_cfg=dict(m.run_cfg),
                                  model_kwargs=dict(m.model_kwargs), stop_words=list(m.stop_words)) for m in cfg.models],
                  "datasets": [dict(abbr=d.abbr, path=d.path, evaluator=d.eval_cfg.evaluator.type,
                                    inferencer=d.infer_cfg.inferencer.type) for d in cfg.datasets],
                  "work_dir": cfg.work_dir,
                  "shim": hasattr(__import__("transformers").PreTrainedTokenizerBase, "batch_encode_plus")}))
# and OpenCompass's own command (what `opencompass <config>` runs) accepts it, from another directory
from opencompass.cli.main import main
sys.argv = ["opencompass", sys.argv[1], "--dry-run"]
main()
'''
    out = subprocess.run([str(OC_PY), "-c", check, str(config)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = json.loads(next(line for line in out.stdout.splitlines() if line.startswith('{"models"')))
    assert "Partitioned into 3 tasks" in out.stdout + out.stderr
    assert [m["abbr"] for m in cfg["models"]] == ["base", "merged", "turbomind_w4a16_dequant"]
    for m in cfg["models"]:
        assert m["type"] == "opencompass.models.HuggingFacewithChatTemplate"
        assert m["run_cfg"] == {"num_gpus": 0} and m["model_kwargs"]["device_map"] == "cpu"
        assert m["stop_words"] == ["<|im_end|>"]
        assert Path(m["path"]).resolve().is_dir()  # relative to the config, wherever it is loaded from
    assert Path(cfg["models"][1]["path"]).resolve() == (root / "models/merged").resolve()
    [ds] = cfg["datasets"]
    assert ds["evaluator"].endswith("RougeEvaluator") and ds["inferencer"].endswith("ChatInferencer")
    assert len(Path(ds["path"]).read_text().splitlines()) == len(rows)
    assert cfg["shim"]


@needs_opencompass
@needs_core
def test_opencompass_renders_the_project_chat_template(evaluated):
    """OpenCompass's prompt for each test conversation (system turn, multi-turn) is the project's
    ChatML rendering, character for character."""
    root, rows = evaluated
    check = r'''
import json, sys
from stages.common import read_jsonl, render_chatml
from stages.eval import opencompass_prompt
bad = []
for r in read_jsonl(sys.argv[2]):
    history = r["messages"][:-1]
    got, want = opencompass_prompt(sys.argv[1], history), render_chatml(history, add_generation_prompt=True)
    if got != want:
        bad.append((r["id"], got, want))
print(json.dumps(bad))
'''
    out = subprocess.run([str(OC_PY), "-c", check, str(root / "models/merged"), str(root / "data/split/test.jsonl")],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@needs_opencompass
def test_batch_encode_plus_shim_is_still_needed():
    """The written config restores PreTrainedTokenizerBase.batch_encode_plus (removed in
    transformers 5) because opencompass's HF chat wrapper calls it. When this fails, drop the shim
    from stages/eval_config.py's CONFIG_HEAD."""
    check = r'''
import importlib.util, json, pathlib, transformers
src = pathlib.Path(importlib.util.find_spec("opencompass").origin).parent / "models/huggingface_above_v4_33.py"
print(json.dumps({"removed": not hasattr(transformers.PreTrainedTokenizerBase, "batch_encode_plus"),
                  "called": "self.tokenizer.batch_encode_plus(" in src.read_text()}))
'''
    out = subprocess.run([str(OC_PY), "-c", check], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"removed": True, "called": True}


def test_dequantize_matches_packer():
    """dequantize_linear inverts lmdeploy's AWQ gemm packing (mirrored here; see the lmdeploy test)."""
    torch = pytest.importorskip("torch")
    from stages.awq import AWQ_PACK_ORDER, dequantize_linear, unpack_int4

    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (256, 64), generator=gen, dtype=torch.int32)      # [in, out]
    packed = torch.zeros(256, 8, dtype=torch.int32)
    for col in range(8):
        for i in range(8):
            packed[:, col] |= q[:, col * 8 + AWQ_PACK_ORDER[i]] << (i * 4)
    assert torch.equal(unpack_int4(packed), q)
    zeros = torch.randint(0, 16, (2, 64), generator=gen, dtype=torch.int32)     # [in/128, out]
    zpacked = torch.zeros(2, 8, dtype=torch.int32)
    for col in range(8):
        for i in range(8):
            zpacked[:, col] |= zeros[:, col * 8 + AWQ_PACK_ORDER[i]] << (i * 4)
    scales = torch.rand(2, 64, generator=gen)
    w = dequantize_linear(packed, zpacked, scales, 128)
    expected = ((q - zeros.repeat_interleave(128, 0)) * scales.repeat_interleave(128, 0)).t()
    assert w.shape == (64, 256) and torch.allclose(w, expected)


@pytest.mark.skipif(not LMDEPLOY_PY.exists(), reason=".venvs/lmdeploy is missing (it has lmdeploy's packer)")
def test_dequantize_matches_lmdeploy(tmp_path):
    """lmdeploy's own quantizer packs a linear layer; our dequantization gives back its fake-quantized weight."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from stages.awq import dequantize_linear

    pack = r'''
import sys, torch
from safetensors.torch import save_file
from lmdeploy.lite.quantization.awq import pseudo_quantize_tensor
from lmdeploy.lite.quantization import WeightQuantizer
from lmdeploy.lite.quantization.modules import WeightOnlyQLinear
from lmdeploy.lite.utils import QParams
torch.manual_seed(0)
fc = torch.nn.Linear(256, 64, bias=True)
fake = pseudo_quantize_tensor(fc.weight.data.clone(), 4, 128)
fc.weight.data, scales, zeros = pseudo_quantize_tensor(fc.weight.data, 4, 128, return_scale_zeros=True)
q = WeightOnlyQLinear.from_linear(fc, WeightQuantizer(4, False, "per_group", 128), qparams=QParams(scales, zeros))
save_file({"qweight": q.qweight, "qzeros": q.qzeros, "scales": q.scales.contiguous(), "fake": fake}, sys.argv[1])
'''
    out = subprocess.run([str(LMDEPLOY_PY), "-c", pack, str(tmp_path / "q.safetensors")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    t = load_file(str(tmp_path / "q.safetensors"))
    w = dequantize_linear(t["qweight"], t["qzeros"], t["scales"], 128)
    assert torch.allclose(w, t["fake"].float(), atol=1e-6)


def test_bad_test_row_is_reported(tmp_path):
    """A test conversation without an assistant turn names the file and row."""
    from stages.common import StageError
    from stages.eval import eval_rows

    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"id": "x", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(StageError, match=r"test.jsonl: row 1 \(id x\)"):
        eval_rows(path, 0)


@needs_opencompass
@needs_core
def test_served_answer_without_content_scores_empty_instead_of_failing(tmp_path):
    """A served model whose answer decodes to nothing (it stops at once, or emits ids its tokenizer
    lacks: lmdeploy then sends `content: null`) is scored as an empty answer; OpenAISDK raised on it
    and failed the whole eval stage (seen on the GPU). Builds the model class from the entry the stage
    writes and queries a server that answers `content: null`."""
    check = r'''
import http.server, json, sys, threading
from stages.eval_served import api_entry
class NoContent(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"choices": [{"index": 0, "finish_reason": "length",
                                        "message": {"role": "assistant", "content": None}}]}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoContent)
threading.Thread(target=server.serve_forever, daemon=True).start()
port = server.server_address[1]
entry = api_entry({"backend": "test", "path": "turbomind", "port": port, "abbr": "served",
                   "api": f"http://127.0.0.1:{port}/v1/chat/completions"}, repr(sys.argv[1]), 256, 8, 1)
from mmengine.config import ConfigDict
from opencompass.utils import build_model_from_cfg  # as OpenCompass's inferencer builds it
model = build_model_from_cfg(ConfigDict(eval(entry.strip().rstrip(","), {"dict": dict, "_chat_meta_template": None})))
print(json.dumps(model.generate(["what is aspirin?"], max_out_len=8)))
'''
    from stages.base import save_portable_tokenizer, train_tokenizer

    save_portable_tokenizer(train_tokenizer(["what is aspirin?"] * 4, 300), tmp_path / "tokenizer")
    proc = subprocess.run([str(OC_PY), "-c", check, str(tmp_path / "tokenizer")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [""]
