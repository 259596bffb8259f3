"""Aggregate stage: metrics JSONs into the results table, the seed summary and paired tests."""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

import pandas as pd

from pipeline.io import atomic_path, read_json

# The documented columns, in this order; the weighted-kNN columns (knn<k>_top1/_top5, one
# pair per evaluate.knn_k) follow top5, then TAIL, then anything else sorted by name.
COLUMNS = ["dataset", "run", "stage", "method", "variant", "source", "latent", "metric", "round",
           "seed", "top1", "top5"]
TAIL = ["purity_at_1", "purity_at_k", "feature_dim", "epochs", "train_seconds", "eval_seconds",
        "device", "n_train", "n_test"]
# References first (pixels, latent spaces, the untrained encoder), then every method's runs.
STAGE_ORDER = {"pixels": 0, "latent": 1, "untrained": 2}
# The reference every method's baseline is compared with (the methods side by side).
REFERENCE = "byol-baseline"
KNN = re.compile(r"^knn(\d+)_top([15])$")


def knn_columns(columns) -> list[str]:
    """The weighted-kNN accuracy columns present, ordered by k, top-1 before top-5."""
    found = [(int(m[1]), int(m[2]), c) for c in columns if (m := KNN.match(c))]
    return [c for *_, c in sorted(found)]


def accuracy_columns(columns) -> list[str]:
    """Every accuracy column of the table: top1, top5, then the kNN columns."""
    return [c for c in ("top1", "top5") if c in columns] + knn_columns(columns)


def order_rows(df: pd.DataFrame) -> pd.DataFrame:
    """References first (pixels, latents, the untrained encoder), then the trained runs."""
    order = df["stage"].map(STAGE_ORDER).fillna(9)
    return (df.assign(_o=order).sort_values(["dataset", "_o", "run", "seed"], kind="stable")
            .drop(columns="_o").reset_index(drop=True))


def collect(paths: list[str | Path]) -> pd.DataFrame:
    """One row per metrics JSON, the documented columns first, sorted stage, run, seed."""
    rows = []
    for p in paths:
        row = read_json(p)
        rows.append({k: v for k, v in row.items() if not isinstance(v, (dict, list))})
    df = pd.DataFrame(rows)
    for c in COLUMNS + TAIL:
        if c not in df:
            df[c] = pd.NA
    for c in ("seed", "round"):
        df[c] = pd.to_numeric(df[c]).astype("Int64")
    head = COLUMNS + knn_columns(df.columns) + TAIL
    df = df[head + sorted(set(df.columns) - set(head))]
    return order_rows(df)


def paired_difference(
    variant: pd.Series, baseline: pd.Series, level: float = 0.95
) -> tuple[float, float, float, int]:
    """Mean of variant - baseline over the seeds both have, with a t confidence interval.

    Args:
        variant, baseline: accuracy per seed (index = seed).
        level: coverage of the interval.

    Returns:
        (mean difference, interval low, interval high, number of pairs). The interval is
        mean +- t_{(1+level)/2, n-1} * sd / sqrt(n) (sd with n - 1 degrees of freedom), NaN
        with fewer than two pairs; the mean is NaN with none.
    """
    from scipy import stats

    both = pd.concat([variant.rename("v"), baseline.rename("b")], axis=1, join="inner").dropna()
    d = (both["v"] - both["b"]).to_numpy(dtype=float)
    n = len(d)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(d.mean())
    if n < 2:
        return mean, math.nan, math.nan, 1
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def verdict(low: float, high: float, n: int) -> str:
    """Plain words for a paired interval of variant - baseline."""
    if n < 2 or math.isnan(low):
        return "n < 2: no interval"
    if low > 0:
        return "better than baseline"
    if high < 0:
        return "worse than baseline"
    return "no significant difference"


