"""Throughput of the data stages (ingest + clean + split) on a 100k-row xlsx and a 1M-row jsonl.

    .venvs/core/bin/python benchmarks/data_throughput.py [--xlsx-rows 100000] [--jsonl-rows 1000000]

Rows are drawn from the distributions of ../shared/data (MedInfo2019 questions and answers, the
Chinese medical dialogues, MedicalGPT's ShareGPT conversations): each row combines a real question
with a patient context and a real answer with a sentence of another answer, so lengths and
scripts are the real ones and rows are mostly distinct; 5% exact duplicates, 2% near-duplicates,
1% placeholder answers and 0.5% empty answers are mixed in, as real exports have them.

The stages run as `dvc repro` runs them (`python -m stages.NAME`, one fresh process each, with
params.yaml's clean rules, files in and out), in a temporary folder. Next to them, in the same run, the tutorial-style baseline:
pandas read (read_excel / read_json) + iterrows + json.dump per row. An untimed warm-up on 2,000
rows first (numba compiles clean's kernels once per checkout), and beside each figure the fixed
costs no stage code saves (interpreter start with imports, reading the input alone, near-duplicates'
MinHash signatures alone): their sum is the most rows/s any stage code could reach. A benchmark,
not a test: it prints figures and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

CONTEXTS = ["", "", "我今年{a}岁，", "孩子{a}个月大，", "My mother is {a} and ", "I am {a} years old; ", "老人{a}岁了，",
            "患者男，{a}岁，", "患者女，{a}岁，", "Quick question: "]


def pools() -> tuple[list[tuple[str, str]], list[str]]:
    """(question, answer) pairs and answer sentences from the shared data."""
    import csv

    from python_calamine import CalamineWorkbook

    pairs = []
    rows = CalamineWorkbook.from_path(str(SHARED / "medication_qa/MedInfo2019-QA-Medications.xlsx")) \
        .get_sheet_by_name("DrugQA").to_python()
    pairs += [(str(r[0]), str(r[3])) for r in rows[1:] if r[0] and r[3]]
    with open(SHARED / "chinese_medical_dialogue/neike_5000_6000_gb18030.csv", encoding="gb18030", newline="") as f:
        pairs += [(r["ask"], r["answer"]) for r in csv.DictReader(f)]
    with open(SHARED / "medicalgpt/medical_sft_1K_format.jsonl", encoding="utf-8") as f:
        for line in f:
            turns = json.loads(line)["conversations"]
            pairs.append((turns[0]["value"], turns[1]["value"]))
    sentences = [s + "。" for _, a in pairs for s in a.split("。") if 8 < len(s) < 120]
    return pairs, sentences


def rows(n: int, seed: int) -> list[tuple[str, str, str]]:
    """n (question, answer, department) rows with realistic problems mixed in."""
    rng = random.Random(seed)
    pairs, sentences = pools()
    out: list[tuple[str, str, str]] = []
    for i in range(n):
        roll = rng.random()
        if out and roll < 0.05:
            out.append(out[rng.randrange(len(out))])            # exact duplicate
            continue
        if out and roll < 0.07:
            q, a, d = out[rng.randrange(len(out))]               # near-duplicate: one word more
            out.append((q, a + rng.choice(["", "谢谢。", " Thanks."]) + "。", d))
            continue
        q, a = pairs[rng.randrange(len(pairs))]
        q = rng.choice(CONTEXTS).format(a=rng.randint(1, 90)) + q
        a = a + " " + rng.choice(sentences) + f"（{i}）"
        if roll < 0.08:
            a = rng.choice(["No answers", "Unanswerable", "无"])
        elif roll < 0.085:
            a = ""
        out.append((q, a, rng.choice(["内科", "肝病科", "Pharmacy", "消化科"])))
    return out


def write_xlsx(path: Path, data: list[tuple[str, str, str]]) -> None:
    """As Excel and WPS save a workbook: text in the shared-strings table, UTF-8 (xlsxwriter writes
    that layout; openpyxl's write-only mode writes every cell inline with each CJK character as a
    "&#NNNNN;" reference, a 5x larger file that no office program produces)."""
    import xlsxwriter

    wb = xlsxwriter.Workbook(str(path), {"strings_to_numbers": False, "strings_to_formulas": False,
                                         "strings_to_urls": False})
    ws = wb.add_worksheet("QA")
    ws.write_row(0, 0, ["Question", "Answer", "Department"])
    for row, values in enumerate(data, start=1):
        ws.write_row(row, 0, values)
    wb.close()


def write_jsonl(path: Path, data: list[tuple[str, str, str]]) -> None:
    with open(path, "wb") as f:
        for q, a, d in data:
            f.write(orjson.dumps({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
                                  "department": d}) + b"\n")


def run_stages(folder: Path, source: dict, near_duplicates: bool = True) -> dict:
    """ingest, clean, split as dvc runs them (`python -m stages.NAME` in a fresh process each, imports
    included); seconds per stage and the last line each printed."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["sources"] = [source]
    params["clean"]["near_duplicates"]["enabled"] = near_duplicates
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    timings, printed = {}, {}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for stage in ("ingest", "clean", "split"):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=folder, env=env, capture_output=True,
                              text=True)
        timings[stage] = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"{stage} failed:\n{done.stdout}{done.stderr}")
        printed[stage] = done.stdout.strip().splitlines()[-1]
    return {"seconds": timings, "printed": printed,
            "clean": json.loads((folder / "metrics/clean.json").read_text()),
            "split": json.loads((folder / "metrics/split.json").read_text())}


