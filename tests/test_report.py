"""`snakemake --report` on the tiny DAG: one offline HTML file with every figure and caption."""

from __future__ import annotations

import base64
import json
import re
from html import unescape

import pandas as pd
import pytest
from conftest import ROOT, Workflow, tiny_config

pytestmark = pytest.mark.slow

REPORT = ROOT / "workflow" / "report"
# One job of every rule: one latent model, one metric, baseline and one neighbour use; two
# seeds, so that the paired difference has an interval.
GRID = {"latent": {"models": ["vae"]}, "neighbours": {"metrics": ["cosine"]},
        "train": {"uses": ["baseline", "probabilistic"], "seeds": [0, 1]}}
DS = "results/synthetic"
# Report category -> the files it must show, and the caption file of each.
EXPECTED = {
    "Results": {f"{DS}/linear_eval.csv": "linear_eval.rst",
                f"{DS}/linear_eval.html": "linear_eval.rst",
                f"{DS}/summary.csv": "summary.rst",
                f"{DS}/summary.html": "summary.rst",
                f"{DS}/accuracy.png": "accuracy.rst",
                f"{DS}/paired_difference.png": "paired_difference.rst",
                f"{DS}/accuracy_vs_purity.png": "accuracy_vs_purity.rst",
                f"{DS}/per_class.png": "per_class.rst",
                f"{DS}/embeddings.png": "embeddings.rst"},
    "Latent spaces": {f"{DS}/latent/vae/loss.png": "latent_loss.rst",
                      f"{DS}/latent/vae/recon.png": "latent_recon.rst"},
    "Neighbours": {f"{DS}/neighbours/vae-cosine/grid.png": "neighbours_grid.rst",
                   f"{DS}/neighbours/pixels-cosine/grid.png": "neighbours_grid.rst",
                   f"{DS}/neighbours/purity.csv": "purity.rst"},
    "Training": {f"{DS}/train_histories.png": "train_histories.rst",
                 **{f"{DS}/train/{run}/seed{s}/loss.png": "train_loss.rst"
                    for run in ("byol-baseline", "byol-probabilistic-vae-cosine")
                    for s in (0, 1)}},
}
MIME = {".png": "image/png", ".csv": "text/csv", ".html": "text/html"}


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
    markup = unescape(re.sub(r"<[^>]+>|``|\*\*|\*", "", markup))  # docutils: @ -> &#64;
    return " ".join(markup.split())


def _static_prefix(rst: str) -> str:
    """The caption's text before its first template field (`{{ ... }}`), as words."""
    return _text(rst.split("{{", 1)[0].split("{%", 1)[0])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Exactly the card's target, then the report as the README tells it: no other target."""
    path = tmp_path_factory.mktemp("report")
    wf = Workflow(path, tiny_config(**GRID))
    wf.run("results/linear_eval.csv")
    wf.run("--report", f"{DS}/report.html")
    return wf, (path / DS / "report.html").read_text(encoding="utf-8")


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
            assert entry["mime_type"] == MIME[name[name.rindex("."):]]
            prefix = _static_prefix((REPORT / caption).read_text())
            assert prefix and _text(entry["caption"]).startswith(prefix), name


def test_report_captions_of_the_results(report):
    _, html = report
    results = _js_object(html, "results")
    chart = _text(results[f"{DS}/accuracy.png"]["caption"])
    assert "its bar the 95 % t-interval of that mean" in chart and "Dots, not bars" in chart
    assert results[f"{DS}/accuracy.png"]["job_properties"]["rule"] == "figures"
    assert "paired difference" in _text(results[f"{DS}/summary.html"]["caption"])


def test_summary_page_is_an_html_table(report):
    wf, html = report
    results = _js_object(html, "results")
    page = base64.b64decode(results[f"{DS}/summary.html"]["data_uri"].split(",", 1)[1])
    page = page.decode("utf-8")
    assert page.count("<table") == 1
    for run in ("pixels", "latent-vae", "untrained", "byol-baseline",
                "byol-probabilistic-vae-cosine"):
        assert f"<td>{run}</td>" in page
    summary = pd.read_csv(wf.path / DS / "summary.csv").set_index("run")
    row = summary.loc["byol-probabilistic-vae-cosine"]
    assert row["n_seeds"] == 2 and row["n_pairs"] == 2 and row["versus"] == "byol-baseline"
    assert row["top1_diff_ci95_low"] <= row["top1_diff"] <= row["top1_diff_ci95_high"]
    log = (wf.path / DS / "logs" / "aggregate.log").read_text()
    assert "byol-probabilistic-vae-cosine" in log and "Δ top1 vs baseline" in log
    # One job evaluates a run's seeds; its log has a line per seed.
    lines = (wf.path / DS / "logs" / "evaluate" / "byol-baseline.log").read_text().splitlines()
    for seed in (0, 1):
        line = next(x for x in lines if x.startswith(f"evaluate byol-baseline seed {seed}: "))
        assert "linear top-1 " in line and "knn200 top-1" in line


