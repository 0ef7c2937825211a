"""clean, steps 4-5: near-duplicates and conflicting answers. Near-duplicates: MinHash LSH
(datasketch's banding) over character n-grams, with signatures and the exact similarity of unsure
candidate pairs computed by compiled loops (numba) over the texts' UTF-8 bytes; dropped, or kept
and grouped so that split never puts one group on both sides. Conflicts: the same question with
different answers, always reported."""
from __future__ import annotations

import os
from typing import Callable, Literal

import numba
import numpy as np
import polars as pl
import pyarrow as pa

from stages.common import Params
from stages.records import prompt_key

# numba's own thread pool, not its OpenMP layer (its default here): the OpenMP layer shares the process's
# OpenMP runtime with torch and changes the bits of torch's CPU math run later in the same process (clean
# then base in one process gave another base model than in two). A value in NUMBA_THREADING_LAYER wins.
numba.config.THREADING_LAYER = os.environ.get("NUMBA_THREADING_LAYER", "workqueue")


class NearDuplicates(Params):
    enabled: bool = True
    threshold: float = 0.85             # estimated Jaccard similarity of character n-gram sets
    ngram: int = 5
    num_perm: int = 64                  # MinHash permutations (more: better estimates, slower)
    action: Literal["drop", "group"] = "drop"   # group: keep all, split keeps each group together
    seed: int = 1



def large_strings(texts: list[str] | pa.Array) -> pa.LargeStringArray:
    """The texts as Arrow large strings (a copy of them unless they are already)."""
    if isinstance(texts, list):
        return pa.array(texts, pa.large_string())
    return texts if texts.type == pa.large_string() else texts.cast(pa.large_string())


def utf8_buffers(texts: list[str] | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The texts' UTF-8 bytes one after the other, and offsets (text i is data[offsets[i]:offsets[i + 1]]):
    Arrow's buffers, for the compiled loops below."""
    array = large_strings(texts)
    _, offsets, data = array.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int64)[array.offset:array.offset + len(array) + 1]
    return (np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)), offsets


