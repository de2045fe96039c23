"""``python examples/large_batch_study [options]``: run the large-batch study (see ``study.py``)."""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a folder, Python puts the folder itself first on sys.path: put the repository
    # there instead, so that `examples` is importable and the folder's modules shadow nothing.
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from examples.large_batch_study.study import main

if __name__ == "__main__":
    main()
