"""AdamW with its learning-rate schedule, one fused kernel call per step.

The arithmetic is torch.optim.AdamW(fused=True)'s: the same ATen kernel (`torch._fused_adamw_`, CPU
and CUDA), the same state tensors, the same state_dict layout (so a checkpoint written by either
resumes with the other). Why not torch.optim itself: constructing any torch.optim optimizer imports
torch._dynamo (`Optimizer.add_param_group` is wrapped in `torch._disable_dynamo`, which imports it on
first call), and with it sympy - 1.3 s and ~70 MB resident in a process that never compiles anything.
The schedule is a plain function of the step count, so no LR scheduler object either.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def warmup_then_decay(warmup: int, total: int) -> Callable[[int], float]:
    """The learning rate's factor at each step: linear warm-up over `warmup` steps, then linear decay
    to zero at `total` (what OpenAI-style short fine-tunes use)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class AdamW:
    def __init__(
        self,
        params: list[torch.nn.Parameter],
        lr: float,
        weight_decay: float = 0.0,
        schedule: Callable[[int], float] = lambda step: 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.params, self.base_lr, self.weight_decay = list(params), lr, weight_decay
        self.schedule, self.betas, self.eps = schedule, betas, eps
        self.steps = 0  # optimizer steps taken: what the schedule reads
        self.state: dict[int, dict[str, torch.Tensor]] = {}  # by index into params, made at a first gradient

    @property
    def lr(self) -> float:
        """The learning rate the next step takes."""
        return self.base_lr * self.schedule(self.steps)

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]  # as torch: no gradient, no update
        for i in live:
            if i not in self.state:
                p = self.params[i]
                self.state[i] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
        if live:
            states = [self.state[i] for i in live]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(
                [self.params[i] for i in live], [self.params[i].grad for i in live],
                [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [], steps,
                lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], weight_decay=self.weight_decay,
                eps=self.eps, amsgrad=False, maximize=False,
            )
        self.steps += 1

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        """torch.optim's layout: {"state": {index: tensors}, "param_groups": [...]}, plus the step count
        as its LR scheduler would have saved it."""
        group = {"lr": self.lr, "initial_lr": self.base_lr, "betas": self.betas, "eps": self.eps,
                 "weight_decay": self.weight_decay, "amsgrad": False, "fused": True,
                 "params": list(range(len(self.params)))}
        return {"state": self.state, "param_groups": [group], "scheduler": {"last_epoch": self.steps}}

    def load_state_dict(self, saved: dict, scheduler: dict | None = None) -> None:
        """A state_dict of this class or of torch.optim.AdamW (then its LambdaLR's as `scheduler`).
        Copied, as torch.optim does: the saved tensors may still be another optimizer's live state."""
        (group,) = saved["param_groups"]
        if len(group["params"]) != len(self.params):
            raise ValueError(
                f"the saved optimizer state is for {len(group['params'])} tensors, this model trains {len(self.params)}"
            )
        position = {saved_index: i for i, saved_index in enumerate(group["params"])}
        self.state = {
            position[k]: {name: t.to(self.params[position[k]].device, copy=True) for name, t in s.items()}
            for k, s in saved["state"].items()
        }
        self.steps = (scheduler or saved["scheduler"])["last_epoch"]
