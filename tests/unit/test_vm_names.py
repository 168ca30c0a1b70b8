"""VM names are checked as whole strings: `$` would let a trailing newline through."""
import pytest

from sealvm.host.records import new_vm_id
from sealvm.launcher.spawn import LaunchError, check_vm_id


@pytest.mark.parametrize("name", ["vm-1\n", "vm\nx", "-vm", "a" * 64, "VM"])
def test_bad_names_are_refused_by_daemon_and_launcher(name):
    with pytest.raises(ValueError):
        new_vm_id(name)
    with pytest.raises(LaunchError):
        check_vm_id(name)


def test_good_names_pass():
    assert new_vm_id("web-1") == check_vm_id("web-1") == "web-1"
    assert new_vm_id(None).startswith("vm-")
