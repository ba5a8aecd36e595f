import sys

from ovseg.cli import main

sys.exit(main())
