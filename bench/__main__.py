"""meshd benchmark for issue 6: ``bench/run`` (or ``python -m bench``) — see docs/adr/005.

The data path: starts nginx and every system's proxy pair once, then runs repetitions;
inside a repetition each workload is run against every system back to back, in an order
shuffled (seeded) for each repetition and workload, so slow drift of the shared machine and
carry-over from the previous cell hit all systems alike. Then (unless ``--no-scale``) the
scale figures of item 4, :mod:`bench.scale`, full or quick alike. Each writes its own
section of the output file.
"""

from __future__ import annotations

import argparse
import atexit
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench.procs import Processes
from bench.systems import Env, available, launchers
from bench.topology import make_pki, start_nginx
from bench.workloads import Cell, Timing, children_of, default_workloads, run_cell, wrk_available

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "performance.md"
PREAMBLE = """# Performance

Figures from `bench/run` (method: `docs/adr/005-benchmark-method.md`). Each section between
`bench:*` markers is rewritten by the run that owns it; everything else is left alone.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, short cells")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3; quick 1)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds per cell")
    p.add_argument("--systems", default="direct,consul,haproxy,meshd,meshd-w2,meshd-naive")
    p.add_argument("--workloads", default="", help="comma list of workload names (default all)")
    p.add_argument("--newconn-rate", type=float, default=50.0, help="new connections/s, open loop")
    p.add_argument("--no-wrk", action="store_true", help="closed loop with the Python generator")
    p.add_argument("--gen-cpus", default="", help="pin the generator to these CPUs, e.g. 1")
    p.add_argument("--gen-nice", type=int, default=0, help="nice increment for the generator")
    p.add_argument("--output", type=Path, default=DOC, help="markdown file to update")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs alone")
    p.add_argument("--json", type=Path, default=None, help="write every cell here as JSON")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    p.add_argument(
        "--no-scale",
        action="store_true",
        help="skip the scale figures (item 4: python -m bench.scale) after the data path",
    )
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    args.duration = args.duration or (2.0 if args.quick else 6.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    if args.reps < 1 or not 0 < args.duration <= 120 or not 0 <= args.warmup <= 30:
        p.error("need reps >= 1, 0 < duration <= 120, 0 <= warmup <= 30")
    return args


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops every child


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    workloads = default_workloads(args.newconn_rate)
    if args.workloads:
        wanted = set(args.workloads.split(","))
        workloads = tuple(w for w in workloads if w.name in wanted)
    timing = Timing(warmup=args.warmup, duration=args.duration)
    gen = {"cpus": [int(c) for c in args.gen_cpus.split(",") if c], "nice": args.gen_nice}
    use_wrk = wrk_available() and not args.no_wrk
    workdir = Path(tempfile.mkdtemp(prefix="meshd-bench-"))
    procs = Processes(workdir)
    atexit.register(procs.stop_all)
    info = report.machine()
    started = time.monotonic()
    try:
        nginx_addr, nginx_pid = start_nginx(procs, workdir)
        nginx_pids = (nginx_pid, *children_of(nginx_pid))
        env = Env(procs, make_pki(workdir / "pki"), workdir)
        targets, skipped = _start_systems(env, args.systems.split(","), nginx_addr)
        cells = _run_cells(targets, workloads, timing, args.reps, nginx_pids, use_wrk, gen)
    except BaseException:
        print(f"bench failed; configs and logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        procs.stop_all()
    elapsed = time.monotonic() - started
    if args.json:
        args.json.write_text(json.dumps([c.as_dict() for c in cells], indent=1))
    systems = list(targets)
    md = _render(cells, systems, workloads, skipped, info, args, use_wrk, elapsed)
    print(md)
    if not args.no_write:
        report.replace_section(args.output, "dataplane", md, PREAMBLE)
        print(f"\nwrote {args.output}", file=sys.stderr)
    if args.keep_workdir:
        print(f"configs and logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if not args.no_scale:
        _run_scale(args)
    return 0


def _run_scale(args: argparse.Namespace) -> None:
    """Item 4's figures (``python -m bench.scale``), so that one command measures all of
    issue 6: full or quick like the data-path run, written to its own section."""
    from bench import scale

    argv = [*(["--quick"] if args.quick else [])]
    if not args.no_write:
        argv += ["--write", *([] if args.output == DOC else [f"--output={args.output}"])]
    print(f"\nscale figures: python -m bench.scale {' '.join(argv)}".rstrip(), file=sys.stderr)
    if scale.main(argv) != 0:
        print("scale: a target was missed (see the table above)", file=sys.stderr)


def _start_systems(
    env: Env, names: list[str], upstream: tuple[str, int]
) -> tuple[dict[str, tuple[tuple[str, int], tuple[int, ...]]], dict[str, str]]:
    known = launchers(env)
    started: dict[str, tuple[tuple[str, int], tuple[int, ...]]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        if name not in known:
            skipped[name] = "unknown system"
            continue
        why = available(name)
        if why is None:
            try:
                started[name] = known[name].start_pair(upstream)
            except (OSError, RuntimeError, TimeoutError) as exc:
                why = f"failed to start: {exc}"
        if why is not None:
            skipped[name] = why
            print(f"skipping {name}: {why}", file=sys.stderr)
        else:
            print(f"started {name}: {started[name]}", file=sys.stderr)
    return started, skipped


def _run_cells(targets, workloads, timing, reps, nginx_pids, use_wrk, gen) -> list[Cell]:
    names = list(targets)
    total = reps * len(workloads) * len(names)
    cells: list[Cell] = []
    done = 0
    for rep in range(reps):
        for wi, w in enumerate(workloads):
            order = list(names)
            random.Random(rep * 1009 + wi).shuffle(order)  # same orders in every run
            for name in order:
                done += 1
                addr, pids = targets[name]
                try:
                    cell = run_cell(name, w, rep, addr, pids, nginx_pids, timing,
                                    use_wrk=use_wrk, gen=gen)  # fmt: skip
                except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
                    print(f"[{done}/{total}] {w.name:8} {name:12} FAILED: {exc}", file=sys.stderr)
                    continue
                cells.append(cell)
                lat = cell.latency_us.get("p50")
                print(
                    f"[{done}/{total}] rep {rep} {w.name:8} {name:12} {cell.rate:9,.0f}/s"
                    f"  p50 {'-' if lat is None else f'{lat:,.0f}'} µs"
                    f"  cpu {cell.proxy_cpu_us:,.1f} µs/req  errors {cell.errors}  ({cell.tool})",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(0.2)  # let TIME_WAIT and the proxies settle between cells
    return cells


def _render(cells, systems, workloads, skipped, info, args, use_wrk, elapsed) -> str:
    figs = report.aggregate(cells)
    k = report.keys_for(workloads)
    mode = "quick (smoke: numbers indicative only)" if args.quick else "full"
    lines = [
        "## Data path: meshd vs Consul's built-in proxy vs HAProxy (issue 6)",
        "",
        f"Run: `bench/run{' --quick' if args.quick else ''}` — {mode}; {args.reps} repetition(s),"
        f" {args.warmup:g} s warm-up + {args.duration:g} s measured per cell, systems"
        f" interleaved; {elapsed / 60:.1f} min. Closed-loop cells by"
        f" {'wrk (-t1)' if use_wrk else 'the Python generator'}; open-loop cells by"
        " `bench/loadgen.py` (latency from the intended send time).",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {key} | {val} |" for key, val in info.items()),
        "",
        "### Summary (medians over repetitions; latency in µs, added = system - direct)",
        "",
        report.summary_table(figs, systems, k),
        "",
        "### Targets (issue 6, done-when)",
        "",
        report.targets_table(report.targets(figs, k, report.CANDIDATE, cells), report.CANDIDATE),
        "",
        "A PASS or FAIL stands only when most repetitions agree with the medians' verdict;"
        " otherwise the result is inconclusive. Failed requests fail a target (ADR 005).",
        "",
        *((note, "") if (note := report.noise_note(figs, k)) else ()),
        *(
            (
                f"`{report.WORKERS}` = meshd with `[proxy] workers = 2`: two processes per proxy"
                " accepting from one shared listening socket (about twice the memory); CPU is"
                " summed over all four processes:",
                "",
                report.targets_table(
                    report.targets(figs, k, report.WORKERS, cells), report.WORKERS
                ),
                "",
            )
            if report.WORKERS in systems
            else ()
        ),
        "Reference only (the naive trio.SSLStream pair the issue started from):",
        "",
        report.targets_table(report.targets(figs, k, "meshd-naive", cells), "meshd-naive"),
        "",
        "### Every cell",
        "",
        report.detail_table(figs, systems, workloads),
        "",
        "CPU µs/req is utime+stime from /proc/<pid>/stat of the proxy processes over the"
        " measured window divided by completed requests (clock-tick resolution, 10 ms);"
        f" `{report.WORKERS}` lists each side's two processes (out1+out2 + in1+in2). The"
        " generator's own CPU per request is in the last column; nginx is the same for all."
        " Consul's agent is not charged, though its proxies ask it to authorize every new"
        " connection: Consul's new-connection CPU is a lower bound.",
    ]
    if skipped:
        lines += ["", "Not measured: " + "; ".join(f"{s} ({why})" for s, why in skipped.items())]
    if args.quick:
        lines += ["", "**Quick run: one short repetition; do not quote these numbers.**"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
