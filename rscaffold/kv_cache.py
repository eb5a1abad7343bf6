"""A batched KV cache whose rows keep their own token sequences, for decoders that edit their
context between forward passes (signal-guided decoding, :mod:`rscaffold.decoding.cached`).

A transformers ``DynamicCache`` holds one ``(batch, heads, columns, head_dim)`` tensor per layer:
every row has the same number of columns. Here each row also knows which columns hold its
tokens (``valid``): a row can take back its last tokens (their columns become holes, masked out
of attention) and append new ones, rows can join and leave the batch, and the holes can be
squeezed out (``compact``). The attention mask over the columns is ``valid``; each token's
position (for rotary embeddings) is its index in its row's sequence, not its column, so a
forward pass over the cache computes, up to floating point, what a forward pass over each row's
sequence alone computes. Only full-attention caches qualify (:func:`supports_row_cache`): a
sliding window counts columns, not a row's tokens.

transformers has no such cache (its caches crop all rows to one length); this is the small part
it lacks, written against its public cache layers (``cache.layers[i].keys / .values``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch


def supports_row_cache(model: Any) -> bool:
    """Whether ``model`` (a causal LM or its backbone) can decode with a :class:`RowCache`: every
    layer attends to the whole context (no sliding window, chunked or linear attention) and its
    cache is the layered ``DynamicCache`` (transformers >= 4.56)."""
    try:
        from transformers import DynamicCache
    except ImportError:
        return False
    if not hasattr(DynamicCache(), "layers"):
        return False
    config = getattr(model, "config", None)
    if config is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "is_encoder_decoder", False):
        return False
    layer_types = getattr(text, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False
    if getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True):
        return False
    return not getattr(text, "attention_chunk_size", None)


def cache_argument(backbone: Any) -> str:
    """The name a model's forward takes its cache by (``cache`` from transformers 5.x on,
    ``past_key_values`` before)."""
    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class RowCache:
    """A ``DynamicCache`` plus, per row, its tokens and the columns holding them."""

    def __init__(self, device: torch.device):
        self.device = device
        self._reset()

    def _reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        self.tokens: list[list[int]] = []  # per row: the token ids in the cache, in order
        self.columns: list[list[int]] = []  # per row: the column of each of those tokens
        self.valid = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (rows, columns)

    # -- shape ------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return len(self.tokens)

    @property
    def width(self) -> int:
        return int(self.valid.shape[1])

    def _layers(self) -> list[Any]:
        return [layer for layer in self.cache.layers if getattr(layer, "is_initialized", False)]

    def add_rows(self, n: int) -> None:
        """Append ``n`` empty rows (they hold no token yet)."""
        self.tokens += [[] for _ in range(n)]
        self.columns += [[] for _ in range(n)]
        self.valid = torch.cat([self.valid, self.valid.new_zeros((n, self.width))])
        for layer in self._layers():
            for name in ("keys", "values"):
                t = getattr(layer, name)
                if t.numel():
                    setattr(layer, name, torch.cat([t, t.new_zeros((n, *t.shape[1:]))]))

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order); the others leave the batch."""
        if not rows:
            self._reset()
            return
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        self.tokens = [self.tokens[r] for r in rows]
        self.columns = [self.columns[r] for r in rows]
        self.valid = self.valid.index_select(0, idx)
        for layer in self._layers():
            for name in ("keys", "values"):
                t = getattr(layer, name)
                if t.numel():
                    setattr(layer, name, t.index_select(0, idx.to(t.device)))

    def truncate(self, row: int, n: int) -> None:
        """Take back all but the first ``n`` tokens of ``row`` (their columns become holes)."""
        for c in self.columns[row][n:]:
            self.valid[row, c] = 0
        del self.tokens[row][n:], self.columns[row][n:]

    def holes(self) -> int:
        """Columns that hold no token, summed over rows."""
        return self.rows * self.width - sum(len(t) for t in self.tokens)

    def compact(self) -> None:
        """Squeeze the holes out: each row's tokens move, in order, to the right end of a
        narrower cache (the keys keep the positions they were computed at)."""
        width = max((len(t) for t in self.tokens), default=0)
        if width == self.width:
            return
        gather = torch.zeros((self.rows, width), dtype=torch.long)
        valid = torch.zeros((self.rows, width), dtype=torch.long)
        for r, cols in enumerate(self.columns):
            if cols:
                gather[r, width - len(cols) :] = torch.as_tensor(cols)
                valid[r, width - len(cols) :] = 1
            self.columns[r] = list(range(width - len(cols), width))
        for layer in self._layers():
            for name in ("keys", "values"):
                t = getattr(layer, name)
                if t.numel():
                    idx = gather.to(t.device)[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
                    setattr(layer, name, torch.gather(t, 2, idx))
        self.valid = valid.to(self.device)

    # -- the forward pass ---------------------------------------------------------------------
    @torch.no_grad()
    def extend(self, backbone: Any, new: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run ``backbone`` over ``new[r]`` appended to each row's tokens (one forward pass for the
        batch; a row with nothing new gets masked padding); returns the last hidden state at each
        row's last new token ``(rows, hidden)`` (meaningless for a row with nothing new). Every row
        must hold or receive at least one token."""
        if len(new) != self.rows:
            raise ValueError(f"{len(new)} new token lists for {self.rows} rows")
        width = max(len(n) for n in new)
        if width == 0:
            raise ValueError("nothing to extend")
        ids, mask, pos, last = [], [], [], []
        for r, toks in enumerate(new):
            start, k = len(self.tokens[r]), len(toks)
            if not k and not start:
                raise ValueError(f"row {r} has no token to attend to")
            # Right padding within the block: a padding query then still sees the row's tokens
            # (a query that sees nothing would give NaN states, and NaN keys poison later sums).
            pad = width - k
            ids.append([*toks, *([0] * pad)])
            mask.append([1] * k + [0] * pad)
            pos.append([*range(start, start + k), *([max(start + k - 1, 0)] * pad)])
            last.append(k - 1)
        mask_t = torch.tensor(mask, dtype=torch.long, device=self.device)
        attention = torch.cat([self.valid, mask_t], dim=1)
        out = backbone(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            attention_mask=attention,
            position_ids=torch.tensor(pos, dtype=torch.long, device=self.device),
            use_cache=True,
            **{cache_argument(backbone): self.cache},
        )
        hidden = out.last_hidden_state
        base = self.width
        for r, toks in enumerate(new):
            self.tokens[r].extend(int(t) for t in toks)
            self.columns[r].extend(range(base, base + len(toks)))
        self.valid = attention
        # each row's last new token (a row with nothing new: its first padding position, whose
        # state the caller does not use)
        at = torch.tensor([max(i, 0) for i in last], device=hidden.device)
        return hidden[torch.arange(self.rows, device=hidden.device), at]
