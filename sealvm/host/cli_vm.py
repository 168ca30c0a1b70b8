"""`sealvm vm ...`: the daemon's API from the command line (HTTP over its Unix socket)."""
from __future__ import annotations

import json
import os
import sys

DEFAULT_RUN_DIR = "/run/sealvm"
DEFAULT_SOCKET = os.path.join(DEFAULT_RUN_DIR, "hostd.sock")


def add_parser(sub, parse_size) -> None:
    vm = sub.add_parser("vm", help="manage VMs through the host daemon (sealvm hostd)",
                        description="Talk to a running `sealvm hostd` over its Unix socket.")
    vm.add_argument("--socket", default=os.environ.get("SEALVM_SOCKET", DEFAULT_SOCKET),
                    help=f"the daemon's API socket (default {DEFAULT_SOCKET}, or $SEALVM_SOCKET)")
    vs = vm.add_subparsers(dest="vm_command", metavar="ACTION")
    vs.required = True
    c = vs.add_parser("create", help="create a VM (its core starts; the guest does not yet)")
    c.add_argument("image", nargs="?", help="guest image (PVH ELF); read by the daemon")
    c.add_argument("--kernel", metavar="FILE", help="boot this Linux kernel instead (bzImage or "
                   "PVH vmlinux; entry linux); read by the daemon")
    c.add_argument("--initrd", metavar="FILE", help="the Linux kernel's initramfs")
    c.add_argument("--name", help="VM id (a-z, 0-9, '-'); generated if absent")
    c.add_argument("--memory", "-m", type=parse_size, default=parse_size("256M"))
    c.add_argument("--vcpus", type=int, default=1)
    c.add_argument("--cmdline", default="")
    c.add_argument("--entry", choices=("pvh", "long", "linux"), default=None,
                   help="boot entry (default pvh; linux with --kernel)")
    c.add_argument("--no-rng", action="store_true")
    c.add_argument("--start", action="store_true", help="start it right away")
    c.add_argument("--disk", metavar="FILE", help="a sealed disk image (sealvm disk create) to "
                                                  "attach as a virtio-blk device")
    c.add_argument("--manifest", metavar="DIR", help="the owner's signed manifest directory")
    c.add_argument("--net", metavar="GATEWAY_HOST:PORT",
                   help="a network card sealed into a tunnel to the owner's gateway at this UDP "
                        "address (`sealvm owner gateway`); the daemon relays the sealed datagrams")
    c.add_argument("--net-direct", action="store_true",
                   help="with --net: the core gets a UDP socket connected to the gateway "
                        "(no relay in the daemon; survives a daemon restart)")
    c.add_argument("--owner-pub", metavar="FILE", help="the owner's owner.pub.json")
    c.add_argument("--broker", metavar="URL", default="http://127.0.0.1:8470",
                   help="the owner's key broker (default %(default)s)")
    for action, text in (("start", "start the guest"), ("pause", "pause all vCPUs"),
                         ("resume", "resume a paused VM"), ("stop", "stop the VM and its core"),
                         ("delete", "stop the VM and forget it"), ("show", "one VM's record"),
                         ("logs", "the VM's lifecycle and core log")):
        vs.add_parser(action, help=text).add_argument("vm")
    vs.add_parser("list", help="list VMs")
    sn = vs.add_parser("snapshot", help="seal the VM into a snapshot file the host cannot read",
                       description="The VM's core seals its memory, vCPU and device state under "
                       "the owner's snapshot key; the owner's broker makes it the VM's newest "
                       "generation, so no older snapshot can be restored again.")
    sn.add_argument("vm")
    sn.add_argument("--output", "-o", metavar="FILE", help="snapshot file the daemon writes "
                    "(default: in the daemon's state directory)")
    sn.add_argument("--leave-paused", action="store_true", help="do not resume the VM after")
    mg = vs.add_parser("migrate", help="move a running VM to another host's daemon",
                       description="The target host's daemon starts a core that attests to the "
                       "owner's broker as this VM's migration target; the two cores prove to "
                       "each other that the broker released them the VM's key, agree a session "
                       "key, and the VM's memory and state go over TCP sealed (pre-copy rounds "
                       "with dirty logging, then a short stop). The target runs the VM only once "
                       "the broker makes it the newest copy; this copy is then stopped. If "
                       "anything fails first, the VM goes on running here.")
    mg.add_argument("vm")
    mg.add_argument("--to", metavar="SOCKET", required=True,
                    help="the target host daemon's API socket")
    mg.add_argument("--address", default="127.0.0.1",
                    help="address of the target host the stream goes to (default %(default)s)")
    mg.add_argument("--manifest", metavar="DIR", required=True,
                    help="the owner's signed manifest directory (read by the target daemon)")
    mg.add_argument("--owner-pub", metavar="FILE", help="the owner's owner.pub.json")
    mg.add_argument("--broker", metavar="URL", help="the owner's key broker as the target "
                    "reaches it (default: the VM's broker here)")
    mg.add_argument("--name", help="VM id on the target (default: the same)")
    mg.add_argument("--downtime-ms", type=int, default=300,
                    help="downtime budget the pre-copy aims for (default %(default)s)")
    mg.add_argument("--disk", metavar="FILE", help="the VM's sealed disk as the target host "
                    "reaches it (shared storage)")
    mg.add_argument("--net", metavar="HOST:PORT", help="the owner's gateway as the target host "
                    "reaches it, if the VM has a network device")
    rs = vs.add_parser("restore", help="a new VM from a sealed snapshot",
                       description="A new core attests to the owner's broker as the restorer "
                       "of SNAPSHOT; the broker releases the key only for the VM's newest "
                       "snapshot, then the core checks every chunk while it loads it.")
    rs.add_argument("snapshot", help="the sealed snapshot file (readable by the daemon)")
    rs.add_argument("--manifest", metavar="DIR", required=True,
                    help="the owner's signed manifest directory")
    rs.add_argument("--owner-pub", metavar="FILE", help="the owner's owner.pub.json")
    rs.add_argument("--broker", metavar="URL", default="http://127.0.0.1:8470",
                    help="the owner's key broker (default %(default)s)")
    rs.add_argument("--name", help="VM id of the restored VM; generated if absent")
    rs.add_argument("--paused", action="store_true", help="restore without starting it")
    rs.add_argument("--disk", metavar="FILE", help="the VM's sealed disk image, if it had one")
    rs.add_argument("--net", metavar="HOST:PORT", help="the owner's gateway, if the VM had a "
                    "network device")
    con = vs.add_parser("console", help="print the VM's console (--follow to stream it)")
    con.add_argument("vm")
    con.add_argument("--follow", "-f", action="store_true")


