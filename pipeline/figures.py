"""Figures of the results report: accuracy, paired differences, purity, histories, embeddings.

Kept apart from ``pipeline.plots`` (the drawing helpers the training stages import), so that
changing a report figure never invalidates a trained model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.aggregate import REFERENCE, dataset_names, knn_columns, versus_of
from pipeline.io import read_json
from pipeline.plots import _pyplot, _save

STAGE_COLOURS = {"pixels": "#888888", "latent": "#4c72b0", "untrained": "#bbbbbb",
                 "byol": "#dd8452", "simclr": "#55a868", "nnclr": "#8172b3"}
METHOD_STYLES = {"byol": "-", "simclr": "--", "nnclr": ":"}
VERDICT_COLOURS = {"better than baseline": "#2a9d4b", "worse than baseline": "#c8382e"}
FAMILY_CMAPS = {"probabilistic": "Blues", "weighted": "Oranges", "topk": "Greens"}


def _placeholder(path: str | Path, title: str, text: str) -> None:
    """A small figure that says why there is nothing to draw (the report needs the file)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, wrap=True)
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def _trained(summary: pd.DataFrame) -> pd.Series:
    return summary["method"].fillna("").astype(str).ne("") if "method" in summary else (
        pd.Series(False, index=summary.index))


def _neighbour_runs(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[_trained(summary) & summary["variant"].ne("baseline")]


def best_run(summary: pd.DataFrame) -> str | None:
    """The neighbour configuration with the highest mean linear top-1 (None if there is none)."""
    runs = _neighbour_runs(summary)
    return None if runs.empty else str(
        runs.sort_values("top1_mean", ascending=False, kind="stable").iloc[0].run)


def accuracy_chart(summary: pd.DataFrame, path: str | Path) -> None:
    """Horizontal bars of linear-probe top-1 per run (mean +- std over seeds), and a diamond
    for the first weighted-kNN top-1 column."""
    knn = [c for c in knn_columns([c[:-5] for c in summary.columns if c.endswith("_mean")])
           if c.endswith("_top1")]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.3 * len(summary) + 1.4))
    labels = [r.run + (f" (n={r.n_seeds})" if r.n_seeds > 1 else "")
              for r in summary.itertuples()]
    y = np.arange(len(summary))[::-1]
    ax.barh(y, summary["top1_mean"], xerr=summary["top1_std"].fillna(0), capsize=3,
            color=[STAGE_COLOURS.get(s, "#55a868") for s in summary["stage"]],
            label="linear probe top-1")
    if knn:
        ax.scatter(summary[f"{knn[0]}_mean"], y, marker="D", s=14, color="black", zorder=3,
                   label=f"weighted kNN top-1, k={knn[0][3:-5]}")
    for yi, m in zip(y, summary["top1_mean"], strict=True):
        ax.text(1.005, yi, f"{m:.3f}", va="center", fontsize=7,
                transform=ax.get_yaxis_transform())
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("test accuracy (bars: linear-probe top-1, mean ± std over seeds)")
    lows = summary["top1_mean"].min(), summary[f"{knn[0]}_mean"].min() if knn else 1.0
    ax.set_xlim(max(0.0, float(np.nanmin(lows)) - 0.05), 1.01)
    ax.set_title(f"{dataset_names(summary)}: accuracy per representation\n"
                 "grey: raw pixels, blue: latent spaces, other colours: methods", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.6 / fig.get_figheight()),
              ncol=2, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def paired_chart(summary: pd.DataFrame, path: str | Path) -> None:
    """Forest plot: per configuration, the mean paired difference to its baseline (a
    neighbour configuration's own method's; another method's baseline against byol-baseline)
    over the same seeds with its 95 % t-interval; one panel per paired accuracy column."""
    runs = summary[summary["top1_diff"].notna()] if "top1_diff" in summary else summary[:0]
    title = "Paired difference to each configuration's baseline (same seeds)"
    if runs.empty:
        _placeholder(path, title, "No configuration with a baseline run to compare with "
                     "in this experiment.")
        return
    cols = [c[:-5] for c in summary.columns if c.endswith("_diff")]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(cols), figsize=(3.4 * len(cols) + 2.4,
                                                     0.32 * len(runs) + 1.6),
                             sharey=True, squeeze=False)
    y = np.arange(len(runs))[::-1]
    for ax, col in zip(axes[0], cols, strict=True):
        mean = runs[f"{col}_diff"].to_numpy(float)
        low, high = runs[f"{col}_diff_ci95_low"].to_numpy(float), runs[
            f"{col}_diff_ci95_high"].to_numpy(float)
        for yi, m, lo, hi in zip(y, mean, low, high, strict=True):
            colour = ("#2a9d4b" if lo > 0 else "#c8382e" if hi < 0 else "#444444")
            if np.isnan(lo):
                ax.plot(m, yi, "o", mfc="white", color="#444444")
            else:
                ax.errorbar(m, yi, xerr=[[m - lo], [hi - m]], fmt="o", color=colour, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(f"Δ {col.replace('_', ' ')} (run − baseline)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=7)
    labels = [f"{r.run} (n={0 if pd.isna(r.n_pairs) else int(r.n_pairs)})"
              for r in runs.itertuples()]
    axes[0, 0].set_yticks(y, labels, fontsize=8)
    fig.suptitle(f"{dataset_names(summary)}: {title}\n"
                 "dot: mean over seed pairs; bar: 95 % t-interval; green/red: interval "
                 "excludes 0; open dot: one pair, no interval", fontsize=9, y=1.0,
                 va="bottom")
    _save(fig, path)


def accuracy_vs_purity(summary: pd.DataFrame, path: str | Path) -> None:
    """Top-1 (mean +- std) of each neighbour configuration against the label purity@k of the
    neighbours it trained with; one panel per variant, colour = space, marker = metric; the
    baseline as a horizontal band."""
    runs = _neighbour_runs(summary)
    runs = runs.dropna(subset=["purity_at_k"]) if "purity_at_k" in runs else runs.iloc[:0]
    title = "Accuracy versus neighbour purity"
    if runs.empty:
        _placeholder(path, title, "No neighbour configuration with a purity value in this "
                     "experiment.")
        return
    variants = sorted(runs["variant"].unique())
    spaces = sorted(runs["latent"].unique())
    colours = dict(zip(spaces, _pyplot().get_cmap("tab10").colors, strict=False))
    markers = {"euclidean": "o", "cosine": "s"}
    base = summary[summary["run"] == REFERENCE]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants) + 0.6, 3.6),
                             sharey=True, squeeze=False)
    for ax, variant in zip(axes[0], variants, strict=True):
        if len(base):
            m, s = float(base["top1_mean"].iloc[0]), base["top1_std"].fillna(0).iloc[0]
            ax.axhline(m, color="black", lw=1, label=f"{REFERENCE} (± std)")
            ax.axhspan(m - s, m + s, color="black", alpha=0.1)
        for r in runs[runs["variant"] == variant].itertuples():
            ax.errorbar(r.purity_at_k, r.top1_mean, yerr=0 if pd.isna(r.top1_std) else
                        r.top1_std, fmt=markers.get(r.metric, "^"), color=colours[r.latent],
                        capsize=3, label=f"{r.latent}, {r.metric}")
        ax.set_title(f"variant: {variant}", fontsize=9)
        ax.set_xlabel("neighbour label purity@k (training set)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("linear-probe top-1 (mean ± std)", fontsize=8)
    handles, labels = axes[0, -1].get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    fig.legend(seen.values(), seen.keys(), fontsize=7, loc="center left",
               bbox_to_anchor=(1.0, 0.5), title="space, metric", title_fontsize=7)
    fig.suptitle(f"{dataset_names(summary)}: {title} (latent space = colour, "
                 "metric = marker)",
                 fontsize=9, y=1.0, va="bottom")
    for ax in axes[0]:
        ax.margins(x=0.15)
    _save(fig, path)


def _run_of_history(path: Path) -> tuple[str, int]:
    """``.../train/<run>/seed<N>/history.csv`` -> (``<run>``, N)."""
    return path.parent.parent.name, int(path.parent.name.removeprefix("seed"))


def train_histories(histories: list[str | Path], path: str | Path) -> None:
    """Every trained run's history overlaid: loss, representation spread, neighbour use and
    the neighbours' label purity per epoch; per configuration the mean over seeds, with the
    min-max band over seeds. Colour: the neighbour use (baselines black); line: the method."""
    frames = []
    for p in histories:
        run, seed = _run_of_history(Path(p))
        frames.append(pd.read_csv(p).assign(run=run, seed=seed))
    if not frames:
        _placeholder(path, "Training histories", "No trained run in this experiment.")
        return
    from matplotlib.ticker import MaxNLocator

    df = pd.concat(frames, ignore_index=True)
    runs = sorted(df["run"].unique(), key=lambda r: (not r.endswith("-baseline"), r))
    family = {r: r.split("-")[1] for r in runs}
    count = {f: sum(v == f for v in family.values()) for f in set(family.values())}
    seen: dict[str, int] = {}
    colours = {}
    plt = _pyplot()
    for r in runs:
        f = family[r]
        seen[f] = seen.get(f, 0) + 1
        cmap = FAMILY_CMAPS.get(f)
        colours[r] = ("black" if cmap is None else
                      plt.get_cmap(cmap)(0.35 + 0.6 * seen[f] / max(count[f], 1)))
    panels = [("loss", "loss (BYOL 0-8; SimCLR, NNCLR: NT-Xent)"),
              ("spread", "spread (1 = isotropic)"),
              ("neighbour_use", "neighbour use (share of views / weight)"),
              ("neighbour_purity", "neighbour purity (label agreement of pairs used)")]
    df["neighbour_purity"] = pd.to_numeric(df["neighbour_purity"], errors="coerce")
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, (col, label) in zip(axes, panels, strict=True):
        for r in runs:
            g = df[df["run"] == r].groupby("epoch")[col]
            mean, lo, hi = g.mean(), g.min(), g.max()
            ax.plot(mean.index, mean.to_numpy(), color=colours[r],
                    lw=1.8 if r.endswith("-baseline") else 1.1,
                    ls=METHOD_STYLES.get(r.split("-")[0], "-"), label=r)
            ax.fill_between(mean.index, lo.to_numpy(), hi.to_numpy(), color=colours[r],
                            alpha=0.15, lw=0)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    n_seeds = df.groupby("run")["seed"].nunique().max()
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"Training histories of {len(runs)} configurations: line = mean over "
                 f"seeds (up to {n_seeds}), band = min-max over seeds; baselines in black, "
                 "byol solid, simclr dashed, nnclr dotted",
                 fontsize=9)
    _save(fig, path)


