"""A GGUF base model's frozen linear layers kept in the file's own blocks, for LoRA.

The embedded SmolLM2 ships as a Q4_1 GGUF file: 4 bits per weight plus an fp16 scale and offset per
block of 32. models.load de-quantises it once into an fp32 safetensors cache (4 bytes a weight), which
is what full fine-tuning trains and what the server loads. A LoRA run never changes the base weights,
so its frozen linear layers keep the file's blocks instead, and each product de-quantises one weight
matrix (or one q/k/v or gate/up stack) into a temporary, as QLoRA does with NF4 (models.quantize).
Unlike NF4 this changes no number: the blocks *are* the model, and the arithmetic is the gguf
package's (d * q + m in fp32, as transformers de-quantised the cache), so every weight is the
cache's, bit for bit - and layer 0 is checked against the cache before the file is trusted.

The 4-bit values are widened to a byte each and the block scales to fp32 once, at load: 1.25 bytes a
weight instead of 4 (~290 MB less for the embedded model, a sixth of a LoRA run's peak), and
de-quantising is three contiguous passes, ~0.3 ms per million weights: ~3% of a step (splitting the
nibbles at every product would save another ~50 MB for three times that). That is for fp32 training
(a CPU without native bf16, or --precision fp32). Under bf16 autocast the frozen base is stored in
bf16, 2 bytes a weight, and a step is twice as fast: the blocks would save less for twice the share
of a step, so there it stays as it was; `--quantize nf4` is the choice when memory is what is short.

Q4_0, Q4_1 and Q8_0 layers of llama, qwen2 and qwen3 files are kept so; anything else (k-quants, f16,
other architectures) trains on the cache's weights as before.

The token embedding goes the same way where the output layer is tied to it (SmolLM2: Q8_0, 113 MB in
fp32, 32 MB as blocks): the embedding de-quantises the rows it looks up, and train.loss's projection
onto the vocabulary de-quantises HEAD_ROWS rows at a time, so no fp32 copy of the whole matrix exists.

The file is read by a small parser of its header: gguf's GGUFReader turns every metadata array (the
tokenizer's 49k tokens and merges) into numpy objects first, ~3 s and ~160 MB for the embedded model.
"""

from __future__ import annotations

import mmap
import struct
import threading
from pathlib import Path

import torch
from torch import nn

from ..train.device import compute_dtype, drop_file_pages, weights_file_maps

# ggml type id -> (name, bytes per block of 32 weights)
BLOCK_TYPES = {2: ("Q4_0", 18), 3: ("Q4_1", 20), 8: ("Q8_0", 34)}
ARCHITECTURES = ("llama", "qwen2", "qwen3")
# Rows of a large matrix (the tied embedding as output layer: 49,152 rows) de-quantised at a time in a
# product: 9 MB of fp32 at width 576, which the product reads while it is still in cache.
HEAD_ROWS = 4096
LINEAR = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}