def _client(sock: str):
    import httpx
    if not os.path.exists(sock):
        raise SystemExit(f"sealvm: no daemon socket at {sock} (is `sealvm hostd` running?)")
    return httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://sealvm",
                        timeout=httpx.Timeout(180.0, read=None), trust_env=False)


def _check(r) -> None:
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail")
        except ValueError:
            detail = r.text
        raise SystemExit(f"sealvm: {detail}")


def _with_progress(http, vm: str, what: str, request):
    """Run `request()` while a progress line for `vm` is drawn on stderr (when a tty)."""
    import threading
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=request()), daemon=True)
    t.start()
    tty = sys.stderr.isatty()
    while t.is_alive():
        t.join(0.2)
        if tty and t.is_alive():
            try:
                p = http.get(f"/v1/vms/{vm}/progress").json()
            except Exception:
                continue
            if p.get("total"):
                pct = 100 * p["done"] // p["total"]
                bar = "#" * (pct // 4)
                sys.stderr.write(f"\r{what} [{bar:<25}] {pct:3d}% {p['done'] >> 20}/"
                                 f"{p['total'] >> 20} MiB")
                sys.stderr.flush()
    if tty:
        sys.stderr.write("\r\033[K")
    return out["r"]


def _migrate(http, args) -> int:
    """Drive both daemons: incoming core there, the stream from here, then finish here."""
    import time
    rec = http.get(f"/v1/vms/{args.vm}")
    _check(rec)
    broker = args.broker or rec.json()["broker"]
    name = args.name or args.vm
    with _client(args.to) as target:
        r = target.post("/v1/incoming", json=dict(
            name=name, manifest=os.path.abspath(args.manifest), broker=broker,
            owner_pub=os.path.abspath(args.owner_pub) if args.owner_pub else None,
            listen=args.address, disk=os.path.abspath(args.disk) if args.disk else None,
            net=args.net))
        _check(r)
        port = r.json()["port"]
        r = _with_progress(http, args.vm, "migrating", lambda: http.post(
            f"/v1/vms/{args.vm}/migrate", json={"to": f"{args.address}:{port}",
                                               "downtime_ms": args.downtime_ms}))
        if r.status_code >= 400:
            target.delete(f"/v1/vms/{name}")
            _check(r)
        report = r.json()
        deadline, state = time.monotonic() + 120, "incoming"
        while state in ("incoming", "configured") and time.monotonic() < deadline:
            time.sleep(0.05)
            state = target.get(f"/v1/vms/{name}").json()["state"]
        taken = state == "running"
        r = http.post(f"/v1/vms/{args.vm}/migrate/finish", json={"taken_over": taken})
        _check(r)
    print(f"{args.vm}: {'now runs on the target as ' + name if taken else 'stays here'} "
          f"({r.json()['state']} here); rounds {report['rounds']}, pages {report['pages']}, "
          f"{report['bytes'] >> 20} MiB sent, stop phase {report['stop_ms']} ms "
          f"({report['stop_pages']} pages), total {report['total_s']:.2f} s")
    return 0 if taken else 1


def run(args) -> int:
    with _client(args.socket) as http:
        cmd = args.vm_command
        if cmd == "create":
            from .oneshot import guest_files
            try:
                image, initrd = guest_files(args)
            except ValueError as e:
                raise SystemExit(f"sealvm vm create: {e}") from None
            body = dict(image=os.path.abspath(image), name=args.name,
                        initrd=os.path.abspath(initrd) if initrd else None,
                        memory_mib=args.memory >> 20, vcpus=args.vcpus, cmdline=args.cmdline,
                        entry=args.entry, rng=not args.no_rng, start=args.start,
                        manifest=os.path.abspath(args.manifest) if args.manifest else None,
                        owner_pub=os.path.abspath(args.owner_pub) if args.owner_pub else None,
                        broker=args.broker, net=args.net, net_direct=args.net_direct,
                        disk=os.path.abspath(args.disk) if args.disk else None)
            r = http.post("/v1/vms", json=body)
            _check(r)
            print(r.json()["id"])
        elif cmd == "list":
            r = http.get("/v1/vms")
            _check(r)
            print(f"{'ID':<20} {'STATE':<11} {'MEM':>6} {'VCPUS':>5} {'PID':>7}  EXIT")
            for v in r.json():
                ex = "" if v["exit_status"] is None else str(v["exit_status"])
                print(f"{v['id']:<20} {v['state']:<11} {v['memory_mib']:>5}M {v['vcpus']:>5} "
                      f"{v['pid']:>7}  {ex}")
        elif cmd in ("start", "pause", "resume", "stop"):
            r = http.post(f"/v1/vms/{args.vm}/{cmd}")
            _check(r)
            print(f"{args.vm}: {r.json()['state']}")
        elif cmd == "snapshot":
            body = dict(path=os.path.abspath(args.output) if args.output else None,
                        resume=not args.leave_paused)
            r = _with_progress(http, args.vm, "sealing", lambda: http.post(
                f"/v1/vms/{args.vm}/snapshot", json=body))
            _check(r)
            v = r.json()
            print(f"{v['snapshot']}  generation {v['generation']}  {v['bytes'] >> 20} MiB")
        elif cmd == "migrate":
            return _migrate(http, args)
        elif cmd == "restore":
            import secrets
            name = args.name or f"restored-{secrets.token_hex(3)}"
            body = dict(snapshot=os.path.abspath(args.snapshot), name=name,
                        manifest=os.path.abspath(args.manifest),
                        owner_pub=os.path.abspath(args.owner_pub) if args.owner_pub else None,
                        broker=args.broker, start=not args.paused,
                        disk=os.path.abspath(args.disk) if args.disk else None, net=args.net)
            r = _with_progress(http, name, "restoring", lambda: http.post("/v1/restore",
                                                                           json=body))
            _check(r)
            v = r.json()
            print(f"{v['id']}  {v['state']}  generation {v['generation']}")
        elif cmd == "delete":
            _check(http.delete(f"/v1/vms/{args.vm}"))
        elif cmd == "show":
            r = http.get(f"/v1/vms/{args.vm}")
            _check(r)
            print(json.dumps(r.json(), indent=2))
        elif cmd == "logs":
            r = http.get(f"/v1/vms/{args.vm}/logs")
            _check(r)
            sys.stdout.write(r.text)
        elif cmd == "console":
            with http.stream("GET", f"/v1/vms/{args.vm}/console",
                             params={"follow": args.follow}) as r:
                if r.status_code >= 400:
                    r.read()
                    _check(r)
                for chunk in r.iter_bytes():
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
    return 0
