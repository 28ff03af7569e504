"""Disk cost of a sweep: a 12-run LoRA sweep over a full-size base (SCimilarity's architecture over its 28,231
genes), 1 epoch each, and one full fine-tuning run of the same base beside it for scale.

    python benchmarks/sweep_disk.py --base outputs/pretrained_base_real/model    # ~15 min on 2 cores

The base folder is read where it is and stored nowhere else; the sweep's outputs are what the runs write.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def train(args: list[str]) -> None:
    res = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="a full-size SCimilarity model folder")
    p.add_argument("--ranks", default="2,4,8,16", help="the sweep's lora.r values (x 3 target sets)")
    p.add_argument("--targets", default="all,hidden,input", help="the sweep's lora.target_modules values")
    p.add_argument("--extra", nargs="*", default=[], help="more train.py overrides for every run (smoke sizes)")
    p.add_argument("--out", default="benchmarks/results/sweep_disk.json")
    args = p.parse_args()
    common = [f"model.pretrained_dir={Path(args.base).resolve()}", "trainer.max_epochs=1",
              "trainer.enable_progress_bar=false", *args.extra]
    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "sweep"
        train(["--multirun", *common, f"lora.r={args.ranks}", f"lora.target_modules={args.targets}",
               f"hydra.sweep.dir={sweep}"])
        runs = sorted(d for d in sweep.iterdir() if (d / "metrics.json").is_file())
        full = Path(tmp) / "full"
        train([*common, "finetune=full", f"hydra.run.dir={full}"])
        result = {
            "base_bytes": size(Path(args.base)),
            "lora_runs": len(runs),
            "lora_sweep_bytes": size(sweep),
            "lora_run_bytes": {"min": min(size(r) for r in runs), "max": max(size(r) for r in runs)},
            "full_finetuning_run_bytes": size(full),
        }
        result["full_finetuning_times_lora_runs_bytes"] = len(runs) * result["full_finetuning_run_bytes"]  # as many full runs
    write_result(result, args.out)


if __name__ == "__main__":
    main()
