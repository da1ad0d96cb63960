"""Routing plots: expert usage per LiME layer and AutoTop-K's active-expert histogram."""

from __future__ import annotations

import os
import re
from typing import Dict

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402


def plot_routing(report: Dict, path: str, title: str = "LiME routing") -> str:
    """Write a PNG of a `lime.routing_report`: a (layers x experts) usage heatmap and the histogram of
    the number of active experts per token; returns the path."""
    usage, histogram = report["usage"], report["active_histogram"]
    names = [re.sub(r"^model\.", "", name).replace("language_model.layers.", "lm.").replace(
        "vision_tower.encoder.layers.", "vision.") for name in report["layers"]]
    height = max(4.0, 0.22 * len(names) + 1.5)
    figure, (heatmap_axes, histogram_axes) = plt.subplots(
        1, 2, figsize=(12, height), gridspec_kw={"width_ratios": [3, 2]})
    image = heatmap_axes.imshow(usage, aspect="auto", cmap="viridis")
    heatmap_axes.set_xticks(range(len(usage[0])))
    heatmap_axes.set_xlabel("expert")
    heatmap_axes.set_yticks(range(len(names)))
    heatmap_axes.set_yticklabels(names, fontsize=6)
    heatmap_axes.set_title("mean routing probability per layer")
    figure.colorbar(image, ax=heatmap_axes, fraction=0.04)
    histogram_axes.bar(range(len(histogram)), histogram, color="tab:orange")
    histogram_axes.set_xticks(range(len(histogram)))
    histogram_axes.set_xlabel("active experts per token (AutoTop-K)")
    histogram_axes.set_ylabel("tokens x layers")
    histogram_axes.set_title("active experts")
    figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
