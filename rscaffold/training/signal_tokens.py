"""The signal tokens in the student's vocabulary: added as special tokens, with new embedding rows
initialised (see :func:`add_signal_tokens`)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)


def _add_special(tokenizer, tokens: list[str]) -> int:
    params = inspect.signature(tokenizer.add_special_tokens).parameters
    if "replace_extra_special_tokens" in params:  # transformers >= 5
        return tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    return tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_additional_special_tokens=False)


def add_signal_tokens(tokenizer, model, signal_tokens: Sequence[str]) -> list[int]:
    """Add the signal tokens as special tokens, grow the embeddings if needed, return their ids
    (same order).

    Idempotent: tokens the tokenizer already has (a checkpoint being resumed) keep their ids and
    rows. Only the rows of tokens added here are initialised, whether or not the matrices had to
    grow: on a *padded* vocabulary (Qwen2.5: more embedding rows than tokenizer entries) the new
    ids land in existing padding rows, which no training ever touched, so they are initialised
    exactly like rows created by a resize.

    New rows (input embedding and, if untied, output embedding) are set to the *mean* of the rows
    of the tokenizer's existing entries (padding rows excluded). A random row can have a norm and
    direction unlike any trained token, so its logit ``h . e_new`` can start far above the others
    and the first steps of training then spend their gradient undoing that (and generation is
    perturbed before any training). The mean row gives a logit equal to the average logit, which
    bounds how much the new tokens change the model's next-token distribution (Hewitt,
    "Initializing new word embeddings for pretrained language models", 2021). All signal rows
    start identical; the signal loss breaks the symmetry because each signal appears in different
    contexts (their rows must therefore be trainable in both matrices, also under LoRA: see
    :func:`rscaffold.training.trainer.signal_token_modules`). We set the mean exactly rather than use
    ``resize_token_embeddings(mean_resizing=True)``, which samples around the mean with the full
    covariance (costly for large vocabularies, and random).
    """
    import torch

    tokens = list(signal_tokens)
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"signal tokens must be distinct: {tokens}")
    known_rows = len(tokenizer)  # the entries the tokenizer had: rows below this were trained
    vocab = tokenizer.get_vocab()
    new_tokens = [t for t in tokens if t not in vocab]
    _add_special(tokenizer, tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    unk = tokenizer.unk_token_id
    for tok, i in zip(tokens, ids):
        if i is None or (unk is not None and i == unk):
            raise ValueError(f"signal token {tok!r} was not added to the tokenizer")
        if len(tokenizer(tok, add_special_tokens=False).input_ids) != 1:
            raise ValueError(f"signal token {tok!r} does not tokenize to a single id")

    old_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        log.info("signal tokens: embeddings %d -> %d rows", old_rows, len(tokenizer))
    rows = model.get_input_embeddings().weight.shape[0]
    missing = [i for i in ids if i >= rows]
    if missing:
        raise ValueError(f"signal token ids {missing} are outside the model's embedding matrix")
    fresh = [i for t, i in zip(tokens, ids) if t in set(new_tokens)]
    if fresh:
        source = min(known_rows, old_rows)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[fresh] = emb[:source].mean(dim=0, keepdim=True).expand(len(fresh), -1).clone()
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != emb.data_ptr():
                out.weight[fresh] = out.weight[:source].mean(dim=0, keepdim=True).expand(len(fresh), -1).clone()
                if getattr(out, "bias", None) is not None:
                    out.bias[fresh] = out.bias[:source].mean()
        log.info(
            "added %d signal tokens (ids %s, %s), rows initialised to the mean embedding",
            len(fresh),
            fresh,
            "new rows" if old_rows < rows else "in the padding rows of the vocabulary",
        )
    return list(ids)


def add_tokenizer_signal_tokens(tokenizer, signal_tokens: Sequence[str]) -> None:
    """Add the signal tokens to ``tokenizer`` alone, as :func:`add_signal_tokens` does (to measure
    how the student's examples tokenize before any model is loaded)."""
    _add_special(tokenizer, list(signal_tokens))
