"""The README's worked example: config/my-images.yaml runs end to end on a folder of images."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, Workflow
from PIL import Image

pytestmark = pytest.mark.slow

TEMPLATE = ROOT / "config" / "my-images.yaml"
CLASSES = ("circle", "square", "stripes")

# What the test changes, through keys the template already has (what a user would edit):
# the folder, and smaller images, fewer epochs and one seed, for speed.
SHRINK = {
    "dataset": {"resize": 12},
    "latent": {"epochs": 2, "batch_size": 16},
    "train": {"epochs": 3, "batch_size": 16, "seeds": [0]},
}


def write_image_folder(root: Path, per_class: int = 8) -> None:
    """root/train/<class>/*.png: a few 20x20 RGB images per class, each class its own shape."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:20, :20]
    shapes = {
        "circle": (yy - 10) ** 2 + (xx - 10) ** 2 < 36,
        "square": (abs(yy - 10) < 6) & (abs(xx - 10) < 6),
        "stripes": (xx // 3) % 2 == 0,
    }
    for name, mask in shapes.items():
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (20, 20, 3))
            pixels[mask] = rng.integers(160, 256, 3)
            Image.fromarray(pixels.astype(np.uint8), "RGB").save(folder / f"{i:03d}.png")


def test_the_template_runs_on_a_folder_of_images(tmp_path):
    template = yaml.safe_load(TEMPLATE.read_text())
    assert template["dataset"]["name"] == "imagefolder"
    images = tmp_path / "my images"
    write_image_folder(images)
    config = yaml.safe_load(TEMPLATE.read_text())
    config["dataset"]["root"] = str(images)
    for section, keys in SHRINK.items():
        assert set(keys) <= set(template[section]), f"the template lacks {section}.{keys}"
        config[section].update(keys)

    (tmp_path / "repo").mkdir()
    workflow = Workflow(tmp_path / "repo", yaml.safe_load((ROOT / "config.yaml").read_text()))
    (workflow.path / "config").mkdir()
    (workflow.path / "config" / "my-images.yaml").write_text(yaml.safe_dump(config))
    workflow.run("results/linear_eval.csv", "--configfile", "config/my-images.yaml")

    table = pd.read_csv(workflow.path / "results" / "my-images" / "linear_eval.csv")
    assert list(table["run"]) == [
        "pixels", "latent-ae", "untrained", "byol-baseline",
        "byol-probabilistic-ae-cosine", "byol-weighted-ae-cosine",
    ]
    assert (table["dataset"] == "my-images").all()
    assert (table["n_train"] == 3 * 8 - 3 * 2).all() and (table["n_test"] == 3 * 2).all()
    assert table["top1"].between(0, 1).all()
    combined = pd.read_csv(workflow.path / "results" / "linear_eval.csv")
    assert list(combined["run"]) == list(table["run"])
    meta = pd.read_parquet(workflow.path / "results" / "my-images" / "prepared" / "meta.parquet")
    assert meta["path"].iloc[0] == "train/circle/000.png"
