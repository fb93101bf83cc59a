"""Is there expert specialisation? Routing statistics of a trained MoE on held-out documents.

For every MoE layer: the 20 tokens each expert receives most, each expert's share of the
routes of each source document (a play, for the bundled corpus; packing into blocks loses
document ids, so the documents are read and tokenized here one by one), and how often two
consecutive tokens of a document keep their first-choice expert (against the chance rate
`sum_e p_e^2` of the layer's expert shares). Routes are the router's top-k choices before
capacity drops (the classic layer's; `moe.impl: autoep` drops none). `routing_section`
renders it as an HTML fragment with inline PNGs.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from moelab import data
from moelab.export import load_inference_model, source_tokenizer
from moelab.models.moe_dropless import DroplessMoEFFN
from moelab.models.moe_torch import TopKRouter, TorchMoEFFN

TOP_TOKENS = 20


@dataclass
class LayerRouting:
    """One MoE layer. Lists are indexed by expert; `doc_share[doc][e]` sums to 1 per doc."""

    layer: int
    top_tokens: list[list[tuple[str, int]]]
    routes_per_expert: list[int]
    doc_share: dict[str, list[float]]
    keep_rate: float
    chance_keep_rate: float


@dataclass
class RoutingStats:
    run_dir: str
    tag: str
    split: str
    num_experts: int
    top_k: int
    tokens: int
    documents: list[str]
    layers: list[LayerRouting] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def doc_title(text: str, index: int) -> str:
    """The first non-empty line (a play's title), else `doc<index>`."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first[:60] or f"doc{index}"


def _router_logits(mod: nn.Module, x: torch.Tensor, out: Any) -> torch.Tensor:
    """The (S, E) fp32 logits of a router forward: the dropless block's gate is the Linear
    itself (its output), the capacity router's (`TopKRouter`) holds it as `wg`."""
    if isinstance(mod, TopKRouter):
        return x.reshape(-1, x.shape[-1]).float() @ mod.wg.weight.float().t()
    return out.reshape(-1, out.shape[-1]).float()


def _route_recorder(
    model: nn.Module, top_k: int
) -> tuple[dict[int, list[torch.Tensor]], list[Any]]:
    """Hooks that keep each MoE layer's top-k expert ids (k, S) of every forward."""
    routes: dict[int, list[torch.Tensor]] = {}
    handles = []
    for ffn in model.modules():
        if not isinstance(ffn, TorchMoEFFN | DroplessMoEFFN):
            continue

        def hook(mod: nn.Module, args: Any, out: Any, idx: int = ffn.layer_idx) -> None:
            logits = _router_logits(mod, args[0], out)
            routes.setdefault(idx, []).append(logits.topk(top_k, dim=-1).indices.t())

        routes[ffn.layer_idx] = []
        handles.append(ffn.gate.register_forward_hook(hook))
    return routes, handles


def _doc_routes(
    model: nn.Module, ids: list[int], seq_len: int, routes: dict[int, list[torch.Tensor]]
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Run one document in `seq_len` chunks; its token ids (T,) and routes per layer (k, T)."""
    for chunks in routes.values():
        chunks.clear()
    tokens = torch.tensor(ids, dtype=torch.long)
    with torch.inference_mode():
        for start in range(0, len(ids), seq_len):
            model(tokens[start : start + seq_len].unsqueeze(0))
    return {layer: torch.cat(chunks, dim=1) for layer, chunks in routes.items()}, tokens


def analyze(
    run_dir: str | Path,
    split: str = "validation",
    max_tokens_per_doc: int = 4096,
    tag: str | None = None,
) -> RoutingStats:
    """Routing statistics of `run_dir`'s checkpoint on the documents of `split`."""
    model, source = load_inference_model(run_dir, tag)
    cfg = source.cfg
    if not cfg.model.is_moe:
        raise ValueError(f"model.ffn={cfg.model.ffn!r} has no experts; analyze an MoE run.")
    tok = source_tokenizer(cfg)
    docs = data.load_splits(cfg.data)[split]
    k, n_exp = cfg.model.moe.active_experts, cfg.model.moe.total_experts
    routes, handles = _route_recorder(model, k)
    layers = sorted(routes)
    counts = {layer: [Counter() for _ in range(n_exp)] for layer in layers}  # type: ignore[var-annotated]
    doc_counts: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    same = dict.fromkeys(layers, 0)
    titles, pairs, total = [], 0, 0
    for i, text in enumerate(tqdm(docs[cfg.data.text_column], desc="routing", unit="doc")):
        # verbose=False: no warning that a document is longer than the model's context;
        # _doc_routes feeds it in windows of seq_len tokens
        ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens_per_doc]
        if not ids:
            continue
        title = doc_title(text, i)
        titles.append(title)
        per_layer, tokens = _doc_routes(model, ids, cfg.data.seq_len, routes)
        total, pairs = total + len(ids), pairs + len(ids) - 1
        for layer, r in per_layer.items():  # r: (k, T)
            for e in range(n_exp):
                counts[layer][e].update(tokens[(r == e).any(dim=0)].tolist())
            doc_counts[layer][title] = torch.bincount(r.reshape(-1), minlength=n_exp).double()
            same[layer] += int((r[0, 1:] == r[0, :-1]).sum())
    for h in handles:
        h.remove()
    stats = RoutingStats(str(source.run_dir), source.tag, split, n_exp, k, total, titles)
    for layer in layers:
        stats.layers.append(
            _layer_stats(layer, counts[layer], doc_counts[layer], same[layer], pairs, tok)
        )
    return stats


def _layer_stats(
    layer: int,
    counts: list[Counter[int]],
    doc_counts: dict[str, torch.Tensor],
    same: int,
    pairs: int,
    tok: Any,
) -> LayerRouting:
    routes = [sum(c.values()) for c in counts]
    share = torch.tensor(routes, dtype=torch.float64) / max(sum(routes), 1)
    top = [[(tok.decode([t]), n) for t, n in c.most_common(TOP_TOKENS)] for c in counts]
    return LayerRouting(
        layer=layer,
        top_tokens=top,
        routes_per_expert=routes,
        doc_share={d: (c / c.sum()).tolist() for d, c in doc_counts.items()},
        keep_rate=same / max(pairs, 1),
        chance_keep_rate=float((share**2).sum()),
    )


# ---------------------------------------------------------------- rendering


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_doc_share(stats: RoutingStats) -> Any:
    """One heatmap per MoE layer: documents (rows) x experts (columns), share of routes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(stats.layers)
    fig, grid_axes = plt.subplots(
        1, n, figsize=(2.2 + 1.6 * n, 1.0 + 0.35 * len(stats.documents)), squeeze=False
    )
    axes = list(grid_axes[0])
    for i, (ax, lr) in enumerate(zip(axes, stats.layers, strict=True)):
        grid = [lr.doc_share[d] for d in stats.documents]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(f"layer {lr.layer}")
        ax.set_xlabel("expert")
        ax.set_xticks(range(stats.num_experts))
        ax.set_yticks(range(len(stats.documents)))
        ax.set_yticklabels(stats.documents if i == 0 else [])
    fig.colorbar(im, ax=axes, label="share of the document's routes")
    return fig


def plot_keep_rate(stats: RoutingStats) -> Any:
    """Per layer: how often consecutive tokens keep their expert, and the chance rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(stats.layers), 3))
    xs = range(len(stats.layers))
    ax.bar([x - 0.2 for x in xs], [lr.keep_rate for lr in stats.layers], 0.4, label="measured")
    ax.bar([x + 0.2 for x in xs], [lr.chance_keep_rate for lr in stats.layers], 0.4, label="chance")
    ax.set_xticks(list(xs), [str(lr.layer) for lr in stats.layers])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("consecutive tokens, same expert")
    ax.set_ylim(0, 1)
    ax.legend()
    return fig


