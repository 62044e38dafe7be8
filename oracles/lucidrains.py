"""lucidrains ``native-sparse-attention-pytorch==0.2.3`` (PyPI, MIT) adapters: ``lucidrains`` (e2e) and
``lucidrains_sel`` (its selection branch on given block indices).

The package ships a whole module, ``SparseAttention(dim, dim_head, heads, sliding_window_size,
compress_block_size, compress_block_sliding_stride, selection_block_size, num_selected_blocks, kv_heads,
causal=True)``: ``forward(x [B,T,dim]) -> [B,T,dim]`` owns its projections, a learned compression MLP, learned
memory key/values, rotary embeddings and a gate MLP. The adapters run its ``forward`` (the torch path,
``use_triton_kernel=False``; CPU and CUDA) on the canonical q/k/v/gates, with each learned part set or
bypassed so that what runs is NSA on our inputs. Each choice, in the order of ``forward``:

* **norm, projections** (``norm``, ``to_qkv``, ``combine_heads``): identities. The module input is the
  concatenation ``[q | k | v]`` of the canonical tensors, each head padded with zeros to ``D' = max(D, DV) +
  E`` channels (``dim_head = D'``); the output keeps the first DV channels of each head.
* **compression MLP** (``k_compress``, ``v_compress``; intra-block positions stay at their zero init): the
  mean of the block's l keys (values), accumulated in float64 and rounded once, i.e. the case model's
  ``mean_pool``. The keys are multiplied by ``r = scale / D'^-1/2``: its compression attention scales the
  logits by ``q.shape[-1]^-1/2`` (no argument), so ``r`` makes them ``scale * q.K_cmp``.
* **memory key/values** (``compress_mem_kv``, always visible, >= 1 required): neutralised through one of
  the E extra channels. The query carries 1 there, every real key 0, the memory key ``-1000 * sqrt(D')``:
  its logit is -1000, above the module's mask value and far below every real logit. A row that sees a
  compressed block gives it weight exp(-1000) = 0; a row that sees none gives it weight 1 and returns its
  value, 0: the case model's empty row (``cmp_o = 0``). Without it (its zero init: a sink of logit 0) every
  compression output would be scaled by ``Z / (1 + Z)``.
* **rotary** (``rotary_emb``, selection and window branches): identity.
* **selection**: ``selection_block_size = l'``; ``num_selected_blocks = n - 1`` because it always adds the
  current block (causal inside) on top of its top-k; selected blocks with importance <= 1e-10 are dropped by
  its ``fmask``. Its selection scale is the attribute ``scale``, set to the case's.
* **window** (``LocalAttention(exact_windowsize=True)``): ``sliding_window_size = s`` gives ``s + 1`` keys
  (``p - s <= key <= p``): ``s = w`` for ``w_plus_1`` cases (its native count), ``s = w - 1`` for ``w`` cases;
  its ``scale`` attribute set to the case's. A case without a window (w = 0) still runs it (s = 1) with
  gate 0.
* **gate MLP** (``to_strategy_combine = Linear -> Sigmoid -> Rearrange``): the Linear returns the given
  gates; ``gates = "sigmoid"`` keeps its Sigmoid, ``gates = "raw"`` replaces it by the identity.
* **branches**: ``o`` is the module's output; ``cmp_o``, ``slc_o``, ``swa_o`` are the three tensors its
  ``forward`` stacks before combining them, and ``topk_idx`` its ``topk`` result (plus the current block,
  without the blocks its ``fmask`` drops), both recorded with a ``TorchFunctionMode`` during the same call.

What it computes that no translation changes, each a convention of the case model (other values SKIP
with the reason): compression ``end_exclusive`` (``(c+1)*d - 1 < t``); forced blocks ``current``;
group importance ``mean_logits`` (``query_heads_share_selected_kv``; for G = 1 it equals ``sum_probs``).
Not comparable, so SKIP: l != d (it pools windows left-padded with zeros, ``floor(T/d)`` blocks ending at
``(c+1)d - 1``: partial blocks at the start the case model does not have); d != l' for the selection (it
averages logits over the compressed blocks of a selection block and masks the diagonal one); given
(``random``) block indices for the e2e adapter (see ``lucidrains_sel``); ``cmp_lse`` (never returned);
gradients. Varlen runs one module call per sequence; decode (TQ < T) front-pads the queries.

``lucidrains_sel`` steers the same module's top-k onto given block indices: the compressed keys are 0 in
the real channels and ``1000 * sqrt(D')`` in an extra channel per selection block, each query carries 1 in
the channels of its given blocks (other than the current one, which the module adds itself) and -2 in the
others: the given blocks get logit 1000, the others -2000 (below the -1e3 dummy its softmax prepends), so
its top-k picks exactly them (importance 1/m each) and nothing else passes its ``fmask``. Only its ``slc_o`` is returned.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
from typing import Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs
from nsaconf.cases.vocabulary import GATES, GROUP_IMPORTANCE
from nsaconf.oracles.base import Oracle, register_oracle
from nsaconf.oracles.compat.common import full_queries, given_indices_full

LUCID_VERSION = "0.2.3"
LUCID_HOWTO = (f"pip install native-sparse-attention-pytorch=={LUCID_VERSION} "
               "(or nsaconf with its pinned oracles: pip install \"nsaconf[oracles]\")")
#: the memory key's logit (and the steering logit of ``lucidrains_sel``): exp(-1000) is 0 in every dtype,
#: and -1000 is above the module's compression mask value (-finfo.max / 10, -6551 in float16)
MEM_LOGIT = -1000.0
#: the selection path materialises keys/values per query: B * H * T * ceil(T/l')*l' * D' elements each
MAX_WORK = 2 ** 26


def _installed() -> bool:
    return importlib.util.find_spec("native_sparse_attention_pytorch") is not None


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("native-sparse-attention-pytorch")
    except Exception:  # noqa: BLE001
        return "missing"


# ------------------------------------------------------------------------------------------- replaced parts
class _NoRotary(nn.Module):
    """Stands in for ``RotaryEmbedding``: q (times ``q_mult``) and k unchanged."""

    def __init__(self, q_mult: float = 1.0):
        super().__init__()
        self.q_mult = q_mult

    def rotate_queries_with_cached_keys(self, q, k):
        return (q if self.q_mult == 1.0 else q * self.q_mult), k

    def rotate_queries_or_keys(self, t, offset=0):
        return t


class _MeanPool(nn.Module):
    """Stands in for the compression MLP: ``[b,h,w,n,d] -> [b,h,w,d]``, ``mult * mean over n`` accumulated in
    float64 and rounded once; with ``steer`` (``lucidrains_sel``) 0 in every channel but ``channel0 + w``,
    which holds ``steer``."""

    def __init__(self, mult: float = 1.0, steer: Optional[float] = None, channel0: int = 0):
        super().__init__()
        self.mult, self.steer, self.channel0 = mult, steer, channel0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.steer is None:
            return (x.double().mean(dim=-2) * self.mult).to(x.dtype)
        b, h, w, _, d = x.shape
        out = torch.zeros(b, h, w, d, dtype=x.dtype, device=x.device)
        out[..., torch.arange(w, device=x.device), self.channel0 + torch.arange(w, device=x.device)] = self.steer
        return out


class _Given(nn.Module):
    """Stands in for the gate MLP's Linear: returns the given tensor whatever its input."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, _inp: torch.Tensor) -> torch.Tensor:
        return self.value


