"""Plots for the usual results: patching heatmaps, attention patterns, logit-lens grids, circuit graphs.

Problem: every interpretability notebook redraws the same four figures with a page of plotting code:
a patching result over layers and tokens, the attention patterns of a few heads over the string
tokens, a logit-lens grid of top predictions, and a circuit as a graph of weighted edges.

Mechanism: each function takes fxlens' own results as they come back (tensors in TransformerLens'
layouts, an ``ActivationCache``, ``fxlens.lens.logit_lens`` output, ``eap_scores``' dict or a
``Circuit``), draws on a new ``matplotlib.figure.Figure`` (no pyplot, so no global state and no
window) and returns it; ``save="path.png"`` also writes it. matplotlib is an optional dependency
(``pip install fxlens[plot]``): ``import fxlens`` never needs it, and these functions say how to
install it when it is missing.

Example::

    from fxlens import plot
    plot.patching_heatmap(result, y_labels="layer", x_labels=model.to_str_tokens(tokens), save="resid.png")
    plot.attention_patterns(cache, [(18, 6), (17, 3)], model.to_str_tokens(tokens))
    plot.logit_lens_grid(model, lens.logit_lens(model, tokens)[:, 0], model.to_str_tokens(tokens))
    plot.circuit_graph(eap_scores(model, clean, corrupted, metric), top_k=30, save="circuit.png")

Gotchas: in a notebook, display the returned figure (``display(fig)`` or leave it as the cell's last
value). Long token lists get small labels; pass a position slice of the result for readability. In a
left-padded batch the padding queries' pattern rows are NaN in the cache and show blank.
"""

from __future__ import annotations

import re

import torch

__all__ = ["patching_heatmap", "attention_patterns", "logit_lens_grid", "circuit_graph"]


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("fxlens.plot needs matplotlib: pip install 'fxlens[plot]' (or pip install matplotlib)") from e
    return Figure(figsize=(width, height), layout="constrained")


def _done(fig, save):
    if save is not None:
        fig.savefig(save, format="png", dpi=110)
    return fig


def _array(values) -> "torch.Tensor":
    return torch.as_tensor(values).detach().float().cpu()


def _token_labels(tokens) -> list[str]:
    return [repr(t)[1:-1] if isinstance(t, str) else str(t) for t in tokens]


def _axis_labels(ax, axis: str, labels, n: int, name: str) -> None:
    """Tick every entry; with a list, label the ticks with it."""
    ticks = getattr(ax, f"set_{axis}ticks")
    if labels is None or isinstance(labels, str):
        ticks(range(n))
    else:
        if len(labels) != n:
            raise ValueError(f"{len(labels)} {axis} labels for an axis of {n} entries")
        ticks(range(n), _token_labels(labels), rotation=90 if axis == "x" else 0, fontsize=8)
    getattr(ax, f"set_{axis}label")(name)


def patching_heatmap(result, *, x_labels=None, y_labels=None, title: str | None = None, xlabel: str | None = None,
                     ylabel: str | None = None, cmap: str = "RdBu", center: float | None = 0.0, annotate: bool = False,
                     save=None):
    """A [rows, cols] result (``get_act_patch_resid_pre``: [layer, pos]; per head: [layer, head]) as a
    heatmap. ``x_labels``/``y_labels``: a list of labels (string tokens are shown escaped), or the word
    "layer", "head" or "pos" to number that axis. ``center``: the value drawn white (None: no centring)."""
    values = _array(result)
    if values.ndim != 2:
        raise ValueError(f"patching_heatmap draws a 2-D result; got shape {tuple(values.shape)} (index or reduce it first)")
    rows, cols = values.shape
    fig = _figure(max(4.0, 0.45 * cols + 2), max(3.0, 0.3 * rows + 1.5))
    ax = fig.add_subplot()
    kwargs = {}
    if center is not None:
        span = float((values - center).abs().max()) or 1.0
        kwargs = dict(vmin=center - span, vmax=center + span)
    image = ax.imshow(values.numpy(), cmap=cmap, aspect="auto", **kwargs)
    fig.colorbar(image, ax=ax)
    _axis_labels(ax, "x", x_labels, cols, xlabel or (x_labels if isinstance(x_labels, str) else "pos"))
    _axis_labels(ax, "y", y_labels, rows, ylabel or (y_labels if isinstance(y_labels, str) else "layer"))
    if annotate:
        for i in range(rows):
            for j in range(cols):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6)
    if title:
        ax.set_title(title)
    return _done(fig, save)


