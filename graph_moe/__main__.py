import sys

from graph_moe.cli import main

sys.exit(main())
