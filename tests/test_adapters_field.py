"""The external-checkout adapters xunhao, xunhao_sel, fsa, fsa_sel, flash_nsa and fla_main on the CPU:
registration, availability text, supports() reasons, the translation helpers and the checkout importer.
Their kernels are Triton-only (GPU results: docs/results/gpu-matrix.md). mdy666's pure-torch reference
(``flash_nsa/ops/torch_ref.py``) runs on the CPU when the flash_nsa checkout is configured."""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import canonical_order, materialize
from nsaconf.oracles import config
from nsaconf.oracles.base import convention_support, get_oracle
from nsaconf.oracles.compat.checkout_import import import_from_checkout
from nsaconf.oracles.flash_nsa import (cmp_slots, from_pages, gate_logits, page_size, paged_tables, to_pages,
                                       whole_cmp_blocks)
from nsaconf.oracles.reference import nsa_reference
from nsaconf.oracles.xunhao import (cu_seqlens_int32, gate_values, gated_sum, idx_from_canonical, idx_to_canonical, pack, unpack,
                                    window_param)
from tests.adapters_util import as_set

NAMES = ("xunhao", "xunhao_sel", "fsa", "fsa_sel", "flash_nsa", "fla_main")
KEYS = {"xunhao": "xunhao", "xunhao_sel": "xunhao", "fsa": "fsa", "fsa_sel": "fsa", "flash_nsa": "flash_nsa",
        "fla_main": "fla_main"}


def _case(**kw) -> Case:
    base = dict(seq_len=256, heads_q=16, heads_kv=1, head_dim=64, dtype="float16", block_size=64, top_n=4, window=64)
    base.update(kw)
    return Case(**base)


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_versions_and_one_line_reasons(name):
    o = get_oracle(name)
    assert o.devices == ("cuda",)
    v = o.versions()
    assert v[f"{KEYS[name]}_commit"] in (config.CHECKOUTS[KEYS[name]].commit, "unknown")
    why = o.availability()
    assert why is None or (len(why) > 20 and "\n" not in why)
    assert o.check_support(_case(), "cpu")  # GPU-only: always a reason on the CPU


@pytest.mark.parametrize("name", NAMES)
def test_missing_checkout_says_how_to_get_the_pinned_commit(name, monkeypatch, tmp_path):
    co = config.CHECKOUTS[KEYS[name]]
    monkeypatch.setenv(co.env, str(tmp_path / "nowhere"))
    msg = get_oracle(name).availability()
    assert msg and co.url in msg and co.commit[:12] in msg and co.env in msg and f"[oracles.{co.key}]" in msg
    assert get_oracle(name).versions()[f"{co.key}_commit"] == "unknown"


def test_fsa_archive_names_every_folder_it_imports():
    assert "git archive 1da34f35cb1884f4c35d3bfdf9e59ab6ae6e543a fsa fsa_preview nsa_ref" in config.how_to_enable("fsa")


@pytest.mark.parametrize("name, changes, words", [
    ("xunhao", dict(head_dim=192, head_dim_v=128), "DV must equal D"),
    ("xunhao", dict(block_size=16), "block_size (l') in {32, 64, 128, 256}"),
    ("xunhao", dict(cmp_block=32, cmp_stride=16, block_size=64, cmp_mask="end_exclusive"), "end_inclusive"),
    ("xunhao", dict(forced_blocks="current"), "init_blocks=1"),
    ("xunhao", dict(seq_len=256, q_len=64), "decode ops TQ == 1"),
    ("xunhao", dict(seq_len=256, q_len=1, cmp_block=128, cmp_stride=64, block_size=64), "block_size % kernel_size"),
    ("fsa", dict(seq_len=256, q_len=64), "decode ops TQ == 1"),
    ("fsa", dict(heads_q=32, heads_kv=1), "GQA ratios 1..16"),
    ("fsa", dict(batch=2, seq_len=256, q_len=1), "one sequence per call"),
    ("fsa_sel", dict(seq_len=256, q_len=1), "q_len == k_len"),
    ("flash_nsa", dict(cmp_block=64, cmp_stride=32, block_size=32), "block_size >= kernel_size"),
    ("flash_nsa", dict(cmp_block=48, cmp_stride=48, block_size=96), "power of 2"),
    ("flash_nsa", dict(head_dim=192, head_dim_v=128), "one head dim"),
    ("flash_nsa", dict(seq_len=256, q_len=64, cmp_block=48, cmp_stride=16, block_size=96), "select_attn.py:127"),
    ("flash_nsa", dict(seq_len=256, q_len=1, heads_q=24), "compress_attn.py:575-576"),
    ("flash_nsa", dict(seq_len=256, q_len=1, cmp_block=48, cmp_stride=16, block_size=96), "select_attn.py:679"),
    ("flash_nsa", dict(seq_len=256, q_len=1, cmp_block=8, cmp_stride=8, block_size=8), "power of 2 >= 16"),
    ("flash_nsa", dict(seq_len=256, q_len=1, head_dim=8), "head dim (>= 16)"),
    ("fla_main", dict(cmp_block=32, cmp_stride=16), "one block_size"),
])
def test_supports_names_the_limit(name, changes, words):
    why = get_oracle(name).supports(_case(**changes), "cuda")
    assert why and words in why, why


