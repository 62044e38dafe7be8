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
"""
from __future__ import annotations

import io
import re
import struct
import sys
import time
from typing import Any

ALIGNED = False   # --stats: strides divisible by 8 elements, as contiguous tensors are at run time


def _arr(ct, dtype, ndim: int):
    from cuda.tile.compilation import ArrayConstraint
    return ArrayConstraint(dtype, ndim, index_dtype=ct.int32, stride_lower_bound_incl=0, alias_groups=(),
                           may_alias_internally=False, stride_constant=[None] * (ndim - 1) + [1],
                           stride_divisible_by=([8] * (ndim - 1) + [1]) if ALIGNED else 1,
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


def variants(dtype: str = "bfloat16") -> list[tuple[str, Any, list]]:
    """(label, kernel, signature parameters) for the variants the benchmark and tests use."""
    import cuda.tile as ct
    from cuda.tile.compilation import ScalarConstraint
    from nsaconf.oracles.inhouse_cutile import kernels as K
    dt = getattr(ct, dtype)
    a4, f32_3, f32_4, i32_4 = _arr(ct, dt, 4), _arr(ct, ct.float32, 3), _arr(ct, ct.float32, 4), _arr(ct, ct.int32, 4)
    f, i = ScalarConstraint(ct.float32), ScalarConstraint(ct.int32)
    out = []
    for cmp, G, GP, TMQ, TN, DP, mask_all, tpp, nt1 in [(True, 16, 16, 4, 64, 128, False, 1, 0),
                                                        (True, 3, 4, 16, 64, 64, False, 1, 0),
                                                        (False, 16, 16, 4, 64, 128, False, 1, 0),
                                                        (False, 1, 1, 64, 64, 32, False, 1, 0),
                                                        (True, 16, 16, 4, 64, 128, True, 1, 0),
                                                        (True, 16, 16, 8, 64, 128, False, 1, 0),
                                                        (False, 16, 16, 8, 64, 128, False, 1, 0),
                                                        (True, 16, 16, 4, 64, 128, False, 4, 0),
                                                        (True, 16, 16, 4, 128, 128, False, 2, 0),
                                                        # one pass (compression + importance, few pooled blocks)
                                                        (True, 16, 16, 4, 64, 128, False, 1, 4),
                                                        (True, 16, 16, 4, 64, 128, False, 1, 1),
                                                        (True, 16, 16, 4, 128, 128, False, 1, 2),
                                                        (True, 3, 4, 16, 64, 64, True, 1, 3)]:
        out.append((f"dense cmp={cmp} G{G}/{GP} TMQ{TMQ} TN{TN} D{DP}" + (" mask_all" if mask_all else "")
                    + (f" tpp{tpp}" if tpp > 1 else "") + (f" one_pass{nt1}" if nt1 else ""), K.dense_branch_kernel,
                    [a4, a4, a4, a4, f32_3, f32_4, f, i, i, i, i, i, i, i, G, GP, TMQ, TN, DP, DP, cmp, cmp, mask_all,
                     tpp, nt1]))
    for G, GP, LSP, DP, al in [(16, 16, 64, 128, True), (1, 16, 32, 64, False), (3, 16, 16, 256, True)]:
        out.append((f"selection G{G}/{GP} LS{LSP} D{DP} aligned={al}", K.selection_kernel,
                    [a4, a4, a4, i32_4, a4, f, i, i, i, 16, G, GP, LSP, DP, DP, al]))
    i32_3 = _arr(ct, ct.int32, 3)
    a3 = _arr(ct, dt, 3)
    for G, GP, TQB, LSP, DP, al, gates, win in [(16, 16, 4, 64, 128, True, True, False), (16, 16, 8, 64, 128, True, True, False),
                                                (3, 4, 16, 32, 64, False, False, False),
                                                (3, 4, 16, 32, 64, False, True, True)]:
        out.append((f"selection_union G{G}/{GP} TQB{TQB} LS{LSP} D{DP} aligned={al} gates={gates} window={win}",
                    K.selection_union_kernel,
                    [a4, a4, a4, i32_4, i32_4, i32_3, a4, a4, a4, a3, a3, a3, a4, f, i, i, i, 16, TQB, G, GP, LSP, DP, DP,
                     al, not gates, gates, win]))
    for G, GP, CH, NP, LS, DP, slc, gates, win, lse in [(16, 16, 4, 16, 64, 128, True, False, False, False),
                                                        (16, 16, 2, 16, 64, 128, False, True, False, False),
                                                        (16, 16, 2, 14, 64, 128, True, False, False, True),
                                                        (16, 16, 2, 13, 64, 128, True, False, False, True),
                                                        (16, 16, 4, 14, 64, 128, True, False, False, True),
                                                        (3, 16, 2, 4, 32, 64, True, True, True, False),
                                                        (1, 16, 1, 8, 16, 256, True, False, False, False)]:
        out.append((f"selection_chunk G{G}/{GP} CH{CH} NP{NP} LS{LS} D{DP} slc={slc} gates={gates} window={win}"
                    + (" lse" if lse else ""), K.selection_chunk_kernel,
                    [a4, a4, a4, i32_4, a4, a4, a4, a3, a3, a3, a4, f32_3, f, i, i, NP, CH, LS, G, GP, DP, DP, True, 2, 4,
                     slc, gates, win, lse, False, 1 << (NP - 1).bit_length(), 1, True]))
        # indices loaded once: one or 4 queries per program; every step masked or only those not seen whole
        for qpp, mask_all in ((1, True), (4, True), (4, False)) if lse else ():
            out.append((f"selection_chunk idx_once{' qpp4' if qpp == 4 else ''}{'' if mask_all else ' mask_skip'} G{G}/{GP} CH{CH} NP{NP} LS{LS} D{DP} "
                        f"slc={slc} gates={gates} window={win} lse", K.selection_chunk_kernel,
                        [a4, a4, a4, i32_4, a4, a4, a4, a3, a3, a3, a4, f32_3, f, i, i, NP, CH, LS, G, GP, DP, DP, True, 2,
                         4, slc, gates, win, lse, True, 1 << (NP - 1).bit_length(), qpp, mask_all]))
        if lse:
            continue
        out.append((f"selection_keyrows G{G}/{GP} CH{CH} NP{NP} LS{LS} D{DP} slc={slc} gates={gates} window={win}",
                    K.selection_keyrows_kernel,
                    [a4, a4, a4, i32_4, a4, a4, a4, a3, a3, a3, a4, f, i, i, NP, CH, LS, G, GP, DP, DP, True, 2, 4,
                     slc, gates, win]))
    for N, NOUT, TR, NSP, FORCED in [(16, 16, 8, 1024, 2), (3, 4, 64, 128, 0), (5, 8, 16, 512, 1)]:
        out.append((f"topn N{N} TR{TR} NSP{NSP} forced{FORCED}", K.topn_kernel,
                    [f32_4, i32_4, i, i, i, i, N, NOUT, TR, NSP, FORCED]))
        out.append((f"topn_packed N{N} TR{TR} NSP{NSP} forced{FORCED}", K.topn_packed_kernel,
                    [f32_4, i32_4, i, i, i, i, N, NOUT, TR, NSP, FORCED]))
        for sbv in (False, True):
            out.append((f"topn_stream N{N} TR16 CW{min(NSP, 128)} forced{FORCED} slot_by_value={sbv}", K.topn_stream_kernel,
                        [f32_4, i32_4, i, i, i, i, N, NOUT, 16, min(NSP, 128), FORCED, False, sbv]))
            out.append((f"topn_stream others N{N - 1} TR16 CW{min(NSP, 128)} forced{FORCED} slot_by_value={sbv}",
                        K.topn_stream_kernel, [f32_4, i32_4, i, i, i, i, N - 1, NOUT, 16, min(NSP, 128), FORCED, True, sbv]))
            out.append((f"topn_stream others N{N - 1} TR32 CW16 forced{FORCED} slot_by_value={sbv}",
                        K.topn_stream_kernel, [f32_4, i32_4, i, i, i, i, N - 1, NOUT, 32, 16, FORCED, True, sbv]))
    for NLOCAL, G, GP, TMQ, LS, DP, wswa, wslc, tpp in [(2, 16, 16, 4, 64, 128, False, False, 1),
                                                        (1, 3, 4, 16, 32, 64, True, True, 1),
                                                        (2, 1, 1, 64, 64, 32, True, True, 1),
                                                        (2, 16, 16, 4, 64, 128, False, False, 4)]:
        out.append((f"window_forced NLOCAL{NLOCAL} G{G}/{GP} TMQ{TMQ} LS{LS} D{DP} swa={wswa} slc={wslc}"
                    + (f" tpp{tpp}" if tpp > 1 else ""), K.window_forced_kernel,
                    [a4, a4, a4, a4, f32_3, a4, a3, a3, a3, a4, a4, a4, f, i, i, i, i, i,
                     NLOCAL, G, GP, TMQ, LS, DP, DP, wswa, wslc, tpp]))
    out.append(("gate HP16 TM4 DV128", K.gate_kernel, [a4, a4, a4, _arr(ct, dt, 3), _arr(ct, dt, 3), _arr(ct, dt, 3), a4,
                                                      4, 16, 128, True]))
    out.append(("mean_pool LP64 D128", K.mean_pool_kernel, [a4, a4, a4, a4, i, i, i, 64, 128, 128]))
    return out


def _runtime_occupancy(label: str):
    """The occupancy hint ``forward`` applies to the kernel of ``label`` (None: the kernel's own)."""
    from nsaconf.oracles.inhouse_cutile import forward as F
    if label.startswith(("selection_chunk", "selection_keyrows")):
        return F.SEL_OCCUPANCY
    if label.startswith("selection_union"):
        return F.UNION_OCCUPANCY
    if label.startswith("topn_stream"):
        return F.TOPN_HINTS.get("occupancy")
    if label.startswith("mean_pool"):
        return F.POOL_HINTS.get("occupancy")
    return None


def main(argv: list[str] | None = None) -> int:
    """``argv``: [dtype (default bfloat16), substring filter of the variant labels] [--stats]
    [--ptx DIR] (write each variant's ``ptx_body`` to DIR/NN.ptx: diff two such folders around a
    kernel refactor)."""
    global ALIGNED
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
    ALIGNED = stats or ptx_dir is not None
    import cuda.tile as ct  # noqa: F401
    from cuda.tile.compilation import CallingConvention, KernelSignature, export_kernel
    cc = CallingConvention.cutile_python_v1()
    bad = 0
    only = argv[1] if len(argv) > 1 else ""
    for n, (label, kern, params) in enumerate(variants(argv[0] if argv else "bfloat16")):
        if only not in label:
            continue
        t = time.time()
        try:
            sig = KernelSignature(params, cc).with_mangled_symbol(kern._annotated_function.pyfunc.__name__)
            occ = _runtime_occupancy(label)
            if ALIGNED and occ is not None:    # the hint the forward launches these kernels with
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
