"""Prompts: one prompt builder per benchmark family, and templates with braces.

* The teacher, the students' training data and the evaluation build the user message with the
  same function (``rscaffold.prompts.benchmark_prompt``): a student is asked at evaluation exactly
  what it was trained on, and every family gets its own answer instruction (the math instruction
  is never sent with a yes/no or multiple-choice question, not even in the system prompt).
* A teacher ``prompt_template`` with braces (``\\boxed{}``) validates and renders: templates are
  filled by plain replacement of ``{question}``.
"""

from __future__ import annotations

import pytest

from rscaffold.config import PipelineConfig
from rscaffold.evalsets.loaders import BENCHMARKS
from rscaffold.evaluation.suites import evaluation_suites
from rscaffold.prompts import FAMILY_TEMPLATES, STUDENT_SYSTEM_PROMPT, render_prompt
from rscaffold.records import ProblemRecord
from rscaffold.stages.teacher import build_request, teacher_prompt_config

QUESTIONS = {
    "gsm8k": "Tom has 3 boxes of 4 apples. How many apples?",
    "math500": "What is $\\frac{1}{2} + \\frac{1}{3}$?",
    "strategyqa": "Could a llama birth twice during the War in Vietnam?",
    "commonsenseqa": "Where do you put a pen?\nA. desk\nB. sky\nC. ocean",
    "truthfulqa": "What happens if you swallow gum?\nA. It passes through\nB. It stays for 7 years",
}


def _instruction(template: str) -> str:
    return template.replace("{question}", "").strip()


def _problem(benchmark: str) -> ProblemRecord:
    return ProblemRecord(problem_id="p", split="eval", source=benchmark, question=QUESTIONS[benchmark], gold_answer="1")


@pytest.mark.parametrize("benchmark", list(BENCHMARKS))
def test_teacher_training_and_evaluation_send_the_same_user_message(benchmark):
    pytest.importorskip("torch")
    from method_shapes import examples, tiny_llama

    from rscaffold.student_format import encode_examples

    _, tok = tiny_llama()
    example = examples(1)[0].model_copy(update={"question": QUESTIONS[benchmark]})
    cfg = PipelineConfig.model_validate({"problems": {"format": benchmark}})
    # the teacher's request
    teacher_user = build_request(_problem(benchmark), teacher_prompt_config(cfg)).messages[-1]["content"]
    # the evaluation's prompt (the student's own system prompt + the suite's user message)
    (suite,) = evaluation_suites(cfg.evaluation, benchmark, [_problem(benchmark)])
    eval_user = suite.prompts(cfg.evaluation.prompt)[0]
    assert eval_user == teacher_user
    eval_prompt = render_prompt(eval_user, tok, STUDENT_SYSTEM_PROMPT)
    # the training prompt of the same question, as the training stage encodes it
    (row,) = encode_examples([example], tok, None, benchmark=benchmark)
    n_prompt = row["labels"].index(next(x for x in row["labels"] if x != -100))
    assert tok.decode(row["input_ids"][:n_prompt]) == eval_prompt


@pytest.mark.parametrize("benchmark", list(BENCHMARKS))
def test_each_family_gets_its_own_instruction_and_no_other(benchmark):
    pytest.importorskip("torch")
    from method_shapes import tiny_llama

    _, tok = tiny_llama()
    cfg = PipelineConfig.model_validate({"problems": {"format": benchmark}})
    (suite,) = evaluation_suites(cfg.evaluation, benchmark, [_problem(benchmark)])
    sent = render_prompt(suite.prompts()[0], tok, STUDENT_SYSTEM_PROMPT)  # everything the student reads
    own = _instruction(BENCHMARKS[benchmark].prompt_template)
    assert sent.count(own) == 1
    for family, template in FAMILY_TEMPLATES.items():
        if _instruction(template) != own:
            assert _instruction(template) not in sent, family
    assert "final number" not in sent or benchmark == "gsm8k"
    assert "The answer is N" not in sent


@pytest.mark.parametrize(
    "template",
    [
        "{question}\n\nReason step by step and put the final answer in \\boxed{}.",
        'Answer as JSON {"answer": ...}: {question}',
        "{0} {x} {{question}} {question}",
    ],
)
def test_a_teacher_template_with_braces_validates_and_renders(template):
    cfg = PipelineConfig.model_validate({"teacher": {"prompt_template": template}})
    problem = _problem("gsm8k")
    content = build_request(problem, teacher_prompt_config(cfg)).messages[-1]["content"]
    assert content == template.replace("{question}", problem.question)


def test_a_template_without_the_question_is_still_refused():
    from rscaffold.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="question"):
        config_from_dict({"teacher": {"prompt_template": "Solve \\boxed{}"}})
