"""Linux boot: time to /init, sealvm vs QEMU -enable-kvm, same kernel and initramfs.

This machine's KVM cannot run Linux, so both run inside one outer VM (QEMU TCG
with emulated SVM, kvm_amd; tests/linux/nested.py) in the same run, alternating,
on the Debian cloud kernel and a busybox initramfs whose /init prints a line
and powers off.  A driver inside times, for each boot, the wall time from
spawning the monitor to the guest's first /init line on the console (and the
guest's own uptime at that point), then waits for the power-off.  Nested
absolute times mean little (every exit costs ~70 us there); the ratio is the
result.

    python3 -m bench.linux_boot [--quick]
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from . import common as C

sys.path.insert(0, str(C.ROOT / "tests" / "linux"))
import nested as N  # noqa: E402

NAME = "linux_boot"
CMDLINE = "console=ttyS0 quiet panic=-1 8250.nr_uarts=1 pci=off"

BOOT_INIT = r"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "GUEST-INIT uptime=$(/bin/busybox cut -d' ' -f1 /proc/uptime)"
/bin/busybox poweroff -f
"""

DRIVER = r"""
import json, subprocess, sys, time
rounds = int(sys.argv[1])
cmdline = sys.argv[2]
cmds = {
  "sealvm": ["sealvm", "run", "--kernel", "vmlinuz", "--initrd", "boot.cpio.gz", "-m", "256M",
             "--no-rng", "--cmdline", cmdline],
  "qemu-kvm": ["qemu-system-x86_64", "-L", "/usr/share/seabios", "-L", "/usr/share/qemu", "-M", "pc", "-enable-kvm", "-cpu", "host", "-m", "256",
               "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
               "-serial", "stdio", "-no-reboot", "-kernel", "vmlinuz", "-initrd", "boot.cpio.gz",
               "-append", cmdline],
}
res = {k: [] for k in cmds}
for i in range(rounds):
    for name, cmd in cmds.items():
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        init_s = uptime = None
        tail = []
        for line in p.stdout:
            tail = (tail + [line.decode(errors="replace")])[-20:]
            if b"GUEST-INIT" in line and init_s is None:
                init_s = time.monotonic() - t0
                uptime = float(line.split(b"uptime=")[1].split()[0])
        try:
            rc = p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill(); rc = p.wait()
        total = time.monotonic() - t0
        res[name].append({"to_init_s": init_s, "guest_uptime_at_init_s": uptime,
                          "exit_s": total, "rc": rc, "tail": "" if init_s else "".join(tail)})
print("BENCH-RESULT " + json.dumps(res), flush=True)
"""


def run(args) -> dict:
    rounds = 1 if args.quick else 3
    image = N.outer_image()
    job = N.Job(image)
    job.add("boot.cpio.gz", N.guest_initrd(image, BOOT_INIT))
    job.add("driver.py", DRIVER.encode())
    job.script = f"python3 driver.py {rounds} '{CMDLINE}'\n"
    out = job.run(timeout=900)
    m = re.search(r"^BENCH-RESULT (.*)$", out.console, re.M)
    if m is None:
        raise RuntimeError(f"no result from the outer VM:\n{out.console[-3000:]}")
    runs = json.loads(m.group(1))
    for name, samples in runs.items():
        bad = [s for s in samples if s["to_init_s"] is None]
        if bad:
            raise RuntimeError(f"{name}: a boot never reached /init:\n{bad[0]['tail']}")
    to_init = {k: [s["to_init_s"] for s in v] for k, v in runs.items()}
    uptime = {k: [s["guest_uptime_at_init_s"] for s in v] for k, v in runs.items()}
    s_med, q_med = C.median(to_init["sealvm"]), C.median(to_init["qemu-kvm"])
    rows = [
        C.summary_row(NAME, "spawn to /init (nested, wall)", s_med, q_med, "qemu-kvm",
                      "ratio <= 2", s_med / q_med <= 2.0, "s"),
        C.summary_row(NAME, "guest uptime at /init (nested)", C.median(uptime["sealvm"]),
                      C.median(uptime["qemu-kvm"]), "qemu-kvm", "-", None, "s"),
    ]
    result = {
        "description": "time from spawning the monitor to the guest's /init, inside an outer "
                       "QEMU-TCG VM with kvm_amd; same Debian cloud kernel, initramfs and "
                       "command line for both; boots alternate",
        "kernel": (image / "kernel-version").read_text().strip(),
        "cmdline": CMDLINE,
        "rounds": rounds,
        "runs": runs,
        "summary": rows,
    }
    C.write_result(NAME, result, args.out, args.tag)
    C.bar_plot(C.plot_path(NAME, args.out, args.tag),
               f"Linux boot to /init, nested (kernel {result['kernel']})",
               {"sealvm to /init": to_init["sealvm"], "qemu-kvm to /init": to_init["qemu-kvm"],
                "sealvm guest uptime": uptime["sealvm"],
                "qemu-kvm guest uptime": uptime["qemu-kvm"]},
               "seconds", note="inside QEMU TCG (-cpu max) with kvm_amd; dots = single boots")
    return result


def report(result: dict) -> None:
    for name, samples in result["runs"].items():
        print(f"  {name:<9} to /init: " + ", ".join(C.fmt(s["to_init_s"], "s") for s in samples)
              + "; guest uptime at /init: "
              + ", ".join(C.fmt(s["guest_uptime_at_init_s"], "s") for s in samples))
    C.print_rows(result["summary"])


def main(argv=None) -> int:
    return C.module_main(__doc__, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
