import sys

from sheep.cli.sheep_main import main

sys.exit(main())
