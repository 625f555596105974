"""Run the benchmarks: ``python -m bench [NAME ...]`` (default: every bench/bench_*.py).

Each benchmark runs in its own interpreter so one cannot disturb the next one's process
state; it prints its own figures and baseline ratios.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    available = sorted(p.stem for p in here.glob("bench_*.py"))
    chosen = [n if n.startswith("bench_") else f"bench_{n}" for n in argv] or available
    unknown = [n for n in chosen if n not in available]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; have: {', '.join(available)}")
        return 2
    failed = 0
    for name in chosen:
        print(f"=== {name} ===", flush=True)
        failed |= subprocess.call([sys.executable, "-m", f"bench.{name}"]) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
