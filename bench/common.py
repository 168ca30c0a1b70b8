"""Shared pieces of the sealvm benchmarks.

* command lines: `sealvm_cmd` (always `sys.executable -m sealvm.cli run ...`)
  and `qemu_cmd` (QEMU microvm with the flags that work on this host);
* `timed_run`: spawn a command, time process start -> first stdout byte and
  -> exit, and collect the child's own CPU time (wait4 rusage);
* host facts (kernel, CPU, QEMU version, KVM module, TSC frequency), the
  `hostprobe` C helper, statistics, JSON results and matplotlib plots;
* `bench_main`: the command line every benchmark module shares
  (`--quick`, `--guests DIR`, `--out DIR`, `--tag T`).

Parsing helpers here and in the modules are pure functions so that
tests/unit/test_bench_smoke.py can run them on canned output without KVM.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import selectors
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "bench"
RESULTS_DIR = BENCH_DIR / "results"
BUILD_DIR = BENCH_DIR / "build"           # compiled helpers (ignored by git: build/)
DEFAULT_GUESTS = ROOT / "guests" / "build"
# The sealvm source tree the benchmarks run (`python -m sealvm.cli` runs with
# this as its working directory); --sealvm-root points it at another checkout.
SEALVM_ROOT = ROOT
QEMU = os.environ.get("QEMU", "qemu-system-x86_64")
DEFAULT_TSC_HZ = 2_596_000_000            # the guests' own default for tsc_hz=


# --------------------------------------------------------------- parsing
def parse_words(line: str) -> dict[str, str]:
    """'compute cpu=0 iters=5 cycles=9 ok' -> {'cpu': '0', 'iters': '5', 'cycles': '9'}."""
    return dict(w.split("=", 1) for w in line.split() if "=" in w)


def find_line(text: str, prefix: str) -> dict[str, str] | None:
    """key=value words of the first line starting with `prefix`, or None."""
    for line in text.splitlines():
        if line.startswith(prefix):
            return parse_words(line)
    return None


def find_lines(text: str, prefix: str) -> list[dict[str, str]]:
    return [parse_words(l) for l in text.splitlines() if l.startswith(prefix)]


def to_int(s: str) -> int:
    return int(s, 0)


def qemu_guest_status(rc: int) -> int | None:
    """QEMU's isa-debug-exit ends with (status << 1) | 1; anything else has no guest status."""
    if rc is None or rc < 0 or not rc & 1:
        return None
    return rc >> 1


