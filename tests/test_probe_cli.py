"""``nsaconf masks``: text, JSON, HTML/markdown outputs and one-line usage errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from nsaconf.harness.cli import main as nsaconf_main


def main(argv):
    """``nsaconf masks ARGV``."""
    return nsaconf_main(["masks", *argv])

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = Path(__file__).parent / "plugins" / "probe_planted.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
SMALL = ["--seq-len", "40", "--block-size", "8", "--window", "8"]


def test_masks_json_and_files(tmp_path, capsys):
    html, md = tmp_path / "m.html", tmp_path / "m.md"
    rc = main(["--oracles", "reference,probe_bug_window_long", "--plugin", str(PLUGIN), "--json", "--html", str(html),
               "--md", str(md), *SMALL])
    assert rc == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by = {(r["oracle"], r["branch"]): r for r in recs}
    for r in recs:
        assert {"oracle", "branch", "convention", "leaks", "differing_cells"} <= set(r)
    assert by[("reference", "cmp_o")]["convention"] == "end_inclusive"
    assert by[("probe_bug_window_long", "swa_o")]["convention"] == "w_plus_1"
    assert by[("probe_bug_window_long", "swa_o")]["finding"] == "mismatch"
    assert "<svg" in html.read_text() and "| probe_bug_window_long | swa_o | w_plus_1 |" in md.read_text()


def test_masks_text_diff_and_fail_on_leak(capsys):
    rc = main(["--oracles", "probe_bug_block_causal", "--plugin", str(PLUGIN), "--branch", "cmp", "--fail-on-leak", *SMALL])
    out = capsys.readouterr().out
    assert rc == 1
    assert "current_block" in out and "LEAK" in out and "140 cells with s > p, first (p,s)=(0, 1)" in out
    rows = [line.split()[-1] for line in out.splitlines() if line.startswith("  ") and line.split()[0].isdigit()]
    assert len(rows) == 40 and rows[0] == "++++++++" + "." * 32  # p=0 sees its whole (unfinished) block


def test_masks_downsampled(capsys):
    assert main(["--oracles", "reference", "--branch", "swa", "--seq-len", "96", "--block-size", "16", "--window", "16",
                 "--width", "32"]) == 0
    out = capsys.readouterr().out
    assert "1 char = 3x3 cells" in out
    rows = [line.split()[-1] for line in out.splitlines() if line.startswith("  ") and line.split()[0].isdigit()]
    assert len(rows) == 32 and all(len(r) == 32 for r in rows)


def test_masks_usage_errors(capsys):
    assert main(["--oracles", "nope"]) == 2
    assert main(["--branch", "xyz"]) == 2
    assert main(["--oracles", "reference", "--seq-len", "40", "--block-size", "0"]) == 2
    assert main(["--oracles", "reference", "--cmp-mask", "causal"]) == 2
    assert main(["--oracles", "reference", "--timeout", "0"]) == 2
    errs = [e for e in capsys.readouterr().err.splitlines() if e]
    assert len(errs) == 5 and all(e.startswith("nsaconf: error: ") for e in errs)


def test_nsaconf_masks_subcommand():
    """Wired into ``nsaconf`` (python -m nsaconf masks)."""
    p = subprocess.run([sys.executable, "-m", "nsaconf", "masks", "--oracles", "reference", "--branch", "cmp", "--json", *SMALL],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    (rec,) = [json.loads(line) for line in p.stdout.splitlines()]
    assert rec["convention"] == "end_inclusive" and rec["leaks"] == 0
    p = subprocess.run([sys.executable, "-m", "nsaconf", "masks", "--branch", "bogus"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1


def test_masks_bad_option_one_line(capsys):
    assert main(["--seq-len", "abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nsaconf: error: ")


def test_masks_from_json_renders_without_probing(tmp_path, capsys):
    """Records of separate `--json` runs (one per oracle) render into one markdown/text report; a
    malformed file is a one-line error naming the file and line."""
    assert main(["--oracles", "reference", "--branch", "swa", "--json", *SMALL]) == 0
    first = capsys.readouterr().out
    assert main(["--oracles", "probe_bug_window_long", "--plugin", str(PLUGIN), "--branch", "swa", "--json", *SMALL]) == 0
    recs_file = tmp_path / "r.jsonl"
    recs_file.write_text(first + capsys.readouterr().out)
    md = tmp_path / "m.md"
    assert main(["--from-json", str(recs_file), "--md", str(md), "--summary"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "w_plus_1" in out
    text = md.read_text()
    assert "| reference | swa_o | w | w | ok |" in text and "| probe_bug_window_long | swa_o | w_plus_1 |" in text
    assert "--device cpu` on" in text  # where the records were measured, from the records
    bad = tmp_path / "bad.jsonl"
    bad.write_text(first.splitlines()[0] + "\n{not json\n")
    assert main(["--from-json", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:2" in err[0]


def test_masks_text_prints_its_legend(capsys):
    assert main(["--oracles", "reference", "--branch", "swa", *SMALL]) == 0
    out = capsys.readouterr().out
    assert ". no dependency, expected; # dependency, expected; + extra dependency; - missing dependency; " \
           "~ ignored (through the oracle's own top-k)" in out


MODULE_FILE = '''
import torch
from torch import nn


class Block(nn.Module):
    """Attention over the last `window` tokens with its projections; `lookahead` reads later tokens."""

    def __init__(self, dim=16, heads=2, window=4, lookahead=0):
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.window, self.lookahead = heads, window, lookahead

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        p, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
        mask = (s <= p + self.lookahead) & (s > p - self.window)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(B, T, D))


def window_block():
    return Block()


def leaky_block():
    return Block(lookahead=1)


def broken():
    raise RuntimeError("no weights here")
'''


def test_masks_module_probes_a_module_in_process(tmp_path, capsys, monkeypatch):
    (tmp_path / "nsaconf_test_blocks.py").write_text(MODULE_FILE)
    monkeypatch.chdir(tmp_path)  # PKG.MOD imports from the current folder
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["--module", "nsaconf_test_blocks:window_block", "--dim", "16", "--seq-len", "12"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("module nsaconf_test_blocks:window_block  [B, 12, 16] float32 on cpu  CAUSAL: no output position "
                      "depends on a later token")
    assert ". no dependency, expected; # dependency, expected; + extra dependency; - missing dependency" in out[3]
    rows = [line.split()[-1] for line in out if line.startswith("  ") and line.split()[0].isdigit()]
    assert rows == ["#" * min(p + 1, 4) + "." * (11 - p) if p < 4 else "-" * (p - 3) + "####" + "." * (11 - p)
                    for p in range(12)]
    assert main(["--module", "nsaconf_test_blocks.py:leaky_block", "--dim", "16", "--seq-len", "12", "--json",
                 "--fail-on-leak"]) == 1
    rec = json.loads(capsys.readouterr().out)
    assert rec["causal"] is False and rec["leaks"] == 11 and rec["first_leak"] == [0, 1]
    assert rec["matrix"][0] == "110000000000"


def test_masks_module_usage_errors_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "blocks.py").write_text(MODULE_FILE)
    monkeypatch.chdir(tmp_path)
    cases = {
        ("--module", "blocks.py:window_block"): "--module needs --dim",
        ("--dim", "16"): "--dim goes with --module",
        ("--module", "blocks.py:window_block", "--dim", "16", "--oracles", "reference"): "--module does not take --oracles",
        ("--module", "blocks.py", "--dim", "16"): "--module must be PKG.MOD:FACTORY",
        ("--module", "no_such_pkg_x:f", "--dim", "16"): "cannot import 'no_such_pkg_x': ModuleNotFoundError",
        ("--module", "blocks.py:nothing", "--dim", "16"): "has no callable 'nothing'",
        ("--module", "blocks.py:broken", "--dim", "16"): "the factory raised RuntimeError: no weights here",
        ("--module", "blocks.py:window_block", "--dim", "5"): "failed on input [B, 128, 5]: RuntimeError",
    }
    for argv, words in cases.items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("nsaconf: error: ") and words in err[0], (argv, err)
