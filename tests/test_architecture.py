"""The shape of the product: layers import one way, no import cycle, one vocabulary, torch-free reports,
the installed package is ``nsaconf`` and coexists with a user's own ``cases/`` or ``reports/`` folder."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package it installs as
LAYER_DIRS = {"cases": "nsaconf.cases", "oracles": "nsaconf.oracles", "harness": "nsaconf.harness",
              "reports": "nsaconf.reports", "nsaconf": "nsaconf"}
#: layer rank: a module may import only modules of its own or a lower rank
RANKS = (("nsaconf._version", 0), ("nsaconf.cases", 1), ("nsaconf.oracles", 2), ("nsaconf.harness.cli", 5),
         ("nsaconf.harness", 3), ("nsaconf.reports", 4), ("nsaconf", 6))


def rank(module: str) -> int:
    for prefix, r in RANKS:
        if module == prefix or module.startswith(prefix + "."):
            return r
    raise AssertionError(f"{module} is in no layer")


def product_modules() -> dict[str, Path]:
    """Every module of the product: dotted name -> file."""
    mods = {}
    for folder, pkg in LAYER_DIRS.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = f.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((pkg, *parts[:-1])) if parts[-1] == "__init__" else ".".join((pkg, *parts))
            mods[name] = f
    return mods


def imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """The ``nsaconf`` modules a file imports (``top_level_only``: statements run at import time)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "nsaconf"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "nsaconf":
            found.add(node.module)
    return found


def test_layers_import_downward_only():
    mods = product_modules()
    assert len(mods) > 30
    upward = [f"{m} -> {t}" for m, f in mods.items() for t in imports(f, m, top_level_only=False) if rank(t) > rank(m)]
    assert upward == [], "imports against the layer order cases -> oracles -> harness -> reports -> CLI:\n" + "\n".join(upward)


def test_no_import_cycle():
    """Module-level imports, and imports inside functions too, form no cycle between product modules."""
    mods = product_modules()

    def target(name: str) -> str:  # `from nsaconf.cases import vocabulary` names a module of a package
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph = {m: {target(t) for t in imports(f, m, top_level_only=False)} - {m} for m, f in mods.items()}
    graph = {m: {t for t in ts if not m.startswith(t + ".") and t != "nsaconf"} for m, ts in graph.items()}  # a package's own __init__
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycle.extend(stack[stack.index(t):] + [m, t] if t in stack else [m, t])
                return True
            if state.get(t) is None and visit(t, stack + [m]):
                return True
        state[m] = 2
        return False

    for m in sorted(graph):
        if state.get(m) is None and visit(m, []):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_import_graph_checks_fail_on_an_upward_arrow(tmp_path):
    """The checker itself: an upward import is found."""
    f = tmp_path / "x.py"
    f.write_text("from nsaconf.harness.runner import Runner\n")
    assert {"nsaconf.harness.runner"} == imports(f, "nsaconf.cases.x", top_level_only=True)
    assert rank("nsaconf.harness.runner") > rank("nsaconf.cases.x")


@pytest.mark.parametrize("word", ["STATUSES", "BAD_STATUSES", "FORWARD_BRANCHES", "GRAD_BRANCHES", "LAYERS",
                                  "DTYPE_SHORT", "DTYPE_ALIASES", "PROBE_BRANCHES", "BRANCH_ALIASES", "RESULTS_FILE"])
def test_vocabulary_is_defined_once(word):
    """Each word of the shared vocabulary is assigned a literal only in cases/vocabulary.py."""
    defining = []
    for m, f in product_modules().items():
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == word for t in targets) and not isinstance(node.value, (ast.Name, ast.Attribute)):
                    defining.append(m)
    assert defining == ["nsaconf.cases.vocabulary"]


def _python(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_import_nsaconf_and_reports_need_no_torch(tmp_path):
    """``import nsaconf``, the vocabulary and the report writers load without torch (torch is blocked)."""
    from tests.report_fixtures import write_fixture

    write_fixture(tmp_path)
    code = ("import sys; sys.modules['torch'] = None\n"
            "import nsaconf, nsaconf.cases.vocabulary as V\n"
            "from nsaconf.reports import write_reports\n"
            f"paths = write_reports({str(tmp_path)!r})\n"
            "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
            "print(sorted(paths), V.STATUSES[0])")
    p = _python(code, tmp_path)
    assert p.returncode == 0, p.stderr
    assert "['csv', 'html', 'summary'] PASS" in p.stdout


def test_public_api_names_resolve():
    import nsaconf

    for name in nsaconf.__all__:
        assert getattr(nsaconf, name) is not None, name
    with pytest.raises(AttributeError):
        nsaconf.no_such_name  # noqa: B018


USER_TEST = '''
import reports, cases

def test_users_own_packages_are_theirs():
    assert reports.OWNER == "user" and cases.OWNER == "user"

def test_conformance(nsaconf_cell):
    nsaconf_cell.check()
'''


def test_pytest_plugin_in_a_repo_with_its_own_cases_and_reports_folders(tmp_path):
    """A user's repository with top-level ``cases/``, ``reports/``, ``harness/`` and ``oracles/`` packages:
    nsaconf's layers are ``nsaconf.*``, so neither shadows the other."""
    for pkg in ("cases", "reports", "harness", "oracles"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text('OWNER = "user"\n')
    (tmp_path / "test_user.py").write_text(USER_TEST)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "nsaconf.harness.pytest_plugin", "-p", "no:cacheprovider",
                        "--nsaconf-oracles", "reference", "--rootdir", str(tmp_path), "test_user.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "7 passed" in p.stdout  # 1 own test + the smoke profile's 6 cases on the reference


def test_wheel_installs_nsaconf_only(tmp_path):
    """``pip wheel .``: every module under ``nsaconf/``, the report template and the plugin example inside;
    fla-core only in the ``oracles`` extra (a kernel author's own FLA is kept by a plain install)."""
    import shutil

    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info into the source folder
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "out", "build", "*.egg-info", "__pycache__", ".device"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
                       capture_output=True, text=True, timeout=300)
    if p.returncode != 0 and "No module named" in p.stderr:
        pytest.skip(f"cannot build a wheel here: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 0, p.stderr
    wheel = next(tmp_path.glob("nsaconf-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"nsaconf"}
    for needed in ("nsaconf/cases/vocabulary.py", "nsaconf/harness/cli/__init__.py", "nsaconf/reports/templates/report.html.j2",
                   "nsaconf/oracles/plugin_example.py", "nsaconf/oracles/inhouse_cutile/kernels.py"):
        assert needed in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert any("fla-core==0.6.0" in r and "extra == \"oracles\"" in r for r in requires)
    assert not any("fla-core" in r and "extra" not in r for r in requires)
    assert not any(("hypothesis" in r or "pytest" in r) and "extra" not in r for r in requires)
    assert "License-Expression: Apache-2.0" in meta