def versus_of(row) -> str | None:
    """The run a trained configuration is compared with on the same seeds: its method's
    baseline, or (for a method's baseline) the reference method's; None for references."""
    method = row.get("method")
    if not isinstance(method, str) or not method:
        return None
    if row.get("variant") != "baseline":
        return f"{method}-baseline"
    return REFERENCE if row.get("run") != REFERENCE else None


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (dataset, run): seeds, mean and std of every accuracy column,
    and the paired difference to the configuration it answers to: a neighbour
    configuration to its own method's baseline (``simclr-probabilistic-ae-cosine`` to
    ``simclr-baseline``), another method's baseline to ``byol-baseline``.

    Paired columns, for top1 and each ``knn<k>_top1``: ``<col>_diff`` (mean over seeds of
    run - baseline on the same seed), ``<col>_diff_ci95_low`` / ``_high`` (t interval) and
    ``n_pairs``; ``versus`` names the baseline; ``top1_verdict`` says in words whether the
    interval excludes 0.
    """
    acc = accuracy_columns(df.columns)
    paired = ["top1"] + [c for c in knn_columns(df.columns) if c.endswith("_top1")]
    out = []
    for (dataset, run), g in df.groupby(["dataset", "run"], sort=False):
        first = g.iloc[0]
        row = {"dataset": dataset, "run": run,
               **{c: first.get(c) for c in ("stage", "method", "variant", "source", "latent",
                                            "metric", "round")},
               "n_seeds": len(g),
               "seeds": " ".join(str(int(s)) for s in g["seed"].dropna().tolist())}
        for c in acc:
            values = pd.to_numeric(g[c], errors="coerce")
            row[f"{c}_mean"] = values.mean()
            row[f"{c}_std"] = values.std(ddof=1) if values.notna().sum() > 1 else math.nan
        for c in ("purity_at_1", "purity_at_k"):
            if c in g:
                row[c] = pd.to_numeric(g[c], errors="coerce").mean()
        versus = versus_of(first)
        row["versus"] = versus or ""
        base = df[(df["dataset"] == dataset) & (df["run"] == versus)]
        for c in paired:
            if versus and len(base):
                mean, low, high, n = paired_difference(
                    pd.to_numeric(g.set_index("seed")[c], errors="coerce"),
                    pd.to_numeric(base.set_index("seed")[c], errors="coerce"))
            else:
                mean, low, high, n = math.nan, math.nan, math.nan, pd.NA
            row[f"{c}_diff"], row[f"{c}_diff_ci95_low"], row[f"{c}_diff_ci95_high"] = (
                mean, low, high)
            if c == "top1":
                row["n_pairs"] = n
                row["top1_verdict"] = verdict(low, high, n) if n is not pd.NA else ""
        out.append(row)
    summary = pd.DataFrame(out)
    if len(summary):
        summary["n_pairs"] = summary["n_pairs"].astype("Int64")
    return summary


def add_purity(df: pd.DataFrame, purity: pd.DataFrame) -> pd.DataFrame:
    """Fill purity_at_1/purity_at_k of rows whose neighbours came from (latent, metric).

    Args:
        df: the collected table.
        purity: the neighbours stage's purity table (columns space, metric, purity_at_1,
            purity_at_k, ...).
    """
    lookup = {(r.space, r.metric): (r.purity_at_1, r.purity_at_k)
              for r in purity.itertuples(index=False)}
    # Only runs that trained on the latent space's own table: a refresh round mined another
    # encoder's features (its purity is in its history), the queue its own projections.
    mined = [src == "latent" for src in df["source"]]
    df = df.copy()
    for col, i in (("purity_at_1", 0), ("purity_at_k", 1)):
        df[col] = pd.to_numeric(
            [lookup.get((lat, met), (None, None))[i] if ok else None
             for ok, lat, met in zip(mined, df["latent"], df["metric"], strict=True)],
            errors="coerce")
    return df


def add_neighbour_flags(df: pd.DataFrame, purity: pd.DataFrame) -> pd.DataFrame:
    """Copy the neighbours stage's quality gate (``flagged``, ``flag_reason`` of the purity
    table) into ``neighbour_flag`` / ``neighbour_flag_reason``: a run trained on a latent
    space's table takes its (latent, metric)'s, a latent row its flags under every metric
    (reasons prefixed with the metric). Other rows, and tables without the gate's columns,
    are left empty."""
    if not {"flagged", "flag_reason"} <= set(purity.columns):
        return df
    gate = {(r.space, r.metric): (str(r.flagged).lower() == "true", r.flag_reason)
            for r in purity.itertuples(index=False) if r.space != "pixels"}
    flags, reasons = [], []
    for stage, src, lat, met in zip(df["stage"], df["source"], df["latent"], df["metric"],
                                    strict=True):
        if not isinstance(lat, str) or not lat:
            hits = None
        elif src == "latent":
            hits = [gate[(lat, met)]] if (lat, met) in gate else None
        elif stage == "latent":
            hits = [(f, f"{m}: {why}" if f else "") for (sp, m), (f, why) in gate.items()
                    if sp == lat] or None
        else:
            hits = None
        flags.append(pd.NA if hits is None else any(f for f, _ in hits))
        reasons.append("" if hits is None else "; ".join(w for f, w in hits if f))
    return df.assign(neighbour_flag=pd.array(flags, dtype="boolean"),
                     neighbour_flag_reason=reasons)


# ----------------------------------------------------------------------------- text and HTML


def _pm(mean, std) -> str:
    if pd.isna(mean):
        return ""
    return f"{mean:.4f}" + (f" ± {std:.4f}" if not pd.isna(std) else "")


def _diff(mean, low, high) -> str:
    if pd.isna(mean):
        return ""
    interval = f" [{low:+.4f}, {high:+.4f}]" if not pd.isna(low) else " [n < 2]"
    return f"{mean:+.4f}{interval}"


def summary_display(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as strings for people: mean ± std, difference [95 % interval]; the linear
    top-1 and its paired difference first, empty columns left out."""
    acc = [c[:-5] for c in summary.columns if c.endswith("_mean")]
    paired = [c[:-5] for c in summary.columns if c.endswith("_diff")]

    def mean_std(c):
        return [_pm(m, s) for m, s in zip(summary[f"{c}_mean"], summary[f"{c}_std"],
                                          strict=True)]

    def diff(c):
        return [_diff(m, lo, hi) for m, lo, hi in zip(
            summary[f"{c}_diff"], summary[f"{c}_diff_ci95_low"], summary[f"{c}_diff_ci95_high"],
            strict=True)]

    out = pd.DataFrame({"run": summary["run"], "seeds": summary["n_seeds"]})
    if len(summary["dataset"].unique()) > 1:
        out.insert(0, "dataset", summary["dataset"])
    out["top1"] = mean_std("top1")
    out["Δ top1 vs baseline [95 % CI]"] = diff("top1")
    if "versus" in summary:
        out["baseline"] = summary["versus"].fillna("")
    out["pairs"] = summary["n_pairs"].map(lambda v: "" if pd.isna(v) else str(v))
    out["verdict (top-1)"] = summary["top1_verdict"].fillna("")
    for c in acc:
        if c != "top1":
            out[c.replace("_", " ")] = mean_std(c)
    for c in paired:
        if c != "top1":
            out[f"Δ {c.replace('_', ' ')} [95 % CI]"] = diff(c)
    if "purity_at_k" in summary:
        out["purity@k"] = summary["purity_at_k"].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    return out[[c for c in out.columns if (out[c].astype(str) != "").any()]]


