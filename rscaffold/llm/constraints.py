"""Token-level output constraints for local generation (transformers ``prefix_allowed_tokens_fn``).

transformers has no built-in grammar-constrained decoding; this implements the one shape the
pipeline needs (a fixed number of lines, each picked from a closed list) over a token trie, which
is small and exact. Richer grammars belong to vLLM's structured outputs.
"""

from __future__ import annotations

from collections.abc import Sequence


class LineChoiceConstraint:
    """Allow exactly ``len(line_choices)`` lines, line ``i`` one of ``line_choices[i]``, then EOS.

    Each choice is tokenized on its own and joined with the tokens of ``"\\n"``; the model picks
    among the choices by its own probabilities, token by token. Decoding the produced ids gives
    back the text ``"\\n".join(chosen lines)`` for byte-level BPE tokenizers.
    """

    def __init__(self, tokenizer, line_choices: Sequence[Sequence[str]], eos_token_id: int):
        if not line_choices or any(not c for c in line_choices):
            raise ValueError("line_choices needs at least one line and one choice per line")
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        self.eos = int(eos_token_id)
        last = len(line_choices) - 1
        self.lines: list[list[list[int]]] = []
        for i, choices in enumerate(line_choices):
            end = newline if i < last else [self.eos]
            seqs = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) + list(end) for c in choices]
            self.lines.append(seqs)
        self.max_tokens = sum(max(len(s) for s in seqs) for seqs in self.lines)

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """Token ids allowed after ``generated`` (the tokens produced so far)."""
        pos = 0
        generated = list(generated)
        for seqs in self.lines:
            rest = generated[pos:]
            done = next((s for s in seqs if len(rest) >= len(s) and rest[: len(s)] == s), None)
            if done is not None:
                pos += len(done)
                continue
            nxt = sorted({s[len(rest)] for s in seqs if len(s) > len(rest) and s[: len(rest)] == rest})
            return nxt or [self.eos]
        return [self.eos]
