"""dpo: Direct Preference Optimization of the SFT adapter on preference pairs (off by default).

Always in the chain (train -> dpo -> merge): with dpo.enabled false it writes models/dpo_adapter as a
copy of models/adapter, so merge always takes the last adapter in the chain. With dpo.enabled true:
- the policy is the SFT model: the SFT adapter (models/adapter) on its base (models/sft_base), the
  adapter trained further; the reference is the SFT model frozen, whose log-probabilities of every
  pair are computed once before training (the reference never changes, so nothing is kept of it);
- pairs come from split's preference_{train,test}.jsonl: messages ending with the chosen answer and
  `rejected`, the other answer to the same prompt. Both are tokenized with the base model's chat
  template (stages/chat_template.py); a sequence's log-probability is the sum over its answer tokens,
  counted from the first token where chosen and rejected differ (the shared prompt cancels);
- the loss is DPO's (loss_type sigmoid) or IPO's (loss_type ipo), see dpo_loss;
- metrics: reward accuracy and margin per step (plots/dpo_steps.csv) and the held-out preference
  accuracy (the share of test pairs whose chosen answer the model finds more likely than the
  rejected one) before and after (metrics/dpo.json).
"""
from __future__ import annotations

import argparse
import csv
import random
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from stages.chat_template import IGNORE, TemplateError, tokenize_conversation
from stages.common import (Params, StageError, atomic_path, load_params, read_jsonl, resolve_base,
                           run_stage, write_json)


class DpoParams(Params):
    enabled: bool = False
    beta: float = Field(0.1, gt=0)     # strength of the pull towards the reference (DPO's beta, IPO's tau)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    lr: float = Field(5e-4, gt=0)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(4, ge=1)   # pairs per optimizer step
    max_length: int = 512              # tokens of each of chosen and rejected
    seed: int = 0


PLOT_FIELDS = ["step", "epoch", "loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"]


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, loss_type: str):
    """Per-pair loss, and the implicit rewards beta * (log pi - log pi_ref) of chosen and rejected.
    Inputs: summed log-probabilities of each answer, shape (pairs,).
    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), then
    sigmoid: -log sigmoid(beta * h)      (Rafailov et al. 2023, DPO, eq. 7)
    ipo:     (h - 1 / (2 * beta)) ** 2   (Azar et al. 2023, IPO, eq. 17; tau = beta)."""
    import torch.nn.functional as F

    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise StageError(f"dpo.loss_type: {loss_type!r} is not sigmoid or ipo")
    return loss, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def load_pairs(path: str, tokenizer, max_length: int) -> list[dict]:
    """Each preference row as two tokenized sequences whose labels cover only the answers' own tokens."""
    if not Path(path).exists():
        raise StageError(f"{path}: not found (run the split stage)")
    from stages.train import end_of_turn_id

    stop_id = end_of_turn_id(tokenizer)
    pairs = []
    for n, row in enumerate(read_jsonl(path), start=1):
        rejected = row.get("rejected")
        if not rejected or not row["messages"] or row["messages"][-1]["role"] != "assistant":
            raise StageError(f"{path}: row {n} (id {row.get('id')}): not a preference pair (no `rejected`, or "
                             "messages do not end with the chosen answer)")
        prompt = row["messages"][:-1]
        try:
            tools = row.get("tools")
            chosen = tokenize_conversation(tokenizer, row["messages"], max_length, stop_id, tools)
            answer = {k: rejected[k] for k in ("content", "tool_calls") if k in rejected}
            other = tokenize_conversation(tokenizer, [*prompt, {"role": "assistant", **answer}], max_length, stop_id,
                                          tools)
        except TemplateError as e:
            raise StageError(f"{path}: row {n} (id {row.get('id')}): {e}") from None
        shared = 0  # the prompt (and any identical start of the answers) is the same in both: not scored
        while (shared < min(len(chosen["input_ids"]), len(other["input_ids"]))
               and chosen["input_ids"][shared] == other["input_ids"][shared]):
            shared += 1
        for seq in (chosen, other):
            seq["labels"] = [IGNORE] * shared + seq["labels"][shared:]
        if any(all(t == IGNORE for t in seq["labels"]) for seq in (chosen, other)):
            continue  # an answer cut off by max_length (or two identical answers): nothing to compare
        pairs.append({"chosen": chosen, "rejected": other})
    if not pairs:
        raise StageError(f"{path}: no usable preference pairs (dpo.max_length {max_length})")
    return pairs


def sequence_logps(model, sequences: list[dict], pad_id: int, device):
    """Summed log-probability of each sequence's labelled tokens (one padded batch)."""
    import torch

    width = max(len(s["input_ids"]) for s in sequences)
    ids = torch.tensor([s["input_ids"] + [pad_id] * (width - len(s["input_ids"])) for s in sequences], device=device)
    mask = torch.tensor([[1] * len(s["input_ids"]) + [0] * (width - len(s["input_ids"])) for s in sequences],
                        device=device)
    labels = torch.tensor([s["labels"] + [IGNORE] * (width - len(s["labels"])) for s in sequences], device=device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    scored = targets != IGNORE
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * scored).sum(-1)


def pair_logps(model, pairs: list[dict], pad_id: int, device):
    """(chosen, rejected) summed log-probabilities of a batch of pairs, in one forward pass."""
    logps = sequence_logps(model, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id, device)
    return logps[:len(pairs)], logps[len(pairs):]