def minhash_signatures(texts: list[str] | pa.Array, ngram: int, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures of the character n-gram sets of `texts`. Exactly datasketch's
    MinHash(num_perm, seed, scheme="affine32") fed the n-grams with `ngram_hash32` as hash function
    (tests/test_data_stages.py checks), computed by a compiled loop (numba) over the texts' UTF-8
    bytes, one text per thread at a time: ~1 us a text instead of ~15 with numpy. One row per text
    (a view of the array signatures_into fills one column per text: LSH reads it a permutation at a time)."""
    data, offsets = utf8_buffers(texts)
    out = np.empty((num_perm, len(offsets) - 1), dtype=np.uint32)
    a, b = minhash_permutations(num_perm, seed)
    if len(offsets) > 1:
        signatures_into(data, offsets, ngram, a, b, out)
    return out.T


@numba.njit(parallel=True, cache=True, nogil=True)
def signatures_into(data, offsets, ngram, a, b, out):  # pragma: no cover (compiled)
    """out[:, row] = min over the row's n-gram hashes h of a * fmix32(h >> 32) + b (mod 2^32)."""
    for row in numba.prange(offsets.shape[0] - 1):
        sig = np.full(a.shape[0], np.uint32(0xFFFFFFFF), dtype=np.uint32)
        for h in ngram_hashes(data, offsets[row], offsets[row + 1], ngram):
            hv = np.uint32(h >> np.uint64(32))  # datasketch's _fmix(hv, 32), then each affine permutation
            hv = np.uint32(np.uint32(hv ^ (hv >> np.uint32(16))) * np.uint32(0x85EBCA6B))
            hv = np.uint32(np.uint32(hv ^ (hv >> np.uint32(13))) * np.uint32(0xC2B2AE35))
            hv = np.uint32(hv ^ (hv >> np.uint32(16)))
            for j in range(a.shape[0]):
                v = np.uint32(a[j] * hv + b[j])
                if v < sig[j]:
                    sig[j] = v
        out[:, row] = sig


@numba.njit(cache=True, nogil=True)
def ngram_hashes(data, start, end, ngram):  # pragma: no cover (compiled)
    """ngram_hash64 of each character n-gram of the UTF-8 text data[start:end], in order (of the
    whole text if it is shorter; none if it is empty): a polynomial hash of the code points, rolled
    along the text (the code point leaving the window is taken out)."""
    P = np.uint64(0x100000001B3)
    P_ngram = np.uint64(1)
    for _ in range(ngram):
        P_ngram = P_ngram * P
    out = np.empty(end - start, dtype=np.uint64)  # at most one n-gram a byte
    window = np.zeros(ngram, dtype=np.uint64)
    h, count, n, i = np.uint64(0), 0, 0, start
    while i < end:  # decode one code point
        lead = np.uint64(data[i])
        if lead < 0x80:
            code, size = lead, 1
        elif lead < 0xE0:
            code, size = lead & np.uint64(0x1F), 2
        elif lead < 0xF0:
            code, size = lead & np.uint64(0x0F), 3
        else:
            code, size = lead & np.uint64(0x07), 4
        for k in range(1, size):
            code = (code << np.uint64(6)) | (np.uint64(data[i + k]) & np.uint64(0x3F))
        i += size
        h = h * P + code - window[count % ngram] * P_ngram
        window[count % ngram] = code
        count += 1
        if count >= ngram:
            out[n] = h
            n += 1
    if 0 < count < ngram:
        out[n] = h
        n += 1
    return out[:n]


@numba.njit(parallel=True, cache=True, nogil=True)
def jaccard_into(data, offsets, ngram, left, right, bounds, out):  # pragma: no cover (compiled)
    """out[k] = the Jaccard similarity of the n-gram hash sets of texts left[k] and right[k]; the
    pairs come sorted by left, pairs bounds[g]..bounds[g + 1] sharing one (its set made once).
    Sets are open-addressing hash tables (sorting each text's n-grams took 10x longer)."""
    for g in numba.prange(bounds.shape[0] - 1):
        first = ngram_hashes(data, offsets[left[bounds[g]]], offsets[left[bounds[g]] + 1], ngram)
        first_set, first_used, first_size = hash_set(first)
        for k in range(bounds[g], bounds[g + 1]):
            other_set, other_used, other_size = hash_set(ngram_hashes(data, offsets[right[k]], offsets[right[k] + 1], ngram))
            common = 0
            for slot in range(other_set.shape[0]):
                if other_used[slot] and slot_of(first_set, first_used, other_set[slot]) >= 0:
                    common += 1
            union = first_size + other_size - common
            out[k] = common / union if union else 0.0


@numba.njit(cache=True, nogil=True)
def hash_set(hashes):  # pragma: no cover (compiled)
    """The distinct hashes as an open-addressing table (slots, which slots are used, how many)."""
    capacity = 16
    while capacity < 2 * hashes.shape[0]:
        capacity *= 2
    slots, used, size = np.zeros(capacity, dtype=np.uint64), np.zeros(capacity, dtype=np.bool_), 0
    for h in hashes:
        slot = slot_of(slots, used, h)
        if slot < 0:
            slot = -slot - 1
            slots[slot], used[slot] = h, True
            size += 1
    return slots, used, size


@numba.njit(cache=True, nogil=True, inline="always")
def slot_of(slots, used, h):  # pragma: no cover (compiled)
    """The slot holding h, or -(the free slot where it would go) - 1 (linear probing)."""
    mask = slots.shape[0] - 1
    slot = np.int64((h * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) & mask  # Fibonacci hashing mixes the bits
    while used[slot]:
        if slots[slot] == h:
            return slot
        slot = (slot + 1) & mask
    return -slot - 1


def minhash_permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from datasketch import MinHash

    a, b = (x.astype(np.uint32) for x in MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations)
    return a, b


def ngram_hash64(text: str) -> int:
    h = 0
    for ch in text:
        h = (h * 0x100000001B3 + ord(ch)) & 0xFFFFFFFFFFFFFFFF
    return h


def ngram_hash32(gram: bytes | str) -> int:
    """The n-gram hash minhash_signatures uses, as a datasketch hashfunc (for the test)."""
    text = gram.decode("utf-8") if isinstance(gram, bytes) else gram
    return ngram_hash64(text) >> 32


def near_duplicate_groups(texts: list[str] | pa.Array, nd: NearDuplicates) -> np.ndarray:
    """For each text, the index of the first text of its near-duplicate group (itself if none).
    Locality-sensitive hashing over MinHash signatures, with the bands datasketch's MinHashLSH
    picks for the threshold (b bands of r rows), bucketed for all texts at once with numpy rather
    than one dict insert and query per text (~20x faster on 1M rows). A candidate pair whose
    MinHash estimate is not clearly above the threshold joins a group only if its exact Jaccard
    similarity reaches it: estimates are noisy (templated answers about two drugs would otherwise
    merge). Groups are the connected components of the pairs that join."""
    from datasketch import MinHashLSH
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    texts = large_strings(texts)  # once, for both compiled loops
    permutations = minhash_signatures(texts, nd.ngram, nd.num_perm, nd.seed).T  # contiguous rows
    n = permutations.shape[1]
    lsh = MinHashLSH(threshold=nd.threshold, num_perm=nd.num_perm)
    candidates = []
    for band in range(lsh.b):
        h = np.zeros(n, dtype=np.uint64)
        for column in range(band * lsh.r, (band + 1) * lsh.r):
            h = h * np.uint64(0x100000001B3) + permutations[column]
        order = np.argsort(h, kind="stable")
        ordered = h[order]
        starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
        first = order[starts][np.cumsum(np.concatenate([[True], ordered[1:] != ordered[:-1]])) - 1]
        same = first != order
        candidates.append(first[same].astype(np.int64) * n + order[same])  # (first of bucket, member)
    pairs = np.unique(np.concatenate(candidates)) if candidates else np.empty(0, dtype=np.int64)
    left, right = pairs // n, pairs % n  # sorted by left
    estimate = np.zeros(len(pairs))
    for lo in range(0, len(pairs), 200_000):
        sl = slice(lo, lo + 200_000)
        estimate[sl] = (permutations[:, left[sl]] == permutations[:, right[sl]]).mean(axis=0)
    # the estimate's standard deviation is at most 0.5 / sqrt(num_perm) (0.06 for 64): far above the
    # threshold a pair is in, far below it is out, and only the band between gets the exact check
    margin = 0.8 / np.sqrt(nd.num_perm)  # 1.6 standard deviations
    unsure = np.flatnonzero((estimate >= nd.threshold - 2 * margin) & (estimate < nd.threshold + margin))
    exact = np.zeros(len(unsure))
    if len(unsure):  # exact similarity on 64-bit n-gram hashes, each pair's first text hashed once
        bounds = np.flatnonzero(np.concatenate([[True], left[unsure][1:] != left[unsure][:-1], [True]]))
        data, offsets = utf8_buffers(texts)
        jaccard_into(data, offsets, nd.ngram, left[unsure], right[unsure], bounds, exact)
    joined = estimate >= nd.threshold + margin
    joined[unsure] = exact >= nd.threshold
    graph = coo_matrix((np.ones(joined.sum(), dtype=np.int8), (left[joined], right[joined])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    _, first_of_component = np.unique(component, return_index=True)
    return first_of_component[component]


def conflicting_answers(facts: pl.DataFrame, kept: np.ndarray, record_of: Callable[[int], dict],
                        source_of: Callable[[int], dict], policy: str) -> tuple[list[dict], list[str | None]]:
    """Step 5: the same system prompt and question with different answers. Returns the conflicts
    (always reported) and, for each kept row, "conflicting_answer" where the policy drops it."""
    conflicts, flags = [], [None] * len(kept)
    kept_facts = facts.select("conflict_key", "answer_key").gather(kept).with_row_index("position")
    groups = (kept_facts.filter(pl.col("conflict_key").is_not_null())
              .group_by("conflict_key", maintain_order=True)
              .agg(pl.col("position"), pl.col("answer_key").n_unique().alias("answers"))
              .filter(pl.col("answers") > 1))
    questions = groups["position"].to_list()  # each question's rows, as positions in kept
    rows = kept[np.concatenate(questions)].tolist() if questions else []
    ids, answers = (facts[name].gather(rows).to_list() for name in ("id", "answer"))
    at = 0
    for positions in questions:
        group = range(at, at + len(positions))
        conflicts.append({"question": prompt_key(record_of(rows[at]))[:500], "rows": [
            {**source_of(rows[n]), "id": ids[n], "answer": answers[n][:300]} for n in group]})
        at += len(positions)
        for order, k in enumerate(positions):
            if policy == "drop" or (policy == "keep_first" and order > 0):
                flags[k] = "conflicting_answer"
    return conflicts, flags
