"""The conformance matrix as pytest items (one per case x oracle); see harness/pytest_plugin.py.

Default: the smoke profile against the in-house oracles (reference, dense). In CI:
``pytest tests/test_matrix.py --nsaconf-profile ci --nsaconf-oracles all --junitxml=out/junit.xml``.
"""


def test_conformance(nsaconf_cell):
    nsaconf_cell.check()