class GgufWeights:
    """A frozen weight matrix [out, in] as GGUF blocks, as train.lora's products take it in place of a
    tensor: `mm_t`, `mm`, `shape`. `qs`: the blocks' values, a byte each [out, in / 32, 32] (Q8_0's
    int8 stored as uint8); `scale` (and Q4_1's `low`): their fp32 scales (offsets) [out, in / 32, 1]."""

    def __init__(self, kind: str, qs: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None):
        self.kind, self.qs, self.scale, self.low = kind, qs, scale, low
        self.shape = (qs.shape[0], qs.shape[1] * 32)

    @property
    def device(self) -> torch.device:
        return self.qs.device

    def dequantize(self, dtype: torch.dtype = torch.float32, scratch: bool = False) -> torch.Tensor:
        """The weights in `dtype`: gguf's fp32 arithmetic (the same operations in the same order, so the
        same roundings), then one cast - the one the cache's fp32 weights would get. `scratch`: made in
        this thread's reused buffer (`_scratch`), valid until the next scratch de-quantisation."""
        src = self.qs.view(torch.int8) if self.kind == "Q8_0" else self.qs
        w = _scratch(src).copy_(src) if scratch else src.to(torch.float32)
        if self.kind == "Q4_0":
            w.sub_(8)
        w.mul_(self.scale)
        if self.low is not None:
            w.add_(self.low)
        w = w.view(self.shape)
        return w if dtype == torch.float32 else w.to(dtype)

    def mm_t(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T ([tokens, in] -> [tokens, out]), in x's dtype; a matrix of more than HEAD_ROWS rows a
        block of rows at a time (into `out` where given)."""
        if self.shape[0] <= HEAD_ROWS:
            return torch.mm(x, self.dequantize(x.dtype, scratch=True).T, out=out)
        if out is None:
            out = x.new_empty(x.shape[0], self.shape[0])
        for start in range(0, self.shape[0], HEAD_ROWS):
            part = self.rows(start, start + HEAD_ROWS)
            torch.mm(x, part.dequantize(x.dtype, scratch=True).T, out=out[:, start : start + part.shape[0]])
        return out

    def mm(self, g: torch.Tensor) -> torch.Tensor:
        """g @ W ([tokens, out] -> [tokens, in]), in g's dtype; a matrix of more than HEAD_ROWS rows as
        a sum over blocks of rows."""
        if self.shape[0] <= HEAD_ROWS:
            return g @ self.dequantize(g.dtype, scratch=True)
        total = g.new_zeros(g.shape[0], self.shape[1])
        for start in range(0, self.shape[0], HEAD_ROWS):
            part = self.rows(start, start + HEAD_ROWS)
            total.addmm_(g[:, start : start + part.shape[0]], part.dequantize(g.dtype, scratch=True))
        return total

    def take(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The rows at `ids`, de-quantised: [*ids.shape, in] (an embedding lookup)."""
        flat = ids.reshape(-1)
        rows = GgufWeights(self.kind, self.qs[flat], self.scale[flat], None if self.low is None else self.low[flat])
        return rows.dequantize(dtype).view(*ids.shape, self.shape[1])

    def rows(self, start: int, stop: int) -> GgufWeights:
        return GgufWeights(self.kind, self.qs[start:stop], self.scale[start:stop],
                           None if self.low is None else self.low[start:stop])

    @staticmethod
    def stack(parts: list[GgufWeights]) -> GgufWeights:
        """Several matrices of one kind with the same input, as one (their rows one after another)."""
        lows = [p.low for p in parts]
        return GgufWeights(parts[0].kind, torch.cat([p.qs for p in parts]), torch.cat([p.scale for p in parts]),
                           None if lows[0] is None else torch.cat(lows))


# Every product de-quantises its weights into the same buffer, one per thread (a CPU training step runs
# its forward and backward passes in the thread that calls them; concurrent jobs' threads do not
# share it). A fresh temporary per product - 1-9 MB, four a layer, forward and backward - is freed
# between tensors the step keeps for its backward pass, and glibc cannot put those holes together
# again: measured on the embedded model, the heap of an fp32 LoRA step grew to 1,219 MB around ~680 MB
# of live tensors with fresh temporaries, to 956 MB with this buffer.
_thread = threading.local()


def _scratch(like: torch.Tensor) -> torch.Tensor:
    """An fp32 tensor of `like`'s shape in this thread's scratch buffer (grown to the largest asked for)."""
    buffer = getattr(_thread, "buffer", None)
    if buffer is None or buffer.numel() < like.numel() or buffer.device != like.device:
        buffer = _thread.buffer = torch.empty(like.numel(), dtype=torch.float32, device=like.device)
    return buffer[: like.numel()].view(like.shape)


class _Frozen(torch.autograd.Function):
    """x @ W.T (+ bias) in `dtype` (autocast's, as a Linear would multiply) for frozen GGUF weights; the
    backward pass de-quantises W again rather than keep it."""

    @staticmethod
    def forward(ctx, x, bias, weights, dtype):
        ctx.weights, ctx.shape, ctx.dtypes = weights, x.shape, (x.dtype, dtype)
        y = weights.mm_t(x.reshape(-1, x.shape[-1]).to(dtype))
        if bias is not None:
            y.add_(bias.to(dtype))
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        grad_x = None
        if ctx.needs_input_grad[0]:
            x_dtype, dtype = ctx.dtypes
            grad_x = ctx.weights.mm(grad.reshape(-1, grad.shape[-1]).to(dtype)).to(x_dtype).view(ctx.shape)
        return grad_x, None, None, None


def _hold(module: nn.Module, weights: GgufWeights) -> None:
    """Blocks as a module's buffers (not saved: the base model is the file), so .to(device) moves them."""
    module.kind = weights.kind
    for name in ("qs", "scale", "low"):
        module.register_buffer(name, getattr(weights, name), persistent=False)


def _held(module: nn.Module) -> GgufWeights:
    return GgufWeights(module.kind, module.qs, module.scale, module.low)


class GgufLinear(nn.Module):
    """A frozen linear layer whose weight stays in GGUF blocks (`GgufWeights`), held as buffers (`_hold`)."""

    def __init__(self, weights: GgufWeights, bias: nn.Parameter | None):
        super().__init__()
        _hold(self, weights)
        self.out_features, self.in_features = weights.shape
        self.bias = bias

    @property
    def weight(self) -> GgufWeights:
        return _held(self)

    def use(self, weights: GgufWeights) -> None:
        """Hold these (equal) blocks instead: views of a stack (train.lora.lora_group)."""
        self.qs, self.scale, self.low = weights.qs, weights.scale, weights.low

    def forward(self, x):
        return _Frozen.apply(x, self.bias, self.weight, compute_dtype(x))


class GgufEmbedding(nn.Module):
    """A frozen token embedding whose weight stays in GGUF blocks: a lookup de-quantises its rows."""

    def __init__(self, weights: GgufWeights):
        super().__init__()
        _hold(self, weights)
        self.num_embeddings, self.embedding_dim = weights.shape

    @property
    def weight(self) -> GgufWeights:
        return _held(self)

    def forward(self, ids):
        return self.weight.take(ids)


class GgufTiedHead(GgufLinear):
    """The output layer of a model whose output layer is its input embedding (tie_word_embeddings), over
    a `GgufEmbedding`: its weight is the embedding's blocks - held by the embedding alone, so that
    .to(device) moves them once and they stay one tensor."""

    def __init__(self, embedding: GgufEmbedding):
        nn.Module.__init__(self)  # (no buffers of its own: GgufLinear.__init__ would register them)
        self.kind, self.bias = embedding.kind, None
        self.out_features, self.in_features = embedding.num_embeddings, embedding.embedding_dim
        self._embedding = [embedding]  # in a list: not a second submodule path to the same module

    @property
    def weight(self) -> GgufWeights:
        return self._embedding[0].weight


def keep_blocks(model: nn.Module, path: Path, heads: int, kv_heads: int) -> str | None:
    """Replace each linear layer of `model` that the file holds in a kept block type by a `GgufLinear` of
    its blocks, and a tied token embedding by a `GgufEmbedding` with a `GgufTiedHead`; the kind(s) kept
    ("Q4_1/Q8_0"), or None if none. `model`: a train.model.CausalLM with the fp32 weights of the file's
    cache, whose base will stay frozen (LoRA). Layer 0's blocks are checked against its cached weights
    first (names, row order, arithmetic), and every row of the embedding against its own; on any
    difference the linear layers, or the embedding, keep their fp32 weights."""
    blocks = read_linear_blocks(path)
    embedding = blocks.pop(EMBEDDING, None)
    kinds = _keep_linear(model, blocks, heads, kv_heads) | _keep_embedding(model, embedding)
    return "/".join(sorted(kinds)) or None


def _keep_linear(model: nn.Module, blocks: dict[str, GgufWeights], heads: int, kv_heads: int) -> set[str]:
    """keep_blocks for the linear layers: the kinds kept, or nothing."""
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name in blocks}
    if not layers or any(blocks[n].shape != tuple(m.weight.shape) for n, m in layers.items()):
        return set()
    # llama.cpp stores llama's q and k rows interleaved for its rotary kernel and transformers puts them
    # back (Qwen files were never permuted): which order the cache holds, layer 0's q_proj says.
    q = layers.get("model.layers.0.self_attn.q_proj")
    permute = q is not None and not torch.equal(blocks["model.layers.0.self_attn.q_proj"].dequantize(), q.weight)
    kept = {name: _rows(blocks[name], kv_heads if name.endswith("k_proj") else heads,
                        permute and name.endswith(("q_proj", "k_proj"))) for name in layers}
    mapped = weights_file_maps()
    for name, module in layers.items():
        if name.startswith("model.layers.0."):
            if not torch.equal(kept[name].dequantize(), module.weight):
                return set()
            drop_file_pages(module.weight, mapped)  # the cache's pages just read go back
    for name, module in layers.items():
        _replace(model, name, GgufLinear(kept[name], module.bias))
    return {kept[name].kind for name in layers}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    setattr(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], module)


