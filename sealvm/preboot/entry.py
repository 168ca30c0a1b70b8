"""The preboot stage's entry script: `python -I -B sealvm/preboot/entry.py --core-fd=N`.

The launcher starts it beside each core.  It carries what the runtime core
must not: HTTP to the owner's key broker (and, with a TPM, the TPM stack).
"""
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sealvm.preboot.main import main  # noqa: E402

sys.exit(main())
