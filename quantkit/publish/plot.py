"""Size vs KL-divergence across a build's artifacts, as a PNG for the model card."""

from __future__ import annotations

from pathlib import Path

from ..results import Report


def size_vs_kld(report: Report, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(a.size_bytes / 1e6, a.evaluation.kld_mean, a.variant)
              for a in report.artifacts if a.evaluation and a.evaluation.kld_mean is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot([p[0] for p in points], [p[1] for p in points], "o", color="#3b6ea5")
    for x, y, label in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL-divergence vs reference (nats)")
    ax.set_title(f"{report.model}: size vs quality ({report.evaluation.tokens} tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    # No creation time or software version in the file: the same build must give the same bytes,
    # so re-publishing an unchanged build changes nothing on the Hub.
    fig.savefig(out, format="png", metadata={"Software": None})
    plt.close(fig)
