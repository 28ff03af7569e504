"""Cell Ontology relations between class labels, offline, from the ontology ``cellxgene-ontology-guide`` ships.

Pretraining never uses a cell as the negative for a cell whose type is its own type's ancestor or descendant: a
"T cell" and a "CD8-positive, alpha-beta T cell" are not different types. Labels map to CL ids through the data's
``cell_type_ontology_term_id`` column or an explicit mapping in the config.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Callable, Mapping, Sequence

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _parser():
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    return OntologyParser()


@lru_cache(maxsize=4096)
def ancestors(term_id: str) -> frozenset[str]:
    return frozenset(_parser().get_term_ancestors(term_id))


def term_label(term_id: str) -> str:
    return _parser().get_term_label(term_id)


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


def class_terms_from(classes: Sequence[str], mapping: Mapping[str, str] | None = None,
                     observed: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """CL id per class: an explicit ``mapping`` wins, then the data's own ontology column (``observed``)."""
    mapping, observed = dict(mapping or {}), dict(observed or {})
    out = {}
    for c in classes:
        term = mapping.get(c) or observed.get(c)
        if term:
            term_label(term)  # raises for an id the ontology does not know
        out[c] = term or None
    return out
