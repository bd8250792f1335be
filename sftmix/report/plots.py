"""Plots and a text summary of step 1 (matplotlib, Agg backend; every file written atomically).

    from sftmix.report.plots import write_dynamics_plots
    paths = write_dynamics_plots("run/", confidence_rows, records=records)
    # -> run/plots/confidence_hist.png, data_map.png, hidden_map.png, confidence_summary.md

- confidence_hist.png: the histogram of the mean PPL (confidence = -mean PPL) on a log axis, with the split.
- data_map.png: variability vs mean PPL per example (dataset cartography, Swayamdipta et al. 2020) on log axes,
  coloured by the confident / unconfident split. Perplexity is heavy-tailed: on linear axes a few outliers squeeze
  the bulk of the data into one corner.
- loss_curves.png (written by sftmix.report.report): NTP and Mixup loss per step of each recipe and the reference.
- hidden_map.png: a 2-D map (PCA, or t-SNE) of each example's hidden state at its last response token from the
  final reference checkpoint, coloured by confidence: the paper's Figure 1 (from dynamics/hidden_final.npz).
- confidence_summary.md: the most and least confident instructions (first user message), to compare with the
  paper's §3.2 (grammar-like tasks confident; creative or noisy ones unconfident).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from sftmix.confidence.split import split_threshold
from sftmix.rundir import RunDir
from sftmix.utils import SFTMixError, atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

CONFIDENT_COLOR, UNCONFIDENT_COLOR = "#1f77b4", "#d62728"


def _figure(figsize=(6, 4.5)):
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless; keeps a backend the user chose explicitly
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def _save(fig, path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _positive(x: np.ndarray) -> np.ndarray:
    """Values for a log axis: non-positive ones (a PPL std of 0, a step-relative PPL) raised to the smallest positive
    value (or 1e-6), so that no point is dropped."""
    pos = x[x > 0]
    return np.maximum(x, pos.min() if pos.size else 1e-6)


def _log_axis(ax, which: str) -> None:
    """A log axis with plain tick labels (120, 200, not 1.2x10^2): PPL ranges are often within one decade."""
    from matplotlib.ticker import FuncFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")

    def minor(v, _):  # every minor tick within one decade; over several, only 2x and 5x (else they overlap)
        lo, hi = sorted(axis.get_view_interval())
        lead = round(v / 10 ** np.floor(np.log10(v)))
        return f"{v:g}" if hi / max(lo, 1e-12) < 10 or lead in (2, 5) else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def plot_confidence_histogram(confidence, confident, path, bins: int = 40) -> Path:
    """Histogram of the mean PPL (confidence = -mean PPL) for each half on a log axis, with the split line."""
    confidence, confident = np.asarray(confidence, float), np.asarray(confident, bool)
    ppl = _positive(-confidence)
    fig, ax = _figure()
    lo, hi = ppl.min(), ppl.max()
    edges = np.geomspace(lo, hi if hi > lo else lo * 1.01, bins + 1)  # equal widths on the log axis
    ax.hist(ppl[confident], bins=edges, color=CONFIDENT_COLOR, alpha=0.8, label=f"confident ({confident.sum()})")
    ax.hist(ppl[~confident], bins=edges, color=UNCONFIDENT_COLOR, alpha=0.8,
            label=f"unconfident ({(~confident).sum()})")
    split = -split_threshold(confidence, confident)
    if split > 0:
        ax.axvline(split, color="k", ls="--", lw=1, label=f"split (PPL {split:.3g})")
    _log_axis(ax, "x")
    ax.set_xlabel("mean PPL over reference checkpoints (log scale)\nconfidence = -mean PPL: left = confident")
    ax.set_ylabel("examples")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title("Reference-model confidence")
    ax.legend()
    return _save(fig, path)


def plot_data_map(confidence, variability, confident, path) -> Path:
    """Dataset-cartography data map: variability (std of ppl over checkpoints) against confidence."""
    confidence, variability = np.asarray(confidence, float), np.asarray(variability, float)
    confident = np.asarray(confident, bool)
    fig, ax = _figure()
    ppl, var = _positive(-confidence), _positive(variability)
    halves = ((confident, CONFIDENT_COLOR, "confident"), (~confident, UNCONFIDENT_COLOR, "unconfident"))
    for mask, color, name in halves:
        ax.scatter(var[mask], ppl[mask], s=8, alpha=0.6, color=color, label=f"{name} ({mask.sum()})", linewidths=0)
    _log_axis(ax, "x")
    _log_axis(ax, "y")
    ax.invert_yaxis()  # low PPL (confident) at the top, as confidence = -mean PPL would be
    ax.set_xlabel("variability = std of PPL over checkpoints (log scale)")
    ax.set_ylabel("mean PPL (log scale; top = confident)")
    ax.set_title("Data map")
    ax.legend()
    return _save(fig, path)


def plot_loss_curves(curves: dict[str, dict], path, switch: int | None = None) -> Path:
    """NTP loss (solid) and Mixup loss (dashed) per optimizer step of each run (label -> {"step", "ntp_loss",
    "mixup_loss"} lists); `switch`: the step where one-run SFTMix switched from NTP to Mixup (a vertical line)."""
    fig, ax = _figure((7.5, 4.5))
    colors = {"SFTMix": UNCONFIDENT_COLOR, "NTP": CONFIDENT_COLOR, "reference (step 1)": "#7f7f7f"}
    for i, (label, c) in enumerate(curves.items()):
        color = colors.get(label.split(" (=")[0], f"C{i + 2}")
        if c.get("ntp_loss"):
            ax.plot(*zip(*c["ntp_loss"]), color=color, lw=1.5, marker="." if len(c["ntp_loss"]) < 30 else None,
                    label=f"{label}: NTP loss")
        if c.get("mixup_loss"):
            ax.plot(*zip(*c["mixup_loss"]), color=color, lw=1.2, ls="--", label=f"{label}: Mixup loss")
    if switch is not None:
        ax.axvline(switch, color="k", ls=":", lw=1, label=f"one-run switch to Mixup (step {switch})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over the logging interval)")
    ax.set_title("Training curves")
    ax.legend(fontsize=9)
    return _save(fig, path)


def plot_hidden_map(hidden, confidence, path, method: str = "pca", seed: int = 0) -> Path:
    """2-D projection (PCA or t-SNE) of per-example hidden states, coloured by confidence (the paper's Figure 1)."""
    hidden, confidence = np.asarray(hidden, float), np.asarray(confidence, float)
    if hidden.ndim != 2 or len(hidden) != len(confidence) or len(hidden) < 3:
        raise SFTMixError(f"hidden map needs [N>=3, H] hidden states matching {len(confidence)} examples, got "
                          f"{hidden.shape}.")
    if method == "pca":
        from sklearn.decomposition import PCA

        xy = PCA(n_components=2, random_state=seed).fit_transform(hidden)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, random_state=seed, perplexity=min(30.0, (len(hidden) - 1) / 3)).fit_transform(hidden)
    else:
        raise SFTMixError(f"hidden map method must be 'pca' or 'tsne', got {method!r}.")
    fig, ax = _figure()
    # ppl has a long tail: clip the colour scale to the 5-95th percentiles so that the bulk is not one colour
    lo, hi = np.percentile(confidence, [5, 95])
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=confidence, cmap="coolwarm_r", vmin=lo, vmax=max(hi, lo + 1e-9), s=8,
                    alpha=0.8, linewidths=0)
    fig.colorbar(sc, ax=ax, label="confidence")
    ax.set_title(f"Last-token hidden states of the reference ({method.upper()})")
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path)


