"""Case profiles: deterministic case lists (no Hypothesis), seeded by ``--seed``.

``profile_cases(name, seed=0)``:

* ``smoke``: a handful of small cases, < 1 min on 2 CPU cores;
* ``ci``: ~150 small cases (T 10..300) covering every cmp_mask, window_keys, forced_blocks,
  block_indices, group_importance, gates, varlen, decode (TQ < T), T not a multiple of the block size, T < block size,
  G in {1, 2, 4, 8, 16}, l != d != l', D != DV, custom scale, batch 2 and all 4 dtypes; <= 10 min on
  2 CPU cores with the CPU oracles;
* ``full``: larger shapes (T up to 2048) and the whole cross product of conventions;
* ``paper``: the paper's hyper-parameters (G=16, D=192, DV=128, l=32, d=16, l'=64, n=16, w=512) at
  several T, bf16;
* ``regressions``: the regression corpus, minimal failing cases ``nsaconf search`` found (``corpus_dirs``);
* ``gpu``: paper-like and edge shapes (T not a multiple of the block size, T < block size, decode,
  varlen, G in {16, 32, 64}, D in {64, 128, 192/128}) in fp16 and bf16, with the paper's l=32, d=16,
  l'=64 and again with l = d = l' = 64 (what FLA, nsa-impl and TileLang's kernel implement).

The seed changes the tensors (``Case.seed``) and the sampled part of the cross product, never the
coverage of the fixed part.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from nsaconf.cases.conventions import CMP_MASKS, FORCED_BLOCKS, WINDOW_KEYS
from nsaconf.cases.model import DTYPES, Case, CaseError, load_cases
from nsaconf.cases.vocabulary import REGRESSIONS

PROFILES = ("smoke", "ci", "full", "paper", "gpu", REGRESSIONS)
#: the regression corpus shipped with nsaconf: ``regressions/<oracle>/<case_id>.json`` (``nsaconf search --corpus``)
SHIPPED_CORPUS = Path(__file__).resolve().parent / REGRESSIONS


def dedupe_cases(cases: list[Case]) -> list[Case]:
    """The cases in order, each id once."""
    seen, out = set(), []
    for c in cases:
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return out


def _small(seed: int, **kw) -> Case:
    base = dict(batch=1, seq_len=100, heads_q=16, heads_kv=1, head_dim=16, block_size=16, top_n=4, window=16,
                dtype="float32", seed=seed)
    base.update(kw)
    return Case(**base)


def smoke(seed: int = 0) -> list[Case]:
    s = seed
    return dedupe_cases([
        _small(s, dtype="float32"),
        _small(s + 1, dtype="bfloat16", seq_len=77, cmp_mask="end_exclusive", window_keys="w_plus_1"),
        _small(s + 2, dtype="float16", heads_q=8, heads_kv=2, seq_len=64, q_len=5, window=0),
        _small(s + 3, dtype="float64", block_indices="random", forced_blocks="current"),
        _small(s + 4, dtype="float32", seq_len=90, cu_seqlens=(0, 37, 90), cmp_block=32, cmp_stride=16, block_size=32),
        _small(s + 5, dtype="bfloat16", seq_len=12, heads_q=16, heads_kv=1, window=8),
    ])


def _ci_fixed(seed: int) -> list[Case]:
    s, out = seed, []
    for i, m in enumerate(CMP_MASKS):                      # every cmp_mask x every dtype
        for j, dt in enumerate(DTYPES):
            out.append(_small(s + 10 * i + j, cmp_mask=m, dtype=dt, seq_len=96 + 8 * j))
    for i, wk in enumerate(WINDOW_KEYS):                    # window keys x window sizes
        for j, w in enumerate((0, 1, 16, 40, 400)):
            out.append(_small(s + 100 + 10 * i + j, window_keys=wk, window=w, dtype=("bfloat16", "float32")[j % 2]))
    for i, fb in enumerate(FORCED_BLOCKS):                  # forced blocks x block_indices
        for j, bi in enumerate(("topk", "random")):
            for k, dt in enumerate(("float32", "bfloat16")):
                out.append(_small(s + 200 + 10 * i + 2 * j + k, forced_blocks=fb, block_indices=bi, dtype=dt,
                                  top_n=max(4, 3), seq_len=130))
    for i, cu in enumerate(((0, 37, 100), (0, 16, 60, 130), (0, 5, 200), (0, 150, 300))):  # varlen
        for j, dt in enumerate(("float32", "bfloat16", "float16")):
            out.append(_small(s + 300 + 10 * i + j, seq_len=cu[-1], cu_seqlens=cu, dtype=dt))
    for i, (t, tq) in enumerate(((150, 1), (150, 7), (300, 1), (300, 33), (64, 63))):  # decode / chunked prefill
        for j, dt in enumerate(("float32", "bfloat16", "float16")):
            out.append(_small(s + 400 + 10 * i + j, seq_len=t, q_len=tq, dtype=dt))
    for i, t in enumerate((10, 15, 16, 17, 31, 33, 100, 127)):  # T < / = / not a multiple of the block size
        out.append(_small(s + 500 + i, seq_len=t, dtype=("float32", "bfloat16")[i % 2], window=8))
    for i, (hq, h) in enumerate(((2, 2), (4, 2), (8, 2), (16, 2), (16, 1), (32, 2), (16, 4))):  # G in {1,2,4,8,16}
        for j, dt in enumerate(("float32", "bfloat16", "float16")):
            out.append(_small(s + 600 + 10 * i + j, heads_q=hq, heads_kv=h, dtype=dt, seq_len=80))
    for i, (l, d, ls) in enumerate(((32, 16, 32), (32, 16, 64), (16, 8, 16), (16, 16, 32), (32, 32, 32), (8, 8, 16))):
        for j, dt in enumerate(("float32", "bfloat16")):        # l != d != l' (Eq. 9)
            out.append(_small(s + 700 + 10 * i + j, cmp_block=l, cmp_stride=d, block_size=ls, seq_len=200, dtype=dt))
    out += [
        _small(s + 800, head_dim=32, head_dim_v=16, dtype="bfloat16"),        # D != DV
        _small(s + 801, head_dim=16, head_dim_v=32, dtype="float32"),
        _small(s + 802, scale=0.1, dtype="float32"),                           # custom scale
        _small(s + 803, scale=0.5, dtype="bfloat16"),
        _small(s + 804, batch=2, dtype="float32"),                             # batch 2
        _small(s + 805, batch=2, dtype="float16", q_len=20),
        _small(s + 806, top_n=1, forced_blocks="none", dtype="float32"),       # n = 1, n > #blocks
        _small(s + 807, top_n=16, dtype="bfloat16", seq_len=64),
    ]
    # group importance (sum of probabilities vs softmax of the group-mean logits) and gates (raw vs sigmoid):
    # G > 1 and T up to 300 so that the two importance rules pick different blocks on many rows
    out += [
        _small(s + 900, group_importance="mean_logits", seq_len=300, forced_blocks="none", dtype="float32"),
        _small(s + 901, group_importance="mean_logits", seq_len=250, dtype="bfloat16", top_n=6),
        _small(s + 905, group_importance="mean_logits", seq_len=160, dtype="float16", heads_q=8, heads_kv=2),
        _small(s + 902, group_importance="mean_logits", seq_len=200, cmp_block=32, cmp_stride=16, block_size=64,
               heads_q=4, heads_kv=2, dtype="float16"),                   # Eq. 9 after the group rule
        _small(s + 903, group_importance="mean_logits", seq_len=130, cu_seqlens=(0, 50, 130), dtype="float64"),
        _small(s + 904, group_importance="mean_logits", seq_len=300, q_len=3, dtype="float32", forced_blocks="none"),
        _small(s + 910, gates="sigmoid", dtype="float32", heads_q=4, heads_kv=2, seq_len=64),  # gradient truth
        _small(s + 911, gates="sigmoid", dtype="bfloat16", cmp_block=32, cmp_stride=16, block_size=32, seq_len=150),
        _small(s + 912, gates="sigmoid", dtype="float16", q_len=9, seq_len=120),
        # lucidrains' conventions (end_exclusive, forced current block, l = d = l', mean_logits or G = 1):
        # the cases on which its whole forward is comparable
        _small(s + 920, group_importance="mean_logits", gates="sigmoid", cmp_mask="end_exclusive",
               window_keys="w_plus_1", forced_blocks="current", seq_len=200, dtype="float32"),
        _small(s + 921, group_importance="mean_logits", cmp_mask="end_exclusive", window_keys="w_plus_1",
               forced_blocks="current", dtype="bfloat16", heads_q=8, heads_kv=2, seq_len=150),
        _small(s + 922, group_importance="mean_logits", cmp_mask="end_exclusive", forced_blocks="current",
               gates="sigmoid", dtype="float16", q_len=5, seq_len=120),                          # decode, window w
        _small(s + 923, cmp_mask="end_exclusive", forced_blocks="current", heads_q=2, heads_kv=2, dtype="float64",
               cu_seqlens=(0, 40, 100), seq_len=100),                                            # G = 1, varlen
        _small(s + 924, group_importance="mean_logits", cmp_mask="end_exclusive", window_keys="w_plus_1",
               forced_blocks="current", seq_len=12, dtype="float32"),                            # T < l'
    ]
    return out


def ci(seed: int = 0) -> list[Case]:
    cases = _ci_fixed(seed)
    rng = random.Random(seed)
    for i in range(24):  # sampled part of the cross product
        l, d, ls = rng.choice(((16, 16, 16), (32, 16, 32), (16, 8, 16), (32, 16, 64)))
        hq, h = rng.choice(((2, 1), (4, 2), (4, 1), (16, 1), (16, 2)))
        t = rng.randint(16, 300)
        try:
            cases.append(Case(batch=1, seq_len=t, q_len=rng.choice((t, t, max(1, t // 3), 1)), heads_q=hq, heads_kv=h,
                              head_dim=16, dtype=rng.choice(DTYPES), block_size=ls, cmp_block=l, cmp_stride=d,
                              top_n=rng.choice((3, 4, 6)), window=rng.choice((0, 8, 32)),
                              cmp_mask=rng.choice(tuple(CMP_MASKS)), window_keys=rng.choice(tuple(WINDOW_KEYS)),
                              forced_blocks=rng.choice(FORCED_BLOCKS), block_indices=rng.choice(("topk", "random")),
                              seed=seed + 1000 + i))
        except CaseError:
            continue
    return dedupe_cases(cases)


def full(seed: int = 0) -> list[Case]:
    out = list(ci(seed))
    rng = random.Random(seed + 1)
    for i, m in enumerate(CMP_MASKS):
        for j, dt in enumerate(DTYPES):
            for k, t in enumerate((513, 1024, 2048)):
                out.append(Case(seq_len=t, heads_q=16, heads_kv=2, head_dim=64, block_size=64, cmp_block=32, cmp_stride=16,
                                top_n=8, window=128, cmp_mask=m, dtype=dt, window_keys=rng.choice(tuple(WINDOW_KEYS)),
                                forced_blocks=rng.choice(FORCED_BLOCKS), seed=seed + 2000 + 100 * i + 10 * j + k))
    return dedupe_cases(out)


def _paper(seed: int, dtype: str, **kw) -> Case:
    base = dict(batch=1, heads_q=16, heads_kv=1, head_dim=192, head_dim_v=128, cmp_block=32, cmp_stride=16,
                block_size=64, top_n=16, window=512, dtype=dtype, seed=seed)
    base.update(kw)
    return Case(**base)


def paper(seed: int = 0) -> list[Case]:
    return dedupe_cases([_paper(seed + i, "bfloat16", seq_len=t) for i, t in enumerate((1024, 2048, 4096, 8192))])


def gpu(seed: int = 0) -> list[Case]:
    out = []
    for j, dt in enumerate(("float16", "bfloat16")):
        s = seed + 100 * j
        out += [_paper(s + i, dt, seq_len=t) for i, t in enumerate((1024, 4096))]
        out += [
            _paper(s + 10, dt, seq_len=1000),                          # T not a multiple of the block size
            _paper(s + 11, dt, seq_len=40),                            # T < block size
            _paper(s + 12, dt, seq_len=4096, q_len=1),                 # decode
            _paper(s + 13, dt, seq_len=4096, q_len=64),                # chunked prefill
            _paper(s + 14, dt, seq_len=3000, cu_seqlens=(0, 1000, 1100, 3000)),  # varlen
        ]
        for g, (hq, h) in enumerate(((16, 1), (32, 1), (64, 1), (64, 4))):
            for k, (dk, dv) in enumerate(((64, 64), (128, 128), (192, 128))):
                out.append(_paper(s + 20 + 3 * g + k, dt, seq_len=2048, heads_q=hq, heads_kv=h, head_dim=dk, head_dim_v=dv))
        # l = d = l' (FLA, nsa-impl, TileLang's kernel use one block size): the same edges
        out += [
            _fla(s + 40, dt, seq_len=2048),
            _fla(s + 41, dt, seq_len=1000),                            # T not a multiple of the block size
            _fla(s + 42, dt, seq_len=4096, heads_q=64, heads_kv=4),    # the FLA layer's head layout, G = 16
            _fla(s + 43, dt, seq_len=2048, heads_q=32, heads_kv=1, head_dim=64, head_dim_v=64),  # G = 32
            _fla(s + 44, dt, seq_len=4096, q_len=1),                   # decode
            _fla(s + 45, dt, seq_len=2048, block_indices="random"),    # kernel-level selection check
            _fla(s + 46, dt, seq_len=3000, cu_seqlens=(0, 1000, 1100, 3000)),  # varlen
            _fla(s + 47, dt, seq_len=200, head_dim=64, head_dim_v=64),  # small enough for the fp64 gradient truth
        ]
    return dedupe_cases(out)


def _fla(seed: int, dtype: str, **kw) -> Case:
    """Paper-like with l = d = l' = 64, n = 16, w = 512, G = 16, D = DV = 128 (the FLA layer's defaults)."""
    base = dict(batch=1, heads_q=16, heads_kv=1, head_dim=128, head_dim_v=128, block_size=64, top_n=16,
                window=512, dtype=dtype, seed=seed)
    base.update(kw)
    return Case(**base)


def corpus_dirs() -> list[Path]:
    """The folders of the ``regressions`` profile: the shipped corpus and ``./cases/regressions`` (the default
    ``nsaconf search --corpus``) when that is another folder."""
    here = (Path.cwd() / "cases" / REGRESSIONS).resolve()
    return [SHIPPED_CORPUS] + ([here] if here != SHIPPED_CORPUS and here.is_dir() else [])


def regressions(seed: int = 0) -> list[Case]:
    """The regression corpus: each entry is a minimal failing case that ``nsaconf search`` found, replayed as
    it was found (its own seed: ``--seed`` does not change it)."""
    return dedupe_cases([c for d in corpus_dirs() if d.is_dir() for c in load_cases(d)])


GENERATORS: dict[str, Callable[[int], list[Case]]] = {"smoke": smoke, "ci": ci, "full": full, "paper": paper, "gpu": gpu,
                                                      REGRESSIONS: regressions}


def profile_cases(name: str, seed: int = 0) -> list[Case]:
    """The cases of profile ``name`` (one of ``PROFILES``)."""
    if name not in GENERATORS:
        raise CaseError(f"unknown profile {name!r}; known profiles: {', '.join(PROFILES)}")
    return GENERATORS[name](seed)
