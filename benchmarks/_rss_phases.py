"""Where a job's memory goes: run a script in this process while a thread samples its RSS and the main thread's stack
every 0.2 s, then print (and write as JSON) the peak, the phases that reached the highest RSS, and a timeline.

    python benchmarks/_rss_phases.py --out /tmp/phases.json -- evaluate.py run_dir=outputs/bench_scaling/n1000000/run

A profiler for peak RSS, not allocations: memray's high-watermark view counts buffers TileDB allocates but never
touches (1.4 GB of obs read buffers that were never resident), so it pointed at the wrong phase. A helper, not a
benchmark (no size of its own; the suite runs the benchmarks that use it).
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import threading
import time
import traceback
from pathlib import Path

import psutil


def _frames(frame) -> list[str]:
    """The innermost frames of the project, its libraries or the script (not the standard library)."""
    cwd, stdlib = str(Path.cwd()) + "/", str(Path(json.__file__).parents[1]) + "/"
    out = []
    for f in traceback.extract_stack(frame):
        if f.filename.startswith("<") or (f.filename.startswith(stdlib) and "site-packages" not in f.filename):
            continue
        name = f.filename.split("site-packages/")[-1].removeprefix(cwd).removeprefix("src/")
        out.append(f"{name}:{f.lineno}:{f.name}")
    return out[-4:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("script", nargs=argparse.REMAINDER, help="-- script.py args...")
    args = p.parse_args()
    script = [a for a in args.script if a != "--"]
    proc, main_id, samples, stop = psutil.Process(), threading.main_thread().ident, [], threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not stop.is_set():
            frame = sys._current_frames().get(main_id)
            samples.append((time.perf_counter() - t0, proc.memory_info().rss / 2**20, _frames(frame) if frame else []))
            time.sleep(args.interval)

    threading.Thread(target=sample, daemon=True).start()
    sys.argv = script
    try:
        runpy.run_path(script[0], run_name="__main__")
    except SystemExit:
        pass
    finally:
        stop.set()
    phases: dict[str, float] = {}
    for _, rss, stack in samples:
        key = " <- ".join(reversed(stack[-2:])) or "?"
        phases[key] = max(phases.get(key, 0.0), rss)
    peak = max(samples, key=lambda s: s[1])
    result = {"command": " ".join(["python benchmarks/_rss_phases.py --", *script]), "peak_rss_mb": round(peak[1]),
              "peak_stack": peak[2],
              "phases": [{"where": k, "max_rss_mb": round(v)} for k, v in sorted(phases.items(), key=lambda kv: -kv[1])[:25]],
              "timeline": [{"t_s": round(t, 1), "rss_mb": round(r), "where": s[-1] if s else "?"}
                           for t, r, s in samples[:: max(1, len(samples) // 200)]]}
    print(json.dumps({k: result[k] for k in ("peak_rss_mb", "peak_stack", "phases")}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
