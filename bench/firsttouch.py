"""First touch of guest memory: memtouch.elf mib=64 (first pass, second pass).

Peers in the same run: `native_memtouch mib=64` (the same pass code on a
fresh anonymous mapping), QEMU microvm -accel kvm with its default RAM
(anonymous memory), with `-object memory-backend-memfd` (memfd RAM like
sealvm), and memfd with `prealloc=on` (QEMU's own pre-faulting).

sealvm variants: default (4 KiB memfd pages), `--prefault`
(MADV_POPULATE_WRITE before the guest starts), `--hugepages thp`
(MADV_HUGEPAGE; needs shmem THP allowed by the host) and `--hugepages
hugetlb` (MFD_HUGETLB; needs reserved huge pages), alone and with
`--prefault`.  Variants the host cannot provide are recorded as unavailable
with the reason.  With `--host-hugepages` (root) the module itself sets
shmem_enabled=advise and reserves huge pages for the run, then restores both.

Cycles are the guest's (or native program's) own TSC counts; the process
start -> first byte time shows what each variant adds to start-up.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import common as C

NAME = "firsttouch"
MIB = 64
SHMEM_THP = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
GUEST_RAM_MIB = 256


# ---------------------------------------------------------------- parsing
def parse_memtouch(out: str) -> dict | None:
    a = C.find_line(out, "memtouch first_touch_cycles=")
    b = C.find_line(out, "memtouch second_pass_cycles=")
    if not a or not b:
        return None
    return {"first_touch_cycles": int(a["first_touch_cycles"]), "pages": int(a["pages"]),
            "second_pass_cycles": int(b["second_pass_cycles"])}


def sysfs_choice(text: str | None) -> str | None:
    """'always [never] advise' -> 'never'."""
    if not text or "[" not in text:
        return None
    return text[text.index("[") + 1:text.index("]")]


def availability(shmem_enabled: str | None, free_hugepages: int, need_pages: int) -> dict:
    """Which huge-page variants the host can run now, with the reason when not."""
    thp = sysfs_choice(shmem_enabled)
    out = {}
    if thp in ("advise", "within_size", "always", "force"):
        out["thp"] = None
    else:
        out["thp"] = f"shmem THP is off (shmem_enabled={thp})"
    if free_hugepages >= need_pages:
        out["hugetlb"] = None
    else:
        out["hugetlb"] = f"{free_hugepages} free huge pages, {need_pages} needed (vm.nr_hugepages)"
    return out


def free_hugepages() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


class HostHugepages:
    """Temporarily allow shmem THP and reserve 2 MiB pages; restores both on exit."""

    def __init__(self, pages: int):
        self.pages = pages
        self.saved_thp = None
        self.saved_nr = None

    def __enter__(self):
        self.saved_thp = sysfs_choice(SHMEM_THP.read_text())
        self.saved_nr = int(NR_HUGEPAGES.read_text())
        SHMEM_THP.write_text("advise")
        NR_HUGEPAGES.write_text(str(self.saved_nr + self.pages))
        return self

    def __exit__(self, *exc):
        if self.saved_nr is not None:
            NR_HUGEPAGES.write_text(str(self.saved_nr))
        if self.saved_thp is not None:
            SHMEM_THP.write_text(self.saved_thp)
        return False


# ---------------------------------------------------------------- running
def variants(args, avail: dict) -> tuple[dict, dict]:
    elf = C.guest(args.guests, "memtouch")
    cl = f"mib={MIB} passes=1 secs=5"
    v = {
        "native": ([str(C.native(args.guests, "native_memtouch")), f"mib={MIB}"], "native"),
        "sealvm": (C.sealvm_cmd(elf, "--no-rng", cmdline=cl), "sealvm"),
        "sealvm --prefault": (C.sealvm_cmd(elf, "--no-rng", "--prefault", cmdline=cl), "sealvm"),
    }
    skipped = {}
    for hp in ("thp", "hugetlb"):
        for pre in (False, True):
            label = f"sealvm --hugepages {hp}" + (" --prefault" if pre else "")
            if avail[hp]:
                skipped[label] = avail[hp]
                continue
            opts = ["--no-rng", "--hugepages", hp] + (["--prefault"] if pre else [])
            v[label] = (C.sealvm_cmd(elf, *opts, cmdline=cl), "sealvm")
    v["qemu-kvm"] = (C.qemu_cmd(elf, "kvm", cl), "qemu")
    v["qemu-kvm memfd"] = (C.qemu_cmd(elf, "kvm", cl, extra=C.QEMU_MEMFD), "qemu")
    v["qemu-kvm memfd prealloc"] = (C.qemu_cmd(
        elf, "kvm", cl, extra=["-object", "memory-backend-memfd,id=mem,size=256M,prealloc=on",
                               "-machine", "memory-backend=mem"]), "qemu")
    return v, skipped


def measure(args, runs: int) -> dict:
    shmem = SHMEM_THP.read_text().strip() if SHMEM_THP.exists() else None
    avail = availability(shmem, free_hugepages(), GUEST_RAM_MIB // 2)
    var, skipped = variants(args, avail)
    samples = {k: {"first_touch_cycles": [], "second_pass_cycles": [], "first_byte_ms": [],
                   "exit_ms": []} for k in var}
    for _ in range(runs):
        for label, (cmd, kind) in list(var.items()):
            r = C.timed_run(cmd, timeout=120)
            if kind == "sealvm" and label != "sealvm" and r.rc in (2, 125) and not r.out:
                # this sealvm refuses the option (or the host cannot provide it): say why
                skipped[label] = "sealvm refused: " + (r.err.strip().splitlines() or ["?"])[-1]
                del var[label], samples[label]
                continue
            C.check(r, 0, qemu=kind == "qemu")
            p = parse_memtouch(r.out)
            if p is None:
                raise RuntimeError(f"{label}: no memtouch lines in {r.out[-500:]!r}")
            s = samples[label]
            s["first_touch_cycles"].append(p["first_touch_cycles"])
            s["second_pass_cycles"].append(p["second_pass_cycles"])
            s["first_byte_ms"].append(r.first_byte_s * 1000 if r.first_byte_s else None)
            s["exit_ms"].append(r.exit_s * 1000)
    return {"samples": samples, "skipped": skipped, "shmem_enabled": shmem,
            "commands": {k: C.shell_join(v[0]) for k, v in variants(args, avail)[0].items()}}


def run(args) -> dict:
    runs = 1 if args.quick else 5
    if getattr(args, "host_hugepages", False):
        with HostHugepages(GUEST_RAM_MIB // 2 + 8):
            m = measure(args, runs)
        m["host_settings"] = ("shmem_enabled=advise and vm.nr_hugepages raised for this run "
                              "(--host-hugepages), restored afterwards")
    else:
        m = measure(args, runs)
        m["host_settings"] = "as found"
    s = m["samples"]
    med = {k: {q: C.median(v) for q, v in d.items()} for k, d in s.items()}
    nat = med["native"]
    qm = med["qemu-kvm memfd"]
    ratios = {k: {"first_touch_vs_native": C.ratio(d["first_touch_cycles"], nat["first_touch_cycles"]),
                  "second_pass_vs_native": C.ratio(d["second_pass_cycles"], nat["second_pass_cycles"]),
                  "first_touch_vs_qemu_kvm_memfd": C.ratio(d["first_touch_cycles"],
                                                           qm["first_touch_cycles"]),
                  "first_touch_vs_qemu_kvm": C.ratio(d["first_touch_cycles"],
                                                     med["qemu-kvm"]["first_touch_cycles"])}
              for k, d in med.items()}
    hz = C.tsc_hz()
    rows = []
    for label in [k for k in med if k.startswith("sealvm")]:
        rows.append(C.summary_row(NAME, f"first touch 64 MiB ({label})",
                                  med[label]["first_touch_cycles"] / hz * 1000,
                                  nat["first_touch_cycles"] / hz * 1000, "native", "-", None, "ms"))
    rows.append(C.summary_row(NAME, "first touch 64 MiB (sealvm vs QEMU-KVM memfd)",
                              med["sealvm"]["first_touch_cycles"] / hz * 1000,
                              qm["first_touch_cycles"] / hz * 1000, "qemu-kvm memfd", "-", None,
                              "ms"))
    rows.append(C.summary_row(NAME, "second pass 64 MiB (sealvm)",
                              med["sealvm"]["second_pass_cycles"] / hz * 1000,
                              nat["second_pass_cycles"] / hz * 1000, "native", "-", None, "ms"))
    result = {
        "description": f"memtouch mib={MIB}: guest TSC cycles for the first touch of every "
                       "64-byte line and for the second pass; first_byte_ms = process start -> "
                       "first console byte (includes any pre-faulting)",
        "runs": runs,
        **m,
        "medians": med,
        "ratios": ratios,
        "summary": rows,
    }
    C.write_result(NAME, result, args.out, args.tag)
    plot(result, C.plot_path(NAME, args.out, args.tag))
    return result


def plot(result: dict, path: Path) -> None:
    hz = result["host"]["tsc_hz"]
    ft = {k: [c / hz * 1000 for c in v["first_touch_cycles"]] for k, v in result["samples"].items()}
    sp = {k: [c / hz * 1000 for c in v["second_pass_cycles"]] for k, v in result["samples"].items()}
    groups = {}
    for k in ft:
        groups[f"{k}\nfirst touch"] = ft[k]
    for k in ("native", "sealvm", "qemu-kvm memfd"):
        groups[f"{k}\nsecond pass"] = sp[k]
    skipped = "; ".join(f"{k}: {v}" for k, v in result["skipped"].items())
    C.bar_plot(path, f"memtouch {MIB} MiB: first touch / second pass (ms of TSC, log scale)",
               groups, "ms", log=True, note=("not run: " + skipped) if skipped else "")


def report(result: dict) -> None:
    hz = result["host"]["tsc_hz"]
    for k, d in result["medians"].items():
        r = result["ratios"][k]
        print(f"  {k:<36} first {C.fmt(d['first_touch_cycles'] / hz * 1000, 'ms'):>9} "
              f"({C.fmt(r['first_touch_vs_native'])}x native)  second "
              f"{C.fmt(d['second_pass_cycles'] / hz * 1000, 'ms'):>8}  first byte "
              f"{C.fmt(d['first_byte_ms'], 'ms')}")
    for k, v in result["skipped"].items():
        print(f"  {k:<36} not run: {v}")
    C.print_rows(result["summary"])


def main(argv=None) -> int:
    args = C.bench_args(__doc__.splitlines()[0], argv, extra=lambda p: p.add_argument(
        "--host-hugepages", action="store_true",
        help="(root) allow shmem THP and reserve huge pages for this run, then restore"))
    report(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