def _evals(paths: list[str | Path]) -> pd.DataFrame:
    rows = []
    for p in paths:
        r = read_json(p)
        rows.append({"run": r["run"], "stage": r.get("stage"), "seed": r.get("seed"),
                     "top1": r.get("top1"), "per_class": r.get("per_class_top1"),
                     "pca": r.get("pca_test")})
    return pd.DataFrame(rows)


def per_class_chart(evals: list[str | Path], summary: pd.DataFrame, classes: list[str],
                    path: str | Path) -> None:
    """Per-class linear-probe top-1 (mean over seeds) of the best neighbour configuration and
    of its own method's baseline, side by side, with the difference written above each pair."""
    best = best_run(summary)
    df = _evals(evals)
    title = "Per-class accuracy"
    base_run = None if best is None else versus_of(
        summary[summary["run"] == best].iloc[0].to_dict())
    if best is None or base_run not in set(df["run"]):
        _placeholder(path, title, "Needs a neighbour configuration and its method's baseline.")
        return

    def mean_per_class(run):
        rows = [np.array([np.nan if v is None else v for v in pc], float)
                for pc in df.loc[df["run"] == run, "per_class"] if pc is not None]
        return np.nanmean(np.stack(rows), axis=0), len(rows)

    (b, nb), (v, nv) = mean_per_class(base_run), mean_per_class(best)
    names = [classes[i] if i < len(classes) else str(i) for i in range(len(b))]
    x = np.arange(len(b))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(b) + 2), 3.6))
    ax.bar(x - 0.2, b, 0.4, color="#555555", label=f"{base_run} (n={nb})")
    ax.bar(x + 0.2, v, 0.4, color="#dd8452", label=f"{best} (n={nv})")
    for xi, d, top in zip(x, np.round(v - b, 6), np.fmax(b, v), strict=True):
        if not np.isnan(d):
            ax.text(xi, top + 0.01, f"{d:+.3f}", ha="center", fontsize=7,
                    color="#2a9d4b" if d > 0 else "#c8382e" if d < 0 else "black")
    ax.set_xticks(x, names, fontsize=8, rotation=45 if max(map(len, names)) > 3 else 0)
    low = float(np.nanmin(np.fmin(b, v)))
    ax.set_ylim(max(0.0, low - 0.1), 1.045)
    ax.set_yticks([t for t in ax.get_yticks() if max(0.0, low - 0.1) <= t <= 1.0])
    ax.set_ylabel("test top-1 of the class (mean over seeds)", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{dataset_names(summary)}: {title}, best neighbour configuration against "
                 "its method's baseline\n(numbers: best − baseline)", fontsize=9)
    _save(fig, path)


