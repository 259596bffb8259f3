"""The configuration reference is generated from the schema and committed up to date."""

from pathlib import Path

from pipeline.config import load_schema
from pipeline.configdocs import config_markdown

ROOT = Path(__file__).resolve().parent.parent


def _leaves(props: dict, prefix: str = "") -> list[str]:
    out = []
    for name, sub in props.items():
        if sub.get("type") == "object" and "properties" in sub:
            out += _leaves(sub["properties"], f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def test_the_committed_reference_is_the_generated_one():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == config_markdown(), (
        "docs/configuration.md is stale: run python -m pipeline config-docs "
        "--out docs/configuration.md")


def test_every_key_has_one_row_with_its_default_and_description():
    text = config_markdown()
    schema = load_schema()
    keys = _leaves(schema["properties"])
    assert len(keys) > 100
    for key in keys:
        rows = [r for r in text.splitlines() if r.startswith(f"| `{key}` |")]
        assert len(rows) == 1, key
    row = next(r for r in text.splitlines() if r.startswith("| `simclr.temperature` |"))
    assert row == ("| `simclr.temperature` | number (> 0) | `0.2` | Temperature of the NT-Xent "
                   "loss (solo-learn's CIFAR recipe: 0.2). |")
    row = next(r for r in text.splitlines() if r.startswith("| `train.methods` |"))
    assert "`byol` \\| `simclr` \\| `nnclr`" in row and '`["byol"]`' in row
