"""SCimilarity's pretraining pieces in torch: the decoder key for key, and ontology-aware triplet mining."""

import numpy as np
import pytest
import torch

from scimilarity_lora.model.decoder import Decoder
from scimilarity_lora.model.triplet import mine_triplets, mixed_loss, negatives_from_relations, triplet_loss
from test_encoder import real_scimilarity_nn_models


def test_decoder_matches_scimilaritys_own_key_for_key():
    nn_models = real_scimilarity_nn_models()
    torch.manual_seed(0)
    theirs = nn_models.Decoder(300, latent_dim=16, hidden_dim=[64, 32], dropout=0.5).eval()
    ours = Decoder.for_encoder(300, 16, [32, 64]).eval()  # the encoder's sizes, reversed
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    z = torch.randn(7, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(z), theirs(z))


CLASSES = ["T cell", "CD8+ T cell", "B cell", "monocyte"]
PARENT = {"CD8+ T cell": "T cell"}


def related(a, b):  # a is an ancestor of b
    return PARENT.get(b) == a


def test_an_ancestor_or_descendant_is_never_a_negative():
    allowed = negatives_from_relations(CLASSES, related)
    assert not allowed[0, 1] and not allowed[1, 0] and not allowed[2, 2] and allowed[1, 2] and allowed[0, 3]
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, -1, -1])
    z = torch.randn(10, 8)
    for selection in ("semihard", "hardest", "random"):
        t = mine_triplets(z, labels, allowed, margin=2.5, selection=selection)  # a large margin: every loss > 0
        assert len(t) > 0
        anchor_cls, neg_cls = labels[t.anchor], labels[t.negative]
        assert (labels[t.positive] == anchor_cls).all() and (neg_cls >= 0).all()  # unlabelled: never a triplet
        assert allowed[anchor_cls, neg_cls].all()
        assert not ((anchor_cls == 0) & (neg_cls == 1)).any() and not ((anchor_cls == 1) & (neg_cls == 0)).any()


def test_unlabelled_cells_make_no_triplet_terms():
    allowed = negatives_from_relations(CLASSES, related)
    z = torch.randn(6, 8, requires_grad=True)
    t = mine_triplets(z, torch.full((6,), -1), allowed, margin=1.0, selection="hardest")
    assert len(t) == 0 and t.n_viable == 0
    loss = triplet_loss(z, t)
    assert float(loss) == 0.0
    loss.backward()
    assert torch.count_nonzero(z.grad) == 0


def test_semihard_negatives_lie_inside_the_margin_and_hardest_is_the_largest_loss():
    allowed = negatives_from_relations(CLASSES, related)
    torch.manual_seed(1)
    labels = torch.tensor([2, 2, 2, 3, 3, 3, 0, 0])
    z = torch.randn(8, 4)
    d = 1 - torch.nn.functional.normalize(z) @ torch.nn.functional.normalize(z).T
    margin = 0.5
    semi = mine_triplets(z, labels, allowed, margin=margin, selection="semihard")
    loss = d[semi.anchor, semi.positive] - d[semi.anchor, semi.negative] + margin
    assert ((loss > 0) & (loss < margin)).all()
    hard = mine_triplets(z, labels, allowed, margin=margin, selection="hardest")
    for a, p, n in zip(hard.anchor, hard.positive, hard.negative):
        candidates = torch.nonzero(allowed[labels[a], labels.clamp(min=0)] & (labels >= 0)).flatten()
        best = (d[a, p] - d[a, candidates] + margin).max()
        assert torch.isclose(d[a, p] - d[a, n] + margin, best)
    assert float(triplet_loss(z, hard, margin)) == pytest.approx(
        float(torch.relu(d[hard.anchor, hard.positive] - d[hard.anchor, hard.negative] + margin).mean()), abs=1e-6)


def test_the_mix_is_scimilaritys():
    assert float(mixed_loss(torch.tensor(2.0), torch.tensor(1.0), 0.001)) == pytest.approx(0.001 * 2 + 0.999 * 1)