# ------------------------------------------------------------ statistics
def median(xs: Iterable[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(xs: Iterable[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(x, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        s = f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"
    else:
        s = str(x)
    return f"{s} {unit}".strip()


# ---------------------------------------------------------- command lines
def guest(guests_dir: Path, name: str) -> Path:
    p = Path(guests_dir) / f"{name}.elf"
    if not p.exists():
        raise SystemExit(f"{p} is missing: build the guests with `make -C guests`")
    return p


def native(guests_dir: Path, name: str) -> Path:
    p = Path(guests_dir) / name
    if not p.exists():
        raise SystemExit(f"{p} is missing: build the guests with `make -C guests`")
    return p


def sealvm_cmd(elf: Path, *opts: str, cmdline: str = "", python: str | None = None) -> list[str]:
    cmd = [python or sys.executable, "-m", "sealvm.cli", "run", str(elf), *opts]
    if cmdline:
        cmd += ["--cmdline", cmdline]
    return cmd


def qemu_cmd(elf: Path, accel: str = "kvm", cmdline: str = "", memory: str = "256M",
             extra: Iterable[str] = (), rng: bool = False) -> list[str]:
    """QEMU microvm on a sealvm test guest, as guests/run-qemu.sh runs it."""
    cmd = [QEMU, "-M", "microvm,acpi=off"]
    if accel == "kvm":
        cmd += ["-accel", "kvm", "-cpu", "host,-arch-capabilities"]
    else:
        cmd += ["-accel", "tcg"]
    cmd += ["-m", memory, "-nographic", "-no-reboot", "-kernel", str(elf),
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
    if rng:
        cmd += ["-global", "virtio-mmio.force-legacy=false", "-device", "virtio-rng-device"]
    cmd += list(extra)
    cmd += ["-append", cmdline]
    return cmd


QEMU_MEMFD = ["-object", "memory-backend-memfd,id=mem,size=256M", "-machine", "memory-backend=mem"]


def shell_join(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


# ------------------------------------------------------------- running
@dataclass
class RunResult:
    cmd: list[str]
    rc: int | None
    out: str
    err: str
    start: float                 # time.monotonic() just before spawning
    first_byte_s: float | None   # spawn -> first stdout byte
    exit_s: float | None         # spawn -> child reaped
    utime: float = 0.0           # the child's own CPU time (all its threads)
    stime: float = 0.0
    maxrss_kib: int = 0
    timed_out: bool = False
    pid: int = 0
    samples: list = field(default_factory=list)   # filled by a `sampler`, if any

    @property
    def cpu_s(self) -> float:
        return self.utime + self.stime


def timed_run(cmd: list[str], timeout: float = 120.0, env: dict | None = None,
              cwd: str | Path | None = None, sampler: Callable[[int, float], object] | None = None,
              sample_every: float = 0.1) -> RunResult:
    """Runs `cmd` (in `cwd`, default SEALVM_ROOT) and times it.

    The clock starts just before the spawn; `first_byte_s` is when the first
    byte arrives on the child's stdout pipe, `exit_s` when the child has been
    reaped.  CPU time comes from wait4() on the child, so it covers every
    thread of that process.  `sampler(pid, elapsed)`, if given, is called about
    every `sample_every` seconds while the child runs; what it returns is kept
    in `samples`.
    """
    full_env = {**os.environ, **(env or {})}
    with tempfile.TemporaryFile() as errf:
        start = time.monotonic()
        p = subprocess.Popen(cmd, cwd=cwd or SEALVM_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=errf, env=full_env)
        fd = p.stdout.fileno()
        os.set_blocking(fd, False)
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        chunks: list[bytes] = []
        first = None
        timed_out = False
        samples = []
        deadline = start + timeout
        next_sample = start + sample_every
        while True:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                p.kill()
                break
            wait = deadline - now
            if sampler is not None:
                wait = max(0.0, min(wait, next_sample - now))
            events = sel.select(wait)
            if sampler is not None and time.monotonic() >= next_sample:
                s = sampler(p.pid, time.monotonic() - start)
                if s is not None:
                    samples.append(s)
                next_sample += sample_every
            if not events:
                continue
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                break
            if first is None:
                first = time.monotonic()
            chunks.append(data)
        sel.close()
        _, status, ru = os.wait4(p.pid, 0)
        end = time.monotonic()
        p.returncode = os.waitstatus_to_exitcode(status)
        p.stdout.close()
        errf.seek(0)
        err = errf.read().decode(errors="replace")
    return RunResult(cmd=cmd, rc=p.returncode, out=b"".join(chunks).decode(errors="replace"),
                     err=err, start=start,
                     first_byte_s=None if first is None else first - start,
                     exit_s=end - start, utime=ru.ru_utime, stime=ru.ru_stime,
                     maxrss_kib=ru.ru_maxrss, timed_out=timed_out, pid=p.pid, samples=samples)


def check(r: RunResult, ok_status: int = 0, qemu: bool = False) -> None:
    """Raises if the guest did not end with `ok_status` (QEMU: through isa-debug-exit)."""
    status = qemu_guest_status(r.rc) if qemu else r.rc
    if r.timed_out or status != ok_status:
        raise RuntimeError(f"run failed (rc={r.rc}, timed_out={r.timed_out}): {shell_join(r.cmd)}\n"
                           f"stdout: {r.out[-2000:]}\nstderr: {r.err[-2000:]}")


# --------------------------------------------------------------- /proc
CLK_TCK = os.sysconf("SC_CLK_TCK")


def parse_proc_stat(text: str) -> dict:
    """/proc/PID/stat -> ppid and CPU seconds (utime, stime, cutime, cstime)."""
    rest = text[text.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); utime is field 14 -> rest[11]
    return {"ppid": int(rest[1]), "utime": int(rest[11]) / CLK_TCK,
            "stime": int(rest[12]) / CLK_TCK, "cutime": int(rest[13]) / CLK_TCK,
            "cstime": int(rest[14]) / CLK_TCK}


def parse_proc_status(text: str, keys=("VmRSS", "RssAnon", "RssFile", "RssShmem")) -> dict:
    """/proc/PID/status -> {key: KiB} for the given keys."""
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k in keys:
            out[k] = int(v.split()[0])
    return out


def proc_tree(root: int) -> list[int]:
    """`root` and all its descendants that are alive now."""
    parent = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            parent[int(d)] = parse_proc_stat(Path(f"/proc/{d}/stat").read_text())["ppid"]
        except (OSError, ValueError, IndexError):
            continue
    tree, todo = [], [root]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(c for c, pp in parent.items() if pp == p)
    return tree


def tree_cpu_seconds(root: int) -> float | None:
    """CPU seconds used so far by `root`'s process tree (incl. reaped children)."""
    total, seen = 0.0, False
    for pid in proc_tree(root):
        try:
            st = parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
        seen = True
        total += st["utime"] + st["stime"] + st["cutime"] + st["cstime"]
    return total if seen else None


def tree_status(root: int) -> dict[int, dict]:
    """{pid: {VmRSS, RssAnon, RssFile, RssShmem (KiB), comm}} for `root`'s process tree."""
    out = {}
    for pid in proc_tree(root):
        try:
            st = parse_proc_status(Path(f"/proc/{pid}/status").read_text())
            st["comm"] = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if st:
            out[pid] = st
    return out


# ------------------------------------------------------------- host facts
def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cpu_model() -> str | None:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def kvm_module() -> str | None:
    """KVM modules, loadable or built in (/sys/module/kvm*)."""
    try:
        mods = sorted(m for m in os.listdir("/sys/module") if m.startswith("kvm"))
    except OSError:
        mods = []
    return ",".join(mods) or None


def host_facts() -> dict:
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "kvm_module": kvm_module(),
        "qemu_version": _first_line([QEMU, "--version"]),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "loadavg": _read("/proc/loadavg"),
        "thp_enabled": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thp_shmem_enabled": _read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
        "nr_hugepages": _read("/proc/sys/vm/nr_hugepages"),
        "tsc_hz": tsc_hz(),
        "sealvm_root": str(SEALVM_ROOT),
        "sealvm_git": _first_line(["git", "-C", str(SEALVM_ROOT), "describe", "--always",
                                   "--dirty"]) or _read(str(SEALVM_ROOT / ".bench-tree")),
    }


def hostprobe() -> Path:
    """Builds bench/build/hostprobe from bench/csrc/hostprobe.c if it is missing or stale."""
    src = BENCH_DIR / "csrc" / "hostprobe.c"
    exe = BUILD_DIR / "hostprobe"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        cc = os.environ.get("CC", "gcc")
        subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-o", str(exe), str(src)], check=True)
    return exe


def parse_tsc(out: str) -> float | None:
    w = find_line(out, "tsc_hz=")
    return float(w["tsc_hz"]) if w else None


_TSC_HZ: float | None = None


def tsc_hz() -> float:
    """Host TSC frequency (rdtsc against CLOCK_MONOTONIC_RAW over 200 ms), cached."""
    global _TSC_HZ
    if _TSC_HZ is None:
        try:
            out = subprocess.run([str(hostprobe()), "tsc", "200"], capture_output=True,
                                 text=True, check=True).stdout
            _TSC_HZ = parse_tsc(out) or float(DEFAULT_TSC_HZ)
        except (OSError, subprocess.CalledProcessError):
            _TSC_HZ = float(DEFAULT_TSC_HZ)
    return _TSC_HZ


def have_kvm() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def have_qemu() -> bool:
    return shutil.which(QEMU) is not None


# ------------------------------------------------------- results, plots
def summary_row(benchmark: str, metric: str, sealvm, peer, peer_name: str, goal: str,
                met: bool | None, unit: str = "", ratio_value=None) -> dict:
    """One line of bench/results/summary.md: sealvm vs its peer, ratio sealvm/peer."""
    r = ratio_value if ratio_value is not None else ratio(sealvm, peer)
    return {"benchmark": benchmark, "metric": metric, "unit": unit, "sealvm": sealvm,
            "peer": peer, "peer_name": peer_name, "ratio": r, "goal": goal, "met": met}


def write_result(name: str, payload: dict, out_dir: Path = RESULTS_DIR, tag: str = "") -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{tag}" if tag else name
    path = out_dir / f"{stem}.json"
    payload.setdefault("host", host_facts())
    data = {"benchmark": name, "tag": tag or None, **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path


def plot_path(name: str, out_dir: Path = RESULTS_DIR, tag: str = "") -> Path:
    stem = f"{name}-{tag}" if tag else name
    return Path(out_dir) / f"{stem}.png"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (said once) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def bar_plot(path: Path, title: str, groups: dict[str, list[float]], ylabel: str,
             log: bool = False, note: str = "") -> Path | None:
    """Bars at the median of each group, every sample as a dot."""
    plt = pyplot()
    if plt is None:
        return None
    labels = list(groups)
    meds = [median(groups[k]) or 0 for k in labels]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels) + 2), 4.2))
    xs = range(len(labels))
    ax.bar(xs, meds, color="#7aa6c2", edgecolor="#2b4b60", zorder=2)
    for i, k in enumerate(labels):
        pts = [v for v in groups[k] if v is not None]
        ax.scatter([i] * len(pts), pts, s=10, color="#222222", zorder=3)
        if meds[i]:
            ax.annotate(fmt(meds[i]), (i, meds[i]), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    nlines = 0
    if note:
        import textwrap
        wrapped = textwrap.fill(note, width=int(fig.get_figwidth() * 16))
        nlines = wrapped.count("\n") + 1
        fig.text(0.01, 0.01, wrapped, fontsize=7, color="#555555")
    ax.grid(axis="y", alpha=0.3, zorder=0)
    fig.tight_layout(rect=(0, 0.035 * nlines, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------ the CLI
def module_main(doc: str, run: Callable, report: Callable, argv: list[str] | None = None) -> int:
    """`main()` of a benchmark module: parse the shared options, run, print the report."""
    report(run(bench_args(doc.splitlines()[0], argv)))
    return 0


def bench_args(description: str, argv: list[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="few, short runs (smoke test)")
    p.add_argument("--guests", type=Path, default=DEFAULT_GUESTS,
                   help="directory with the built guests (default guests/build)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--tag", default="", help="suffix for the result files (name-TAG.json)")
    p.add_argument("--sealvm-root", type=Path, default=ROOT,
                   help="source tree whose sealvm package is run (default: this checkout)")
    if extra:
        extra(p)
    args = p.parse_args(argv)
    return apply_args(args)


def apply_args(args: argparse.Namespace) -> argparse.Namespace:
    """Resolves the paths in `args` and points SEALVM_ROOT at --sealvm-root."""
    global SEALVM_ROOT
    args.guests = Path(args.guests).resolve()
    args.out = Path(args.out).resolve()
    args.sealvm_root = Path(getattr(args, "sealvm_root", ROOT)).resolve()
    SEALVM_ROOT = args.sealvm_root
    return args


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        print(f"  {r['benchmark']:<11} {r['metric']:<34} sealvm={fmt(r['sealvm'], r['unit']):<14} "
              f"{r['peer_name']}={fmt(r['peer'], r['unit']):<14} ratio={fmt(r['ratio'])} "
              f"goal: {r['goal']} met: {met}")
