"""How fast can this card feed the selection's gather? L2 read ceilings measured in one run (issue 6).

    source .device/env.sh
    PYTHONPATH=. python benchmarks/l2_ceiling.py --T 16384,65536 --out $OUT

The 16-block selection reads, for every query and kv head, 16 blocks x 64 keys of K and of V:
``TQ * H * 16 * 64 * (D + DV) * 2`` bytes (34.4 GB at T = 16k), almost all from L2 (Nsight Compute, run Z2: hit
rate 97 %). This script times, at the paper configuration and with the timing of ``harness.bench.time_fn``:

* the selection kernel over the in-house top-n's 16 blocks + gates, as the forward without window runs it;
* the loads-only probe of ``selection_probes.py`` (the selection's exact TMA loads, no MMA, no softmax) on
  several block-index patterns with the same byte count: ``top-n`` (the real indices), ``streaming`` (query i
  reads blocks 16i .. 16i+15 mod the block count: every program walks consecutive blocks), ``hot`` (every
  query reads blocks 0-15: 16 x 32 KB for all SMs) and ``shared-by-4`` (the 4 queries of a program read the
  same 16 random blocks), each at the selection's occupancy hint (2) and at 4; with ``--patterns split``
  also the top-n's 3 forced blocks and its 13 others apart (probe and selection kernel);
* a Triton streaming read (plain vectorised loads, ``num_stages`` pipelining) of a buffer that fits in L2
  (the size of K + V) and of one 8x larger (DRAM), the same total bytes;
* a 256 MiB device-to-device copy with torch (``bench_paper.py``'s DRAM ceiling copies 1 GiB the same way).

It prints one markdown table (ms, effective GB/s = bytes the kernel reads / time, and the time the 16-block
selection's bytes would take at that rate) and writes ``OUT/l2_ceiling.jsonl``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench_paper import gpu_inputs, paper_case  # noqa: E402  (benchmarks/ is sys.path[0])
from nsaconf.harness import bench as hb  # noqa: E402


@functools.cache
def _stream_read_kernel():
    """The Triton kernel (built on first use, so that this module imports without Triton): program p reads
    chunks ``(p*steps + s) % n_chunks`` (``CHUNK`` elements each) and keeps an elementwise running maximum, so
    that every loaded element is used; writes it once."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(X, O, n_chunks, steps, CHUNK: tl.constexpr):
        pid = tl.program_id(0)
        offs = tl.arange(0, CHUNK)
        acc = tl.full([CHUNK], float("-inf"), dtype=tl.float32)
        for s in range(steps):
            c = (pid * steps + s) % n_chunks
            acc = tl.maximum(acc, tl.load(X + c.to(tl.int64) * CHUNK + offs).to(tl.float32))
        tl.store(O + pid.to(tl.int64) * CHUNK + offs, acc)
    return kernel


