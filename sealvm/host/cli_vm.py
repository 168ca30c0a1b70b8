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
    c.add_argument("image", help="guest image (PVH ELF); read by the daemon")
    c.add_argument("--name", help="VM id (a-z, 0-9, '-'); generated if absent")
    c.add_argument("--memory", "-m", type=parse_size, default=parse_size("256M"))
    c.add_argument("--vcpus", type=int, default=1)
    c.add_argument("--cmdline", default="")
    c.add_argument("--entry", choices=("pvh", "long"), default="pvh")
    c.add_argument("--no-rng", action="store_true")
    c.add_argument("--start", action="store_true", help="start it right away")
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
    con = vs.add_parser("console", help="print the VM's console (--follow to stream it)")
    con.add_argument("vm")
    con.add_argument("--follow", "-f", action="store_true")


def _client(sock: str):
    import httpx
    if not os.path.exists(sock):
        raise SystemExit(f"sealvm: no daemon socket at {sock} (is `sealvm hostd` running?)")
    return httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://sealvm",
                        timeout=httpx.Timeout(180.0, read=None))


def _check(r) -> None:
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail")
        except ValueError:
            detail = r.text
        raise SystemExit(f"sealvm: {detail}")


def run(args) -> int:
    with _client(args.socket) as http:
        cmd = args.vm_command
        if cmd == "create":
            body = dict(image=os.path.abspath(args.image), name=args.name,
                        memory_mib=args.memory >> 20, vcpus=args.vcpus, cmdline=args.cmdline,
                        entry=args.entry, rng=not args.no_rng, start=args.start,
                        manifest=os.path.abspath(args.manifest) if args.manifest else None,
                        owner_pub=os.path.abspath(args.owner_pub) if args.owner_pub else None,
                        broker=args.broker, net=args.net, net_direct=args.net_direct)
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
