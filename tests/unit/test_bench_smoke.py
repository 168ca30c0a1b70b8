"""The benchmark harness's parsing and summary helpers, on canned output.

No KVM, no QEMU, no subprocesses: this only keeps bench/ from rotting
silently between benchmark runs.
"""
from __future__ import annotations

import json

import pytest

from bench import common as C
from bench import compute, exits, firsttouch, idle, memory, run_all, startup


def test_words_and_lines():
    out = "noise\ncompute cpu=0 iters=5 cycles=9 result=0x1 ok\ncompute cpu=1 iters=5 cycles=7\n"
    assert C.find_line(out, "compute cpu=") == {"cpu": "0", "iters": "5", "cycles": "9",
                                                "result": "0x1"}
    assert [w["cpu"] for w in C.find_lines(out, "compute cpu=")] == ["0", "1"]
    assert C.find_line(out, "absent") is None


@pytest.mark.parametrize("rc,status", [(1, 0), (15, 7), (0, None), (-9, None), (124, None)])
def test_qemu_status(rc, status):
    assert C.qemu_guest_status(rc) == status


def test_statistics_and_ratio():
    assert C.median([3, 1, 2, None]) == 2
    assert C.summarize([]) == {"n": 0, "median": None, "min": None, "max": None}
    assert C.ratio(1, 0) is None and C.ratio(None, 2) is None and C.ratio(3, 2) == 1.5
    assert C.fmt(None) == "n/a" and C.fmt(1.23456, "ms") == "1.23 ms"


def test_command_lines():
    q = C.qemu_cmd(C.ROOT / "x.elf", "kvm", "a=1", extra=C.QEMU_MEMFD, rng=True)
    assert q[q.index("-accel") + 1] == "kvm" and "host,-arch-capabilities" in q
    assert q[-2:] == ["-append", "a=1"] and "memory-backend=mem" in q
    assert "isa-debug-exit,iobase=0xf4,iosize=4" in q and "virtio-rng-device" in q
    t = C.qemu_cmd(C.ROOT / "x.elf", "tcg")
    assert "-cpu" not in t and t[t.index("-accel") + 1] == "tcg"
    s = C.sealvm_cmd(C.ROOT / "x.elf", "--no-rng", cmdline="k=v")
    assert s[1:4] == ["-m", "sealvm.cli", "run"] and s[-2:] == ["--cmdline", "k=v"]


def test_proc_parsers():
    stat = "42 (a (b) c) S 7 1 1 0 -1 0 0 0 0 0 250 50 10 5 20 0 1 0 100 0 0"
    st = C.parse_proc_stat(stat)
    assert st["ppid"] == 7
    assert st["utime"] == 250 / C.CLK_TCK and st["cstime"] == 5 / C.CLK_TCK
    status = "Name:\tx\nVmRSS:\t  300 kB\nRssAnon:\t 100 kB\nRssFile:\t 50 kB\nRssShmem:\t 150 kB\n"
    assert C.parse_proc_status(status) == {"VmRSS": 300, "RssAnon": 100, "RssFile": 50,
                                           "RssShmem": 150}
    assert C.parse_tsc("tsc_hz=2596000123 ns=1 cycles=2\n") == 2596000123.0


def test_startup_probe_and_importtime():
    err = 'warn\nSTARTUP-PROBE {"interpreter_ready": 1.0, "cli_imported": 1.01}\n'
    st = startup.parse_probe(err)
    st.update(spawn=0.97, spawn1=1.05, preflight1=1.04, bogus=1.2)
    ph = startup.phases_ms(st)
    assert list(ph) == ["spawn -> interpreter ready", "interpreter ready -> cli imported",
                        "cli imported -> preflight done", "preflight done -> core spawned"]
    assert ph["spawn -> interpreter ready"] == pytest.approx(30.0)
    assert ph["preflight done -> core spawned"] == pytest.approx(10.0)
    it = ("import time: self [us] | cumulative | imported package\n"
          "import time:       100 |        100 |   _io\n"
          "import time:       500 |       2000 | site\n"
          "import time:       300 |        300 |     sealvm.core.addr\n"
          "import time:       700 |       1200 |   sealvm.core\n"
          "import time:       200 |       1500 | sealvm\n")
    r = startup.parse_importtime(it)
    assert r["site_cumulative_us"] == 2000
    assert r["sealvm_cumulative_us"] == 1500 and r["sealvm_modules_self_us"] == 1200
    assert r["top_self"][0]["module"] == "sealvm.core"


def test_startup_strace_milestones():
    text = """\
100 1.000000 execve("/py", ["/py", "-m", "sealvm.cli", "run", "h.elf"], 0x1 /* 3 vars */) = 0
101 1.100000 execve("/py", ["/py", "-I", "-S", "-B", "/r/sealvm/core/entry.py"], 0x2 /* 2 vars */) = 0
102 1.250000 ioctl(7, KVM_CREATE_VM, 0) = 8
102 1.260000 seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, {len=151}) = 0
103 1.270000 ioctl(12, KVM_RUN, 0) = 0
103 1.280000 ioctl(12, KVM_RUN <unfinished ...>
100 1.300000 write(1, "H", 1) = 1
"""
    m = startup.parse_strace(text)
    assert m["core_exec"] == 1.1 and m["seccomp"] == 1.26 and m["first_kvm_run"] == 1.27
    ph = startup.strace_phases(m)
    assert ph["core: interpreter, imports, hardening -> KVM_CREATE_VM"] == pytest.approx(150)
    assert ph["first KVM_RUN -> first byte written to stdout"] == pytest.approx(30)


