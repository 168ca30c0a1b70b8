"""The ctypes KVM bindings against the installed C header, one case per item.

A C program generated from the Python bindings includes <linux/kvm.h> and
prints sizeof/offsetof of every bound structure and field and the value of
every constant and ioctl number; each case compares one of them.  That covers
the running core's bindings (structs.py, ioctls.py) and the state bindings a
core does not load yet (state_structs.py, used by state.py).
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from sealvm.core.kvm import ioctls as K
from sealvm.core.kvm import state_structs as SS
from sealvm.core.kvm import structs as S


# ---- what to check (built from the Python side, no compiler needed) -------------
def _fields(cls, c_prefix: str, py_prefix: str, base: int):
    """Yield (c_path, py_path, offset, size) for every field, recursing into
    nested structs/unions; `_anonymous_` members have no name in C."""
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for name, ftype, *_ in cls._fields_:
        off = base + getattr(cls, name).offset
        py_path = f"{py_prefix}.{name}" if py_prefix else name
        if name in anonymous:
            yield from _fields(ftype, c_prefix, py_path, off)
            continue
        c_path = f"{c_prefix}.{name}" if c_prefix else name
        yield c_path, py_path, off, ctypes.sizeof(ftype)
        if issubclass(ftype, (ctypes.Structure, ctypes.Union)):
            yield from _fields(ftype, c_path, py_path, off)


def _checks():
    """(id, C expression, Python value or None if it may be absent from the header)."""
    out = []
    for cls in S.C_STRUCTS + SS.C_STRUCTS:
        n = cls.__name__
        out.append((f"sizeof:{n}", f"sizeof(struct {n})", ctypes.sizeof(cls)))
        for c_path, py_path, off, size in _fields(cls, "", "", 0):
            out.append((f"offsetof:{n}.{py_path}", f"offsetof(struct {n}, {c_path})", off))
            if size:  # a flexible array member has no size in C
                out.append((f"sizeof:{n}.{py_path}", f"sizeof(((struct {n} *)0)->{c_path})", size))
    out.append(("flex:kvm_cpuid2[5]", "sizeof(struct kvm_cpuid2) + 5 * sizeof(struct kvm_cpuid_entry2)",
                ctypes.sizeof(S.kvm_cpuid2_n(5))))
    out.append(("flex:kvm_msrs[3]", "sizeof(struct kvm_msrs) + 3 * sizeof(struct kvm_msr_entry)",
                ctypes.sizeof(SS.kvm_msrs_n(3))))
    out.append(("flex:kvm_msr_list[5]", "sizeof(struct kvm_msr_list) + 5 * sizeof(__u32)",
                ctypes.sizeof(SS.kvm_msr_list_n(5))))
    for module in (K, SS):
        for name in sorted(vars(module)):
            value = getattr(module, name)
            if name.startswith("KVM") and isinstance(value, int) and not isinstance(value, bool):
                out.append((f"const:{name}", name, value))
    for number, name in enumerate(K.EXIT_NAMES):   # the exit-name table, by number
        out.append((f"const:KVM_EXIT_{name}", f"KVM_EXIT_{name}", number))
    return out


# Defined by newer kernels than the installed 6.1 uapi header.
NEWER_THAN_HEADER = frozenset({"KVM_EXIT_LOONGARCH_IOCSR", "KVM_EXIT_MEMORY_FAULT", "KVM_EXIT_TDX"})


CHECKS = _checks()


def _c_program() -> str:
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <linux/kvm.h>", "",
             "int main(void) {"]
    for ident, expr, _ in CHECKS:
        if ident.startswith("const:"):
            lines += [f"#ifdef {expr}",
                      f'    printf("%s %llu\\n", "{ident}", (unsigned long long)({expr}));',
                      "#else", f'    printf("%s UNDEFINED\\n", "{ident}");', "#endif"]
        else:
            lines.append(f'    printf("%s %llu\\n", "{ident}", (unsigned long long)({expr}));')
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


# ---- the C side (compiled once per session) -----------------------------------------
@pytest.fixture(scope="session")
def c_values(tmp_path_factory) -> dict[str, int | None]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (needed to read the C header's layouts)")
    d = tmp_path_factory.mktemp("kvm_header")
    probe = d / "probe.c"
    probe.write_text("#include <linux/kvm.h>\n")
    r = subprocess.run([gcc, "-E", "-o", "/dev/null", str(probe)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"<linux/kvm.h> is not usable (install linux-libc-dev): {r.stderr.strip()[:200]}")
    src, exe = d / "layout.c", d / "layout"
    src.write_text(_c_program())
    r = subprocess.run([gcc, "-O0", "-w", "-o", str(exe), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"the generated layout program does not compile:\n{r.stderr[:4000]}")
    r = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    values: dict[str, int | None] = {}
    for line in r.stdout.splitlines():
        ident, _, value = line.rpartition(" ")
        values[ident] = None if value == "UNDEFINED" else int(value)
    return values


@pytest.mark.parametrize("ident,expr,py_value", CHECKS, ids=[c[0] for c in CHECKS])
def test_matches_header(c_values, ident, expr, py_value):
    c_value = c_values[ident]
    if c_value is None:
        name = ident.split(":", 1)[1]
        if name in NEWER_THAN_HEADER:
            pytest.skip(f"{name} is newer than the installed <linux/kvm.h>")
        pytest.fail(f"{name} is not defined in <linux/kvm.h>")
    assert py_value == c_value, f"{expr}: Python {py_value:#x} != C {c_value:#x}"


# ---- Python-only invariants ----------------------------------------------------------
def _ioctls(module) -> list[str]:
    return [k for k, v in vars(module).items() if k.startswith("KVM_") and isinstance(v, int)
            and (v >> 8) & 0xFF == K.KVMIO]


def test_ioctl_numbers_are_distinct():
    ioctls = _ioctls(K)
    assert sorted(K.IOCTL_NAMES.values()) == sorted(ioctls), "two bound ioctls share a number"
    assert K.IOCTL_NAMES[K.KVM_RUN] == "KVM_RUN"


def test_state_ioctls_are_distinct_and_new():
    ioctls = _ioctls(SS)
    assert sorted(SS.IOCTL_NAMES.values()) == sorted(ioctls), "two state ioctls share a number"
    assert not set(SS.IOCTL_NAMES) & set(K.IOCTL_NAMES), "a state ioctl repeats a core one"
    assert not {k for k in vars(SS) if k.startswith("KVM")} & set(vars(K)), \
        "state_structs redefines a name of ioctls.py"
    assert SS.IOCTL_NAMES[SS.KVM_IRQFD] == "KVM_IRQFD"


def test_state_builders():
    m = SS.kvm_msrs_n(2)(nmsrs=2)
    assert ctypes.sizeof(m) == 8 + 2 * 16 and SS.kvm_msrs_n(2) is type(m)
    assert ctypes.sizeof(SS.kvm_msr_list_n(0)) == ctypes.sizeof(SS.kvm_msr_list)
    with pytest.raises(ValueError):
        SS.kvm_msrs_n(-1)


def test_run_union_is_256_bytes():
    assert ctypes.sizeof(S._run_exit) == 256
    assert S.kvm_run.kvm_valid_regs.offset == 32 + 256


def test_ioc_encoding():
    assert K._IOWR(0xAE, 0x05, ctypes.c_uint64) == 0xC008AE05
    with pytest.raises(ValueError):
        K._IOC(K._IOC_READ, 0xAE, 1, 1 << 14)
