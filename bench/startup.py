"""Start-up: process start -> first guest serial byte, and -> process exit.

Same guest (hello.elf), same run, interleaved rounds:
  * sealvm: `python -m sealvm.cli run hello.elf` on the tree as it is; if the
    tree has no .pyc files (with PYTHONDONTWRITEBYTECODE set every process
    then compiles the sources it imports), once more with hash-checked .pyc
    files written (what an installed package has), removed afterwards;
  * QEMU microvm with -accel kvm, and with -accel tcg, in both phases.
The clock starts just before the spawn; "first byte" is the first byte on the
child's stdout pipe (the guest's first UART write), "exit" is when the child
is reaped.

It also breaks sealvm's time down (bench/startup_probe.py stamps the real CLI
path) and measures bare interpreter start (`python -c pass`, with and without
`site`) and the import tree (`-X importtime`), so we know what to cut.
"""
from __future__ import annotations

import compileall
import json
import os
import py_compile
import shutil
import sys
import tempfile
from pathlib import Path

from . import common as C

NAME = "startup"
STAMP_NAMES = {  # probe stamps -> what happened at that moment ("0" = step starts, "1" = ends)
    "spawn": "spawn", "interpreter_ready": "interpreter ready", "cli_imported": "cli imported",
    "args_parsed": "args parsed", "oneshot_imported": "run path imported",
    "machine_imported": "machine imported", "preflight0": "preflight", "preflight1": "preflight done",
    "spawn0": "spawning core", "spawn1": "core spawned", "hello0": "hello sent",
    "hello1": "core answered hello", "load_image0": "image sent", "load_image1": "image loaded",
    "configure0": "configure sent", "configure1": "VM configured", "start0": "start sent",
    "start1": "started", "build0": "VM build", "kvm_open0": "open /dev/kvm",
    "kvm_open1": "/dev/kvm open", "ram0": "guest RAM", "ram1": "RAM ready",
    "devices0": "devices", "devices1": "devices ready", "load0": "image load",
    "load1": "image loaded", "build1": "VM built", "first_console_write": "first console write",
    "first_byte": "first byte on the pipe", "vm_stop": "VM stopped",
    "main_returned": "main returned", "reaped": "process reaped",
}


def parse_probe(err: str) -> dict | None:
    for line in err.splitlines():
        if line.startswith("STARTUP-PROBE "):
            return json.loads(line[len("STARTUP-PROBE "):])
    return None


def phases_ms(stamps: dict) -> dict[str, float]:
    """Probe stamps (absolute monotonic seconds, incl. spawn/first_byte/reaped) -> a timeline:
    {"A -> B": ms} between consecutive stamps in time order (whatever order the run took)."""
    known = sorted((t, k) for k, t in stamps.items() if k in STAMP_NAMES)
    return {f"{STAMP_NAMES[a]} -> {STAMP_NAMES[b]}": (tb - ta) * 1000.0
            for (ta, a), (tb, b) in zip(known, known[1:])}


def parse_importtime(err: str, top: int = 15) -> dict:
    """`-X importtime` stderr -> top modules by self time and the sealvm total (microseconds)."""
    rows = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) != 3:
            continue
        try:
            self_us, cum_us = int(parts[0]), int(parts[1])
        except ValueError:
            continue
        name = parts[2].rstrip()
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append({"module": name.strip(), "self_us": self_us, "cumulative_us": cum_us,
                     "depth": depth})
    top_level = [r for r in rows if r["depth"] == 0]
    sealvm_self = sum(r["self_us"] for r in rows if r["module"].startswith("sealvm"))
    stdlib_under_sealvm = 0
    # Everything imported below a top-level sealvm module counts towards "sealvm's imports".
    sealvm_cum = sum(r["cumulative_us"] for r in top_level if r["module"].startswith("sealvm"))
    site = next((r["cumulative_us"] for r in top_level if r["module"] == "site"), None)
    stdlib_under_sealvm = sealvm_cum - sealvm_self
    return {
        "top_self": sorted(rows, key=lambda r: -r["self_us"])[:top],
        "sealvm_cumulative_us": sealvm_cum,
        "sealvm_modules_self_us": sealvm_self,
        "stdlib_pulled_in_by_sealvm_us": stdlib_under_sealvm,
        "site_cumulative_us": site,
        "modules": len(rows),
    }


