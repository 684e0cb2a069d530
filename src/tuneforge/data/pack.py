"""Pack rendered examples into rows with no padding between them.

A batch of `batch_size` examples (OpenAI's meaning: examples per optimizer step) is laid out in as few
rows of at most `max_row_tokens` as first-fit allows. Position ids restart at 0 for every example;
with no attention mask, transformers reads that as a packed row and builds a block-diagonal causal
mask, so no token attends across an example boundary and no FLOP is spent on padding between
examples. Rows end with padding up to a multiple of ROW_MULTIPLE tokens (see there); padding is its
own "example" (positions restart, no targets), so it changes no real token's numbers, and
`Batch.real` marks it, so packed attention spends no slot of its own on it (train.attention).

Targets are shifted per example here (target[t] = label[t+1], and nothing at an example's last
token), so the loss never asks one example to predict the first token of the next.

A prefix that every example of the batch starts with - in chat data, the system prompt and the
chat template's opening, the same in every example of most training files - is laid out once
(`shared_prefix`). Causal attention makes its hidden states the same in every example, so they are
computed once: the other examples are laid out from the first token after it (positions going on
from there) and their attention reads the prefix's keys and values (train.attention.segments),
whose gradients sum what each example gives back. The same loss and gradients as laying it out in
every example (tests/train/test_pack.py), for fewer tokens through every layer: on the seed data
(a 23-token prefix, 92-token examples on average) ~19% fewer in a step of 4. Training steps whose
model draws dropout masks lay it out in each example (`share=False`, train.loss.draws_masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .render import IGNORE, Rendered

# Row lengths are rounded up to a multiple of this where the matmuls are oneDNN's bf16 kernels on a
# CPU (train.device.row_multiple): oneDNN compiles a kernel for every new matmul shape (~3 ms each,
# ~40 shapes a step whose size is the step's token count), so exact lengths, new every step, pay that
# compile on nearly every product; rounded ones repeat after a few steps. Measured on the embedded
# model: ~5% more tokens computed, +13% real tokens/s, and a lower peak RSS (fewer distinct allocation
# sizes). fp32 products (MKL) compile nothing per shape: there rows round to FP32_ROW_MULTIPLE.
ROW_MULTIPLE = 64
FP32_ROW_MULTIPLE = 8  # a vector's worth: +6.7% a fp32 LoRA step against 64 (benchmarks/README.md)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, length]
    position_ids: torch.Tensor  # [rows, length], restarting at 0 per example
    targets: torch.Tensor  # [rows, length], already shifted; IGNORE where no loss
    real: torch.Tensor  # [rows, length], False for the padding at row ends
    example: torch.Tensor  # [rows, length], each token's index in pack()'s `examples` (the shared
    # prefix's: the example it is laid out with); -1 for padding
    n_examples: int
    n_tokens: int  # the examples' tokens, a shared prefix counted in each (what is trained, and billed)
    shared: int = 0  # tokens at the start of every example laid out once, at the start of row 0

    @property
    def n_computed(self) -> int:
        """Tokens the decoder runs on: n_tokens less the shared prefix's copies, without padding."""
        return int(self.real.sum())

    @property
    def n_loss_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    def to(self, device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.targets.to(device),
            self.real.to(device),
            self.example.to(device),
            self.n_examples,
            self.n_tokens,
            self.shared,
        )


def shifted_targets(r: Rendered) -> list[int]:
    return r.labels[1:] + [IGNORE]


def shared_prefix(examples: list[Rendered], max_row_tokens: int) -> int:
    """How many tokens every example starts with, none of them a loss position: target[t] =
    label[t+1] must be IGNORE for every shared t, so no loss is ever read from a shared hidden state
    (the last one predicts each example's own next token). Every example keeps a token of its own."""
    if len(examples) < 2:
        return 0
    first = examples[0].input_ids
    limit = min(min(len(r.input_ids), max_row_tokens) for r in examples) - 1
    n = 0
    while n < limit and all(r.input_ids[n] == first[n] for r in examples):
        n += 1
    for r in examples:
        n = min(n, next((j - 1 for j in range(1, n + 1) if r.labels[j] != IGNORE), n))
    return max(n, 0)


def pack(examples: list[Rendered], max_row_tokens: int, pad_id: int, multiple: int = ROW_MULTIPLE,
         share: bool = True) -> Batch:
    """`share=False` lays a shared prefix out in every example (tests compare the two)."""
    shared = shared_prefix(examples, max_row_tokens) if share else 0
    rows: list[list[int]] = []  # indices into examples
    room: list[int] = []
    for k in sorted(range(len(examples)), key=lambda k: len(examples[k].input_ids), reverse=True):
        n = min(len(examples[k].input_ids), max_row_tokens) - shared
        for i, left in enumerate(room):
            if n <= left:
                rows[i].append(k)
                room[i] -= n
                break
        else:
            rows.append([k])
            room.append(max_row_tokens - n - (shared if len(rows) == 1 else 0))  # row 0 holds the prefix
    length = max(max_row_tokens - left for left in room)
    length = min(max_row_tokens, -(-length // multiple) * multiple)
    ids, pos, tgt, real, owner = [], [], [], [], []
    for row in rows:
        i, p, t, o = [], [], [], []
        for k in row:
            r = examples[k]
            n = min(len(r.input_ids), max_row_tokens)
            skip = 0 if row is rows[0] and not i else shared  # row 0's first example: the prefix, once
            i += r.input_ids[skip:n]
            p += list(range(skip, n))
            t += shifted_targets(r)[skip:n]
            o += [k] * (n - skip)
        pad = length - len(i)
        ids.append(i + [pad_id] * pad)
        pos.append(p + list(range(pad)))  # padding is its own "example" (packed attention: see Batch.real)
        tgt.append(t + [IGNORE] * pad)
        real.append([True] * len(i) + [False] * pad)
        owner.append(o + [-1] * pad)
    return Batch(
        input_ids=torch.tensor(ids),
        position_ids=torch.tensor(pos),
        targets=torch.tensor(tgt),
        real=torch.tensor(real),
        example=torch.tensor(owner),
        n_examples=len(examples),
        n_tokens=sum(min(len(r.input_ids), max_row_tokens) for r in examples),
        shared=shared,
    )