def test_training_on_the_objective_separates_classes():
    """A small encoder trained on the mixed objective pulls classes apart (the loss decreases)."""
    from scimilarity_lora.model.encoder import Encoder

    rng = np.random.default_rng(0)
    means = rng.gamma(1.0, 1.0, size=(3, 40)) * 3
    y = torch.as_tensor(rng.integers(0, 3, 192))
    x = torch.log1p(torch.as_tensor(rng.poisson(means[y.numpy()]), dtype=torch.float32))
    allowed = negatives_from_relations(["a", "b", "c"], lambda a, b: False)
    torch.manual_seed(0)
    enc, dec = Encoder(40, 8, [32], dropout=0.0, input_dropout=0.0), Decoder.for_encoder(40, 8, [32], dropout=0.0)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=3e-3)
    losses = []
    for _ in range(60):
        z = enc(x)
        t = mine_triplets(z, y, allowed, margin=0.05, selection="hardest")
        loss = mixed_loss(triplet_loss(z, t), torch.nn.functional.mse_loss(dec(z), x), triplet_weight=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_euclidean_distance_is_scimilarity_041s_triplet_margin_loss():
    """SCimilarity 0.4.1 mines on squared Euclidean distances of its unit-norm embeddings (TripletSelector.pdist)
    and takes F.triplet_margin_loss(p=2); objective.distance=euclidean is that, cosine is 1 - cos."""
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(12, 4), dim=1)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    allowed = negatives_from_relations(["a", "b", "c"], lambda a, b: False)
    from scimilarity_lora.model.triplet import mining_distances

    cos = mining_distances(z, "cosine")
    assert torch.allclose(mining_distances(z, "euclidean"), 2 * cos, atol=1e-6)  # unit vectors: |a-b|^2 = 2(1-cos)
    t = mine_triplets(z, labels, allowed, margin=5.0, selection="hardest", distance="euclidean")
    expected = torch.nn.functional.triplet_margin_loss(z[t.anchor], z[t.positive], z[t.negative], margin=5.0, p=2)
    assert float(triplet_loss(z, t, 5.0, "euclidean")) == pytest.approx(float(expected), rel=1e-6)
    d = torch.sqrt(2 * cos.clamp(min=0))
    by_hand = (d[t.anchor, t.positive] - d[t.anchor, t.negative] + 5.0).clamp(min=0).mean()
    assert float(triplet_loss(z, t, 5.0, "euclidean")) == pytest.approx(float(by_hand), abs=1e-4)
    with pytest.raises(ValueError, match="cosine"):
        mine_triplets(z, labels, allowed, distance="manhattan")


def test_the_scimilarity_041_objective_adds_its_l1_penalty(tmp_path):
    from scimilarity_lora.training.pretrain_module import PretrainModule

    config = {"n_genes": 6, "latent_dim": 3, "hidden_dim": [4], "dropout": 0.0, "input_dropout": 0.0}
    allowed = [[False, True], [True, False]]
    torch.manual_seed(0)
    plain = PretrainModule(config, ["a", "b"], allowed)
    torch.manual_seed(0)
    with_l1 = PretrainModule(config, ["a", "b"], allowed, l1=1e-4, distance="euclidean")
    batch = (torch.rand(8, 6), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    plain.train(), with_l1.train()
    first = with_l1.encoder.network[0][1]
    penalty = 1e-4 * (first.weight.abs().sum() + first.bias.abs().sum())  # lr 1.0 outside a Trainer
    out = with_l1.losses(batch)
    assert float(out["l1"]) == pytest.approx(float(penalty), rel=1e-6)
    assert float(out["loss"] - out["l1"]) == pytest.approx(
        float(mixed_loss(out["triplet"], out["mse"], 0.001)), rel=1e-6)
    assert "l1" not in plain.losses(batch)
