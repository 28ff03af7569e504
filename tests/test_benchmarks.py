"""`make bench-smoke`: every script of benchmarks/ run at a tiny size through benchmarks/suite.py (the list `make
bench` runs at the documented sizes), each checked for the JSON keys the documentation's tables read, so no
benchmark can rot unnoticed. Also checks that every script is in that list and every table names its JSON."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import suite  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.bench_smoke]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_work")


def test_every_benchmark_script_is_in_the_suite():
    scripts = {p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_")} - {"suite.py"}
    assert scripts == {b.script for b in suite.BENCHMARKS.values()}


def test_every_documented_result_names_an_existing_json():
    """Each `benchmarks/results/<name>.json` the README and docs cite exists and was written with its command."""
    texts = [(REPO / "README.md").read_text(), *(p.read_text() for p in (REPO / "docs").rglob("*.md"))]
    cited = {m for t in texts for m in re.findall(r"benchmarks/results/([\w.-]+\.json)", t)}
    assert "scaling.json" in cited
    for name in cited:
        result = json.loads((REPO / "benchmarks" / "results" / name).read_text())
        assert result["command"].startswith("python benchmarks/"), name


@pytest.mark.timeout(2400)
def test_every_benchmark_runs_at_a_tiny_size_and_writes_what_the_docs_read(workdir, tmp_path):
    """All of them, two at a time (tiny sizes spend their time starting processes); each JSON checked for the
    documented keys by suite.run_one, and here for its command; scaling's rows and plot in detail."""
    failed = suite.run_all(sorted(suite.BENCHMARKS), smoke=True, work=workdir, out_dir=tmp_path, workers=2)
    assert not failed, "\n\n".join(f"{name}: {error}" for name, error in failed.items())
    for name, bench in suite.BENCHMARKS.items():
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert set(bench.keys) <= set(result), name
        assert result["command"].startswith(f"python benchmarks/{bench.script}"), name
    scaling = json.loads((tmp_path / "scaling.json").read_text())
    import scaling as scaling_script

    assert {r["job"] for r in scaling["rows"]} == set(scaling_script.JOBS) - {"evaluate"}  # smoke: --skip-evaluate
    for r in scaling["rows"]:
        assert set(r) >= {"job", "n_cells", "wall_s", "cells_per_s", "peak_rss_mb"}
        assert r["n_cells"] == 1200 and r["wall_s"] > 0 and r["cells_per_s"] > 0 and r["peak_rss_mb"] > 100
    assert (tmp_path / "scaling.png").stat().st_size > 10_000

    # a partial re-run (--jobs ... --update) replaces only its rows, each naming the command that measured it
    subprocess.run([sys.executable, "benchmarks/scaling.py", "--sizes", "1200", "--train-steps", "2", "--query-cells",
                    "200", "--jobs", "index_query", "--update", "--workdir", str(workdir / "scaling"),
                    "--out", str(tmp_path / "scaling.json")], cwd=REPO, check=True, capture_output=True)
    updated = json.loads((tmp_path / "scaling.json").read_text())
    others = lambda rows: [r for r in rows if r["job"] != "index_query"]  # noqa: E731
    assert others(updated["rows"]) == others(scaling["rows"]) and len(updated["rows"]) == len(scaling["rows"])
    (row,) = [r for r in updated["rows"] if r["job"] == "index_query"]
    assert "--update" in row["command"] and row["n_cells"] == 1200 and row["peak_rss_mb"] > 100
    assert updated["full_run_command"] == scaling["command"] and "--update" in updated["command"]
