"""Many adapters over one base in one forward pass: each row equals its adapter's merged model (to 1e-5)."""

from pathlib import Path

import pytest
import torch

from helpers import compose_train
from scimilarity_lora.inference.multi import read_adapter
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.inference.runs import load_recorded_base
from scimilarity_lora.model.multi_adapter import AdapterError, MultiAdapterClassifier
from scimilarity_lora.training.run import run

RUNS = {  # two label sets and three kinds of model over the packaged pretrained base
    "bulk_r4_all": ["finetune=lora", "lora.r=4", "data.label_key=bulk_labels"],
    "louvain_r8_input": ["finetune=lora", "lora.r=8", "lora.target_modules=input", "data.label_key=louvain"],
    "bulk_frozen": ["finetune=frozen", "data.label_key=bulk_labels"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, overrides in RUNS.items():
        d = tmp_path_factory.mktemp(name)
        run(compose_train(overrides + ["trainer.max_epochs=2", "trainer.enable_progress_bar=false"], d))
        out[name] = d
    return out


def test_a_mixed_batch_equals_each_adapters_merged_model(runs, pbmc):
    predictors = {n: CellTypePredictor.load(d / "model") for n, d in runs.items()}
    spec = predictors["bulk_r4_all"].spec
    base = load_recorded_base(runs["bulk_r4_all"], spec.base, spec.genes)
    multi = MultiAdapterClassifier(base)
    for name, d in runs.items():
        adapter, _ = read_adapter(d / "model", name, base_sha256=spec.base["sha256"], base_genes=spec.genes)
        multi.add(adapter)
    assert len(multi.adapters["louvain_r8_input"].updates) == 1 and multi.adapters["bulk_frozen"].updates == {}
    x = predictors["bulk_r4_all"].featurize(pbmc.raw.X[:90], predictors["bulk_r4_all"].alignment(
        list(pbmc.raw.var_names)), input_is_log1p=True)
    names = [list(RUNS)[i % 3] for i in range(90)]
    z, out = multi(x, names)
    for name, (rows, logits) in out.items():
        want_logits, want_z = predictors[name].logits(x[rows])
        assert logits.shape[1] == len(predictors[name].classes)
        assert torch.allclose(logits, want_logits, atol=1e-5), name
        assert torch.allclose(z[rows], want_z, atol=1e-5), name
    # the adapters do differ: the same cells through another adapter give other embeddings
    rows = out["bulk_r4_all"][0]
    z_other, _ = multi(x[rows], ["louvain_r8_input"] * len(rows))
    assert not torch.allclose(z_other, z[rows], atol=1e-3)


def test_unknown_names_and_foreign_adapters_are_refused(runs):
    spec = CellTypePredictor.load(runs["bulk_r4_all"] / "model").spec
    base = load_recorded_base(runs["bulk_r4_all"], spec.base, spec.genes)
    multi = MultiAdapterClassifier(base)
    adapter, _ = read_adapter(runs["bulk_r4_all"] / "model", "a", base_sha256=spec.base["sha256"],
                              base_genes=spec.genes)
    multi.add(adapter)
    with pytest.raises(KeyError, match="unknown adapters \\['b'\\]; served: \\['a'\\]"):
        multi(torch.zeros(2, len(spec.genes)), ["a", "b"])
    with pytest.raises(AdapterError, match="not on the served base"):
        read_adapter(runs["bulk_r4_all"] / "model", "x", base_sha256="0" * 64)
    assert multi.remove("a").name == "a" and multi.adapters == {}


def test_export_stores_the_base_once_and_each_adapter_as_a_small_model(runs, tmp_path, monkeypatch):
    """Two adapters of one base: the BentoML store holds the base once and two adapter models that name it; an
    adapter read back from the store serves like the run it came from."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "true")
    import bentoml

    from scimilarity_lora.serving.export import export_adapter, export_to_bentoml

    tags = [export_adapter(runs[n], n) for n in ("bulk_r4_all", "louvain_r8_input")]
    assert len({base for _, base in tags}) == 1  # one base for both
    models = {m.tag.name: m for m in bentoml.models.list()}
    assert set(models) == {"scimilarity_base", "bulk_r4_all", "louvain_r8_input"}
    base_size = sum(f.stat().st_size for f in Path(models["scimilarity_base"].path).iterdir())
    adapter_size = sum(f.stat().st_size for f in Path(models["bulk_r4_all"].path).rglob("*") if f.is_file())
    assert base_size > 10e6 and adapter_size < 1e6  # the base once (12 MB), each adapter small
    assert models["louvain_r8_input"].info.metadata["base"] == tags[0][1]
    assert not (Path(models["bulk_r4_all"].path) / "encoder.safetensors").exists()
    # the stored adapter + stored base serve the same answers as the run
    from scimilarity_lora.model.folder import load_model_folder

    base, genes = load_model_folder(models["scimilarity_base"].path)
    multi = MultiAdapterClassifier(base)
    adapter, _ = read_adapter(models["bulk_r4_all"].path, "bulk_r4_all",
                              base_sha256=models["scimilarity_base"].info.metadata["sha256"], base_genes=genes)
    multi.add(adapter)
    predictor = CellTypePredictor.load(runs["bulk_r4_all"] / "model")
    x = torch.rand(5, len(genes))
    assert torch.allclose(multi(x, ["bulk_r4_all"] * 5)[1]["bulk_r4_all"][1], predictor.logits(x)[0], atol=1e-5)
    # a third adapter of the same base adds no second base; a merged export is still available
    export_adapter(runs["bulk_frozen"], "bulk_frozen")
    assert [m.tag.name for m in bentoml.models.list()].count("scimilarity_base") == 1
    merged = bentoml.models.get(export_to_bentoml(runs["bulk_r4_all"], "bulk_merged"))
    assert (Path(merged.path) / "encoder.safetensors").is_file()