STRACE_MILESTONES = [  # (name, what marks it in `strace -f -ttt` output)
    ("front_exec", "first execve"),
    ("core_exec", "execve of the core (sealvm.core.main or sealvm/core/entry.py)"),
    ("kvm_create_vm", "first ioctl KVM_CREATE_VM"),
    ("seccomp", "last seccomp(SECCOMP_SET_MODE_FILTER) before the first KVM_RUN"),
    ("first_kvm_run", "first ioctl KVM_RUN"),
    ("first_stdout_write", "first write(1, ...)"),
]
STRACE_PHASES = [
    ("front process until it starts the core", "front_exec", "core_exec"),
    ("core: interpreter, imports, hardening -> KVM_CREATE_VM", "core_exec", "kvm_create_vm"),
    ("spawn -> KVM_CREATE_VM (total so far)", "front_exec", "kvm_create_vm"),
    ("VM build (RAM, image, vCPUs) + seccomp filter", "kvm_create_vm", "seccomp"),
    ("KVM_CREATE_VM -> first KVM_RUN", "kvm_create_vm", "first_kvm_run"),
    ("first KVM_RUN -> first byte written to stdout", "first_kvm_run", "first_stdout_write"),
]


def parse_strace(text: str) -> dict[str, float]:
    """`strace -f -ttt` lines ('PID SECONDS syscall(...') -> milestone timestamps."""
    m: dict[str, float] = {}
    filters = []
    for line in text.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 3:
            continue
        try:
            t = float(parts[1])
        except ValueError:
            continue
        call = parts[2]
        if call.startswith("execve("):
            m.setdefault("front_exec", t)
            if "sealvm.core.main" in call or "sealvm/core/entry.py" in call:
                m.setdefault("core_exec", t)
        elif call.startswith("ioctl(") and "KVM_CREATE_VM" in call:
            m.setdefault("kvm_create_vm", t)
        elif call.startswith("ioctl(") and "KVM_RUN" in call:
            m.setdefault("first_kvm_run", t)
        elif call.startswith("seccomp(SECCOMP_SET_MODE_FILTER") and "first_kvm_run" not in m:
            filters.append(t)
        elif call.startswith("write(1,"):
            m.setdefault("first_stdout_write", t)
    if filters and "kvm_create_vm" in m:
        after = [t for t in filters if t >= m["kvm_create_vm"]]
        if after:
            m["seccomp"] = after[-1]
    return m


def strace_phases(m: dict[str, float]) -> dict[str, float | None]:
    return {label: (m[b] - m[a]) * 1000 if a in m and b in m else None
            for label, a, b in STRACE_PHASES}


def strace_breakdown(hello: Path, n: int) -> dict | None:
    """Milestones from `strace -f --seccomp-bpf` (only the traced calls stop the tracee)."""
    strace = shutil.which("strace")
    if not strace:
        return None
    per: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as d:
        for i in range(n):
            log = Path(d) / f"trace{i}"
            cmd = [strace, "-f", "--seccomp-bpf", "-qq", "-ttt", "-o", str(log),
                   "-e", "trace=execve,ioctl,seccomp,write"] + C.sealvm_cmd(hello)
            r = C.timed_run(cmd, timeout=60)
            if r.rc != 0:
                return {"error": f"strace run failed rc={r.rc}: {r.err[-300:]}"}
            for k, v in strace_phases(parse_strace(log.read_text())).items():
                per.setdefault(k, []).append(v)
    return {k: C.summarize(v) for k, v in per.items()}


# ---------------------------------------------------------------- running
RUN_PATH_MODULES = ("sealvm.host.oneshot", "sealvm.core.runner")   # what `sealvm run` imports


def run_path_module() -> str:
    """The module `sealvm run` imports after parsing, in the tree being measured."""
    for mod in RUN_PATH_MODULES:
        if (C.SEALVM_ROOT / (mod.replace(".", "/") + ".py")).exists():
            return mod
    return "sealvm.core.machine"


