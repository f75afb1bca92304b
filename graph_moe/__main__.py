import sys

from graph_moe.tools.cli import main

sys.exit(main())
