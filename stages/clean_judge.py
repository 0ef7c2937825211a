"""clean, step 6: an optional LLM judge through any OpenAI-compatible endpoint, each answer cached
by content hash so that a rerun asks only about rows it has not seen."""
from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

from stages.common import Params, StageError, atomic_path, redact_uri

DEFAULT_JUDGE_PROMPT = (
    "You grade training data for a domain assistant. Rate how correct, helpful and safe the "
    "assistant's answer is, from 1 (useless or wrong) to 10 (excellent). Reply with the number only.\n\n"
    "{conversation}")



class Judge(Params):
    enabled: bool = False
    url: str = "http://127.0.0.1:8000/v1"   # any OpenAI-compatible API; /chat/completions is appended
    model: str = ""
    api_key_env: str = "TUNEPIPE_JUDGE_API_KEY"  # the key comes from this environment variable only
    prompt: str = DEFAULT_JUDGE_PROMPT      # {conversation} is replaced by the rendered conversation
    min_score: float = 6.0                  # rows scored below are rejected (judge_low_score)
    max_workers: int = 4
    timeout_s: float = 60.0
    retries: int = 2



def judge_scores(records: list[dict], j: Judge, cache_path: Path, stats: Counter) -> list[float | None]:
    """Scores from an OpenAI-compatible chat endpoint; each answer is cached under the hash of
    (model, prompt, conversation), so a rerun only asks about rows it has not seen."""
    import urllib.error
    import urllib.request

    cache = {}
    if cache_path.exists():
        with open(cache_path, "rb") as f:
            for line in f:
                if line.strip():
                    entry = orjson.loads(line)
                    cache[entry["key"]] = entry
    if not j.model:
        raise StageError("params.yaml: clean.judge.model is empty (the judge is enabled)")
    key_value = os.environ.get(j.api_key_env, "")

    def conversation(r: dict) -> str:
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in r["messages"] if m["role"] != "system")

    keys = [hashlib.sha256(orjson.dumps([j.model, j.prompt, conversation(r)])).hexdigest() for r in records]
    url = j.url.rstrip("/") + "/chat/completions"
    shown = redact_uri(url)  # what errors print: the URL without a password in it

    def ask(key_and_record: tuple[str, dict]) -> dict:
        key, record = key_and_record
        body = orjson.dumps({"model": j.model, "temperature": 0, "max_tokens": 16, "messages": [
            {"role": "user", "content": j.prompt.replace("{conversation}", conversation(record))}]})
        headers = {"Content-Type": "application/json"}
        if key_value:
            headers["Authorization"] = f"Bearer {key_value}"
        for attempt in range(j.retries + 1):
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=j.timeout_s) as response:
                    reply = orjson.loads(response.read())["choices"][0]["message"]["content"] or ""
                break
            except urllib.error.HTTPError as e:
                if attempt == j.retries or e.code not in (429, 500, 502, 503, 504):
                    raise StageError(f"clean.judge: {shown} answered HTTP {e.code} ({e.read()[:200]!r})") from None
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                if attempt == j.retries:
                    raise StageError(f"clean.judge: {shown} unreachable ({getattr(e, 'reason', e)})") from None
            except (KeyError, IndexError, TypeError, orjson.JSONDecodeError):
                raise StageError(f"clean.judge: {shown} did not answer like an OpenAI chat completion") from None
        number = re.search(r"\d+(?:\.\d+)?", reply)
        return {"key": key, "score": float(number[0]) if number else None, "reply": reply[:200]}

    todo = list({k: r for k, r in zip(keys, records) if k not in cache or cache[k]["score"] is None}.items())
    stats["cached"] = sum(k in cache and cache[k]["score"] is not None for k in keys)
    stats["requests"] = len(todo)
    try:
        with ThreadPoolExecutor(max_workers=max(1, j.max_workers)) as pool:
            for entry in pool.map(ask, todo):
                cache[entry["key"]] = entry
    finally:  # what was paid for is kept, even if a later request failed
        with atomic_path(cache_path) as tmp, open(tmp, "wb") as f:
            f.writelines(orjson.dumps(cache[k]) + b"\n" for k in sorted(cache))
    scores = [cache[k]["score"] for k in keys]
    stats["unparseable"] = sum(s is None for s in scores)
    return scores
