"""FLA (PyPI ``fla-core==0.6.0``, ``fla.ops.nsa``) adapters: ``fla_naive``, ``fla_parallel``, ``fla_parallel_sel``.

FLA's conventions (NSA_IMPLEMENTATIONS.md §2, checked against the installed wheel):
one ``block_size`` BS is l = d = l'; mean pooling over the true tail length; compression block c is
visible iff ``(c+1)*BS - 1 <= t`` (= ``end_inclusive``); forced blocks 0, t//BS - 1, t//BS
(= ``initial_local``); top-k in score order padded with -1; raw gates; window via flash-attn
``window_size=(w-1, 0)`` (w keys; a ``w_plus_1`` case is passed as w+1 keys); natural-log LSE.
``naive_nsa``/``parallel_nsa`` assert that G = HQ/H is a power of 2 and >= 16.

**Running without Triton (CPU).** ``import fla.ops.nsa`` imports every op and needs Triton. For the CPU
path this module loads the *installed* ``fla/ops/nsa/naive.py`` by file path (no code is copied),
with stub modules ``fla.ops``, ``fla.ops.utils`` and ``fla.ops.utils.pooling`` present only while it
executes, which supply the two Triton-backed helpers it imports as plain torch functions:
``prepare_chunk_offsets`` (cumsum of per-sequence ``ceil(len/BS)``, left-padded with 0) and
``mean_pooling`` (chunk mean over the true chunk length, fp32 accumulation, cast back to the input
dtype; float64 stays float64). On CUDA with Triton the real modules are imported instead.
The sliding window (FLA calls ``flash_attn_func``) goes through ``oracles.compat.flash_attn_shim``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
import warnings
from typing import Optional

import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import GRAD_INPUTS, Inputs, grad_branches, output_cotangent
from nsaconf.cases.vocabulary import FORWARD_BRANCHES, GRAD_BRANCHES
from nsaconf.oracles.base import Oracle, gradients_wanted, register_oracle
from nsaconf.oracles.compat import flash_attn_shim
from nsaconf.oracles.compat.common import (cu_tensor, empty_cmp_rows, flash_window_size, full_queries, given_indices_full,
                                   is_pow2, next_pow2, pad_last, single_thread, window_keys_count)

FLA_VERSION = "0.6.0"
FLA_HOWTO = f"pip install fla-core=={FLA_VERSION} (or nsaconf with its pinned oracles: pip install \"nsaconf[oracles]\")"


def _fla_version() -> Optional[str]:
    try:
        from importlib.metadata import version
        return version("fla-core")
    except Exception:  # noqa: BLE001
        return None


def _fla_root() -> Optional[str]:
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


# ------------------------------------------------------------------------------------------- stubs
def _prepare_chunk_offsets(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Stub for ``fla.ops.utils.prepare_chunk_offsets``: ``[0, cumsum(ceil(len_i / BS))]``."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    n = (lens + chunk_size - 1) // chunk_size
    return torch.cat([n.new_zeros(1), n.cumsum(0)])


def _mean_pooling(x: torch.Tensor, chunk_size: int, cu_seqlens: Optional[torch.Tensor] = None, **_) -> torch.Tensor:
    """Stub for ``fla.ops.utils.pooling.mean_pooling``: ``[B,T,H,D] -> [B,ceil(T/BS),H,D]`` (per sequence
    under ``cu_seqlens``), each chunk the mean over the tokens it really has."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    bounds = [(0, x.shape[1])] if cu_seqlens is None else list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))
    outs = []
    for s0, s1 in bounds:
        xs = x[:, s0:s1].to(acc)
        T = s1 - s0
        n = -(-T // chunk_size)
        padded = torch.nn.functional.pad(xs, (0, 0, 0, 0, 0, n * chunk_size - T))
        sums = padded.view(x.shape[0], n, chunk_size, *x.shape[2:]).sum(2)
        cnt = torch.clamp(T - torch.arange(n, device=x.device) * chunk_size, max=chunk_size).to(acc)
        outs.append(sums / cnt.view(1, n, 1, 1))
    return torch.cat(outs, 1).to(x.dtype)


_NAIVE_CPU: Optional[types.ModuleType] = None


def load_naive_without_triton() -> types.ModuleType:
    """The installed ``fla/ops/nsa/naive.py``, executed with stubbed Triton helpers (see module docstring)."""
    global _NAIVE_CPU
    if _NAIVE_CPU is not None:
        return _NAIVE_CPU
    root = _fla_root()
    if root is None:
        raise ImportError(f"fla is not installed: {FLA_HOWTO}")
    flash_attn_shim.install()
    stub_names = ("fla.ops", "fla.ops.utils", "fla.ops.utils.pooling")
    saved = {n: sys.modules.get(n) for n in stub_names}
    ops = types.ModuleType("fla.ops")
    ops.__path__ = []  # a package
    utils = types.ModuleType("fla.ops.utils")
    utils.__path__ = []
    utils.prepare_chunk_offsets = _prepare_chunk_offsets
    pooling = types.ModuleType("fla.ops.utils.pooling")
    pooling.mean_pooling = _mean_pooling
    utils.pooling = pooling
    ops.utils = utils
    try:
        sys.modules.update({"fla.ops": ops, "fla.ops.utils": utils, "fla.ops.utils.pooling": pooling})
        spec = importlib.util.spec_from_file_location("nsaconf_fla_naive_notriton", f"{root}/ops/nsa/naive.py")
        mod = importlib.util.module_from_spec(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec.loader.exec_module(mod)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    mod.flash_attn_func = flash_attn_shim.flash_attn_func
    mod.flash_attn_varlen_func = flash_attn_shim.flash_attn_varlen_func
    _NAIVE_CPU = mod
    return mod


def _naive_module(device: str) -> types.ModuleType:
    if device == "cuda" and _has_triton():
        flash_attn_shim.install()
        import fla.ops.nsa.naive as mod  # the real module, Triton mean_pooling
        if mod.flash_attn_func is None:
            mod.flash_attn_func = flash_attn_shim.flash_attn_func
            mod.flash_attn_varlen_func = flash_attn_shim.flash_attn_varlen_func
        return mod
    return load_naive_without_triton()


# ------------------------------------------------------------------------------------------- support
def _fla_conventions(case: Case) -> Optional[str]:
    """Reasons common to every FLA entry point."""
    if not (case.cmp_block == case.cmp_stride == case.block_size):
        return (f"FLA uses one block_size for compression length, stride and selection block "
                f"(needs l = d = l', got l={case.cmp_block}, d={case.cmp_stride}, l'={case.block_size})")
    if case.cmp_mask != "end_inclusive":
        return f"FLA's compression mask is end_inclusive ((c+1)*BS-1 <= t), case has {case.cmp_mask}"
    if case.forced_blocks != "initial_local":
        return f"FLA >= 0.3.1 forces blocks 0, t//BS-1, t//BS (initial_local), case has {case.forced_blocks}"
    G = case.group
    if not (is_pow2(G) and G >= 16):
        return f"naive_nsa/parallel_nsa assert G = HQ/H is a power of 2 and >= 16 (G={G})"
    return None


def _versions(extra: dict) -> dict:
    v = {"fla-core": _fla_version() or "missing", "torch": torch.__version__}
    v.update(extra)
    return v


def _out(t: torch.Tensor, pad: int) -> torch.Tensor:
    return t[:, pad:] if pad else t


# ------------------------------------------------------------------------------------------- fla_naive
@register_oracle
class FlaNaive(Oracle):
    """FLA's pure-torch ``naive_nsa_*`` (reference layer): compression ``(o, lse)``, top-k, selection, and
    ``naive_nsa`` for ``o``; window through the flash-attn shim.

    Translation: decode (TQ < T) by front-padding queries/gates with zeros to T rows (naive needs
    TQ == T) and keeping the last TQ rows; ``random`` cases pass the given indices to ``naive_nsa``.
    Cost: ``naive_nsa_selection`` loops over queries in Python and runs twice (for ``slc_o`` and
    inside ``naive_nsa``), so ``supports`` caps the work on CPU. float64 cases are declined: naive
    computes in float32 (``.float()``)."""

    name = "fla_naive"
    layer = "reference"
    branches = FORWARD_BRANCHES + GRAD_BRANCHES
    devices = ("cpu", "cuda")
    description = f"FLA fla-core {FLA_VERSION} naive_nsa (pure torch; CPU via stubbed Triton helpers), w via flash-attn shim"
    #: max of B * T * HQ * n * l' * (D + DV) (Python-loop work) -- about 4 s for a whole run on one CPU thread
    max_work = 2 ** 26
    not_timed_by_default = "loops over queries in Python (10-66 s per call on the GPU cases measured)"

    def availability(self) -> Optional[str]:
        if _fla_root() is None:
            return f"fla-core is not installed: {FLA_HOWTO}"
        return None

    def versions(self) -> dict:
        return _versions({"fla_naive_loader": "real fla.ops.nsa.naive on cuda+triton, else file-path load with stubs",
                          "flash_attn": flash_attn_shim.description()})

    def supports(self, case: Case, device: str) -> Optional[str]:
        why = _fla_conventions(case)
        if why:
            return why
        if case.dtype == "float64":
            return "FLA's naive_nsa_* cast q/k/v to float32 (.float()): a float64 case would measure float32 rounding; use float32"
        work = case.batch * case.seq_len * case.heads_q * case.top_n * case.block_size * (case.head_dim + case.head_dim_v)
        if device == "cpu" and work > self.max_work:
            return (f"naive_nsa_selection loops over queries in Python: B*T*HQ*n*l'*(D+DV) = {work:.2e} > "
                    f"{self.max_work:.2e} (a few seconds on CPU); run larger cases on cuda")
        return None

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        mod = _naive_module(device)
        BS, n, scale = case.block_size, case.top_n, case.softmax_scale
        q, g_cmp, g_slc, g_swa, pad = full_queries(case, inputs)
        k, v = inputs.k, inputs.v
        cu = cu_tensor(case, q.device)
        given = block_indices if block_indices is not None else (inputs.block_indices if case.block_indices == "random" else None)
        given_full = None if given is None else given_indices_full(case, given.long(), pad)
        wk = window_keys_count(case) if case.window > 0 else 0
        with warnings.catch_warnings(), single_thread(device):
            warnings.simplefilter("ignore")
            k_cmp, v_cmp = mod.mean_pooling(k, BS, cu), mod.mean_pooling(v, BS, cu)
            o_cmp, lse = mod.naive_nsa_compression(q, k_cmp, v_cmp, BS, scale, cu)
            topk = mod.naive_nsa_topk(q, k_cmp, n, BS, scale, cu)
            o, idx_used = mod.naive_nsa(q, k, v, g_cmp, g_slc, g_swa, block_indices=given_full, block_counts=n,
                                        block_size=BS, window_size=wk, scale=scale, cu_seqlens=cu, return_block_indices=True)
            o_slc = mod.naive_nsa_selection(q, k, v, idx_used, BS, scale, cu)
        out = {"cmp_o": _out(o_cmp, pad), "cmp_lse": _out(lse, pad), "topk_idx": _out(topk, pad),
               "slc_o": _out(o_slc, pad), "o": _out(o, pad)}
        if case.window > 0:
            out["swa_o"] = _swa(case, inputs)
        if gradients_wanted(case):
            out.update(self.grads(case, inputs, device, given))
        return out

    def grads(self, case: Case, inputs: Inputs, device: str, given: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Gradients of ``sum(o * dO)`` by autograd through ``naive_nsa`` itself (plain torch; the window
        through the shim's differentiable ``sdpa``/flash-attn backend), with the same padding and given
        indices as ``run``; no gradient flows through its top-k (piecewise constant)."""
        mod = _naive_module(device)
        BS, n, scale = case.block_size, case.top_n, case.softmax_scale
        wk = window_keys_count(case) if case.window > 0 else 0
        leaves = {f: getattr(inputs, f).detach().clone().requires_grad_(True) for f in set(GRAD_INPUTS.values())}
        x = Inputs(**leaves, block_indices=inputs.block_indices)
        q, g_cmp, g_slc, g_swa, pad = full_queries(case, x)
        cu = cu_tensor(case, q.device)
        given_full = None if given is None else given_indices_full(case, given.long(), pad)
        names = grad_branches(case)
        with warnings.catch_warnings(), single_thread(device), torch.enable_grad():
            warnings.simplefilter("ignore")
            o = mod.naive_nsa(q, x.k, x.v, g_cmp, g_slc, g_swa, block_indices=given_full, block_counts=n, block_size=BS,
                              window_size=wk, scale=scale, cu_seqlens=cu)
            o = _out(o, pad)
            d_o = output_cotangent(case, o.device).to(o.dtype)  # dO rounded to the case dtype, like the inputs
            got = torch.autograd.grad(o, [leaves[GRAD_INPUTS[b]] for b in names], d_o, allow_unused=True)
        return {b: (torch.zeros_like(leaves[GRAD_INPUTS[b]]) if g is None else g.detach()) for b, g in zip(names, got)}


def _swa(case: Case, inputs: Inputs) -> torch.Tensor:
    """Window branch as FLA calls it: ``flash_attn_func(q, k, v, causal=True, window_size=(w-1, 0))``
    (varlen: ``flash_attn_varlen_func``), via the shim."""
    ws = flash_window_size(case)
    if case.cu_seqlens is None:
        return flash_attn_shim.flash_attn_func(inputs.q, inputs.k, inputs.v, causal=True, window_size=ws,
                                               softmax_scale=case.softmax_scale)
    cu = cu_tensor(case, inputs.q.device).int()
    mx = max(e - s for s, e in case.sequences)
    return flash_attn_shim.flash_attn_varlen_func(inputs.q[0], inputs.k[0], inputs.v[0], cu, cu, mx, mx, causal=True,
                                                  window_size=ws, softmax_scale=case.softmax_scale)[None]


# ------------------------------------------------------------------------------------------- Triton
def _triton_support(case: Case, device: str) -> Optional[str]:
    why = _fla_conventions(case)
    if why:
        return why
    if case.dtype not in ("float16", "bfloat16", "float32"):
        return f"FLA's Triton kernels take fp16/bf16/fp32, not {case.dtype}"
    if max(case.head_dim, case.head_dim_v) > 256:
        return f"FLA's Triton NSA needs K, V <= 256 on H100 (NK == 1), got D={case.head_dim}, DV={case.head_dim_v}"
    if case.block_size < 16 or not is_pow2(case.block_size):
        return f"FLA's Triton kernels need block_size a power of 2 >= 16 (tl.dot tiles), got {case.block_size}"
    return None


def _triton_modules():
    # FLA's own tests run with TRITON_F32_DEFAULT=ieee: float32 tl.dot without TF32 (set before the first compile)
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    flash_attn_shim.install()
    import fla.ops.nsa.parallel as par
    from fla.ops.nsa.compression import parallel_nsa_compression
    from fla.ops.utils.pooling import mean_pooling
    if getattr(par, "flash_attn_func", None) is None:
        par.flash_attn_func = flash_attn_shim.flash_attn_func
        par.flash_attn_varlen_func = flash_attn_shim.flash_attn_varlen_func
    return par, parallel_nsa_compression, mean_pooling


def _triton_availability() -> Optional[str]:
    if _fla_root() is None:
        return f"fla-core is not installed: {FLA_HOWTO}"
    if not _has_triton():
        return "FLA's Triton kernels need triton and a CUDA GPU (pip install triton; run with --device cuda)"
    return None


@register_oracle
class FlaParallel(Oracle):
    """FLA's Triton ``parallel_nsa`` end to end (compression + Triton top-k + selection + window) for ``o``,
    and its parts for the branches: ``parallel_nsa_compression`` (``cmp_o``, ``cmp_lse`` with FLA's
    empty-row LSE 0 translated to -inf), ``parallel_nsa_topk`` (``topk_idx``; next_pow2(n) slots, -1
    padded), ``ParallelNSAFunction`` on those indices (``slc_o``), flash-attn window (``swa_o``)."""

    name = "fla_parallel"
    layer = "e2e"
    branches = FORWARD_BRANCHES + GRAD_BRANCHES
    devices = ("cuda",)
    dtypes = ("float16", "bfloat16", "float32")
    description = f"FLA fla-core {FLA_VERSION} Triton parallel_nsa (compression + top-k + selection), window via flash-attn/shim"

    def availability(self) -> Optional[str]:
        return _triton_availability()

    def versions(self) -> dict:
        v = {}
        try:
            import triton
            v["triton"] = triton.__version__
        except Exception:  # noqa: BLE001
            pass
        v["flash_attn"] = flash_attn_shim.description()
        return _versions(v)

    def supports(self, case: Case, device: str) -> Optional[str]:
        why = _triton_support(case, device)
        if why:
            return why
        if not is_pow2(case.top_n):
            return f"parallel_nsa_topk selects next_pow2(n) = {next_pow2(case.top_n)} blocks for n = {case.top_n} (n must be a power of 2)"
        if case.block_size < 2 * next_pow2(case.top_n):
            return f"parallel_nsa_topk asserts block_size >= 2*next_pow2(n) ({case.block_size} < {2 * next_pow2(case.top_n)})"
        return None

    def modules(self):
        """(``fla.ops.nsa.parallel``, ``parallel_nsa_compression``, ``mean_pooling``) of the FLA it runs."""
        return _triton_modules()

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        par, compression, mean_pooling = self.modules()
        BS, n, scale, T = case.block_size, case.top_n, case.softmax_scale, case.seq_len
        q, k, v = inputs.q.contiguous(), inputs.k.contiguous(), inputs.v.contiguous()
        cu = None if case.cu_seqlens is None else cu_tensor(case, q.device)
        given = inputs.block_indices if case.block_indices == "random" else None
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            k_cmp, v_cmp = mean_pooling(k, BS, cu), mean_pooling(v, BS, cu)
            o_cmp, lse = compression(q=q, k=k_cmp, v=v_cmp, TK=T, block_size=BS, scale=scale, cu_seqlens=cu)
            topk = par.parallel_nsa_topk(q=q, k=k_cmp, TK=T, lse=lse, block_counts=n, block_size=BS, scale=scale, cu_seqlens=cu)
            sel = topk if given is None else pad_last(given.to(torch.int32), next_pow2(given.shape[-1]), -1).contiguous()
            o_slc = par.ParallelNSAFunction.apply(q, k, v, sel, sel.shape[-1], BS, scale, cu)
            wk = window_keys_count(case) if case.window > 0 else 0
            o = par.parallel_nsa(q, k, v, inputs.g_cmp, inputs.g_slc, inputs.g_swa if wk else None,
                                 block_indices=None if given is None else sel, block_counts=n if given is None else sel.shape[-1],
                                 block_size=BS, window_size=wk, scale=scale, cu_seqlens=cu)
        lse = lse.float().masked_fill(empty_cmp_rows(case, q.device)[None, :, None], float("-inf"))
        out = {"cmp_o": o_cmp, "cmp_lse": lse, "topk_idx": topk.long(), "slc_o": o_slc, "o": o}
        if case.window > 0:
            out["swa_o"] = _swa(case, inputs)
        if gradients_wanted(case) and self.branch_supports(case, "dq") is None:
            out.update(self.grads(case, inputs, given))
        return out

    def branch_supports(self, case: Case, branch: str) -> Optional[str]:
        if branch in GRAD_BRANCHES and case.q_len < case.seq_len:
            return (f"FLA {FLA_VERSION} parallel_nsa backward with TQ < T (decode/chunked prefill): CUDA illegal memory "
                    "access on the H100 (docs/results/gpu-matrix.md); its forward is compared")
        return None

    def grads(self, case: Case, inputs: Inputs, given: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Gradients of ``sum(o * dO)`` through FLA's Triton autograd (``parallel_nsa``: compression,
        top-k, ``ParallelNSAFunction`` backward kernels; window through flash-attn or the shim), on the
        same call as ``o``. Untested on this project's CPU CI (needs a GPU)."""
        par, _, _ = self.modules()
        BS, n, scale = case.block_size, case.top_n, case.softmax_scale
        cu = None if case.cu_seqlens is None else cu_tensor(case, inputs.q.device)
        wk = window_keys_count(case) if case.window > 0 else 0
        sel = None if given is None else pad_last(given.to(torch.int32), next_pow2(given.shape[-1]), -1).contiguous()
        leaves = {f: getattr(inputs, f).detach().clone().contiguous().requires_grad_(True) for f in set(GRAD_INPUTS.values())}
        names = grad_branches(case)
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            o = par.parallel_nsa(leaves["q"], leaves["k"], leaves["v"], leaves["g_cmp"], leaves["g_slc"],
                                 leaves["g_swa"] if wk else None, block_indices=sel,
                                 block_counts=n if sel is None else sel.shape[-1], block_size=BS, window_size=wk,
                                 scale=scale, cu_seqlens=cu)
            d_o = output_cotangent(case, o.device).to(o.dtype)  # dO rounded to the case dtype, like the inputs
            got = torch.autograd.grad(o, [leaves[GRAD_INPUTS[b]] for b in names], d_o, allow_unused=True)
        return {b: (torch.zeros_like(leaves[GRAD_INPUTS[b]]) if g is None else g.detach()) for b, g in zip(names, got)}


@register_oracle
class FlaParallelSel(Oracle):
    """FLA's Triton selection kernel alone (``ParallelNSAFunction`` = ``parallel_nsa_fwd``) on given block
    indices: ``slc_o``. Indices are passed int32, -1 padded to a power-of-2 width with
    ``block_counts`` = that width (FLA's safe usage)."""

    name = "fla_parallel_sel"
    layer = "kernel"
    branches = ("slc_o",)
    devices = ("cuda",)
    dtypes = ("float16", "bfloat16", "float32")
    needs_block_indices = True
    description = f"FLA fla-core {FLA_VERSION} Triton selection kernel (parallel_nsa_fwd) on given block indices"

    def availability(self) -> Optional[str]:
        return _triton_availability()

    def versions(self) -> dict:
        return FlaParallel.versions(self)

    def supports(self, case: Case, device: str) -> Optional[str]:
        if case.block_size < 16 or not is_pow2(case.block_size):
            return f"FLA's Triton selection kernel needs block_size a power of 2 >= 16, got {case.block_size}"
        if not (is_pow2(case.group) and case.group >= 16):
            return f"FLA's Triton selection kernel needs G = HQ/H a power of 2 >= 16 (tl.arange / tl.dot), G={case.group}"
        if max(case.head_dim, case.head_dim_v) > 256:
            return f"FLA's Triton NSA needs K, V <= 256 on H100, got D={case.head_dim}, DV={case.head_dim_v}"
        return None

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        par, _, _ = _triton_modules()
        idx = block_indices if block_indices is not None else inputs.block_indices
        if idx is None:
            raise ValueError("fla_parallel_sel needs block indices")
        sel = pad_last(idx.to(device=inputs.q.device, dtype=torch.int32), next_pow2(idx.shape[-1]), -1).contiguous()
        cu = None if case.cu_seqlens is None else cu_tensor(case, inputs.q.device)
        with torch.no_grad():
            o = par.ParallelNSAFunction.apply(inputs.q.contiguous(), inputs.k.contiguous(), inputs.v.contiguous(), sel,
                                              sel.shape[-1], case.block_size, case.softmax_scale, cu)
        return {"slc_o": o}
