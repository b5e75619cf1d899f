import sys

from xorgemm.cli import main

sys.exit(main())
