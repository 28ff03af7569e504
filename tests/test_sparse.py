"""The sparse first-layer path gives the dense path's outputs and gradients, with LoRA on every target set."""

import numpy as np
import pytest
import torch

from conftest import synthetic_counts
from scimilarity_lora.model.encoder import Encoder
from scimilarity_lora.model.adapters import FinetuneConfig, merged_encoder, prepare_encoder
from scimilarity_lora.preprocess import Preprocessing
from scimilarity_lora.model.sparse import SparseBatch, choose

TARGETS = [("input",), ("hidden",), ("output",), ("all",), ("input", "output")]


def batch(n=64, genes=500, density=0.05, seed=0):
    X = synthetic_counts(n, genes, density=density, seed=seed)
    prep = Preprocessing()
    return prep(X), prep(X, output="sparse")


def perturbed_lora(targets, seed=0):
    torch.manual_seed(seed)
    model = prepare_encoder(Encoder(500, 16, [64, 32, 32]), FinetuneConfig(mode="lora", r=4, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B = 0 at init would hide a wrong A path
    return model


@pytest.fixture(params=["embedding_bag", "gene_major"])
def first_layer_kernel(request, monkeypatch):
    """Both CPU kernels of the frozen first layer: embedding_bag, and the gene-major product (which a batch takes
    once it touches more than GENE_MAJOR_MIN_GENES genes; 0 here, so these small batches take it too)."""
    from scimilarity_lora.model import sparse

    monkeypatch.setattr(sparse, "GENE_MAJOR_MIN_GENES", 0 if request.param == "gene_major" else 10**9)
    calls = []
    original = sparse.gene_major_product
    monkeypatch.setattr(sparse, "gene_major_product", lambda *a: calls.append(1) or original(*a))
    yield request.param, calls


@pytest.mark.parametrize("targets", TARGETS, ids=["+".join(t) for t in TARGETS])
@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
def test_sparse_equals_dense_outputs_and_gradients(targets, train_mode, first_layer_kernel):
    kernel, calls = first_layer_kernel
    dense_x, sparse_x = batch()
    assert isinstance(sparse_x, SparseBatch) and torch.equal(sparse_x.to_dense(), dense_x)
    model = perturbed_lora(targets)
    model.train(train_mode)
    if train_mode:  # dropout masks differ between paths; compare the deterministic parts of training mode
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    out_dense = model(dense_x)
    grads_dense = torch.autograd.grad(out_dense.pow(2).sum() + out_dense[:, 0].sum(),
                                      [p for p in model.parameters() if p.requires_grad])
    out_sparse = model(sparse_x)
    grads_sparse = torch.autograd.grad(out_sparse.pow(2).sum() + out_sparse[:, 0].sum(),
                                       [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(out_sparse, out_dense, atol=1e-5, rtol=1e-5)
    for gs, gd in zip(grads_sparse, grads_dense):
        torch.testing.assert_close(gs, gd, atol=1e-5, rtol=1e-4)
    assert bool(calls) == (kernel == "gene_major")  # the kernel under test is the one that ran


def test_full_finetuning_and_merged_models_take_the_sparse_path():
    dense_x, sparse_x = batch(seed=1)
    full = Encoder(500, 16, [64, 32]).eval()
    torch.testing.assert_close(full(sparse_x), full(dense_x), atol=1e-5, rtol=1e-5)
    merged = merged_encoder(perturbed_lora(("all",))).eval()
    torch.testing.assert_close(merged(sparse_x), merged(dense_x), atol=1e-5, rtol=1e-5)


def test_a_gene_major_first_layer_gives_the_same_answers_without_a_transposed_copy(first_layer_kernel):
    """Inference models store the first weight gene-major: the same outputs on both paths, the same state dict
    bytes, and embedding_bag reads the weight's own storage instead of a 28,231 x 1,024 copy beside it."""
    from scimilarity_lora.model.folder import state_dict_hash
    from scimilarity_lora.model.sparse import gene_rows

    dense_x, sparse_x = batch(seed=2)
    torch.manual_seed(0)
    model = Encoder(500, 16, [64, 32]).eval()
    before = (model(dense_x), model(sparse_x), state_dict_hash(model.state_dict()))
    weight = model.network[0][1].weight
    assert gene_rows(model.network[0][1], weight).data_ptr() != weight.data_ptr()  # stored hidden-major: a copy
    assert model.gene_major_first_layer() is model
    weight = model.network[0][1].weight
    assert weight.t().is_contiguous() and not weight.is_contiguous()
    assert gene_rows(model.network[0][1], weight).data_ptr() == weight.data_ptr()  # the weight itself
    torch.testing.assert_close(model(dense_x), before[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(sparse_x), before[1], atol=1e-6, rtol=1e-6)
    assert state_dict_hash(model.state_dict()) == before[2]
    model.gene_major_first_layer()  # idempotent: no second relayout
    assert model.network[0][1].weight.data_ptr() == weight.data_ptr()


def test_density_rule():
    assert choose(synthetic_counts(100, 1000, density=0.03)) and not choose(synthetic_counts(100, 1000, density=0.3))


def test_predictor_streams_sparse_batches_and_matches_dense(real_gene_order, pbmc):
    """annotate/predict on a full-size model never densifies a batch, and gives the dense path's answer."""
    from helpers import make_predictor

    torch.manual_seed(0)
    predictor = make_predictor(real_gene_order)
    X, genes = pbmc.raw.X[:200], list(pbmc.raw.var_names)
    alignment = predictor.alignment(genes)
    assert isinstance(predictor.featurize(X, alignment, True, output="auto"), SparseBatch)  # ~1% of 28,231 genes
    probs, emb = predictor.predict(X, genes, input_is_log1p=True, batch_size=64)
    dense_probs, dense_emb = predictor.forward(predictor.featurize(X, alignment, True))
    np.testing.assert_allclose(probs, dense_probs.numpy(), atol=1e-5)
    np.testing.assert_allclose(emb, dense_emb.numpy(), atol=1e-5)


@pytest.mark.parametrize("variant", ["use_dora"])
def test_a_lora_variant_is_refused_on_the_sparse_path_not_computed_wrongly(variant):
    """DoRA rescales by a weight norm plain LoRA lacks: the sparse layer must say so, and dense stays available."""
    from peft import LoraConfig, get_peft_model

    from scimilarity_lora.model.sparse import UnsupportedAdapterError

    dense_x, sparse_x = batch(seed=2)
    model = get_peft_model(Encoder(500, 16, [64]), LoraConfig(r=4, target_modules=["network.0.1"], **{variant: True}))
    model.eval()
    assert torch.isfinite(model(dense_x)).all()
    with pytest.raises(UnsupportedAdapterError, match="LoRA variant .* data.input_format=dense"):
        model(sparse_x)
