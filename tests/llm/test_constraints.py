"""Line-choice constrained decoding on the transformers backend (real generation, tiny model)."""

import pytest

from rscaffold.config import BackendConfig, SamplingConfig
from rscaffold.labeling.parsing import parse_labels
from rscaffold.labeling.prompts import label_line_choices
from rscaffold.labeling.taxonomy import load_taxonomy
from rscaffold.llm.base import ChatRequest
from rscaffold.llm.constraints import LineChoiceConstraint
from rscaffold.llm.transformers_local import TransformersBackend
from rscaffold.paths import data_dir


def test_constraint_walks_lines_and_ends_with_eos(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    c = LineChoiceConstraint(tok, [["1: yes", "1: no"], ["2: maybe", "2: never"]], eos_token_id=tok.eos_token_id)
    first = c.allowed([])
    assert len(first) == 1  # "1:" is shared, one token id allowed
    yes_line = tok("1: yes", add_special_tokens=False)["input_ids"] + tok("\n", add_special_tokens=False)["input_ids"]
    second = tok("2: never", add_special_tokens=False)["input_ids"]
    maybe = tok("2: maybe", add_special_tokens=False)["input_ids"]
    assert c.allowed(yes_line) == sorted({maybe[0], second[0]})
    # inside the second line, after the shared prefix, only the two continuations are allowed
    shared = next(i for i, (a, b) in enumerate(zip(maybe, second)) if a != b)
    assert c.allowed(yes_line + second[:shared]) == sorted({maybe[shared], second[shared]})
    assert c.allowed(yes_line + second) == [tok.eos_token_id]
    with pytest.raises(ValueError):
        LineChoiceConstraint(tok, [], tok.eos_token_id)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_model_output_is_always_a_valid_label_answer(tiny_model_dir, temperature):
    tax = load_taxonomy(data_dir() / "signals.yaml")
    backend = TransformersBackend(BackendConfig(model=str(tiny_model_dir), batch_size=3))
    reqs = [
        ChatRequest(f"r{n}", [{"role": "user", "content": f"label {n} steps"}], line_choices=label_line_choices(n, tax))
        for n in (1, 3, 6)
    ] + [ChatRequest("free", [{"role": "user", "content": "say something"}])]
    outs = {
        c.request_id: c
        for c in backend.generate(reqs, SamplingConfig(max_new_tokens=4, temperature=temperature, seed=3))
    }
    for n in (1, 3, 6):
        text = outs[f"r{n}"].text
        labels = parse_labels(text, n, tax)  # raises if malformed
        assert [lab.step_index for lab in labels] == list(range(n))
        assert text.count("\n") == n - 1 and outs[f"r{n}"].finish_reason == "stop"
    # an unconstrained request in the same batch is generated freely, within its token budget
    assert outs["free"].completion_tokens <= 4
