"""Plots and a text summary of step 1 (matplotlib, Agg backend; every file written atomically).

    from sftmix.plots import write_dynamics_plots
    paths = write_dynamics_plots("run/", confidence_rows, records=records)
    # -> run/plots/confidence_hist.png, data_map.png, hidden_map.png, confidence_summary.md

- confidence_hist.png: the confidence histogram with the split threshold.
- data_map.png: variability vs confidence per example (dataset cartography, Swayamdipta et al. 2020), coloured by
  the confident / unconfident split.
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

from sftmix.split import split_threshold
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


def plot_confidence_histogram(confidence, confident, path, bins: int = 40) -> Path:
    """Histogram of confidence (= -mean ppl) for each half, with the split line."""
    confidence, confident = np.asarray(confidence, float), np.asarray(confident, bool)
    fig, ax = _figure()
    edges = np.histogram_bin_edges(confidence, bins=bins)
    ax.hist(confidence[confident], bins=edges, color=CONFIDENT_COLOR, alpha=0.8, label=f"confident ({confident.sum()})")
    ax.hist(confidence[~confident], bins=edges, color=UNCONFIDENT_COLOR, alpha=0.8,
            label=f"unconfident ({(~confident).sum()})")
    ax.axvline(split_threshold(confidence, confident), color="k", ls="--", lw=1, label="split")
    ax.set_xlabel("confidence = -mean PPL over reference checkpoints")
    ax.set_ylabel("examples")
    ax.set_title("Reference-model confidence")
    ax.legend()
    return _save(fig, path)


def plot_data_map(confidence, variability, confident, path) -> Path:
    """Dataset-cartography data map: variability (std of ppl over checkpoints) against confidence."""
    confidence, variability = np.asarray(confidence, float), np.asarray(variability, float)
    confident = np.asarray(confident, bool)
    fig, ax = _figure()
    halves = ((confident, CONFIDENT_COLOR, "confident"), (~confident, UNCONFIDENT_COLOR, "unconfident"))
    for mask, color, name in halves:
        ax.scatter(variability[mask], confidence[mask], s=8, alpha=0.6, color=color, label=name, linewidths=0)
    ax.set_xlabel("variability = std of PPL over checkpoints")
    ax.set_ylabel("confidence = -mean PPL")
    ax.set_title("Data map")
    ax.legend()
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
    run_dir = Path(run_dir)
    conf = np.array([r["confidence"] for r in rows])
    confident = np.array([bool(r["confident"]) for r in rows])
    paths = [
        plot_confidence_histogram(conf, confident, run_dir / "plots" / "confidence_hist.png"),
        plot_data_map(conf, np.array([r["variability"] for r in rows]), confident, run_dir / "plots" / "data_map.png"),
    ]
    hidden_file = run_dir / "dynamics" / "hidden_final.npz"
    if hidden_file.exists():
        with np.load(hidden_file) as z:
            pos = {str(g): i for i, g in enumerate(z["guid"])}
            hidden = z["hidden"]
        if all(r["guid"] in pos for r in rows):
            hidden = hidden[[pos[r["guid"]] for r in rows]]
            paths.append(plot_hidden_map(hidden, conf, run_dir / "plots" / "hidden_map.png", method=method))
        else:
            logger.warning("%s is from other data than confidence.jsonl: no hidden-state map", hidden_file)
    instructions = first_user_messages(records, dataset, tokenizer)
    md = run_dir / "plots" / "confidence_summary.md"
    atomic_write_text(md, confidence_summary_markdown(rows, instructions, k=k))
    paths.append(md)
    return paths
