"""Pretraining streamed from the CELLxGENE Census: the training data module's stream (tiledbsoma-ml, shuffled by
epoch, sharded across DDP ranks, resumable), with what pretraining also needs: each label's Cell Ontology id, so
triplet mining can respect the ontology.

Every streamed cell is labelled (the Census annotates every cell), so batches are shuffled, not class-balanced:
common types supply positives in every batch, and rare types fewer. For class-balanced batches or unlabelled cells,
read a slice into memory instead (``data=pretrain_census``).
"""

from __future__ import annotations

import pandas as pd

from scimilarity_lora.data.census import CensusDataModule


class CensusPretrainDataModule(CensusDataModule):
    """``data=pretrain_census_stream``: a Census slice streamed for pretraining (no holdout: hold cells out with the
    filter, e.g. by dataset)."""

    holdout = None

    def __init__(self, *args, ontology_key: str = "cell_type_ontology_term_id", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ontology_key = ontology_key
        self.observed_terms: dict[str, str] = {}

    def _obs_columns(self, names: set[str]) -> list[str]:
        extra = [self.ontology_key] if self.ontology_key and self.ontology_key in names else []
        return super()._obs_columns(names) + extra

    def _obs(self, exp) -> pd.DataFrame:
        obs = super()._obs(exp)
        if self.ontology_key in obs.columns:  # read with the labels, in the same pass over obs
            self.observed_terms = (obs.groupby(self.label_key)[self.ontology_key]
                                   .agg(lambda s: s.mode()[0]).astype(str).to_dict())
        return obs

    def class_terms(self) -> dict[str, str | None]:
        from scimilarity_lora.data.ontology import class_terms_from

        return class_terms_from(self.labels.classes, None, self.observed_terms)
