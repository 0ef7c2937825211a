"""GPU benchmark (issue 12): lmdeploy's PyTorch engine serving the turbomind stage's AWQ artifact,
against transformers `generate` on the merged model, on the same prompts, in one run; then
OpenCompass scores the test split through the server's OpenAI-compatible API (OpenAISDK model).

Needs a model folder made by gpu_pipeline.py with --keep (models/merged, models/turbomind, data/split):
  python3 benchmarks/gpu_pipeline.py --models qwen2.5-1.5b --stages base,train,merge,turbomind --keep
  python3 benchmarks/serve_throughput.py --model-dir /tmp/gpubench/qwen2.5-1.5b
Both sides generate exactly --max-new-tokens per prompt (ignore_eos / min_new_tokens: a random-init
model's end token would otherwise decide the length) with greedy decoding; the figure is output
tokens per second of wall time over all prompts, the server receiving them all at once.
"""
from __future__ import annotations

import argparse, csv, json, os, subprocess, sys, time, urllib.request  # noqa: E401
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from stages.serve import served  # noqa: E402

MODEL_NAME = "tunepipe"


def prompts_of(split_file: Path, n: int) -> list[list[dict]]:
    """The conversation before the last assistant turn of the first n rows."""
    rows = [json.loads(line) for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["messages"][:-1] for r in rows[:n]]


def post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def server_throughput(base: str, prompts: list, max_new: int) -> dict:
    def one(messages):
        out = post(f"{base}/chat/completions", {"model": MODEL_NAME, "messages": messages, "max_tokens": max_new,
                                                  "temperature": 0, "ignore_eos": True})
        return out["usage"]["completion_tokens"]
    one(prompts[0])  # warm-up
    start = time.time()
    with ThreadPoolExecutor(len(prompts)) as pool:
        tokens = list(pool.map(one, prompts))
    wall = time.time() - start
    return {"prompts": len(prompts), "output_tokens": sum(tokens), "wall_s": round(wall, 2),
            "output_tokens_per_s": round(sum(tokens) / wall, 1)}


def streamed_chunks(base: str, messages: list, max_new: int) -> int:
    req = urllib.request.Request(f"{base}/chat/completions", json.dumps(
        {"model": MODEL_NAME, "messages": messages, "max_tokens": max_new, "temperature": 0, "stream": True,
         "ignore_eos": True}).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return sum(1 for line in resp if line.startswith(b"data: {"))


OC_CONFIG = '''
datasets = [dict(
    abbr='test_split', type='opencompass.datasets.CustomDataset', path={data!r},
    reader_cfg=dict(input_columns=['messages'], output_column='answer'),
    infer_cfg=dict(
        prompt_template=dict(type='opencompass.openicl.icl_prompt_template.PromptTemplate', template='{{messages}}'),
        retriever=dict(type='opencompass.openicl.icl_retriever.ZeroRetriever'),
        inferencer=dict(type='opencompass.openicl.icl_inferencer.ChatInferencer', infer_mode='last',
                        max_out_len={max_new})),
    eval_cfg=dict(evaluator=dict(type='opencompass.openicl.icl_evaluator.RougeEvaluator')))]
models = [dict(
    type='opencompass.models.OpenAISDK', abbr='turbomind_w4a16_served', path={name!r}, key='EMPTY',
    openai_api_base={api!r}, tokenizer_path={tokenizer!r}, temperature=0.0, query_per_second=64, max_workers=64,
    meta_template=dict(round=[dict(role='HUMAN', api_role='HUMAN'), dict(role='BOT', api_role='BOT', generate=True)],
                       reserved_roles=[dict(role='SYSTEM', api_role='SYSTEM')]),
    max_seq_len=2048, max_out_len={max_new}, batch_size=64)]
work_dir = {work!r}
'''


def opencompass_through_api(base: str, test_file: Path, tokenizer: Path, work: Path, max_new: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in test_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    data = work / "test_split.jsonl"
    data.write_text("".join(json.dumps({"messages": r["messages"], "answer": r["messages"][-1]["content"]},
                                       ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = work / "oc_api.py"
    cfg.write_text(OC_CONFIG.format(data=str(data), max_new=max_new, api=f"{base}/", name=MODEL_NAME, tokenizer=str(tokenizer),
                                    work=str(work / "outputs")))
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "opencompass.cli.main", str(cfg)], cwd=work,
                          stdout=(work / "opencompass.log").open("w"), stderr=subprocess.STDOUT,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",  # gpu_pipeline's stand-ins: WORKDIR/stand_ins
                                   PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"),
                                                                            str(tokenizer.parents[2] / "stand_ins")]))))
    summaries = sorted((work / "outputs").glob("*/summary/summary_*.csv"))
    if proc.returncode or not summaries:
        return {"status": f"failed (exit {proc.returncode}); see {work}/opencompass.log"}
    with summaries[-1].open(newline="") as f:
        scores = {row["metric"]: float(row["turbomind_w4a16_served"]) for row in csv.DictReader(f)}
    return {"status": "ok", "rows": len(rows), "wall_s": round(time.time() - start, 1), "scores": scores}


