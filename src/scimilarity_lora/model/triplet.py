"""SCimilarity's metric-learning objective, in torch: triplets mined in the batch, a triplet loss on the cosine
distance between L2-normalised embeddings, mixed with the decoder's reconstruction error.

Mining follows ``scimilarity.triplet_selector.TripletSelector`` (0.4.1): every anchor-positive pair of a labelled
class, and for each pair one negative chosen among cells of *allowed* classes: never the anchor's own class, and
never a class that is the anchor's ancestor or descendant in the Cell Ontology (a "T cell" is no negative for a
"CD8+ T cell"); that relation arrives as a class x class ``allowed_negative`` mask (see
:func:`negatives_from_relations`). Selection: ``semihard`` (0 < loss < margin), ``hardest`` (largest positive loss)
or ``random`` (any positive loss). Unlabelled cells (label -1) take part in reconstruction only.

``distance``: ``cosine`` (the default: ``1 - cos`` between L2-normalised embeddings, as SCimilarity's paper
describes the objective) or ``euclidean``, what SCimilarity 0.4.1's code computes: negatives mined on the
*squared* Euclidean distance between the encoder's (unit-norm) outputs, ``2 * (1 - cos)``, and the loss
``F.triplet_margin_loss(p=2)`` on the Euclidean distance ``sqrt(2 * (1 - cos))``. The margin means different
things under the two, so the same 0.05 gives different objectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

SELECTIONS = ("semihard", "hardest", "random")
DISTANCES = ("cosine", "euclidean")


@dataclass
class Triplets:
    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    n_hard: int     # (pair, negative) combinations with a positive loss
    n_viable: int   # (pair, negative) combinations considered

    def __len__(self) -> int:
        return int(self.anchor.numel())


def negatives_from_relations(classes: Sequence[str], related: Callable[[str, str], bool]) -> torch.Tensor:
    """``allowed[i, j]``: may a cell of class j be the negative for an anchor of class i? Not itself, and not a class
    ``related`` to it (e.g. an ancestor or descendant in the Cell Ontology)."""
    n = len(classes)
    allowed = torch.ones(n, n, dtype=torch.bool)
    for i, a in enumerate(classes):
        for j, b in enumerate(classes):
            if i == j or related(a, b) or related(b, a):
                allowed[i, j] = False
    return allowed


def cosine_distances(z: torch.Tensor) -> torch.Tensor:
    z = F.normalize(z, dim=1)
    return 1.0 - z @ z.T


def mining_distances(z: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Pairwise distances negatives are mined on: cosine, or SCimilarity 0.4.1's squared Euclidean (``pdist``)."""
    if distance == "cosine":
        return cosine_distances(z)
    if distance == "euclidean":
        sq = (z * z).sum(dim=1)
        return sq.unsqueeze(0) + sq.unsqueeze(1) - 2.0 * z @ z.T
    raise ValueError(f"triplet distance must be one of {DISTANCES}, got {distance!r}")


@torch.no_grad()
def mine_triplets(z: torch.Tensor, labels: torch.Tensor, allowed_negative: torch.Tensor, margin: float = 0.05,
                  selection: str = "semihard", generator: torch.Generator | None = None,
                  distance: str = "cosine") -> Triplets:
    if selection not in SELECTIONS:
        raise ValueError(f"negative selection must be one of {SELECTIONS}, got {selection!r}")
    d = mining_distances(z.detach().float(), distance)
    labels = labels.to(d.device)
    allowed_negative = allowed_negative.to(d.device)
    labelled = labels >= 0
    picked: list[torch.Tensor] = []
    n_hard = n_viable = 0
    for c in torch.unique(labels[labelled]).tolist():
        members = torch.nonzero(labels == c).flatten()
        if members.numel() < 2:
            continue
        candidates = torch.nonzero(labelled & allowed_negative[c, labels.clamp(min=0)]).flatten()
        if candidates.numel() == 0:
            continue
        pairs = torch.combinations(members, 2)
        loss = d[pairs[:, 0], pairs[:, 1]].unsqueeze(1) - d[pairs[:, 0]][:, candidates] + margin
        n_hard += int((loss > 0).sum())
        n_viable += loss.numel()
        if selection == "semihard":
            ok = (loss > 0) & (loss < margin)
        else:
            ok = loss > 0
        if selection == "hardest":
            score = torch.where(ok, loss, torch.full_like(loss, -torch.inf))
        else:  # a uniformly random candidate among the eligible ones
            score = torch.where(ok, torch.rand(loss.shape, generator=generator, device=loss.device),
                                torch.full_like(loss, -1.0))
        has = ok.any(dim=1)
        if has.any():
            chosen = candidates[score[has].argmax(dim=1)]
            picked.append(torch.stack([pairs[has, 0], pairs[has, 1], chosen], dim=1))
    if not picked:
        empty = torch.empty(0, dtype=torch.long, device=d.device)
        return Triplets(empty, empty, empty, n_hard, n_viable)
    t = torch.cat(picked)
    return Triplets(t[:, 0], t[:, 1], t[:, 2], n_hard, n_viable)


def triplet_loss(z: torch.Tensor, triplets: Triplets, margin: float = 0.05, distance: str = "cosine") -> torch.Tensor:
    """Mean ``max(0, d(a, p) - d(a, n) + margin)`` over the mined triplets (0 if none); d the cosine distance, or
    with ``euclidean`` exactly SCimilarity 0.4.1's ``F.triplet_margin_loss(p=2)``."""
    if len(triplets) == 0:
        return z.sum() * 0.0  # keeps the graph (and DDP) intact
    if distance == "euclidean":
        return F.triplet_margin_loss(z[triplets.anchor], z[triplets.positive], z[triplets.negative], margin=margin,
                                     p=2, reduction="none").mean()
    z = F.normalize(z, dim=1)
    d_ap = 1.0 - (z[triplets.anchor] * z[triplets.positive]).sum(dim=1)
    d_an = 1.0 - (z[triplets.anchor] * z[triplets.negative]).sum(dim=1)
    return F.relu(d_ap - d_an + margin).mean()


def mixed_loss(triplet: torch.Tensor, reconstruction: torch.Tensor, triplet_weight: float = 0.001) -> torch.Tensor:
    """SCimilarity's ``MetricLearning`` mix: ``w * triplet + (1 - w) * mse``."""
    return triplet_weight * triplet + (1.0 - triplet_weight) * reconstruction
