"""Two layouts of rows in one block call, behind one interface: padded and packed.

Problem: rows that start at the same position stack into a batch ``[rows * batch, seq - start, d]``
and attend to the base run's keys and values for the positions before ``start`` (a KV prefix). Rows
with different starts either run one call per start, or are packed end to end into one sequence
``[batch, T, d]`` in which only the attention core sees them padded (``passes.pack_rows``). Each
row's edits (site patches, receiver inputs) must land on its own tokens in either layout.

Mechanism: a layout knows where each row's tokens are. ``Padded(start, n_rows)``: row r holds batch
rows ``r*batch..`` and positions ``start..``; ``Packed(row, pos, n_rows)``: token t is position
``pos[t]`` of row ``row[t]``. Both offer the same three methods: ``feed`` (the block's inputs and
layout pass: the KV prefix, or the packing with its fills and workspaces), ``patch`` (a site's edit
for the rows that patch it: a value in the layout and a boolean mask) and ``receivers`` (the
receiver-input tensor of a group of receivers, zeros for rows that do not change them). Sites with a
key axis (scores, pattern) live inside the attention core, which packed rows see padded; they are
placed by a padded view of the packing.

Example::

    layout = Padded(start=4, n_rows=3)
    feed = layout.feed(builder, blocks, layer, h, base)
    value, mask = layout.patch(site, [(0, patch_a), (2, patch_b)], base.batch)
"""

from __future__ import annotations

from collections import defaultdict

import torch

__all__ = ["Padded", "Packed"]

_POS_AXES = ("pos", "query_pos")


def _pos_axis(axes) -> int | None:
    return next((axes.index(a) for a in _POS_AXES if a in axes), None)


def _from(value: torch.Tensor, axes, start: int) -> torch.Tensor:
    """``value`` from position ``start`` on (every positional axis but the key axis)."""
    if start:
        for axis in _POS_AXES:
            if axis in axes:
                i = axes.index(axis)
                value = value.narrow(i, start, value.shape[i] - start)
    return value


class Padded:
    """``n_rows`` rows of positions ``start..``, stacked along the batch axis."""

    packed = False

    def __init__(self, start: int, n_rows: int, prefix=None):
        self.start = start
        self.n_rows = n_rows
        self._prefix = prefix  # (k, v) before ``start``, when not the base run's

    def prefix(self, blocks, layer: int, base):
        """The keys and values of the positions before ``start`` (None without any)."""
        if self._prefix is not None:
            return self._prefix
        if not self.start or blocks.kv_uses[layer] is None or base.kv[layer] is None:
            return None
        k, v = base.kv[layer]
        tile = (lambda t: t.repeat(self.n_rows, *([1] * (t.dim() - 1)))) if base.batch > 1 else (lambda t: t)
        return tile(k[..., : self.start, :]), tile(v[..., : self.start, :])

    def feed(self, builder, blocks, layer: int, h: torch.Tensor, base, *, keys_only: bool = False) -> dict:
        feed = blocks.feed(layer, h, base.context, self.start, self.n_rows)
        prefix = self.prefix(blocks, layer, base)
        if prefix is not None:
            (k_op, k_use), (v_op, v_use) = blocks.kv_uses[layer]
            builder.kv_prefix([(k_op, k_use, prefix[0]), (v_op, v_use, prefix[1])])
        return feed

    def patch(self, site, entries: list, b0: int):
        """(value, mask) placing each row's patch: ``entries`` = [(row, SitePatch)] for one site."""
        axes = site.axes
        shared = entries[0][1].value
        value = _from(shared, axes, self.start)
        mask_shape = [self.n_rows * b0] + [1] * (value.dim() - 1)
        for a in sorted({a for _, p in entries for a, _ in p.index}):
            mask_shape[axes.index(a)] = value.shape[axes.index(a)]
        mask = torch.zeros(mask_shape, dtype=torch.bool)
        for r, p in entries:
            index = [slice(r * b0, (r + 1) * b0)] + [slice(None)] * (value.dim() - 1)
            for a, v in p.index:
                index[axes.index(a)] = v - self.start if a in _POS_AXES else v
            if any(isinstance(i, int) and i < 0 for i in index):
                continue  # a position before ``start``: it acts only through keys and values
            mask[tuple(index)] = True
        if not mask.any():
            return None
        tiled = value.repeat(self.n_rows, *([1] * (value.dim() - 1))) if b0 > 1 or self.n_rows > 1 else value
        own = [(r, p) for r, p in entries if p.value is not shared]
        if own:
            tiled = tiled.clone()
            for r, p in own:
                tiled[r * b0 : (r + 1) * b0] = _from(p.value, axes, self.start).to(tiled.dtype)
        return tiled, mask.to(value.device)

    def receivers(self, entries: list, n_group: int, b0: int, like: torch.Tensor) -> torch.Tensor:
        """[n_rows * batch, seq - start, n_group, d]: ``entries`` = [(row, column, value [batch, seq, d])]."""
        out = like.new_zeros(self.n_rows * b0, like.shape[1], n_group, like.shape[-1])
        for r, j, value in entries:
            out[r * b0 : (r + 1) * b0, :, j] = value[:, self.start :].to(out.dtype)
        return out


