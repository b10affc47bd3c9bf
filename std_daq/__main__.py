import sys

from std_daq.cli import main

sys.exit(main())
