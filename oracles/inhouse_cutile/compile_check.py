"""Ahead-of-time compile of every in-house kernel variant to an sm_90 cubin, without a GPU.

``python -m nsaconf.oracles.inhouse_cutile.compile_check [dtype] [label filter] [--stats] [--ptx DIR]`` needs ``cuda-tile``
and tileiras/ptxas 13.4 (``pip install cuda-tile==1.7.0 nvidia-cuda-tileiras==13.4.92
nvidia-cuda-nvcc==13.4.92 nvidia-nvvm==13.4.92``). It catches typing and lowering errors before any
device time is spent. ``--stats`` compiles with the alignment the runtime sees for contiguous
tensors (strides divisible by 8 elements; without it cuTile falls back to plain 16-bit loads, no
TMA) and prints, from the PTX embedded in each cubin, the static shared memory per CTA, the
counts of ``wgmma`` / ``mma.sync`` / ``ldmatrix`` / TMA (``cp.async.bulk.tensor``) instructions and,
from ``ptxas -v`` on that PTX, threads per CTA, registers per thread and spill bytes.
``--ptx DIR`` writes each variant's PTX without its debug part (same alignment) to ``DIR/NN.ptx``:
run it before and after a kernel refactor and ``diff -r`` the folders.

The variants are the kernel constants of ``KernelConfig`` objects (``config.py``; the default one and a few
others) on a few shapes, each compiled with the occupancy hint the forward launches it with. A
kernel-development tool: the oracles do not use it.
"""
from __future__ import annotations

import io
import re
import struct
import sys
import time
from typing import Any, Optional

from nsaconf.oracles.inhouse_cutile.config import DEFAULT, MIN_SEL_ROWS, KernelConfig, pow2


def _arr(ct, dtype, ndim: int, aligned: bool):
    """The constraint of a contiguous ``ndim``-d array; ``aligned``: strides divisible by 8 elements, as the
    runtime sees for contiguous tensors (without it cuTile falls back to plain 16-bit loads, no TMA)."""
    from cuda.tile.compilation import ArrayConstraint
    return ArrayConstraint(dtype, ndim, index_dtype=ct.int32, stride_lower_bound_incl=0, alias_groups=(),
                           may_alias_internally=False, stride_constant=[None] * (ndim - 1) + [1],
                           stride_divisible_by=([8] * (ndim - 1) + [1]) if aligned else 1,
                           base_addr_divisible_by=16)


def _sections(cubin: bytes) -> list[tuple[str, bytes, int]]:
    """(name, contents, size) of each ELF section of a cubin."""
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names = secs[shstrndx][4]
    return [(cubin[names + sec[0]:cubin.index(b"\0", names + sec[0])].decode(), cubin[sec[4]:sec[4] + sec[5]], sec[5])
            for sec in secs]


def ptx_body(cubin: bytes) -> str:
    """The PTX that cuTile embeds in a cubin (section ``.nv_debug_ptx_txt``) without its debug part
    (source locations, comments, the embedded Tile IR source): one statement per line. Equal bodies =
    the same machine code was asked for, so a kernel refactor can be checked on a CPU."""
    ptx = next((data for name, data, _ in _sections(cubin) if name == ".nv_debug_ptx_txt"), b"")
    ptx = ptx.decode(errors="replace").replace("\0", "")
    cut = ptx.find(".section")
    ptx = re.sub(r"//[^\n]*", "", re.sub(r"\.loc[^;\n]*", "", ptx[:cut] if cut >= 0 else ptx))
    return "\n".join(s.strip() for s in re.split(r"[;\n]", ptx) if s.strip() and not s.strip().startswith(".file"))


def _ptxas() -> str | None:
    """The ptxas of the 13.4 toolchain (on PATH, or beside tileiras in the ``nvidia`` wheels), or None."""
    import importlib.util
    import os
    import shutil
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "cu13", "bin", "ptxas")
        if os.path.exists(path):
            return path
    return shutil.which("ptxas")


def ptxas_resources(cubin: bytes) -> dict:
    """Threads per CTA, registers per thread and spill bytes of the cubin's kernel, from ``ptxas -v`` on the
    PTX that cuTile embeds (the same PTX tileiras assembled); empty when ptxas is not found."""
    import subprocess
    import tempfile
    ptxas = _ptxas()
    ptx = next((data for name, data, _ in _sections(cubin) if name == ".nv_debug_ptx_txt"), b"")
    ptx = ptx.decode(errors="replace").replace("\0", "\n")
    if not ptxas or not ptx:
        return {}
    cut = ptx.find(".section")
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/k.ptx", "w") as f:
            f.write(ptx[:cut] if cut >= 0 else ptx)
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", f"{tmp}/k.ptx", "-o", f"{tmp}/k.cubin"],
                           capture_output=True, text=True)
    log = r.stdout + r.stderr
    out = {}
    for key, pat in (("threads", r"\.reqntid\s+(\d+)"), ("registers", r"Used (\d+) registers"),
                     ("spill_stores", r"(\d+) bytes spill stores"), ("spill_loads", r"(\d+) bytes spill loads")):
        m = re.search(pat, ptx if key == "threads" else log)
        if m:
            out[key] = int(m.group(1))
    return out


