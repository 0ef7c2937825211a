"""tunepipe chat: talk to a model folder the pipeline wrote, in the terminal or one question at a time.

    tunepipe chat models/merged                       # multi-turn; /reset clears the history, /exit quits
    tunepipe chat models/adapter --base models/base   # an adapter on its base (default: adapter_config.json's)
    tunepipe chat models/turbomind -p "question"      # one-shot: the answer on stdout, for scripts

MODEL is one of the folders the pipeline writes:
- a Hugging Face model folder (models/merged, the demo's models/base, an uploaded model), loaded as is;
- a LoRA adapter folder (models/adapter), applied with peft to its base: --base, else the adapter's
  adapter_config.json `base_model_name_or_path`; a pipeline base folder (one with manifest.json)
  resolves to the model its manifest names, as in every stage;
- the W4A16 AWQ artifact (models/turbomind): its int4 weights dequantized into a transformers model
  the way the eval stage's CPU fallback does it (stages.eval.dequantize_awq): the quantized weights,
  run by transformers, not TurboMind's kernels (`tunepipe serve` runs those on a GPU).

Prompts are rendered with the model's own chat template (`tokenizer.apply_chat_template`, the
pipeline's one template; with --tools FILE, a JSON list of function definitions, the template
renders them as in training: stages/chat_template.py `render_chat`) and generation stops at the
stop tokens in the folder's generation_config.json (the merge stage writes the template's
end-of-turn token there), or for an adapter at the template's end-of-turn token
(stages.chat_template.stop_token_ids), as merge would write it. Greedy decoding unless --temperature > 0. The answer streams as it is generated.
"""
from __future__ import annotations

import json
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from stages.chat_template import render_chat, renders_tools, stop_token_ids
from stages.common import StageError, pick_device, pick_dtype, resolve_base
from stages.remote_code import load_kwargs


@dataclass
class ChatModel:
    model: Any
    tokenizer: Any
    stop_ids: list[int]
    kind: str                      # "hf", "adapter" or "awq"
    source: str                    # what was loaded, for the banner
    keep: list = field(default_factory=list)  # temporary folders that must outlive the model


@dataclass
class Reply:
    text: str
    tokens: int                    # generated tokens, the stop token included
    finish: str                    # "stop" (a stop token) or "length" (--max-new-tokens reached)


# --- load ---------------------------------------------------------------------------------------

def model_kind(folder: Path) -> str:
    """What kind of pipeline folder this is: "adapter", "awq" or "hf"."""
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    config = folder / "config.json"
    if not config.is_file():
        raise StageError(f"{folder}: neither a model folder (config.json) nor an adapter folder (adapter_config.json)")
    quant = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
    return "awq" if quant.get("quant_method") == "awq" else "hf"


def adapter_base(adapter: Path, base: str | Path | None) -> tuple[str, dict]:
    """(path or hub id, from_pretrained kwargs) of the base an adapter applies to."""
    if base is None:
        base = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise StageError(f"{adapter}/adapter_config.json: no base_model_name_or_path; name the base with --base")
    if (Path(base) / "manifest.json").is_file():      # the base stage's out: the model its manifest names
        return resolve_base(base)
    if Path(base).is_dir():
        return str(base), load_kwargs(base)
    return str(base), {}   # not a folder here: a Hugging Face id (from_pretrained says if it cannot get it)


def stop_ids_for(folder: Path, tokenizer) -> list[int]:
    """The folder's generation_config.json eos_token_id (what merge writes: the template's
    end-of-turn token, then the tokenizer's eos); else the template's own, found as merge finds it."""
    config = folder / "generation_config.json"
    if config.is_file():
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id")
        if eos is not None:
            return eos if isinstance(eos, list) else [eos]
    return stop_token_ids(tokenizer)


def load_chat_model(folder: str | Path, base: str | Path | None = None, device: str = "auto",
                    dtype: str = "auto") -> ChatModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise StageError(f"{folder}: not found")
    device = pick_device(device)
    torch_dtype = getattr(torch, pick_dtype(dtype, device))
    kind, keep = model_kind(folder), []
    if kind == "adapter":
        from peft import PeftModel

        path, load = adapter_base(folder, base)
        tokenizer_dir = folder if (folder / "tokenizer_config.json").is_file() else path  # train saves it there
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, **load)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=device, **load)
        model = PeftModel.from_pretrained(model, str(folder))
        source = f"adapter {folder} on base {path}"
    else:
        weights = folder
        if kind == "awq":
            weights = dequantized(folder, str(torch_dtype).removeprefix("torch."), keep)
        tokenizer = AutoTokenizer.from_pretrained(folder, **load_kwargs(folder))
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch_dtype, device_map=device,
                                                     **load_kwargs(folder))
        source = f"{folder}" + (" (AWQ int4 weights dequantized, run by transformers)" if kind == "awq" else "")
    return ChatModel(model.eval(), tokenizer, stop_ids_for(folder, tokenizer), kind, source, keep)


