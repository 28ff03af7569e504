"""One base, many adapters (model/multi_adapter.py), in process, on a full-size base (SCimilarity's architecture
over 28,231 genes), with LoRA r=8 adapters on all four Linear layers and 10-class heads:

- RSS of a process holding the base and 1, 10 or 50 adapters, against one merged model's process RSS times the
  same count (what one merged-model service per model costs);
- throughput of a 256-cell batch mixing 10 adapters, against the same batch through one merged model;
- single-cell p50 latency with 10 adapters loaded against 1.

    python benchmarks/multi_adapter.py        # ~3 min on 2 cores

Adapter weights are random with trained adapters' shapes (speed and memory depend on shapes only). Measured side by
side in one run; the RSS figures each come from a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

N_GENES, R, N_CLASSES = 28_231, 8, 10


def build(n_adapters: int):
    import torch

    from scimilarity_lora.model.classifier import ClassifierHead
    from scimilarity_lora.model.encoder import Encoder
    from scimilarity_lora.model.multi_adapter import Adapter, LowRankUpdate, MultiAdapterClassifier

    torch.manual_seed(0)
    base = Encoder(N_GENES).eval()
    multi = MultiAdapterClassifier(base)
    linears = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    for k in range(n_adapters):
        updates = {n: LowRankUpdate(torch.randn(R, m.in_features) * 0.01, torch.randn(m.out_features, R) * 0.01, 2.0)
                   for n, m in linears.items()}
        multi.add(Adapter(f"a{k}", updates, ClassifierHead(base.latent_dim, N_CLASSES).eval()))
    return multi


def merged_model():
    import torch

    from scimilarity_lora.model.classifier import CellClassifier
    from scimilarity_lora.model.encoder import EncoderConfig

    torch.manual_seed(0)
    return CellClassifier.build(EncoderConfig(N_GENES), N_CLASSES).eval()


def rss_child(kind: str, n: int) -> None:
    """Run in a subprocess: build, run one forward, print peak RSS (MB)."""
    import torch

    torch.set_num_threads(2)
    x = torch.rand(4, N_GENES)
    if kind == "multi":
        multi = build(n)
        multi(x, [f"a{i % n}" for i in range(4)])
    else:
        with torch.inference_mode():
            merged_model()(x)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def rss(kind: str, n: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(n)], capture_output=True, text=True,
                         check=True).stdout.split()[-1]
    return float(out)


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=2, default=None)
    p.add_argument("--counts", type=int, nargs="+", default=[1, 10, 50], help="adapters per process, for the RSS rows")
    p.add_argument("--repeats", type=int, default=200, help="single-cell requests per p50")
    p.add_argument("--out", default="benchmarks/results/multi_adapter.json")
    args = p.parse_args()
    if args.child:
        rss_child(args.child[0], int(args.child[1]))
        return
    import torch

    torch.set_num_threads(2)
    merged_rss = rss("merged", 1)
    memory = {n: {"one_service_mb": round(rss("multi", n), 1), "merged_services_mb": round(merged_rss * n, 1)}
              for n in args.counts}

    multi10, multi1, merged = build(10), build(1), merged_model()
    g = torch.Generator().manual_seed(1)
    x = torch.log1p(torch.rand(256, N_GENES, generator=g) * (torch.rand(256, N_GENES, generator=g) < 0.05) * 20)
    names = [f"a{i % 10}" for i in range(256)]
    with torch.inference_mode():
        t_mixed = timed(lambda: multi10(x, names), 10)
        t_merged = timed(lambda: merged(x), 10)
        one = x[:1]
        p50_10 = statistics.median(timed(lambda: multi10(one, ["a3"]), args.repeats))
        p50_1 = statistics.median(timed(lambda: multi1(one, ["a0"]), args.repeats))
    mixed_cps, merged_cps = 256 / statistics.median(t_mixed), 256 / statistics.median(t_merged)
    result = {
        "base": f"SCimilarity architecture, {N_GENES} genes", "adapter": f"LoRA r={R} on all 4 Linears, {N_CLASSES} classes",
        "rss": memory,
        "throughput_cells_per_s": {"mixed_10_adapters": round(mixed_cps), "one_merged_model": round(merged_cps),
                                   "ratio": round(mixed_cps / merged_cps, 3)},
        "single_cell_p50_ms": {"10_adapters_loaded": round(p50_10 * 1e3, 3), "1_adapter_loaded": round(p50_1 * 1e3, 3),
                               "ratio": round(p50_10 / p50_1, 3)},
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
