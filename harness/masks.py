"""``nsaconf masks``: which masking conventions does each oracle really compute?

Per oracle and branch: the convention classified from behaviour (``harness.probe``), causality leaks,
and an ASCII diff of the measured dependency matrix M against the expected mask::

    .  no dependency, expected      #  dependency, expected
    +  extra dependency             -  missing dependency       ~  ignored (through the oracle's own top-k)

T <= 64 prints every cell; larger T is shrunk by an integer factor (a cell shows the most severe char
of its block). ``--json`` prints one JSON object per (oracle, branch); ``--html FILE`` writes a page
with heatmaps; ``--md FILE`` a markdown report (used for docs/results/conventions.md).
Exit codes: 0 (1 with ``--fail-on-leak`` when a leak or mismatch is found), 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional



def register(subparsers) -> None:
    """Add the ``masks`` subcommand to ``nsaconf``'s subparsers."""
    p = subparsers.add_parser("masks", help="classify each oracle's masking conventions from behaviour",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=cmd_masks)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--oracles", help="comma-separated oracle names (default: every registered oracle)")
    p.add_argument("--branch", action="append", default=[], metavar="B",
                   help="cmp, slc, swa or e2e (repeatable or comma-separated; default: every branch the oracle returns)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16, help="selection block l' (also l and d unless given)")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--cmp-block", type=int, help="compression block l (default: block size)")
    p.add_argument("--cmp-stride", type=int, help="compression stride d (default: compression block)")
    p.add_argument("--top-n", type=int, default=4)
    p.add_argument("--cmp-mask", help="configure the probe case's cmp_mask (oracles that follow the case)")
    p.add_argument("--window-keys", help="configure the probe case's window_keys")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plugin", action="append", default=[], help="Python file registering oracles (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per oracle/branch on stdout")
    p.add_argument("--html", metavar="FILE", help="write a standalone HTML page with heatmaps")
    p.add_argument("--md", metavar="FILE", help="write a markdown report")
    p.add_argument("--width", type=int, default=64, help="max ASCII diff width (default 64)")
    p.add_argument("--summary", action="store_true", help="text output without the ASCII diffs")
    p.add_argument("--from-json", metavar="FILE", help="no probing: render --md/--html/text from the JSON Lines of "
                   "earlier `--json` runs (e.g. one run per oracle, each under its own time limit)")
    p.add_argument("--fail-on-leak", action="store_true", help="exit 1 when a leak, a mismatch or an oracle error is found")


def _fail(msg: str) -> int:
    print(f"nsaconf: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return 2


def _branches(values: list[str]) -> Optional[tuple[str, ...]]:
    from nsaconf.cases.vocabulary import BRANCH_ALIASES

    names = [v.strip() for item in values for v in item.split(",") if v.strip()]
    bad = [n for n in names if n not in BRANCH_ALIASES]
    if bad:
        raise ValueError(f"unknown branch {bad[0]!r}; use one of cmp, slc, swa, e2e")
    return tuple(dict.fromkeys(BRANCH_ALIASES[n] for n in names)) or None


def collect(oracle_names: Optional[list[str]], device: str, cfg, branches=None, cmp_mask=None,
            window_keys=None, emit=None) -> tuple[list[dict], list]:
    """Probe records for the oracles (skipped ones carry ``skipped``) and the ProbeResults.

    ``emit(record)``, when given, is called for each record as soon as its oracle is done, so that a
    long run (GPU compiles) killed by a time limit keeps what it had already measured."""
    from nsaconf.oracles.base import registry

    names = oracle_names or sorted(registry())
    records, results = [], []
    where = _where(device)
    for name in names:
        done = len(records)
        _probe_one(name, device, cfg, branches, cmp_mask, window_keys, records, results)
        for rec in records[done:]:
            rec.update(where)
            if emit is not None:
                emit(rec)
    return records, results


def _where(device: str) -> dict:
    """Where a probe ran (kept in each record, so that reports rendered later with --from-json say it)."""
    import platform

    import torch

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": device, "device_name": name, "torch": torch.__version__}


def _probe_one(name, device, cfg, branches, cmp_mask, window_keys, records: list, results: list) -> None:
    """Probe one oracle, appending its records (and ProbeResults)."""
    from nsaconf.harness.probe import PROBE_BRANCHES, ProbeError, _kind, probe_oracle, skipped_record
    from nsaconf.oracles.base import get_oracle

    oracle = get_oracle(name)
    want = [b for b in (branches or PROBE_BRANCHES) if b in oracle.branches]
    if not want:
        records.append(skipped_record(name, ",".join(branches or PROBE_BRANCHES), f"{name} returns none of these branches"))
        return
    try:
        res = probe_oracle(oracle, device, cfg, tuple(want), cmp_mask, window_keys)
    except ProbeError as e:
        if str(e).startswith("bad probe parameters"):
            raise
        records.extend(skipped_record(name, b, str(e), _kind(e)) for b in want)
        return
    except Exception as e:  # noqa: BLE001 - a crashing oracle is reported, the others still run
        records.extend(skipped_record(name, b, f"probe crashed: {type(e).__name__}: {e}", "error") for b in want)
        return
    results.extend(res)
    records.extend(r.to_record() for r in res)


def format_text(rec: dict, width: int = 64, diff: bool = True) -> str:
    """Human summary of one record with the ASCII diff."""
    from nsaconf.reports.conventions import diff_chars, downsample

    head = f"{rec['oracle']:<14} {rec['branch']:<6}"
    if rec.get("skipped"):
        return f"{head} {'ERROR' if rec.get('finding') == 'error' else 'SKIP'}: {rec['skipped']}"
    conv = rec["convention"]
    if conv == "unknown":
        conv += f" (nearest {rec['nearest']}, {rec['differing_cells']} cells differ)"
    exp = rec.get("expected_convention") or (f"claims {rec['claimed_convention']}" if rec.get("claimed_convention") else "-")
    leak = f"{rec['leaks']} cells with s > p, first (p,s)={tuple(rec['first_leak'])}" if rec["leaks"] else "no leak"
    lines = [f"{head} {conv}  [expected: {exp}]  {rec['finding'].upper()}  {leak}",
             f"{'':21}T={rec['seq_len']} l={rec['cmp_block']} d={rec['cmp_stride']} l'={rec['block_size']} w={rec['window']} "
             f"{rec['dtype']} {rec['block_indices']}; threshold {rec['threshold']:.2g} (noise {rec['noise']:.2g}, "
             f"min signal {rec['min_signal'] if rec['min_signal'] is None else format(rec['min_signal'], '.2g')}); {rec['calls']} calls"]
    if rec.get("gated"):
        lines.append(f"{'':21}parts: {rec['gated']}")
    if rec.get("differences"):
        shown = ", ".join(f"{k}({p},{s})" for p, s, k in rec["differences"][:8])
        lines.append(f"{'':21}differs from {rec['diff_against']} in {rec['differing_vs_reference']} cells: "
                     f"{shown}{' ...' if len(rec['differences']) > 8 else ''}")
    if not diff:
        return "\n".join(lines)
    rows, f = downsample(diff_chars(rec["matrix"], rec.get("expected_matrix"), rec.get("dont_care")), width)
    scale = "" if f == 1 else f", 1 char = {f}x{f} cells"
    lines.append(f"{'':21}M vs {rec['diff_against']} (rows p, columns s{scale}):")
    for i, row in enumerate(rows):
        lines.append(f"  {i * f:>4} {row}")
    return "\n".join(lines)


def format_markdown(records: list[dict], device: str, width: int = 64, title: str = "Convention probe") -> str:
    """Markdown report: a summary table and the ASCII diffs."""
    seen = sorted({(r.get("device", device), r.get("device_name", ""), r.get("torch", "")) for r in records
                   if r.get("device_name")})
    if not seen:  # records without provenance: this process's device
        here = _where(device)
        seen = [(here["device"], here["device_name"], here["torch"])]
    where = "; ".join(f"`nsaconf masks --device {d}` on {n}, torch {t}" for d, n, t in seen)
    out = [f"# {title}", "", f"{where}.", "",
           "| oracle | branch | convention | expected / claimed | finding | leaks (first p,s) | differing cells | threshold | calls | dtype |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("skipped"):
            out.append(f"| {r['oracle']} | {r['branch']} | – | – | {r['finding']}: {r['skipped']} | – | – | – | – | – |")
            continue
        exp = r.get("expected_convention") or (f"claims {r['claimed_convention']}" if r.get("claimed_convention") else "–")
        conv = r["convention"] + (f" (nearest {r['nearest']})" if r["convention"] == "unknown" else "")
        leak = f"{r['leaks']} {tuple(r['first_leak'])}" if r["leaks"] else "0"
        out.append(f"| {r['oracle']} | {r['branch']} | {conv} | {exp} | {r['finding']} | {leak} | {r['differing_cells']} | "
                   f"{r['threshold']:.2g} | {r['calls']} | {r['dtype']} |")
    out += ["", "## ASCII diffs", "", "`.` no dependency, expected; `#` dependency, expected; `+` extra; `-` missing; "
            "`~` ignored (through the oracle's own top-k).", ""]
    for r in records:
        if not r.get("skipped"):
            out += ["```", format_text(r, width), "```", ""]
    return "\n".join(out)


def _load_records(path: str, names: Optional[list[str]], branches) -> list[dict]:
    """Probe records from a ``--json`` output file (ValueError naming the file and line when malformed)."""
    recs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"cannot read --from-json {path!r}: {e.strerror or e}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON probe record ({e.msg})") from None
        if not isinstance(r, dict) or "oracle" not in r or "branch" not in r:
            raise ValueError(f"{path}:{i}: not a probe record (needs 'oracle' and 'branch')")
        if (names is None or r["oracle"] in names) and (branches is None or r["branch"] in branches):
            recs.append(r)
    return recs


def cmd_masks(args: argparse.Namespace) -> int:
    from nsaconf.harness.probe import ProbeConfig, ProbeError
    from nsaconf.oracles.base import OracleError, load_builtins, load_entry_points, load_plugin

    try:
        load_builtins()
        for p in args.plugin:
            load_plugin(p)
        load_entry_points()
        branches = _branches(args.branch)
        if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
            raise ValueError(f"unknown device {args.device!r}; use cpu or cuda")
        if args.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda but torch sees no CUDA device")
        from nsaconf.cases.conventions import CMP_MASKS, WINDOW_KEYS

        if args.cmp_mask and args.cmp_mask not in CMP_MASKS:
            raise ValueError(f"unknown --cmp-mask {args.cmp_mask!r}; use one of {', '.join(CMP_MASKS)}")
        if args.window_keys and args.window_keys not in WINDOW_KEYS:
            raise ValueError(f"unknown --window-keys {args.window_keys!r}; use one of {', '.join(WINDOW_KEYS)}")
        if args.width < 8:
            raise ValueError(f"--width must be >= 8, got {args.width}")
        cfg = ProbeConfig(seq_len=args.seq_len, block_size=args.block_size, window=args.window, cmp_block=args.cmp_block,
                          cmp_stride=args.cmp_stride, top_n=args.top_n, seed=args.seed)
        names = [n.strip() for n in args.oracles.split(",") if n.strip()] if args.oracles else None

        def emit(r: dict) -> None:  # streamed: a run cut off by a time limit keeps the oracles already probed
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                print(format_text(r, args.width, diff=not args.summary) + ("" if args.summary else "\n"), flush=True)

        if args.from_json:
            records = _load_records(args.from_json, names, branches)
            for r in records:
                emit(r)
        else:
            records, _ = collect(names, args.device, cfg, branches, args.cmp_mask, args.window_keys, emit=emit)
    except (ValueError, OracleError, ProbeError) as e:
        return _fail(str(e))
    try:
        if args.html:
            from nsaconf.reports.conventions import render_standalone

            Path(args.html).write_text(render_standalone(records), encoding="utf-8")
        if args.md:
            Path(args.md).write_text(format_markdown(records, args.device, args.width), encoding="utf-8")
    except OSError as e:
        return _fail(f"cannot write output: {e}")
    bad = any(r.get("finding") in ("leak", "mismatch", "error") for r in records)
    return 1 if (args.fail_on_leak and bad) else 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m nsaconf.masks`` (same as ``nsaconf masks``)."""
    p = _OneLineParser(prog="nsaconf masks", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except ValueError as e:
        return _fail(str(e))
    return cmd_masks(args)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (as nsaconf's own parser)
        raise ValueError(message)


if __name__ == "__main__":
    sys.exit(main())
