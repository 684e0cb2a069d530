"""Direct preference optimisation (OpenAI's fine-tuning `method.type: "dpo"`).

Each training example is a prompt with a preferred and a non-preferred answer. DPO (Rafailov et al.,
2023) raises the probability of the preferred answer relative to the non-preferred one, measured
against a frozen reference - the model as it was before training:

    loss = -log sigmoid(beta * ((log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))))

where log p(answer) is the summed log-probability of the answer's tokens given the prompt. beta sets
how far the model may move from the reference (OpenAI's default: 0.1).

The reference log-probabilities are computed once, before the first step, with the very model that
is about to be trained, and written to the run folder: no second copy of the model is kept (for full
fine-tuning that would double its memory), and a resumed run reads them back instead of needing the
untrained model. Both answers of every pair of a step are packed into the same padding-free rows as
supervised examples (data.pack), so a step is one forward and one backward pass over 2 x batch_size
sequences.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.example import Example
from ..data.pack import Batch, pack
from ..data.render import Rendered, render_preference
from .device import autocast
from .loss import CHUNK, draws_masks, label_losses

REFERENCE_FILE = "reference_logps.json"


@dataclass
class Pair:
    chosen: Rendered
    rejected: Rendered
    line: int | None = None  # in the data file, for messages

    @property
    def n_tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def check_pairs(examples: list[Example], source: str) -> None:
    """ValueError naming the first example that is not a preference pair (the trainer asks before its
    base model loads, which for a large one takes minutes)."""
    for e in examples:
        if e.kind != "preference":
            raise ValueError(
                f"{source}, line {e.line}: DPO trains on preference pairs "
                '({"input": ..., "preferred_output": ..., "non_preferred_output": ...}); this line is a '
                f"{e.kind} example"
            )


def render_pairs(examples: list[Example], tokenizer, max_length: int, source: str) -> list[Pair]:
    """Every example as a preference pair; a file with anything else can't be trained with DPO."""
    check_pairs(examples, source)
    pairs = []
    for e in examples:
        chosen, rejected = render_preference(e, tokenizer, max_length)
        if chosen.n_loss_tokens and rejected.n_loss_tokens:
            pairs.append(Pair(chosen, rejected, e.line))
    return pairs


@dataclass
class SequenceOut:
    logps: torch.Tensor  # [n sequences] summed label log-probabilities (differentiable)
    n_tokens: torch.Tensor  # [n sequences] label tokens
    n_correct: torch.Tensor  # [n sequences] label tokens the model predicts (argmax)


def sequence_logps(model, batch: Batch, chunk: int = CHUNK) -> SequenceOut:
    """Summed log-probability of each packed sequence's labels. The vocabulary projection runs only
    on label positions, a chunk at a time (train.loss.label_losses: with LoRA's frozen output layer,
    the one-pass kernel supervised training uses)."""
    nll, hits, mask = label_losses(model, batch, chunk, uniform=False)
    owner, logps = batch.example[mask], -nll
    zeros = torch.zeros(batch.n_examples, dtype=torch.float32, device=nll.device)
    return SequenceOut(
        logps=zeros.index_add(0, owner, logps),
        n_tokens=zeros.index_add(0, owner, torch.ones_like(logps)),
        n_correct=zeros.index_add(0, owner, hits.float()),
    )


def _pack_pairs(pairs: list[Pair], max_row_tokens: int, pad_id: int, device, share: bool = True) -> Batch:
    """Both answers of every pair in padding-free rows: sequence 2i is pair i's preferred answer,
    2i + 1 its other one."""
    return pack([r for p in pairs for r in (p.chosen, p.rejected)], max_row_tokens, pad_id, share=share).to(device)


