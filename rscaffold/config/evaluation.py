"""The evaluation section (stage 6): benchmarks, guided decoding, student servers and scoring."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rscaffold.config.base import EXECUTION, _Section
from rscaffold.config.llm import BackendConfig
from rscaffold.config.problems import CustomFormat, _check_custom
from rscaffold.vocabulary import EVAL_MODELS, BenchmarkName, EvalModelName, StudentName


class GuidedInferenceConfig(_Section):
    """Signal-guided decoding of the scaffolded student (see :mod:`rscaffold.decoding.policy`).

    Gating and pruning (the paper's adaptive gating and pruning of non-essential steps) are on by
    default; the ablation rows ``scaffolded-nogate`` / ``scaffolded-noprune`` of
    ``evaluation.models`` switch one of them off, ``scaffolded-freefallback`` lets free decoding
    after an uncommitted gate emit a signal. The token budget is ``evaluation.max_new_tokens``,
    the same as plain decoding.
    """

    confidence_threshold: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Adaptive gating: commit the predicted signal when its probability is at least this, else decode the step freely. None: calibrated on the dataset's validation split (the threshold that maximises the number of correct minus calibration_precision x the number of committed teacher-forced next-signal predictions); 0: no gating (always commit).",
    )
    calibration_precision: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="Calibration target: the gate commits where the student's predicted signal was right at least this often on the validation boundaries (0.5: more often right than wrong). Also the threshold when there is no validation data.",
    )
    prune_signals: list[str] | None = Field(
        default=None,
        description="Pruning: signals never committed (their steps are not started, their tokens suppressed). None: the taxonomy's non-essential signals (essential: false); []: no pruning.",
    )
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description="Most steps per answer; None: no bound but the token budget (evaluation.max_new_tokens).",
    )
    max_step_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Per-step safety cap in tokens (a step cut there is closed and the next one begins). None: the longest step of the student's training data (recorded in the evaluation manifest).",
    )
    fallback_may_emit_signal: bool = Field(
        default=False,
        description="Free decoding of a step the gate did not commit a signal to: false: signal tokens are suppressed in it (the step is text under no signal); true: it draws from the whole vocabulary, so a signal token of the model's own choosing may open the step (what the evaluation row 'scaffolded-freefallback' does).",
    )


class BenchmarkSource(_Section):
    """One benchmark the evaluation stage answers.

    ``source``: the published file, a directory holding it (directly or under ``<name>/``, e.g.
    a folder with all five benchmarks), or ``hub:<dataset id>[@<config>][:<split>]``.
    ``limit``: a seeded subsample of that many problems (``seed``); ``None`` falls back to
    ``evaluation.limit``. ``part``: ``heldout`` keeps the held-out share (``heldout_fraction``,
    by a seeded hash of the problem id) of a file that has no separate test split (StrategyQA's
    published file is its train split), ``train`` the rest, ``all`` everything.
    """

    name: BenchmarkName | Literal["custom"] = Field(
        description="Which benchmark: its file layout, answer checker and prompt; 'custom': your own problems "
        "(with 'custom')."
    )
    source: str = Field(
        description="The published file, a directory holding it (directly or under <name>/), or "
        "hub:<dataset id>[@<config>][:<split>]."
    )
    limit: int | None = Field(
        default=None, ge=1, description="A seeded subsample of this many problems (default: evaluation.limit)."
    )
    seed: int = Field(default=0, description="Seed of the subsample and of the held-out part.")
    part: Literal["all", "train", "heldout"] = Field(
        default="all",
        description="'heldout': the held-out share of a file that is a train split (StrategyQA); 'train': the rest; 'all': everything.",
    )
    heldout_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Share held out for part 'heldout' (by a seeded hash of the problem id)."
    )
    custom: CustomFormat | None = Field(
        default=None, description="name 'custom': the problem set's name, answer type and field mapping."
    )

    @model_validator(mode="after")
    def _check_format(self) -> BenchmarkSource:
        _check_custom(self.name, self.custom, "name")
        return self

    @property
    def label(self) -> str:
        """The benchmark's name in reports: the built-in name, or the custom set's name."""
        return self.custom.name if self.custom is not None else self.name


def _check_placeholders(field: str, template: str, allowed: tuple[str, ...]) -> None:
    """``template`` formats with ``allowed`` placeholders (str.format): checked when the config
    loads, not when the stage that fills it starts."""
    try:
        template.format(**dict.fromkeys(allowed, "x"))
    except (KeyError, IndexError, ValueError) as err:
        names = ", ".join("{" + a + "}" for a in allowed)
        raise ValueError(
            f"{field} {template!r}: {err!r}; it may use {names}; write a literal brace as {{{{ or }}}}"
        ) from None


class StudentServerConfig(_Section):
    """A server the evaluation starts for each student it decodes through a server.

    ``command`` is formatted with ``{model_dir}`` (the student's directory), ``{port}``, ``{host}``
    and ``{model}`` (the name requests use: ``evaluation.llm.model``, default ``{model_dir}``)
    and run as a child process, without a shell; the evaluation waits until ``/health`` or
    ``/v1/models`` answers, sends the student's requests, and stops it.
    """

    command: str = Field(
        description="The server command, e.g. 'vllm serve {model_dir} --port {port} --logprobs-mode "
        "processed_logprobs' or 'transformers serve {model_dir} --port {port}'."
    )
    host: str = Field(default="127.0.0.1", description="Where the server listens.", json_schema_extra=EXECUTION)
    port: int | None = Field(
        default=None, ge=1, le=65535, description="Its port (default: a free one).", json_schema_extra=EXECUTION
    )
    startup_timeout_s: float = Field(
        default=900.0, gt=0, description="Seconds to wait for it to answer.", json_schema_extra=EXECUTION
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables added for the server (e.g. CUDA_VISIBLE_DEVICES); recorded in the "
        "manifest like the rest of the config, so no secrets: the server inherits this process's environment.",
        json_schema_extra=EXECUTION,
    )

    @field_validator("command")
    @classmethod
    def _check_command(cls, v: str) -> str:
        _check_placeholders("evaluation.server.command", v, ("model_dir", "port", "host", "model"))
        return v


class EvaluationConfig(_Section):
    """The evaluation stage.

    ``benchmarks`` empty (the default): the problems stage's eval split, in ``problems.format``.
    Otherwise each listed benchmark is loaded and answered (its name must be unique).
    ``prompt``: ``benchmark`` sends each question through its benchmark family's prompt
    (:func:`rscaffold.prompts.benchmark_prompt`), the builder the teacher and the students'
    training data use, so a student is asked what it was trained on; ``question`` sends the bare
    question (an ablation). The system prompt is always the student's own.
    ``limit``: the first N eval problems (default source), or the per-benchmark default limit.
    Every model gets the same token budget ``max_new_tokens``, plain or guided decoding.
    """

    models: list[EvalModelName] = Field(
        default_factory=lambda: list(EVAL_MODELS),
        description="Which models answer, side by side (default: all that training.students gives): 'base' (the untrained student), the trained students of training.students ('short_cot', 'cot_sft', 'scaffolded'), and the scaffolded student's ablations 'scaffolded-nogate' (no adaptive gating: every predicted signal committed) and 'scaffolded-noprune' (no pruning of non-essential signals); on request only, 'scaffolded-freefallback' (free decoding after an uncommitted gate may emit a signal).",
    )
    benchmarks: list[BenchmarkSource] = Field(
        default_factory=list,
        description="Benchmarks to answer (each name once). Empty: the problems stage's eval split, as problems.format.",
    )
    prompt: Literal["benchmark", "question"] = Field(
        default="benchmark",
        description="'benchmark': the benchmark family's prompt (rscaffold.prompts.benchmark_prompt), the same builder the teacher and the students' training data use; 'question': the bare question (an ablation: not what the students were trained on).",
    )
    limit: int | None = Field(
        default=None,
        ge=1,
        description="At most this many problems per benchmark (the first N of the eval split, or each benchmark's default limit).",
    )
    max_new_tokens: int = Field(
        default=160,
        ge=1,
        description="Most output tokens per answer, the same for every model: plain decoding and signal-guided decoding (signal tokens included) share this budget.",
    )
    batch_size: int = Field(
        default=8, ge=1, description="Questions decoded together (plain and guided).", json_schema_extra=EXECUTION
    )
    kv_cache: bool = Field(
        default=True,
        description="Guided decoding keeps each question's KV cache across signal prediction, step generation "
        "and rounds (the same outputs under greedy decoding); false: re-encode the context at every step.",
        json_schema_extra=EXECUTION,
    )
    shard_size: int = Field(
        default=256,
        ge=1,
        description="Problems per persisted shard of one model's answers to one benchmark (the unit of resume, "
        "and of fan-out with run.task_runner: ray); best a multiple of batch_size.",
        json_schema_extra=EXECUTION,
    )
    guided: GuidedInferenceConfig = Field(
        default_factory=GuidedInferenceConfig,
        description="Signal-guided decoding of the scaffolded student (adaptive gating, pruning, step cap).",
    )
    llm: BackendConfig | None = Field(
        default=None,
        description="Where the students decode: none or backend 'transformers' (default): in this process; "
        "backend 'openai': through an OpenAI-compatible server (vllm serve, SGLang, ...), with the teacher's "
        "client, concurrency, retries and request cache; its 'model' may hold {student} and {model_dir}. "
        "With 'server' and no 'llm': openai with model '{model_dir}'.",
    )
    server: StudentServerConfig | None = Field(
        default=None,
        description="Start a server for each served student (otherwise evaluation.llm.base_url is one that runs).",
    )
    served_students: list[StudentName] | None = Field(
        default=None,
        description="The students decoded through the server (default: all of them); the others decode in this "
        "process (e.g. the scaffolded student on a server without logprobs).",
    )
    bootstrap_samples: int = Field(
        default=1000, ge=0, description="Resamples of the 95% percentile bootstrap interval of accuracy (0: none)."
    )
    seed: int = Field(default=0, description="Seed of the bootstrap.")

    @field_validator("benchmarks")
    @classmethod
    def _unique_benchmarks(cls, v: list[BenchmarkSource]) -> list[BenchmarkSource]:
        names = [b.label for b in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"each benchmark may be listed once; repeated: {dup}")
        return v

    @model_validator(mode="after")
    def _check_serving(self) -> EvaluationConfig:
        if self.llm is not None and self.llm.backend == "vllm":
            raise ValueError(
                "evaluation.llm: backend 'vllm' (in-process) is not offered for students; serve them with "
                "backend 'openai' and evaluation.server.command 'vllm serve {model_dir} --port {port}'"
            )
        if self.server is not None and self.llm is not None and self.llm.backend != "openai":
            raise ValueError("evaluation.server needs evaluation.llm.backend 'openai' (or no evaluation.llm)")
        if self.llm is not None and self.llm.backend == "openai":
            _check_placeholders("evaluation.llm.model", self.llm.model, ("student", "model_dir"))
            if self.server is None and not self.llm.base_url:
                raise ValueError(
                    "evaluation.llm with backend 'openai' needs base_url (the server hosting the students) "
                    "or evaluation.server (a server the stage starts); the students are not sent to a default endpoint"
                )
        return self

    def served_llm(self) -> BackendConfig | None:
        """The backend of served students (None: every student decodes in this process)."""
        if self.llm is not None and self.llm.backend == "openai":
            return self.llm
        if self.server is not None:
            return BackendConfig(backend="openai", model="{model_dir}")  # base_url: the started server's
        return None

    def is_served(self, student: str) -> bool:
        return self.served_llm() is not None and (self.served_students is None or student in self.served_students)
