"""The registry's entries: every kind of scorer a server can serve by name, validated at start.

    models      a sequence-classification reward model (or, with `process`, a process reward model)
    ensembles   several models aggregated
    judges      a causal LM asked a question, scored by its verdict tokens' probabilities
    verifiers   a rule: math answers, exact or regex matches, JSON schemas (no device)
    composites  any of the above combined by an expression, with gates and thresholds

Errors name the entry and the key (`judges[0] (judge).verdict.yes: ...`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rewardserve.scorers.expression import compile_total
from rewardserve.transforms.spec import TransformSpec
from rewardserve.verifiers import checks

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL_DIR = ASSETS / "default-rm"
DEFAULT_MODEL_NAME = "rewardserve-default"
DEFAULT_JUDGE_DIR = ASSETS / "default-judge"
DEFAULT_JUDGE_NAME = "rewardserve-judge"
DEFAULT_JUDGE_TEMPLATE = "Question: {{ prompt }}\nAnswer: {{ response }}\nIs the answer correct?"

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Truncation = Literal["left", "right", "error"]
Aggregate = Literal["mean", "min", "uwo", "median"]


# the templates are the operator's, the values the callers': sandboxed, and no attribute writes
_JINJA = ImmutableSandboxedEnvironment(keep_trailing_newline=True)


def compile_template(text: str) -> jinja2.Template:
    try:
        return _JINJA.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"line {exc.lineno}: {exc.message}") from None


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Shaped(Closed):
    """What every entry may set about its rewards' shaping (transforms/)."""

    transform: TransformSpec | None = Field(None, description="The default reward transform of its requests.")
    length_fit: str | None = Field(None, description="A length fit (`rewardserve calibrate length`), for the length "
                                                     "transform.")
    calibration: str | None = Field(None, description="A calibration (`rewardserve calibrate pairs`), for the "
                                                      "calibrated transform.")

    @model_validator(mode="after")
    def _fits(self):
        kind = self.transform.kind if self.transform is not None else None
        if kind == "length" and self.length_fit is None:
            raise ValueError("transform: the length transform needs the entry's length_fit")
        if kind == "calibrated" and self.calibration is None:
            raise ValueError("transform: the calibrated transform needs the entry's calibration")
        return self