def test_supports_accepts_what_the_matrix_runs():
    assert get_oracle("xunhao").supports(_case(seq_len=1000, q_len=1, cmp_block=32, cmp_stride=16), "cuda") is None
    assert get_oracle("flash_nsa").supports(_case(cmp_block=32, cmp_stride=16, window_keys="w_plus_1"), "cuda") is None
    assert get_oracle("fsa").supports(_case(heads_q=16, heads_kv=2, cu_seqlens=(0, 100, 256)), "cuda") is None


@pytest.mark.parametrize("name", ["xunhao", "fsa"])
def test_decode_declines_lse_and_gradients(name):
    o, c = get_oracle(name), _case(seq_len=1000, q_len=1, cmp_block=32, cmp_stride=16)
    assert o.supports(c, "cuda") is None
    assert "no LSE" in o.branch_supports(c, "cmp_lse") and "no backward" in o.branch_supports(c, "dq")
    assert o.branch_supports(_case(), "dq") is None


@pytest.mark.parametrize("changes", [
    dict(seq_len=1000, cmp_block=32, cmp_stride=16),                      # l != d, T not a multiple of 128
    dict(batch=2, seq_len=512, heads_q=8, heads_kv=2, dtype="bfloat16"),  # l = d = l' = 64, G = 4
    dict(seq_len=20, cmp_block=32, cmp_stride=16, window=0),              # no compressed block yet, no window
    dict(seq_len=700, heads_q=32, block_size=256, cmp_block=64, cmp_stride=32, block_indices="random"),  # 256-token pages
    dict(seq_len=1000, q_len=300, cmp_block=32, cmp_stride=16),           # chunked prefill (nsa_prefill's ops)
    dict(seq_len=640, q_len=129, heads_q=24, window_keys="w_plus_1"),     # chunked: G = 24 (its cmp prefill is per head)
])
def test_flash_nsa_accepts_inference_cases(changes):
    o, c = get_oracle("flash_nsa"), _case(**{"q_len": 1, **changes})
    assert o.supports(c, "cuda") is None
    assert o.branch_supports(c, "cmp_lse") is None and o.branch_supports(c, "topk_idx") is None
    assert "no backward" in o.branch_supports(c, "dq") and o.branch_supports(_case(), "dq") is None


def test_pack_unpack_and_cu_seqlens():
    c = _case(batch=3, seq_len=5)
    x = torch.arange(3 * 5 * 2).reshape(3, 5, 2, 1)
    p = pack(c, x)
    assert p.shape == (15, 2, 1) and torch.equal(unpack(c, p), x)
    assert cu_seqlens_int32(c, "cpu").tolist() == [0, 5, 10, 15] and cu_seqlens_int32(c, "cpu").dtype == torch.int32
    v = _case(seq_len=300, cu_seqlens=(0, 100, 300))
    assert cu_seqlens_int32(v, "cpu").tolist() == [0, 100, 300]


def test_indices_to_canonical_sentinel_padding_and_layout():
    c = _case(batch=1, seq_len=3, heads_kv=2, heads_q=2, top_n=4)
    idx = torch.tensor([[[0, 9, 9], [0, 1, 9], [1, 0, 2]],       # kv head 0, three queries, k = 3 < n
                        [[0, -1, -1], [1, 0, 9], [2, 9, 0]]], dtype=torch.int32)
    out = idx_to_canonical(c, idx, sentinel_from=3)
    assert out.shape == (1, 3, 2, 4) and out.dtype == torch.int64
    assert out[0, 0, 0].tolist() == [0, -1, -1, -1] and out[0, 2, 0].tolist() == [1, 0, 2, -1]
    assert out[0, 1, 1].tolist() == [1, 0, -1, -1] and out[0, 2, 1].tolist() == [2, -1, 0, -1]
    with pytest.raises(ValueError, match="n = 4"):
        idx_to_canonical(c, torch.zeros(2, 3, 5, dtype=torch.int32))


