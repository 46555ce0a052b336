"""Data benchmark: prepare MB/s and peak RSS on a synthetic corpus; pipeline batches/s (16 x 1024).

    .venv/bin/python benchmarks/bench_data.py [--mb 200] [--batches 500] [--kind bpe,unigram]

Same as `jaxgen bench data`; prints one JSON line per measurement.
"""

import sys

from jaxgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "data", *sys.argv[1:]]))
