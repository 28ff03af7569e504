"""Cell Ontology relations between class labels, offline, from the ontology ``cellxgene-ontology-guide`` ships.

Labels of different studies meet here: "Naive CD4 T" in one study and "CD4+/CD45RA+/CD25- Naive T" in another are
both ``CL:0000895``; "T cell" (``CL:0000084``) is their ancestor. Three uses:

- pretraining never uses a cell as the negative for a cell whose type is its own type's ancestor or descendant;
- a trained model records each class's CL id, and the *coarse terms* it may answer when it hesitates between
  classes (see :func:`coarse_terms`; applied at inference without this module, so serving never loads the ontology);
- evaluation on another study's labels matches them through the ontology (:mod:`~.evaluation.label_matching`).

Labels map to CL ids through the data's ontology column (e.g. Census' ``cell_type_ontology_term_id``) or an explicit
mapping: a dict, or a CSV with columns ``label,cl_id`` (``packaged:<name>`` for the mappings in the package's
``resources/ontology/``, each with its provenance).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import pandas as pd

log = logging.getLogger(__name__)

PACKAGED_PREFIX = "packaged:"
#: terms too general to be an answer: they say "a cell", not what kind (the coarse-answer stop-list)
UNINFORMATIVE_TERMS = frozenset({
    "CL:0000000",  # cell
    "CL:0000003",  # native cell
    "CL:0000255",  # eukaryotic cell
    "CL:0000548",  # animal cell
    "CL:0002371",  # somatic cell
    "CL:0002242",  # nucleate cell
    "CL:0000226",  # single nucleate cell
    "CL:0000219",  # motile cell
    "CL:0000325",  # stuff accumulating cell
    "CL:0000234",  # phagocyte
    "CL:0000518",  # phagocyte (sensu Vertebrata)
    "CL:0011115",  # precursor cell
    "CL:0011026",  # progenitor cell
    "CL:0000393",  # electrically responsive cell
    "CL:0000211",  # electrically active cell
})


class OntologyError(ValueError):
    """A label mapping or CL id that cannot be used."""


@lru_cache(maxsize=1)
def _parser():
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    return OntologyParser()


def release() -> dict[str, str]:
    """Which Cell Ontology release the answers come from (recorded in every model directory)."""
    from importlib.metadata import version

    schema = _parser().cxg_schema
    return {"cl_version": str(schema.supported_ontologies.get("CL", {}).get("version")),
            "cellxgene_schema": str(schema.version), "cellxgene_ontology_guide": version("cellxgene-ontology-guide")}


@lru_cache(maxsize=4096)
def ancestors(term_id: str) -> frozenset[str]:
    """Strict ancestors (is_a and part_of) of a term."""
    return frozenset(_parser().get_term_ancestors(term_id))


def is_ancestor_or_self(a: str, b: str) -> bool:
    """Is term ``a`` the term ``b`` or one of its ancestors (``b`` is at least as specific)?"""
    return a == b or a in ancestors(b)


def term_label(term_id: str) -> str:
    return _parser().get_term_label(term_id)


def validate_term(term_id: str, where: str) -> str:
    term_id = str(term_id).strip()
    if not term_id.startswith("CL:") or not _parser().is_valid_term_id(term_id):
        raise OntologyError(f"{where}: {term_id!r} is not a Cell Ontology id this ontology release knows "
                            f"(CL {release()['cl_version']}); ids look like CL:0000084")
    return term_id


def relation(class_terms: Mapping[str, str | None]) -> Callable[[str, str], bool]:
    """``related(a, b)``: is class a's CL term an ancestor of class b's? Classes without a term relate to nothing
    (they are still never their own negative)."""
    missing = sorted(c for c, t in class_terms.items() if not t)
    if missing:
        log.warning("no Cell Ontology term for classes %s: any other class may be their negative", missing)

    def related(a: str, b: str) -> bool:
        ta, tb = class_terms.get(a), class_terms.get(b)
        return bool(ta and tb and ta != tb and ta in ancestors(tb))

    return related


def read_label_map(source: str | Path | Mapping[str, str] | None,
                   columns: Sequence[tuple[str, str]] = (("label", "cl_id"),)) -> dict[str, str]:
    """A label -> value mapping from a dict, a CSV with one of the ``columns`` pairs (the first present wins), or
    ``packaged:<name>``. Values may be empty (kept as ""), which callers give a meaning to."""
    if source is None or (isinstance(source, str) and not source.strip()):
        return {}
    if isinstance(source, Mapping):
        return {str(k): "" if v is None else str(v).strip() for k, v in source.items()}
    text = str(source)
    if text.startswith(PACKAGED_PREFIX):
        name = text[len(PACKAGED_PREFIX):]
        path = resources.files("scimilarity_lora") / "resources" / "ontology" / f"{name}.csv"
        if not path.is_file():
            available = sorted(p.name[:-4] for p in (resources.files("scimilarity_lora") / "resources" / "ontology")
                               .iterdir() if p.name.endswith(".csv"))
            raise OntologyError(f"no packaged label mapping {name!r}; packaged: {available}")
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise OntologyError(f"label mapping {path} not found")
    with path.open() as fh:
        table = pd.read_csv(fh, dtype=str, keep_default_na=False)
    pair = next((c for c in columns if set(c) <= set(table.columns)), None)
    if pair is None:
        raise OntologyError(f"label mapping {text}: needs columns {' or '.join(','.join(c) for c in columns)}; "
                            f"it has {list(table.columns)}")
    keys = table[pair[0]].str.strip()
    if keys.duplicated().any():
        raise OntologyError(f"label mapping {text}: labels listed twice: {sorted(set(keys[keys.duplicated()]))}")
    return dict(zip(keys, table[pair[1]].str.strip()))


def observed_terms(labels: Iterable, terms: Iterable) -> dict[str, str]:
    """The most common CL id per label in the data's own ontology column."""
    pairs = pd.DataFrame({"l": pd.Series(list(labels), dtype="string"), "t": pd.Series(list(terms), dtype="string")})
    pairs = pairs.dropna()
    pairs = pairs[pairs["t"].str.startswith("CL:")]
    return pairs.groupby("l")["t"].agg(lambda s: s.mode()[0]).to_dict() if len(pairs) else {}