def reference_logps(model, pairs: list[dict], pad_id: int, device, batch_size: int) -> None:
    """Store the frozen SFT model's log-probabilities in each pair (ref_chosen, ref_rejected)."""
    import torch

    model.eval()
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            chosen, rejected = pair_logps(model, chunk, pad_id, device)
            for pair, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                pair["ref_chosen"], pair["ref_rejected"] = c, r


def preference_accuracy(model, pairs: list[dict], pad_id: int, device, batch_size: int) -> float:
    """Share of pairs whose chosen answer the model gives a higher log-probability than the rejected one."""
    import torch

    model.eval()
    wins = 0
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chosen, rejected = pair_logps(model, pairs[i:i + batch_size], pad_id, device)
            wins += int((chosen > rejected).sum())
    return wins / len(pairs)


def train_dpo(model, train: list[dict], p: DpoParams, pad_id: int, device) -> list[dict]:
    """DPO/IPO steps over the train pairs (reference log-probs already stored); returns the per-step curve."""
    import torch

    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=p.lr, weight_decay=0.0)
    rng, curve, step = random.Random(p.seed), [], 0
    model.train()
    for epoch in range(1, p.epochs + 1):
        order = list(range(len(train)))
        rng.shuffle(order)
        for i in range(0, len(order), p.batch_size):
            chunk = [train[j] for j in order[i:i + p.batch_size]]
            chosen, rejected = pair_logps(model, chunk, pad_id, device)
            ref = torch.tensor([[c["ref_chosen"], c["ref_rejected"]] for c in chunk], device=device)
            losses, chosen_reward, rejected_reward = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], p.beta,
                                                              p.loss_type)
            loss = losses.mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            curve.append({"step": step, "epoch": epoch, "loss": round(loss.item(), 6),
                          "reward_accuracy": round((chosen_reward > rejected_reward).float().mean().item(), 6),
                          "reward_margin": round((chosen_reward - rejected_reward).mean().item(), 6),
                          "chosen_reward": round(chosen_reward.mean().item(), 6),
                          "rejected_reward": round(rejected_reward.mean().item(), 6)})
    return curve


def run_dpo(p: DpoParams, args) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from stages.train import seeded_start

    device, tokenizer, pad_id = seeded_start(p.seed, args.base)
    train = load_pairs(args.train, tokenizer, p.max_length)
    test = load_pairs(args.test, tokenizer, p.max_length)
    path, load = resolve_base(args.base)
    base = AutoModelForCausalLM.from_pretrained(path, **load, dtype=torch.float32).to(device)
    model = PeftModel.from_pretrained(base, args.adapter, is_trainable=True)  # the SFT model, trained further

    reference_logps(model, train, pad_id, device, p.batch_size)  # the reference: the SFT model before any step
    accuracy_before = preference_accuracy(model, test, pad_id, device, p.batch_size)
    started = time.perf_counter()
    curve = train_dpo(model, train, p, pad_id, device)
    runtime = time.perf_counter() - started
    accuracy_after = preference_accuracy(model, test, pad_id, device, p.batch_size)

    from stages.train import save_adapter

    with atomic_path(args.out, is_dir=True) as out:
        save_adapter(model, out)
        tokenizer.save_pretrained(out)
    write_curve(args.plot, curve)
    last = curve[-1]
    return {"enabled": True, "loss_type": p.loss_type, "beta": p.beta, "train_pairs": len(train),
            "test_pairs": len(test), "steps": len(curve), "loss_final": last["loss"],
            "reward_accuracy_final": last["reward_accuracy"], "reward_margin_final": last["reward_margin"],
            "test_preference_accuracy_before": round(accuracy_before, 6),
            "test_preference_accuracy_after": round(accuracy_after, 6), "runtime_s": round(runtime, 2)}


def copy_adapter(adapter: str, out: str) -> None:
    """dpo off: the SFT adapter is the last adapter of the chain; merge reads it from here."""
    if not Path(adapter, "adapter_config.json").exists():
        raise StageError(f"{adapter}: no adapter_config.json (run the train stage)")
    with atomic_path(out, is_dir=True) as tmp:
        shutil.rmtree(tmp)
        shutil.copytree(adapter, tmp)


def write_curve(path: str, curve: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PLOT_FIELDS)
        writer.writeheader()
        writer.writerows(curve)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="models/sft_base", help="the weights the SFT adapter was trained on")
    ap.add_argument("--adapter", default="models/adapter")
    ap.add_argument("--train", default="data/split/preference_train.jsonl")
    ap.add_argument("--test", default="data/split/preference_test.jsonl")
    ap.add_argument("--out", default="models/dpo_adapter")
    ap.add_argument("--metrics", default="metrics/dpo.json")
    ap.add_argument("--plot", default="plots/dpo_steps.csv")
    args = ap.parse_args()
    p = load_params("dpo", DpoParams)
    if not p.enabled:
        copy_adapter(args.adapter, args.out)
        write_curve(args.plot, [])
        metrics = {"enabled": False}
    else:
        metrics = run_dpo(p, args)
    write_json(args.metrics, metrics)
    print(f"dpo: {metrics}")


if __name__ == "__main__":
    run_stage(main)
