import sys

from gigamamba.cli import main

sys.exit(main())
