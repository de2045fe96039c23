"""``python examples/large_batch_study [options]``: run the large-batch study (see ``study.py``)."""

import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a folder, Python puts the folder itself first on sys.path: put the repository
    # there instead, so that `examples` is importable and the folder's modules shadow nothing.
    sys.path[0] = str(Path(__file__).resolve().parents[2])


def isa_from_argv(argv: list[str]) -> str | None:
    """The value of ``--isa`` in ``argv`` (``--isa X`` or ``--isa=X``), if any."""
    for i, arg in enumerate(argv):
        if arg == "--isa" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--isa="):
            return arg.split("=", 1)[1]
    return None


if __name__ == "__main__":
    # oneDNN, MKL and torch's kernels read their instruction-set limits once, when torch loads
    # them: set the configuration's variables before anything imports torch.
    isa = isa_from_argv(sys.argv[1:])
    if isa == "avx2":
        os.environ.update(
            ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2", ATEN_CPU_CAPABILITY="avx2"
        )

    from examples.large_batch_study.study import main

    main()