def transformers_throughput(merged: Path, prompts: list, max_new: int, batch: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(merged, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16, device_map="cuda").eval()
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]

    def generate(chunk):
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        return (out.shape[1] - enc["input_ids"].shape[1]) * len(chunk)
    generate(texts[:4])  # warm-up
    torch.cuda.synchronize()
    start = time.time()
    tokens = sum(generate(texts[i:i + batch]) for i in range(0, len(texts), batch))
    torch.cuda.synchronize()
    wall = time.time() - start
    return {"prompts": len(prompts), "batch_size": batch, "dtype": "bfloat16", "output_tokens": tokens,
            "wall_s": round(wall, 2), "output_tokens_per_s": round(tokens / wall, 1),
            "gpu_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True, help="a gpu_pipeline.py --keep model folder")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=256, help="transformers generate batch size")
    ap.add_argument("--port", type=int, default=23333)
    ap.add_argument("--skip", default="", help="comma list of: server, opencompass, transformers")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    prompts = prompts_of(a.model_dir / "data/split/train.jsonl", a.prompts)
    result: dict = {"model_dir": str(a.model_dir), "max_new_tokens": a.max_new_tokens, "prompts": len(prompts)}
    try:
        import torch
        result["gpu"] = torch.cuda.get_device_name(0)
    except Exception as e:  # noqa: BLE001 (recorded, the server part may still run)
        result["gpu"] = f"unknown ({e})"
    save = lambda: a.out.write_text(json.dumps(result, indent=1))  # noqa: E731
    if "server" not in skip:
        # `tunepipe serve`'s own path: lmdeploy's PyTorch engine on the AWQ artifact where CUDA and
        # lmdeploy are there (stages/serve.py), waited for until /v1/models lists the model
        start = time.time()
        with served(a.model_dir / "models/turbomind", backend="lmdeploy", port=a.port, model_name=MODEL_NAME) as base:
            result["server_startup_s"] = round(time.time() - start, 1)
            result["stream_chunks"] = streamed_chunks(base, prompts[0], 16)
            result["lmdeploy_pytorch_awq"] = server_throughput(base, prompts, a.max_new_tokens)
            print("lmdeploy:", result["lmdeploy_pytorch_awq"], flush=True)
            save()
            if "opencompass" not in skip:
                result["opencompass_through_api"] = opencompass_through_api(
                    base, a.model_dir / "data/split/test.jsonl", a.model_dir / "models/merged",
                    a.out.parent / "oc_api_work", 64)
                print("opencompass:", result["opencompass_through_api"], flush=True)
                save()
    if "transformers" not in skip:
        result["transformers_generate_bf16"] = transformers_throughput(
            a.model_dir / "models/merged", prompts, a.max_new_tokens, a.hf_batch)
        print("transformers:", result["transformers_generate_bf16"], flush=True)
    if "lmdeploy_pytorch_awq" in result and "transformers_generate_bf16" in result:
        result["server_over_transformers"] = round(result["lmdeploy_pytorch_awq"]["output_tokens_per_s"]
                                                   / result["transformers_generate_bf16"]["output_tokens_per_s"], 2)
    save()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
