"""The documentation site and the tutorials: built and executed as a reader would meet them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs" / "hooks"))
import config_reference  # noqa: E402

TUTORIALS = sorted((REPO / "docs" / "tutorials").glob("*.md"))


def yaml_keys(node, prefix: str = "") -> list[str]:
    """Every dotted key of a parsed YAML mapping (PyYAML: independent of the hook's own line parser)."""
    keys = []
    for k, v in (node or {}).items():
        key = f"{prefix}{k}"
        if key == "defaults":
            continue
        keys.append(key)
        if isinstance(v, dict):
            keys += yaml_keys(v, key + ".")
    return keys


def test_config_reference_lists_every_key_of_every_config_file():
    page = config_reference.render()
    files = sorted((REPO / "conf").rglob("*.yaml"))
    assert len(files) > 30
    for f in files:
        assert f"`{f.relative_to(REPO / 'conf').as_posix()}`" in page
        for key in yaml_keys(yaml.safe_load(f.read_text())):
            assert f"| `{key}` |" in page, f"{f}: {key} missing from the configuration reference"


def test_config_reference_keeps_defaults_and_comments():
    _, entries = config_reference.parse_yaml_with_comments(
        "# header\n\nr: 8   # the rank\n# above alpha\nalpha: 16\nunknown:\n  target_accuracy: 0.9  # kept until\n"
        "                        # accuracy reaches this\n")
    rows = {e.key: (e.default, e.comment) for e in entries}
    assert rows["r"] == ("8", "the rank")
    assert rows["alpha"] == ("16", "above alpha")
    assert rows["unknown.target_accuracy"] == ("0.9", "kept until accuracy reaches this")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_mkdocs_build_strict_builds_every_page(site):
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "scimilarity_lora.api.fit" in api and "label_key" in api  # mkdocstrings rendered the signature
    conf = (site / "reference" / "configuration" / "index.html").read_text()
    assert "target_modules" in conf and "novelty_quantile" in conf
    for study in ("cross_study", "transfer_study", "pbmc_lora_study"):
        assert (site / "studies" / study / "index.html").is_file()
    assert (site / "studies" / "transfer_study" / "macro_f1_vs_retention.png").is_file()
    for tutorial in TUTORIALS:
        assert (site / "tutorials" / tutorial.stem / "index.html").is_file()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium on this machine (apt install chromium)")
def test_site_pages_render_in_headless_chromium(site, tmp_path):
    for page, expect in [("index.html", "sl.fit"), ("guide/notebooks/index.html", "Run.load"),
                         ("reference/configuration/index.html", "lora.r")]:
        dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                              (site / page).as_uri()], capture_output=True, text=True, timeout=120).stdout
        text = re.sub(r"<[^>]+>", "", dom)  # the page's text as a reader sees it (highlighting splits code into spans)
        assert expect in text, page
        assert "md-nav" in dom  # the material theme's navigation was laid out


@pytest.mark.slow
@pytest.mark.tutorials
@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_executes(tutorial: Path, tmp_path, monkeypatch):
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(tutorial)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "true")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    text = "\n".join(str(o.get("data", {}).get("text/plain", "")) + o.get("text", "") for o in outputs)
    if tutorial.stem == "finetune_and_annotate":
        assert len(images) >= 2  # the learning curves and the UMAP, drawn by this run
        knn_accuracy = float(re.findall(r"\d\.\d+", text.splitlines()[-1])[0])
        assert 0.5 < knn_accuracy <= 1.0
    elif tutorial.stem == "sweep_wandb":
        assert "2 runs finished" in text and len(images) == 1
        assert len(list(tmp_path.rglob("offline-run-*"))) == 2
    elif tutorial.stem == "serve_adapters":
        assert "pbmc_bulk ->" in text and "pbmc_louvain ->" in text
        assert "(400," in text  # the malformed request was refused
    elif tutorial.stem == "pretrain":
        assert (tmp_path / "outputs" / "tutorial_pretrain_more" / "model" / "encoder.ckpt").is_file()
        assert len(images) == 1
