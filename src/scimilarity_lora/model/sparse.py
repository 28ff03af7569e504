"""Sparse input for the encoder's first layer: most of the 28,231 genes are zero in any cell.

``Linear(x)`` for a CSR row is a weighted sum of the weight's columns at the non-zero genes, which is exactly
``F.embedding_bag(indices, W.T, offsets, per_sample_weights=values, mode="sum")``. LoRA's A matrix sees the same
input, so it takes the same path: ``B(A x) * scaling``. Forward and backward match the dense layer (tested to
1e-5 with LoRA on every target set); speed depends on density, so :func:`choose` picks per batch.

Only plain LoRA is implemented here: a peft layer whose adapter uses a LoRA *variant* (DoRA, aLoRA, ...; peft keeps
them in ``layer.lora_variant``) computes something else, so such a layer is refused with an error rather than
silently computed as plain LoRA. Use ``data.input_format=dense`` for those.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

#: At or below this fraction of non-zeros the sparse path is never slower than dense (2 CPU cores, 28,231 genes,
#: batch 256, LoRA training against the bare dense loop: 3.9x at 3%, 3.35x at 5%, 1.9x at 10% with the gene-major
#: kernel; before it 0.75x at 20%, not remeasured; full fine-tuning on par up to 10%). benchmarks/training_speed.py.
DEFAULT_MAX_DENSITY = 0.10


@dataclass
class SparseBatch:
    """CSR rows as tensors: ``values[offsets[i]:offsets[i+1]]`` at genes ``indices[...]`` for cell i."""

    indices: torch.Tensor  # int64, nnz
    offsets: torch.Tensor  # int64, n_cells (start of each row)
    values: torch.Tensor  # float32, nnz
    n_genes: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.offsets.shape[0]), self.n_genes)

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    @classmethod
    def from_csr(cls, X: sp.csr_matrix) -> "SparseBatch":
        X = X.tocsr()
        return cls(torch.from_numpy(X.indices.astype(np.int64)), torch.from_numpy(X.indptr[:-1].astype(np.int64)),
                   torch.from_numpy(X.data.astype(np.float32, copy=False)), X.shape[1])

    def to_dense(self) -> torch.Tensor:
        n = len(self)
        counts = torch.diff(torch.cat([self.offsets, torch.tensor([self.values.numel()])]))
        rows = torch.repeat_interleave(torch.arange(n), counts)
        out = torch.zeros(n, self.n_genes, dtype=self.values.dtype, device=self.values.device)
        out[rows, self.indices] = self.values
        return out

    def to_csr(self) -> sp.csr_matrix:
        """Back to a SciPy CSR matrix (CPU): for scikit-learn baselines on the same normalised values."""
        indptr = np.append(self.offsets.cpu().numpy(), self.values.numel())
        return sp.csr_matrix((self.values.detach().cpu().numpy(), self.indices.cpu().numpy(), indptr),
                             shape=self.shape)

    def to(self, device: torch.device | str, *args, **kwargs) -> "SparseBatch":
        return SparseBatch(self.indices.to(device), self.offsets.to(device), self.values.to(device), self.n_genes)


class UnsupportedAdapterError(NotImplementedError):
    """An adapter the sparse first layer cannot compute exactly."""


def choose(X: sp.csr_matrix, max_density: float = DEFAULT_MAX_DENSITY) -> bool:
    """Use the sparse path for this batch?"""
    return X.nnz <= max_density * X.shape[0] * X.shape[1]


def _bag(weight_t: torch.Tensor, batch: SparseBatch, values: torch.Tensor) -> torch.Tensor:
    if weight_t.requires_grad and not values.requires_grad and weight_t.shape[1] <= NARROW and torch.is_grad_enabled():
        return _NarrowSparseMatmul.apply(weight_t, batch.indices, batch.offsets, values)
    return F.embedding_bag(batch.indices, weight_t, batch.offsets, mode="sum", per_sample_weights=values)


#: trainable tables at most this wide (LoRA's A: genes x r) take the scatter backward below
NARROW = 64


class _NarrowSparseMatmul(torch.autograd.Function):
    """``X @ W`` for CSR rows ``X`` and a trainable, narrow ``W`` (genes x r: LoRA's A), whose gradient
    ``X.T @ grad`` is scattered with ``index_add_``. Same values as ``embedding_bag``'s backward, which sorts every
    non-zero's gene index first: that sort was 13% of a LoRA training step at 5% density (torch.profiler,
    ``benchmarks/training_speed.py``), more than the whole gradient it feeds."""

    @staticmethod
    def forward(ctx, weight_t: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                values: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(indices, offsets, values)
        ctx.n_genes = weight_t.shape[0]
        return F.embedding_bag(indices, weight_t, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        indices, offsets, values = ctx.saved_tensors
        counts = torch.diff(offsets, append=offsets.new_tensor([indices.numel()]))
        rows = torch.repeat_interleave(torch.arange(len(offsets), device=offsets.device), counts)
        grad_w = grad_out.new_zeros(ctx.n_genes, grad_out.shape[1])
        grad_w.index_add_(0, indices, grad_out[rows] * values.unsqueeze(1))
        return grad_w, None, None, None


def gene_rows(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight.T`` as a contiguous (genes x out) table for ``embedding_bag``.

    A transposed view would make embedding_bag copy the whole 28,231 x 1,024 weight on every call; for a frozen
    weight (the LoRA base) the contiguous copy is made once and reused until the weight changes (its version,
    storage or device). A trainable weight is transposed per step, keeping autograd intact.
    """
    if weight.requires_grad and torch.is_grad_enabled():
        return weight.t().contiguous()
    version = 0 if weight.is_inference() else weight._version  # inference tensors cannot change in place
    key = (weight.data_ptr(), version, weight.device, weight.dtype, tuple(weight.shape))
    cached = layer.__dict__.get("_gene_rows_cache")
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().t().contiguous())
        layer.__dict__["_gene_rows_cache"] = cached
    return cached[1]


