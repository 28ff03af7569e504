"""Request bodies of the JSON endpoints (pydantic): the OpenAPI schema BentoML publishes comes from these.

Strict by decision: a value is a JSON number (not "1.5", not true), non-negative and within float32's range (the
encoder's precision); indices are JSON integers within the request's own limits. Duplicate JSON keys are refused
before parsing (:mod:`.middleware`); duplicate (cell, gene) entries in a sparse block are refused (:mod:`.parsing`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from scimilarity_lora.serving.settings import SETTINGS

#: the largest value a float32 input can hold; larger ones would overflow to infinity
FLOAT32_MAX = 3.4028234663852886e38
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=FLOAT32_MAX)]
Index = Annotated[int, Field(strict=True, ge=0)]
Values = Literal["counts", "log1p"]
GeneName = Annotated[str, Field(min_length=1, max_length=200)]
Expression = Annotated[dict[GeneName, Finite], Field(min_length=1, max_length=SETTINGS.max_genes)]
TopK = Annotated[int, Field(strict=True, ge=1, le=100)]
ForceLabel = Annotated[bool, Field(strict=True, description='true: always name a cell type; false (default): answer '
                                   '"unknown" for a cell the model is not confident about or has never seen the like of')]


Method = Literal["head", "knn"]
MethodField = Field("head", description='"head": the classification head; "knn": the distance-weighted vote of the '
                    'nearest cells of the model\'s reference index (SCIMILARITY_LORA_REFERENCE; 404 without one)')
Neighbours = Annotated[int, Field(strict=True, ge=1, le=100, description="nearest reference cells to use or return")]
ModelName = Annotated[str, Field(min_length=1, max_length=200, description="which served model answers (GET "
                                  "/v1/models lists them); omitted: the default model")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CellRequest(_Strict):
    expression: Expression = Field(description="gene symbol -> expression value for one cell")
    values: Values = Field("counts", description="'counts' (raw UMI counts) or 'log1p' (log1p(normalize_total))")
    top_k: TopK = Field(3, description="how many ranked cell types to return")
    force_label: ForceLabel = False
    model: ModelName = None  # type: ignore[assignment]  # omitted: the default model; an explicit null is refused
    method: Method = MethodField
    k: Neighbours = 15


class BatchCell(_Strict):
    expression: Expression


class SparseCells(_Strict):
    """CSR-like: cell i has values data[indptr[i]:indptr[i+1]] for genes[indices[...]]."""

    genes: Annotated[list[GeneName], Field(min_length=1, max_length=SETTINGS.max_genes)]
    indptr: Annotated[list[Annotated[Index, Field(le=SETTINGS.max_nnz)]],
                      Field(min_length=2, max_length=SETTINGS.max_cells + 1)]
    indices: Annotated[list[Annotated[Index, Field(le=SETTINGS.max_genes)]], Field(max_length=SETTINGS.max_nnz)]
    data: Annotated[list[Finite], Field(max_length=SETTINGS.max_nnz)]


class BatchRequest(_Strict):
    cells: Annotated[list[BatchCell], Field(min_length=1, max_length=SETTINGS.max_cells)] | None = None
    sparse: SparseCells | None = None
    values: Values = "counts"
    top_k: TopK = 3
    force_label: ForceLabel = False
    model: ModelName = None  # type: ignore[assignment]  # omitted: the default model; an explicit null is refused
    method: Method = MethodField
    k: Neighbours = 15


class SearchRequest(_Strict):
    """POST /v1/search: the reference cells nearest to one cell, in the embedding of the model that names them."""

    expression: Expression = Field(description="gene symbol -> expression value for one cell")
    values: Values = "counts"
    k: Neighbours = 5
    model: ModelName = None  # type: ignore[assignment]


class SearchBatchRequest(_Strict):
    """POST /v1/search_batch: the same for many cells (a list of expression dicts, or one sparse block)."""

    cells: Annotated[list[BatchCell], Field(min_length=1, max_length=SETTINGS.max_cells)] | None = None
    sparse: SparseCells | None = None
    values: Values = "counts"
    k: Neighbours = 5
    model: ModelName = None  # type: ignore[assignment]


class EmbedRequest(_Strict):
    expression: Expression
    values: Values = "counts"
    model: ModelName = None  # type: ignore[assignment]  # omitted: the default model; an explicit null is refused


# -- answers (documented in the OpenAPI schema; see .openapi) ------------------------------------------------------
class RankedType(BaseModel):
    cell_type: str
    probability: float


class Prediction(BaseModel):
    cell_type: str = Field(description='the cell type; with status "coarse" the Cell Ontology ancestor of the '
                                       'classes the model hesitates between (e.g. "T cell"); "unknown" for '
                                       'low_confidence and novel (unless force_label)')
    cell_type_ontology_term_id: str | None = Field(
        None, description="the Cell Ontology id of cell_type; absent for unknown, or a class without one")
    status: Literal["ok", "coarse", "low_confidence", "novel"] = Field(
        description="ok; coarse: the best class is under the confidence threshold but the classes under one Cell "
                    "Ontology term together pass it; low_confidence: calibrated confidence below the model's "
                    "threshold; novel: the embedding is farther from every training class than validation cells are")
    best_guess: str = Field(description="the most probable cell type, whatever the status")
    confidence: float = Field(ge=0, le=1, description="calibrated probability of best_guess")
    top_k: list[RankedType]
    genes_used: int = Field(ge=0, description="request genes that feed the model")
    nearest_distance: float | None = Field(None, ge=0, description='method "knn": cosine distance to the nearest '
                                           'reference cell (status "novel" beyond the index\'s calibrated threshold)')


class PredictResponse(Prediction):
    genes_unknown: list[str] = Field(description="request genes the model does not know (first 100)")
    n_genes_unknown: int = Field(ge=0)
    values: Values


class BatchResponse(BaseModel):
    predictions: list[Prediction]
    n_cells: int = Field(ge=1)


class EmbedResponse(BaseModel):
    embedding: list[float] = Field(description="the L2-normalised embedding of the fine-tuned encoder")
    dim: int
    genes_used: int = Field(ge=0)


class Neighbor(BaseModel):
    model_config = ConfigDict(extra="allow")  # plus the obs columns the index keeps (donor_id, dataset_id, ...)

    cell_id: str
    distance: float = Field(ge=0, description="cosine distance (1 - cosine similarity), nearest first")
    label: str = Field(description="the reference cell's label")


class SearchResponse(BaseModel):
    neighbors: list[Neighbor]
    genes_used: int = Field(ge=0)


class SearchBatchResponse(BaseModel):
    neighbors: list[list[Neighbor]] = Field(description="per cell, its nearest reference cells")
    n_cells: int = Field(ge=1)


class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong with the request, naming the field or cell")
    n_errors: int | None = Field(None, description="validation errors: how many there were")
    detail: list[dict] | None = Field(None, description="validation errors: the first 10 (type, loc, msg)")