def embedding_map(evals: list[str | Path], summary: pd.DataFrame, labels: np.ndarray,
                  classes: list[str], path: str | Path) -> None:
    """2-D PCA (of L2-normalised features, fit on the training images) of the test images in
    each latent space and in the trained encoders (each method's baseline and the best neighbour
    configuration, first seed), coloured by label."""
    df = _evals(evals)
    order = [r for r in df["run"].unique() if r.startswith("latent-")]
    order += ["pixels"] if "pixels" in set(df["run"]) else []
    baselines = [r for r in df["run"].unique() if str(r).endswith("-baseline")]
    order += [r for r in (*sorted(baselines), best_run(summary))
              if r is not None and r in set(df["run"])]
    panels = []
    for run in order:
        rows = df[df["run"] == run].sort_values("seed", na_position="first")
        if len(rows) and rows.iloc[0]["pca"]:
            panels.append((run, rows.iloc[0]))
    if not panels:
        _placeholder(path, "Embeddings", "No evaluated representation.")
        return
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    plt = _pyplot()
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols + 1.6, 3.6 * nrows),
                             squeeze=False)
    fig.subplots_adjust(hspace=0.45)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    for ax, (run, r) in zip(axes.ravel(), panels, strict=False):
        xy = np.asarray(r["pca"]["xy"], float)
        lab = labels[np.asarray(r["pca"]["rows"], int)]
        ax.scatter(xy[:, 0], xy[:, 1], c=[cmap(int(v) % cmap.N) for v in lab],
                   s=24 if len(xy) < 300 else 6, alpha=0.8, lw=0)
        seed = "" if pd.isna(r["seed"]) else f", seed {int(r['seed'])}"
        ex = r["pca"].get("explained", [np.nan, np.nan])
        ax.set_title(f"{run}{seed}\nlinear top-1 {r['top1']:.3f}", fontsize=8)
        ax.set_xlabel(f"PC1 ({ex[0]:.0%} of variance)", fontsize=7)
        ax.set_ylabel(f"PC2 ({ex[1]:.0%})", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Line2D([], [], ls="", marker="o", color=cmap(i % cmap.N), label=name)
               for i, name in enumerate(classes)]
    fig.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5),
               title="label", title_fontsize=7)
    fig.suptitle(f"{dataset_names(summary)}: test images in 2-D (PCA of L2-normalised "
                 "features, "
                 "fit on the training images)", fontsize=9)
    _save(fig, path)


def report_figures(
    summary: str | Path, data: str | Path, evals: list[str | Path],
    histories: list[str | Path], accuracy: str | Path, paired: str | Path,
    purity: str | Path, curves: str | Path, per_class: str | Path, embeddings: str | Path,
) -> None:
    """Every figure of the report's results pages, from the experiment's tables and files."""
    from pipeline.io import load_prepared

    s = pd.read_csv(summary)
    prepared = load_prepared(data)
    accuracy_chart(s, accuracy)
    paired_chart(s, paired)
    accuracy_vs_purity(s, purity)
    train_histories(histories, curves)
    per_class_chart(evals, s, list(prepared.classes), per_class)
    embedding_map(evals, s, prepared.labels, list(prepared.classes), embeddings)
    print(f"figures: {len(s)} configurations, {len(histories)} training histories, "
          f"best neighbour configuration {best_run(s)}", flush=True)
