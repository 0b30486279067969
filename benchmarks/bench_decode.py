"""End-to-end decode throughput (same as `polar-compile bench`); see polar_compile/bench.py.

python benchmarks/bench_decode.py --models llama3-8b --batch 64 --context 4096
"""

import argparse

from polar_compile.bench import add_bench_parser

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_parser(parser)
    arguments = parser.parse_args()
    raise SystemExit(arguments.func(arguments))
