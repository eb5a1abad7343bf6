"""The student's text format (rscaffold.prompts): chat prompt, signal tokens before each step."""

from __future__ import annotations

import pytest
from helpers import STUDENT_TOKEN_MAP, skip_module_without_student_tokenizer, tiny_student

pytest.importorskip("torch")
skip_module_without_student_tokenizer()

from rscaffold.prompts import STUDENT_SYSTEM_PROMPT, render_example


def test_render_example_format():
    _, tok = tiny_student()
    steps = [("setup", "Tom has 3."), ("conclude", "The answer is 3.")]
    prompt, completion = render_example("How many?", steps, tok, signal_tokens=STUDENT_TOKEN_MAP)
    assert prompt == tok.apply_chat_template(
        [{"role": "system", "content": STUDENT_SYSTEM_PROMPT}, {"role": "user", "content": "How many?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert completion == "<sig:setup>Tom has 3.\n\n<sig:conclude>The answer is 3.<|im_end|>"
    _, plain = render_example("How many?", steps, tok, signal_tokens=None)
    assert plain == "Tom has 3.\n\nThe answer is 3.<|im_end|>"
    with pytest.raises(ValueError, match="not in the taxonomy"):
        render_example("q", [("nope", "x")], tok, signal_tokens=STUDENT_TOKEN_MAP)
