"""Runs the fuzz targets: coverage-guided (atheris/libFuzzer) or, without atheris, a
seeded random mutator over the same targets and oracle.

    python -m fuzz.runner [--seconds S | --runs N] [--json PATH] [TARGET ...]
    python -m fuzz.runner --list
    python -m fuzz.runner --write-seeds          # (re)write fuzz/corpus/<target>/seed-*
    python -m fuzz.runner --replay TARGET FILE...  # run given inputs through the oracle

Each target runs in its own process, for S seconds or N inputs, starting from its
seed corpus (fuzz/corpus/<target>/) and its regression inputs
(fuzz/regressions/<target>/), copied to a scratch directory so the tree stays as
committed.  Afterwards the corpus the fuzzer grew is replayed once under a line
tracer to count the lines of the target's modules it reached.  Per target it prints
and records: inputs executed, execs/s, libFuzzer's edge coverage (`cov`), lines
covered / executable lines, and crashes (their inputs are kept under
$TMPDIR/sealvm-fuzz/<target>/crashes/).  Exit status 1 if any target crashed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz import target as T  # noqa: E402

CORPUS = ROOT / "fuzz" / "corpus"
REGRESSIONS = ROOT / "fuzz" / "regressions"
WORK = Path(tempfile.gettempdir()) / "sealvm-fuzz"


# ---- inputs --------------------------------------------------------------------------------
def inputs_of(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []


def starting_inputs(name: str) -> list[bytes]:
    return [p.read_bytes() for p in inputs_of(CORPUS / name) + inputs_of(REGRESSIONS / name)]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """A few byte-level edits: flips, interesting values, cuts, inserts, splices."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(7)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2 and len(b) > 3:
            i = rng.randrange(len(b) - 3)
            b[i:i + 4] = rng.choice((b"\xff\xff\xff\xff", b"\0\0\0\0", b"\0\0\0\x80",
                                     rng.randbytes(4)))
        elif op == 3 and b:
            del b[rng.randrange(len(b)):][:rng.randint(1, 64)]
        elif op == 4:
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 5 and pool:
            other = rng.choice(pool)
            i, j = rng.randrange(len(b) + 1), rng.randrange(len(other) + 1)
            b = b[:i] + other[j:]
        elif op == 6 and b:
            i = rng.randrange(len(b))
            b[i:i] = b[i:i + rng.randint(1, 32)]
    return bytes(b)


def random_pass(name: str, runs: int, seed: int = 1) -> int:
    """In-process: the starting inputs, then `runs` mutants; raises Crash on the first."""
    mod = T.load(name)
    mod.setup()
    pool = starting_inputs(name) or [b""]
    for data in pool:
        T.check(name, mod, data)
    rng = random.Random(seed)
    for _ in range(runs):
        T.check(name, mod, mutate(rng, rng.choice(pool), pool))
    return runs + len(pool)


# ---- line coverage ---------------------------------------------------------------------------
def _code_lines(code) -> set[int]:
    out = {ln for _, _, ln in code.co_lines() if ln is not None}
    for c in code.co_consts:
        if hasattr(c, "co_lines"):
            out |= _code_lines(c)
    return out


def executable_lines(path: str) -> set[int]:
    src = Path(path).read_text()
    code = compile(src, path, "exec")
    # Module-level lines run at import, before any input: count only function bodies.
    lines = set()
    for c in code.co_consts:
        if hasattr(c, "co_lines"):
            lines |= _code_lines(c)
    return lines


def line_coverage(name: str, files: list[Path]) -> dict:
    """Replay `files` through the target with a line tracer on its MODULES."""
    import importlib
    mod = T.load(name)
    mod.setup()
    paths = {importlib.import_module(m).__file__: m for m in mod.MODULES}
    hit: dict[str, set[int]] = {p: set() for p in paths}

    def tracer(frame, event, arg):
        f = frame.f_code.co_filename
        if f not in hit:
            return None
        if event == "line":
            hit[f].add(frame.f_lineno)
        return tracer

    sys.settrace(tracer)
    try:
        for p in files:
            try:
                T.check(name, mod, p.read_bytes())
            except T.Crash:
                pass
    finally:
        sys.settrace(None)
    per = {}
    for p, m in paths.items():
        exe = executable_lines(p)
        per[m] = {"covered": len(hit[p] & exe), "lines": len(exe)}
    covered, total = sum(v["covered"] for v in per.values()), sum(v["lines"] for v in per.values())
    return {"covered": covered, "lines": total, "ratio": round(covered / total, 3) if total else None,
            "modules": per}