def _keep_embedding(model: nn.Module, blocks: GgufWeights | None) -> set[str]:
    """The token embedding and the output layer tied to it as one `GgufEmbedding` (+ `GgufTiedHead`) when
    the file's blocks are the cached weights, every row (compared HEAD_ROWS rows at a time): {its kind},
    or nothing."""
    if blocks is None or not getattr(model.config, "tie_word_embeddings", False):
        return set()
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embed, nn.Embedding) or not isinstance(head, nn.Linear) or head.weight is not embed.weight:
        return set()
    if blocks.shape != tuple(embed.weight.shape):
        return set()
    mapped = weights_file_maps()
    for start in range(0, blocks.shape[0], HEAD_ROWS):
        part = embed.weight[start : start + HEAD_ROWS]
        if not torch.equal(blocks.rows(start, start + HEAD_ROWS).dequantize(), part):
            return set()
        drop_file_pages(part, mapped)  # the cache's pages just read go back
    names = {m: n for n, m in model.named_modules()}
    kept = GgufEmbedding(blocks)
    _replace(model, names[embed], kept)
    _replace(model, names[head], GgufTiedHead(kept))
    return {blocks.kind}


def kept_blocks(model: nn.Module) -> str | None:
    """What `keep_blocks` did to `model`, for the run log; None if nothing."""
    layers = [m for m in model.modules() if isinstance(m, GgufLinear) and not isinstance(m, GgufTiedHead)]
    embeddings = [m for m in model.modules() if isinstance(m, GgufEmbedding)]
    if not layers and not embeddings:
        return None
    owners = layers + embeddings
    kinds = "/".join(sorted({m.kind for m in owners}))
    kept = sum(t.nbytes for m in owners for t in (m.qs, m.scale, m.low) if t is not None)
    fp32 = sum(4 * m.in_features * m.out_features for m in layers) + sum(4 * m.num_embeddings * m.embedding_dim
                                                                         for m in embeddings)
    what = f"{len(layers)} linear layers" + (" and its (tied) token embedding" if embeddings else "")
    return (f"The frozen base's {what} stay in the GGUF file's {kinds} blocks "
            f"({kept / 2**20:,.0f} MB instead of {fp32 / 2**20:,.0f} MB in fp32; the same weights)")


