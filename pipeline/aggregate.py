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
        "run_seconds", "device", "n_train", "n_test", "code_version", "torch", "python", "host"]
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


# Cells a source writes as text (a latent export's Parquet metadata holds only strings).
_INT = re.compile(r"^[-+]?\d+$")
_BOOL = {"true": True, "false": False}


def _empty(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) or (
        isinstance(v, str) and v == "")


def _kind(values: list) -> str:
    """``bool``, ``int``, ``float`` or ``str``: the one type of a column's non-empty cells,
    whether a JSON wrote them typed (``True``, ``32``) or as text (``"false"``, ``"2"``)."""
    cells = [v for v in values if not _empty(v)]
    if not cells:
        return "str"
    if all(isinstance(v, bool) or str(v).lower() in _BOOL for v in cells):
        return "bool"
    if all(isinstance(v, int) or isinstance(v, str) and _INT.match(v) for v in cells):
        return "int"
    try:
        [float(v) for v in cells]
    except (TypeError, ValueError):
        return "str"
    return "float"


# Names, never numbers, whatever they look like (a data-set tag may be "2024").
TEXT = {"dataset", "run", "stage", "method", "variant", "source", "latent", "metric", "device",
        "code_version", "torch", "python", "host"}


def typed(df: pd.DataFrame) -> pd.DataFrame:
    """Every column as one type: booleans as pandas ``boolean`` (``true``, ``"False"`` alike),
    integers as ``Int64`` (a ``batch_size`` never turns float because another row lacks it),
    numbers as float, the rest (and the :data:`TEXT` columns) as text; empty cells as NA."""
    df = df.copy()
    for c in df.columns:
        if c in TEXT:
            continue
        values = df[c].tolist()
        kind = _kind(values)
        empty = [_empty(v) for v in values]
        if kind == "bool":
            df[c] = pd.array([pd.NA if e else (v if isinstance(v, bool) else
                                               _BOOL[str(v).lower()])
                              for v, e in zip(values, empty, strict=True)], dtype="boolean")
        elif kind == "int":
            df[c] = pd.array([pd.NA if e else int(v) for v, e in zip(values, empty, strict=True)],
                             dtype="Int64")
        elif kind == "float":
            df[c] = [math.nan if e else float(v) for v, e in zip(values, empty, strict=True)]
    return df


def _provenance(row: dict) -> dict:
    """The evaluation's provenance as columns; ``code_version`` is the evaluated artifact's
    own where it records one (a latent export), else the evaluation's."""
    prov = row.get("provenance") if isinstance(row.get("provenance"), dict) else {}
    out = {k: prov[k] for k in ("torch", "python", "host") if k in prov}
    out["code_version"] = row.get("code_version") or prov.get("code_version")
    return out


