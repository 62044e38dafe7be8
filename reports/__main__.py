"""``python -m nsaconf.reports DIR``: rebuild summary.md, results.csv and report.html from DIR/results.jsonl."""
from __future__ import annotations

import sys

from nsaconf.reports import ReportError, write_reports


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m nsaconf.reports DIR  (DIR holds results.jsonl)", file=sys.stderr)
        return 2
    try:
        paths = write_reports(args[0])
    except ReportError as e:
        print(f"nsaconf: error: {e}", file=sys.stderr)
        return 2
    for p in paths.values():
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
