"""Live migration: sealvm's attested, sealed migration vs QEMU's own, on the same guest.

memtouch writes every page of a region covering nearly all of RAM, then dirties
pages at a set rate (0, 50 MB/s, 200 MB/s) and stamps every write with the TSC;
its `gap_max_cycles` (the largest gap between two stamps over the run) is the
downtime the guest itself saw.  Guests of 256 MiB and 1 GiB, in the same run:
  * sealvm: two host daemons on this machine, the target listening on 127.0.0.1;
    `POST /v1/incoming` there, `POST /v1/vms/ID/migrate` here, until the target
    runs (mutual attestation through the owner's broker, session key, sealed
    stream, the broker's generation commit);
  * QEMU microvm (KVM) over TCP 127.0.0.1: default settings (128 MiB/s cap,
    300 ms downtime limit), uncapped (max-bandwidth 10 GB/s), and uncapped with
    TLS (tls-creds-x509, certificates made here).  A QEMU run not finished after
    TIMEOUT s (15) is cancelled and counted as not converging.
Reported per case: total time, guest-measured downtime (ms), bytes sent.
Needs root (the launcher) and QEMU.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import common as C
from .snapshot import Owner, Qmp, wait_console, warm_host_memory
from .split import Hostd

NAME = "migration"
TIMEOUT = 15.0
RATES = {0: 1, 50: 12207, 200: 48828}   # MB/s -> memtouch pages/s ("0": one page a second)


def cmdline(size: int, rate_pages: int) -> str:
    return f"mib={size - 24} secs=20 rate={rate_pages}"


def downtime_ms(console: str, hz: float) -> float | None:
    done = C.find_line(console, "memtouch done")
    if not done or "gap_max_cycles" not in done:
        return None
    return C.to_int(done["gap_max_cycles"]) / hz * 1e3


def sealvm_run(a: Hostd, b: Hostd, owner: Owner, elf: Path, size: int, mbps: int,
               tag: str, hz: float) -> dict:
    vm, name = f"mg{tag}", f"m{size}r{mbps}"
    r = a.http.post("/v1/vms", json=dict(
        image=str(elf), name=vm, memory_mib=size, cmdline=cmdline(size, RATES[mbps]),
        start=True, manifest=str(owner.public / "vms" / name), broker=owner.url), timeout=300)
    r.raise_for_status()
    wait_console(a, vm, "memtouch t=2 ")
    r = b.http.post("/v1/incoming", json=dict(
        name=vm, manifest=str(owner.public / "vms" / name), broker=owner.url))
    r.raise_for_status()
    t = time.perf_counter()
    m = a.http.post(f"/v1/vms/{vm}/migrate", json={"to": f"127.0.0.1:{r.json()['port']}"},
                    timeout=600)
    m.raise_for_status()
    state = "incoming"
    while state in ("incoming", "configured"):
        time.sleep(0.005)
        state = b.http.get(f"/v1/vms/{vm}").json()["state"]
    total = time.perf_counter() - t
    a.http.post(f"/v1/vms/{vm}/migrate/finish", json={"taken_over": state == "running"})
    wait_console(b, vm, "memtouch done", timeout=120)
    time.sleep(0.3)                      # the rest of that line
    console = b.http.get(f"/v1/vms/{vm}/console").text
    b.http.delete(f"/v1/vms/{vm}")
    a.http.delete(f"/v1/vms/{vm}")
    rep = m.json()
    return {"total_s": total, "downtime_ms": downtime_ms(console, hz), "bytes": rep["bytes"],
            "rounds": rep["rounds"], "stop_ms": rep["stop_ms"], "throttle": rep["throttle"],
            "ok": "memtouch done" in console and "MISMATCH" not in console,
            "converged": state == "running"}


def make_tls(d: Path) -> Path:
    """A CA, and a server and client certificate signed by it, as QEMU's x509 dir wants."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, key, issuer, issuer_key, ca=False):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1")),
                 x509.DNSName("localhost")]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert(name("sealvm bench CA"), ca_key, name("sealvm bench CA"), ca_key, ca=True)
    (d / "ca-cert.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        c = cert(name("localhost"), key, ca.subject, ca_key)
        (d / f"{role}-cert.pem").write_bytes(c.public_bytes(serialization.Encoding.PEM))
        (d / f"{role}-key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
    return d


def qemu_run(elf: Path, size: int, mbps: int, mode: str, d: Path, tag: str, hz: float,
             tls_dir: Path) -> dict:
    port = free_port()
    base = [a for a in C.qemu_cmd(elf, "kvm", cmdline(size, RATES[mbps]), f"{size}M")
            if a != "-nographic"] + ["-display", "none"]
    tls = mode == "tls"
    src_ser, dst_ser = d / f"{tag}.src", d / f"{tag}.dst"
    extra_src = ["-object", f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=client"] if tls else []
    extra_dst = ["-object", f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server"] if tls else []
    src = subprocess.Popen(base + extra_src + ["-serial", f"file:{src_ser}", "-qmp",
                                               f"unix:{d}/{tag}.sq,server=on,wait=off"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dst = subprocess.Popen(base + extra_dst + [
        "-serial", f"file:{dst_ser}", "-qmp", f"unix:{d}/{tag}.dq,server=on,wait=off",
        "-incoming", "defer"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while b"memtouch t=2 " not in (src_ser.read_bytes() if src_ser.exists() else b""):
            if time.monotonic() > deadline:
                raise RuntimeError("QEMU guest did not start")
            time.sleep(0.05)
        qs, qd = Qmp(f"{d}/{tag}.sq"), Qmp(f"{d}/{tag}.dq")
        params = {"downtime-limit": 300}
        if mode != "default":
            params["max-bandwidth"] = 10_000_000_000
        for q in (qs, qd):
            if tls:
                q.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
        qd.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        qs.cmd("migrate-set-parameters", **params)
        t = time.perf_counter()
        qs.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        status, info = "active", {}
        while status not in ("completed", "failed"):
            time.sleep(0.01)
            try:
                info = qs.cmd("query-migrate")["return"]
            except (OSError, ValueError):     # the guest's run ended first: not converged
                status = "source ended"
                break
            status = info.get("status")
            if time.perf_counter() - t > TIMEOUT:
                qs.cmd("migrate_cancel")
                status = "timeout"
                break
        total = time.perf_counter() - t
        console = ""
        if status == "completed":
            deadline = time.monotonic() + 60
            while b"memtouch done" not in dst_ser.read_bytes() and time.monotonic() < deadline:
                time.sleep(0.1)
            console = dst_ser.read_bytes().decode(errors="replace")
        qs.close()
        qd.close()
        ram = info.get("ram", {}) if isinstance(info, dict) else {}
        return {"total_s": total, "downtime_ms": downtime_ms(console, hz),
                "bytes": ram.get("transferred"), "qemu_downtime_ms": info.get("downtime"),
                "converged": status == "completed",
                "ok": "memtouch done" in console and "MISMATCH" not in console}
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> dict:
    if os.geteuid() != 0:
        raise RuntimeError("the migration benchmark needs root (the launcher)")
    sizes = (256,) if args.quick else (256, 1024)
    rates = (0, 200) if args.quick else (0, 50, 200)
    modes = ("default", "uncapped", "tls")
    hz = C.tsc_hz()
    elf = C.guest(args.guests, "memtouch")
    base = Path(tempfile.mkdtemp(prefix="sealvm-bench-mig-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    owner = Owner(base, elf, {f"m{s}r{r}": (cmdline(s, RATES[r]), s) for s in sizes
                              for r in rates})
    for h in ("a", "b"):
        (base / h).mkdir()
    a, b = Hostd(base / "a", "64300-64349"), Hostd(base / "b", "64350-64399")
    tls_dir = make_tls(base / "tls")
    samples: dict = {}
    try:
        for size in sizes:
            warm_host_memory(base, 4 * size)
            for mbps in rates:
                key = f"{size}M {mbps}MB/s"
                samples[f"sealvm {key}"] = sealvm_run(a, b, owner, elf, size, mbps,
                                                      f"{size}-{mbps}", hz)
                for mode in modes:
                    samples[f"qemu-{mode} {key}"] = qemu_run(elf, size, mbps, mode, base,
                                                             f"q{size}{mbps}{mode}", hz, tls_dir)
                print(f"  {key}: " + "; ".join(
                    f"{k.split()[0]} {v['total_s']:.2f}s/"
                    f"{v['downtime_ms'] if v['downtime_ms'] is None else round(v['downtime_ms'])}ms"
                    for k, v in samples.items() if k.endswith(key)), flush=True)
    finally:
        a.close()
        b.close()
        owner.close()
        shutil.rmtree(base, ignore_errors=True)
    rows = []
    for size in sizes:
        for mbps in rates:
            key = f"{size}M {mbps}MB/s"
            s, tls, unc = (samples[f"sealvm {key}"], samples[f"qemu-tls {key}"],
                           samples[f"qemu-uncapped {key}"])
            rows.append(C.summary_row(NAME, f"{key}: total s (vs QEMU TLS)", s["total_s"],
                                      tls["total_s"] if tls["converged"] else None, "QEMU TLS",
                                      "<= QEMU TLS, <= 1.5x QEMU plain uncapped",
                                      s["converged"] and (not tls["converged"] or
                                                          s["total_s"] <= tls["total_s"]) and
                                      (not unc["converged"] or
                                       s["total_s"] <= 1.5 * unc["total_s"]), "s"))
            rows.append(C.summary_row(NAME, f"{key}: guest-seen downtime ms", s["downtime_ms"],
                                      unc["downtime_ms"], "QEMU uncapped", "<= 300 ms",
                                      s["downtime_ms"] is not None and s["downtime_ms"] <= 300,
                                      "ms"))
    result = {"description": __doc__.split("\n\n")[0], "samples": samples, "summary": rows}
    C.write_result(NAME, result, args.out, args.tag)
    plot = {}
    for k, v in samples.items():
        if v["downtime_ms"] is not None:
            plot[f"{k} downtime ms"] = [v["downtime_ms"]]
    C.bar_plot(C.plot_path(NAME, args.out, args.tag), "migration: downtime the guest saw",
               plot, "ms", log=True, note="sealvm: attested, sealed; QEMU: plain/TLS over TCP")
    return result


def report(result: dict) -> None:
    C.print_rows(result["summary"])


def main(argv=None) -> int:
    return C.module_main(__doc__, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