def collect(paths: list[str | Path]) -> pd.DataFrame:
    """One row per metrics JSON, the documented columns first, sorted stage, run, seed; each
    column of one type (:func:`typed`); ``run_seconds`` = training plus evaluation time."""
    rows = []
    for p in paths:
        row = read_json(p)
        rows.append({**{k: v for k, v in row.items() if not isinstance(v, (dict, list))},
                     **_provenance(row)})
    df = pd.DataFrame(rows)
    for c in COLUMNS + TAIL:
        if c not in df:
            df[c] = pd.NA
    df = typed(df)
    # Columns every table has, typed even when no row fills them (top5 with few classes).
    for c in ("seed", "round"):
        df[c] = pd.to_numeric(df[c]).astype("Int64")
    for c in ("top1", "top5", "train_seconds", "eval_seconds"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    # The time a row cost: its training (a latent model's, a method's) plus its evaluation.
    df["run_seconds"] = df[["train_seconds", "eval_seconds"]].sum(axis=1, min_count=1)
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
    both = pd.concat([variant.rename("v"), baseline.rename("b")], axis=1, join="inner").dropna()
    d = (both["v"] - both["b"]).to_numpy(dtype=float)
    n = len(d)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(d.mean())
    if n < 2:
        return mean, math.nan, math.nan, 1
    half = t_half_width(float(d.std(ddof=1)), n, level)
    return mean, mean - half, mean + half, n


def t_half_width(sd: float, n: int, level: float = 0.95) -> float:
    """Half-width t_{(1+level)/2, n-1} * sd / sqrt(n) of the t interval of a mean over n
    values with standard deviation ``sd`` (n - 1 degrees of freedom); NaN with n < 2.

    The quantile is ``scipy.special.stdtrit``, the function ``scipy.stats.t.ppf`` calls
    (the same values, bit for bit), without importing ``scipy.stats`` (about 2 s)."""
    if n < 2 or pd.isna(sd):
        return math.nan
    from scipy.special import stdtrit

    return float(stdtrit(n - 1, 0.5 + level / 2) * sd / math.sqrt(n))


# A paired interval narrower than this has no spread: every seed pair differed by the same
# amount. Accuracies move in whole test images, so a few seeds often do (each +2 images);
# a t interval needs a spread to judge, so such a difference is reported, never counted.
NO_SPREAD = 1e-9


def verdict(low: float, high: float, n: int) -> str:
    """Plain words for a paired interval of variant - baseline."""
    if n < 2 or math.isnan(low):
        return "n < 2: no interval"
    if high - low <= NO_SPREAD and abs(low + high) / 2 > NO_SPREAD:
        return "no spread: the same difference on every seed pair"
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

    Also, for top1 and each ``knn<k>_top1``, ``<col>_ci95_low`` / ``_high``: the t interval
    of the mean over seeds (for the charts); the time one run of the configuration took,
    mean over seeds (``run_seconds`` = ``train_seconds`` + ``eval_seconds``, the columns
    present); and the ``code_version`` of its rows.
    """
    acc = accuracy_columns(df.columns)
    paired = ["top1"] + [c for c in knn_columns(df.columns) if c.endswith("_top1")]
    seconds = [c for c in ("run_seconds", "train_seconds", "eval_seconds") if c in df]
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
            if c in paired:
                half = t_half_width(row[f"{c}_std"], int(values.notna().sum()))
                row[f"{c}_ci95_low"] = row[f"{c}_mean"] - half
                row[f"{c}_ci95_high"] = row[f"{c}_mean"] + half
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
        for c in seconds:
            row[c] = pd.to_numeric(g[c], errors="coerce").mean()
        if "code_version" in g:
            row["code_version"] = " ".join(sorted({str(v) for v in g["code_version"].dropna()
                                                   if str(v)}))
        out.append(row)
    summary = pd.DataFrame(out)
    if len(summary):
        summary["n_pairs"] = summary["n_pairs"].astype("Int64")
        summary["round"] = pd.to_numeric(summary["round"]).astype("Int64")
    return summary


def _label(col: str) -> str:
    """``top1`` -> ``linear top-1``, ``knn20_top1`` -> ``knn20 top-1``."""
    return "linear top-1" if col == "top1" else col.replace("_top1", " top-1").replace(
        "_top5", " top-5")


def paired_columns(summary: pd.DataFrame) -> list[str]:
    """The accuracy columns with a paired difference: top1, then each kNN top-1."""
    return [c[:-5] for c in summary.columns if c.endswith("_diff")]


def differs(summary: pd.DataFrame) -> pd.Series:
    """Per configuration: whether a paired 95 % interval to its baseline (linear-probe or
    any kNN top-1) excludes 0, as :func:`verdict` reads it."""
    n = summary["n_pairs"] if "n_pairs" in summary else pd.Series(pd.NA, summary.index)
    hits = [False] * len(summary)
    for c in paired_columns(summary):
        hits = [h or (not pd.isna(k) and verdict(lo, hi, int(k)).endswith("than baseline"))
                for h, lo, hi, k in zip(hits, summary[f"{c}_diff_ci95_low"],
                                        summary[f"{c}_diff_ci95_high"], n, strict=True)]
    return pd.Series(hits, index=summary.index, dtype=bool)


def _names(runs: list[str]) -> str:
    return runs[0] if len(runs) == 1 else ", ".join(runs[:-1]) + f" and {runs[-1]}"


def _no_spread(compared: pd.DataFrame) -> str:
    """The sentence naming each paired difference that was the same on every seed pair
    (see :data:`NO_SPREAD`), or ""."""
    items = []
    for r in compared.to_dict("records"):
        n = r.get("n_pairs")
        if pd.isna(n):
            continue
        for c in paired_columns(compared):
            low, high = r[f"{c}_diff_ci95_low"], r[f"{c}_diff_ci95_high"]
            if verdict(low, high, int(n)).startswith("no spread"):
                items.append(f"{r['run']} {_label(c)} {r[f'{c}_diff']:+.4f} on each of "
                             f"{int(n)} seed pairs")
    if not items:
        return ""
    return (" Not counted: the same difference on every seed pair, which leaves a t interval "
            f"nothing to judge (more seeds can): {'; '.join(items)}.")


def _verdict_one(summary: pd.DataFrame) -> str:
    compared = summary[summary["versus"].fillna("").astype(str).ne("")] if (
        "versus" in summary) else summary[:0]
    hit = compared[differs(compared)] if len(compared) else compared
    flat = _no_spread(compared) if len(compared) else ""
    if compared.empty:
        text = "No configuration is compared with a baseline in this experiment."
    elif hit.empty:
        single = int((compared["n_pairs"].fillna(0) < 2).sum())
        text = ("No configuration differs from its baseline: the 95 % paired interval of "
                "the linear-probe and kNN top-1 contains 0 for "
                + ("the one compared configuration" if len(compared) == 1 else
                   f"all {len(compared)} compared configurations")
                + (f" ({single} with one seed pair and no interval)" if single else "")
                + (", where there is an interval" if flat else "") + ".")
    else:
        items = []
        for r in hit.to_dict("records"):
            diffs = ", ".join(
                f"{_label(c)} "
                + diff_text(r[f"{c}_diff"], r[f"{c}_diff_ci95_low"], r[f"{c}_diff_ci95_high"])
                for c in paired_columns(hit) if not pd.isna(r[f"{c}_diff"]))
            items.append(f"{r['run']} vs {r['versus']} ({int(r['n_pairs'])} seed pairs): "
                         f"{diffs}")
        verb = "differs from its" if len(hit) == 1 else "differ from their"
        text = (f"{len(hit)} of {len(compared)} compared configuration"
                f"{'' if len(compared) == 1 else 's'} {verb} baseline (95 % paired interval "
                f"excludes 0): {'; '.join(items)}.")
    text += flat
    means = pd.to_numeric(summary["top1_mean"], errors="coerce")
    if means.notna().any():
        top = float(means.max())
        best = summary.loc[(means - top).abs() <= 1e-12, "run"].astype(str).tolist()
        text += (f" Best mean linear top-1: {best[0]} {top:.4f}." if len(best) == 1 else
                 f" Best mean linear top-1: {top:.4f}, tied between {_names(best)}.")
    return text


def verdict_line(summary: pd.DataFrame) -> str:
    """The experiment's answer in one line: which configurations differ from their baseline
    (the paired 95 % interval of :func:`summarise` excludes 0, linear probe or kNN), with
    the mean difference and interval of each paired column, or that none does; then the
    best mean linear top-1 and its run. One sentence group per data set when there are
    several. Shown on the report's landing page, atop the summary page and in the log."""
    if summary.empty:
        return "No results."
    groups = list(summary.groupby("dataset", sort=False))
    if len(groups) == 1:
        return _verdict_one(summary)
    return " ".join(f"{d}: {_verdict_one(g)}" for d, g in groups)


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


def mean_std_text(mean, std) -> str:
    """``0.9511 ± 0.0042``; the mean alone without a spread, empty without a mean."""
    if pd.isna(mean):
        return ""
    return f"{mean:.4f}" + (f" ± {std:.4f}" if not pd.isna(std) else "")


def diff_text(mean, low, high) -> str:
    """A paired difference for people: ``+0.0133 [-0.0246, +0.0513]``; ``[n < 2]`` without
    an interval, empty without a difference."""
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
        return [mean_std_text(m, s) for m, s in zip(summary[f"{c}_mean"], summary[f"{c}_std"],
                                          strict=True)]

    def diff(c):
        return [diff_text(m, lo, hi) for m, lo, hi in zip(
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
    if "run_seconds" in summary:
        out["time / run"] = summary["run_seconds"].map(duration)
    return out[[c for c in out.columns if (out[c].astype(str) != "").any()]]


def duration(seconds) -> str:
    """Seconds for people: ``8.2 s``, ``3.5 min``, ``1.25 h``; empty when unknown."""
    if pd.isna(seconds):
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def summary_text(summary: pd.DataFrame) -> str:
    """The verdict line above the summary as a fixed-width text table (the aggregate log)."""
    show = summary_display(summary)
    keep = [c for c in show.columns if "top5" not in c]
    return verdict_line(summary) + "\n\n" + show[keep].to_string(index=False)


# Decimals a CSV writes per kind of float column: accuracies and purities (and their means,
# spreads, differences and intervals) 4, seconds 2, anything else 6 significant digits.
_FIXED4 = re.compile(r"(^|_)top[15](_|$)|purity|_(mean|std|diff|ci95_low|ci95_high)$")


def _float_format(column: str) -> str:
    if "seconds" in column:
        return "{:.2f}"
    return "{:.4f}" if _FIXED4.search(column) else "{:.6g}"


def _signless_zero(text: str) -> str:
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    """Write a results table with one spelling per type: booleans ``True``/``False``,
    integers without decimals, floats rounded by column (:func:`_float_format`), empty
    cells for missing values; atomically."""
    out = df.copy()
    for c in out.columns:
        if pd.api.types.is_float_dtype(out[c]):
            fmt = _float_format(c)
            out[c] = ["" if pd.isna(v) else _signless_zero(fmt.format(v)) for v in out[c]]
    with atomic_path(path) as tmp:
        out.to_csv(tmp, index=False)


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


def _rst_table(show: pd.DataFrame) -> str:
    """A DataFrame of strings as a reStructuredText csv-table (every cell quoted)."""
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(
        [list(show.columns), *show.astype(str).values.tolist()])
    body = "".join(f"   {line}\n" for line in buf.getvalue().splitlines())
    return ".. csv-table::\n   :header-rows: 1\n\n" + body


def overview_rst(df: pd.DataFrame, data_path: str | Path | None,
                 summary: pd.DataFrame | None = None) -> str:
    """Landing-page text of the report: the verdict line and the summary table first (the
    answer), then the data set and its image counts."""
    lines = []
    if summary is not None and len(summary):
        show = summary_display(summary)
        keep = [c for c in show.columns
                if "top5" not in c and c not in ("verdict (top-1)", "purity@k", "pairs")]
        lines += [f"**Answer.** {verdict_line(summary)}",
                  "**Summary** (mean ± std over seeds; Δ: paired difference to the "
                  "configuration's baseline on the same seeds, with its 95 % interval; "
                  "details in `summary.html`_):", _rst_table(show[keep])]
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
    write_csv(df, out)
    s = summarise(df)
    if summary is not None:
        write_csv(s, summary)
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
            answer = f"<p><b>Answer.</b> {html.escape(verdict_line(s))}</p>"
            tmp.write_text(html_page(summary_display(s), title, answer + SUMMARY_INTRO + scale),
                           encoding="utf-8")
    if overview is not None:
        with atomic_path(overview) as tmp:
            tmp.write_text(overview_rst(df, data, s), encoding="utf-8")
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