def summary_text(summary: pd.DataFrame) -> str:
    """The summary as a fixed-width text table (printed to the aggregate log)."""
    show = summary_display(summary)
    keep = [c for c in show.columns if "top5" not in c]
    return show[keep].to_string(index=False)


STYLE = """<style>
body { font-family: system-ui, sans-serif; font-size: 13px; margin: 12px; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; position: sticky; top: 0; }
tr:nth-child(even) td { background: #fafafa; }
td.better { background: #d9f2d9 !important; } td.worse { background: #f8d7d7 !important; }
p { max-width: 70em; line-height: 1.4; }
</style>"""


def html_page(df: pd.DataFrame, title: str, intro: str) -> str:
    """A self-contained HTML page: heading, explanatory paragraph(s), the table."""
    df = df.copy()
    # Text columns left, numbers (also "0.98 ± 0.01" and "+0.01 [...]" strings) right.
    text = [not all(re.match(r"^[-+]?\d", str(v)) for v in df[c] if str(v) not in ("", "nan",
                                                                                    "<NA>"))
            for c in df.columns]
    for c in df.columns:  # nullable integers print <NA>; an empty cell reads better
        if isinstance(df[c].dtype, pd.Int64Dtype):
            df[c] = df[c].astype(object).where(df[c].notna(), "")
    table = df.to_html(index=False, na_rep="", border=0, escape=True,
                       float_format=lambda v: f"{v:.4f}")
    for word in ("better", "worse"):
        table = table.replace(f"<td>{word} than baseline</td>",
                              f'<td class="{word}">{word} than baseline</td>')
    left = ", ".join(f"td:nth-child({i + 1}), th:nth-child({i + 1})"
                     for i, t in enumerate(text) if t)
    style = STYLE + (f"<style>{left} {{ text-align: left; }}</style>" if left else "")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title>{style}</head><body><h2>{html.escape(title)}</h2>{intro}{table}"
            "</body></html>\n")


SUMMARY_INTRO = """<p>One row per configuration. Accuracy columns are mean ± standard deviation
over the seeds (no ± with one seed). <b>top1</b>/<b>top5</b>: frozen-feature linear probe
(logistic regression); <b>knn&lt;k&gt; top1/top5</b>: weighted kNN with k neighbours
(cosine similarity, weights exp(sim / T)); top-5 only with more than 5 classes.
<b>Δ … vs baseline</b>: for each neighbour configuration, the mean over seeds of
(this run − its method's baseline, e.g. simclr-baseline) trained with the same seed, and
for each other method's baseline the same against byol-baseline; its 95 % t-interval
(mean ± t<sub>0.975, n−1</sub> · sd / √n over the n <b>pairs</b>). The verdict reads the
top-1 interval: <i>better</i> or <i>worse</i> only when the interval excludes 0.</p>"""

TABLE_INTRO = """<p>Every evaluated representation, one row per run and seed: raw pixels, each
latent space, the untrained encoder and every trained run. Empty cells do not apply.</p>"""


