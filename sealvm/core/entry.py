"""The core's entry script: `python -I -S -B sealvm/core/entry.py ARGS`.

With -S no site module runs, so no .pth file from site-packages executes in
the core: the import path is exactly the project root (found from this file)
and, after it, the environment's site-packages for `cryptography`.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[0] = ROOT
# Without the site module sys.prefix is the base interpreter's; the packages
# (cryptography) are in the virtual environment the interpreter was run from.
_env = os.path.dirname(os.path.dirname(sys.executable))
if not os.path.exists(os.path.join(_env, "pyvenv.cfg")):
    _env = sys.prefix
sys.path.append(os.path.join(_env, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}",
                             "site-packages"))

from sealvm.core.main import main  # noqa: E402

sys.exit(main())