def _rows(weights: GgufWeights, heads: int, permute: bool) -> GgufWeights:
    """transformers' reverse of llama.cpp's q/k row permutation (each head's rows, in pairs, swapped
    back), on whole rows of blocks."""
    if not permute:
        return weights

    def back(t):
        return t.reshape(heads, -1, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()

    return GgufWeights(weights.kind, back(weights.qs), back(weights.scale),
                       None if weights.low is None else back(weights.low))


EMBEDDING = "model.embed_tokens"


def read_linear_blocks(path: Path) -> dict[str, GgufWeights]:
    """{Hugging Face module name: blocks} of the linear layers, and the token embedding (EMBEDDING), that a
    GGUF file holds in a kept block type (copies, the file is not kept mapped); {} for an architecture or
    file version this does not read."""
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # (private: torch wants a writable buffer)
    try:
        arch, tensors, start = _header(data)
    except (ValueError, struct.error, UnicodeDecodeError):
        return {}
    if arch not in ARCHITECTURES:
        return {}
    raw = torch.frombuffer(data, dtype=torch.uint8)
    out = {}
    for name, (dims, kind, offset) in tensors.items():
        parts = name.split(".")
        if name == "token_embd.weight":
            module = EMBEDDING
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in LINEAR and parts[3] == "weight":
            module = f"model.layers.{parts[1]}.{LINEAR[parts[2]]}"
        else:
            continue
        if kind not in BLOCK_TYPES or len(dims) != 2 or dims[0] % 32:
            continue
        label, size = BLOCK_TYPES[kind]
        cols, rows = dims
        n = rows * cols // 32 * size
        b = raw[start + offset : start + offset + n].view(rows, cols // 32, size)
        scale = b[..., 0:2].contiguous().view(torch.float16).float()
        low = b[..., 2:4].contiguous().view(torch.float16).float() if label == "Q4_1" else None
        qs = b[..., 4:] if label == "Q4_1" else b[..., 2:]
        if label != "Q8_0":  # byte j of a block: weight j in its low nibble, weight j + 16 in its high one
            qs = torch.cat([qs & 15, qs >> 4], dim=-1)
        qs = qs.contiguous()
        out[module] = GgufWeights(label, qs, scale, low)
    return out


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _header(data) -> tuple[str, dict[str, tuple[list[int], int, int]], int]:
    """(architecture, {tensor name: (dims, ggml type, offset)}, where tensor data starts) of a GGUF
    v2/v3 file: magic, version, tensor count, metadata count, the metadata key/values, the tensor
    infos, then the data, aligned to general.alignment (32 by default)."""
    if data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] not in (2, 3):
        raise ValueError("not a GGUF v2/v3 file")
    n_tensors, n_meta = struct.unpack_from("<QQ", data, 8)
    pos, meta = 24, {}

    def string(pos):
        (length,) = struct.unpack_from("<Q", data, pos)
        return data[pos + 8 : pos + 8 + length].decode(), pos + 8 + length

    def value(kind, pos):  # (the value, or None for an array, which nothing here needs), next position
        if kind == 8:
            return string(pos)
        if kind == 9:
            item, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if item in _SCALARS:
                return None, pos + count * struct.calcsize(_SCALARS[item])
            for _ in range(count):
                pos = value(item, pos)[1]
            return None, pos
        fmt = "<" + _SCALARS[kind]
        return struct.unpack_from(fmt, data, pos)[0], pos + struct.calcsize(fmt)

    for _ in range(n_meta):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", data, pos)
        meta[key], pos = value(kind, pos + 4)
    tensors = {}
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", data, pos)
        dims = list(struct.unpack_from(f"<{n_dims}Q", data, pos + 4))
        kind, offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        tensors[name] = (dims, kind, offset)
    align = meta.get("general.alignment") or 32
    return meta.get("general.architecture"), tensors, pos + (-pos % align)
