"""cpt and dpo stages (stages/cpt.py, stages/dpo.py): the losses on hand-computed values, off = copy,
DPO raising the held-out preference accuracy on a tiny model, CPT changing the weights SFT starts
from, and the DVC chain base -> cpt -> train -> dpo -> merge."""
from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import (COLORS, THINGS, build_tiny_base, color_conversations, folder_md5, run_stage, write_params,
                      write_records)

REPO = Path(__file__).resolve().parents[1]


def test_dpo_loss_exact_for_both_types():
    import torch

    from stages.dpo import dpo_loss

    # log pi(chosen) -1, log pi(rejected) -2, reference -1.5 for both: h = 0.5 - (-0.5) = 1
    args = [torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])]
    loss, chosen, rejected = dpo_loss(*args, beta=0.1, loss_type="sigmoid")
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.1)), abs=1e-7)  # -log sigmoid(0.1 * 1)
    assert chosen.item() == pytest.approx(0.05) and rejected.item() == pytest.approx(-0.05)
    loss, _, _ = dpo_loss(*args, beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx((1 - 1 / (2 * 0.1)) ** 2)  # (h - 1/(2 beta))^2 = 16
    loss, _, _ = dpo_loss(*args, beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx(0.0)  # h = 1 = 1/(2 * 0.5): IPO's target margin reached


def preference_rows(things: range) -> list[dict]:
    """A preference SFT never taught: the same fact ending in "!" (chosen) over ending in "." (rejected,
    what SFT learnt), asked two ways. Learnable from some things, checkable on others (held out)."""
    rows = []
    for i in things:
        answer = f"The {THINGS[i]} is {COLORS[(i * 3) % 8]}"
        for question in ("What color is the {}?", "Tell me the color of the {}."):
            rows.append({"id": f"p{i}-{len(rows)}", "source": {"file": "pairs"},
                         "messages": [{"role": "user", "content": question.format(THINGS[i])},
                                      {"role": "assistant", "content": answer + "!"}],
                         "rejected": {"role": "assistant", "content": answer + "."}})
    return rows


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> Path:
    """A tiny base, cpt (off), a weak SFT adapter, and preference pairs about the same facts."""
    work = tmp_path_factory.mktemp("dpo")
    convs = color_conversations(follow_ups=False)
    build_tiny_base(work / "models/base", convs)
    write_records(work / "data/split/train.jsonl", convs[:20])
    write_records(work / "data/split/val.jsonl", convs[20:])
    (work / "data/split/corpus.jsonl").write_text("".join(
        json.dumps({"id": f"t{i}", "text": f"The {THINGS[i]} is {COLORS[(i * 3) % 8]}. " * 3}) + "\n" for i in range(8)))
    for name, things in (("train", range(6)), ("test", range(6, 8))):  # held out: things DPO never saw
        with open(work / f"data/split/preference_{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in preference_rows(things))
    write_params(work, {"train": {"epochs": 1, "lr": 1e-3, "batch_size": 4, "max_length": 128, "save_every": 0},
                        "dpo": {"epochs": 4, "lr": 5e-3, "batch_size": 4, "beta": 0.1}})
    run_stage(work, "cpt")
    run_stage(work, "train")
    return work


def test_cpt_off_copies_the_base(sft):
    assert folder_md5(sft / "models/sft_base") == folder_md5(sft / "models/base")
    assert json.loads((sft / "metrics/cpt.json").read_text()) == {"enabled": False}


def test_dpo_off_copies_the_sft_adapter(sft):
    run_stage(sft, "dpo", "--out", "models/dpo_off", "--metrics", "metrics/dpo_off.json", "--plot", "plots/dpo_off.csv")
    assert folder_md5(sft / "models/dpo_off") == folder_md5(sft / "models/adapter")
    assert json.loads((sft / "metrics/dpo_off.json").read_text()) == {"enabled": False}


# IPO pulls the log-ratio gap to 1 / (2 beta), no further: SFT's gap for "." is larger than 1 / 0.2
@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("ipo", 0.02)])
def test_dpo_raises_held_out_preference_accuracy(sft, loss_type, beta):
    write_params(sft, {"train": {"epochs": 1, "lr": 1e-3, "batch_size": 4, "max_length": 128},
                       "dpo": {"enabled": True, "epochs": 4, "lr": 5e-3, "batch_size": 4, "beta": beta,
                               "loss_type": loss_type}})
    run_stage(sft, "dpo", "--out", f"models/dpo-{loss_type}", "--metrics", f"metrics/dpo-{loss_type}.json",
              "--plot", f"plots/dpo-{loss_type}.csv")
    m = json.loads((sft / f"metrics/dpo-{loss_type}.json").read_text())
    assert m["enabled"] and m["train_pairs"] == 12 and m["test_pairs"] == 4 and m["steps"] == 12
    # SFT learnt ".", so it prefers every rejected answer; DPO's preference carries over to unseen things
    assert m["test_preference_accuracy_before"] == 0.0 and m["test_preference_accuracy_after"] == 1.0, m
    lines = (sft / f"plots/dpo-{loss_type}.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,loss,reward_accuracy,reward_margin,chosen_reward,rejected_reward" and len(lines) == 13
    assert folder_md5(sft / f"models/dpo-{loss_type}") != folder_md5(sft / "models/adapter")
    # merge takes this adapter on the weights it was trained on
    run_stage(sft, "merge", "--adapter", f"models/dpo-{loss_type}", "--out", f"models/merged-{loss_type}",
              "--metrics", f"metrics/merge-{loss_type}.json")
    assert json.loads((sft / f"metrics/merge-{loss_type}.json").read_text())["max_abs_logit_diff"] < 1e-3


def test_cpt_on_changes_the_weights_sft_starts_from(sft, tmp_path):
    import torch
    from safetensors.torch import load_file

    for rel in ("models/base", "data/split"):
        shutil.copytree(sft / rel, tmp_path / rel)
    write_params(tmp_path, {"cpt": {"enabled": True, "epochs": 2, "lr": 3e-3, "batch_size": 4, "max_length": 64},
                            "train": {"epochs": 1, "batch_size": 4, "max_length": 128, "save_every": 0}})
    run_stage(tmp_path, "cpt")
    m = json.loads((tmp_path / "metrics/cpt.json").read_text())
    assert m["enabled"] and m["documents"] == 8 and m["steps"] == 4 and m["tokens"] > 0 and m["tokens_per_s"] > 0
    assert m["loss_final"] < m["loss_first"]
    base = load_file(tmp_path / "models/base/model.safetensors")
    cpt = load_file(tmp_path / "models/sft_base/model.safetensors")
    assert base.keys() == cpt.keys() and any(not torch.equal(base[k], cpt[k]) for k in base)
    run_stage(tmp_path, "train")  # SFT loads models/sft_base: its starting loss is the CPT model's
    train = json.loads((tmp_path / "metrics/train.json").read_text())
    assert train["val_loss_before"] != json.loads((sft / "metrics/train.json").read_text())["val_loss_before"]


def test_dvc_chain_runs_cpt_train_dpo_merge_in_order(tmp_path):
    """The stage graph dvc builds from dvc.yaml: merge sees the base only through cpt's sft_base and
    the SFT adapter only through dpo's dpo_adapter, so DVC runs base -> cpt -> train -> dpo -> merge."""
    import graphlib

    dvc = REPO / ".venvs/core/bin/dvc"
    if not dvc.exists():
        pytest.skip(".venvs/core has no dvc")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(dvc), "init", "-q"], cwd=tmp_path, check=True)
    dot = subprocess.run([str(dvc), "dag", "--dot", "register"], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout
    edges = {tuple(part.strip().strip('";') for part in line.split("->")) for line in dot.splitlines() if "->" in line}
    assert {("base", "cpt"), ("cpt", "train"), ("train", "dpo"), ("dpo", "merge"), ("cpt", "merge")} <= edges
    assert not {("base", "train"), ("base", "merge"), ("train", "merge"), ("base", "register")} & edges
    graph = graphlib.TopologicalSorter()
    for a, b in edges:
        graph.add(b, a)
    order = [s for s in graph.static_order() if s in ("base", "cpt", "train", "dpo", "merge")]
    assert order == ["base", "cpt", "train", "dpo", "merge"]


def test_demo_chain_with_cpt_and_dpo_raises_held_out_preference_accuracy(tmp_path):
    """The demo itself, as `dvc exp run -S cpt.enabled=true -S dpo.enabled=true` runs it (the tests'
    fast base and SFT, the repo's cpt and dpo sections): demo_data's preference pairs, held out by
    split, are preferred more often after DPO than by the SFT model, and the metrics say how."""
    write_params(tmp_path, {"cpt": {"enabled": True}, "dpo": {"enabled": True}})
    for stage in ("demo_data", "ingest", "clean", "split", "base", "cpt", "train", "dpo"):
        run_stage(tmp_path, stage)
    cpt = json.loads((tmp_path / "metrics/cpt.json").read_text())
    assert cpt["enabled"] and cpt["documents"] == 60 and cpt["loss_final"] < cpt["loss_first"]
    m = json.loads((tmp_path / "metrics/dpo.json").read_text())
    # 120 demo pairs, a tenth of the prompts held out
    assert (m["train_pairs"], m["test_pairs"]) == (108, 12)
    # terse answers to quick questions: SFT prefers some held-out chosen answers (they are short), DPO all
    assert m["test_preference_accuracy_before"] < 0.75 and m["test_preference_accuracy_after"] == 1.0, m
    with open(tmp_path / "plots/dpo_steps.csv", newline="") as f:
        curve = list(csv.DictReader(f))
    assert len(curve) == m["steps"] and {"reward_accuracy", "reward_margin"} <= set(curve[0])
    # DPO's implicit reward separates the train pairs more by the last epoch than in the first
    by_epoch = {}
    for row in curve:
        by_epoch.setdefault(row["epoch"], []).append(float(row["reward_margin"]))
    first, last = by_epoch[curve[0]["epoch"]], by_epoch[curve[-1]["epoch"]]
    assert sum(last) / len(last) > sum(first) / len(first), by_epoch
    assert {"reward_accuracy_final", "reward_margin_final"} <= set(m)
