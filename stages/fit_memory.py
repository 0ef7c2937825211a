"""train.step_tokens auto: the largest token budget a train step can take on this GPU.

Method (CUDA), run by stages.train before training starts:
  1. probe   real train steps (forward, backward, optimizer step) on full rows of `row` tokens (the
             packed row length: train.pack_tokens or train.max_length): a warm-up step on one row,
             then the peak allocated memory of one step on 1 and on 2 rows. The optimizer is a
             throwaway and the adapters' values and the RNG states are put back afterwards, so the
             training that follows is the one a fixed budget of the same size would give.
  2. fit     peak(tokens) = fixed + per_token x tokens, through the measured points. Activations,
             logits and attention grow linearly with the tokens of a step at a fixed row length.
  3. limit   what this process may allocate: min(total x the per-process memory fraction
             (torch.cuda.set_per_process_memory_fraction; 1 when unset), memory the process holds
             already + the driver's free memory). A step may use train.step_tokens_memory of it (0.9:
             the rest is for the allocator's fragmentation).
  4. pick    the largest multiple of `row` whose steps, planned exactly as training plans them (the
             first epoch's order), are predicted to fit: a step's cost is the tokens of the padded
             batch collate builds (rows x width), which packing makes a little more than its budget.
             Capped at the train split's own tokens (a bigger budget would change nothing).
  5. verify  one real step on the plan's largest batch. If it runs out of memory or peaks over the
             limit, the memory allowed for tokens shrinks by a quarter and 4-5 run again (three tries).
If even one row is predicted not to fit (or does not), a one-line StageError names
train.step_tokens and the numbers, before training starts. On a CPU nothing is measured: steps are
train.batch_size conversations, as with step_tokens null, and a one-line note says so.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Callable

from stages.common import StageError

MiB = 2**20
GiB = 2**30
PROBE_ROWS = (1, 2)   # full rows per probe step: small, so that they fit wherever one row fits
STEPS_CHECKED = 512   # steps of the plan whose padded size is checked (the plan's order is random)
TRIES = 3


def fit_line(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares (fixed, per_token) of peak bytes against step tokens, from (tokens, bytes)."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if n < 2 or sxx == 0:
        raise ValueError("need peaks at two different token counts")
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - slope * mx, slope


def padded_tokens(lengths: list[int], pack: bool, row: int) -> int:
    """Tokens of the batch stages.train_batches.collate builds from conversations of these lengths: rows x
    width, rows packed first-fit decreasing into `row` tokens (pack) or one per conversation."""
    if not pack:
        return len(lengths) * max(lengths)
    used: list[int] = []
    for n in sorted(lengths, reverse=True):
        for r, u in enumerate(used):
            if u + n <= row:
                used[r] += n
                break
        else:
            used.append(n)
    return len(used) * max(used)


def memory_limit(total: int, free: int, held: int, fraction: float = 1.0) -> int:
    """Bytes this process may allocate: its share of the card, and no more than it holds plus what is free."""
    return int(min(total * fraction, free + held))


def too_small(row: int, fixed: float, per_token: float, allowed: float, limit: int, share: float) -> StageError:
    need = fixed + per_token * row
    return StageError(
        f"train.step_tokens auto: one row of {row} tokens needs ~{need / GiB:.2f} GiB ({fixed / GiB:.2f} GiB fixed "
        f"+ {per_token * 1024 / MiB:.1f} MiB per 1k tokens), more than train.step_tokens_memory {share} x "
        f"{limit / GiB:.2f} GiB = {allowed / GiB:.2f} GiB of GPU memory; shorten train.max_length/pack_tokens or "
        f"set train.gradient_checkpointing, train.loss_chunk_size or train.quantize nf4")


def pick_budget(fixed: float, per_token: float, allowed: float, row: int, cap_tokens: int,
                worst_padded: Callable[[int], int]) -> int:
    """The largest multiple of `row` (at most the multiple just above cap_tokens) whose worst step,
    worst_padded(budget) padded tokens, is predicted to peak within `allowed` bytes; 0 when even
    a one-row budget is not."""
    if per_token <= 0:
        raise StageError(f"train.step_tokens auto: memory did not grow with the tokens of a step "
                         f"({per_token:.1f} bytes per token): cannot extrapolate")
    max_tokens = int((allowed - fixed) // per_token)   # padded tokens a step may have
    if max_tokens < row:
        return 0
    budget = min(max_tokens // row, -(-cap_tokens // row)) * row
    while True:
        worst = worst_padded(budget)
        if worst <= max_tokens:
            return budget
        if budget == row:
            return 0
        # scale down by the overshoot (packing's padding), at least one row
        budget = min(budget - row, max(row, int(budget * max_tokens / worst) // row * row))


def probe_examples(examples: list[dict], rows: int, row: int, max_length: int) -> list[dict]:
    """Conversations that collate packs into exactly `rows` full rows of `row` tokens: documents of
    max_length tokens (plus one shorter one a row when row is not a multiple), made of the train
    split's own tokens, every token labelled (the loss's most expensive case)."""
    tokens = [t for e in examples[:64] for t in e["input_ids"]] or [0]
    sizes = [max_length] * (row // max_length) + ([row % max_length] if row % max_length else [])
    out = []
    for _ in range(rows):
        for n in sizes:
            ids = (tokens * (n // len(tokens) + 1))[:n]
            out.append({"input_ids": ids, "labels": list(ids)})
    return out


@contextlib.contextmanager
def preserved(model):
    """Trainable weights and RNG states as they were before the block (probe steps change both)."""
    import torch

    saved = {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for n, q in model.named_parameters():
                if n in saved:
                    q.copy_(saved[n])
                q.grad = None
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def measure_cuda(step: Callable[[list[dict]], object], examples: list[dict], model, device) -> int | None:
    """Peak bytes allocated on a CUDA device during step(examples), one real train step; None if it
    ran out of memory (the step's gradients and cached blocks are freed then)."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        step(examples)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    except torch.cuda.OutOfMemoryError:
        pass  # the traceback holds the step's tensors: free them outside the except block
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    return None


def cuda_limit(device) -> tuple[int, float]:
    """(bytes this process may allocate on device, its per-process memory fraction)."""
    import torch

    device = torch.device(device)
    device = device.index if device.index is not None else torch.cuda.current_device()  # "cuda": its index
    free, total = torch.cuda.mem_get_info(device)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.9
    fraction = get_fraction(device) if get_fraction else 1.0
    return memory_limit(total, free, torch.cuda.memory_reserved(device), fraction), fraction


def auto_step_tokens(measure: Callable[[list[dict]], int | None], examples: list[dict],
                     plan: Callable[[int], list[list[int]]], pack: bool, row: int, max_length: int, share: float,
                     limit: int) -> tuple[int, dict]:
    """(budget, report), as the module docstring says. measure(conversations) runs one real train
    step and returns its peak bytes (None: out of memory); plan(budget) gives the first epoch's
    steps as indices into examples; limit: bytes this process may allocate."""
    allowed = share * limit
    lengths = [len(e["input_ids"]) for e in examples]
    report = {"row_tokens": row, "limit_mb": round(limit / MiB, 1), "memory_share": share}

    def worst_step(budget: int) -> tuple[int, list[int]]:
        return max((padded_tokens([lengths[i] for i in s], pack, row), s) for s in plan(budget)[:STEPS_CHECKED])

    points = []
    for rows in (PROBE_ROWS[0], *PROBE_ROWS):  # the first is a warm-up (optimizer state, workspaces)
        peak = measure(probe_examples(examples, rows, row, max_length))
        if peak is None:
            break
        points.append((rows * row, peak))
    if not points:
        raise StageError(f"train.step_tokens auto: one row of {row} tokens ran out of GPU memory ({limit / GiB:.2f} "
                         "GiB may be allocated); shorten train.max_length/pack_tokens or set "
                         "train.gradient_checkpointing, train.loss_chunk_size or train.quantize nf4")
    points = points[1:]
    report.update(probe_tokens=[x for x, _ in points], probe_peak_mb=[round(y / MiB, 1) for _, y in points])
    if len(points) < 2:  # two rows ran out of memory: one row it is (it ran)
        budget, attempt, (padded, _), peak = row, 0, worst_step(row), points[0][1]
        fixed, per_token = float(peak), 0.0
    else:
        fixed, per_token = fit_line(points)
        for attempt in range(1, TRIES + 1):
            budget = pick_budget(fixed, per_token, allowed, row, sum(lengths), lambda b: worst_step(b)[0])
            if not budget:
                raise too_small(row, fixed, per_token, allowed, limit, share)
            padded, indices = worst_step(budget)
            peak = measure([examples[i] for i in indices])
            if peak is not None and peak <= limit:
                break
            allowed = fixed + 0.75 * (allowed - fixed)  # room for a quarter fewer tokens
        else:
            raise StageError(f"train.step_tokens auto: a step of {budget} tokens still ran out of GPU memory "
                             f"({limit / GiB:.2f} GiB may be allocated) after {TRIES} tries; set train.step_tokens")
    report.update(fixed_mb=round(fixed / MiB, 1), per_1k_tokens_mb=round(per_token * 1024 / MiB, 3), tries=attempt,
                  worst_step_padded_tokens=padded, capped_at_train_tokens=budget >= sum(lengths),
                  predicted_peak_mb=round((fixed + per_token * padded) / MiB, 1), verified_peak_mb=round(peak / MiB, 1))
    return budget, report
