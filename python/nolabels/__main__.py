import sys

from nolabels.cli import main

sys.exit(main())