class Packed:
    """Rows of any starts packed into one sequence: token t is position ``pos[t]`` of row ``row[t]``."""

    packed = True

    def __init__(self, row: torch.Tensor, pos: torch.Tensor, n_rows: int, seq: int, fills=None, work=None):
        self.row, self.pos = row, pos  # bookkeeping stays on the CPU
        self.n_rows = n_rows
        self.grid = torch.empty((n_rows, seq), dtype=torch.bool)
        self.fills = fills  # (k, v) for the padded slots; None: the base run's
        self.work = work  # (workspace store, rows in the chunk), reused across layers

    def subset(self, keep: torch.Tensor) -> "Packed":
        return Packed(self.row[keep], self.pos[keep], self.n_rows, self.grid.shape[1], self.fills, self.work)

    def feed(self, builder, blocks, layer: int, h: torch.Tensor, base, *, keys_only: bool = False) -> dict:
        cores, inside, _ = blocks.packing()[layer]
        feed = {blocks.seg.hidden[layer]: h}
        for c in blocks.seg.block_context[layer]:
            value = base.context[c]
            dims = blocks.seq_dims.get(c, [])
            if c in inside:
                if self.n_rows > 1 and value.shape[0] > 1:
                    value = value.repeat(self.n_rows, *([1] * (value.dim() - 1)))
            elif dims:
                value = value.index_select(dims[0], self.pos.to(value.device))
            feed[c] = value
        if cores is not None and not keys_only:
            k, v = self.fills or base.kv[layer]
            a = blocks.graph.attn[layer]
            q_shape = (base.batch, a.n_heads, base.seq, a.d_head)
            bufs = [self._workspace(w, s, h.dtype, h.device) for w, s in zip("qkv", (q_shape, tuple(k.shape), tuple(v.shape)))]
            builder.pack_rows([(*cores, (k, v, *bufs))], self.row.to(h.device), self.pos.to(h.device), self.grid)
        return feed

    def _workspace(self, which: str, shape: tuple, dtype, device) -> torch.Tensor | None:
        if self.work is None:
            return None
        store, rows = self.work
        key = (which, shape, dtype, device)
        if key not in store:
            # q slots no token writes are read by the attention (their outputs are dropped): zeros, not garbage
            store[key] = (torch.zeros if which == "q" else torch.empty)((rows, *shape), dtype=dtype, device=device)
        return store[key]

    def patch(self, site, entries: list, b0: int):
        """(value, mask) placing each row's patch; key-axis sites in the padded view of the core."""
        axes = site.axes
        if "key_pos" in axes:
            return Padded(0, self.n_rows).patch(site, entries, b0)
        p_axis = _pos_axis(axes)
        shared = entries[0][1].value
        value = shared.index_select(p_axis, self.pos.to(shared.device))  # a new tensor: rows' own values go in place
        mask_shape = [1] * value.dim()
        mask_shape[p_axis] = value.shape[p_axis]
        for a in sorted({a for _, p in entries for a, _ in p.index}):
            mask_shape[axes.index(a)] = value.shape[axes.index(a)]
        mask = torch.zeros(mask_shape, dtype=torch.bool)
        for r, p in entries:
            tokens = self.row == r
            index = dict(p.index)
            if axes[p_axis] in index:
                tokens = tokens & (self.pos == index[axes[p_axis]])
            at = tokens.nonzero().flatten()
            if at.numel() == 0:
                continue  # a position before the row's start: it acts only through keys and values
            sel = [slice(None)] * value.dim()
            sel[p_axis] = at
            for a, v in p.index:
                if axes.index(a) != p_axis:
                    sel[axes.index(a)] = v
            mask[tuple(sel)] = True
            if p.value is not shared:  # this row's own value at its tokens
                idx = [slice(None)] * value.dim()
                idx[p_axis] = at
                value[tuple(idx)] = p.value.index_select(p_axis, self.pos[at].to(p.value.device)).to(value.dtype)
        if not mask.any():
            return None
        return value, mask.to(value.device)

    def receivers(self, entries: list, n_group: int, b0: int, like: torch.Tensor) -> torch.Tensor:
        """[batch, T, n_group, d]: each row's receiver input at its tokens, zeros elsewhere."""
        out = like.new_zeros(b0, self.row.shape[0], n_group, like.shape[-1])
        by_row = defaultdict(list)
        for r, j, value in entries:
            by_row[r].append((j, value))
        for r, items in by_row.items():
            at = (self.row == r).nonzero().flatten()
            if at.numel() == 0:
                continue
            for j, value in items:
                out[:, at.to(out.device), j] = value.index_select(1, self.pos[at].to(value.device)).to(out.dtype)
        return out