class _Record(TorchFunctionMode):
    """Records, during the module's forward, the tensors given to ``torch.stack`` (the three branch outputs
    before the gates) and the results of ``Tensor.topk`` (its top-k blocks)."""

    def __init__(self):
        super().__init__()
        self.stacks: list = []
        self.topks: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.stack:
            self.stacks.append(list(args[0] if args else kwargs["tensors"]))
        elif func is torch.Tensor.topk:
            self.topks.append(out)
        return out


def _window_size(case: Case) -> int:
    """``sliding_window_size`` giving the case's window (it attends to ``s + 1`` keys); 1 when there is none."""
    if case.window == 0:
        return 1
    return case.window if case.window_keys == "w_plus_1" else case.window - 1


def build_module(case: Case, dim_head: int, window: int, cmp: tuple[int, int], n_sel: int, gates: str,
                 mem_channel: Optional[int], steer_channel0: Optional[int] = None, single_path: bool = False) -> nn.Module:
    """A ``SparseAttention`` with every learned part set or bypassed (module docstring). ``cmp`` = (l, d) of
    its compression, ``n_sel`` its ``num_selected_blocks``, ``mem_channel`` the channel that neutralises its
    memory key (None: steering instead, ``steer_channel0`` the first steering channel). ``single_path``: it
    will select no block (only the current one), whose attention scales by ``dim_head^-1/2``: the queries of
    the selection and window branches are multiplied by ``scale / dim_head^-1/2`` instead of setting scales."""
    from native_sparse_attention_pytorch import SparseAttention

    H, HQ = case.heads_kv, case.heads_q
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a warning for num_selected_blocks = 0
        m = SparseAttention(dim=1, dim_head=dim_head, heads=HQ, kv_heads=H, sliding_window_size=window,
                            compress_block_size=cmp[0], compress_block_sliding_stride=cmp[1],
                            selection_block_size=case.block_size, num_selected_blocks=n_sel, causal=True, norm=False,
                            compress_mlp=nn.Identity(), use_triton_kernel=False)
    scale = case.softmax_scale
    m.to_qkv = nn.Identity()
    m.qkv_split = (HQ * dim_head, H * dim_head, H * dim_head)
    m.combine_heads = nn.Identity()
    if single_path:
        m.rotary_emb = _NoRotary(q_mult=scale / dim_head ** -0.5)
    else:
        m.rotary_emb = _NoRotary()
        m.scale = scale
        m.sliding_window.scale = scale
    if steer_channel0 is None:
        m.k_compress = _MeanPool(mult=scale / dim_head ** -0.5)
    else:
        m.k_compress = _MeanPool(steer=-MEM_LOGIT / dim_head ** -0.5, channel0=steer_channel0)
    m.v_compress = _MeanPool()
    mem = torch.zeros_like(m.compress_mem_kv.data)
    if mem_channel is not None:
        mem[0, :, :, mem_channel] = MEM_LOGIT / dim_head ** -0.5
    m.compress_mem_kv.data = mem
    if gates == "raw":
        m.to_strategy_combine[1] = nn.Identity()
    return m.eval()


