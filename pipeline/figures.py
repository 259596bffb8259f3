"""Figures of the results report: accuracy, paired differences, purity, histories, embeddings.

Kept apart from ``pipeline.plots`` (the drawing helpers the training stages import), so that
changing a report figure never invalidates a trained model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.aggregate import (
    REFERENCE,
    dataset_names,
    diff_text,
    knn_columns,
    paired_difference,
    t_half_width,
    versus_of,
)
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
    """The neighbour configuration with the highest mean linear top-1 (None if there is none).

    Highest mean only: whether it differs from its baseline is :func:`differing_run`'s call.
    """
    runs = _neighbour_runs(summary)
    return None if runs.empty else str(
        runs.sort_values("top1_mean", ascending=False, kind="stable").iloc[0].run)


def differing_run(summary: pd.DataFrame) -> str | None:
    """The neighbour configuration whose paired 95 % interval of linear top-1 to its baseline
    excludes 0, the largest difference first (None when no configuration differs)."""
    runs = _neighbour_runs(summary)
    if runs.empty or "top1_verdict" not in runs:
        return None
    hit = runs[runs["top1_verdict"].isin(["better than baseline", "worse than baseline"])]
    return None if hit.empty else str(
        hit.sort_values("top1_diff", ascending=False, kind="stable").iloc[0].run)


def _interval(summary: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds and its 95 % t-interval per configuration, cut to [0, 1] (accuracy
    bounds); NaN ends where one run gives no interval."""
    mean = pd.to_numeric(summary[f"{col}_mean"], errors="coerce").to_numpy(float)
    if f"{col}_ci95_low" in summary:
        low = pd.to_numeric(summary[f"{col}_ci95_low"], errors="coerce").to_numpy(float)
        high = pd.to_numeric(summary[f"{col}_ci95_high"], errors="coerce").to_numpy(float)
    else:  # a summary from before the interval columns: from std and the number of seeds
        half = np.array([t_half_width(sd, int(n)) for sd, n in zip(
            summary[f"{col}_std"], summary["n_seeds"], strict=True)], float)
        low, high = mean - half, mean + half
    return mean, np.clip(low, 0, 1), np.clip(high, 0, 1)


def _dots(ax, at, mean, low, high, colours, vertical: bool = False, open_colour=None,
          **kw) -> None:
    """A dot at each ``mean`` (placed at ``at`` on the other axis) with a bar over its
    interval [low, high]; an open dot where ``low`` is NaN (no interval), nothing where the
    mean is NaN. One ``errorbar`` / ``plot`` call per colour, not one per dot: the same
    marks (the same PNG) from a few artists instead of four per dot, faster to build and
    to draw.

    ``open_colour``: the colour of every open dot (default: the dot's own colour).
    """
    mean, low, high = (np.asarray(a, float) for a in (mean, low, high))
    at = np.asarray(at)
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, (m, lo, c) in enumerate(zip(mean, low, colours, strict=True)):
        if not np.isnan(m):
            is_open = bool(np.isnan(lo))
            key = ((open_colour or c) if is_open else c, is_open)
            groups.setdefault(key, []).append(i)
    for (colour, is_open), idx in groups.items():
        m, a = mean[idx], at[idx]
        x, yv = (a, m) if vertical else (m, a)
        if is_open:
            ax.plot(x, yv, "o", mfc="white", color=colour, **kw)
        else:
            err = [m - low[idx], high[idx] - m]
            ax.errorbar(x, yv, **{"yerr" if vertical else "xerr": err}, fmt="o",
                        color=colour, capsize=3, **kw)


def _verdict_colours(low, high) -> list[str]:
    """Per interval: green if it lies above 0, red if below, grey if it holds 0 (or is NaN)."""
    return ["#2a9d4b" if lo > 0 else "#c8382e" if hi < 0 else "#444444"
            for lo, hi in zip(low, high, strict=True)]


