"""transformers 5.x tests: run in the 5.x environment with `python -m pytest -q tests/transformers5`.

Each test module skips itself at collection under transformers 4.x (the main suite's environment). The shared
helpers (tests/helpers.py, tests/tiny_models.py) sit one directory up.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
