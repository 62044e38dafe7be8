"""The examples a kernel author copies: the GitHub Actions workflow (its shell steps run here) and the
pytest test file (run through the installed entry point), and the pytest plugin as such a repository sees it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from nsaconf.cases.model import Case, dump_cases

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
INSTALL_STEP = "Install nsaconf"  # replaced by this environment's install


def workflow(path: Path) -> tuple[dict[str, str], list[dict]]:
    """The job's ``env`` and its steps of a one-job workflow: ``{"name": ..., "run": ..., "with.path": ...}``."""
    env: dict[str, str] = {}
    steps: list[dict] = []
    block: tuple[str, int] | None = None  # (key, indent) of a literal block being read
    section, parent, step_indent = "", "", 0
    for line in path.read_text().splitlines():
        indent = len(line) - len(line.lstrip())
        if block and (not line.strip() or indent > block[1]):
            steps[-1][block[0]] = steps[-1].get(block[0], "") + line[block[1] + 2:] + "\n"
            continue
        block = None
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if indent == 4:
            section = text.rstrip(":")
            continue
        if section == "env" and indent == 6:
            key, value = text.split(":", 1)
            env[key] = value.split(" #")[0].strip()
            continue
        if section != "steps":
            continue
        if text.startswith("- "):
            steps.append({})
            text, indent = text[2:], indent + 2
            step_indent = indent
        key, _, value = text.partition(":")
        value = value.strip()
        if indent == step_indent:
            parent = key
        else:
            key = f"{parent}.{key}"
        if value == "|":
            block = (key, indent)
        elif value:
            steps[-1][key] = value.strip('"')
    return env, steps


def test_the_workflow_runs_its_shell_steps_here(tmp_path):
    env, steps = workflow(EXAMPLES / "github-workflow.yml")
    assert [s.get("name") or s.get("uses") for s in steps] == [
        "actions/checkout@v4", "actions/setup-python@v5", INSTALL_STEP, "Conformance matrix", "Job summary",
        "Upload the report"]
    assert "pip install nsaconf" in steps[2]["run"]
    upload = steps[-1]
    assert upload["uses"].startswith("actions/upload-artifact@") and upload["if"] == "always()"
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    run_env = {**os.environ, **env, "NSACONF_PROFILE": "smoke", "GITHUB_STEP_SUMMARY": str(summary),
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    failed = False
    for step in steps:
        if "run" not in step or step.get("name") == INSTALL_STEP or (failed and step.get("if") != "always()"):
            continue
        assert "${{" not in step["run"]
        p = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", step["run"]], cwd=tmp_path, env=run_env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{step['name']}: {p.stdout[-2000:]}{p.stderr[-2000:]}"
    out = tmp_path / env["NSACONF_OUT"]
    assert summary.read_text() == "earlier step\n" + (out / "summary.md").read_text()
    for artifact in upload["with.path"].split():
        assert (tmp_path / artifact).is_file(), artifact
    root = ET.parse(out / "junit.xml").getroot()
    cells = (out / "results.jsonl").read_text().count("\n")
    assert int(root.get("tests")) == cells > 0 and root.get("failures") == root.get("errors") == "0"


def _pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """pytest in a folder outside this repository, with the plugin from the installed entry point only."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_ADDOPTS")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(cwd), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_example_test_file_runs_in_a_repository_of_its_own(tmp_path):
    shutil.copy(EXAMPLES / "test_nsa_conformance.py", tmp_path)
    p = _pytest(tmp_path, "-q", "test_nsa_conformance.py", "--nsaconf-oracles", "reference")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert re.search(r"^7 passed", p.stdout, re.M), p.stdout[-1000:]  # its function + the smoke profile's 6 cases


def test_a_failing_item_carries_the_reason_and_the_repro_line(tmp_path):
    case = Case(seq_len=64, heads_q=16, heads_kv=1, head_dim=16, block_size=16, top_n=3, window=16, dtype="float32", seed=5)
    dump_cases([case], tmp_path / "cases.json")
    (tmp_path / "test_mine.py").write_text("def test_conformance(nsaconf_cell):\n    nsaconf_cell.check()\n")
    plugin = str(ROOT / "tests" / "plugins" / "planted_bugs.py")
    p = _pytest(tmp_path, "-q", "test_mine.py", "--nsaconf-case", "cases.json", "--nsaconf-plugin", plugin,
                "--nsaconf-oracles", "reference,bug_window")
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-2000:]
    assert re.search(r"^1 failed, 1 passed", p.stdout, re.M), p.stdout[-1000:]  # the case file only, no profile
    assert f"FAIL bug_window.swa_o on {case.id} — matches the reference with window_keys=w_plus_1 (r " in p.stdout
    assert "\n  Mismatched elements: " in p.stdout
    assert f"repro: nsaconf repro {case.id} --oracles bug_window --plugin {plugin}" in p.stdout


INERT_TEST = '''
import sys

import pytest


@pytest.mark.gpu
def test_their_own_gpu_marker_and_no_torch():
    assert "torch" not in sys.modules
'''


def test_the_plugin_is_inert_for_tests_without_nsaconf_cell(tmp_path):
    (tmp_path / "test_theirs.py").write_text(INERT_TEST)
    p = _pytest(tmp_path, "-q", "-rs", "test_theirs.py")
    assert p.returncode == 0 and re.search(r"^1 passed", p.stdout, re.M), p.stdout[-2000:] + p.stderr[-2000:]
    assert "--nsaconf-case" in _pytest(tmp_path, "--help").stdout  # loaded from the entry point


def test_the_module_example_is_causal_and_its_leaky_twin_is_not(capsys):
    from nsaconf.harness.cli import main

    spec = str(EXAMPLES / "window_block.py")
    assert main(["masks", "--module", f"{spec}:window_block", "--dim", "32", "--seq-len", "16", "--fail-on-leak"]) == 0
    assert "CAUSAL: no output position depends on a later token" in capsys.readouterr().out
    assert main(["masks", "--module", f"{spec}:leaky_block", "--dim", "32", "--seq-len", "16", "--fail-on-leak"]) == 1
    assert "LEAK: 15 cells with s > p, first (p,s)=(0, 1)" in capsys.readouterr().out
