"""The benchmarks (same as `graph-moe bench`): `layer`, `compile`, `step`, `memory`, each with --help.

    python examples/benchmark.py layer --shapes qwen3-30b-a3b --tokens 512 4096 16384 --lora --stacked
"""

import sys

from graph_moe.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
