"""`python -m tests.chaos.checker [FILE]`: the report table of the last run of each scenario.

The checker itself (expectations, :func:`~service.devkit.history.check_history`, report
rows) lives in :mod:`service.devkit.history`, shared with the soak benchmark.
"""

from __future__ import annotations

import sys

from service.devkit.history import format_table, parse_report_lines
from tests.chaos.harness import report_path


def main(argv: list[str] | None = None) -> int:
    """Print the report table of FILE (default: the stack's chaos-report.jsonl)."""
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else str(report_path())
    with open(path) as handle:
        print(format_table(parse_report_lines(handle)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