def stream_read_fn(nbytes_buffer: int, total_bytes: int, dtype=torch.bfloat16, chunk: int = 8192,
                   num_warps: int = 8, num_stages: int = 4):
    """A closure running ``_stream_read_kernel`` over a ``nbytes_buffer`` buffer, reading ``total_bytes`` in all;
    returns (fn, bytes read per call)."""
    esz = torch.tensor([], dtype=dtype).element_size()
    n_chunks = max(1, nbytes_buffer // (chunk * esz))
    x = torch.randn(n_chunks * chunk, device="cuda").to(dtype)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    progs = sms * 16
    steps = max(1, total_bytes // (progs * chunk * esz))
    o = torch.empty(progs * chunk, device="cuda", dtype=torch.float32)

    def fn():
        _stream_read_kernel()[(progs,)](x, o, n_chunks, steps, CHUNK=chunk, num_warps=num_warps, num_stages=num_stages)
    return fn, progs * steps * chunk * esz


PATTERNS = ("top-n", "streaming", "hot", "shared-by", "split")   # --patterns (split: see main)


def index_patterns(idx16: torch.Tensor, n_blocks: int, qpp: int, families=PATTERNS, working_sets: tuple = ()) -> dict:
    """Block-index tensors ``[B,TQ,H,16]`` with the byte count of ``idx16`` (the in-house top-n) for the pattern
    ``families`` asked for (module docstring; ``shared-by`` gives ``shared-by-{qpp}``) and ``random in W`` per W of
    ``working_sets`` (uniform random blocks ``< W`` of each kv head, W * 32 KB of K/V per head at D = 128)."""
    B, TQ, H, n = idx16.shape
    dev = idx16.device
    i = torch.arange(TQ, device=dev).view(1, TQ, 1, 1)
    j = torch.arange(n, device=dev).view(1, 1, 1, n)
    g = torch.Generator(device=dev).manual_seed(7)
    pats = {}
    if "top-n" in families:
        pats["top-n"] = idx16
    if "streaming" in families:
        pats["streaming"] = ((i * n + j) % n_blocks).expand(B, TQ, H, n)
    if "hot" in families:
        pats["hot"] = (j % n_blocks).expand(B, TQ, H, n)
    if "shared-by" in families:
        per_prog = torch.randint(0, n_blocks, (B, -(-TQ // qpp), H, n), device=dev, generator=g)
        pats[f"shared-by-{qpp}"] = per_prog.repeat_interleave(qpp, dim=1)[:, :TQ]
    for w in working_sets:
        pats[f"random in {w}"] = torch.randint(0, min(w, n_blocks), (B, TQ, H, n), device=dev, generator=g)
    return pats


def _numbers(option: str, text: str, kind=int) -> list:
    """``--option a,b,c`` as a list of ``kind``; ValueError naming the option otherwise."""
    try:
        return [kind(t) for t in text.split(",") if t]
    except ValueError:
        raise ValueError(f"{option}: {text!r} is not a comma list of {kind.__name__} values") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", default="16384")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT", "out/l2-ceiling"))
    ap.add_argument("--patterns", default="top-n,streaming,hot,shared-by",
                    help=f"comma list of probe index patterns (of {','.join(PATTERNS)}; split: the top-n's forced "
                         "blocks and its others apart, also through the selection kernel; '' for none)")
    ap.add_argument("--occupancy", default="2,4", help="comma list of the probe's occupancy hints")
    ap.add_argument("--working-sets", default="", help="comma list of W: also probe 'random in W blocks'")
    ap.add_argument("--buffers-mib", default="", help="comma list of Triton read buffer sizes in MiB "
                                                        "(default: the size of K+V and 8x that)")
    ap.add_argument("--triton-stages", default="4", help="comma list of num_stages for the Triton read")
    ap.add_argument("--no-selection", action="store_true", help="skip the selection kernel itself")
    args = ap.parse_args()
    want = set(filter(None, args.patterns.split(",")))
    try:
        Ts = _numbers("--T", args.T)
        if want - set(PATTERNS):
            raise ValueError(f"--patterns: unknown {sorted(want - set(PATTERNS))} (known: {', '.join(PATTERNS)})")
        occs = _numbers("--occupancy", args.occupancy)
        wsets = tuple(_numbers("--working-sets", args.working_sets))
        stages = _numbers("--triton-stages", args.triton_stages)
        mibs = _numbers("--buffers-mib", args.buffers_mib, float)
    except ValueError as e:
        print(f"l2_ceiling: error: {e}", file=sys.stderr)
        return 2
    from nsaconf.oracles.inhouse_cutile import forward as F
    from selection_probes import run_probe
    os.makedirs(args.out, exist_ok=True)
    rows: list[dict] = []
    dev = torch.cuda.get_device_name(0)
    vers = hb.versions()
    print(f"device {dev}; {vers}", flush=True)

    def record(label: str, T: int, fn, nbytes: int, sel_bytes: int, note: str = "") -> None:
        """Time ``fn`` (which reads ``nbytes``), print and append one row."""
        try:
            ms = hb.time_fn(fn, reps=args.reps, warmup=3)
        except Exception as e:  # noqa: BLE001  (one failing row must not lose the others)
            print(f"FAIL T={T} {label}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            return
        gbps = nbytes / ms / 1e6
        row = dict(T=T, kernel=label, ms=round(ms, 4), bytes=nbytes, gbps=round(gbps, 1),
                   selection_at_this_rate_ms=round(sel_bytes / gbps / 1e6, 3), note=note, device=dev, versions=vers)
        rows.append(row)
        with open(os.path.join(args.out, "l2_ceiling.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"T={T:6d} {label:62s} {ms:8.3f} ms {gbps:8.0f} GB/s  (16-block selection's bytes: "
              f"{row['selection_at_this_rate_ms']:.3f} ms)", flush=True)

    for T in Ts:
        case_nw = paper_case(T, window=0)
        x = gpu_inputs(case_nw, seed=T)
        B, _, HQ, D = x.q.shape
        H, DV = x.k.shape[2], x.v.shape[3]
        ls, n = 64, 16
        n_blocks = -(-T // ls)
        esz = x.k.element_size()
        sel_bytes = B * T * H * n * ls * (D + DV) * esz
        kc, vc = F.mean_pool(x.k, x.v, ls, ls)
        imp = F.compression(x.q, kc, vc, T, ls, ls, "end_inclusive", case_nw.softmax_scale, want_importance=True)[2]
        pos = torch.arange(T, device="cuda")
        idx16 = F.top_n(imp, pos, n, ls, "initial_local").to(torch.int32)
        split = {}
        if "split" in want:     # the top-n's 3 forced blocks (+ a -1 slot: block 0) and its 13 others
            split = {"forced (3 + one -1 slot)": F.top_n(torch.zeros_like(imp), pos, 4, ls, "initial_local"),
                     "others (13)": F.top_n_others(imp, pos, n - 3, ls, "initial_local")}
            split = {k: v.to(torch.int32).contiguous() for k, v in split.items()}
        del imp
        print(f"T={T}: the 16-block selection reads {sel_bytes / 1e9:.2f} GB of K/V tiles", flush=True)

        def selection(idx):     # what the forward without window runs after its top-n
            return F.SELECTION_IMPL[F.DEFAULT_SELECTION](x.q, x.k, x.v, idx, ls, case_nw.softmax_scale, want_slc=False,
                                                         gated=(x.q, None, x.g_cmp, x.g_slc, x.g_swa))

        def probe(what: str, idx: torch.Tensor, nbytes: int) -> None:     # at each occupancy hint asked for
            for occ in occs:
                record(f"probe, loads only, {what}, occupancy {occ}", T,
                       lambda occ=occ: run_probe(x.q, x.k, x.v, idx, ls, False, occupancy=occ),
                       nbytes, sel_bytes, note="probe kernel (selection_probes.py)")

        if not args.no_selection:
            record("selection over 16 blocks + gates (the forward w/o window's kernel)", T,
                   lambda: selection(idx16), sel_bytes, sel_bytes)
        for what, idx in split.items():   # bytes: the slots loaded (a -1 slot loads block 0)
            w = idx.shape[-1]
            if not args.no_selection:
                record(f"selection over the top-n's {what} + gates", T, lambda idx=idx: selection(idx),
                       sel_bytes * w // n, sel_bytes)
            # the probe pads to an even slot count with -1 (block 0)
            probe(f"the top-n's {what}{' + one -1 slot' if w % 2 else ''}", idx, sel_bytes * (w + w % 2) // n)
        for pat, idx in index_patterns(idx16, n_blocks, F.SEL_QUERIES_PER_PROGRAM, want, wsets).items():
            probe(f"{pat} blocks", idx.to(torch.int32).contiguous(), sel_bytes)
        kv_bytes = x.k.numel() * esz + x.v.numel() * esz
        sizes = ([(f"{m:g} MiB", int(m * 2**20)) for m in mibs] if mibs else
                 [(f"{kv_bytes / 2**20:.0f} MiB, the size of K+V", kv_bytes),
                  (f"{8 * kv_bytes / 2**20:.0f} MiB, 8x K+V", 8 * kv_bytes)])
        for what, size in sizes:
            for st in stages:
                fn, nb = stream_read_fn(size, sel_bytes, num_stages=st)
                record(f"triton streaming read, buffer {what}, num_stages {st}", T, fn, nb, sel_bytes)
        src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        record("torch D2D copy 256 MiB (read + write bytes)", T, lambda: dst.copy_(src), 2 * src.numel(), sel_bytes)
        torch.cuda.empty_cache()

    print("\n| T | kernel | ms | GB/s read | the 16-block selection's bytes at this rate, ms |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['kernel']} | {r['ms']:.3f} | {r['gbps']:.0f} | {r['selection_at_this_rate_ms']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
