"""Student training: text format, tokenization/collation, the dual-objective TRL trainer.

Submodules are imported explicitly (``rscaffold.training.trainer`` imports TRL, which is slow to
import; ``format``, ``collator`` and ``student`` do not).
"""
