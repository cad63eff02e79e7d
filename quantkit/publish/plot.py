"""Size vs KL-divergence across a build's artifacts, with each KLD's standard error as an error bar: a PNG for the
model card, an SVG for the dashboard's build page."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from ..results import Report

# No creation time or software version in the file: the same build must give the same bytes, so re-publishing an
# unchanged build changes nothing on the Hub.
_METADATA = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None}}


def size_vs_kld(report: Report, out: Path | BinaryIO, image_format: str = "png") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(a.size_bytes / 1e6, a.evaluation.kld_mean, a.evaluation.kld_se or 0.0, a.variant)
              for a in report.models if a.evaluation and a.evaluation.kld_mean is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], fmt="o",
                color="#3b6ea5", ecolor="#8aa9cc", capsize=3)
    for x, y, _, label in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL-divergence vs reference (nats)")
    ax.set_title(f"{report.model}: size vs quality ({report.evaluation.tokens} tokens; bars: ± 1 s.e.)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with matplotlib.rc_context({"svg.hashsalt": "quantkit"}):  # SVG ids from a fixed salt: the same bytes again
        fig.savefig(out, format=image_format, metadata=_METADATA[image_format])
    plt.close(fig)
