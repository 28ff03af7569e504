"""How another study's labels meet a model's classes: exactly by name, through a written map, or through the Cell
Ontology. Every query label gets one :class:`LabelMatch`, none is silently dropped:

- ``exact``: the label is a class name;
- ``mapped``: ``query.label_map`` names a class for it;
- ``ontology``: its CL id (from the query's ontology column, or a CL id in the map) is a class's CL id, or, when
  the model only has coarser classes, the most specific class whose CL id is its ancestor ("CD14-positive
  monocyte" -> the class "monocyte");
- ``ancestor``: its CL id is an ancestor of one or more classes' ids ("T cell" over CD4 and CD8 classes): no single
  class is right, but a prediction under it is, in ontology-aware accuracy;
- ``novel``: the map gives it no class (an empty ``model_label``), or its CL id relates to no class: a type the
  model cannot know, counted toward rejection, not accuracy;
- ``unmapped``: no name match, no map entry, no CL id: listed in the report so the user can write the map.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

from scimilarity_lora.data.ontology import ancestors, is_ancestor_or_self, validate_term

KINDS = ("exact", "mapped", "ontology", "ancestor", "novel", "unmapped")
#: kinds whose cells have one right class (top-level accuracy and macro-F1)
MATCHED = ("exact", "mapped", "ontology")


@dataclass
class LabelMatch:
    label: str
    kind: str
    #: the model class that is right (exact, mapped, ontology)
    target: str | None = None
    #: the label's CL id, when known (the query's own, the map's, or the target class's)
    term: str | None = None
    #: classes under the label (ancestor)
    covers: list[str] = field(default_factory=list)
    n_cells: int = 0

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, [])}


def match_labels(label_counts: Mapping[str, int], classes: Sequence[str], class_terms: Mapping[str, str | None],
                 label_map: Mapping[str, str] | None = None, query_terms: Mapping[str, str] | None = None
                 ) -> dict[str, LabelMatch]:
    """One match per query label (see the module docstring). ``label_map``: query label -> a class name, a CL id,
    or "" (a type the model should not know). ``query_terms``: query label -> its CL id (the query's column)."""
    label_map, query_terms = dict(label_map or {}), dict(query_terms or {})
    classes = list(classes)
    unknown_keys = sorted(set(label_map) - set(label_counts))
    if unknown_keys and len(unknown_keys) == len(label_map):
        raise ValueError(f"query.label_map names none of the query's labels (it has {unknown_keys[:5]}...; the "
                         f"query's labels: {sorted(label_counts)[:20]})")
    out = {}
    for label, n in label_counts.items():
        match = _match_one(str(label), classes, class_terms, label_map, query_terms)
        match.n_cells = int(n)
        out[str(label)] = match
    return out


def _match_one(label: str, classes: list[str], class_terms: Mapping[str, str | None], label_map: Mapping[str, str],
               query_terms: Mapping[str, str]) -> LabelMatch:
    if label in label_map:
        value = label_map[label]
        if value == "":
            return LabelMatch(label, "novel")
        if value in classes:
            return LabelMatch(label, "mapped", target=value, term=class_terms.get(value))
        if value.startswith("CL:"):
            return _through_ontology(label, validate_term(value, f"query.label_map entry {label!r}"), classes,
                                     class_terms)
        raise ValueError(f"query.label_map maps {label!r} to {value!r}, which is neither a model class nor a CL id; "
                         f"the model's classes: {classes}")
    if label in classes:
        return LabelMatch(label, "exact", target=label, term=class_terms.get(label))
    if query_terms.get(label):
        return _through_ontology(label, query_terms[label], classes, class_terms)
    return LabelMatch(label, "unmapped")


def _through_ontology(label: str, term: str, classes: list[str], class_terms: Mapping[str, str | None]) -> LabelMatch:
    mapped = {c: t for c, t in class_terms.items() if t and c in classes}
    same = [c for c, t in mapped.items() if t == term]
    if len(same) == 1:
        return LabelMatch(label, "ontology", target=same[0], term=term)
    below = [c for c, t in mapped.items() if t != term and term in ancestors(t)]
    if same or below:
        return LabelMatch(label, "ancestor", term=term, covers=sorted(same + below))
    above = [c for c, t in mapped.items() if t in ancestors(term)]
    if above:  # the most specific class over the label: its term is a descendant of every other one's
        best = max(above, key=lambda c: len(ancestors(mapped[c])))
        return LabelMatch(label, "ontology", target=best, term=term)
    return LabelMatch(label, "novel", term=term)


def ontology_correct(match: LabelMatch, predicted: str, class_terms: Mapping[str, str | None]) -> bool:
    """Right at the level the two labels share: the predicted class is the target, or the label's CL id is the
    predicted class's id or an ancestor of it (a "T cell" predicted as CD8 T is right)."""
    if match.target is not None and predicted == match.target:
        return True
    p = class_terms.get(predicted)
    return bool(match.term and p and is_ancestor_or_self(match.term, p))


def coarse_correct(match: LabelMatch, coarse_term: str) -> bool:
    """A coarse answer is right when it is the label's CL id or one of its ancestors (honest, if less specific)."""
    return bool(match.term and is_ancestor_or_self(coarse_term, match.term))