def attention_patterns(cache_or_patterns, heads, str_tokens=None, *, batch: int = 0, title: str | None = None, save=None):
    """The attention patterns of ``heads`` (a list of (layer, head)) over ``str_tokens``, one panel each.

    ``cache_or_patterns``: an ``ActivationCache`` holding ``blocks.{l}.attn.hook_pattern``, or a dict
    {(layer, head): [q, k] pattern}. ``batch``: the row to show."""
    heads = [tuple(h) for h in heads]
    if not heads:
        raise ValueError("attention_patterns needs at least one (layer, head)")
    panels = []
    for layer, head in heads:
        if isinstance(cache_or_patterns, dict):
            p = cache_or_patterns[(layer, head)]
        else:
            p = cache_or_patterns["pattern", layer]
            p = p[batch, head] if p.ndim == 4 else p[head]
        panels.append(_array(p))
    n = len(panels)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    size = max(3.0, 0.28 * panels[0].shape[-1] + 1.5)
    fig = _figure(size * cols, size * rows)
    labels = _token_labels(str_tokens) if str_tokens is not None else None
    for i, ((layer, head), p) in enumerate(zip(heads, panels)):
        ax = fig.add_subplot(rows, cols, i + 1)
        image = ax.imshow(p.numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"L{layer}H{head}")
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        if labels is not None:
            if len(labels) != p.shape[-1]:
                raise ValueError(f"{len(labels)} string tokens for a pattern over {p.shape[-1]} positions")
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
    fig.colorbar(image, ax=fig.axes)
    if title:
        fig.suptitle(title)
    return _done(fig, save)


