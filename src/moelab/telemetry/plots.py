"""Expert-load plots with matplotlib's object API (Agg canvas: no pyplot state, thread-safe)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def load_heatmap(shares: torch.Tensor, layers: list[int], step: int, path: Path) -> None:
    """Layer x expert heatmap of the share of routed tokens in one logging window."""
    n_layers, n_exp = shares.shape
    fig = _figure(1.5 + 0.45 * n_exp, 1.2 + 0.35 * n_layers)
    ax = fig.add_axes((0.15, 0.22, 0.62, 0.62))  # fixed layout: tight_layout doubles the cost
    im = ax.imshow(shares.float().numpy(), aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_exp))
    ax.set_yticks(range(n_layers), [str(i) for i in layers])
    ax.set_title(f"expert load share, step {step}", fontsize="small")
    fig.colorbar(im, cax=fig.add_axes((0.82, 0.22, 0.04, 0.62)))
    fig.savefig(path, dpi=80)


def load_over_time(history: list[tuple[int, torch.Tensor]], layers: list[int], path: Path) -> None:
    """One panel per MoE layer: each expert's share of routed tokens against the step."""
    steps = [s for s, _ in history]
    stacked = torch.stack([sh for _, sh in history]).float()  # (logs, layers, experts)
    fig = _figure(6, 2.2 * len(layers))
    axes = fig.subplots(len(layers), 1, squeeze=False)
    for i, idx in enumerate(layers):
        ax = axes[i][0]
        for e in range(stacked.shape[2]):
            ax.plot(steps, stacked[:, i, e].numpy(), label=f"expert {e}")
        ax.set_title(f"layer {idx}")
        ax.set_ylabel("share")
    axes[-1][0].set_xlabel("step")
    axes[0][0].legend(fontsize="small", ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