def write_near_duplicate_texts(path: Path, data: list[tuple[str, str, str]]) -> None:
    """The texts near-duplicates compare (question and answer), for the MinHash part of the floor:
    written once, so the timed runs don't share the machine with a million Python strings."""
    import pyarrow as pa
    import pyarrow.feather as feather

    texts = pa.array((f"{q}\n{a}" for q, a, _ in data), pa.large_string())
    feather.write_feather(pa.table({"text": texts}), path, compression="uncompressed")


MINHASH_ALONE = """if True:
    import sys, time, yaml, pyarrow.feather as feather
    from stages.clean_dedup import minhash_signatures
    nd = yaml.safe_load(open("params.yaml"))["clean"]["near_duplicates"]
    texts = feather.read_table(sys.argv[1], memory_map=True)["text"].combine_chunks()[:int(sys.argv[2])]
    start = time.perf_counter()
    minhash_signatures(texts[:100], nd["ngram"], nd["num_perm"], nd["seed"])
    loaded = time.perf_counter()
    minhash_signatures(texts, nd["ngram"], nd["num_perm"], nd["seed"])
    print(loaded - start, time.perf_counter() - loaded)
"""


def fixed_costs(path: Path, rows: int, near_duplicate_texts: Path | None) -> dict:
    """What no stage code can save: a fresh interpreter importing each stage (three processes, as
    dvc runs them), reading the input file alone (python-calamine for a workbook, Arrow's
    multi-threaded reader for JSON lines) and, where near_duplicate_texts is given, clean's MinHash
    signatures of the first `rows` of them alone (params.yaml's settings, both cores) in a fresh
    process: loading the compiled kernel from numba's cache (with datasketch, which gives the
    permutations), then the signatures. That is the part of the near-duplicate step no LSH or
    exact check can save, as long as near-duplicates are MinHash."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    imports = {}
    for stage in ("ingest", "clean", "split"):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import stages.{stage}"], env=env, check=True)
        imports[stage] = time.perf_counter() - start
    start = time.perf_counter()
    if path.suffix == ".xlsx":
        from python_calamine import CalamineWorkbook

        CalamineWorkbook.from_path(str(path)).get_sheet_by_index(0).to_python()
    else:
        import pyarrow as pa
        import pyarrow.json as pj

        pj.read_json(path, read_options=pj.ReadOptions(block_size=16 << 20))
        pa.default_memory_pool().release_unused()
    costs = {"imports": imports, "read_input": time.perf_counter() - start}
    if near_duplicate_texts is not None:
        done = subprocess.run([sys.executable, "-c", MINHASH_ALONE, str(near_duplicate_texts), str(rows)], cwd=REPO,
                              env=env, capture_output=True, text=True, check=True)
        load, signatures = map(float, done.stdout.split())
        costs["minhash"] = {"load": load, "signatures": signatures}
    return costs


def baseline(path: Path, out: Path, limit: int | None = None) -> tuple[int, float]:
    """The tutorial way: pandas read + iterrows + json.dump per row."""
    import pandas as pd

    start = time.perf_counter()
    if path.suffix == ".xlsx":
        df = pd.read_excel(path, engine="openpyxl")
    else:
        df = pd.read_json(path, lines=True, nrows=limit)
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for _, row in df.iterrows():
            if path.suffix == ".xlsx":
                messages = [{"role": "user", "content": str(row["Question"])},
                            {"role": "assistant", "content": str(row["Answer"])}]
            else:
                messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                            for t in row["conversations"]]
            json.dump({"messages": messages}, f, ensure_ascii=False)
            f.write("\n")
            n += 1
    return n, time.perf_counter() - start


def report(name: str, n: int, result: dict, base: tuple[int, float], target: int, fixed: dict) -> None:
    s = result["seconds"]
    total = sum(s.values())
    base_rate = base[0] / base[1]
    print(f"\n{name}: {n:,} rows")
    for stage, seconds in s.items():
        print(f"  {stage:<7} {seconds:7.1f} s  {n / seconds:>10,.0f} rows/s   {result['printed'][stage][:150]}")
    print(f"  ingest+clean+split: {total:.1f} s = {n / total:,.0f} rows/s (target {target:,})")
    imports = sum(fixed["imports"].values())
    floor = imports + fixed["read_input"]
    print(f"  fixed costs: starting the 3 stages' interpreters with their imports {imports:.1f} s "
          f"{ {k: round(v, 2) for k, v in fixed['imports'].items()} }, reading the input alone {fixed['read_input']:.1f} s"
          f" -> {floor:.1f} s = {n / floor:,.0f} rows/s before any work")
    if "minhash" in fixed:
        floor += sum(fixed["minhash"].values())
        print(f"  + near-duplicates' MinHash alone: loading the compiled kernel {fixed['minhash']['load']:.2f} s, "
              f"the signatures {fixed['minhash']['signatures']:.2f} s -> {floor:.1f} s = {n / floor:,.0f} rows/s "
              f"at most, before any conversion, check, key, split or write")
    print(f"  baseline (pandas + iterrows + json.dump, {base[0]:,} rows): {base[1]:.1f} s = {base_rate:,.0f} rows/s"
          f" -> pipeline {n / total / base_rate:.1f}x")
    c = result["clean"]
    print(f"  clean: kept {c['rows_kept']:,} + rejected {c['rows_rejected']:,} = {c['rows_in']:,} "
          f"{c['rejected_by_reason']}; split leakage {result['split']['leakage_rows']}")
    print(f"  load average (1, 5 min) after this run: {os.getloadavg()[0]:.2f}, {os.getloadavg()[1]:.2f} "
          f"on {os.cpu_count()} CPUs (other processes slow every figure above)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--xlsx-rows", type=int, default=100_000)
    ap.add_argument("--jsonl-rows", type=int, default=1_000_000)
    ap.add_argument("--baseline-jsonl-rows", type=int, default=100_000, help="iterrows on 1M rows takes minutes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--without-near-duplicates", action="store_true", help="clean.near_duplicates.enabled: false")
    ap.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is absent: the benchmark draws its rows from the shared data sets")

    with tempfile.TemporaryDirectory(prefix="tunepipe-bench-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        data = rows(max(args.xlsx_rows, args.jsonl_rows), args.seed)
        write_xlsx(tmp / "qa.xlsx", data[:args.xlsx_rows])
        write_jsonl(tmp / "chat.jsonl", data[:args.jsonl_rows])
        print(f"built {tmp / 'qa.xlsx'} ({args.xlsx_rows:,} rows, {(tmp / 'qa.xlsx').stat().st_size / 1e6:.1f} MB) and "
              f"chat.jsonl ({args.jsonl_rows:,} rows, {(tmp / 'chat.jsonl').stat().st_size / 1e6:.0f} MB) "
              f"in {time.perf_counter() - start:.0f} s; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        near_duplicate_texts = None if args.without_near_duplicates else tmp / "near-duplicate-texts.arrow"
        if near_duplicate_texts:
            write_near_duplicate_texts(near_duplicate_texts, data)
        del data

        figures = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                   "near_duplicates": not args.without_near_duplicates}
        # numba compiles clean's kernels once per checkout (cached in stages/__pycache__): not timed
        warm_up = tmp / "warm-up"
        warm_up.mkdir()
        write_jsonl(warm_up / "sample.jsonl", rows(2_000, args.seed + 1))
        start = time.perf_counter()
        run_stages(warm_up, {"path": str(warm_up / "sample.jsonl")}, not args.without_near_duplicates)
        print(f"warm-up on 2,000 rows (compiles clean's numba kernels where not cached yet): {time.perf_counter() - start:.1f} s")
        for name, file, source, target, limit, n_rows in (
                ("xlsx", "qa.xlsx", {"path": str(tmp / "qa.xlsx")}, 50_000, None, args.xlsx_rows),
                ("jsonl", "chat.jsonl", {"path": str(tmp / "chat.jsonl")}, 80_000, args.baseline_jsonl_rows,
                 args.jsonl_rows)):
            base = baseline(tmp / file, tmp / f"baseline-{name}.jsonl", limit)
            folder = tmp / f"run-{name}"
            folder.mkdir()
            result = run_stages(folder, source, not args.without_near_duplicates)
            fixed = fixed_costs(tmp / file, n_rows, near_duplicate_texts)
            n = result["clean"]["rows_in"]
            report(name, n, result, base, target, fixed)
            figures[name] = {"rows": n, "seconds": {k: round(v, 2) for k, v in result["seconds"].items()},
                             "rows_per_s": round(n / sum(result["seconds"].values())), "target_rows_per_s": target,
                             "baseline_rows_per_s": round(base[0] / base[1]), "clean_printed": result["printed"]["clean"],
                             "fixed_costs_s": {"imports": {k: round(v, 2) for k, v in fixed["imports"].items()},
                                               "read_input": round(fixed["read_input"], 2),
                                               **({"minhash": {k: round(v, 2) for k, v in fixed["minhash"].items()}}
                                                  if "minhash" in fixed else {})},
                             "load_average": round(os.getloadavg()[0], 2)}
        if args.out:
            args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