# ---- one target in a child process -----------------------------------------------------------
def child_fuzz(name: str, libfuzzer_args: list[str]) -> None:
    """Run under atheris; never returns (libFuzzer exits)."""
    import atheris
    with atheris.instrument_imports(include=["sealvm"]):
        mod = T.load(name)
    mod.setup()

    def one(data: bytes) -> None:
        T.check(name, mod, data)

    atheris.Setup([sys.argv[0], *libfuzzer_args], one)
    atheris.Fuzz()


_FINAL = re.compile(r"stat::(\w+):\s+(\d+)")
_COV = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)")


def have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
        return True
    except ImportError:
        return False


def run_target(name: str, seconds: float | None, runs: int | None) -> dict:
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    corpus, crashes = work / "corpus", work / "crashes"
    corpus.mkdir(parents=True)
    crashes.mkdir()
    for i, data in enumerate(starting_inputs(name)):
        (corpus / f"start-{i:03d}").write_bytes(data)
    mod = T.load(name)
    result: dict = {"target": name, "modules": list(mod.MODULES),
                    "expected": [e.__name__ for e in mod.EXPECTED]}
    t0 = time.monotonic()
    if have_atheris():
        args = [f"-artifact_prefix={crashes}/", "-print_final_stats=1", "-timeout=10",
                "-rss_limit_mb=3072", f"-max_len={getattr(mod, 'MAX_LEN', 4096)}"]
        args.append(f"-max_total_time={int(seconds)}" if seconds else f"-runs={runs}")
        cmd = [sys.executable, "-m", "fuzz.runner", "--child", name, "--", *args, str(corpus)]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                           timeout=(seconds or 600) + 300)
        out = p.stderr
        stats = {k: int(v) for k, v in _FINAL.findall(out)}
        cov = _COV.findall(out)
        result.update(engine="atheris", execs=stats.get("number_of_executed_units"),
                      execs_per_s=stats.get("average_exec_per_sec"),
                      edges=int(cov[-1][1]) if cov else None,
                      features=int(cov[-1][2]) if cov else None,
                      corpus_size=int(cov[-1][3]) if cov else None, rc=p.returncode)
        if p.returncode not in (0,) and not inputs_of(crashes):
            result["error"] = out[-2000:]
    else:
        n = 0
        try:
            deadline = t0 + seconds if seconds else None
            rng_seed = 1
            while True:
                n += random_pass(name, 1000 if deadline else runs, seed=rng_seed)
                rng_seed += 1
                if not deadline or time.monotonic() > deadline:
                    break
        except T.Crash as c:
            (crashes / "crash-random").write_bytes(c.data)
            result["error"] = str(c)[-2000:]
        result.update(engine="random", execs=n, execs_per_s=round(n / (time.monotonic() - t0)),
                      edges=None, rc=0)
    result["seconds"] = round(time.monotonic() - t0, 1)
    result["crashes"] = [str(p) for p in inputs_of(crashes)]
    # Line coverage of what the corpus now holds (a fresh, uninstrumented process).
    cp = subprocess.run([sys.executable, "-m", "fuzz.runner", "--coverage", name, str(corpus)],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
    try:
        result["line_coverage"] = json.loads(cp.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result["line_coverage"] = None
        result.setdefault("error", cp.stderr[-2000:])
    return result


def describe(r: dict) -> str:
    lc = r.get("line_coverage") or {}
    cov = f"{lc.get('covered')}/{lc.get('lines')} lines ({100 * (lc.get('ratio') or 0):.0f}%)"
    edges = f" cov {r['edges']} edges," if r.get("edges") is not None else ""
    state = f"CRASH ({len(r['crashes'])} inputs in {Path(r['crashes'][0]).parent})" \
        if r["crashes"] else ("ERROR" if r.get("error") else "ok")
    return (f"{r['target']:15} {r.get('execs') or 0:>9} execs {r.get('execs_per_s') or 0:>7} /s "
            f"{r['seconds']:>6} s,{edges} {cov}: {state}")


def plot(results: list[dict], path: Path) -> None:
    """Two panels per target: execs/s (log scale) and line coverage of its modules."""
    try:
        from bench import common as C
        plt = C.pyplot()
    except ImportError:
        plt = None
    if plt is None:
        return
    names = [r["target"] for r in results]
    xs = range(len(names))
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(7.0, 0.6 * len(names) + 2), 6.5), sharex=True)
    a.bar(xs, [r.get("execs_per_s") or 0 for r in results], color="#7aa6c2", edgecolor="#2b4b60")
    a.set_yscale("log")
    a.set_ylabel("execs/s")
    a.set_title(f"fuzzing: {results[0].get('engine', '')}, {results[0]['seconds']:.0f} s per target",
                fontsize=10)
    b.bar(xs, [100 * ((r.get("line_coverage") or {}).get("ratio") or 0) for r in results],
          color="#9cc27a", edgecolor="#3f602b")
    b.set_ylabel("lines covered (%)")
    b.set_ylim(0, 100)
    b.set_xticks(list(xs))
    b.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    for ax in (a, b):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_fuzz(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return 0
    if argv[:1] == ["--coverage"]:
        files = [f for d in argv[2:] for f in (inputs_of(Path(d)) if Path(d).is_dir() else [Path(d)])]
        print(json.dumps(line_coverage(argv[1], files)))
        return 0
    ap = argparse.ArgumentParser(prog="python -m fuzz.runner", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", help=f"default: all ({', '.join(T.NAMES)})")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--seconds", type=float, help="time per target (default 60)")
    g.add_argument("--runs", type=int, help="inputs per target instead of a time")
    ap.add_argument("--json", type=Path, help="write the results here (and a .png next to it)")
    ap.add_argument("--list", action="store_true", help="list the targets and exit")
    ap.add_argument("--write-seeds", action="store_true",
                    help="rewrite fuzz/corpus/<target>/seed-* from each target's seeds()")
    ap.add_argument("--replay", nargs="+", metavar="ARG",
                    help="TARGET FILE...: run these inputs through the oracle, report crashes")
    a = ap.parse_args(argv)
    for n in a.targets + (a.replay[:1] if a.replay else []):
        if n not in T.NAMES:
            ap.error(f"unknown target {n!r}; known: {', '.join(T.NAMES)}")
    if a.list:
        for n in T.NAMES:
            print(f"{n:15} {(T.load(n).__doc__ or '').strip().splitlines()[0]}")
        return 0
    if a.write_seeds:
        for n in a.targets or T.NAMES:
            mod = T.load(n)
            mod.setup()
            d = CORPUS / n
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            for i, s in enumerate(mod.seeds()):
                (d / f"seed-{i:02d}").write_bytes(s)
            print(f"{n}: {len(list(d.iterdir()))} seeds")
        return 0
    if a.replay:
        name, files = a.replay[0], [Path(f) for f in a.replay[1:]]
        mod = T.load(name)
        mod.setup()
        bad = 0
        for f in files:
            try:
                T.check(name, mod, f.read_bytes())
            except T.Crash as c:
                bad += 1
                print(f"{f}: {c}")
        print(f"{name}: {len(files)} inputs, {bad} crashes")
        return 1 if bad else 0
    names = a.targets or T.NAMES
    seconds = a.seconds if a.seconds or a.runs else 60.0
    engine = "atheris (libFuzzer)" if have_atheris() else "random mutator (atheris not installed)"
    print(f"fuzzing {len(names)} targets with {engine}, "
          f"{f'{seconds:g} s' if seconds else f'{a.runs} inputs'} each", flush=True)
    results = []
    for n in names:
        r = run_target(n, seconds, a.runs)
        results.append(r)
        print(describe(r), flush=True)
        if r.get("error") and not r["crashes"]:
            print(r["error"], file=sys.stderr)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"engine": engine, "seconds_per_target": seconds,
                                      "runs_per_target": a.runs, "python": sys.version.split()[0],
                                      "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                      "targets": results}, indent=2) + "\n")
        plot(results, a.json.with_suffix(".png"))
        print(f"wrote {a.json}")
    crashed = [r["target"] for r in results if r["crashes"] or r.get("error")]
    if crashed:
        print(f"CRASHES or errors in: {', '.join(crashed)}", file=sys.stderr)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