def _pad_heads(t: torch.Tensor, width: int) -> torch.Tensor:
    """``[B,T,heads,c] -> [B,T,heads,width]`` with zeros."""
    return torch.nn.functional.pad(t, (0, width - t.shape[-1]))


def _sequences(case: Case):
    """(query slice, key slice) of each independent module call (queries front-padded to T): one per packed
    sequence."""
    if case.cu_seqlens is None:
        return [(slice(0, case.seq_len), slice(0, case.seq_len))]
    return [(slice(s, e), slice(s, e)) for s, e in case.sequences]


def _common_support(case: Case) -> Optional[str]:
    T = max(e - s for s, e in case.sequences)
    NS = -(-T // case.block_size)
    work = case.batch * case.heads_kv * T * NS * case.block_size * (max(case.head_dim, case.head_dim_v) + 1)
    if work > MAX_WORK:
        return (f"its torch selection path materialises keys per query: B*H*T*ceil(T/l')*l'*(D+1) = {work:.2e} > "
                f"{MAX_WORK:.2e}")
    return None


def _selection_reason(case: Case) -> Optional[str]:
    """Why lucidrains' own top-k cannot be compared with the case's (None: it can)."""
    if case.cmp_mask != "end_exclusive":
        return f"lucidrains ranks blocks by its end_exclusive compression ((c+1)*d-1 < t), case has {case.cmp_mask}"
    if not (case.cmp_block == case.cmp_stride == case.block_size):
        return (f"lucidrains' importance for l != d or d != l' (mean of logits over the compressed blocks of a "
                f"selection block, diagonal masked) is not Eq. 9; needs l = d = l' (l={case.cmp_block}, "
                f"d={case.cmp_stride}, l'={case.block_size})")
    if case.forced_blocks != "current":
        return f"lucidrains always adds the current block and forces no other (forced_blocks current), case has {case.forced_blocks}"
    if case.group_importance != "mean_logits" and case.group > 1:
        return (f"lucidrains pools the group by softmax of the mean logits (group_importance mean_logits), "
                f"case has {case.group_importance} with G = {case.group}")
    return None


# ------------------------------------------------------------------------------------------- lucidrains
@register_oracle
class Lucidrains(Oracle):
    """lucidrains' ``SparseAttention`` module run end to end on the canonical inputs (module docstring)."""

    name = "lucidrains"
    layer = "e2e"
    branches = ("cmp_o", "topk_idx", "slc_o", "swa_o", "o")
    devices = ("cpu", "cuda")
    description = (f"lucidrains native-sparse-attention-pytorch {LUCID_VERSION} SparseAttention (torch path), "
                   "learned parts bypassed")
    fixed_conventions = {"cmp_mask": "end_exclusive", "window_keys": "w_plus_1", "forced_blocks": "current",
                         "group_importance": "mean_logits"}
    supported_conventions = {"group_importance": GROUP_IMPORTANCE, "gates": GATES}
    #: extra channels: one neutralises the memory key
    extra_channels = 1

    def availability(self) -> Optional[str]:
        return None if _installed() else f"native-sparse-attention-pytorch is not installed: {LUCID_HOWTO}"

    def window_size(self, case: Case) -> int:
        """Its ``sliding_window_size`` for the case (``_window_size``: the case's window translated)."""
        return _window_size(case)

    def versions(self) -> dict:
        return {"native-sparse-attention-pytorch": _version(), "torch": torch.__version__}

    def supports(self, case: Case, device: str) -> Optional[str]:
        why = _common_support(case)
        if why:
            return why
        reasons = [self.branch_supports(case, b) for b in self.branches]
        return reasons[0] if all(reasons) else None

    def branch_supports(self, case: Case, branch: str) -> Optional[str]:
        if branch == "cmp_o":
            if case.cmp_mask != "end_exclusive":
                return f"lucidrains' compression mask is end_exclusive ((c+1)*d-1 < t), case has {case.cmp_mask}"
            if case.cmp_block != case.cmp_stride:
                return (f"lucidrains pools l keys ending at (c+1)*d-1, left-padded with zeros: for l != d its first "
                        f"blocks are partial blocks the case model does not have (l={case.cmp_block}, d={case.cmp_stride})")
            return None
        if branch == "swa_o":
            if case.window == 0:
                return "no window branch (w = 0)"
            if _window_size(case) < 1:
                return "lucidrains' window has sliding_window_size + 1 >= 2 keys; the case asks for a 1-key window"
            return None
        why = _selection_reason(case)
        if why:
            return why
        if branch in ("slc_o", "o") and case.block_indices == "random":
            return "the lucidrains module selects its own blocks (given indices: lucidrains_sel)"
        if branch == "o" and case.window > 0:
            return self.branch_supports(case, "swa_o")
        return None

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        D, DV, HQ = case.head_dim, case.head_dim_v, case.heads_q
        cmp = (case.cmp_block, case.cmp_stride) if case.cmp_block == case.cmp_stride else (case.block_size,) * 2
        q, g_cmp, g_slc, g_swa, pad = full_queries(case, inputs)
        if case.window == 0:
            g_swa = torch.zeros_like(g_swa) if case.gates == "raw" else torch.full_like(g_swa, float("-inf"))
        gates = torch.stack([g_cmp, g_slc, g_swa], dim=-1)  # [B,T,HQ,3]: the Linear's 'b n (h s)' layout
        mem = max(D, DV)  # the channel that neutralises the memory key
        outs: dict[str, list] = {b: [] for b in self.branches}
        for qs, ks in _sequences(case):
            T = ks.stop - ks.start
            single = min(case.top_n - 1, T // cmp[1]) == 0
            # its no-selection path (only the current block) scales by dim_head^-1/2 with no attribute: there
            # the selection and window queries are scaled by q_mult instead (exactly 2 for the default scale)
            Dp = 4 * D if single and 4 * D > mem else mem + 1
            qq = _pad_heads(q[:, qs], Dp)
            qq[..., mem] = 1
            k, v = _pad_heads(inputs.k[:, ks], Dp), _pad_heads(inputs.v[:, ks], Dp)
            m = build_module(case.replace(seq_len=T, q_len=T, cu_seqlens=None), Dp, self.window_size(case), cmp,
                             case.top_n - 1, case.gates, mem, single_path=single).to(device=q.device, dtype=q.dtype)
            m.to_strategy_combine[0] = _Given(gates[:, qs].flatten(2))
            x = torch.cat([qq.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)
            rec = _Record()
            with torch.no_grad(), rec:
                o = m(x)
            cmp_o, slc_o, swa_o = (t.transpose(1, 2)[..., :DV] for t in rec.stacks[-1])  # [B,T,HQ,DV]
            outs["o"].append(o.view(o.shape[0], T, HQ, Dp)[..., :DV])
            outs["cmp_o"].append(cmp_o)
            outs["slc_o"].append(slc_o)
            outs["swa_o"].append(swa_o)
            outs["topk_idx"].append(_topk_idx(case, rec.topks, o.shape[0], T, q.device))
        out = {b: torch.cat(ts, dim=1) for b, ts in outs.items()}
        if pad:
            out = {b: t[:, pad:] for b, t in out.items()}
        return out


def _topk_idx(case: Case, topks: list, B: int, T: int, device) -> torch.Tensor:
    """``[B,T,H,n]`` the blocks its selection attends to: the top-k blocks with importance > 1e-10 (its
    ``fmask``) and the current block, ascending, -1 padded."""
    H, n, ls = case.heads_kv, case.top_n, case.block_size
    cur = (torch.arange(T, device=device) // ls).view(1, T, 1, 1).expand(B, T, H, 1)
    if topks:
        val, idx = topks[-1]  # [B,H,T,k]
        idx = torch.where(val > 1e-10, idx, torch.full_like(idx, -1)).transpose(1, 2)
        cur = torch.cat([idx, cur], dim=-1)
    big = torch.iinfo(torch.int64).max
    key = torch.where(cur < 0, torch.full_like(cur, big), cur.long()).sort(dim=-1).values
    key = torch.where(key == big, torch.full_like(key, -1), key)
    if key.shape[-1] < n:
        key = torch.cat([key, key.new_full(key.shape[:-1] + (n - key.shape[-1],), -1)], dim=-1)
    return key[..., :n]


# ------------------------------------------------------------------------------------------- lucidrains_sel
@register_oracle
class LucidrainsSel(Oracle):
    """lucidrains' selection branch on given block indices: its module's top-k steered onto them (module
    docstring); ``slc_o`` only."""

    name = "lucidrains_sel"
    layer = "kernel"
    branches = ("slc_o",)
    devices = ("cpu", "cuda")
    needs_block_indices = True
    description = (f"lucidrains native-sparse-attention-pytorch {LUCID_VERSION} selection branch on given block "
                   "indices (its top-k steered onto them)")

    def availability(self) -> Optional[str]:
        return Lucidrains.availability(self)

    def versions(self) -> dict:
        return Lucidrains.versions(self)

    def supports(self, case: Case, device: str) -> Optional[str]:
        why = _common_support(case)
        if why:
            return why
        if case.block_indices == "topk" and case.forced_blocks == "none":
            return ("lucidrains always attends to the current block; with forced_blocks none the given blocks "
                    "may lack it")
        return None

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        idx = block_indices if block_indices is not None else inputs.block_indices
        if idx is None:
            raise ValueError("lucidrains_sel needs block indices")
        D, DV, HQ, H, G, ls = case.head_dim, case.head_dim_v, case.heads_q, case.heads_kv, case.group, case.block_size
        q, _, _, _, pad = full_queries(case, inputs)
        idx = given_indices_full(case, idx.to(q.device).long(), pad)
        outs = []
        for qs, ks in _sequences(case):
            T = ks.stop - ks.start
            NS = -(-T // ls)
            cur = (torch.arange(T, device=q.device) // ls).view(1, T, 1, 1)
            i = idx[:, qs]
            keep = (i >= 0) & (i != cur)
            n_sel = min(int(keep.sum(-1).max()) if keep.numel() else 0, T // ls)
            single = n_sel == 0  # no block to select: see build_module's single_path
            Dp = 4 * D if single and 4 * D >= max(D, DV) + NS else max(D, DV) + NS
            onehot = torch.zeros(i.shape[:3] + (NS + 1,), dtype=q.dtype, device=q.device)
            onehot.scatter_(-1, torch.where(keep, i, torch.full_like(i, NS)), 1.0)
            onehot = 3 * onehot - 2  # +1 on the kept blocks (logit 1000), -2 elsewhere (-2000, below its -1e3 dummy)
            qq = _pad_heads(q[:, qs], max(D, DV))
            steer = onehot[..., :NS].repeat_interleave(G, dim=2)  # [B,T,HQ,NS]: kv head h//G's blocks
            qq = _pad_heads(torch.cat([qq, steer], dim=-1), Dp)
            k, v = _pad_heads(inputs.k[:, ks], Dp), _pad_heads(inputs.v[:, ks], Dp)
            m = build_module(case.replace(seq_len=T, q_len=T, cu_seqlens=None, window=0), Dp, 1, (ls, ls), n_sel, "raw",
                             None, steer_channel0=max(D, DV), single_path=single)
            m = m.to(device=q.device, dtype=q.dtype)
            m.to_strategy_combine[0] = _Given(torch.zeros(qq.shape[0], T, HQ * 3, dtype=q.dtype, device=q.device))
            x = torch.cat([qq.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)
            rec = _Record()
            with torch.no_grad(), rec:
                m(x)
            outs.append(rec.stacks[-1][1].transpose(1, 2)[..., :DV])
        o = torch.cat(outs, dim=1)
        return {"slc_o": o[:, pad:] if pad else o}
