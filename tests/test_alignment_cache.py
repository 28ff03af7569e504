"""The gene-alignment cache: bounded by bytes (clients choose its keys), shared, safe under concurrent lookups."""

from concurrent.futures import ThreadPoolExecutor

from scimilarity_lora.genes import align_genes
from scimilarity_lora.inference.alignment_cache import AlignmentCache, alignment_bytes

MODEL = [f"G{i}" for i in range(2000)]


def _key(i, n=4000, width=200):
    genes = tuple([f"G{j}" for j in range(50)] + [f"{i:06d}" + "x" * (width - 6) + f"{j}" for j in range(n)])
    return (genes, None, 1)


def _build(key):
    return lambda: align_genes(list(key[0]), MODEL, min_overlap=1)


def test_the_cache_stays_within_its_byte_bound_and_keeps_recent_lists():
    cache = AlignmentCache(max_bytes=8 * 1024 * 1024)
    one = alignment_bytes(_key(0), _build(_key(0))())
    assert one > 800_000  # a 4,000-gene list of 200-character names: about a megabyte
    for i in range(40):  # 40 such lists: ~40 MB unbounded
        cache.get(_key(i), _build(_key(i)))
        assert cache.nbytes <= cache.max_bytes
    assert 0 < len(cache) < 40 and cache.nbytes >= cache.max_bytes - 2 * one
    calls = []
    cache.get(_key(39), lambda: calls.append(1))  # the most recent is still cached: not rebuilt
    assert calls == []


def test_an_entry_larger_than_the_bound_is_returned_but_not_kept():
    cache = AlignmentCache(max_bytes=10_000)
    assert cache.get(_key(1), _build(_key(1))).n_overlap == 50
    assert len(cache) == 0 and cache.nbytes == 0


def test_concurrent_lookups_and_evictions_do_not_race():
    cache = AlignmentCache(max_bytes=3 * 1024 * 1024)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: cache.get(_key(i % 12, n=1000), _build(_key(i % 12, n=1000))).n_overlap,
                                range(400)))
    assert results == [50] * 400 and cache.nbytes <= cache.max_bytes
    assert cache.nbytes == sum(size for _, size in cache._entries.values())


def test_adapters_of_one_base_share_one_cache():
    from helpers import make_predictor
    from scimilarity_lora.inference.predictor import CellTypePredictor

    shared = AlignmentCache()
    a = make_predictor(MODEL)
    b = CellTypePredictor(a.classifier, a.spec, alignments=shared)
    c = CellTypePredictor(a.classifier, a.spec, alignments=shared)
    assert b.alignment(MODEL[:100]) is c.alignment(MODEL[:100]) and len(shared) == 1
