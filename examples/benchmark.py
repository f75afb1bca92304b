"""Per-layer GPU benchmark (same as `graph-moe bench`): graph_moe against the HF loop and grouped references.

    python examples/benchmark.py --shapes qwen3-30b-a3b --tokens 512 4096 16384 --lora --stacked
"""

import sys

from graph_moe.bench import main

if __name__ == "__main__":
    sys.exit(main())
