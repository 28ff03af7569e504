"""A reference index for any adapter (or its base): SCimilarity's kNN annotation and cell search.

    python -m scimilarity_lora.inference.reference build <run or model dir> <reference.h5ad | SOMA store> \
        --out <index dir> --label-key cell_type [--keep-obs donor_id,dataset_id] [--base] [--obs-filter "..."]

:mod:`.build` streams the reference through the encoder into an index directory (:mod:`.index`); :mod:`.encoder`
names the encoder, and an index refuses queries embedded by another one. ``annotate --reference``, ``evaluate
query.reference=`` and the service's ``/v1/search`` (``SCIMILARITY_LORA_REFERENCE``) open it.
"""

from scimilarity_lora.inference.reference.build import build_index
from scimilarity_lora.inference.reference.encoder import IndexMismatchError, ReferenceEncoder, encoder_identity
from scimilarity_lora.inference.reference.index import KnnResult, ReferenceIndex, ReferenceIndexError, exact_search, knn_vote

__all__ = ["build_index", "IndexMismatchError", "ReferenceEncoder", "encoder_identity", "KnnResult",
           "ReferenceIndex", "ReferenceIndexError", "exact_search", "knn_vote"]
