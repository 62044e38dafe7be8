"""CPU tests of the in-house cuTile oracles (issue 6): registration, availability and supports()
reasons, the device-side top-n / Eq. 9 glue against the reference rule, the FLOP/byte model and the
performance section. GPU tests (marked ``gpu``) run the kernels against the fp64 reference."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from nsaconf.cases.conventions import eq9_weights, max_forced
from nsaconf.cases.model import Case
from nsaconf.cases.tensors import materialize
from nsaconf.oracles.base import get_oracle, registry
from nsaconf.oracles.reference import nsa_reference, select_blocks


def test_registered_with_declarations():
    reg = registry()
    e2e, ker = reg["inhouse_cutile"], reg["inhouse_cutile_kernels"]
    assert e2e.layer == "e2e" and set(e2e.branches) == {"cmp_o", "cmp_lse", "topk_idx", "slc_o", "swa_o", "o"}
    assert ker.layer == "kernel" and ker.needs_block_indices and "topk_idx" not in ker.branches
    assert e2e.devices == ("cuda",) and "float64" not in e2e.dtypes


def test_oracles_run_the_forward_with_their_config(monkeypatch):
    """Both oracles call ``nsa_forward`` with their ``config`` (the default ``KernelConfig``; a subclass may set
    another): the e2e oracle with its own top-n, the kernel oracle with the given indices (CPU, no kernel)."""
    from nsaconf.oracles.inhouse_cutile import forward as F
    from nsaconf.oracles.inhouse_cutile.config import DEFAULT, KernelConfig
    seen = []
    monkeypatch.setattr(F, "nsa_forward", lambda case, inputs, **kw: seen.append(kw) or {})
    case = Case(seq_len=64, heads_q=2, heads_kv=1, head_dim=16, block_size=16, top_n=3, window=8, dtype="float32")
    x = materialize(case, "cpu")
    e2e, ker = get_oracle("inhouse_cutile"), get_oracle("inhouse_cutile_kernels")
    e2e.run(case, x, "cpu")
    ker.run(case, x, "cpu", block_indices=torch.zeros(1, 64, 1, 3, dtype=torch.long))
    assert [kw["config"] for kw in seen] == [DEFAULT, DEFAULT] and seen[0]["block_indices"] is None
    assert seen[1]["branches"] == ("cmp_o", "cmp_lse", "slc_o", "swa_o")
    other = KernelConfig(chunk_blocks=4)
    monkeypatch.setattr(type(e2e), "config", other)
    e2e.run(case, x, "cpu")
    assert seen[-1]["config"] is other
    assert e2e.versions()["kernel_config"] == repr(other) and "cuda-tile" in e2e.versions()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only availability message")
def test_unavailable_on_cpu_says_how_to_enable():
    why = get_oracle("inhouse_cutile").check_support(Case(), "cuda")
    assert why and "cuda-tile 1.7.0" in why and "nvidia-cuda-tileiras==13.4.92" in why and "pip install" in why
    assert get_oracle("inhouse_cutile").check_support(Case(), "cpu")


@pytest.mark.parametrize("kw,word", [(dict(head_dim=320), "head_dim"), (dict(head_dim=64, head_dim_v=512), "head_dim"),
                                     (dict(block_size=512, cmp_block=16, cmp_stride=16), "block_size"),
                                     (dict(heads_q=256, heads_kv=1), "group")])
def test_supports_reasons(kw, word):
    why = get_oracle("inhouse_cutile").supports(Case(**kw), "cuda")
    assert why and word in why
    assert get_oracle("inhouse_cutile").supports(Case(head_dim=192, head_dim_v=128, heads_q=64, heads_kv=1), "cuda") is None


@pytest.mark.parametrize("forced,n", [(f, n) for f in ("none", "current", "initial_local") for n in (1, 3, 16)
                                      if n >= max_forced(f)])  # fewer is not a valid case
def test_top_n_matches_reference_rule_with_exact_ties(forced, n):
    from nsaconf.oracles.inhouse_cutile.forward import top_n
    g = torch.Generator().manual_seed(n)
    case = Case(seq_len=120, block_size=8, top_n=n, forced_blocks=forced, heads_q=2, heads_kv=2)
    imp = torch.rand((1, 50, 2, 15), generator=g)
    imp = torch.where(torch.rand(imp.shape, generator=g) < 0.3, torch.zeros_like(imp), torch.round(imp * 4) / 4)
    pos = torch.arange(70, 120)
    want = select_blocks(case, imp[0].double(), pos)
    got = top_n(imp, pos, n, 8, forced)[0]
    assert torch.equal(want, got)


@pytest.mark.parametrize("forced", ["current", "initial_local"])
@pytest.mark.parametrize("ls,T,q_off", [(8, 200, 0), (16, 100, 37), (4, 61, 60), (32, 30, 0)])
def test_top_n_is_forced_plus_top_n_of_the_others(forced, ls, T, q_off):
    """What the shared-forced selection relies on: for every rule and every n >= its forced count,
    top_n(n) = the forced candidates + top_n_others(n - max_forced), per row (ties and zeros included)."""
    from nsaconf.cases.conventions import is_forced, selection_candidate
    from nsaconf.oracles.inhouse_cutile.forward import top_n, top_n_others
    g = torch.Generator().manual_seed(ls * T + q_off)
    NS = -(-T // ls)
    pos = torch.arange(q_off, T)
    imp = torch.round(torch.rand((1, T - q_off, 2, NS), generator=g) * 3) / 3          # many exact ties and zeros
    j = torch.arange(NS)
    forced_set = (is_forced(forced, j[None], pos[:, None], ls) & selection_candidate(j[None], pos[:, None], ls))
    for n in range(max_forced(forced), NS + 3):
        want = top_n(imp, pos, n, ls, forced)[0]
        others = top_n_others(imp, pos, n - max_forced(forced), ls, forced)[0]
        for r in range(T - q_off):
            f = set(j[forced_set[r]].tolist())
            for h in range(2):
                got = f | set(others[r, h][others[r, h] >= 0].tolist())
                assert got == set(want[r, h][want[r, h] >= 0].tolist()), (n, r, h)
                assert not f & set(others[r, h].tolist())


@pytest.mark.parametrize("forced,q_off,ls,T", [("initial_local", 0, 16, 150), ("initial_local", 37, 16, 150),
                                               ("current", 5, 16, 150), ("initial_local", 0, 64, 100),
                                               ("initial_local", 0, 64, 40)])
def test_forced_list_is_each_querys_forced_candidates(forced, q_off, ls, T):
    """Also when the sequence has fewer blocks than forced slots (T = 100 or 40 with l' = 64)."""
    from nsaconf.cases.conventions import is_forced, selection_candidate
    from nsaconf.oracles.inhouse_cutile.forward import forced_list
    TQ, NS = T - q_off, -(-T // ls)
    fl = forced_list(q_off, TQ, NS, ls, forced, "cpu")
    assert fl.dtype == torch.int32 and fl.shape == (TQ, max_forced(forced))
    j = torch.arange(NS)
    for i in range(TQ):
        p = q_off + i
        want = j[is_forced(forced, j, p, ls) & selection_candidate(j, p, ls)].tolist()
        assert fl[i].tolist() == want + [-1] * (fl.shape[1] - len(want))


@pytest.mark.parametrize("forced,q_off,ls,T", [("initial_local", 0, 16, 150), ("initial_local", 4, 64, 300),
                                               ("initial_local", 8, 64, 300),
                                               ("current", 8, 32, 200), ("initial_local", 0, 64, 40)])
def test_window_forced_split_covers_the_forced_blocks_once(forced, q_off, ls, T):
    """``window_forced_plan``: the selection kernel's forced blocks (``forced_list(.., nlocal)``) and the
    local blocks the window kernel takes (``p//l' - nlocal + 1 .. p//l'``, clipped at 0) are together exactly
    each query's forced candidates, with no overlap; every local key ``s <= p`` is inside the window of p
    (what lets one softmax state serve both branches); no plan when a window misses them, when one window
    tile's queries straddle two blocks (the tile comes from ``KernelConfig.window_tile``) or without a window."""
    from nsaconf.cases.conventions import WINDOW_KEYS, is_forced, selection_candidate
    from nsaconf.cases.model import Case
    from nsaconf.oracles.inhouse_cutile import forward as F
    from nsaconf.oracles.inhouse_cutile.config import KernelConfig
    case = Case(seq_len=T, q_len=T - q_off, block_size=ls, forced_blocks=forced, window=2 * ls, window_keys="w")
    want_nlocal = 2 if forced == "initial_local" else 1
    nlocal = F.window_forced_plan(case, 16, q_off)
    assert nlocal == want_nlocal
    for w, wk in ((2 * ls - 1, "w"), (2 * ls - 2, "w_plus_1")):     # the farthest local key is 2*ls-1 back
        short = Case(seq_len=T, q_len=T - q_off, block_size=ls, forced_blocks=forced, window=w, window_keys=wk)
        assert (F.window_forced_plan(short, 16, q_off) is None) == (want_nlocal == 2)
    assert F.window_forced_plan(case, 16, q_off + 1) is None       # queries of one window tile in two blocks
    # 128-row window tiles: 8 queries of a group of 16 heads per tile, so q_off must be a multiple of 8
    assert (F.window_forced_plan(case, 16, q_off, KernelConfig(window_tile=(128, 64))) is None) == (q_off % 8 != 0)
    no_window = Case(seq_len=T, q_len=T - q_off, block_size=ls, forced_blocks=forced, window=0)
    assert F.window_forced_plan(no_window, 16, q_off) is None
    TQ, NS = T - q_off, -(-T // ls)
    fl = F.forced_list(q_off, TQ, NS, ls, forced, "cpu", nlocal=nlocal)
    assert fl.shape == (TQ, max_forced(forced) - nlocal)
    j = torch.arange(NS)
    for i in range(TQ):
        p = q_off + i
        want = set(j[is_forced(forced, j, p, ls) & selection_candidate(j, p, ls)].tolist())
        c = p // ls
        local = set(range(max(c - nlocal + 1, 0), c + 1))
        sel_part = [x for x in fl[i].tolist() if x >= 0]
        assert not local & set(sel_part) and len(set(sel_part)) == len(sel_part)
        assert local | set(sel_part) == want, (p, local, sel_part, want)
        keys = torch.arange(max(c - nlocal + 1, 0) * ls, p + 1)
        assert bool(WINDOW_KEYS["w"](p, keys, case.window).all())


@pytest.mark.parametrize("rule", [f"cmp:{m}" for m in ("end_inclusive", "current_block", "anti_causal", "end_exclusive")]
                         + ["window:w", "window:w_plus_1"])
@pytest.mark.parametrize("l,d,w", [(32, 16, 7), (16, 16, 64), (64, 64, 512)])
def test_tile_fully_visible_iff_two_corners_are(rule, l, d, w):
    """What ``kernels._tile_all_visible`` relies on: for every convention, a tile of keys ``c0..c1`` x
    positions ``p0..p1`` is visible everywhere exactly when ``(c1, p0)`` and ``(c0, p1)`` are."""
    from nsaconf.cases.conventions import CMP_MASKS, WINDOW_KEYS
    kind, name = rule.split(":")
    vis = (lambda c, p: CMP_MASKS[name](c, p, l, d)) if kind == "cmp" else (lambda c, p: WINDOW_KEYS[name](p, c, w))
    g = torch.Generator().manual_seed(l + d + w)
    n_full = 0
    def rand(hi: int) -> int:
        return int(torch.randint(0, max(1, hi), (1,), generator=g))
    for _ in range(400):       # tiles around the rule's edges: blocks up to p/d (+ a few), keys near p - w .. p
        p0 = rand(700)
        c0 = rand(p0 // d + 4) if kind == "cmp" else max(0, p0 - rand(w + 12) + 4)
        c1 = c0 + (rand(6) if kind == "cmp" else rand(min(70, w + 8)))
        p1 = p0 + rand(20)
        c, p = torch.arange(c0, c1 + 1)[None, :], torch.arange(p0, p1 + 1)[:, None]
        full = bool(vis(c, p).all())
        corners = bool(vis(torch.tensor(c1), torch.tensor(p0))) and bool(vis(torch.tensor(c0), torch.tensor(p1)))
        assert full == corners, (rule, c0, c1, p0, p1)
        n_full += full
    assert 0 < n_full < 400       # both outcomes were exercised


def _stream_topn_model(key: torch.Tensor, n: int, tr: int, cw: int) -> torch.Tensor:
    """The algorithm of ``topn_stream_kernel`` on packed keys ``[rows, cols]`` (-1 = not a candidate), in
    torch: a running top-n per tile of ``tr`` rows updated chunk by chunk, with as many extraction steps
    as the chunk's rows have valid keys above their current n-th best (at most n); empty slots start as
    ``-1 - slot`` and the worst slot is the one equal to the row minimum; only valid keys enter. Returns
    the kept sets (empty = -1), sorted."""
    out = []
    cols = torch.arange(n)
    for r0 in range(0, key.shape[0], tr):
        k = key[r0:r0 + tr]
        best = (-1 - cols).expand(k.shape[0], n).clone()
        for c0 in range(0, key.shape[1], cw):
            ch = k[:, c0:c0 + cw].clone()
            worst = best.amin(1, keepdim=True)
            for _ in range(min(n, int((ch > worst.clamp(min=-1)).sum(1).max()))):
                m = ch.amax(1, keepdim=True)
                worst = best.amin(1, keepdim=True)
                best = torch.where((best == worst) & (m > worst) & (m >= 0), m, best)
                ch = torch.where(ch == m, torch.full_like(ch, -1), ch)
        out.append(torch.where(best < 0, torch.full_like(best, -1), best).sort(1).values)
    return torch.cat(out)


@pytest.mark.parametrize("n", [1, 3, 13, 16])
def test_streaming_topn_algorithm_keeps_exactly_the_top_n(n):
    """The step bound (extract only while some row has keys above its n-th best) loses no key; finding the
    worst slot by value keeps the slots distinct (rows with fewer than n candidates included)."""
    g = torch.Generator().manual_seed(n)
    rows, cols = 64, 512
    score = torch.rand((rows, cols), generator=g)
    score = torch.where(torch.rand(score.shape, generator=g) < 0.2, torch.zeros_like(score), score)   # ties at 0
    j = torch.arange(cols)
    key = (score.view(torch.int32).to(torch.int64) << 32) | (cols - 1 - j)
    last = torch.randint(1, cols, (rows, 1), generator=g)           # causal-like candidate ranges
    sparse_start = (torch.arange(rows)[:, None] % 3 == 0) & (j < 128) & (j % 20 != 0)   # few early candidates,
    key = torch.where((score > 0) & (j < last) & ~sparse_start, key, torch.full_like(key, -1))   # many later
    want = key.topk(n, 1).values
    want = torch.where(want < 0, torch.full_like(want, -1), want).sort(1).values
    assert torch.equal(_stream_topn_model(key, n, 16, 128), want)
    assert torch.equal(_stream_topn_model(key, n, 8, 64), want)
    assert torch.equal(_stream_topn_model(key, n, 64, 8), want)


@pytest.mark.parametrize("l,d,ls", [(32, 16, 64), (16, 16, 32), (64, 64, 64), (8, 8, 16)])
def test_importance_is_eq9(l, d, ls):
    from nsaconf.oracles.inhouse_cutile.forward import importance
    T = 300
    nc, ns = -(-T // d), -(-T // ls)
    p = torch.rand((1, 7, 2, nc))
    want = p.double() @ eq9_weights(nc, ns, l, d, ls)
    assert torch.allclose(importance(p, l, d, ls, T).double(), want, rtol=1e-6, atol=1e-6)


def test_flop_and_byte_model_paper_config():
    from nsaconf.harness.bench import branch_costs, cost_of, dense_causal_cost
    c = Case(seq_len=4096, heads_q=64, heads_kv=4, head_dim=128, block_size=64, top_n=16, window=512, dtype="bfloat16")
    costs = branch_costs(c)
    T, HQ, D = 4096, 64, 128
    # selection: min(n*l', p+1) keys per query, 2 flops per MAC, QK and PV
    keys = sum(min(16 * 64, p + 1) for p in range(T))
    assert costs["slc"].flops == pytest.approx(2 * HQ * keys * 2 * D)
    # compression, end_inclusive, l=d=64: block c visible iff 64c + 63 <= p -> (p+1)//64 blocks
    ncmp = sum((p + 1) // 64 for p in range(T))
    assert costs["cmp"].flops == pytest.approx(2 * HQ * ncmp * 2 * D)
    assert costs["swa"].flops == pytest.approx(2 * HQ * sum(min(512, p + 1) for p in range(T)) * 2 * D)
    assert dense_causal_cost(c).flops == pytest.approx(2 * HQ * T * (T + 1) / 2 * 2 * D)
    # bytes: q, k, v once + the returned output
    assert cost_of(c, ("slc_o",)).bytes == (T * HQ * D + 2 * T * 4 * D + T * HQ * D) * 2


def test_performance_section_renders():
    from nsaconf.reports.performance import render_performance_section
    assert "No timings" in render_performance_section([])
    rec = dict(case="c<1>", oracle="inhouse_cutile", layer="e2e", branches=["o"], ms=2.0, ratio_to_fastest=1.0,
               flops=1e12, bytes=1e9, floor_ms=1.5, pct_of_floor=75.0, device="H100", ceilings={"matmul_tflops": 700})
    html = render_performance_section([rec, dict(rec, oracle="fla", ms=4.0, ratio_to_fastest=2.0)])
    assert "c&lt;1&gt;" in html and "2.00&times;" in html and "75.0 %" in html and "<b>2.000</b>" in html


def _tileiras() -> bool:
    """tileiras 13.4 on PATH or from the ``nvidia-cuda-tileiras`` wheel (where cuda.tile finds it)."""
    import importlib.util
    import os
    spec = importlib.util.find_spec("nvidia")
    wheel = any(os.path.exists(os.path.join(p, "cu13", "bin", "tileiras")) for p in (spec.submodule_search_locations or [])) \
        if spec else False
    return shutil.which("tileiras") is not None or wheel


@pytest.mark.slow
@pytest.mark.skipif(not _tileiras(), reason="needs tileiras 13.4 (PATH or nvidia-cuda-tileiras) to compile sm_90 cubins on the CPU")
def test_kernels_compile_for_sm90(capsys, tmp_path):
    pytest.importorskip("cuda.tile", reason="cuda-tile 1.7.0 not installed")
    from nsaconf.oracles.inhouse_cutile.compile_check import main
    assert main([]) == 0
    # with run-time alignment: the gated chunked selection of the default configuration (4 queries per program,
    # 2 blocks per step) uses TMA loads and mma.sync m16n8k16 (16-row tiles are below wgmma's 64), 256 threads x
    # 128 registers without spills and <= 114 KB of shared memory: the layout two CTAs per SM need
    capsys.readouterr()
    assert main(["bfloat16", "CH2 NP16 LS64 D128 slc=False", "--stats"]) == 0
    lines = capsys.readouterr().out.splitlines()
    stats = [dict(kv.split("=", 1) for kv in line.split()) for line in lines if line.startswith("     ")]
    assert len(stats) == 1 and "qpp4 occupancy=2" in lines[0]
    s = stats[0]
    assert s["mma_shapes"] == "m16n8k16" and int(s["tma"]) > 0 and s["wgmma"] == "0"
    assert int(s["smem_bytes"]) <= 114 * 1024
    assert (s["threads"], s["registers"], s["spill_stores"]) == ("256", "128", "0")
    # --ptx: the PTX body of each variant (label on the first line), for diffing a kernel refactor
    out = tmp_path / "ptx"
    assert main(["bfloat16", "NP14 LS64 D128", "--ptx", str(out)]) == 0
    bodies = sorted(out.glob("*.ptx"))
    assert len(bodies) == 2 and all("mma" in b.read_text() and ".loc" not in b.read_text() for b in bodies)
    assert bodies[0].read_text().startswith("selection_chunk G16/16 CH2 NP14 LS64 D128")
    assert main(["bfloat16", "x", "--ptx"]) == 2


GPU_CASES = [
    Case(seq_len=1000, heads_q=16, heads_kv=1, head_dim=192, head_dim_v=128, cmp_block=32, cmp_stride=16, block_size=64,
         top_n=16, window=512, dtype="bfloat16"),
    Case(seq_len=130, q_len=7, heads_q=6, heads_kv=2, head_dim=40, block_size=24, cmp_block=24, cmp_stride=8, top_n=4,
         window=33, dtype="float16", cmp_mask="anti_causal", window_keys="w_plus_1", forced_blocks="current"),
    Case(seq_len=40, heads_q=4, heads_kv=4, head_dim=64, block_size=64, top_n=3, window=16, dtype="float32",
         cmp_mask="current_block", block_indices="random"),
    Case(seq_len=300, heads_q=32, heads_kv=2, head_dim=64, block_size=32, top_n=5, window=0, dtype="float16"),
]


def _assert_close_to_truth(name, got, truth, base):
    """The GPU tests' rule: the same non-finite pattern as the fp64 truth and a max error of at most twice the
    reference's own in the case dtype, + 1e-2."""
    t, got, b = truth.double(), got.double(), base.double()
    fin = torch.isfinite(t)
    assert torch.equal(torch.isfinite(got), fin), f"{name}: non-finite pattern differs"
    err = float((got[fin] - t[fin]).abs().max())
    berr = float((b[fin] - t[fin]).abs().max())
    assert err <= 2 * berr + 1e-2, f"{name}: err {err:.3e} vs baseline {berr:.3e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_gpu_matches_fp64_reference(case):
    oracle = get_oracle("inhouse_cutile")
    why = oracle.check_support(case, "cuda")
    if why:
        pytest.skip(why)
    x = materialize(case, "cuda")
    truth = nsa_reference(case, x, dtype=torch.float64)
    base = nsa_reference(case, x, dtype=None)
    out = oracle.run(case, x, "cuda")
    for name in ("cmp_o", "cmp_lse", "slc_o", "swa_o", "o"):
        if name in truth:
            _assert_close_to_truth(name, out[name], truth[name], base[name])
    assert torch.equal(torch.sort(out["topk_idx"].cpu(), -1).values, torch.sort(truth["topk_idx"].cpu(), -1).values)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_gpu_forward_without_topk_matches_fp64_reference(case):
    """The paths of ``nsa_forward`` that the oracles (which return ``topk_idx``) do not take and the benchmarks
    time: without ``topk_idx`` the selection gets the forced blocks by rule + the top-n of the others, and where
    the window holds the forced local blocks the window kernel finishes slc_o and o. Same rule as above."""
    from nsaconf.oracles.inhouse_cutile.forward import nsa_forward
    why = get_oracle("inhouse_cutile").check_support(case, "cuda")
    if why:
        pytest.skip(why)
    x = materialize(case, "cuda")
    truth = nsa_reference(case, x, dtype=torch.float64)
    base = nsa_reference(case, x, dtype=None)
    for branches in (("o",), ("slc_o", "swa_o", "o")):
        out = nsa_forward(case, x, branches=branches)
        assert set(out) == {b for b in branches if b in truth}
        for name, got in out.items():
            _assert_close_to_truth(f"{branches}: {name}", got, truth[name], base[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", [c for c in GPU_CASES if c.cu_seqlens is None], ids=lambda c: c.id)
def test_gpu_topn_kernel_equals_torch_rule(case):
    """The streaming top-n kernel picks exactly the blocks of the torch statement of the rule (``top_n``), and its
    others-only form those of ``top_n_others``, on the same importance; with l = d = l' the importance beyond
    the blocks the compression writes holds 3e38, so a read outside the candidates would show."""
    pytest.importorskip("cuda.tile", reason="cuda-tile 1.7.0 not installed")
    from nsaconf.oracles.inhouse_cutile import forward as F
    why = get_oracle("inhouse_cutile").check_support(case, "cuda")
    if why:
        pytest.skip(why)
    x = materialize(case, "cuda")
    l, d, ls, T = case.cmp_block, case.cmp_stride, case.block_size, case.seq_len
    kc, vc = F.mean_pool(x.k, x.v, l, d)
    args = (x.q, kc, vc, T, l, d, case.cmp_mask, case.softmax_scale)
    imp = F.importance(F.compression(*args, want_importance=True)[2], l, d, ls, T)
    imp_k = F.compression(*args, want_importance=True, importance_fill=3.0e38)[2] if l == d == ls else imp
    pos = torch.arange(case.q_offset, T, device="cuda")
    got = F.top_n_cutile(imp_k, case.q_offset, case.top_n, ls, case.forced_blocks)
    assert torch.equal(got, F.top_n(imp, pos, case.top_n, ls, case.forced_blocks))
    mf = max_forced(case.forced_blocks)
    if mf and case.top_n > mf:
        got = F.top_n_cutile(imp_k, case.q_offset, case.top_n - mf, ls, case.forced_blocks, others=True)
        assert torch.equal(got, F.top_n_others(imp, pos, case.top_n - mf, ls, case.forced_blocks))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_bench_command_without_gpu_exits_2(tmp_path, capsys):
    from nsaconf.harness.cli import main
    assert main(["bench", "--case", "examples/case.json", "--out", str(tmp_path)]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_bench_records_and_ratios(tmp_path):
    from nsaconf.harness.bench import Ceilings, cost_of, fill_ratios, make_record, write_records
    c = Case(seq_len=256, heads_q=4, heads_kv=1, head_dim=32, block_size=16, top_n=4, dtype="bfloat16")
    ceil = Ceilings(700.0, 3000.0, "test-card")
    recs = [make_record(c, n, "e2e", ("o",), ms, 20, cost_of(c, ("o",)), ceil) for n, ms in (("a", 2.0), ("b", 3.0))]
    fill_ratios(recs)
    assert [r.ratio_to_fastest for r in recs] == [1.0, 1.5]
    assert 0 < recs[0].pct_of_floor < 100 and recs[0].floor_ms > 0
    path = write_records(tmp_path, recs)
    assert [json.loads(line)["oracle"] for line in path.read_text().splitlines()] == ["a", "b"]


def test_kernel_config_defaults_frozen_and_checked():
    """``KernelConfig``: the measured defaults, frozen (no run-time flips), bad values refused, and the kernel
    constants derived from it the way the forward launches them."""
    import dataclasses
    from nsaconf.oracles.inhouse_cutile.config import DEFAULT, KernelConfig
    assert DEFAULT == KernelConfig() and dataclasses.asdict(DEFAULT) == {
        "cmp_tile": (64, 64), "window_tile": (64, 64), "cmp_one_pass_tiles": 4, "chunk_blocks": 2,
        "sel_queries_per_program": 4, "sel_occupancy": 2, "topn_stream_tile": (64, 8), "topn_occupancy": 4,
        "pool_occupancy": 4}
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT.chunk_blocks = 4
    for bad in (dict(cmp_tile=(48, 64)), dict(window_tile=(64,)), dict(topn_stream_tile=(64, 0)), dict(chunk_blocks=3),
                dict(sel_queries_per_program=0), dict(sel_occupancy=True), dict(cmp_one_pass_tiles=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            KernelConfig(**bad)
    assert DEFAULT.dense_tile(True, 16) == (16, 4, 64) and DEFAULT.dense_tile(False, 3) == (4, 16, 64)
    assert KernelConfig(cmp_tile=(128, 32)).dense_tile(True, 1) == (1, 128, 32)
    assert [DEFAULT.one_pass_tiles(nc, 64) for nc in (7, 256, 257)] == [1, 4, 0]
    assert [DEFAULT.chunk(n, 64) for n in (1, 3, 16)] == [1, 2, 2] and KernelConfig(chunk_blocks=4).chunk(16, 128) == 2
    assert DEFAULT.topn_tile(1000) == (64, 8) and KernelConfig(topn_stream_tile=(16, 128)).topn_tile(20) == (16, 32)


def _launches(monkeypatch):
    """Record ``forward._launch(kernel, grid, args)`` calls instead of launching (CPU)."""
    from nsaconf.oracles.inhouse_cutile import forward as F
    calls = []
    monkeypatch.setattr(F, "_launch", lambda kernel, grid, args: calls.append((kernel, args)))
    return calls


def _params(kernel) -> list[str]:
    import inspect
    return list(inspect.signature(kernel._annotated_function.pyfunc).parameters)


@pytest.mark.parametrize("gated,want_slc,window", [(False, True, False), (True, False, False), (True, True, True)])
def test_selection_chunked_passes_every_kernel_parameter(monkeypatch, gated, want_slc, window):
    """The host side of the gated chunked selection kernel: one argument per kernel parameter, the epilogue
    flags in place, and the buffers it returns are the ones the kernel writes (CPU, no launch)."""
    pytest.importorskip("cuda.tile", reason="cuda-tile 1.7.0 not installed")
    from nsaconf.oracles.inhouse_cutile import forward as F
    calls = _launches(monkeypatch)
    B, T, HQ, H, D, n = 1, 256, 16, 1, 64, 4
    q, k, v = torch.randn(B, T, HQ, D), torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    idx = torch.randint(0, T // 64, (B, T, H, n))
    g = [torch.rand(B, T, HQ) for _ in range(3)]
    cmp_o, swa_o = torch.randn(B, T, HQ, D), (torch.randn(B, T, HQ, D) if window else None)
    res = F.selection_chunked(q, k, v, idx, 64, 0.1, gated=(cmp_o, swa_o, *g) if gated else None, want_slc=want_slc)
    (kernel, args), = calls
    names = _params(kernel)
    assert len(args) == len(names)
    a = dict(zip(names, args))
    assert (a["WRITE_SLC"], a["GATES"], a["WINDOW"]) == (want_slc or not gated, gated, window)
    if gated:
        slc, o = res
        assert a["OUT"] is o and a["CMP"] is cmp_o and a["SWA"] is (swa_o if window else cmp_o)
        assert torch.equal(a["GC"], g[0]) and torch.equal(a["GS"], g[1]) and torch.equal(a["GW"], g[2])
        assert (slc is a["O"]) if want_slc else slc is None
    else:
        assert res is a["O"] and res.shape == (B, T, HQ, D)


@pytest.mark.parametrize("qpp,chunk_blocks", [(4, 2), (1, 2), (3, 4), (2, 1)])
def test_selection_partial_host_side(monkeypatch, qpp, chunk_blocks):
    """``selection_partial`` and ``selection_chunked`` launch ceil(TQ / sel_queries_per_program) programs per kv
    head with one argument per kernel parameter and CH = ``KernelConfig.chunk``; the index rows are padded with -1
    to pow2 of the kernel's NP (one aligned load; the kernel reads the first NP): n for the partial result, a
    multiple of CH for the chunked entry point (CPU, no launch)."""
    pytest.importorskip("cuda.tile", reason="cuda-tile 1.7.0 not installed")
    from nsaconf.oracles.inhouse_cutile import forward as F
    from nsaconf.oracles.inhouse_cutile import kernels as K
    from nsaconf.oracles.inhouse_cutile.config import KernelConfig
    cfg = KernelConfig(sel_queries_per_program=qpp, chunk_blocks=chunk_blocks, sel_occupancy=3)
    calls = []
    monkeypatch.setattr(F, "_launch", lambda kernel, grid, args: calls.append((kernel, grid, args)))
    B, T, HQ, H, D, n = 1, 10, 8, 2, 32, 14
    q, k, v = torch.randn(B, T, HQ, D), torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    idx = torch.randint(-1, 3, (B, T, H, n))
    o, lse = F.selection_partial(q, k, v, idx, 64, 0.1, config=cfg)
    (kernel, grid, args), = calls
    assert kernel._annotated_function.pyfunc is K.selection_chunk_kernel._annotated_function.pyfunc
    assert F._hinted(K.selection_chunk_kernel, 3) is kernel          # the config's occupancy hint
    names = _params(K.selection_chunk_kernel)
    assert len(args) == len(names)
    a = dict(zip(names, args))
    assert grid == (-(-T // qpp), B * H, 1) and a["QPP"] == qpp and a["CH"] == chunk_blocks
    assert (a["NP"], a["NPP"]) == (n, 16) and a["O"] is o and a["LSE"] is lse and a["WRITE_LSE"] is True
    assert a["IDX"].dtype == torch.int32 and torch.equal(a["IDX"][..., :n], idx.to(torch.int32))
    assert a["IDX"].shape[-1] == 16 and bool((a["IDX"][..., n:] == -1).all())
    calls.clear()      # the chunked entry point: rows padded to NP (a multiple of CH), then to pow2(NP)
    F.selection_chunked(q, k, v, idx[..., :13], 64, 0.1, config=cfg)
    (kernel, grid, args), = calls
    a = dict(zip(names, args))
    NP = -(-13 // chunk_blocks) * chunk_blocks
    assert grid == (-(-T // qpp), B * H, 1) and (a["NP"], a["NPP"], a["QPP"]) == (NP, 16, qpp)
    assert a["WRITE_LSE"] is False and a["IDX"].shape[-1] == 16
    assert torch.equal(a["IDX"][..., :13], idx[..., :13].int()) and bool((a["IDX"][..., 13:] == -1).all())


@pytest.mark.parametrize("cmp_tile,window_tile", [((64, 64), (64, 64)), ((128, 32), (32, 128))])
def test_dense_kernels_take_their_tiles_from_the_config(monkeypatch, cmp_tile, window_tile):
    """``KernelConfig.cmp_tile`` / ``window_tile``: the compression, window and window-forced kernels get
    TMQ = rows // 16 queries (G = 16) and TN keys per tile and ceil(TQ / TMQ) programs per kv head, one argument
    per kernel parameter (CPU, no launch)."""
    pytest.importorskip("cuda.tile", reason="cuda-tile 1.7.0 not installed")
    from nsaconf.oracles.inhouse_cutile import forward as F
    from nsaconf.oracles.inhouse_cutile import kernels as K
    from nsaconf.oracles.inhouse_cutile.config import KernelConfig
    cfg = KernelConfig(cmp_tile=cmp_tile, window_tile=window_tile)
    calls = []
    monkeypatch.setattr(F, "_launch", lambda kernel, grid, args: calls.append((kernel, grid, args)))
    B, T, HQ, H, D = 1, 100, 32, 2, 32
    q, k, v = torch.randn(B, T, HQ, D), torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    kc, vc = torch.randn(B, 7, H, D), torch.randn(B, 7, H, D)
    g = [torch.rand(B, T, HQ) for _ in range(3)]
    F.compression(q, kc, vc, T, 16, 16, "end_inclusive", 0.1, want_importance=True, config=cfg)
    F.sliding_window(q, k, v, 32, "w", 0.1, config=cfg)
    F.window_forced(q, k, v, q, torch.zeros(B, T, HQ), q, g, 2, 64, 512, "w", 0.1, config=cfg)
    assert [kernel for kernel, _, _ in calls] == [K.dense_branch_kernel, K.dense_branch_kernel, K.window_forced_kernel]
    for (kernel, grid, args), (rows, key_tile) in zip(calls, (cmp_tile, window_tile, window_tile)):
        names = _params(kernel)
        a = dict(zip(names, args))
        assert len(args) == len(names) and a["TMQ"] == rows // 16
        assert a.get("TN", key_tile) == key_tile and grid == (-(-T // (rows // 16)), B * H, 1)
    assert calls[0][2][_params(K.dense_branch_kernel).index("IS_CMP")] is True


@pytest.mark.parametrize("nc,key_tile,limit,want", [(7, 64, 4, 1), (256, 64, 4, 4), (257, 64, 4, 0), (256, 128, 4, 2),
                                                     (256, 64, 0, 0), (200, 64, 3, 0)])
def test_compression_one_pass_when_the_blocks_fit(monkeypatch, nc, key_tile, limit, want):
    """``KernelConfig.cmp_one_pass_tiles``: the compression with importance runs in one pass (NT1 = its number of
    key tiles) when the pooled blocks fit in that many key tiles, else in two (NT1 = 0); without importance always
    two (CPU, no launch)."""
    pytest.importorskip("cuda.tile", reason="cuda-tile 1.7.0 not installed")
    from nsaconf.oracles.inhouse_cutile import forward as F
    from nsaconf.oracles.inhouse_cutile import kernels as K
    calls = []
    monkeypatch.setattr(F, "_launch", lambda kernel, grid, args: calls.append((kernel, grid, args)))
    B, T, HQ, H, D = 1, 100, 32, 2, 32
    q, kc, vc = torch.randn(B, T, HQ, D), torch.randn(B, nc, H, D), torch.randn(B, nc, H, D)
    from nsaconf.oracles.inhouse_cutile.config import KernelConfig
    cfg = KernelConfig(cmp_one_pass_tiles=limit, cmp_tile=(64, key_tile))
    F.compression(q, kc, vc, T, 16, 16, "end_inclusive", 0.1, want_importance=True, config=cfg)
    F.compression(q, kc, vc, T, 16, 16, "end_inclusive", 0.1, want_importance=False, config=cfg)
    names = _params(K.dense_branch_kernel)
    (_, _, with_imp), (_, _, without) = calls
    assert len(with_imp) == len(names)
    assert dict(zip(names, with_imp))["NT1"] == want and dict(zip(names, without))["NT1"] == 0


def test_combine_gates_passes_the_three_gates(monkeypatch):
    pytest.importorskip("cuda.tile", reason="cuda-tile 1.7.0 not installed")
    from nsaconf.oracles.inhouse_cutile import forward as F
    calls = _launches(monkeypatch)
    x = torch.randn(1, 8, 4, 16)
    g = [torch.full((1, 8, 4), float(i)) for i in range(3)]
    F.combine_gates(x, x, None, g)
    (kernel, args), = calls
    a = dict(zip(_params(kernel), args))
    assert len(args) == len(a) and [float(a[n][0, 0, 0]) for n in ("GA", "GB", "GC")] == [0.0, 1.0, 2.0]
    assert a["THREE"] is False


@pytest.mark.parametrize("branches,window,forced,ls", [
    (("o",), 32, "initial_local", 64), (("o",), 0, "initial_local", 64), (("slc_o", "o"), 32, "initial_local", 64),
    (("topk_idx", "o"), 32, "initial_local", 64), (("o",), 32, "none", 64), (("o",), 32, "initial_local", 48),
    (("slc_o", "swa_o", "o"), 64, "initial_local", 16)])
def test_nsa_forward_launch_sequence(monkeypatch, branches, window, forced, ls):
    """Which kernels ``nsa_forward`` launches, with which epilogue flags (CPU, no launch): the gated chunked
    selection epilogue writes o (slc_o only when asked for); the per-query kernel (l' not a power of two) and the
    gate kernel; the window kernel only when w > 0; with forced blocks and topk_idx not returned, the top-n picks
    n - 3 of the other blocks and the selection gets the 3 forced ones first; with a window that holds the forced
    local blocks, the selection's partial result and the window + forced-local kernel that finishes o."""
    pytest.importorskip("cuda.tile", reason="cuda-tile 1.7.0 not installed")
    from nsaconf.oracles.inhouse_cutile import forward as F
    from nsaconf.oracles.inhouse_cutile import kernels as K
    calls = _launches(monkeypatch)
    case = Case(seq_len=256, heads_q=16, heads_kv=1, head_dim=64, block_size=ls, top_n=4, window=window,
                forced_blocks=forced, dtype="bfloat16")
    out = F.nsa_forward(case, materialize(case, "cpu"), branches=branches)
    assert set(out) == set(branches)
    names = [kernel for kernel, _ in calls]
    same = lambda a, b: a._annotated_function.pyfunc is b._annotated_function.pyfunc  # noqa: E731 (hinted copies)
    (topn_args,) = [args for kernel, args in calls if same(kernel, K.topn_stream_kernel)]
    t = dict(zip(_params(K.topn_stream_kernel), topn_args))
    others = forced != "none" and "topk_idx" not in branches
    assert (t["OTHERS"], t["N"]) == ((True, 1) if others else (False, 4))
    in_window = others and F.window_forced_plan(case, 16, 0) is not None
    assert in_window == (window == 64)
    dense = [args for kernel, args in calls if same(kernel, K.dense_branch_kernel)]
    assert len(dense) == (2 if window and not in_window else 1)        # compression (+ window)
    assert any(same(kernel, K.mean_pool_kernel) for kernel in names)   # (hinted: pool_occupancy)
    sel_kernel = K.selection_chunk_kernel if ls in (16, 64) else K.selection_kernel
    (sel_args,) = [args for kernel, args in calls if same(kernel, sel_kernel)]
    a = dict(zip(_params(sel_kernel), sel_args))
    if others and not in_window:   # initial_local: forced = block 0, then cur-1 and cur once they exist
        want = [sorted({0, c - 1, c} - {-1}) for c in (p // ls for p in range(256))]
        want = torch.tensor([w + [-1] * (3 - len(w)) for w in want], dtype=torch.int32)
        assert torch.equal(a["IDX"][0, :, 0, :3], want)
    if in_window:
        (w_args,) = [args for kernel, args in calls if same(kernel, K.window_forced_kernel)]
        w = dict(zip(_params(K.window_forced_kernel), w_args))
        assert (a["WRITE_LSE"], a["GATES"], w["NLOCAL"]) == (True, False, 2) and out["o"] is w["OUT"]
        assert (w["WRITE_SWA"], w["WRITE_SLC"]) == (True, True) and out["slc_o"] is w["SLC"]
        assert K.gate_kernel not in names
    elif sel_kernel is K.selection_kernel:
        assert K.gate_kernel in names
    else:
        assert (a["WRITE_SLC"], a["GATES"], a["WINDOW"]) == ("slc_o" in branches, True, window > 0)
        assert K.gate_kernel not in names and out["o"] is a["OUT"]


def _bench_paper():
    """``benchmarks/bench_paper.py`` as a module (the benchmarks folder is not a package)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "bench_paper", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_paper.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_paper_tables_from_records(tmp_path, capsys):
    """``bench_paper.py --table FILE`` prints every timing (fastest first per group) and the speed-ups against
    FLA without window, dense SDPA and TileLang's selection; n/a where a side is missing (no GPU needed)."""
    from nsaconf.harness.bench import Ceilings, cost_of, fill_ratios, make_record
    bp = _bench_paper()
    ceil = Ceilings(700.0, 3000.0, "test-card")
    c, c_nw, c16 = bp.paper_case(4096), bp.paper_case(4096, window=0), bp.paper_case(4096, "float16")
    recs = [make_record(case, name, "e2e", ("o",), ms, 20, cost_of(case, ("o",)), ceil, group=group)
            for case, name, ms, group in ((c, "inhouse_cutile", 2.0, bp.FULL), (c, "dense causal SDPA (GQA)", 7.0, bp.DENSE),
                                          (c_nw, "inhouse_cutile", 1.5, bp.NO_WINDOW), (c_nw, "fla.parallel_nsa", 3.0, bp.NO_WINDOW),
                                          (c16, "inhouse_cutile.selection", 1.0, bp.SELECTION_FP16))]
    fill_ratios(recs)
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(__import__("dataclasses").asdict(r)) + "\n" for r in recs))
    assert bp.main(["--table", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| 4096 | fwd w/o window (cmp+topk+slc+gates) | inhouse_cutile | 1.500 | 1.00 |" in out
    assert "| 4096 | fwd w/o window (cmp+topk+slc+gates) | fla.parallel_nsa | 3.000 | 2.00 |" in out
    assert "| 4096 | 2.00x (3.00 / 1.50 ms) | 3.50x (7.00 / 2.00 ms) | n/a |" in out


@pytest.mark.parametrize("argv,word", [(["--T", "16k"], "--T"), (["--skip", "fla,flash"], "flash")])
def test_bench_paper_rejects_bad_options_before_any_gpu_work(argv, word, capsys):
    assert _bench_paper().main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert word in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_bench_paper_without_gpu_exits_2(capsys):
    assert _bench_paper().main(["--T", "4096"]) == 2
    assert "CUDA" in capsys.readouterr().err
