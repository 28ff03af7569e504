"""Pretraining streamed from the CELLxGENE Census: the training data module's stream (tiledbsoma-ml, shuffled by
epoch, sharded across DDP ranks, resumable), with what pretraining also needs: each label's Cell Ontology id, so
triplet mining can respect the ontology.

Every streamed cell is labelled (the Census annotates every cell), so batches are shuffled, not class-balanced:
common types supply positives in every batch, and rare types fewer. For class-balanced batches or unlabelled cells,
read a slice into memory instead (``data=pretrain_census``).
"""

from __future__ import annotations

from scimilarity_lora.data.census import CensusDataModule


class CensusPretrainDataModule(CensusDataModule):
    """``data=pretrain_census_stream``: a Census slice streamed for pretraining (no holdout: hold cells out with the
    filter, e.g. by dataset)."""

    holdout = None