class CheckpointEntry(Shaped):
    """A checkpoint served under `name`: what models and judges share."""

    name: str = Field(min_length=1, description="The name requests select it by (`model`).")
    path: str = Field(str(DEFAULT_MODEL_DIR), min_length=1, description="Local path or Hugging Face hub id.")
    dtype: Dtype = Field("auto", description="Weights dtype: auto = bfloat16 on GPU, float32 on CPU.")
    devices: str = Field("auto", description="'auto' (all visible GPUs, else CPU), 'cpu', or e.g. 'cuda:0,cuda:1'.")
    max_length: int | None = Field(
        None, ge=1, description="Longest item in tokens (default: the model's max_position_embeddings)."
    )
    truncation: Truncation = Field(
        "error", description="Policy for over-long items when the request does not say: left, right or error (413)."
    )
    backend: Literal["auto", "packed", "hf"] = Field(
        "auto", description="auto: the packed fast path for Llama/Qwen2/Qwen3/Mistral, else padded HF."
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the checkpoint.")
    revision: str | None = Field(None, description="Hub revision, when `path` is a hub id.")
    max_batch_tokens: int | None = Field(None, ge=1, description="This model's batch token budget (default: the "
                                                                 "server's max_batch_tokens).")


class LabelTokens(Closed):
    good: str = Field(min_length=1, description="The token whose probability says the step is right (e.g. '+').")
    bad: str = Field(min_length=1, description="The token that says it is wrong (e.g. '-').")


class ProcessHead(Closed):
    """A process reward model: read at the tag that ends each step."""

    step_tag: str = Field(min_length=1, description="The text (one token) after each step, where the PRM reads.")
    labels: LabelTokens | None = Field(None, description="Two label tokens of a causal LM's head (Math-Shepherd "
                                                         "style); without them, the checkpoint's classification head.")


class ModelEntry(CheckpointEntry):
    """A reward model checkpoint: AutoModelForSequenceClassification (or a process reward model)."""

    heads: dict[str, float] | None = Field(
        None, description="reward = sum of weight x head output, by the checkpoint's id2label names (default: head 0)."
    )
    process: ProcessHead | None = Field(None, description="Score steps at a tag: a process reward model.")

    @field_validator("heads")
    @classmethod
    def _some_heads(cls, heads: dict[str, float] | None) -> dict[str, float] | None:
        if heads is not None and not heads:
            raise ValueError("name at least one head, or leave heads out for head 0")
        return heads

    @model_validator(mode="after")
    def _process(self) -> "ModelEntry":
        if self.process is not None and self.heads is not None:
            raise ValueError("heads: a process reward model reads its head at every step; heads apply to outcome "
                             "reward models")
        return self


class MemberStats(Closed):
    mean: float
    std: float = Field(gt=0)


class EnsembleEntry(Shaped):
    """Several model entries scored together and aggregated into one reward."""

    name: str = Field(min_length=1)
    members: list[str] = Field(min_length=2, description="Names of model entries.")
    aggregate: Aggregate = Field("mean", description="mean | min (worst case) | uwo (mean - lambda var) | median")
    lambda_: float | None = Field(None, alias="lambda", ge=0, description="uwo only: the weight of the variance.")
    normalize: bool = Field(False, description="Standardise each member's rewards with its `stats` first.")
    stats: dict[str, MemberStats] | None = Field(None, description="Per member: mean and std of its rewards.")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> "EnsembleEntry":
        if len(set(self.members)) != len(self.members):
            raise ValueError(f"members: {self.members} names a model twice")
        if self.aggregate == "uwo" and self.lambda_ is None:
            raise ValueError("lambda: uwo needs lambda, the weight of the variance penalty (mean - lambda * var)")
        if self.aggregate != "uwo" and self.lambda_ is not None:
            raise ValueError(f"lambda: applies to aggregate uwo only, not {self.aggregate}")
        if self.normalize:
            missing = [m for m in self.members if m not in (self.stats or {})]
            if missing:
                raise ValueError(f"stats: normalize needs the mean and std of every member; missing {missing}")
        if self.stats is not None:
            if not self.normalize:
                raise ValueError("stats: used only with normalize: true")
            extra = sorted(set(self.stats) - set(self.members))
            if extra:
                raise ValueError(f"stats: {extra} are not members")
        return self


class Verdict(Closed):
    yes: str = Field("Yes", min_length=1, description="The token of a yes (one token of the judge's tokenizer).")
    no: str = Field("No", min_length=1, description="The token of a no.")

    @model_validator(mode="before")
    @classmethod
    def _yaml_booleans(cls, data):
        """YAML 1.1 (PyYAML) reads the keys `yes` and `no` as booleans."""
        if isinstance(data, dict):
            data = {("yes" if k is True else "no" if k is False else k): v for k, v in data.items()}
            for key, value in data.items():
                if isinstance(value, bool):
                    raise ValueError(f"{key}: YAML read the token as the boolean {value}: quote it (\"Yes\")")
        return data


class PairVerdict(Closed):
    a: str = Field("A", min_length=1, description="The token that says the first response is better.")
    b: str = Field("B", min_length=1, description="The token that says the second is.")


class PairwiseJudging(Closed):
    """How /v1/compare asks the judge, in both orders (position bias)."""

    template: str = Field(description="Jinja over prompt, a, b (and criteria).")
    verdict: PairVerdict = PairVerdict()


class JudgeEntry(CheckpointEntry):
    """A causal LM judge: the reward is log P(yes) - log P(no) at the verdict, one forward pass."""

    path: str = Field(str(DEFAULT_JUDGE_DIR), min_length=1, description="A *ForCausalLM checkpoint.")
    template: str = Field(DEFAULT_JUDGE_TEMPLATE, description="Jinja over prompt, response, criteria, reference; "
                                                              "the judge's chat template wraps it as the user turn.")
    verdict: Verdict = Verdict()
    criteria: str | None = Field(None, description="Passed to the template as `criteria`.")
    pairwise: PairwiseJudging | None = Field(None, description="/v1/compare's question, asked in both orders.")

    @model_validator(mode="after")
    def _check(self) -> "JudgeEntry":
        if self.truncation == "right":
            raise ValueError("truncation: a judge's verdict follows its question, which cutting the end would remove; "
                             "use left or error")
        if self.verdict.yes == self.verdict.no:
            raise ValueError(f"verdict: yes and no are the same token {self.verdict.yes!r}")
        if self.pairwise is not None and self.pairwise.verdict.a == self.pairwise.verdict.b:
            raise ValueError(f"pairwise.verdict: a and b are the same token {self.pairwise.verdict.a!r}")
        for key, text in (("template", self.template), ("pairwise.template",
                                                        self.pairwise.template if self.pairwise else None)):
            if text is not None:
                try:
                    compile_template(text)
                except ValueError as exc:
                    raise ValueError(f"{key}: {exc}") from None
        return self


class VerifierEntry(Shaped):
    """A rule checked against each item's ground truth (its `reference`), off the event loop."""

    name: str = Field(min_length=1)
    type: Literal["math", "exact", "regex", "json_schema"]
    pattern: str | None = Field(None, description="regex: the pattern the response must match (`{reference}` "
                                                  "stands for the escaped reference).")
    json_schema: dict[str, Any] | None = Field(None, alias="schema", description="json_schema: the schema.")
    case_sensitive: bool = Field(True, description="exact: compare letter case too.")
    timeout_s: float = Field(5.0, gt=0, le=300, description="Per item: past it, 0 and the reason 'timed out'.")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> "VerifierEntry":
        if self.type == "regex" and self.pattern is None:
            raise ValueError("pattern: a regex verifier needs a pattern")
        if self.type != "regex" and self.pattern is not None:
            raise ValueError(f"pattern: applies to regex verifiers, not {self.type}")
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("schema: a json_schema verifier needs a schema")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"schema: applies to json_schema verifiers, not {self.type}")
        checks.validate(self.type, self.config)
        return self

    @property
    def config(self) -> dict[str, Any]:
        """What the checker needs of the entry (and what, with its version, keys its cache)."""
        return {"pattern": self.pattern, "schema": self.json_schema, "case_sensitive": self.case_sensitive}


