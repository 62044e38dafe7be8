"""Oracles ``inhouse_cutile`` (e2e: every branch, own top-n) and ``inhouse_cutile_kernels`` (kernel
layer: compression, selection on the given block indices, sliding window) over
``nsaconf.oracles.inhouse_cutile.forward``, with the kernel tuning of ``config`` (``KernelConfig``, default: the
measured best). ``cuda.tile`` is imported only when an oracle is used."""
from __future__ import annotations

import shutil
from typing import Optional

import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs
from nsaconf.oracles.base import Oracle, register_oracle
from nsaconf.oracles.inhouse_cutile.config import DEFAULT, KernelConfig

ENABLE = ("needs cuda-tile 1.7.0 with its 13.4 toolchain and an sm_90 GPU: pip install cuda-tile==1.7.0 "
          "nvidia-cuda-tileiras==13.4.92 nvidia-cuda-nvcc==13.4.92 nvidia-nvvm==13.4.92 (docs/gpu.md)")
MAX_HEAD_DIM = 256
MAX_BLOCK = 256
MAX_GROUP = 128


def cutile_availability() -> Optional[str]:
    """None when cuTile kernels can run here, else why not and how to enable them."""
    try:
        import cuda.tile  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"cuda.tile not importable ({type(e).__name__}); {ENABLE}"
    if not torch.cuda.is_available():
        return f"no CUDA device; {ENABLE}"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"GPU sm_{major}{minor} is older than sm_80; {ENABLE}"
    if shutil.which("tileiras") is None:
        return f"tileiras not on PATH; {ENABLE}"
    return None


def shape_support(case: Case) -> Optional[str]:
    """Shape limits shared by both oracles (None: supported)."""
    if max(case.head_dim, case.head_dim_v) > MAX_HEAD_DIM:
        return f"head_dim/head_dim_v up to {MAX_HEAD_DIM} (tile of the padded power of two), got {case.head_dim}/{case.head_dim_v}"
    if max(case.cmp_block, case.block_size) > MAX_BLOCK:
        return f"cmp_block and block_size up to {MAX_BLOCK} (one tile per block), got {case.cmp_block}/{case.block_size}"
    if case.group > MAX_GROUP:
        return f"GQA group up to {MAX_GROUP} heads per kv head (one tile), got {case.group}"
    return None


class _CuTileBase(Oracle):
    devices = ("cuda",)
    dtypes = ("float16", "bfloat16", "float32")
    config: KernelConfig = DEFAULT     # the kernels' tile shapes, loop lengths and occupancy hints

    def availability(self) -> Optional[str]:
        return cutile_availability()

    def supports(self, case: Case, device: str) -> Optional[str]:
        return shape_support(case)

    def versions(self) -> dict[str, str]:
        """cuda-tile and the kernel configuration the oracle runs with."""
        try:
            import cuda.tile as ct
            tile = getattr(ct, "__version__", "unknown")
        except Exception as e:  # noqa: BLE001 (a broken install is reported, not raised)
            tile = f"not importable ({type(e).__name__})"
        return {"cuda-tile": tile, "kernel_config": repr(self.config)}


@register_oracle
class InhouseCuTile(_CuTileBase):
    """The whole in-house forward: pooling, compression + LSE, importance + top-n, selection on its own
    top-n, sliding window, gates."""

    name = "inhouse_cutile"
    layer = "e2e"
    branches = ("cmp_o", "cmp_lse", "topk_idx", "slc_o", "swa_o", "o")
    description = "in-house cuTile NSA forward (H100/sm_90, cuda-tile 1.7.0): all branches, own top-n"

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        from nsaconf.oracles.inhouse_cutile.forward import nsa_forward
        return nsa_forward(case, inputs, block_indices=None, config=self.config)


@register_oracle
class InhouseCuTileKernels(_CuTileBase):
    """Each cuTile kernel on its own: compression (o, LSE), selection on the given block indices,
    sliding window."""

    name = "inhouse_cutile_kernels"
    layer = "kernel"
    branches = ("cmp_o", "cmp_lse", "slc_o", "swa_o")
    needs_block_indices = True
    description = "in-house cuTile kernels per branch (compression+LSE, selection on given indices, window)"

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        from nsaconf.oracles.inhouse_cutile.forward import nsa_forward
        if block_indices is None:
            raise ValueError("inhouse_cutile_kernels needs block_indices (the runner passes them)")
        return nsa_forward(case, inputs, block_indices=block_indices.to(inputs.q.device),
                           branches=("cmp_o", "cmp_lse", "slc_o", "swa_o"), config=self.config)
