"""eval's quantized model scored through the engine that serves it (eval.quantized_via).

- server: `tunepipe serve models/turbomind` (stages/serve.py: lmdeploy's PyTorch engine on the AWQ
  weights where CUDA and lmdeploy are; elsewhere transformers' server over the dequantized weights)
  runs on a free 127.0.0.1 port while OpenCompass scores it through the OpenAI-compatible API
  (opencompass.models.OpenAI, temperature 0 = greedy), as users will query it. Scored as
  `turbomind_w4a16_served`; eval/summary.json's notes name the backend.
- dequantized: the labelled CPU fallback, `turbomind_w4a16_dequant`: the W4A16 weights dequantized
  and run by transformers inside OpenCompass (stages/eval.py dequantize_awq).
- auto: server when serve would pick lmdeploy, else dequantized.

An API model gives OpenCompass no logits to rank the options by, so with eval.mcq.mode ppl the
served model is left out of the mcq set (summary.json says so); eval.mcq.mode gen scores it.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from stages import serve

SERVED_ABBR = "turbomind_w4a16_served"
SERVED_NAME = "turbomind"                     # the model's name in API requests
CORE_PYTHON = Path(__file__).resolve().parents[1] / ".venvs" / "core" / "bin" / "python"

API_ENTRY = '''
    dict(  # served by `tunepipe serve` while the eval stage ran ({backend}); rerunning this config by
           # hand needs `tunepipe serve models/turbomind --model-name {name} --port {port}` running
        # OpenAI, not OpenAISDK: the SDK class raises on an answer with no content (a model that stops
        # at once, or whose tokens decode to nothing), which failed the whole stage; this one scores it ''
        type='opencompass.models.OpenAI',
        abbr={abbr!r},
        path={name!r},
        key='EMPTY',
        openai_api_base={api!r},
        tokenizer_path={tokenizer_path},
        temperature=0.0,  # greedy; the server stops at the stop tokens in the folder's generation_config.json
        meta_template=_chat_meta_template,
        max_seq_len={max_seq_len},
        max_out_len={max_new_tokens},
        batch_size={batch_size},
        query_per_second={batch_size},
        retry=2,
    ),'''


def server_backend(setting: str) -> str | None:
    """The backend `tunepipe serve` runs the artifact with for eval.quantized_via `setting`, or None
    for the dequantized fallback. Picked once here and passed to the server, so the label is its choice."""
    if setting == "dequantized":
        return None
    backend = serve.pick_backend("auto")[0]
    return backend if setting == "server" or backend == "lmdeploy" else None


def serve_command(artifact: Path, port: int, backend: str) -> list[str]:
    """`tunepipe serve ARTIFACT` (as `python -m stages.serve`, without the other commands' imports),
    in the environment that has its server (core; on a machine without .venvs, as the GPU
    benchmark runs, this interpreter)."""
    python = str(CORE_PYTHON) if CORE_PYTHON.exists() else sys.executable
    return [python, "-m", "stages.serve", str(artifact.resolve()), "--host", "127.0.0.1", "--port", str(port),
            "--model-name", SERVED_NAME, "--backend", backend]


@contextlib.contextmanager
def quantized_server(artifact: Path, backend: str) -> Iterator[dict]:
    """Start `tunepipe serve ARTIFACT --backend BACKEND`, wait until it lists the model, yield the model
    entry for the OpenCompass config (abbr, api, port, backend), stop the server (its process group) on exit."""
    port = serve.free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    with tempfile.TemporaryDirectory(prefix="tunepipe-eval-serve-") as logs:
        log = Path(logs) / "server.log"
        repo = str(Path(__file__).resolve().parents[1])
        with open(log, "wb") as sink:
            proc = subprocess.Popen(serve_command(artifact, port, backend), cwd=repo, stdout=sink, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            print(f"eval: serving {artifact} with {backend} at {base_url}", flush=True)
            serve.wait_until_listed(proc, base_url, SERVED_NAME, 900 if backend == "lmdeploy" else 300, log)
            yield {"abbr": SERVED_ABBR, "api": base_url + "/chat/completions", "port": port, "backend": backend,
                   "path": SERVED_NAME}
        finally:
            serve.stop(proc)


def api_entry(m: dict, tokenizer_path: str, max_seq_len: int | None, max_new_tokens: int, batch_size: int) -> str:
    return API_ENTRY.format(backend=m["backend"], name=m["path"], port=m["port"], abbr=m["abbr"], api=m["api"],
                            tokenizer_path=tokenizer_path, max_seq_len=max_seq_len or 4096,
                            max_new_tokens=max_new_tokens, batch_size=batch_size)


def note(m: dict) -> dict:
    engine = ("lmdeploy's PyTorch engine on the W4A16 AWQ weights" if m["backend"] == "lmdeploy"
              else "transformers serve on the dequantized W4A16 weights (no lmdeploy engine here)")
    return {"served_by": m["backend"], "command": "tunepipe serve models/turbomind",
            "note": f"Scored through the OpenAI-compatible API of {engine}."}
