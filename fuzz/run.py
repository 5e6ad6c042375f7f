"""Coverage-guided fuzzing of connproxy's parsers with atheris (libFuzzer).

    .venv/bin/pip install atheris
    .venv/bin/python fuzz/run.py TARGET [libFuzzer options]     # e.g. -max_total_time=300 -runs=100000
    .venv/bin/python fuzz/run.py --list

TARGET is one of fuzz/targets.py's TARGETS (tunnel, socks5, http_head, config_yaml, config_json, token).
Findings are written by libFuzzer as crash-* files in the current folder; reproduce one with
``fuzz/run.py TARGET crash-...``. CI runs every target for a few thousand inputs (``scripts/fuzz-smoke.sh``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 2
    import atheris

    with atheris.instrument_imports():
        from fuzz.targets import TARGETS
    if argv[1] == "--list":
        print("\n".join(TARGETS))
        return 0
    target = TARGETS.get(argv[1])
    if target is None:
        print(f"unknown target {argv[1]!r}; one of: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