def cubin_stats(cubin: bytes) -> dict:
    """Static shared memory per CTA and instruction counts from the PTX that cuTile embeds in a cubin, and
    ``ptxas_resources`` (threads, registers, spills)."""
    out = {"smem_bytes": sum(size for name, _, size in _sections(cubin)
                             if name.startswith(".nv.shared.") and "reserved" not in name)}
    out.update(ptxas_resources(cubin))
    ptx = ptx_body(cubin)
    for key, pat in (("wgmma", r"wgmma\.mma_async"), ("mma.sync", r"\bmma\.sync"), ("ldmatrix", r"ldmatrix"),
                     ("tma", r"cp\.async\.bulk\.tensor"), ("ld.global", r"ld\.global")):
        out[key] = len(re.findall(pat, ptx))
    shapes = sorted(set(re.findall(r"(?:wgmma\.mma_async\.sync|mma\.sync)\.aligned\.(m\d+n\d+k\d+)", ptx)))
    out["mma_shapes"] = ",".join(shapes)
    return out


def variants(dtype: str = "bfloat16", aligned: bool = False) -> list[tuple[str, Any, list, Optional[int]]]:
    """(label, kernel, signature parameters, occupancy hint or None) of every kernel variant: the kernel constants
    come from ``KernelConfig`` objects (the default one and a few others) through the same ``KernelConfig``
    methods the forward launches with, the occupancy hints from the config too."""
    import cuda.tile as ct
    from cuda.tile.compilation import ScalarConstraint
    from nsaconf.oracles.inhouse_cutile import kernels as K
    dt = getattr(ct, dtype)
    a3, a4 = _arr(ct, dt, 3, aligned), _arr(ct, dt, 4, aligned)
    f32_3, f32_4 = _arr(ct, ct.float32, 3, aligned), _arr(ct, ct.float32, 4, aligned)
    i32_4 = _arr(ct, ct.int32, 4, aligned)
    f, i = ScalarConstraint(ct.float32), ScalarConstraint(ct.int32)
    out = []
    # compression (with or without importance; pooled blocks: one pass when they fit cmp_one_pass_tiles) and window
    for cfg, is_cmp, want_imp, G, DP, nkeys in [(DEFAULT, True, True, 16, 128, 1024), (DEFAULT, True, True, 3, 64, 1024),
                                                (DEFAULT, False, False, 16, 128, 0), (DEFAULT, False, False, 1, 32, 0),
                                                (KernelConfig(cmp_tile=(128, 64)), True, True, 16, 128, 1024),
                                                (KernelConfig(window_tile=(128, 64)), False, False, 16, 128, 0),
                                                (DEFAULT, True, True, 16, 128, 256), (DEFAULT, True, True, 16, 128, 7),
                                                (KernelConfig(cmp_tile=(64, 128)), True, True, 16, 128, 256),
                                                (DEFAULT, True, True, 3, 64, 150), (DEFAULT, True, False, 16, 128, 256)]:
        GP, TMQ, TN = cfg.dense_tile(is_cmp, G)
        nt1 = cfg.one_pass_tiles(nkeys, TN) if is_cmp and want_imp else 0
        out.append((f"dense cmp={is_cmp} G{G}/{GP} TMQ{TMQ} TN{TN} D{DP}" + (f" one_pass{nt1}" if nt1 else "")
                    + (" no_importance" if is_cmp and not want_imp else ""), K.dense_branch_kernel,
                    [a4, a4, a4, a4, f32_3, f32_4, f, i, i, i, i, i, i, i, G, GP, TMQ, TN, DP, DP, is_cmp, want_imp, nt1],
                    None))
    # per-query selection (any block size; aligned = the block size is the power-of-two tile)
    for G, LSP, DP, al in [(16, 64, 128, True), (1, 32, 64, False), (3, 16, 256, True)]:
        GP = max(pow2(G), MIN_SEL_ROWS)
        out.append((f"selection G{G}/{GP} LS{LSP} D{DP} aligned={al}", K.selection_kernel,
                    [a4, a4, a4, i32_4, a4, f, i, i, i, 16, G, GP, LSP, DP, DP, al], None))
    # chunked selection: n blocks of LS keys; gated epilogue, or the partial result with its LSE (NP = n)
    for cfg, G, n, LS, DP, slc, gates, win, lse in [
            (DEFAULT, 16, 16, 64, 128, False, True, False, False),
            (KernelConfig(chunk_blocks=4), 16, 16, 64, 128, True, False, False, False),
            (DEFAULT, 3, 4, 32, 64, True, True, True, False),
            (KernelConfig(chunk_blocks=1), 1, 8, 16, 256, True, False, False, False),
            (DEFAULT, 16, 14, 64, 128, True, False, False, True), (DEFAULT, 16, 13, 64, 128, True, False, False, True),
            (KernelConfig(chunk_blocks=4), 16, 14, 64, 128, True, False, False, True)]:
        GP = max(pow2(G), MIN_SEL_ROWS)
        CH = cfg.chunk(n, LS)
        NP = n if lse else -(-n // CH) * CH
        QPP = cfg.sel_queries_per_program
        out.append((f"selection_chunk G{G}/{GP} CH{CH} NP{NP} LS{LS} D{DP} slc={slc} gates={gates} window={win}"
                    + (" lse" if lse else "") + f" qpp{QPP}", K.selection_chunk_kernel,
                    [a4, a4, a4, i32_4, a4, a4, a4, a3, a3, a3, a4, f32_3, f, i, i, NP, CH, LS, G, GP, DP, DP,
                     slc, gates, win, lse, pow2(NP), QPP], cfg.sel_occupancy))
    # streaming top-n: the N best of NS blocks into NOUT slots, forced rule FORCED (index into K.FORCED_KINDS);
    # others: only the non-forced blocks (what the forward asks for); last: the default tile at T = 16k
    topn = [(KernelConfig(topn_stream_tile=tile), N - others, NOUT, NS, FORCED, others)
            for N, NOUT, NS, FORCED in [(16, 16, 1024, 2), (3, 4, 128, 0), (5, 8, 512, 1)]
            for tile, others in [((16, 128), False), ((16, 128), True), ((32, 16), True)]]
    for cfg, N, NOUT, NS, FORCED, others in topn + [(DEFAULT, 13, 16, 256, 2, True)]:
        TR, CW = cfg.topn_tile(NS)
        out.append((f"topn_stream{' others' if others else ''} N{N} TR{TR} CW{CW} forced{FORCED}", K.topn_stream_kernel,
                    [f32_4, i32_4, i, i, i, i, N, NOUT, TR, CW, FORCED, others], cfg.topn_occupancy))
    # sliding window + the NLOCAL forced local blocks + gates
    for cfg, NLOCAL, G, LS, DP, wswa, wslc in [(DEFAULT, 2, 16, 64, 128, False, False), (DEFAULT, 1, 3, 32, 64, True, True),
                                               (DEFAULT, 2, 1, 64, 32, True, True)]:
        GP, TMQ, _ = cfg.dense_tile(False, G)
        out.append((f"window_forced NLOCAL{NLOCAL} G{G}/{GP} TMQ{TMQ} LS{LS} D{DP} swa={wswa} slc={wslc}",
                    K.window_forced_kernel, [a4, a4, a4, a4, f32_3, a4, a3, a3, a3, a4, a4, a4, f, i, i, i, i, i,
                                             NLOCAL, G, GP, TMQ, LS, DP, DP, wswa, wslc], None))
    out.append(("gate HP16 TM4 DV128", K.gate_kernel, [a4, a4, a4, a3, a3, a3, a4, 4, 16, 128, True], None))
    out.append(("mean_pool LP64 D128", K.mean_pool_kernel, [a4, a4, a4, a4, i, i, i, 64, 128, 128],
                DEFAULT.pool_occupancy))
    return out


def main(argv: list[str] | None = None) -> int:
    """``argv``: [dtype (default bfloat16), substring filter of the variant labels] [--stats]
    [--ptx DIR] (write each variant's ``ptx_body`` to DIR/NN.ptx: diff two such folders around a
    kernel refactor; the first line of each file is the variant's label)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ptx_dir = None
    if "--ptx" in argv:
        k = argv.index("--ptx")
        ptx_dir = argv[k + 1] if k + 1 < len(argv) else None
        if ptx_dir is None:
            print("compile_check: error: --ptx needs a folder", file=sys.stderr)
            return 2
        del argv[k:k + 2]
        import os
        os.makedirs(ptx_dir, exist_ok=True)
    stats = "--stats" in argv
    argv = [a for a in argv if a != "--stats"]
    import cuda.tile as ct  # noqa: F401
    from cuda.tile.compilation import CallingConvention, KernelSignature, export_kernel
    cc = CallingConvention.cutile_python_v1()
    bad = 0
    only = argv[1] if len(argv) > 1 else ""
    aligned = stats or ptx_dir is not None
    for n, (label, kern, params, occ) in enumerate(variants(argv[0] if argv else "bfloat16", aligned)):
        if only not in label:
            continue
        t = time.time()
        try:
            sig = KernelSignature(params, cc).with_mangled_symbol(kern._annotated_function.pyfunc.__name__)
            if occ is not None:    # the hint the forward launches this kernel with
                kern = kern.replace_hints(occupancy=occ)
                label += f" occupancy={occ}"
            buf = io.BytesIO()
            export_kernel(kern, [sig], buf, gpu_code="sm_90", output_format="cubin")
            print(f"ok   {label}: {len(buf.getvalue())} B cubin in {time.time() - t:.1f}s")
            if stats:
                print("     " + " ".join(f"{k}={v}" for k, v in cubin_stats(buf.getvalue()).items()))
            if ptx_dir is not None:
                with open(f"{ptx_dir}/{n:02d}.ptx", "w") as f:
                    f.write(label + "\n" + ptx_body(buf.getvalue()) + "\n")
        except Exception as e:  # report every variant
            bad += 1
            print(f"FAIL {label}: {type(e).__name__}: {str(e)[:3000]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
