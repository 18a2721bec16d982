"""The study's plots, logged on its parent run: learning curves per seed, and test
accuracy per method with every run shown and the spread over seeds. Pure: they take
numbers (histories and tables), never a tracking session."""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np


def figures(histories: dict, roles: dict, tables: list) -> dict:
    return {
        "learning_curves.png": learning_curves(histories, roles),
        "accuracy_by_method.png": accuracy_by_method(tables),
    }


def learning_curves(histories: dict, roles: dict):
    """``histories``: {run name: {metric: [(epoch, value), ...]}}; ``roles``: {run name:
    "teacher" | "student"} (teachers solid, students dashed)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name in sorted(histories):
        style = "-" if roles.get(name) == "teacher" else "--"
        for ax, key in ((ax_loss, "train_loss"), (ax_acc, "val_acc")):
            points = histories[name].get(key)
            if points:
                ax.plot(*zip(*points, strict=True), style, label=name)
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy")
    ax_acc.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def accuracy_by_method(tables: list):
    """One panel per group of comparable runs (a study of another student architecture
    has two): each method's runs as points, and the mean +- std over seeds."""
    n = max(1, len(tables))
    fig, axes = plt.subplots(1, n, figsize=(7 * n, 4), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], tables, strict=False):
        groups = [
            ("single", t.seeds["test_acc"]),
            ("ensemble", t.ensembles["test_acc"]),
            ("KD", t.kd["test_acc"]),
            ("SD", t.self_distillation["student_test_acc"]),
            ("SD ensemble", t.sd_ensembles["test_acc"]),
        ]
        for i, (_label, values) in enumerate(groups):
            values = values.dropna().astype(float)
            if len(values) == 0:
                continue
            ax.scatter([i] * len(values), values, alpha=0.6)
            if len(values) > 1:
                ax.errorbar(i + 0.15, values.mean(), yerr=values.std(ddof=1), fmt="o", color="black", capsize=4)
        ax.set_xticks(range(len(groups)), [g for g, _ in groups])
        ax.set_title(f"{t.label}\nbars: mean ± std over seeds", fontsize=9)
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.suptitle("Test accuracy by method")
    fig.tight_layout()
    return fig


def gains(table):
    """Each gain as a point with its 95% paired-bootstrap interval, and a zero line.
    ``table``: the rows of kd_mlflow.gains (gain, estimate, lo, hi)."""
    rows = list(table.itertuples())
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    for i, r in enumerate(rows):
        ax.errorbar(r.estimate, i, xerr=[[r.estimate - r.lo], [r.hi - r.estimate]], fmt="o", color="black", capsize=4)
    ax.axvline(0, color="grey", lw=1, ls="--")
    ax.set_yticks(range(len(rows)), [r.gain for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("gain in test accuracy (points), 95% paired bootstrap interval over test images")
    ax.set_title("Gains and their uncertainty")
    fig.tight_layout()
    return fig


def measures(t, reliability: dict) -> dict:
    """A group's Figure 1, reliability diagrams and ensemble-size curve (``t``: its
    compare.StudyTables; ``reliability``: title -> bins, as measures.reliability gives)."""
    return {
        "figure1.png": figure1(t.figure1),
        "reliability.png": reliability_diagrams(reliability),
        "ensemble_size.png": ensemble_size(t.ensemble_size),
    }


# Figure 1's two kinds of interval, drawn apart and named in the legend: a column that is
# a mean over seeds has its t interval; a column of one run has its gain's paired
# bootstrap interval (over test images), placed on its accuracy.
FIGURE1_KINDS = {
    "seeds": ("o", "black", "mean over seeds, 95% t interval"),
    "bootstrap": ("s", "tab:blue", "one run, 95% paired bootstrap of its gain over the mean single"),
    "none": ("D", "tab:gray", "no interval (one seed, or no predictions)"),
}


def figure1_points(table) -> list[dict]:
    """Each column's point: its accuracy, its interval (lo, hi) and which kind it is."""
    points = []
    for i, r in enumerate(table.itertuples()):
        if r.test_acc != r.test_acc:  # NaN: no run of this column
            continue
        if r.seed_lo == r.seed_lo:
            kind, lo, hi = "seeds", r.seed_lo, r.seed_hi
        elif r.gain_lo == r.gain_lo:
            base = r.test_acc - r.gain
            kind, lo, hi = "bootstrap", base + r.gain_lo, base + r.gain_hi
        else:
            kind, lo, hi = "none", None, None
        points.append({"x": i, "column": r.column, "test_acc": r.test_acc, "kind": kind, "lo": lo, "hi": hi})
    return points


def reference_span(text) -> tuple[float, float] | None:
    """A published number as the table holds it, as (lo, hi): "85.46-86.39" a range,
    "96.70 ± 0.21" or "89.07" a point; None where there is none."""
    if not isinstance(text, str):
        return None
    numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", text)]
    if "±" in text or len(numbers) == 1:
        return (numbers[0], numbers[0])
    return (numbers[0], numbers[1]) if len(numbers) == 2 else None


def figure1(table):
    """Figure 1's five columns: each column's test accuracy with its 95% interval, the
    kind of interval in the legend, and the report's or the paper's number where the
    table gives one."""
    fig, ax = plt.subplots(figsize=(8, 4.6))
    for kind, (marker, color, label) in FIGURE1_KINDS.items():
        mine = [p for p in figure1_points(table) if p["kind"] == kind]
        if not mine:
            continue
        yerr = None
        if kind != "none":
            yerr = [[p["test_acc"] - p["lo"] for p in mine], [p["hi"] - p["test_acc"] for p in mine]]
        x, y = [p["x"] for p in mine], [p["test_acc"] for p in mine]
        ax.errorbar(x, y, yerr=yerr, fmt=marker, color=color, capsize=5, label=label)
    rows = list(table.itertuples())
    for source in ("report", "paper"):
        spans = [(i + 0.15, span) for i, r in enumerate(rows) if (span := reference_span(getattr(r, source, None)))]
        for k, (at, span) in enumerate(spans):  # a range over seeds as a bar, a number as a cross
            name = f"the {source}'s number (a range: its seeds' span)" if k == 0 else None
            ax.plot([at, at], list(span), "x-", color="tab:red", ms=8, lw=1.5, label=name)
    ax.set_xticks(range(len(rows)), [f"{r.column}\n(n={int(r.n)})" for r in rows])
    ax.set(ylabel="test accuracy (%)", title="Figure 1: test accuracy")
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, -0.42), ncol=1, frameon=False)
    fig.tight_layout()
    return fig


