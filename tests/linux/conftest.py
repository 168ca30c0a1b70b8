"""Start the nested outer-VM jobs as soon as the session has collected their modules, so
they run beside the rest of the suite (tests/linux/nested.py: one outer VM at a time)."""
from __future__ import annotations

import nested as N


def pytest_collection_modifyitems(session, config, items):
    if config.option.collectonly or N.can_run():
        return
    modules = []
    for item in items:
        mod = getattr(item, "module", None)
        if hasattr(mod, "nested_job") and mod not in modules:
            modules.append(mod)
    for mod in modules:
        N.start(mod.__name__, mod.nested_job, mod.NESTED_TIMEOUT)


def pytest_sessionfinish(session, exitstatus):
    N.stop()
