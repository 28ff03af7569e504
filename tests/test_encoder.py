"""Our Encoder against SCimilarity's own code and on-disk format."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from scimilarity_lora.model.encoder import Encoder
from scimilarity_lora.model.folder import ModelFolderError, load_base, load_model_folder, save_model_folder
from scimilarity_lora.model.adapters import FinetuneConfig, prepare_encoder


def real_scimilarity_nn_models():
    """SCimilarity 0.4.1's nn_models.py from the installed package (installed --no-deps; see Makefile).

    Only this file is loaded: the package's __init__ imports hnswlib/zarr<3 stacks that cannot share our
    environment, but the Encoder and its save_state() live here and depend on torch alone.
    """
    spec = importlib.util.find_spec("scimilarity")
    if spec is None:
        pytest.skip("scimilarity is not installed (make installs it with --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "nn_models.py"
    module_spec = importlib.util.spec_from_file_location("scimilarity_nn_models", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def write_folder_like_scimilarity(tmp_path: Path, n_genes=300, hidden=(64, 48, 32), latent=16, seed=0):
    """A model folder exactly as SCimilarity writes one: Encoder.save_state + layer_sizes.json + gene_order.tsv."""
    nn_models = real_scimilarity_nn_models()
    torch.manual_seed(seed)
    real = nn_models.Encoder(n_genes, latent_dim=latent, hidden_dim=list(hidden))
    with torch.no_grad():  # non-trivial BatchNorm statistics and PReLU slopes, as in trained weights
        for m in real.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.1, 0.4)
    folder = tmp_path / "model_v1.1"
    folder.mkdir()
    real.save_state(str(folder / "encoder.ckpt"))
    # MetricLearning.save_all: {key: list(size)} for every state-dict entry
    (folder / "layer_sizes.json").write_text(json.dumps({k: list(v.size()) for k, v in real.state_dict().items()}))
    (folder / "gene_order.tsv").write_text("\n".join(f"GENE{i}" for i in range(n_genes)) + "\n")
    return real.eval(), folder


def test_state_dict_keys_are_scimilaritys():
    keys = list(Encoder(100, 16, [32, 32, 32]).state_dict())
    assert keys[:7] == ["network.0.1.weight", "network.0.1.bias", "network.0.2.weight", "network.0.2.bias",
                        "network.0.2.running_mean", "network.0.2.running_var", "network.0.2.num_batches_tracked"]
    assert "network.0.3.weight" in keys and keys[-2:] == ["network.3.weight", "network.3.bias"]
    assert keys == list(real_scimilarity_nn_models().Encoder(100, 16, [32, 32, 32]).state_dict())


def test_loads_a_real_scimilarity_folder_and_gives_identical_embeddings(tmp_path):
    real, folder = write_folder_like_scimilarity(tmp_path)
    ours, genes = load_model_folder(folder)
    assert genes[:2] == ["GENE0", "GENE1"] and len(genes) == 300
    assert ours.config.hidden_dim == (64, 48, 32) and ours.config.latent_dim == 16
    x = torch.log1p(torch.rand(64, 300) * 5)
    ours.eval()
    with torch.no_grad():
        expected = real(x)
        diff = (ours(x) - expected).abs().max().item()
        assert diff < 1e-5
        # with LoRA attached at init (B = 0) the function is unchanged
        lora = prepare_encoder(ours, FinetuneConfig(mode="lora", r=4, target_modules=("all",))).eval()
        assert (lora(x) - expected).abs().max().item() < 1e-5
    assert torch.allclose(expected.norm(dim=1), torch.ones(64), atol=1e-5)


def test_our_folders_load_in_scimilarity(tmp_path):
    enc = Encoder(120, 8, [16, 16]).eval()
    folder = save_model_folder(enc, [f"G{i}" for i in range(120)], tmp_path / "m")
    real = real_scimilarity_nn_models().Encoder(120, latent_dim=8, hidden_dim=[16, 16])
    real.load_state(str(folder / "encoder.ckpt"))
    x = torch.rand(5, 120)
    with torch.no_grad():
        assert torch.allclose(real.eval()(x), enc(x), atol=1e-6)


def test_full_size_architecture_from_the_real_gene_order(real_gene_order, tmp_path):
    base = load_base(gene_order="scimilarity")
    n_params = sum(p.numel() for p in base.encoder.parameters())
    first = base.encoder.network[0][1].weight.numel()
    assert first == 28231 * 1024
    assert 31.0e6 < n_params < 31.2e6  # SCimilarity's 31.1M parameters
    assert not base.is_pretrained


def test_missing_file_is_named(tmp_path):
    _, folder = write_folder_like_scimilarity(tmp_path)
    os.remove(folder / "layer_sizes.json")
    with pytest.raises(ModelFolderError, match="missing layer_sizes.json"):
        load_model_folder(folder)


def test_gene_order_that_does_not_fit_the_weights(tmp_path):
    _, folder = write_folder_like_scimilarity(tmp_path)
    (folder / "gene_order.tsv").write_text("\n".join(f"G{i}" for i in range(299)))
    with pytest.raises(ModelFolderError, match="299 genes .* takes 300"):
        load_model_folder(folder)


def test_shape_mismatch_is_reported(tmp_path):
    _, folder = write_folder_like_scimilarity(tmp_path)
    sizes = json.loads((folder / "layer_sizes.json").read_text())
    sizes["network.3.weight"] = [32, 32]  # claims a 32-d latent space; the weights are 16-d
    (folder / "layer_sizes.json").write_text(json.dumps(sizes))
    with pytest.raises(ModelFolderError, match=r"does not match .*layer_sizes.json: \['network.3.weight: file \(16, 32\)"):
        load_model_folder(folder)


def test_huge_sizes_in_layer_sizes_json_are_refused_before_anything_is_allocated(tmp_path):
    """A 108-byte layer_sizes.json asking for hidden sizes [1e6, 1e6] allocated 3.5 GB before the weights were read."""
    import resource

    _, folder = write_folder_like_scimilarity(tmp_path)
    (folder / "layer_sizes.json").write_text(json.dumps({"network.0.1.weight": [1000000, 300],
                                                         "network.1.1.weight": [1000000, 1000000],
                                                         "network.2.weight": [16, 1000000]}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelFolderError, match="does not match"):
        load_model_folder(folder)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing of 3.5 GB


@pytest.mark.parametrize("content", ["[1, 2, 3]", '{"network.0.1.weight": "big"}', '{"a": [0, 5]}', "\x00\xff"])
def test_a_layer_sizes_json_that_is_not_a_shape_table_is_one_line(tmp_path, content):
    _, folder = write_folder_like_scimilarity(tmp_path)
    (folder / "layer_sizes.json").write_text(content)
    with pytest.raises(ModelFolderError, match="layer_sizes.json (must map state-dict keys|is not valid JSON)"):
        load_model_folder(folder)


def test_an_encoder_ckpt_that_is_not_a_checkpoint_is_one_line(tmp_path):
    _, folder = write_folder_like_scimilarity(tmp_path)
    (folder / "encoder.ckpt").write_text("this is a text file, not a checkpoint\n" * 10)
    with pytest.raises(ModelFolderError, match="encoder.ckpt is not"):
        load_model_folder(folder)


def test_truncated_checkpoint(tmp_path):
    _, folder = write_folder_like_scimilarity(tmp_path)
    data = (folder / "encoder.ckpt").read_bytes()
    (folder / "encoder.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFolderError, match="corrupt, truncated"):
        load_model_folder(folder)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED_MARKER']}",))


def test_pickle_carrying_code_is_not_executed(tmp_path, monkeypatch):
    _, folder = write_folder_like_scimilarity(tmp_path)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": _Payload()}, folder / "encoder.ckpt")
    with pytest.raises(ModelFolderError, match="refused"):
        load_model_folder(folder)
    assert not marker.exists()


def test_the_packaged_demo_base_is_pretrained_small_and_has_its_provenance():
    from scimilarity_lora.genes import scimilarity_gene_order
    from scimilarity_lora.model.folder import packaged_bases, resolve_model_dir, state_dict_hash

    assert "pbmc_demo" in packaged_bases()
    folder = resolve_model_dir("packaged:pbmc_demo")
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 15e6
    base = load_base(pretrained_dir="packaged:pbmc_demo")
    assert base.is_pretrained and base.source == "packaged:pbmc_demo"
    assert (base.encoder.config.latent_dim, base.encoder.config.hidden_dim) == (128, (1024, 1024, 1024))
    order = scimilarity_gene_order()
    assert len(base.genes) == 748 and set(base.genes) <= set(order)  # a subset of SCimilarity's vocabulary
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["weights_sha256"] == state_dict_hash(base.encoder.state_dict())
    assert provenance["command"].startswith("python pretrain.py ")
    assert all(len(f["sha256"]) == 64 and f["origin"] and f["study"] for f in provenance["inputs"])
    assert "../" not in json.dumps(provenance)  # names its sources itself, not a folder users do not have
    retention = provenance["retention"]
    assert retention["pretrained"]["knn_accuracy"] > retention["random (same architecture)"]["knn_accuracy"]


def test_an_unknown_packaged_base_names_the_shipped_ones():
    with pytest.raises(ModelFolderError, match="pbmc_demo"):
        load_base(pretrained_dir="packaged:nope")


def test_a_safetensors_folder_loads_like_the_ckpt_one(tmp_path):
    torch.manual_seed(0)
    enc = Encoder(50, latent_dim=8, hidden_dim=(16, 16))
    genes = [f"G{i}" for i in range(50)]
    save_model_folder(enc, genes, tmp_path / "ckpt")
    save_model_folder(enc, genes, tmp_path / "st", safetensors=True)
    assert not (tmp_path / "st" / "encoder.ckpt").exists()
    x = torch.rand(4, 50)
    a, _ = load_model_folder(tmp_path / "ckpt")
    b, genes_b = load_model_folder(tmp_path / "st")
    assert genes_b == genes
    assert torch.equal(a.eval()(x), b.eval()(x))
    (tmp_path / "st" / "encoder.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ModelFolderError, match="corrupt or truncated"):
        load_model_folder(tmp_path / "st")


def test_the_base_store_keeps_one_copy_per_weights_even_with_concurrent_writers(tmp_path):
    """Parallel sweep jobs store the same stand-in at once: one folder results, named by the weights' hash, loadable,
    with no temporary folders left; other weights get their own folder."""
    from concurrent.futures import ThreadPoolExecutor

    from scimilarity_lora.model.folder import state_dict_hash, store_base_folder

    torch.manual_seed(0)
    encoder, genes = Encoder(30, 4, (8,)), [f"G{i}" for i in range(30)]
    with ThreadPoolExecutor(6) as pool:
        folders = set(pool.map(lambda _: store_base_folder(encoder, genes, tmp_path / "store"), range(6)))
    sha = state_dict_hash(encoder.state_dict())
    assert folders == {tmp_path / "store" / sha[:16]}
    assert [p.name for p in (tmp_path / "store").iterdir()] == [sha[:16]]
    loaded, loaded_genes = load_model_folder(tmp_path / "store" / sha[:16])
    assert state_dict_hash(loaded.state_dict()) == sha and loaded_genes == genes
    other = store_base_folder(Encoder(30, 4, (8,)), genes, tmp_path / "store")
    assert other != folders.pop() and len(list((tmp_path / "store").iterdir())) == 2
