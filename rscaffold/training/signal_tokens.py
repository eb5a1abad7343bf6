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
    """Add the signal tokens as special tokens, grow the embeddings, return their ids (same order).

    Idempotent: tokens the tokenizer already has (a checkpoint being resumed) keep their ids and
    rows. Only rows created here are initialised.

    New rows (input embedding and, if untied, output embedding) are set to the *mean* of the
    existing rows. A random row can have a norm and direction unlike any trained token, so its
    logit ``h . e_new`` can start far above the others and the first steps of training then spend
    their gradient undoing that (and generation is perturbed before any training). The mean row
    gives a logit equal to the average logit, which bounds how much the new tokens change the
    model's next-token distribution (Hewitt, "Initializing new word embeddings for pretrained
    language models", 2021). All signal rows start identical; the signal loss breaks the symmetry
    because each signal appears in different contexts. We set the mean exactly rather than use
    ``resize_token_embeddings(mean_resizing=True)``, which samples around the mean with the full
    covariance (costly for large vocabularies, and random).
    """
    import torch

    tokens = list(signal_tokens)
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"signal tokens must be distinct: {tokens}")
    _add_special(tokenizer, tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    unk = tokenizer.unk_token_id
    for tok, i in zip(tokens, ids):
        if i is None or (unk is not None and i == unk):
            raise ValueError(f"signal token {tok!r} was not added to the tokenizer")
        if len(tokenizer(tok, add_special_tokens=False).input_ids) != 1:
            raise ValueError(f"signal token {tok!r} does not tokenize to a single id")

    embeddings = model.get_input_embeddings()
    old_rows = embeddings.weight.shape[0]
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[old_rows:] = emb[:old_rows].mean(dim=0, keepdim=True)
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != emb.data_ptr():
                out.weight[old_rows:] = out.weight[:old_rows].mean(dim=0, keepdim=True)
                if getattr(out, "bias", None) is not None:
                    out.bias[old_rows:] = out.bias[:old_rows].mean()
        log.info("added %d signal tokens; embeddings %d -> %d rows", len(tokens), old_rows, len(tokenizer))
    missing = [i for i in ids if i >= model.get_input_embeddings().weight.shape[0]]
    if missing:
        raise ValueError(f"signal token ids {missing} are outside the model's embedding matrix")
    return list(ids)
