"""One dataclass holds everything a training run needs; the CLI, the job worker and resume all use it.

Hyperparameters carry OpenAI's names (n_epochs, batch_size, learning_rate_multiplier) and may be
"auto"; `resolve()` turns every "auto" into a number once the data is known, and the resolved config
is what gets written to the run folder (so resume reads back exactly what ran).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

from ..data.render import MAX_LENGTH
from ..data.stats import resolve_n_epochs
from ..data.validate import MIN_LENGTH
from ..models.quantize import Quantize, check_quantize

Auto = Literal["auto"]
Method = Literal["lora", "full"]
Objective = Literal["supervised", "dpo"]  # OpenAI's method.type

# Base learning rates; learning_rate_multiplier scales them, as OpenAI's multiplier scales theirs.
# LoRA adapters start at zero and are small, so they take a much larger step than full weights.
BASE_LEARNING_RATE = {"lora": 1e-3, "full": 5e-5}
# DPO's loss is on whole answers' summed log-probabilities, not a per-token mean, so its gradients are
# larger: a tenth of the supervised rate (TRL's DPO default for full fine-tuning is lower still, 1e-6).
DPO_LEARNING_RATE = {"lora": 1e-4, "full": 5e-6}
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "config.json"


@dataclass
class TrainConfig:
    data: str
    out: str
    base: str = "smollm2-135m-instruct"
    method: Method = "lora"
    objective: Objective = "supervised"  # "dpo": preference pairs, train.dpo
    dpo_beta: float = 0.1  # how far DPO may move from the reference model (OpenAI's default)
    validation_data: str | None = None
    validation_split: float | Auto = "auto"  # held out from `data` when no validation_data; auto: 0.1 at n >= 20
    n_epochs: int | Auto = "auto"
    batch_size: int | Auto = "auto"
    learning_rate_multiplier: float | Auto = "auto"
    seed: int = 42
    max_length: int = MAX_LENGTH  # tokens per example; longer ones are truncated (and reported)
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    quantize: Quantize | None = None  # "nf4": the frozen base in 4 bits (QLoRA, models.quantize); LoRA only
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # autocast dtype; master weights stay fp32
    max_row_tokens: int = 4096  # one packed row's length; a batch of examples fills one or more rows
    eval_every: int = 0  # steps between validation passes; 0 = once per epoch
    early_stopping_patience: int = 0  # validation passes without improvement before stopping; 0 = off
    threads: int = 0  # torch intra-op threads; 0 = one per physical core
    activation_checkpointing: bool = False  # recompute layers in the backward pass: less memory, slower
    # a finished run, or a checkpoint of a run, this one continues (OpenAI's fine-tuning of an ft: model):
    # its trained weights are the starting point, and its base, method and LoRA shape this run's (continued_from)
    init_from: str | None = None

    def __post_init__(self):
        check_quantize(self.quantize, self.method)
        if problems := self.problems():
            raise ValueError(problems[0])  # the first, by field: one line for the CLI

    def problems(self) -> list[str]:
        """What is out of range, each naming its field (the CLI's --option of the same name): a run
        must be refused before it loads a model, not crash steps later or quietly learn nothing."""
        def choice(name, allowed):
            value = getattr(self, name)
            return [] if value in allowed else [f"{name} must be one of {', '.join(allowed)}, got {value!r}"]

        def number(name, low, high=None, *, auto=False, low_open=False, high_open=False):
            value = getattr(self, name)
            if auto and value == "auto":
                return []
            if isinstance(value, bool) or not isinstance(value, int | float):
                return [f"{name} must be a number{' or auto' if auto else ''}, got {value!r}"]
            if (value <= low if low_open else value < low) or (
                    high is not None and (value >= high if high_open else value > high)):
                bounds = f"{'above' if low_open else 'at least'} {low}" + (
                    f" and {'below' if high_open else 'at most'} {high}" if high is not None else "")
                return [f"{name} must be {bounds}, got {value}"]
            return []

        return [
            *choice("method", ("lora", "full")), *choice("objective", ("supervised", "dpo")),
            *choice("precision", ("auto", "bf16", "fp32")),
            *number("n_epochs", 1, auto=True), *number("batch_size", 1, auto=True),
            *number("learning_rate_multiplier", 0, auto=True, low_open=True),
            *number("dpo_beta", 0, low_open=True), *number("validation_split", 0, 1, auto=True, high_open=True),
            *number("max_length", MIN_LENGTH), *number("max_row_tokens", 16),
            *number("lora_rank", 1), *number("lora_alpha", 0, low_open=True), *number("lora_dropout", 0, 1, high_open=True),
            *number("warmup_ratio", 0, 1), *number("weight_decay", 0), *number("max_grad_norm", 0, low_open=True),
            *number("eval_every", 0), *number("early_stopping_patience", 0), *number("threads", 0),
        ]

    @property
    def learning_rate(self) -> float:
        mult = 1.0 if self.learning_rate_multiplier == "auto" else float(self.learning_rate_multiplier)
        base = DPO_LEARNING_RATE if self.objective == "dpo" else BASE_LEARNING_RATE
        return base[self.method] * mult

    def resolve(self, n_train: int) -> TrainConfig:
        """A copy with every "auto" replaced by its value for a training set of n_train examples."""
        n_epochs = resolve_n_epochs(n_train) if self.n_epochs == "auto" else int(self.n_epochs)
        batch = auto_batch_size(n_train) if self.batch_size == "auto" else int(self.batch_size)
        mult = 1.0 if self.learning_rate_multiplier == "auto" else float(self.learning_rate_multiplier)
        return replace(self, n_epochs=n_epochs, batch_size=batch, learning_rate_multiplier=mult)

    def continued_from(self) -> TrainConfig:
        """This config on the run `init_from` names - a finished run, or a checkpoint of any run
        (RUN/checkpoints/step-N, or its weights folder; OpenAI's job on a ckpt-step-N model) - with
        that run's base, method, quantisation and LoRA shape (the trained weights fit only those), the
        path made absolute (a checkpoint's: its folder). ValueError when there are no weights to start
        from: a run that has not finished, a checkpoint without its weights."""
        from ..models.adapters import ADAPTER_FILE, FULL_FILE, holds_weights
        from .checkpoint import CHECKPOINTS, checkpoint_dirs

        given = Path(self.init_from).resolve()
        if not given.is_dir():  # (said of the path given: read on, a checkpoint's missing run was named instead)
            raise FileNotFoundError(f"{self.init_from}: no such folder (a run, or a checkpoint of one, to continue)")
        source = given.parent if given.name == "weights" and given.parent.parent.name == CHECKPOINTS else given
        if source.parent.name == CHECKPOINTS:  # its run's settings, and its own weights (the run may go on)
            prev = TrainConfig.load(source.parents[1])
            weights = source / "weights"
            if not holds_weights(weights):
                raise ValueError(f"{weights}: the checkpoint's trained weights are missing (no {ADAPTER_FILE} or "
                                 f"{FULL_FILE}), so there is nothing to continue from")
        else:
            prev = TrainConfig.load(source)
            if not (source / "result.json").is_file():
                ckpts = checkpoint_dirs(source)
                newest = f", or continue from its newest checkpoint: --init-from {ckpts[-1]}" if ckpts else ""
                raise ValueError(f"{source}: has not finished training, so it has no weights to continue from "
                                 f"(finish it first: tuneforge train --resume {source}{newest})")
        return replace(self.shaped_as(prev), init_from=str(source))

    def shaped_as(self, saved: TrainConfig) -> TrainConfig:
        """This config on the model `saved` (a run's own config) was trained on: its base, method,
        quantisation and LoRA shape, which its checkpoints' weights fit and no others."""
        return replace(self, base=saved.base, method=saved.method, quantize=saved.quantize,
                       lora_rank=saved.lora_rank, lora_alpha=saved.lora_alpha, lora_targets=saved.lora_targets)

    def save(self, run_dir: Path) -> None:
        (run_dir / CONFIG_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> TrainConfig:
        path = Path(run_dir) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: not a tuneforge run folder (no {CONFIG_FILE})")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:  # json alone names no file: "Expecting value: line 1 ..."
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: not a run's settings (a JSON object)")
        known = {f.name for f in fields(cls)}
        # The run is the folder its config is read from: a folder moved or copied elsewhere keeps its
        # old absolute `out`, and a resume would train from scratch in (a new folder at) that old path.
        raw["out"] = str(Path(run_dir).resolve())
        return cls(**{k: v for k, v in raw.items() if k in known})


def auto_batch_size(n_train: int) -> int:
    """About 0.2% of the examples (OpenAI's rule of thumb), at least 4 and at most 32 on small sets.

    Examples of one batch are packed into rows without padding, so a bigger batch costs no wasted
    FLOPs; 4 keeps enough optimizer steps on a 50-example set.
    """
    return max(4, min(32, round(n_train * 0.002)))
