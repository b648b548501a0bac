import sys

# Importing the handler package (through container.serve) makes torch's idle OpenMP workers sleep rather than spin,
# before torch loads: see handler/__init__.py.
from lora_serving.container.serve import main

sys.exit(main())
