"""The attack catalogue: what each security test tries, and the table `make security` prints.

Every attack test carries its metadata on a marker:

    @pytest.mark.attack(adversary="host storage", asset="sealed disk",
                        technique="flip one byte of a block", defence="disk_integrity",
                        outcome="the guest gets an I/O error; the core names the block",
                        control="self:disable")

`control` names the paired control, the same attack with the one defence it targets
switched off, which must then succeed:

    "test_name"           another test function in the same module (all of its cases)
    "self:PARAM"          the cases of this same test whose PARAM is true (e.g. disable=...)
    "self:PARAM=VALUE"    the cases of this same test whose PARAM has the id VALUE
    "inline"              the test itself runs the control after the attack (e.g. against
                          a second broker with the check off) and fails if it does not work

`baseline=True` says the control is the unaltered action (the real thing still works)
rather than a defence switched off, and `control_kind="..."` names any other kind (e.g.
the second of two defences alone); the table says so and does not count such an attack
among those proved by a defence-off control.  `variants=True` counts each parameter case of
the attack as its own technique (seven ways to tamper with a snapshot file are seven
attacks), `variants="PARAM"` counts only the values of that parameter (four ways to read
a core's memory, each tried against three defence set-ups, are four techniques).

Tests in a security module that are not attacks say what they are instead:
`@pytest.mark.functional("why")` (e.g. a restored VM continues where it stopped).

A test may say what it saw with `record_property("observed", "...")`; the table lists it.
With SEALVM_SECURITY_REPORT=PATH set, the session writes the table to PATH (Markdown) and
PATH with .json (the raw rows).  tests/arch/test_attack_catalog.py checks the catalogue.
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ADVERSARIES = ("host daemon", "host storage", "network relay", "migration peer",
               "snapshot store", "key-broker impostor", "guest", "host operator",
               "fleet host")
ASSETS = ("guest memory", "vCPU state", "portal", "launcher", "sealed disk", "network",
          "snapshots", "migration", "attestation", "fleet")
REQUIRED = ("adversary", "asset", "technique", "defence", "outcome", "control")
ENV = "SEALVM_SECURITY_REPORT"
CATALOGUE_ENV = "SEALVM_SECURITY_CATALOGUE"      # write the collected catalogue (JSON) here


@dataclass
class Attack:
    key: str                       # module::function
    meta: dict
    attack_cases: list[str] = field(default_factory=list)
    control_cases: list[str] = field(default_factory=list)
    doc: str = ""
    variants: set[str] = field(default_factory=set)


def _fn_key(item) -> str:
    return f"{item.module.__name__.rsplit('.', 1)[-1]}::{item.originalname}"


def _param_matches(item, spec: str) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    ids = getattr(getattr(item, "callspec", None), "id", "")
    name, _, value = spec.partition("=")
    if name not in params:
        return False
    if value:
        return (str(params[name]) == value or value == ids or ids.startswith(value + "-")
                or ids.endswith("-" + value) or f"-{value}-" in ids)
    return bool(params[name])


def _variant(item, by) -> str:
    """The technique variant an attack case stands for: its whole parameter id, or with
    `variants="PARAM"` only that parameter (other parameters, such as which defences the
    target has, do not make a new technique)."""
    spec = getattr(item, "callspec", None)
    if spec is None or not by:
        return ""
    if isinstance(by, str):
        return str(spec.params[by])
    return spec.id


def catalogue(items) -> tuple[dict[str, Attack], dict[str, str], list[str]]:
    """(attacks by key, role of every security item's nodeid, problems found)."""
    attacks: dict[str, Attack] = {}
    roles: dict[str, str] = {}
    problems: list[str] = []
    by_fn = defaultdict(list)
    for item in items:
        by_fn[_fn_key(item)].append(item)
    for key, group in by_fn.items():
        mark = group[0].get_closest_marker("attack")
        if mark is None:
            continue
        meta = dict(mark.kwargs)
        missing = [k for k in REQUIRED if not meta.get(k)]
        if missing:
            problems.append(f"{key}: attack marker lacks {', '.join(missing)}")
            continue
        if meta["adversary"] not in ADVERSARIES:
            problems.append(f"{key}: adversary {meta['adversary']!r} not in {ADVERSARIES}")
        if meta["asset"] not in ASSETS:
            problems.append(f"{key}: asset {meta['asset']!r} not in {ASSETS}")
        a = Attack(key, meta, doc=(group[0].function.__doc__ or "").strip().split("\n\n")[0])
        ctl = meta["control"]
        for item in group:
            if ctl.startswith("self:") and _param_matches(item, ctl[5:]):
                a.control_cases.append(item.nodeid)
                roles[item.nodeid] = "control"
            else:
                a.attack_cases.append(item.nodeid)
                roles[item.nodeid] = "attack"
                a.variants.add(_variant(item, meta.get("variants")))
        if ctl == "inline":
            a.control_cases = list(a.attack_cases)
        elif not ctl.startswith("self:"):
            module = key.split("::")[0]
            other = by_fn.get(f"{module}::{ctl}")
            if not other:
                problems.append(f"{key}: control {ctl} not found in {module}")
            else:
                for item in other:
                    a.control_cases.append(item.nodeid)
                    roles.setdefault(item.nodeid, "control")
        if not a.attack_cases or not a.control_cases:
            problems.append(f"{key}: needs both attack and control cases")
        attacks[key] = a
    for key, group in by_fn.items():
        for item in group:
            if item.nodeid not in roles:
                if item.get_closest_marker("functional"):
                    roles[item.nodeid] = "functional"
                elif item.get_closest_marker("control"):
                    problems.append(f"{item.nodeid}: stray control marker")
                else:
                    roles[item.nodeid] = "unmarked"
    return attacks, roles, problems


def defence_off(a: Attack) -> bool:
    """Whether the attack's control switches its defence off (rather than being the
    unaltered action, or another defence alone)."""
    return not a.meta.get("baseline") and not a.meta.get("control_kind")


def control_kind(a: Attack) -> str:
    if a.meta.get("control_kind"):
        return a.meta["control_kind"]
    if a.meta.get("baseline"):
        return "unaltered baseline"
    return "inline, defence off" if a.meta["control"] == "inline" else "defence off"


def triples(attacks: dict[str, Attack], *, off_only: bool = True) -> set[tuple[str, str, str]]:
    """The distinct (adversary, asset, technique) triples, each parameter of a
    `variants=True` attack its own technique."""
    out = set()
    for a in attacks.values():
        if off_only and not defence_off(a):
            continue
        m = a.meta
        if m.get("variants"):
            for variant in a.variants:
                out.add((m["adversary"], m["asset"], f"{m['technique']}: {variant}"))
        else:
            out.add((m["adversary"], m["asset"], m["technique"]))
    return out


# ---- the session's record and the table -------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.items = []
        self.outcome: dict[str, str] = {}
        self.observed: dict[str, str] = {}     # what a test recorded it saw (record_property)
        self.started = time.time()

    def collected(self, items) -> None:
        """The security modules' tests, and every test of any other module with an attack
        in it (its controls and functional tests live beside it)."""
        modules = {i.nodeid.split("::")[0] for i in items if i.get_closest_marker("attack")}
        self.items = [i for i in items if i.nodeid.split("::")[0] in modules
                      or "tests/security/" in i.nodeid]

    def report(self, rep) -> None:
        for k, v in getattr(rep, "user_properties", ()):
            if k == "observed":
                self.observed[rep.nodeid] = str(v)
        if rep.when == "call" or rep.outcome != "passed":
            prev = self.outcome.get(rep.nodeid)
            if prev in (None, "passed"):
                self.outcome[rep.nodeid] = rep.outcome

    def _result(self, cases: list[str]) -> str:
        got = [self.outcome.get(c, "not run") for c in cases]
        if any(g == "failed" for g in got):
            return "FAIL"
        if all(g == "passed" for g in got):
            return "pass"
        if any(g == "passed" for g in got):
            return "partial"
        return got[0] if got else "none"

    def write(self, path: Path) -> None:
        attacks, _, problems = catalogue(self.items)
        rows = []
        for a in sorted(attacks.values(), key=lambda a: (a.meta["asset"], a.meta["adversary"],
                                                         a.key)):
            m = a.meta
            rows.append({
                "test": a.key, "adversary": m["adversary"], "asset": m["asset"],
                "technique": m["technique"], "defence": m["defence"], "outcome": m["outcome"],
                "variants": len(a.variants) if m.get("variants") else 1,
                "control": control_kind(a),
                "attack_result": self._result(a.attack_cases),
                "control_result": self._result(a.control_cases),
                "observed": [self.observed[c] for c in a.attack_cases if c in self.observed],
                "attack_cases": {c: self.outcome.get(c, "not run") for c in a.attack_cases},
                "control_cases": {c: self.outcome.get(c, "not run") for c in a.control_cases},
            })
        proved = triples(attacks)
        data = {"rows": rows, "problems": problems, "distinct_triples": len(proved),
                "distinct_triples_with_baseline": len(triples(attacks, off_only=False)),
                "adversaries": sorted({r["adversary"] for r in rows}),
                "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "seconds": round(time.time() - self.started)}
        path.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
        path.write_text(render(data))


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render(data: dict) -> str:
    rows = data["rows"]
    ok = sum(1 for r in rows if r["attack_result"] == "pass" and r["control_result"] == "pass")
    out = [
        "# Security evaluation: the attacks we ran",
        "",
        "Written by `make security` (tests/security/catalog.py) from the last run of the",
        "attack tests against real running systems: cores under KVM, the host daemon, the",
        "owner's broker, the network relay, the fleet controller and agents.  Each row is one",
        "attack test; **attack** passes when the system stopped it the way *outcome* says,",
        "**control** passes when the same attack, with the one defence it targets switched off",
        "(or, where marked, the unaltered action), then succeeds.  The threat model these",
        "attacks test is in [threat-model.md](threat-model.md).",
        "",
        f"Run {data['written']}, {data['seconds']} s.  **{len(rows)} attack tests**, "
        f"{ok} with attack and control both passing; "
        f"**{data['distinct_triples']} distinct (adversary, asset, technique) triples** proved "
        f"by a defence-off control ({data['distinct_triples_with_baseline']} counting those "
        "whose control is the unaltered baseline).",
        "",
        "| # | adversary | asset | what was tried | defence | what the system did | "
        "attack | control |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        tried = r["technique"] + (f" ({r['variants']} variants)" if r["variants"] > 1 else "")
        out.append(f"| {i} | {_cell(r['adversary'])} | {_cell(r['asset'])} | {_cell(tried)} "
                   f"| `{_cell(r['defence'])}` | {_cell(r['outcome'])} | {r['attack_result']} "
                   f"| {r['control_result']} ({r['control']}) |")
    out += ["", "Tests, by row, and what they recorded seeing:", ""]
    for i, r in enumerate(rows, 1):
        seen = "".join(f" — {o}" for o in r["observed"])
        out.append(f"{i}. `{r['test']}`{seen}")
    if data["problems"]:
        out += ["", "## Problems in the catalogue", ""] + [f"- {p}" for p in data["problems"]]
    return "\n".join(out) + "\n"


_recorder = Recorder()


def pytest_configure(config):
    for line in ("attack(adversary, asset, technique, defence, outcome, control): an attack "
                 "test, see tests/security/catalog.py",
                 "functional(why): a security-module test that checks behaviour, not an attack"):
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(session, config, items):
    _recorder.collected(items)
    path = os.environ.get(CATALOGUE_ENV)
    if path:
        attacks, roles, problems = catalogue(_recorder.items)
        Path(path).write_text(json.dumps({
            "attacks": {k: {**a.meta, "attack_cases": a.attack_cases,
                            "control_cases": a.control_cases, "defence_off": defence_off(a)}
                        for k, a in attacks.items()},
            "roles": roles, "problems": problems,
            "triples": sorted(triples(attacks)),
            "triples_with_baseline": sorted(triples(attacks, off_only=False))}, indent=1))


def pytest_runtest_logreport(report):
    _recorder.report(report)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get(ENV)
    if path and _recorder.items:
        _recorder.write(Path(path))
