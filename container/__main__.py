import sys

from container.serve import main

sys.exit(main())
