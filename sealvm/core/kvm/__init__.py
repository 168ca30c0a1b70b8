"""Python bindings for Linux KVM (x86-64), standard library only.  Start at `api`."""
