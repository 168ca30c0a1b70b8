"""Start the nested outer-VM jobs as soon as the session has collected their modules, so
they run beside the rest of the suite (tests/linux/nested.py: one outer VM at a time, or one
per core when the session is only nested tests)."""
from __future__ import annotations

import os

import nested as N


def pytest_collection_modifyitems(session, config, items):
    if config.option.collectonly or N.can_run():
        return
    modules = []
    for item in items:
        mod = getattr(item, "module", None)
        if hasattr(mod, "nested_job") and mod not in modules:
            modules.append(mod)
    if all(getattr(item, "module", None) in modules for item in items):
        N.set_parallel(os.cpu_count() or 1)        # nothing else runs: one outer VM per core
    # their tests last: the rest of the suite runs while the outer VMs work
    items[:] = ([i for i in items if getattr(i, "module", None) not in modules]
                + [i for i in items if getattr(i, "module", None) in modules])
    for mod in sorted(modules, key=lambda m: -m.NESTED_TIMEOUT):     # the longest first
        N.start(mod.__name__, mod.nested_job, mod.NESTED_TIMEOUT)


def pytest_sessionfinish(session, exitstatus):
    N.stop()
