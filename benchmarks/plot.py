"""Draw a pytest-benchmark JSON of this suite (``python -m convnext_fast plot``, which this calls):
speedup vs batch size per provider and the ops on a roofline under the measured ceilings.

    pytest benchmarks/ --benchmark --benchmark-json=bench.json
    python -m convnext_fast bench --ceilings --json ceilings.json
    python benchmarks/plot.py bench.json --ceilings ceilings.json -o benchmarks/results/plot.png
"""
import sys

from convnext_fast.__main__ import main

if __name__ == "__main__":
    raise SystemExit(main(["plot", *sys.argv[1:]]))