def logit_lens_grid(model, lens, str_tokens=None, *, target=None, layer_labels=None, title: str | None = None, save=None):
    """A logit-lens grid: one row per layer, one column per position, each cell the top prediction
    (its string) coloured by its probability. ``lens``: [layer, pos, vocab], one row of
    ``fxlens.lens.logit_lens``. ``target``: token ids [pos] to colour by instead (their probability;
    the cell still names the top token). ``model`` turns ids into strings (anything with ``to_string``).
    ``layer_labels``: one per row (default ``0 .. final``, as ``logit_lens`` stacks them)."""
    logits = _array(lens)
    if logits.ndim != 3:
        raise ValueError(f"logit_lens_grid draws [layer, pos, vocab]; got shape {tuple(logits.shape)} (index one batch row)")
    probs = logits.softmax(-1)
    top_p, top = probs.max(-1)
    shade = top_p if target is None else probs.gather(-1, torch.as_tensor(target).reshape(1, -1, 1).expand(len(probs), -1, 1))[..., 0]
    layers, n_pos = top.shape
    fig = _figure(max(5.0, 0.9 * n_pos + 2), max(3.0, 0.32 * layers + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(shade.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto", origin="lower")
    fig.colorbar(image, ax=ax, label="probability" if target is None else "probability of target")
    for i in range(layers):
        for j in range(n_pos):
            text = model.to_string(int(top[i, j]))
            text = (text if text.strip() else repr(text))[:8].replace("\n", "\\n")  # whitespace tokens stay visible
            ax.text(j, i, text, ha="center", va="center", fontsize=6, color="white" if shade[i, j] < 0.5 else "black")
    if layer_labels is None:
        layer_labels = [f"{i}" if i < layers - 1 else "final" for i in range(layers)]
    if len(layer_labels) != layers:
        raise ValueError(f"{len(layer_labels)} layer labels for a lens over {layers} layers")
    ax.set_yticks(range(layers), [str(x) for x in layer_labels], fontsize=7)
    ax.set_ylabel("layer (residual stream entering it)")
    if str_tokens is not None:
        if len(str_tokens) != n_pos:
            raise ValueError(f"{len(str_tokens)} string tokens for a lens over {n_pos} positions")
        ax.set_xticks(range(n_pos), _token_labels(str_tokens), rotation=90, fontsize=7)
    ax.set_xlabel("position")
    if title:
        ax.set_title(title)
    return _done(fig, save)


_COMPONENT = re.compile(r"^(?:a(\d+)\.h(\d+)(?:<[qkv]>)?|m(\d+)|input|logits)$")


def _place(name: str, n_layers: int) -> tuple[str, float, float]:
    """(node, x, y) of a component: heads of layer l in a row at height 2l + 1, MLPs at 2l + 2."""
    m = _COMPONENT.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a circuit component (input, a{{l}}.h{{h}}[<q|k|v>], m{{l}}, logits)")
    if name == "input":
        return name, 0.0, 0.0
    if name == "logits":
        return name, 0.0, 2.0 * n_layers + 1
    if m.group(3) is not None:
        layer = int(m.group(3))
        return name, 0.0, 2.0 * layer + 2
    layer, head = int(m.group(1)), int(m.group(2))
    return f"a{layer}.h{head}", float(head), 2.0 * layer + 1


def circuit_graph(edges, *, top_k: int | None = None, threshold: float | None = None, title: str | None = None, save=None):
    """A circuit as a layered graph: ``edges`` a dict {(sender, receiver) or "s->r": score} (as
    ``eap_scores`` returns) or a ``Circuit`` (every edge weight 1). Line width follows |score|, colour its
    sign (blue positive, red negative); q/k/v receivers of a head meet at that head's node. ``top_k`` keeps
    the strongest edges, ``threshold`` those with |score| at least that."""
    from .circuits.circuit import Circuit, edge

    if isinstance(edges, Circuit):
        weights = {e: 1.0 for e in edges.edges}
    else:
        weights = {edge(e): float(s) for e, s in dict(edges).items()}
    items = sorted(weights.items(), key=lambda kv: -abs(kv[1]))
    if threshold is not None:
        items = [kv for kv in items if abs(kv[1]) >= threshold]
    if top_k is not None:
        items = items[:top_k]
    names = {n for (s, r), _ in items for n in (s, r)}
    layers = [int(x) for n in names for x in re.findall(r"^[am](\d+)", n)]
    n_layers = max(layers) + 1 if layers else 1
    placed = {n: _place(n, n_layers) for n in names}
    width = max([x for _, x, _ in placed.values()] + [1.0])
    # the MLP and the end points sit right of the heads so that they do not cover head 0
    pos = {node: (width + 1.5 if not node.startswith("a") else x, y) for node, x, y in placed.values()}
    fig = _figure(max(5.0, 0.7 * width + 3), max(4.0, 0.55 * (2 * n_layers + 2)))
    ax = fig.add_subplot()
    biggest = max([abs(s) for _, s in items] + [1e-12])
    for (s, r), score in reversed(items):  # strongest drawn last, on top
        (x0, y0), (x1, y1) = pos[placed[s][0]], pos[placed[r][0]]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", color="tab:blue" if score >= 0 else "tab:red",
                                    lw=0.3 + 3.5 * abs(score) / biggest, alpha=0.75, shrinkA=7, shrinkB=7))
    for node, (x, y) in pos.items():
        ax.scatter([x], [y], s=420, color="white", edgecolors="black", zorder=3)
        ax.text(x, y, node, ha="center", va="center", fontsize=6, zorder=4)
    ax.set_xlim(-1, width + 2.5)
    ax.set_ylim(-1, 2 * n_layers + 2)
    ax.set_axis_off()
    ax.set_title(title or f"{len(items)} edges")
    return _done(fig, save)