#: the gene-major product pays once a batch touches more distinct genes than this (their weight rows, 4 kB each,
#: no longer stay in cache for ``embedding_bag``): 256 cells of bundled PBMCs (765 genes) run faster with
#: ``embedding_bag``; 1% of 28,231 genes drawn at random already run faster gene-major (19 against 25 ms).
GENE_MAJOR_MIN_GENES = 4096


def _gene_major_pays(weight: torch.Tensor, batch: SparseBatch, values: torch.Tensor) -> bool:
    no_grad = not (weight.requires_grad and torch.is_grad_enabled()) and not values.requires_grad
    if not (no_grad and weight.device.type == "cpu" and weight.dtype == values.dtype == torch.float32):
        return False
    if batch.indices.numel() <= GENE_MAJOR_MIN_GENES:
        return False
    return int(torch.bincount(batch.indices, minlength=batch.n_genes).count_nonzero()) > GENE_MAJOR_MIN_GENES


def gene_major_product(layer: nn.Module, weight: torch.Tensor, batch: SparseBatch,
                       values: torch.Tensor) -> torch.Tensor:
    """``X @ weight.T`` for a frozen CPU weight, gene by gene: the batch in CSC order (SciPy), each gene's weight row
    read once and added to every cell that expresses it. ``embedding_bag`` reads a 4 kB weight row per non-zero
    (1.5 GB per 256-cell batch at 5% density): memory-bound, it took 22% of a LoRA step. Here the weight is read
    once per batch, the hidden units split across torch's threads (SciPy releases the GIL); 2 to 3x faster than
    ``embedding_bag`` on 2 cores at 5% and 10% density (genes drawn at random over all 28,231)."""
    n_threads = max(1, min(torch.get_num_threads(), 8))
    version = 0 if weight.is_inference() else weight._version
    key = (weight.data_ptr(), version, tuple(weight.shape), n_threads)
    cached = layer.__dict__.get("_gene_major_cache")
    if cached is None or cached[0] != key:  # genes x hidden, split by hidden unit: one contiguous piece per thread
        table = weight.detach().t()
        bounds = np.linspace(0, table.shape[1], n_threads + 1).astype(int)
        cached = (key, [table[:, a:b].contiguous().numpy() for a, b in zip(bounds[:-1], bounds[1:])])
        layer.__dict__["_gene_major_cache"] = cached
    pieces = cached[1]
    indptr = np.append(batch.offsets.numpy(), batch.values.numel())
    X = sp.csr_matrix((values.detach().numpy(), batch.indices.numpy(), indptr), shape=batch.shape).tocsc()
    if len(pieces) == 1:
        out = X @ pieces[0]
    else:
        out = np.hstack(list(_pool(len(pieces)).map(lambda w: X @ w, pieces)))
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


_POOLS: dict[int, "ThreadPoolExecutor"] = {}


def _pool(n: int) -> "ThreadPoolExecutor":
    from concurrent.futures import ThreadPoolExecutor

    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="gene_major")
    return _POOLS[n]


def sparse_linear(layer: nn.Module, batch: SparseBatch, values: torch.Tensor) -> torch.Tensor:
    """``layer(dense(batch))`` without densifying; ``layer`` is an ``nn.Linear`` or a peft LoRA ``Linear``."""
    base = getattr(layer, "base_layer", layer)
    if _gene_major_pays(base.weight, batch, values):
        with torch.profiler.record_function("gene_major_product"):  # SciPy's time, named in torch.profiler tables
            out = gene_major_product(base, base.weight, batch, values)
    else:
        out = _bag(gene_rows(base, base.weight), batch, values)
    if base.bias is not None:
        out = out + base.bias
    if base is layer or getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return out
    if not hasattr(layer, "lora_A"):
        raise UnsupportedAdapterError(f"{type(layer).__name__} is not a LoRA layer; the sparse first layer computes "
                                      "only nn.Linear and plain LoRA; use data.input_format=dense")
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}):
            raise UnsupportedAdapterError(
                f"adapter {name!r} is a LoRA variant ({type(layer.lora_variant[name]).__name__}) that the sparse "
                "first layer does not implement; use data.input_format=dense (or a plain LoRA adapter)")
        lora_a = layer.lora_A[name]
        a = _bag(gene_rows(lora_a, lora_a.weight), batch, layer.lora_dropout[name](values))  # zeros stay zero
        out = out + layer.lora_B[name](a) * layer.scaling[name]
    return out


def first_block(block: nn.Sequential, batch: SparseBatch) -> torch.Tensor:
    """SCimilarity's input block ``Dropout -> Linear -> BatchNorm -> PReLU`` on sparse input."""
    dropout, linear, norm, act = block
    values = dropout(batch.values)  # zeros stay zero under dropout; non-zeros are dropped and rescaled as in dense
    return act(norm(sparse_linear(linear, batch, values)))
