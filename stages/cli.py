"""tunepipe: the project's command line (installed by pyproject as `tunepipe`).

  tunepipe chat MODEL [--base BASE] [--system TEXT] [--tools FILE] [-p QUESTION] [--temperature T] [--max-new-tokens N]
  tunepipe serve MODEL [--host 127.0.0.1] [--port 8000] [--backend auto|lmdeploy|transformers]

`chat` and `serve` are front doors onto stages/chat.py and stages/serve.py (their docstrings say
which folders they take and how). The rest of this page is `inspect`:

  tunepipe inspect FILE... [--json] [--format F] [--sheet S] [--encoding E] [--question COL] [--answer COL]
                           [-S section.key=value ...] [--params params.yaml] [--judge]
  tunepipe check-params [--params params.yaml]   (contradictions between sections: stages/params_check.py)

`inspect` runs the pipeline's own ingest and clean code on files outside the pipeline and prints,
per file, the detected container, encoding, format and column mapping, the counts (rows read =
kept + rejected, by reason), three samples and the problems found. Nothing is written (but the
judge's cache, with --judge). The `ingest` and `clean` params of ./params.yaml (or --params) apply,
with the file's own entry in ingest.sources if it has one; flags override them. The LLM judge runs
only with --judge.
Exit status: 0 when every file could be read, 1 when one could not (its error says file, row and
column).

  tunepipe reproduce MODEL@ALIAS | MODEL/VERSION [--into DIR] [--rerun [STAGE]]

checks that a registered model version rebuilds from its git commit, its MLflow run and the DVC
remote (stages/reproduce.py); exit status 0 when every hash matches. --rerun reruns the pipeline
there up to STAGE (default eval) and compares every rewritten out's hash and every score.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import orjson
import yaml
from pydantic import ValidationError

from stages.clean import CleanParams, clean_records
from stages.common import StageError, stage_enabled
from stages.ingest import FORMATS, IngestParams, Source, describe, open_source


def load_sections(path: Path | None, overrides: list[str]) -> tuple[dict, dict]:
    """The ingest and clean sections (plain dicts) of the params file, with -S overrides applied."""
    everything: dict = {}
    if path is None and Path("params.yaml").exists():
        path = Path("params.yaml")
    if path is not None:
        if not path.exists():
            raise StageError(f"{path}: params file not found")
        everything = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    sections = {name: dict(everything.get(name) or {}) for name in ("ingest", "clean")}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or parts[0] not in sections or len(parts) < 2:
            raise StageError(f"-S {item}: expected ingest.KEY=VALUE or clean.KEY=VALUE (e.g. clean.max_chars=4000)")
        node = sections[parts[0]]
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return sections["ingest"], sections["clean"]


def validated(schema, data: dict, section: str):
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise StageError("\n".join(f"{section}.{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                   for err in e.errors())) from None


def source_for(file: str, ingest: dict, args: argparse.Namespace) -> Source:
    """The file's entry in ingest.sources, if it has one, else a plain auto-detecting source;
    then the flags."""
    entry: dict = {"path": file}
    for listed in ingest.get("sources") or []:
        try:
            if isinstance(listed, dict) and os.path.samefile(listed.get("path", ""), file):
                entry = {**listed, "path": file}
                break
        except OSError:
            continue
    flags = {"format": args.format, "sheet": args.sheet, "encoding": args.encoding, "question": args.question,
             "answer": args.answer}
    if args.sheet is not None and args.sheet.isdigit():
        flags["sheet"] = int(args.sheet)
    entry.update({k: v for k, v in flags.items() if v is not None})
    return validated(Source, entry, "source")


def inspect_file(file: str, ingest: dict, clean: CleanParams, args: argparse.Namespace) -> dict:
    src = source_for(file, ingest, args)
    limit = validated(IngestParams, {"sources": [], **{k: v for k, v in ingest.items() if k != "sources"}},
                      "ingest").max_cell_chars
    info, records = open_source(src, limit)
    result = clean_records(records, clean, Path(args.judge_cache) if args.judge else None, args.dpo)
    m = result["metrics"]
    kept = result["kept"]
    picks = sorted({0, len(kept) // 2, len(kept) - 1}) if kept else []
    problems = [{"row": r["source"]["row"], "reason": r["reason"],
                 **({"placeholder": r["placeholder"]} if "placeholder" in r else {}),  # unfilled_placeholder
                 "text": (r["messages"][-1]["content"] if r["messages"] else r.get("text", ""))[:120]}
                for r in result["rejected"]]
    problems.sort(key=lambda x: (x["row"], x["reason"]))
    return {
        "file": file, "container": info["container"], "sheet": info.get("sheet"), "encoding": info["encoding"],
        "format": info["format"], "detected": info["detected"], "mapping": info["mapping"], "unit": info["unit"],
        "rows_read": m["rows_in"], "rows_kept": m["rows_kept"], "rows_rejected": m["rows_rejected"],
        "rejected_by_reason": m["rejected_by_reason"], "blank_rows_skipped": info["blank_rows"],
        "fixes": m["fixes"], "pii_redacted": m["pii_redacted"],
        "conflicting_questions": m["conflicting_questions"], "conflicting_rows": m["conflicting_rows"],
        "lengths": m["lengths"],
        "samples": [{"row": kept[i]["source"]["row"], "messages": kept[i]["messages"],
                     **({"text": kept[i]["text"]} if kept[i].get("text") is not None else {})} for i in picks],
        "problems": problems[:50],
        "conflicts": [{"question": c["question"][:200], "rows": [x["row"] for x in c["rows"]]}
                      for c in result["conflicts"][:10]],
    }


def short(text: str, n: int = 160) -> str:
    text = text.replace("\n", " / ")
    return text if len(text) <= n else text[:n - 1] + "…"


def print_report(r: dict) -> None:
    print(f"== {r['file']}")
    print(f"  detected: {describe(r)}")
    reasons = ", ".join(f"{k} {v}" for k, v in r["rejected_by_reason"].items()) or "none"
    print(f"  rows read {r['rows_read']} = kept {r['rows_kept']} + rejected {r['rows_rejected']} ({reasons})"
          + (f"; {r['blank_rows_skipped']} blank rows skipped" if r["blank_rows_skipped"] else ""))
    if r["fixes"] or r["pii_redacted"]:
        print(f"  fixed: {r['fixes'] or 'nothing'}; PII redacted: {r['pii_redacted'] or 'none'}")
    if r["conflicting_questions"]:
        print(f"  conflicting answers: {r['conflicting_questions']} questions asked {r['conflicting_rows']} times "
              "with different answers (clean.conflicting_answers decides)")
    lengths = r["lengths"]
    print(f"  lengths (chars, p50/p90/max): prompt {'/'.join(map(str, lengths['prompt_chars'].values()))}, "
          f"answer {'/'.join(map(str, lengths['answer_chars'].values()))}")
    if r["problems"]:
        print("  problems:")
        for p in r["problems"][:10]:
            what = f"{p['reason']} {p['placeholder']}" if "placeholder" in p else p["reason"]
            print(f"    {r['unit']} {p['row']}: {what}: {short(p['text'], 100)!r}")
        if r["rows_rejected"] > 10:
            print(f"    ... {r['rows_rejected'] - 10} more (--json lists up to 50)")
    for c in r["conflicts"][:3]:
        print(f"    {r['unit']}s {', '.join(map(str, c['rows']))}: same question, different answers: "
              f"{short(c['question'], 80)!r}")
    print("  samples:")
    for s in r["samples"]:
        body = s.get("text") or " | ".join(f"{m['role']}: {m['content']}" for m in s["messages"])
        print(f"    {r['unit']} {s['row']}: {short(body)}")


def add_chat_parser(sub) -> None:
    from stages import chat

    p = sub.add_parser("chat", help="talk to a model folder (merged, adapter + base, turbomind)",
                       description=chat.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="models/merged, models/adapter, models/turbomind, ...")
    p.add_argument("--base", help="an adapter's base (default: adapter_config.json's base_model_name_or_path)")
    p.add_argument("--system", help="system message at the start of the conversation")
    p.add_argument("--tools", help="a JSON file: the list of tools (functions) offered, as the chat template renders them")
    p.add_argument("-p", "--prompt", help="ask one question, print the answer, exit")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto (cuda when visible, else cpu), cpu, cuda")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda, float32 on cpu), float32, ...")
    p.add_argument("--show-prompt", action="store_true", help="print each rendered prompt to stderr")


def add_serve_parser(sub) -> None:
    from stages import serve

    p = sub.add_parser("serve", help="an OpenAI-compatible server for a model folder",
                       description=serve.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_arguments(p)


def run_model_command(args) -> None:
    """chat / serve: a StageError is one line on stderr and exit status 1."""
    try:
        if args.command == "chat":
            from stages.chat import run_chat

            status = run_chat(args)
        else:
            from stages.serve import run_serve

            status = run_serve(args)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if status:
        sys.exit(status)


def reproduce_doc() -> str:
    from stages import reproduce

    return reproduce.__doc__.split("\n\n", 1)[1]


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    from stages.reproduce import add_arguments

    add_arguments(parser)


def run_reproduce(args: argparse.Namespace) -> int:
    """`tunepipe reproduce`: the verdict's exit status; expected problems in one line."""
    from stages.reproduce import reproduce

    try:
        return reproduce(args)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def check_params_command(path: Path) -> None:
    from stages.params_check import check_params_file

    try:
        check_params_file(path)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{path}: no contradictions between sections")
    sys.exit(0)


