import sys

from recoup.orchestrator.cli import main

sys.exit(main())