def precompile(tree: Path) -> list[Path]:
    """Writes .pyc files for tree/sealvm in place; returns the __pycache__ dirs it created.

    Hash-checked .pyc files (PEP 552): Python re-validates them against the
    source on every import, so a file edited meanwhile is never run stale.
    They serve every process that imports this tree, including a core
    process started with -I -B (which reads .pyc files but writes none).
    """
    pkg = tree / "sealvm"
    before = {p for p in pkg.rglob("__pycache__")}
    ok = compileall.compile_dir(str(pkg), quiet=1, force=True,
                                invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    created = sorted(p for p in pkg.rglob("__pycache__") if p not in before)
    if not ok:
        remove(created)
        raise RuntimeError(f"compileall failed on {pkg}")
    return created


def remove(dirs: list[Path]) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def sample_rounds(variants: dict, n: int, samples: dict) -> None:
    for _ in range(n):                                    # interleaved rounds
        for name, (cmd, is_qemu) in variants.items():
            r = C.timed_run(cmd, timeout=60)
            C.check(r, 0, qemu=is_qemu)
            if not r.out.startswith("HELLO"):
                raise RuntimeError(f"{name}: unexpected first output {r.out[:80]!r}")
            s = samples.setdefault(name, {"first_byte_ms": [], "exit_ms": []})
            s["first_byte_ms"].append(r.first_byte_s * 1000)
            s["exit_ms"].append(r.exit_s * 1000)


def probe_breakdown(hello: Path, n: int) -> dict:
    probe = str(C.BENCH_DIR / "startup_probe.py")
    per_phase: dict[str, list] = {}
    for _ in range(n):
        r = C.timed_run([sys.executable, probe, "run", str(hello)], timeout=60,
                        env={"SEALVM_BENCH_PATH": str(C.SEALVM_ROOT)})
        C.check(r, 0)
        st = parse_probe(r.err)
        if st is None:
            raise RuntimeError(f"no probe output: {r.err[-500:]}")
        st.update(spawn=r.start, first_byte=r.start + r.first_byte_s, reaped=r.start + r.exit_s)
        for k, v in phases_ms(st).items():
            per_phase.setdefault(k, []).append(v)
    out = {k: C.summarize(v) for k, v in per_phase.items()}
    for k in out:
        out[k]["runs_with_this_step"] = out[k]["n"]
    return out


def interpreter_runs(cmds: dict, n: int, out: dict) -> None:
    for _ in range(n):
        for k, cmd in cmds.items():
            r = C.timed_run(cmd, timeout=60)
            C.check(r, 0)
            out.setdefault(k, []).append(r.exit_s * 1000)


def run(args) -> dict:
    quick = args.quick
    n = 3 if quick else 20
    n_probe = 2 if quick else 10
    hello = C.guest(args.guests, "hello")
    py = sys.executable
    had_pyc = any((C.SEALVM_ROOT / "sealvm").rglob("*.pyc"))
    qemu = {"qemu-kvm": (C.qemu_cmd(hello, "kvm"), True),
            "qemu-tcg": (C.qemu_cmd(hello, "tcg"), True)}
    imp = f"import sealvm.cli, {run_path_module()}"
    interp_cmds = {
        "python -c pass": [py, "-c", "pass"],
        "python -S -c pass (no site)": [py, "-S", "-c", "pass"],
        "python -I -c pass (isolated)": [py, "-I", "-c", "pass"],
    }
    samples: dict = {}
    interp: dict = {}
    breakdown = {}
    # Phase 1: the tree as it is.  Phase 2: the same tree with its .pyc files
    # written (what an installed package has).  QEMU runs in both phases.
    sample_rounds({"sealvm": (C.sealvm_cmd(hello), False), **qemu}, n, samples)
    breakdown["sealvm"] = probe_breakdown(hello, n_probe)
    traced = {"sealvm": strace_breakdown(hello, max(1, n_probe // 2))}
    interpreter_runs({**interp_cmds, f"python -c '{imp}'": [py, "-c", imp]}, n_probe, interp)
    importtime_cmd = [py, "-X", "importtime", "-m", "sealvm.cli", "run", str(hello)]
    if had_pyc:              # the tree ships its .pyc files already: phase 2 would repeat phase 1
        r = C.timed_run(importtime_cmd, timeout=60)
        C.check(r, 0)
        importtime = parse_importtime(r.err)
    else:
        created = precompile(C.SEALVM_ROOT)
        try:
            sample_rounds({"sealvm (.pyc present)": (C.sealvm_cmd(hello), False), **qemu}, n,
                          samples)
            breakdown["sealvm (.pyc present)"] = probe_breakdown(hello, n_probe)
            traced["sealvm (.pyc present)"] = strace_breakdown(hello, max(1, n_probe // 2))
            interpreter_runs({f"python -c '{imp}' (.pyc present)": [py, "-c", imp]}, n_probe,
                             interp)
            r = C.timed_run(importtime_cmd, timeout=60)
            C.check(r, 0)
            importtime = parse_importtime(r.err)
        finally:
            remove(created)

    med = {k: {m: C.median(v) for m, v in s.items()} for k, s in samples.items()}
    rows = []
    for label in [k for k in ("sealvm", "sealvm (.pyc present)") if k in med]:
        for m, metric in (("first_byte_ms", "start -> first byte"), ("exit_ms", "start -> exit")):
            s, q = med[label][m], med["qemu-kvm"][m]
            goal = "< QEMU-KVM (same run)" if m == "first_byte_ms" else "-"
            rows.append(C.summary_row(NAME, f"{metric} ({label})", s, q, "qemu-kvm", goal,
                                      (s < q) if m == "first_byte_ms" else None, "ms"))
    commands = {"sealvm": C.shell_join(C.sealvm_cmd(hello)) + f"   [cwd {C.SEALVM_ROOT}]",
                **{k: C.shell_join(v[0]) for k, v in qemu.items()},
                "probe": f"{py} bench/startup_probe.py run {hello}",
                "importtime": f"{py} -X importtime -m sealvm.cli run {hello}   [.pyc present]",
                "pyc": "the tree had .pyc files already: one phase only" if had_pyc else
                       "compileall, hash-checked .pyc files written into the tree for phase 2 "
                       "and removed afterwards"}
    result = {
        "description": "process spawn -> first guest serial byte on stdout, and -> exit; "
                       "hello.elf; interleaved rounds; phase 1 the tree as it is, phase 2 (only if "
                       "the tree has no .pyc files) with .pyc files written; QEMU runs in each "
                       "phase",
        "runs_per_variant": n,
        "commands": commands,
        "bytecode": {"PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
                     "tree_had_pyc_files": had_pyc},
        "samples_ms": samples,
        "medians_ms": med,
        "ratios_vs_qemu_kvm": {k: {m: C.ratio(med[k][m], med["qemu-kvm"][m]) for m in med[k]}
                               for k in med},
        "sealvm_breakdown_ms": breakdown,
        "interpreter_ms": {k: C.summarize(v) for k, v in interp.items()},
        "strace_milestones": dict(STRACE_MILESTONES),
        "strace_breakdown_ms": traced,
        "importtime_pyc": importtime,
        "summary": rows,
    }
    C.write_result(NAME, result, args.out, args.tag)
    plot(result, C.plot_path(NAME, args.out, args.tag))
    return result


def plot(result: dict, path: Path) -> None:
    groups = {}
    for k, s in result["samples_ms"].items():
        groups[f"{k}\nfirst byte"] = s["first_byte_ms"]
        groups[f"{k}\nexit"] = s["exit_ms"]
    C.bar_plot(path, "hello.elf: process start -> first serial byte / exit (ms, lower is better)",
               groups, "ms", note=result["host"]["qemu_version"] or "")
    plt = C.pyplot()
    if plt is None:
        return
    # Second figure: stacked breakdown of sealvm's own time (medians).
    bd = result["sealvm_breakdown_ms"]
    labels = list(bd)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bottoms = [0.0] * len(labels)
    cmap = plt.get_cmap("tab20")
    phases = list(dict.fromkeys(k for l in labels for k in bd[l]))
    for i, phase in enumerate(phases):
        vals = [(bd[l].get(phase) or {}).get("median") or 0.0 for l in labels]
        ax.barh(labels, vals, left=bottoms, color=cmap(i % 20), label=phase)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.set_xlabel("ms (median per phase)")
    ax.set_title("Where sealvm's start-up time goes (hello.elf)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path.with_name(path.stem + "-breakdown.png"), dpi=110)
    plt.close(fig)


def report(result: dict) -> None:
    med = result["medians_ms"]
    for k, m in med.items():
        print(f"  {k:<24} first byte {C.fmt(m['first_byte_ms'], 'ms'):>10}   exit "
              f"{C.fmt(m['exit_ms'], 'ms'):>10}")
    for label, bd in result["sealvm_breakdown_ms"].items():
        print(f"  breakdown, {label} (median ms):")
        for phase, s in bd.items():
            print(f"    {phase:<52} {C.fmt(s['median'])}")
    for label, bd in (result.get("strace_breakdown_ms") or {}).items():
        if not bd or "error" in bd:
            continue
        print(f"  strace milestones, {label} (median ms):")
        for phase, s in bd.items():
            print(f"    {phase:<52} {C.fmt(s['median'])}")
    for k, s in result["interpreter_ms"].items():
        print(f"  {k:<40} {C.fmt(s['median'], 'ms')}")
    C.print_rows(result["summary"])


def main(argv=None) -> int:
    return C.module_main(__doc__, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