def dataset_names(df: pd.DataFrame) -> str:
    """The data sets a table holds, comma-separated (figure and page titles)."""
    return ", ".join(sorted(df["dataset"].astype(str).unique()))


def overview_rst(df: pd.DataFrame, data_path: str | Path | None) -> str:
    """Landing-page lines of the report: the data set and its image counts."""
    lines = []
    datasets = dataset_names(df)
    if data_path is not None:
        from pipeline.io import load_prepared

        data = load_prepared(data_path)
        n, h, w, c = data.images.shape
        splits = ", ".join(f"{int((data.split == s).sum()):,} {s}"
                           for s in ("train", "test", "unlabeled") if (data.split == s).any())
        lines.append(f"**Data set** ``{datasets}``: {n:,} images of {h}×{w} px, {c} "
                     f"channel{'s' if c > 1 else ''}, {len(data.classes)} classes; split "
                     f"{splits}.")
    first = df.iloc[0] if len(df) else None
    if first is not None:
        rows = f"{len(df)} row" + ("s" if len(df) != 1 else "")
        lines.append(f"**Evaluation** (linear probe and weighted kNN) fits on the "
                     f"{int(first['n_train']):,} labelled training images and scores the "
                     f"{int(first['n_test']):,} labelled test images; the results table has "
                     f"{rows}.")
    return "\n\n".join(lines) + "\n"


def aggregate(
    inputs: list[str | Path], out: str | Path, purity: str | Path | None = None,
    summary: str | Path | None = None, table_html: str | Path | None = None,
    summary_html: str | Path | None = None, overview: str | Path | None = None,
    data: str | Path | None = None,
) -> pd.DataFrame:
    """Write the experiment's results table (one row per metrics JSON, purity joined where it
    applies) and, when asked, its seed summary with paired differences (CSV and HTML), the
    table as HTML and the report's overview; print the summary."""
    df = collect(inputs)
    if purity is not None:
        df = add_purity(df, pd.read_csv(purity))
        df = add_neighbour_flags(df, pd.read_csv(purity, keep_default_na=False))
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False, float_format="%.4f")
    s = summarise(df)
    if summary is not None:
        with atomic_path(summary) as tmp:
            s.to_csv(tmp, index=False, float_format="%.5f")
    if table_html is not None:
        with atomic_path(table_html) as tmp:
            shown = df[[c for c in df.columns if df[c].notna().any()]]
            tmp.write_text(html_page(shown, f"{dataset_names(df)}: every run", TABLE_INTRO),
                           encoding="utf-8")
    if summary_html is not None:
        with atomic_path(summary_html) as tmp:
            title = f"{dataset_names(df)}: summary over seeds, paired differences to each baseline"
            n_test = pd.to_numeric(df["n_test"], errors="coerce").max()
            scale = (f"<p>{int(n_test):,} test images: one image is {1 / n_test:.4f} of "
                     "accuracy.</p>" if n_test > 0 else "")
            tmp.write_text(html_page(summary_display(s), title, SUMMARY_INTRO + scale),
                           encoding="utf-8")
    if overview is not None:
        with atomic_path(overview) as tmp:
            tmp.write_text(overview_rst(df, data), encoding="utf-8")
    print(f"aggregate: {len(df)} rows, {len(s)} configurations -> {out}", flush=True)
    print(summary_text(s), flush=True)
    return df


def combine(current: str | Path, out: str | Path) -> pd.DataFrame:
    """Write every experiment's table side by side: ``current`` plus each other
    ``<results>/*/linear_eval.csv`` on disk (``<results>`` = the folder of ``out``).

    Rows of another table whose data set also appears in ``current`` are dropped, so an
    experiment is never counted twice. Columns are the union, ``current``'s first; cells are
    copied as text; rows are sorted by data set, each table's own order kept.
    """
    current, out = Path(current), Path(out)

    def read(path: Path) -> pd.DataFrame:  # as text: cells are copied, never reformatted
        return pd.read_csv(path, dtype=str, keep_default_na=False)

    frames = [read(current)]
    names = set(frames[0]["dataset"].astype(str))
    used = [str(current)]
    for path in sorted(out.parent.glob("*/linear_eval.csv")):
        if path.resolve() == current.resolve():
            continue
        other = read(path)
        other = other[~other["dataset"].astype(str).isin(names)]
        if len(other):
            frames.append(other)
            used.append(str(path))
            names |= set(other["dataset"].astype(str))
    df = pd.concat(frames, ignore_index=True, sort=False)
    df = df.sort_values("dataset", kind="stable").reset_index(drop=True)
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False)
    counts = df.groupby("dataset", sort=False).size()
    print(f"combine: {len(df)} rows -> {out} ("
          + ", ".join(f"{d}: {n}" for d, n in counts.items()) + "); from " + ", ".join(used),
          flush=True)
    return df