def test_figures_exist_and_are_pictures(report):
    wf, _ = report
    for name in ("accuracy", "paired_difference", "accuracy_vs_purity", "per_class",
                 "embeddings", "train_histories"):
        png = (wf.path / DS / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name


def test_report_has_workflow_description(report):
    wf, html = report
    desc = _text(_js_object(html, "workflow_desc"))
    assert desc, 'the Snakefile needs `report: "workflow/report/workflow.rst"`'
    assert desc.startswith("nnbyol: self-supervised methods (BYOL, SimCLR, NNCLR) whose "
                           "positive pairs are enriched by nearest neighbours")
    assert "Read the report in this order: Results" in desc
    # The answer first: the aggregate's verdict line, then the summary table.
    verdict = (wf.path / DS / "logs" / "aggregate.log").read_text().splitlines()[1]
    assert verdict.endswith(".") and "Best mean linear top-1: " in verdict
    assert desc.index(f"Answer. {verdict}") < desc.index("Summary (mean ± std over seeds")
    assert "byol-probabilistic-vae-cosine" in desc.split("Data set synthetic")[0]
    # The data set, its image counts and the configuration used are on the landing page.
    assert "Data set synthetic: 72 images of 12×12 px, 1 channel, 3 classes" in desc
    assert "57 train, 15 test" in desc
    assert "Experiment synthetic (the data set's name): results in results/synthetic/." in desc
    # Only the keys that differ from the schema defaults, then the whole config collapsed.
    changes = desc.split("every other key has its default.", 1)[1].split("The whole", 1)[0]
    assert 'train.uses: ["baseline", "probabilistic"]' in changes
    assert "evaluate.knn_k: [5, 200]" in changes and "train.seeds: [0, 1]" in changes
    assert "methods" not in changes and "dataset.tag" not in changes  # defaults, the tag
    assert 'methods: ["byol"]' in desc and 'tag: "synthetic"' in desc and "tag: null" not in desc
    assert "root" not in desc and "stl10_unlabeled" not in desc  # another source's keys
    assert "<details>" in _js_object(html, "workflow_desc")
    # The rule graph of the DAG is embedded too.
    assert "aggregate" in json.dumps(_js_object(html, "rulegraph_spec"))


def test_report_needs_no_network(report):
    _, html = report
    external = re.findall(r"<(?:script|link|img|iframe)\b[^>]*(?:src|href)=[\"']?(?:https?:)?//",
                          html, flags=re.I)
    assert external == []
    assert re.findall(r"@import\s+url\(\s*[\"']?https?:", html) == []


def test_second_experiment_keeps_the_first(report):
    """Another data set in the same results folder: both tables stay readable side by side.
    (Runs last: it adds an experiment to the module's workflow.)"""
    wf, _ = report
    first = (wf.path / DS / "linear_eval.csv").read_text()
    other = tiny_config(**GRID)
    other["dataset"] = {**other["dataset"], "tag": "other",
                        "synthetic": {"classes": 4, "per_class": 12, "size": 8}}
    other["latent"] = {**other["latent"], "models": ["ae"]}
    other["train"] = {**other["train"], "uses": ["baseline"], "seeds": [0]}
    wf.write_config(other)
    wf.run("results/linear_eval.csv")
    assert (wf.path / DS / "linear_eval.csv").read_text() == first
    both = pd.read_csv(wf.path / "results" / "linear_eval.csv")
    assert set(both["dataset"]) == {"synthetic", "other"}
    assert (both["dataset"] == "synthetic").sum() == first.count("\n") - 1
    assert set(pd.read_csv(wf.path / "results" / "other" / "linear_eval.csv")["dataset"]) == {
        "other"}
