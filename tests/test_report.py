"""`snakemake --report` on the tiny DAG: one offline HTML file with every figure and caption."""

from __future__ import annotations

import base64
import json
import re

import pytest
from conftest import ROOT, Workflow, tiny_config

pytestmark = pytest.mark.slow

REPORT = ROOT / "workflow" / "report"
# One job of every rule: one latent model, one metric, baseline and one neighbour variant.
GRID = {"latent": {"models": ["vae"]}, "neighbours": {"metrics": ["cosine"]},
        "byol": {"variants": ["baseline", "probabilistic"], "seeds": [0]}}
DS = "results/synthetic"
# Report category -> the files it must show, and the caption file of each.
EXPECTED = {
    "Results": {"results/linear_eval.csv": "linear_eval.rst",
                "results/accuracy.png": "accuracy.rst"},
    "Latent spaces": {f"{DS}/latent/vae/loss.png": "latent_loss.rst",
                      f"{DS}/latent/vae/recon.png": "latent_recon.rst"},
    "Neighbours": {f"{DS}/neighbours/vae-cosine/grid.png": "neighbours_grid.rst",
                   f"{DS}/neighbours/pixels-cosine/grid.png": "neighbours_grid.rst",
                   f"{DS}/neighbours/purity.csv": "purity.rst"},
    "BYOL": {f"{DS}/byol/baseline/seed0/loss.png": "byol_loss.rst",
             f"{DS}/byol/probabilistic-vae-cosine/seed0/loss.png": "byol_loss.rst"},
}


def _js_object(html: str, name: str):
    """The JSON value assigned by `var <name> = ...` in the report's data scripts."""
    decoder = json.JSONDecoder()
    for m in re.finditer(rf"\bvar {name} = ", html):
        try:
            return decoder.raw_decode(html, m.end())[0]
        except json.JSONDecodeError:
            continue  # the same name assigned in the bundled JavaScript
    raise AssertionError(f"no JSON `var {name}` in the report")


def _text(markup: str) -> str:
    """Caption HTML or RST source as plain words, for comparing one with the other."""
    markup = re.sub(r"<[^>]+>|``|\*\*|\*", "", markup)
    return " ".join(markup.split())


def _static_prefix(rst: str) -> str:
    """The caption's text before its first template field (`{{ ... }}`), as words."""
    return _text(rst.split("{{", 1)[0].split("{%", 1)[0])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("report")
    wf = Workflow(path, tiny_config(**GRID))
    wf.run()
    wf.run("--report", "report.html")
    return wf, (path / "report.html").read_text(encoding="utf-8")


def test_report_shows_every_figure_with_its_caption(report):
    wf, html = report
    categories = _js_object(html, "categories")
    results = _js_object(html, "results")
    for category, files in EXPECTED.items():
        shown = {f for group in categories[category].values() for f in group}
        assert shown == set(files), category
        for name, caption in files.items():
            entry = results[name]
            # The file itself travels inside the HTML, byte for byte.
            header, payload = entry["data_uri"].split(";base64,", 1)
            assert header.startswith(f"data:{entry['mime_type']};")
            assert base64.b64decode(payload) == (wf.path / name).read_bytes()
            assert entry["mime_type"] == ("image/png" if name.endswith(".png") else "text/csv")
            prefix = _static_prefix((REPORT / caption).read_text())
            assert prefix and _text(entry["caption"]).startswith(prefix), name


def test_report_captions_of_the_results(report):
    _, html = report
    results = _js_object(html, "results")
    chart = _text(results["results/accuracy.png"]["caption"])
    assert "mean ± standard deviation over the BYOL seeds" in chart
    assert results["results/accuracy.png"]["job_properties"]["rule"] == "accuracy_chart"


def test_report_has_workflow_description(report):
    _, html = report
    desc = _text(_js_object(html, "workflow_desc"))
    assert desc, 'the Snakefile needs `report: "workflow/report/workflow.rst"`'
    assert desc.startswith("nnbyol: BYOL whose positive pairs are enriched by nearest")
    assert "Read the report in this order: Results" in desc
    # The rule graph of the DAG is embedded too.
    assert "aggregate" in json.dumps(_js_object(html, "rulegraph_spec"))


def test_report_needs_no_network(report):
    _, html = report
    external = re.findall(r"<(?:script|link|img|iframe)\b[^>]*(?:src|href)=[\"']?(?:https?:)?//",
                          html, flags=re.I)
    assert external == []
    assert re.findall(r"@import\s+url\(\s*[\"']?https?:", html) == []