def reliability_diagrams(bins: dict):
    """One reliability diagram per model: accuracy per confidence bin, the diagonal
    being perfect calibration; bar width is the bin's width."""
    fig, axes = plt.subplots(1, max(1, len(bins)), figsize=(3.2 * max(1, len(bins)), 3.4), squeeze=False)
    for ax, (title, b) in zip(axes[0], bins.items(), strict=False):
        edges = b["edges"]
        width = edges[1] - edges[0]
        used = b["count"][: len(edges) - 1] > 0
        ax.bar(edges[:-1][used], b["accuracy"][: len(edges) - 1][used], width=width, align="edge", edgecolor="black")
        if b["count"][-1]:  # confidence exactly 1: a bin of its own (calibration.reliability)
            ax.plot(1.0, b["accuracy"][-1], "s", color="black", clip_on=False, label="confidence 1")
            ax.legend(fontsize=7, loc="upper left")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=title)
    axes[0][0].set_ylabel("accuracy")
    fig.tight_layout()
    return fig


def ensemble_size(table):
    """Test accuracy and NLL of the average of k members, mean with the range over subsets."""
    fig, (ax_acc, ax_nll) = plt.subplots(1, 2, figsize=(10, 4))
    for members, curve in table.groupby("members", sort=False) if len(table) else []:
        k = curve["k"].astype(int)
        ax_acc.set_xticks(k)
        ax_nll.set_xticks(k)
        for ax, key in ((ax_acc, "acc"), (ax_nll, "nll")):
            mean, low, high = (curve[f"{key}_{s}"].astype(float) for s in ("mean", "min", "max"))
            ax.errorbar(k, mean, yerr=[mean - low, high - mean], marker="o", capsize=4, label=f"members {members}")
    ax_acc.set(xlabel="members averaged (k)", ylabel="test accuracy (%)", title="Accuracy by ensemble size")
    ax_nll.set(xlabel="members averaged (k)", ylabel="test NLL (nats)", title="NLL by ensemble size")
    if len(table):
        ax_acc.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sweep(table, names: list[str]):
    """Mean validation accuracy per setting: a heat map over the first two swept fields
    (the rest averaged), or a line over one. The chosen setting is outlined."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if len(names) >= 2:
        grid = table.pivot_table(index=names[0], columns=names[1], values="val_mean", aggfunc="mean")
        im = ax.imshow(grid.to_numpy(), cmap="viridis", aspect="auto")
        ax.set(xticks=range(grid.shape[1]), yticks=range(grid.shape[0]), xlabel=names[1], ylabel=names[0])
        ax.set_xticklabels([str(c) for c in grid.columns])
        ax.set_yticklabels([str(i) for i in grid.index])
        values = grid.to_numpy(dtype=float)
        lo, hi = np.nanmin(values), np.nanmax(values)
        for (i, j), v in np.ndenumerate(values):
            light = v - lo > 0.6 * (hi - lo)  # viridis turns yellow: dark text there
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="black" if light else "white", fontsize=8)
        best = table[table["chosen"]].iloc[0]
        ax.add_patch(
            plt.Rectangle(
                (list(grid.columns).index(best[names[1]]) - 0.5, list(grid.index).index(best[names[0]]) - 0.5),
                1,
                1,
                fill=False,
                lw=2,
                edgecolor="red",
            )
        )
        fig.colorbar(im, ax=ax, label="validation accuracy (%), mean over seeds")
    else:
        ax.errorbar(table[names[0]], table["val_mean"], yerr=table["val_std"].fillna(0), marker="o")
        ax.set(xlabel=names[0], ylabel="validation accuracy (%), mean over seeds")
    ax.set_title("Sweep: chosen on validation")
    fig.tight_layout()
    return fig


def close(figs: dict) -> None:
    for fig in figs.values():
        plt.close(fig)
