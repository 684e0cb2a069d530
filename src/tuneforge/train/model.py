"""The decoder tuneforge trains: a Llama-family causal LM in plain PyTorch, written for training.

Why our own and not transformers' LlamaForCausalLM (which still loads, generates, serves and exports
everything tuneforge trains):
- Memory and start-up. Importing transformers' modeling code (even its config classes) pulls in
  torch._dynamo, sympy and torch.distributed.tensor, and PEFT comes on top: resident memory that
  nothing in a training step uses. Without them a LoRA run of the embedded model holds ~90 MB less
  once loaded and loads in 1.1 s instead of 2.0 (benchmarks/README.md).
- One forward pass, for packed rows. transformers' layers are written for every use (KV caches,
  attention masks, kernels from the hub); training here needs none of that, and its fused autograd
  nodes (train.fused, train.lora) used to be monkeypatched into those layers. Here they are simply
  what the layers call, and the example boundaries (`attention.Segments`) are an argument, not a
  context variable the attention has to find.

Module names are transformers' (model.layers.N.self_attn.q_proj, ...), so the state dict is a Hugging
Face checkpoint's and weights are read from and written to the same folders. Llama, Mistral, Qwen2
and Qwen3 share this architecture (Qwen2 adds biases to q/k/v, Qwen3 an RMSNorm of each query and key
head); anything else is refused by name.
"""

from __future__ import annotations

import json
import math
import mmap
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import device
from .attention import Segments, attend, segments
from .fused import RMSNorm, rotary, swiglu_mlp
from .lora import project

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModel(ValueError):
    pass


REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class Config:
    """What the decoder needs of a Hugging Face config.json, read as JSON: transformers' config classes
    import its modeling utilities - the memory this module exists to save. `raw` is the file's
    content, written back unchanged next to fully fine-tuned weights (`save`)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: dict  # rope_type ("default", "linear", "llama3"), rope_theta and the type's own fields
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: each query and key head RMS-normalised before the rotary embedding
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    sliding_window: int | None = None
    pad_token_id: int | None = None  # its embedding gets no gradient from the input side (as in transformers)
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, raw: dict, tied: bool = False) -> Config:
        """From config.json's content. `tied`: whether the weights have no lm_head of their own - the
        answer when the file says nothing (transformers leaves out values equal to its defaults)."""
        kind = raw.get("model_type")
        if kind not in SUPPORTED:
            raise UnsupportedModel(f"base model type {kind!r} ({', '.join(raw.get('architectures') or [])}): "
                                   f"tuneforge trains {', '.join(SUPPORTED)} models")
        if raw.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"base model activation {raw['hidden_act']!r}: tuneforge trains SwiGLU (silu) models")
        if missing := [k for k in REQUIRED if k not in raw]:
            raise ValueError(f"a {kind} config needs {', '.join(missing)}")
        heads = raw["num_attention_heads"]
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
        rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
        if rope["rope_type"] not in ("default", "linear", "llama3"):
            raise UnsupportedModel(f"base model rotary embeddings {rope['rope_type']!r}: tuneforge trains "
                                   "default, linear and llama3 ones")
        window = raw.get("sliding_window") if raw.get("use_sliding_window", kind == "mistral") else None
        return cls(
            model_type=kind, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=raw.get("num_key_value_heads") or heads,
            # (transformers' Qwen3 default head_dim is 128, not hidden_size / heads)
            head_dim=raw.get("head_dim") or (128 if kind == "qwen3" else raw["hidden_size"] // heads),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope=rope, tie_word_embeddings=raw.get("tie_word_embeddings", tied),
            qkv_bias=kind == "qwen2" or raw.get("attention_bias", False),
            o_bias=kind in ("llama", "qwen3") and raw.get("attention_bias", False), qk_norm=kind == "qwen3",
            mlp_bias=raw.get("mlp_bias", False),
            attention_dropout=raw.get("attention_dropout", 0.0), sliding_window=window,
            pad_token_id=raw.get("pad_token_id"), raw=raw,
        )

    def check(self, max_length: int | None) -> None:
        """Refuse examples longer than a sliding attention window: attention here is over whole examples."""
        if self.sliding_window and max_length and max_length > self.sliding_window:
            raise UnsupportedModel(
                f"max_length {max_length} is longer than the base model's sliding attention window "
                f"({self.sliding_window}): use max_length <= {self.sliding_window}")

    def save_pretrained(self, folder: Path) -> None:
        (Path(folder) / "config.json").write_text(json.dumps(self.raw, indent=2) + "\n")


def _inv_freq(config: Config) -> torch.Tensor:
    """Rotary inverse frequencies, as transformers computes them for these rope types."""
    dim, rope = config.head_dim, config.rope
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if rope["rope_type"] == "linear":
        return inv_freq / rope["factor"]
    if rope["rope_type"] == "llama3":  # Llama 3.1+: long wavelengths slowed by `factor`, a smooth band between
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        context = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= context / high) & (wavelen <= context / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class Rotary(nn.Module):
    """cos and sin of each position's rotary angles ([rows, length, head_dim], fp32)."""

    def __init__(self, config: Config):
        super().__init__()
        self.register_buffer("inv_freq", _inv_freq(config), persistent=False)

    def forward(self, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()


class Linear(nn.Linear):
    """A linear layer whose weights come from a checkpoint: made without initial values. (Initialising
    even on the meta device runs PyTorch's Python reference kernels, which import sympy.)"""

    def reset_parameters(self):
        pass


class Embedding(nn.Embedding):
    def reset_parameters(self):
        pass


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        width, heads, kv_heads, self.head_dim = (config.hidden_size, config.num_attention_heads,
                                                 config.num_key_value_heads, config.head_dim)
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.q_proj = Linear(width, heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = Linear(width, kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = Linear(width, kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = Linear(heads * self.head_dim, width, bias=config.o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x, rope, seg: Segments):
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = (t.view(shape) for t in project([self.q_proj, self.k_proj, self.v_proj], x))
        if self.q_norm is not None:  # over each head's dimensions, before the rotary embedding
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = rope
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        out = attend(q, k, v, seg, self.scaling, self.dropout if self.training else 0.0)
        return self.o_proj(out.reshape(*shape[:-2], -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        width, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(width, inner, bias=bias)
        self.up_proj = Linear(width, inner, bias=bias)
        self.down_proj = Linear(inner, width, bias=bias)

    def forward(self, x):
        return swiglu_mlp(self.gate_proj, self.up_proj, self.down_proj, x)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, rope, seg: Segments):
        h = h + self.self_attn(self.input_layernorm(h), rope, seg)
        return h + self.mlp(self.post_attention_layernorm(h))


class _Recompute(torch.autograd.Function):
    """A decoder layer that keeps only its input: run without a graph in the forward pass, and again
    with one just before its backward pass. torch.utils.checkpoint does the same, but its first call
    imports torch._dynamo and sympy (~70 MB resident, in the mode that is there to save memory).
    The layer's trained parameters are inputs, so that the first layer (whose input, the frozen
    embedding's output, needs no gradient in LoRA) is in the graph; their gradients are returned."""

    @staticmethod
    def forward(ctx, layer, h, rope, seg, *params):
        kind = h.device.type
        ctx.layer, ctx.rope, ctx.seg, ctx.params = layer, rope, seg, params
        ctx.autocast = (kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind))
        # LoRA dropout must draw the same masks the second time
        ctx.rng = torch.get_rng_state(), torch.cuda.get_rng_state(h.device) if kind == "cuda" else None
        ctx.save_for_backward(h)
        with torch.no_grad():
            return layer(h, rope, seg)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        h = h.detach().requires_grad_(ctx.needs_input_grad[1])
        kind, dtype, enabled = ctx.autocast
        with torch.random.fork_rng(devices=[h.device] if kind == "cuda" else [], device_type=kind):
            torch.set_rng_state(ctx.rng[0])
            if ctx.rng[1] is not None:
                torch.cuda.set_rng_state(ctx.rng[1], h.device)
            with torch.enable_grad():
                with torch.autocast(kind, dtype=dtype, enabled=enabled):
                    out = ctx.layer(h, ctx.rope, ctx.seg)
                # sum(out * grad) has `grad` as its gradient with respect to out: passing grad itself
                # as grad_outputs would import sympy (autograd's shape check of grad_outputs)
                total = (out * grad).sum()
        inputs = ([h] if h.requires_grad else []) + list(ctx.params)
        grads = list(torch.autograd.grad(total, inputs, allow_unused=True))
        grad_h = grads.pop(0) if h.requires_grad else None
        return None, grad_h, None, None, *grads


class Body(nn.Module):
    """transformers' `model`: embeddings, decoder layers, final norm."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Rotary(config)
        # Activation checkpointing (TrainConfig.activation_checkpointing): each layer keeps only its
        # input and is run again just before its backward pass - a third more compute for a fraction
        # of the activation memory (`_Recompute`, which replays the RNG state: LoRA dropout runs inside).
        self.recompute = False

    def forward(self, input_ids, position_ids, seg: Segments):
        h = self.embed_tokens(input_ids)
        rope = self.rotary_emb(position_ids)
        for layer in self.layers:
            if self.recompute and torch.is_grad_enabled():
                h = _Recompute.apply(layer, h, rope, seg, *(p for p in layer.parameters() if p.requires_grad))
            else:
                h = layer(h, rope, seg)
        return self.norm(h)


class CausalLM(nn.Module):
    """transformers' *ForCausalLM, for training: `hidden` gives the final hidden states of packed rows;
    the vocabulary projection is train.loss's, on the positions that carry a loss."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie()

    def tie(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def hidden(self, input_ids, position_ids, real=None):
        """Final hidden states [rows, length, width] of packed rows: attention stays inside each example
        (position ids restart at each; `real` marks a row's end padding, see attention.segments)."""
        return self.model(input_ids, position_ids, segments(position_ids, real))

    def forward(self, input_ids, position_ids=None, real=None):
        """Logits of every position (for tests and small checks; training never makes them all)."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        h = self.hidden(input_ids, position_ids, real)
        dtype = device.compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            if isinstance(self.lm_head, nn.Linear):
                return F.linear(h.to(dtype), self.lm_head.weight.to(dtype)).float()
            # a tied head kept in GGUF blocks (models.gguf), a LoRA-wrapped head (its update included)
            return self.lm_head(h.to(dtype)).float()


def from_state_dict(config: Config, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> CausalLM:
    """The model with these weights (Hugging Face names), which it uses as they are where they are
    already in `dtype` (views of a memory-mapped file stay views: train.device.prepare_for_autocast)."""
    with torch.device("meta"):
        model = CausalLM(config)
    expected = model.state_dict()
    if wrong := [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]:  # before any copy
        k = wrong[0]
        raise ValueError(f"weights do not match the {config.model_type} config: {k} is {list(state[k].shape)}, "
                         f"the config makes it {list(expected[k].shape)} ({len(wrong)} tensors differ)")
    state = {k: v if v.dtype == dtype or not v.is_floating_point() else v.to(dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie()
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"weights do not match a {config.model_type} model: missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    model.model.rotary_emb = Rotary(config)  # its buffer was made on the meta device
    return model


def from_transformers(hf_model, dtype: torch.dtype = torch.float32) -> CausalLM:
    """The same model as a transformers *ForCausalLM, sharing its weight tensors where already in `dtype`."""
    config = Config.from_hf(hf_model.config.to_dict(), tied=hf_model.config.tie_word_embeddings)
    return from_state_dict(config, hf_model.state_dict(), dtype)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder's safetensors file(s) (or, without any, its
    pytorch_model.bin file(s)), as views of the memory-mapped files.

    safetensors' own loader copies each tensor into the process's memory; mapped views let
    prepare_for_autocast hand each fp32 page back once its bf16 copy is made (as transformers'
    loading does), so a LoRA run never holds the whole fp32 file. The format is an 8-byte header
    length, a JSON header of {name: dtype, shape, data_offsets} and the raw bytes.
    """
    folder = Path(folder)
    files = _weight_files(folder, "model.safetensors")
    if not files:  # older checkpoints: PyTorch's pickles, memory-mapped by torch.load as well
        state = {}
        for name in _weight_files(folder, "pytorch_model.bin"):
            state |= torch.load(folder / name, map_location="cpu", mmap=True, weights_only=True)
        if not state:
            raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin (nor their sharded "
                                    "index) - the base model's weights")
        return state
    state = {}
    for name in files:
        with open(folder / name, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writes never reach the file
        length = int.from_bytes(mapped[:8], "little")
        header = json.loads(mapped[8 : 8 + length])
        data = torch.frombuffer(mapped, dtype=torch.uint8)[8 + length :]
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            dtype = _DTYPES[entry["dtype"]]
            raw = data[start:end]
            if (8 + length + start) % dtype.itemsize:
                raw = raw.clone()  # not aligned for its dtype in the file: a copy of its own
            state[key] = raw.view(dtype).view(entry["shape"])
    return state


def _weight_files(folder: Path, single: str) -> list[str]:
    """The files of a Hugging Face folder's weights in one format: the sharded index's, or the single file."""
    index = folder / f"{single}.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [single] if (folder / single).is_file() else []


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _read_config(path: Path, tied: bool) -> Config:
    """Config.from_hf of a config.json, its mistakes named with the file."""
    try:
        return Config.from_hf(json.loads(path.read_text()), tied)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    except UnsupportedModel as err:
        raise UnsupportedModel(f"{path}: {err}") from None
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def load_for_training(name: str, dtype: torch.dtype = torch.float32, quantize=None,
                      compute_dtype: torch.dtype | None = None, max_length: int | None = None,
                      gguf_blocks: bool = False):
    """(CausalLM, tokenizer) of a catalogue base model, on the CPU, in `dtype`.

    quantize="nf4": the linear layers' weights are stored in 4 bits (QLoRA's frozen base,
    models.quantize) and multiplied in `compute_dtype`. Otherwise, with `gguf_blocks` (for a base that
    stays frozen, LoRA), a GGUF base's linear layers keep the file's own blocks where it has them in a
    kept type (models.gguf): the same weights in a third of fp32's memory."""
    from ..models.catalogue import resolve
    from ..models.load import load_tokenizer, model_folder, with_pad
    from ..models.quantize import to_nf4

    spec = resolve(name)
    if spec.source == "tiny":  # built by transformers in-process (tests): the same weights, our modules
        from ..models.tiny import tiny_model

        hf, tokenizer = tiny_model()
        model = from_transformers(hf, dtype)
        config = model.config
    else:
        folder = model_folder(spec)
        state = read_weights(folder)  # mapped, not read: a model refused below costs nothing
        config = _read_config(folder / "config.json", tied="lm_head.weight" not in state)
        tokenizer = with_pad(load_tokenizer(name))
        try:
            model = from_state_dict(config, state, dtype)
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from None
    config.check(max_length)
    if quantize is not None:
        to_nf4(model, compute_dtype or dtype)
    elif gguf_blocks and spec.source == "gguf" and dtype == torch.float32:
        from ..models.gguf import keep_blocks

        keep_blocks(model, spec.path, config.num_attention_heads, config.num_key_value_heads)
    return model, tokenizer