def test_compute_parser():
    p = compute.parse_compute("compute cpu=native iters=100 cycles=5000 result=0xab\n")
    assert p == {"cpu": "native", "iters": 100, "cycles": 5000, "result": "0xab"}
    assert compute.parse_compute("nothing") is None
    assert compute.speed_vs_native(97, 100) == pytest.approx(0.97)


def test_firsttouch_parsers():
    out = ("memtouch base=0x200000 mib=64\nmemtouch first_touch_cycles=260000000 pages=16384\n"
           "memtouch second_pass_cycles=9000000\n")
    assert firsttouch.parse_memtouch(out) == {"first_touch_cycles": 260000000, "pages": 16384,
                                              "second_pass_cycles": 9000000}
    assert firsttouch.sysfs_choice("always within_size advise [never] deny force") == "never"
    a = firsttouch.availability("always [never]", 0, 128)
    assert a["thp"] and a["hugetlb"]
    a = firsttouch.availability("always [advise] never", 200, 128)
    assert a == {"thp": None, "hugetlb": None}


def test_idle_parsers():
    out = "idle secs=10 cycles=25960000000 doorbell=0xd0100000\nidle done\n"
    assert idle.parse_idle(out) == {"secs": 10, "cycles": 25960000000, "doorbell": 0xD0100000}
    assert idle.parse_idle("idle secs=1 cycles=1 doorbell=0x0\n") is None   # never finished
    samples = [(0.5, 0.2), (1.0, 0.30), (5.0, 0.32), (9.0, 0.34), (10.5, 0.5)]
    s = idle.steady_share(samples, 1.0, 10)
    assert s["window_s"] == pytest.approx(8.0) and s["pct_of_core"] == pytest.approx(0.5)
    assert idle.steady_share([(2.0, 1.0)])["pct_of_core"] is None


def test_exits_parsers():
    assert exits.parse_exits("exits kind=pio n=20000 cycles=2596000000\n") == {
        "kind": "pio", "n": 20000, "cycles": 2596000000}
    assert exits.parse_exits("exits kind=ioevent skipped (no sealvm.ioevent address)") is None
    assert exits.usecs_per_op(2596000000, 20000, 2.596e9) == pytest.approx(50.0)
    assert exits.parse_rng("rng bytes=1048576 cycles=123 ok\n") == {"bytes": 1048576,
                                                                      "cycles": 123}
    assert exits.parse_getppid("getppid n=10 ns=2000 cycles=5000\n")["ns"] == 2000


def test_memory_steady_rss():
    mk = lambda anon, file, shmem: {"RssAnon": anon, "RssFile": file, "RssShmem": shmem}
    samples = [
        {"t": 0.2, "procs": {1: mk(50000, 9000, 1024)}},                  # before the touch
        {"t": 1.0, "procs": {1: mk(10240, 8192, 150 * 1024), 2: mk(1024, 1024, 60 * 1024)}},
        {"t": 2.0, "procs": {1: mk(9216, 8192, 205 * 1024)}},
    ]
    s = memory.steady_own_mib(samples, 200)
    assert s["own_mib"] == pytest.approx(20.0) and s["processes"] == 2
    assert s["vm_process_own_mib"] == pytest.approx(18.0)     # pid 1 holds the most shmem
    assert memory.steady_own_mib(samples[:1], 200)["own_mib"] is None


def test_summary_table(tmp_path):
    row = C.summary_row("compute", "loop (speed)", 1.0, 0.98, "native", ">= 0.97x native", True,
                        "s", ratio_value=0.98)
    assert row["ratio"] == 0.98
    host = {"date": "d", "kernel": "k", "cpu_model": "c", "cpus": 2, "kvm_module": "kvm",
            "qemu_version": "q", "python": "3.11", "tsc_hz": 2.596e9, "sealvm_root": "/r",
            "sealvm_git": "abc"}
    md = run_all.markdown([row, C.summary_row("idle", "cpu", 0.1, 100, "qemu", "< 1%", True, "%")],
                          {"exits": "Traceback\nRuntimeError: boom"}, host, 12.0)
    assert "| compute | loop (speed) | 1 s | native: 0.98 s | 0.98 | >= 0.97x native | yes |" in md
    assert "FAILED: RuntimeError: boom" in md
    path = C.write_result("unit", {"summary": [row], "host": host}, tmp_path)
    assert json.loads(path.read_text())["summary"][0]["met"] is True


def test_disk_bench_parses_blkbench_phases():
    from bench import disk
    out = ("blkbench device=0xd0001000 queue=256 qd=4 bs=65536 size=8388608\n"
           "blkbench seqwrite ops=128 bytes=8388608 cycles=2596000 kbps=1 iops=1 errors=0 "
           "mismatches=0\nblkbench seqread ops=128 bytes=8388608 cycles=1298000 kbps=1 iops=1 "
           "errors=0 mismatches=2\nblkbench done errors=0 mismatches=2\n")
    p = disk.parse_phases(out)
    assert set(p) == {"seqwrite", "seqread"}
    assert p["seqread"]["cycles"] == 1298000 and p["seqread"]["mismatches"] == 2
    assert set(disk.configs(True)) == {"seq64k", "rand4k-qd1", "rand4k-qd32"}
    assert "disk" in run_all.MODULES