def class_terms_from(classes: Sequence[str], mapping: Mapping[str, str] | None = None,
                     observed: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """CL id per class: an explicit ``mapping`` wins, then the data's own ontology column (``observed``)."""
    mapping, observed = dict(mapping or {}), dict(observed or {})
    out = {}
    for c in classes:
        term = mapping.get(c) or observed.get(c)
        out[c] = validate_term(term, f"CL id of class {c!r}") if term else None
    return out


def coarse_terms(class_terms: Mapping[str, str | None], classes: Sequence[str]) -> list[dict]:
    """The answers coarser than a class that a model may give: every CL term that is an ancestor (or the term) of
    at least two classes but not of all of them (an ancestor of every class says no more than "one of the model's
    classes"), minus :data:`UNINFORMATIVE_TERMS`. Of terms over the same classes ("T cell", "alpha-beta T cell",
    "mature T cell"), only the most general is kept: the classes justify no more, and it is the name a biologist
    uses. Each: ``{"id", "label", "classes": [class indices]}``, most specific first (fewest classes)."""
    terms = {i: class_terms.get(c) for i, c in enumerate(classes) if class_terms.get(c)}
    under: dict[str, set[int]] = {}
    for i, t in terms.items():
        for a in {t} | ancestors(t):
            under.setdefault(a, set()).add(i)
    by_set: dict[tuple[int, ...], str] = {}
    for a, idx in sorted(under.items(), key=lambda kv: (len(ancestors(kv[0])), kv[0])):
        if 2 <= len(idx) < len(classes) and a not in UNINFORMATIVE_TERMS:
            by_set.setdefault(tuple(sorted(idx)), a)  # the first seen has the fewest ancestors: the most general
    out = [{"id": a, "label": term_label(a), "classes": list(idx)} for idx, a in by_set.items()]
    return sorted(out, key=lambda d: (len(d["classes"]), d["id"]))


def ontology_record(class_terms: Mapping[str, str | None], classes: Sequence[str]) -> dict:
    """What a model directory records: class -> CL id (null when unmapped), the coarse terms, the release."""
    mapped = {c: class_terms.get(c) for c in classes}
    return {"class_terms": mapped, "class_term_labels": {c: term_label(t) for c, t in mapped.items() if t},
            "unmapped_classes": [c for c, t in mapped.items() if not t],
            "coarse_terms": coarse_terms(mapped, classes), "release": release()}