@dataclass
class PairsOut:
    losses: torch.Tensor  # [pairs] DPO loss of each pair (differentiable)
    margins: torch.Tensor  # [pairs] beta * (chosen - rejected log-ratio): the implicit reward margin
    n_tokens: int  # tokens of the preferred answers
    n_correct: int  # of those, predicted by the model (token accuracy on what it should say)

    def sums(self) -> list[float]:
        """[loss, pairs, preferred-answer tokens, of those predicted, pairs ranked right (margin > 0),
        margin], each summed: they add up across batches and processes (summarise reads them)."""
        return [float(self.losses.detach().sum()), len(self.losses), self.n_tokens, self.n_correct,
                float((self.margins > 0).sum()), float(self.margins.sum())]


NO_PAIRS = [0.0] * 6  # PairsOut.sums() of nothing


def pair_losses(model, pairs: list[Pair], reference: torch.Tensor, beta: float, max_row_tokens: int, pad_id: int) -> PairsOut:
    """DPO losses of `pairs`, whose reference log-probabilities are reference[:, 0] (preferred) and
    reference[:, 1] (non-preferred)."""
    device = next(model.parameters()).device
    out = sequence_logps(model, _pack_pairs(pairs, max_row_tokens, pad_id, device, share=not draws_masks(model)))
    ratios = out.logps.view(-1, 2) - reference.to(device)
    margins = beta * (ratios[:, 0] - ratios[:, 1])
    return PairsOut(
        losses=-F.logsigmoid(margins),
        margins=margins.detach(),
        n_tokens=int(out.n_tokens[0::2].sum()),
        n_correct=int(out.n_correct[0::2].sum()),
    )


@torch.no_grad()
def pair_logps(model, pairs: list[Pair], *, batch_size: int, max_row_tokens: int, pad_id: int,
                    device: torch.device, dtype) -> torch.Tensor:
    """[pairs, 2] summed log-probabilities of each pair's (preferred, non-preferred) answers under
    `model` as it is now: DPO's reference before training, and evaluate.compare's ranking of them."""
    was_training = model.training
    model.eval()
    rows = []
    for i in range(0, len(pairs), batch_size):
        batch = _pack_pairs(pairs[i : i + batch_size], max_row_tokens, pad_id, device)
        with autocast(device, dtype):
            rows.append(sequence_logps(model, batch).logps.view(-1, 2).cpu())
    model.train(was_training)
    return torch.cat(rows) if rows else torch.zeros(0, 2)


def save_reference(run_dir: Path, train: torch.Tensor, valid: torch.Tensor) -> None:
    data = {"train": train.tolist(), "valid": valid.tolist()}
    (Path(run_dir) / REFERENCE_FILE).write_text(json.dumps(data) + "\n")


def load_reference(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    path = Path(run_dir) / REFERENCE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: a DPO run folder needs {REFERENCE_FILE} to resume")
    data = json.loads(path.read_text())
    return (torch.tensor(data["train"], dtype=torch.float32).view(-1, 2),
            torch.tensor(data["valid"], dtype=torch.float32).view(-1, 2))


@torch.no_grad()
def evaluate(model, pairs: list[Pair], reference: torch.Tensor, *, beta: float, batch_size: int,
             max_row_tokens: int, pad_id: int, device: torch.device, dtype) -> list[float]:
    """PairsOut.sums() over all of `pairs`, batch by batch."""
    was_training = model.training
    model.eval()
    sums = NO_PAIRS
    for i in range(0, len(pairs), batch_size):
        with autocast(device, dtype):
            out = pair_losses(model, pairs[i : i + batch_size], reference[i : i + batch_size], beta, max_row_tokens, pad_id)
        sums = [a + b for a, b in zip(sums, out.sums())]
    model.train(was_training)
    return sums


def summarise(sums: list[float]) -> dict:
    """The reported metrics from evaluate()'s sums (or a step's)."""
    total, n, n_tokens, n_correct, ranked, margin = sums
    n = max(n, 1)
    return {
        "loss": total / n,
        "token_accuracy": n_correct / max(n_tokens, 1),
        "reward_accuracy": ranked / n,
        "reward_margin": margin / n,
        "n_tokens": round(n_tokens),
        "n_pairs": round(n),
    }
