import os
import sys

# Before torch loads OpenMP: its idle worker threads then sleep instead of spinning. Spinning workers take the
# CPU from the event-loop and engine threads of this very process, and from anything sharing the cores: on 2
# busy cores, 8 concurrent clients got 19 tokens/s with spinning and 700 with sleeping workers (docs/BENCHMARKS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from container.serve import main  # noqa: E402

sys.exit(main())