def confidence_summary_markdown(rows, instructions: dict[str, str], k: int = 10, width: int = 160) -> str:
    """Markdown: the k most and k least confident examples, with their first user message (truncated)."""
    ranked = sorted(rows, key=lambda r: (-r["confidence"], r["guid"]))

    def table(sel):
        lines = ["| confidence | ppl (mean) | instruction |", "|---:|---:|---|"]
        for r in sel:
            text = " ".join(instructions.get(r["guid"], "?").split())
            text = (text[: width - 1] + "…" if len(text) > width else text).replace("|", "\\|")
            lines.append(f"| {r['confidence']:.3f} | {-r['confidence']:.2f} | {text} |")
        return "\n".join(lines)

    n_conf = sum(bool(r["confident"]) for r in rows)
    return (
        f"# Confidence summary\n\n{len(rows)} examples: {n_conf} confident, {len(rows) - n_conf} unconfident "
        f"(confidence = -mean PPL over the reference checkpoints).\n\n"
        f"The paper (§3.2) finds grammar-like tasks (rewriting, classification, short factual answers) among the most "
        f"confident and creative, open-ended or noisy ones among the least confident.\n\n"
        f"## {min(k, len(rows))} most confident\n\n{table(ranked[:k])}\n\n"
        f"## {min(k, len(rows))} least confident\n\n{table(ranked[::-1][:k])}\n"
    )


def first_user_messages(records=None, dataset=None, tokenizer=None) -> dict[str, str]:
    """guid -> instruction text: the first user message of each record, or else the decoded prompt tokens."""
    from sftmix.data import first_user_message

    out = {r["guid"]: first_user_message(r) for r in records or []}
    if not out and dataset is not None and tokenizer is not None:
        for row in dataset:
            prompt = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab == -100]
            out[row["guid"]] = tokenizer.decode(prompt, skip_special_tokens=True)
    return out


def write_dynamics_plots(run_dir, rows, records=None, dataset=None, tokenizer=None, method: str = "pca",
                         k: int = 10) -> list[Path]:
    """All step-1 plots and confidence_summary.md into run_dir/plots/; returns the paths written."""
    d = RunDir(run_dir)
    conf = np.array([r["confidence"] for r in rows])
    confident = np.array([bool(r["confident"]) for r in rows])
    paths = [
        plot_confidence_histogram(conf, confident, d.plots / "confidence_hist.png"),
        plot_data_map(conf, np.array([r["variability"] for r in rows]), confident, d.plots / "data_map.png"),
    ]
    hidden_file = d.hidden_final
    if hidden_file.exists():
        with np.load(hidden_file) as z:
            pos = {str(g): i for i, g in enumerate(z["guid"])}
            hidden = z["hidden"]
        if all(r["guid"] in pos for r in rows):
            hidden = hidden[[pos[r["guid"]] for r in rows]]
            paths.append(plot_hidden_map(hidden, conf, d.plots / "hidden_map.png", method=method))
        else:
            logger.warning("%s is from other data than confidence.jsonl: no hidden-state map", hidden_file)
    instructions = first_user_messages(records, dataset, tokenizer)
    md = d.plots / "confidence_summary.md"
    atomic_write_text(md, confidence_summary_markdown(rows, instructions, k=k))
    paths.append(md)
    return paths