class Gate(Closed):
    on: str = Field(description="The component that must pass.")
    at_least: float = Field(description="...with at least this value; else the gated component counts 0.")

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data):
        """YAML 1.1 (PyYAML) reads the key `on` as the boolean true."""
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data


class CompositeEntry(Shaped):
    """Components (any other entries) combined into one reward."""

    name: str = Field(min_length=1)
    components: dict[str, str] = Field(min_length=1, description="name in the total -> registry entry.")
    total: str = Field(description="The expression over the components (scorers/expression.py).")
    transforms: dict[str, TransformSpec] = Field(default_factory=dict, description="Per component, before the total.")
    gates: dict[str, Gate] = Field(default_factory=dict, description="A component counts only if another passes.")
    thresholds: dict[str, float] = Field(default_factory=dict, description="Reported per item: value >= threshold.")

    @model_validator(mode="after")
    def _check(self) -> "CompositeEntry":
        names = set(self.components)
        for key in ("transforms", "gates", "thresholds"):
            extra = sorted(set(getattr(self, key)) - names)
            if extra:
                raise ValueError(f"{key}: {extra} are not components; the components are {sorted(names)}")
        for name, gate in self.gates.items():
            if gate.on not in names or gate.on == name:
                raise ValueError(f"gates.{name}.on: {gate.on!r} is not another component")
        try:
            compile_total(self.total, names)
        except ValueError as exc:
            raise ValueError(f"total: {exc}") from None
        return self


SECTIONS = ("models", "ensembles", "judges", "verifiers", "composites")


class RegistryConfig(Closed):
    """Every scorer one process serves."""

    default: str | None = Field(None, description="The entry used when a request names none (else the first one).")
    models: list[ModelEntry] = Field(default_factory=list)
    ensembles: list[EnsembleEntry] = Field(default_factory=list)
    judges: list[JudgeEntry] = Field(default_factory=list)
    verifiers: list[VerifierEntry] = Field(default_factory=list)
    composites: list[CompositeEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "RegistryConfig":
        seen: dict[str, str] = {}
        for section in SECTIONS:
            for i, e in enumerate(getattr(self, section)):
                if e.name in seen:
                    raise ValueError(f"{section}[{i}] ({e.name}).name: {e.name!r} is already the name of "
                                     f"{seen[e.name]}")
                seen[e.name] = f"{section}[{i}]"
        if not seen:
            raise ValueError("models: the registry serves nothing: give at least one entry")
        models = [m.name for m in self.models]
        for i, e in enumerate(self.ensembles):
            for m in e.members:
                if m not in models:
                    raise ValueError(f"ensembles[{i}] ({e.name}).members: {m!r} is not a model entry; "
                                     f"the models are {models}")
        usable = [n for n, where in seen.items() if not where.startswith("composites")]
        for i, e in enumerate(self.composites):
            for part, entry in e.components.items():
                if entry not in usable:
                    raise ValueError(f"composites[{i}] ({e.name}).components.{part}: {entry!r} is not an entry a "
                                     f"composite can use; they are {usable}")
        if self.default is not None and self.default not in seen:
            raise ValueError(f"default: {self.default!r} is not an entry; the entries are {list(seen)}")
        return self

    def entries(self) -> list[tuple[str, int, Any]]:
        return [(section, i, e) for section in SECTIONS for i, e in enumerate(getattr(self, section))]

    @property
    def default_name(self) -> str:
        return self.default or self.entries()[0][2].name

    @property
    def names(self) -> list[str]:
        return [e.name for _, _, e in self.entries()]

    def check(self, server) -> None:
        """What depends on the server settings too; raises ValueError naming the entry and key."""
        for section in ("models", "judges"):
            for i, m in enumerate(getattr(self, section)):
                budget = m.max_batch_tokens or server.max_batch_tokens
                if m.max_length is not None and m.max_length > budget:
                    raise ValueError(f"{section}[{i}] ({m.name}).max_length: {m.max_length} exceeds the batch token "
                                     f"budget ({budget}): the longest item must fit in one batch")