def test_indices_from_canonical_ascending_minus_one_last():
    c = _case(batch=2, seq_len=2, heads_kv=1, heads_q=1, top_n=3)
    idx = torch.tensor([[[[2, -1, 0]], [[-1, 1, -1]]], [[[1, 0, -1]], [[0, 1, 2]]]])
    out = idx_from_canonical(c, idx)
    assert out.dtype == torch.int32 and out.shape == (1, 4, 3)
    assert out[0].tolist() == [[0, 2, -1], [1, -1, -1], [0, 1, -1], [0, 1, 2]]


# ------------------------------------------------------------------------------------------- flash_nsa decode layout
def test_flash_nsa_paged_tables_share_one_pool_and_are_not_the_identity():
    kv, cmp, pages = paged_tables(batch=2, n_kv=3, n_cmp=1)
    assert pages == 8 and kv.dtype == cmp.dtype == torch.int32 and kv.shape == (2, 3) and cmp.shape == (2, 1)
    ids = torch.cat([kv.flatten(), cmp.flatten()])
    assert sorted(ids.tolist()) == list(range(8)) and kv[0, 0] == 7  # every page once, numbered from the end


@pytest.mark.parametrize("B, T, P", [(1, 256, 128), (2, 300, 128), (2, 1000, 256), (3, 5, 128)])
def test_flash_nsa_pages_round_trip(B, T, P):
    x = torch.randn(B, T, 2, 16, dtype=torch.float16)
    kv, _, pages = paged_tables(B, -(-T // P), 1)
    pool = to_pages(x, kv, pages, P)
    assert pool.shape == (pages, P, 2, 16) and pool.dtype == x.dtype
    assert torch.equal(from_pages(pool, kv, T), x)
    b, t = B - 1, T - 1  # the page a token lives in, at its offset (what the kernels read through block_tables)
    assert torch.equal(pool[kv[b, t // P], t % P], x[b, t])
    tail = torch.ones(pages, P, dtype=torch.bool)  # slots holding no token are zeros (finite for masked tiles)
    for bb in range(B):
        for tt in range(T):
            tail[kv[bb, tt // P], tt % P] = False
    assert torch.count_nonzero(pool[tail]) == 0
    with pytest.raises(ValueError, match="fewer than T"):
        to_pages(x, kv[:, :0], pages, P)


def test_flash_nsa_cmp_slots_address_the_cmp_pages_of_the_pool():
    """``slot_mapping`` entries are flat ``page * P + offset`` slots: writing the means there (what
    mean_pooling_prefill / kv_mean_pooling_decode store) and reading the cmp pages back gives them in order."""
    B, T, l, d, P = 2, 300, 32, 16, 128
    y = whole_cmp_blocks(T, l, d)
    assert y == 17 and whole_cmp_blocks(l - 1, l, d) == 0 and whole_cmp_blocks(l, l, d) == 1
    kv, cmp, pages = paged_tables(B, -(-T // P), max(-(-y // P), 1))
    k = torch.randn(B, T, 2, 16, dtype=torch.float64)
    pool = to_pages(k, kv, pages, P)
    means = torch.stack([k[:, c * d:c * d + l].mean(1) for c in range(y)], 1)  # [B, y, H, D]
    slots = cmp_slots(cmp, torch.arange(y).expand(B, -1), P)
    assert slots.dtype == torch.int32 and slots.shape == (B, y)
    pool.view(-1, 2, 16)[slots.long().flatten()] = means.reshape(-1, 2, 16)
    assert torch.equal(from_pages(pool, cmp, y), means) and torch.equal(from_pages(pool, kv, T), k)  # K untouched
    assert cmp_slots(cmp, torch.full((B, 1), -1), P).tolist() == [[-1], [-1]]  # no new block: slot -1
    assert page_size(_case(block_size=64)) == 128 and page_size(_case(block_size=256, cmp_block=64)) == 256


def test_flash_nsa_decode_index_translation():
    """topk_decode's ``[H, B, n]`` (block 0, the local blocks, then by score; -1 padded) -> canonical
    ``[B, 1, H, n]`` ascending with -1 last; a random case's indices -> ``[H, B, n]`` int32 for the kernel."""
    c = _case(batch=2, seq_len=200, q_len=1, heads_q=4, heads_kv=2, top_n=4)
    raw = torch.tensor([[[0, 3, 2, -1], [0, 1, -1, -1]], [[0, 3, 2, 1], [0, 3, 2, -1]]], dtype=torch.int32)
    out = canonical_order(idx_to_canonical(c, raw))
    assert out.shape == (2, 1, 2, 4)
    assert out[0, 0].tolist() == [[0, 2, 3, -1], [0, 1, 2, 3]] and out[1, 0].tolist() == [[0, 1, -1, -1], [0, 2, 3, -1]]
    back = idx_from_canonical(c, out)
    assert back.dtype == torch.int32 and back.shape == (2, 2, 4) and back.is_contiguous()
    assert torch.equal(canonical_order(idx_to_canonical(c, back)), out)
    rand = materialize(_case(batch=2, seq_len=200, q_len=1, heads_q=4, heads_kv=2, top_n=4, block_indices="random"), "cpu")
    sel = idx_from_canonical(c, rand.block_indices)  # the kernel reads the first min(n, ceil(T/l')) = 4 ids per row
    assert (sel >= 0).all() and (sel < -(-200 // 64)).all()

def test_window_and_gates():
    assert window_param(_case(window=64)) == 63 and window_param(_case(window=64, window_keys="w_plus_1")) == 64
    g = torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(gate_values(_case(), g), g)
    assert torch.allclose(torch.sigmoid(gate_logits(_case(), g)), g, atol=1e-6)
    sig = _case(gates="sigmoid")  # the given gates are logits
    assert torch.allclose(gate_values(sig, g), torch.sigmoid(g)) and torch.equal(gate_logits(sig, g), g)


@pytest.mark.parametrize("gates, window", [("raw", 64), ("sigmoid", 64), ("raw", 0)])
def test_gated_sum_is_the_modules_combine(gates, window):
    c = _case(gates=gates, window=window)
    gen = torch.Generator().manual_seed(0)
    g = [torch.rand(1, 5, 4, generator=gen) for _ in range(3)]
    out = {b: torch.randn(1, 5, 4, 8, generator=gen) for b in ("cmp_o", "slc_o", "swa_o")}
    f = torch.sigmoid if gates == "sigmoid" else (lambda t: t)
    want = f(g[0])[..., None] * out["cmp_o"] + f(g[1])[..., None] * out["slc_o"]
    if window:
        want = want + f(g[2])[..., None] * out["swa_o"]
    assert torch.equal(gated_sum(c, out, *g), want)


@pytest.mark.parametrize("name", ["xunhao", "fsa", "flash_nsa"])
def test_convention_fields(name):
    o = get_oracle(name)
    assert convention_support(o, _case(gates="sigmoid"), "o") is None
    assert "mean_logits" in convention_support(o, _case(group_importance="mean_logits"), "topk_idx")
    assert convention_support(get_oracle("fla_main"), _case(gates="sigmoid"), "o")


def test_checkout_import_skips_package_init_and_isolates(tmp_path):
    pkg = tmp_path / "zzpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the package __init__ must not run')\n")
    (pkg / "sub" / "__init__.py").write_text("raise RuntimeError('nor this one')\n")
    (pkg / "sub" / "mod.py").write_text("from zzpkg import __version__ as V\nVALUE = 42\n")
    installed = types.ModuleType("zzpkg")
    sys.modules["zzpkg"] = installed
    try:
        (mod,) = import_from_checkout(tmp_path, ["zzpkg.sub.mod"], stubs=["zzpkg", "zzpkg.sub"], isolate=True,
                                      stub_attrs={"zzpkg": {"__version__": "9.9"}})
        assert mod.VALUE == 42 and mod.V == "9.9"
        assert sys.modules["zzpkg"] is installed and "zzpkg.sub.mod" not in sys.modules
        assert str(tmp_path) not in sys.path
    finally:
        sys.modules.pop("zzpkg", None)


# ------------------------------------------------------------------------------------------- mdy666 torch reference
def _torch_ref():
    path, _, _ = config.checkout_status("flash_nsa")
    if path is None:
        pytest.skip("flash_nsa checkout not configured: " + config.how_to_enable("flash_nsa"))
    spec = importlib.util.spec_from_file_location("nsaconf_test_flash_nsa_torch_ref", path / "flash_nsa" / "ops" / "torch_ref.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mdy666_torch_reference_matches_ours_after_translation():
    """mdy666's pure-torch cmp / top-k / selection references (CPU, fp32) with the flash_nsa adapter's
    translation: the 99999999 sentinel -> -1, ``[Hkv, T, n]`` -> ``[B, T, H, n]``; conventions as the case."""
    ref = _torch_ref()
    case = Case(seq_len=256, heads_q=4, heads_kv=2, head_dim=32, dtype="float32", block_size=64, cmp_block=32,
                cmp_stride=16, top_n=4, window=0, seed=3)
    x = materialize(case, "cpu")
    truth = nsa_reference(case, x, dtype=torch.float64)
    q, k, v = (pack(case, t) for t in (x.q, x.k, x.v))
    l, d = case.cmp_block, case.cmp_stride
    nc = (case.seq_len - l) // d + 1
    k_cmp = torch.stack([k[c * d:c * d + l].mean(0) for c in range(nc)])
    v_cmp = torch.stack([v[c * d:c * d + l].mean(0) for c in range(nc)])
    cmp_o = unpack(case, ref.torch_cmp_attn(q, k_cmp, v_cmp, l, d))
    assert torch.allclose(cmp_o.double(), truth["cmp_o"], atol=1e-4)
    topk = ref.torch_topk(q, k_cmp, l, d, case.block_size, case.top_n, 1, 2)
    assert int(topk.max()) == 99999999  # early queries have fewer candidates than n
    ours = idx_to_canonical(case, topk, sentinel_from=-(-case.seq_len // case.block_size))
    assert torch.equal(as_set(ours, case.top_n), as_set(truth["topk_idx"], case.top_n))
    slc = unpack(case, ref.torch_slc_attn(q, k, v, topk, case.block_size))
    assert torch.allclose(slc.double(), truth["slc_o"], atol=1e-4)


# ------------------------------------------------------------------------------------------- XunhaoLai torch reference
def _xunhao_torch_refs():
    path, _, _ = config.checkout_status("xunhao")
    if path is None:
        pytest.skip("XunhaoLai checkout not configured: " + config.how_to_enable("xunhao"))
    if importlib.util.find_spec("einops") is None:
        pytest.skip("XunhaoLai's torch references import einops (pip install einops)")
    d = path / "native_sparse_attention" / "ops" / "torch"
    mods = []
    for f in ("compressed_attention", "topk_sparse_attention"):
        spec = importlib.util.spec_from_file_location(f"nsaconf_test_xunhao_{f}", d / f"{f}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods


def test_xunhao_torch_reference_varlen_matches_ours_after_translation():
    """XunhaoLai's torch ``compressed_attention_torch`` (its top-k: ascending, -1 last, ``[Hkv, ΣT, k]``) and
    ``topk_sparse_attention_torch`` on CPU, fp32, varlen with a sequence shorter than l: the adapter's
    packing and index translation give our reference's top-k sets and selection output."""
    cmp_mod, sel_mod = _xunhao_torch_refs()
    case = Case(seq_len=300, cu_seqlens=(0, 20, 300), heads_q=4, heads_kv=2, head_dim=32, dtype="float32",
                block_size=64, cmp_block=32, cmp_stride=16, top_n=4, window=0, seed=9)
    x = materialize(case, "cpu")
    truth = nsa_reference(case, x, dtype=torch.float64)
    q, k, v = (pack(case, t) for t in (x.q, x.k, x.v))
    cu = cu_seqlens_int32(case, "cpu")
    l, d = case.cmp_block, case.cmp_stride
    kc, vc, cuc = [], [], [0]
    for s, e in case.sequences:
        nc = max((e - s - l) // d + 1, 0)
        kc += [k[s + c * d:s + c * d + l].mean(0) for c in range(nc)]
        vc += [v[s + c * d:s + c * d + l].mean(0) for c in range(nc)]
        cuc.append(cuc[-1] + nc)
    cuc = torch.tensor(cuc, dtype=torch.int32)
    o, topk = cmp_mod.compressed_attention_torch(q, torch.stack(kc), torch.stack(vc), l, d, case.block_size, case.top_n,
                                                  cu, cuc, 280, int((cuc[1:] - cuc[:-1]).max()))
    assert torch.allclose(unpack(case, o).double(), truth["cmp_o"], atol=1e-4)
    ours = idx_to_canonical(case, topk)
    assert torch.equal(as_set(ours, case.top_n), as_set(truth["topk_idx"], case.top_n))
    slc = sel_mod.topk_sparse_attention_torch(q, k, v, idx_from_canonical(case, ours), case.block_size, cu)
    assert torch.allclose(unpack(case, slc).double(), truth["slc_o"], atol=1e-4)
