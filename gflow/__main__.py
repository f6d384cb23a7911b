import sys

from gflow.cli import main

sys.exit(main())
