"""Shared by the benchmark scripts: writing the result JSON, and real PBMC request bodies for the service."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def write_result(result: dict, out: str | Path) -> None:
    """Save the result (with the command that produced it) and print it as one JSON line."""
    result["command"] = " ".join(["python", *sys.argv])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}))


def pbmc_request_bodies(batch_cells: int, top_k: int | None = None,
                        npz: bool = False) -> tuple[list[bytes], list[bytes]]:
    """The bundled PBMCs as raw integer counts (what clients send), encoded once: single-cell /predict bodies and
    CSR-like /predict_batch bodies of ``batch_cells`` cells (JSON, or .npz for /v1/predict_batch_npz)."""
    from scimilarity_lora.data.soma_store import pbmc_counts

    counts = pbmc_counts()
    X = counts.X.tocsr()
    genes = np.asarray(counts.var["feature_name"])
    singles = [json.dumps({"expression": dict(zip(genes[r.indices].tolist(), r.data.astype(int).tolist()))}).encode()
               for r in X]
    batches = []
    for s in range(0, X.shape[0] - batch_cells + 1, batch_cells):
        B = X[s:s + batch_cells]
        if npz:
            import io

            buf = io.BytesIO()
            np.savez(buf, genes=genes.astype(str), indptr=B.indptr, indices=B.indices, data=B.data,
                     top_k=top_k or 3)
            batches.append(buf.getvalue())
            continue
        body = {"sparse": {"genes": genes.tolist(), "indptr": B.indptr.tolist(), "indices": B.indices.tolist(),
                           "data": B.data.astype(int).tolist()}}
        if top_k is not None:
            body["top_k"] = top_k
        batches.append(json.dumps(body).encode())
    return singles, batches