def accuracy_chart(summary: pd.DataFrame, path: str | Path):
    """Dot-and-interval chart of accuracy per configuration: a dot at the mean over seeds,
    a bar for the 95 % t-interval of that mean (open dot: one run, no interval); one panel
    for the linear-probe top-1 and one for the weighted-kNN top-1 with the smallest k. Each
    method's baseline mean is a vertical line. Dots, not bars: the axis need not start at 0.

    Returns:
        The (closed) matplotlib figure, for tests to read its axes.
    """
    knn = [c for c in knn_columns([c[:-5] for c in summary.columns if c.endswith("_mean")])
           if c.endswith("_top1")]
    cols = ["top1"] + knn[:1]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols) + 2.6,
                                                    0.32 * len(summary) + 1.6),
                             sharey=True, squeeze=False)
    labels = [r.run + (f" (n={r.n_seeds})" if r.n_seeds > 1 else "")
              for r in summary.itertuples()]
    y = np.arange(len(summary))[::-1]
    colours = [STAGE_COLOURS.get(s, "#55a868") for s in summary["stage"]]
    baselines = summary[summary["run"].astype(str).str.endswith("-baseline")]
    for ax, col in zip(axes[0], cols, strict=True):
        mean, low, high = _interval(summary, col)
        _dots(ax, y, mean, low, high, colours, zorder=3)
        for yi, m in zip(y, mean, strict=True):
            if not np.isnan(m):
                ax.text(1.01, yi, f"{m:.3f}", va="center", fontsize=7,
                        transform=ax.get_yaxis_transform())
        for b in baselines.itertuples():
            m = float(getattr(b, f"{col}_mean"))
            method = str(b.run).removesuffix("-baseline")
            ax.axvline(m, color=STAGE_COLOURS.get(method, "black"), ls="--", lw=1, zorder=1,
                       label=f"{b.run} mean")
        ends = np.concatenate([mean, low, high])
        ends = ends[~np.isnan(ends)]
        lo_end, hi_end = (float(ends.min()), float(ends.max())) if len(ends) else (0.0, 1.0)
        pad = max(0.02, 0.06 * (hi_end - lo_end))
        ax.set_xlim(max(-0.01, lo_end - pad), min(1.01, hi_end + pad))
        name = "linear-probe top-1" if col == "top1" else (
            f"weighted-kNN top-1 (k={col[3:-5]})")
        ax.set_xlabel(f"test accuracy, {name}", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_yticks(y, labels, fontsize=8)
    if len(baselines):
        axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.12, 1.0),
                           frameon=False)
    fig.suptitle(f"{dataset_names(summary)}: accuracy per representation\n"
                 "dot: mean over seeds; bar: 95 % t-interval of the mean (cut at 0 and 1); "
                 "open dot: one run; dashed: each method's baseline mean\n"
                 "grey: raw pixels, blue: latent spaces, other colours: methods",
                 fontsize=9, y=1.0, va="bottom")
    _save(fig, path)
    return fig


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
        _dots(ax, y, mean, low, high, _verdict_colours(low, high), open_colour="#444444")
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
    if "knn_top1" in df and pd.to_numeric(df["knn_top1"], errors="coerce").notna().any():
        df["knn_top1"] = pd.to_numeric(df["knn_top1"], errors="coerce")
        panels.append(("knn_top1", "kNN top-1 on held training images (monitor)"))
    # Mean, min and max over seeds of every panel's column per (run, epoch), in one pass
    # (not one filter and three group-bys per run and panel).
    by_epoch = df.groupby(["run", "epoch"])[[c for c, _ in panels]].agg(
        ["mean", "min", "max"])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.25 * len(panels), 3.8))
    for ax, (col, label) in zip(axes, panels, strict=True):
        for r in runs:
            g = by_epoch.loc[r, col]
            mean, lo, hi = g["mean"], g["min"], g["max"]
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
                    path: str | Path):
    """Per-class linear-probe top-1 of a neighbour configuration and its method's baseline
    (dots: mean over seeds), and per class their paired difference over the same seeds with
    its 95 % t-interval. The configuration is the one whose top-1 interval excludes 0 (it
    "differs"); when none does, the title says so and shows the highest mean instead.

    Returns:
        The (closed) matplotlib figure, or None for the placeholder.
    """
    chosen = differing_run(summary)
    shown = chosen or best_run(summary)
    df = _evals(evals)
    title = "Per-class accuracy"
    base_run = None if shown is None else versus_of(
        summary[summary["run"] == shown].iloc[0].to_dict())
    if shown is None or base_run not in set(df["run"]):
        _placeholder(path, title, "Needs a neighbour configuration and its method's baseline.")
        return None

    def per_seed(run) -> pd.DataFrame:  # rows: seeds, columns: classes
        rows = {(0 if pd.isna(s) else int(s)): [np.nan if v is None else v for v in pc]
                for s, pc in zip(df.loc[df["run"] == run, "seed"],
                                 df.loc[df["run"] == run, "per_class"], strict=True)
                if pc is not None}
        return pd.DataFrame.from_dict(rows, orient="index", dtype=float)

    b, v = per_seed(base_run), per_seed(shown)
    n_cls = max(b.shape[1], v.shape[1])
    diffs = np.array([paired_difference(v[j], b[j])[:3] if j in v and j in b else
                      (np.nan,) * 3 for j in range(n_cls)], float).reshape(-1, 3)
    names = [classes[i] if i < len(classes) else str(i) for i in range(n_cls)]
    x = np.arange(n_cls)
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.5 * n_cls + 2), 5.4),
                                      sharex=True, height_ratios=[1.2, 1])
    top.plot(x - 0.1, b.mean().reindex(range(n_cls)), "o", color="#555555",
             label=f"{base_run} (n={len(b)})")
    top.plot(x + 0.1, v.mean().reindex(range(n_cls)), "o", color="#dd8452",
             label=f"{shown} (n={len(v)})")
    top.set_ylabel("test top-1 of the class\n(mean over seeds)", fontsize=8)
    top.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    top.grid(axis="y", alpha=0.3)
    _dots(bottom, x, diffs[:, 0], diffs[:, 1], diffs[:, 2],
          _verdict_colours(diffs[:, 1], diffs[:, 2]), vertical=True, open_colour="#444444")
    bottom.axhline(0, color="black", lw=0.8)
    low, high = bottom.get_ylim()  # a difference of accuracies lies in [-1, 1]
    bottom.set_ylim(max(low, -1.05), min(high, 1.05))
    bottom.set_ylabel(f"Δ top-1 of the class\n({shown} − {base_run})", fontsize=8)
    bottom.grid(axis="y", alpha=0.3)
    bottom.set_xticks(x, names, fontsize=8, rotation=45 if max(map(len, names)) > 3 else 0)
    for ax in (top, bottom):
        ax.tick_params(labelsize=7)
    row = summary[summary["run"] == shown].iloc[0]
    overall = _diff_text(row)
    if chosen is not None:
        head = f"{shown} differs from {base_run} (linear top-1 Δ {overall})"
    else:
        head = (f"no configuration differs from its baseline (every linear top-1 95 % "
                f"paired interval contains 0);\nshown: the highest mean top-1, {shown} "
                f"(Δ {overall})")
    fig.suptitle(f"{dataset_names(summary)}: {title}: {head}\nbottom: per class, mean "
                 "paired difference over seeds and its 95 % t-interval (green/red: excludes 0;"
                 " open dot: one pair)", fontsize=9, y=1.0, va="bottom")
    _save(fig, path)
    return fig


def _diff_text(row) -> str:
    """``+0.0133 [-0.0246, +0.0513]`` of a summary row's linear top-1 paired difference."""
    return diff_text(row.get("top1_diff"), row.get("top1_diff_ci95_low"),
                     row.get("top1_diff_ci95_high")) or "none"


def embedding_map(evals: list[str | Path], summary: pd.DataFrame, labels: np.ndarray,
                  classes: list[str], path: str | Path) -> None:
    """2-D PCA (of L2-normalised features, fit on the training images) of the test images in
    each latent space and in the trained encoders (each method's baseline and the neighbour
    configuration with the highest mean top-1, first seed), coloured by label."""
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
    print(f"figures: {len(s)} configurations, {len(histories)} training histories; "
          f"differs from its baseline: {differing_run(s) or 'none'}; highest mean neighbour "
          f"configuration: {best_run(s)}", flush=True)