def _token_table(lr: LayerRouting) -> str:
    head = "".join(f"<th>expert {e} ({n} routes)</th>" for e, n in enumerate(lr.routes_per_expert))
    rows = []
    for i in range(max((len(t) for t in lr.top_tokens), default=0)):
        cells = []
        for tokens in lr.top_tokens:
            tok, n = tokens[i] if i < len(tokens) else ("", 0)
            cells.append(
                f"<td><code>{html.escape(repr(tok))}</code> {n}</td>" if n else "<td></td>"
            )
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def routing_section(stats: RoutingStats) -> str:
    """A self-contained HTML fragment (a <section>, PNGs inline) for a report page."""
    share_png, keep_png = _png(plot_doc_share(stats)), _png(plot_keep_rate(stats))
    keep = ", ".join(
        f"layer {lr.layer}: {lr.keep_rate:.2f} (chance {lr.chance_keep_rate:.2f})"
        for lr in stats.layers
    )
    parts = [
        '<section class="routing"><h2>Routing analysis</h2>',
        f"<p>{stats.tokens} tokens of {len(stats.documents)} {stats.split} documents, "
        f"checkpoint {html.escape(stats.tag)}, top-{stats.top_k} of {stats.num_experts} experts. "
        f"Consecutive tokens keeping their first-choice expert: {keep}.</p>",
        "<h3>Expert share per document</h3>",
        f'<img alt="expert share per document" src="data:image/png;base64,{share_png}">',
        "<h3>Expert persistence</h3>",
        f'<img alt="same expert for consecutive tokens" src="data:image/png;base64,{keep_png}">',
    ]
    for lr in stats.layers:
        parts.append(f"<h3>Layer {lr.layer}: top {TOP_TOKENS} tokens per expert</h3>")
        parts.append(_token_table(lr))
    parts.append("</section>")
    return "\n".join(parts)


def write_outputs(stats: RoutingStats, out_dir: str | Path) -> Path:
    """routing.json, routing.html (the fragment), doc_share.png and keep_rate.png."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(stats.to_json(), indent=1) + "\n")
    (out / "routing.html").write_text(routing_section(stats) + "\n")
    import matplotlib.pyplot as plt

    for name, fig in (("doc_share", plot_doc_share(stats)), ("keep_rate", plot_keep_rate(stats))):
        fig.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
    return out