def dequantized(folder: Path, dtype: str, keep: list) -> Path:
    """The AWQ artifact as a plain HF model in a temporary folder (kept alive in `keep`), written
    by the eval stage's own CPU fallback."""
    from stages.eval import dequantize_awq

    tmp = tempfile.TemporaryDirectory(prefix="tunepipe-awq-")
    keep.append(tmp)
    out = Path(tmp.name) / folder.name
    dequantize_awq(folder, out, dtype)
    return out


# --- generate -----------------------------------------------------------------------------------

def prompt_text(cm: ChatModel, messages: list[dict], tools: list | None = None) -> str:
    """The prompt as training rendered it: the model's chat template, with the tools offered."""
    return render_chat(cm.tokenizer, messages, tools, add_generation_prompt=True)


def generate_reply(cm: ChatModel, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
                   on_text: Callable[[str], None] | None = None, tools: list | None = None) -> Reply:
    """The model's next assistant turn after `messages`, streamed piece by piece to `on_text`."""
    import torch
    from transformers import TextIteratorStreamer

    batch = cm.tokenizer(prompt_text(cm, messages, tools), return_tensors="pt", add_special_tokens=False)
    batch = batch.to(cm.model.device)
    streamer = TextIteratorStreamer(cm.tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    pad = cm.tokenizer.pad_token_id if cm.tokenizer.pad_token_id is not None else cm.stop_ids[0]
    result: dict = {}

    def run() -> None:
        try:
            with torch.no_grad():
                result["ids"] = cm.model.generate(**batch, streamer=streamer, max_new_tokens=max_new_tokens,
                                                  eos_token_id=cm.stop_ids, pad_token_id=pad, **sampling)
        except BaseException as e:  # shown in the caller's thread
            result["error"] = e
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        if on_text:
            on_text(piece)
    worker.join()
    if "error" in result:
        raise result["error"]
    new = result["ids"][0, batch["input_ids"].shape[1]:].tolist()
    finish = "stop" if new and new[-1] in cm.stop_ids else "length"
    return Reply("".join(pieces), len(new), finish)


# --- the front door (stages/cli.py parses the arguments) ------------------------------------------

def load_tools(path: str) -> list[dict]:
    """--tools: a JSON list of function definitions (bare, or OpenAI's {"type": "function", ...})."""
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StageError(f"--tools {path}: cannot read a JSON list of tools ({e})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise StageError(f"--tools {path}: expected a JSON list of tool (function) definitions")
    return tools


def run_chat(args, stdin: TextIO | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    cm = load_chat_model(args.model, args.base, args.device, args.dtype)
    tools = load_tools(args.tools) if getattr(args, "tools", None) else None
    if tools and not renders_tools(cm.tokenizer):
        raise StageError(f"{args.model}: its chat template does not render tools (--tools): stages/chat_template.py "
                         "lists the templates that do")
    history = [{"role": "system", "content": args.system}] if args.system else []

    def answer(question: str) -> Reply:
        messages = [*history, {"role": "user", "content": question}]
        if args.show_prompt:
            print(f"--- prompt ---\n{prompt_text(cm, messages, tools)}\n--------------", file=err, flush=True)
        reply = generate_reply(cm, messages, args.max_new_tokens, args.temperature,
                               on_text=lambda piece: (out.write(piece), out.flush()), tools=tools)
        out.write("\n")
        out.flush()
        if reply.finish == "length":
            print(f"[cut at --max-new-tokens {args.max_new_tokens}]", file=err, flush=True)
        history.extend([{"role": "user", "content": question}, {"role": "assistant", "content": reply.text}])
        return reply

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    interactive = stdin.isatty()
    if interactive:
        print(f"{cm.source}\nstops at {cm.tokenizer.convert_ids_to_tokens(cm.stop_ids)}; "
              "/reset clears the conversation, /exit or Ctrl-D quits", file=err, flush=True)
    while True:
        if interactive:
            err.write(">>> ")
            err.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        question = line.rstrip("\n")
        if question.strip() == "/reset":
            del history[1 if args.system else 0:]
            continue
        if question.strip():
            answer(question)
