"""Accuracy through the compiled decode path (same as `polar-compile eval`); see polar_compile/evaluate.py.

python benchmarks/eval_accuracy.py --texts 96 --questions 150
"""

import argparse

from polar_compile.evaluate import add_eval_parser

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_parser(parser)
    arguments = parser.parse_args()
    raise SystemExit(arguments.func(arguments))
