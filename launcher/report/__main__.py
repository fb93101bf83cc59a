import sys

from launcher.report import main

sys.exit(main())