def services_doc() -> str:
    from stages import services
    return services.__doc__


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="tunepipe", description="tunepipe's command line")
    sub = ap.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="look at data files before the pipeline reads them",
                         description=__doc__.split("\n\n")[3])
    ins.add_argument("files", nargs="+", metavar="FILE")
    ins.add_argument("--json", action="store_true", help="one JSON object per file, one per line")
    ins.add_argument("--params", type=Path, default=None, help="params file (default ./params.yaml if present)")
    ins.add_argument("--format", choices=("auto", *FORMATS))
    ins.add_argument("--sheet", help="xlsx sheet name or 0-based index")
    ins.add_argument("--encoding", help="csv/json/txt encoding (default auto)")
    ins.add_argument("--question", help="column of the user turn")
    ins.add_argument("--answer", help="column of the assistant turn")
    ins.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a param, e.g. -S clean.near_duplicates.threshold=0.9")
    ins.add_argument("--judge", action="store_true", help="run the LLM judge if clean.judge.enabled")
    ins.add_argument("--judge-cache", default="data/judge/cache.jsonl")
    add_chat_parser(sub)
    add_serve_parser(sub)
    rep = sub.add_parser("reproduce", help="check that a registered model version rebuilds from git, MLflow and the DVC remote",
                         description=reproduce_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reproduce_arguments(rep)
    svc = sub.add_parser("services", help="start, stop or check the shared servers on 127.0.0.1: S3 (moto), "
                         "PostgreSQL, mlflow server", description=services_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    svc.add_argument("action", choices=("start", "stop", "status"))
    svc.add_argument("--dir", type=Path, default=Path(".services"), help="state, logs and env.sh (default .services)")
    chk = sub.add_parser("check-params", help="find contradictions between params.yaml sections (exit 1 if any)")
    chk.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    if args.command == "check-params":
        check_params_command(args.params)
    if args.command in ("chat", "serve"):
        run_model_command(args)
        return
    if args.command == "reproduce":
        sys.exit(run_reproduce(args))
    if args.command == "services":
        from stages.services import run_services
        sys.exit(run_services(args.action, args.dir))

    try:
        ingest, clean_section = load_sections(args.params, args.overrides)
        if not args.judge:
            clean_section["judge"] = {**(clean_section.get("judge") or {}), "enabled": False}
        clean = validated(CleanParams, clean_section, "clean")
        # preference pairs are kept for dpo when it is on, else clean.preference decides
        params_file = args.params or Path("params.yaml")
        args.dpo = params_file.exists() and stage_enabled("dpo", params_file)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    failed = 0
    for file in args.files:
        try:
            report = inspect_file(file, ingest, clean, args)
        except StageError as e:
            failed += 1
            if args.json:
                print(orjson.dumps({"file": file, "error": str(e)}).decode(), flush=True)
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        if args.json:
            print(orjson.dumps(report).decode(), flush=True)
        else:
            print_report(report)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
