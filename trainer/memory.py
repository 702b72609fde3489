"""Per-GPU memory of a training run, estimated from the model's config alone.

``estimate_memory(config, batch_tokens=..., lora_r=..., ...)`` counts the parameters of the model
built on the ``meta`` device (no weights are read or allocated, so every architecture transformers
knows is counted exactly) and adds up, per GPU:

| row | bytes |
|---|---|
| weights | params x 4 (fp32) or 2 (bf16); LoRA adds r x (in + out) fp32 params per targeted Linear |
| gradients | trainable params x their own size (torch keeps a gradient in its parameter's dtype) |
| optimizer states | AdamW's two moments in the trainable params' dtype, + a 4-byte step per tensor |
| activations | what autograd saves per token and decoder layer (below) x tokens per micro-batch |
| logits | log-softmax and the two gradients of the loss: every position (plain) or one chunk |
| never at once | with checkpointing: the logits are gone before the first layer is recomputed |
| autocast copies | bf16 copies of fp32 matmul weights that autocast makes on the GPU |
| FSDP gathered | what sharding adds (DDP adds nothing: the gradients are its buckets) |

With ``fsdp_gpus`` N the first three rows are divided by N (FSDP2 shards parameters, gradients and
optimizer states; trainer/sharding.py gathers them in bf16 on a GPU). The total is the sum, a
little above the true peak: the gradients do not all exist while the activations do (unless an
earlier micro-batch of ``--grad-accum`` left them).

Activations, per token and decoder layer, in bytes (``c``: the compute dtype, 2 on a GPU, where
the trainer runs under bf16 autocast; ``w``: the weights' dtype as the layers see them, also the
residual stream's):

    2 x (4 h + w h)                   two RMSNorms: the fp32 copy of the input and (when the norm
                                      weight trains) the normalised input
    + inputs of the projections       a norm's output (w h) once, or c h per projection reading
                                      it when autocast casts it; the SwiGLU product (c i); with
                                      LoRA each adapter's own (cast) copy of its input instead
    + c (2 q + 2 kv)                  q, k, v and the attention output, as sdpa saves them (k and
                                      v repeated to q's width whenever a mask is passed)
    + c x 3 i                         SwiGLU: gate and up outputs, SiLU(gate)
    + 4 heads                         fp32 log-sum-exp of flash / memory-efficient attention
    + c x row length                  packed rows under sdpa: the (rows, 1, s, s) mask becomes a
                                      compute-dtype bias in every layer, kept for backward
    + c x r per LoRA-targeted Linear  the adapter's A output

(h hidden, q = heads x head_dim, kv = key/value width, i intermediate). This is the recount of
Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
section 4.1, eq. (1) (34 s b h + 5 a s^2 b bytes for a GPT layer in 16 bits) for the layer
transformers runs for Llama, Qwen2 and Mistral: RMSNorm instead of LayerNorm, SwiGLU instead of
GeLU, grouped-query attention, no dropout, and no ``a s^2`` score matrix (sdpa's flash and
memory-efficient kernels never store it). With activation checkpointing each layer keeps only its
input (``w h`` per token: their section 5's ``2 s b h L`` for full recomputation) and one layer at a
time is recomputed during backward, its activations and the gradients flowing through it.
tests/trainer/test_memory.py holds the per-layer formula to what autograd saves (1 %) and the
activations and logits to a measured peak (20 %), on CPU.

What fits a given GPU, and ``sftkit train --dry-run``, are in :mod:`trainer.memory_fit`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Literal

from trainer.config import DEFAULT_CHUNK_TOKENS

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
# Bytes per logit element at the loss's peak (start of its backward): the fp32 logits' log-softmax
# kept for backward, the gradient arriving for it and the gradient it produces (see the tests).
LOGIT_BYTES = 12
# The share of a GPU the suggestions keep free: CUDA context, cuBLAS/NCCL workspaces, allocator
# fragmentation. An 80 GB card's ``torch.cuda.mem_get_info`` total is 79.6 GiB to begin with.
HEADROOM = 0.10


# --- the model, counted on the meta device -------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model; ``linears`` is (name, in, out, count) per projection kind."""

    name: str
    num_params: int
    num_tensors: int
    layer_params: int
    root_params: int  # outside the decoder layers: embeddings, final norm, LM head
    matmul_params: int  # weights of every nn.Linear (what autocast casts), the LM head included
    head_params: int
    num_layers: int
    hidden: int
    q_width: int
    kv_width: int
    intermediate: int
    heads: int
    vocab: int
    linears: tuple[tuple[str, int, int, int], ...]

    def lora_params(self, r: int, targets: tuple[str, ...]) -> tuple[int, int]:
        """(adapter params, adapter tensors): r x (in + out) per targeted Linear, A and B each."""
        chosen = [(i, o, n) for name, i, o, n in self.linears if name in targets]
        return sum(r * (i + o) * n for i, o, n in chosen), sum(2 * n for _, _, n in chosen)


def model_shape(config) -> ModelShape:
    """Count a transformers config's causal LM, built on the meta device (no memory, no weights)."""
    return _model_shape(type(config), config.to_json_string(use_diff=False))


@lru_cache(maxsize=16)
def _model_shape(config_class, config_json: str) -> ModelShape:
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from trainer.sharding import decoder_layers

    config = config_class.from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = decoder_layers(model)
    params = list(model.parameters())  # unique: tied embeddings count once
    layer_params = sum(p.numel() for p in layers[0].parameters())
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    linears: dict[str, list[int]] = {}
    for module_name, module in layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            entry = linears.setdefault(module_name.rsplit(".", 1)[-1], [module.in_features, module.out_features, 0])
            entry[2] += 1
    head = model.get_output_embeddings()
    matmuls = {id(m): m for m in model.modules() if isinstance(m, torch.nn.Linear)}.values()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        name=getattr(config, "_name_or_path", "") or config.model_type,
        num_params=sum(p.numel() for p in params),
        num_tensors=len(params),
        layer_params=layer_params,
        root_params=sum(p.numel() for p in params if id(p) not in in_layers),
        matmul_params=sum(m.weight.numel() for m in matmuls),
        head_params=head.weight.numel() if head is not None else 0,
        num_layers=len(layers),
        hidden=config.hidden_size,
        q_width=heads * head_dim,
        kv_width=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
        intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
        heads=heads,
        vocab=config.vocab_size,
        linears=tuple((name, i, o, n) for name, (i, o, n) in sorted(linears.items())),
    )


def load_model_config(model: str, tokenizer=None):
    """The config a run would build: ``tiny`` (needs the tokenizer, for its vocabulary) or a model
    folder's ``config.json`` (nothing else is read)."""
    from trainer.models import TINY

    if model == TINY:
        import torch

        from trainer.models import tiny_model

        with torch.device("meta"):
            return tiny_model(tokenizer, seed=0).config
    from transformers import AutoConfig

    from trainer.models import _refuse_missing_folder

    _refuse_missing_folder(model, "model", "--model")
    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the config of model {model!r}: {exc}") from exc


# --- the estimate ------------------------------------------------------------------------
@dataclass(frozen=True)
class Strategy:
    """The settings that move memory, named as TrainConfig names them."""

    batch_tokens: int = 8192
    lora_r: int = 0
    fsdp_gpus: int = 0  # 0 or 1: no FSDP
    activation_checkpointing: bool = False
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    dtype: Literal["fp32", "bf16"] = "fp32"
    pack_length: int | None = None
    world_size: int = 1  # ranks; without FSDP they run DDP
    lora_targets: tuple[str, ...] | None = None
    attn_implementation: str = "sdpa"
    device: Literal["cuda", "cpu"] = "cuda"  # cuda: bf16 autocast, as the trainer does on a GPU


@dataclass(frozen=True)
class MemoryEstimate:
    strategy: Strategy
    parts: dict[str, int]
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def rows(self) -> list[tuple[str, int, str]]:
        """(what, bytes, how it was counted) for every non-zero part."""
        return [(name, value, self.notes.get(name, "")) for name, value in self.parts.items() if value]

    def as_dict(self) -> dict:
        return {"strategy": asdict(self.strategy), "bytes": dict(self.parts), "total_bytes": self.total}


def estimate_memory(model_config, **strategy) -> MemoryEstimate:
    """Per-GPU bytes of one training step for a transformers config (or a :class:`ModelShape`);
    ``strategy`` takes :class:`Strategy`'s fields (batch_tokens, lora_r, fsdp_gpus, dtype, ...)."""
    shape = model_config if isinstance(model_config, ModelShape) else model_shape(model_config)
    return estimate(shape, Strategy(**strategy))


def estimate(shape: ModelShape, strategy: Strategy) -> MemoryEstimate:
    s = strategy
    if s.dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {s.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    w = DTYPE_BYTES[s.dtype]  # how the weights are stored
    on_gpu = s.device == "cuda"
    shards = max(s.fsdp_gpus, 1)
    # FSDP2 on a GPU gathers each unit's weights in bf16 (trainer/sharding.py's MixedPrecisionPolicy):
    # the layers then see bf16 weights and autocast has nothing to copy.
    layer_w = 2 if (on_gpu and shards > 1) else w
    c = 2 if on_gpu else w  # the compute dtype
    autocast_copies = on_gpu and layer_w == 4
    parts: dict[str, int] = {}
    notes: dict[str, str] = {}
    per = f" / {shards} GPUs" if shards > 1 else ""

    if s.lora_r:
        targets = s.lora_targets or _default_lora_targets(shape)
        adapters, adapter_tensors = shape.lora_params(s.lora_r, targets)
        # peft keeps adapters in fp32 whatever the base weights' dtype (autocast_adapter_dtype).
        parts["weights"] = (shape.num_params * w + adapters * 4) // shards
        notes["weights"] = f"{_count(shape.num_params)} frozen x {w} B + {_count(adapters)} adapters x 4 B{per}"
        trainable, trainable_bytes, trainable_tensors = adapters, 4, adapter_tensors
    else:
        parts["weights"] = shape.num_params * w // shards
        notes["weights"] = f"{_count(shape.num_params)} params x {w} B{per}"
        trainable, trainable_bytes, trainable_tensors = shape.num_params, w, shape.num_tensors
    parts["gradients"] = trainable * trainable_bytes // shards
    notes["gradients"] = f"{_count(trainable)} trainable x {trainable_bytes} B{per}"
    parts["optimizer states"] = (2 * trainable * trainable_bytes + 4 * trainable_tensors) // shards
    notes["optimizer states"] = f"AdamW: 2 moments x {trainable_bytes} B per trainable param{per}"

    tokens, h = s.batch_tokens, shape.hidden
    layer = _layer_activation_bytes(shape, s, layer_w, c, autocast_copies)
    final_norm = 4 * h + layer_w * h + c * h
    if s.activation_checkpointing:
        # Each layer keeps its input; in backward one layer at a time is recomputed: its
        # activations plus the gradients flowing through it (a few h- and i-wide fp32 tensors).
        recomputed = tokens * (layer + 2 * 4 * (h + shape.intermediate))
        parts["activations"] = tokens * (shape.num_layers * layer_w * h + final_norm) + recomputed
        notes["activations"] = f"{shape.num_layers} layer inputs ({layer_w} B x h per token) + one layer recomputed"
    else:
        parts["activations"] = tokens * (shape.num_layers * layer + final_norm)
        notes["activations"] = f"{_count(layer)} B per token per layer x {shape.num_layers} layers"

    parts["logits"] = loss_bytes(
        tokens,
        shape.vocab,
        h,
        chunk_tokens=s.loss_chunk_tokens,
        hidden_bytes=layer_w,
        trained_head_params=0 if s.lora_r else shape.head_params,
    )
    if s.loss_chunk_tokens:
        notes["logits"] = f"one chunk: {min(s.loss_chunk_tokens, tokens)} positions x {shape.vocab} vocab x {LOGIT_BYTES} B"
    else:
        notes["logits"] = f"{tokens} positions x {shape.vocab} vocab x {LOGIT_BYTES} B"
    if s.activation_checkpointing:
        parts["never at once"] = -min(parts["logits"], recomputed)
        notes["never at once"] = "the loss's backward ends before the first layer is recomputed"

    if autocast_copies:
        # Autocast caches the bf16 copy of every trainable fp32 weight until the forward pass ends;
        # frozen ones (LoRA) are cast per use and kept for backward unless the layer is recomputed.
        copied = shape.matmul_params
        if s.lora_r and s.activation_checkpointing:
            copied -= (shape.num_layers - 1) * _layer_matmul_params(shape)
        parts["autocast copies"] = copied * 2
        notes["autocast copies"] = "bf16 copies of the fp32 matmul weights under autocast"
    if shards > 1:
        # FSDP2 gathers a layer while prefetching the next; the root unit (embeddings, final norm,
        # head) stays gathered from forward to backward, its gradient unsharded until the end. A
        # layer's gradient exists in full (and once more in fp32 for the reduce) until reduce-scattered.
        reduce_bytes = layer_w + (4 if layer_w != 4 else 0)
        parts["FSDP gathered"] = (2 * shape.root_params + 2 * shape.layer_params) * layer_w + shape.layer_params * reduce_bytes
        notes["FSDP gathered"] = "root unit + 2 layers unsharded, their gradients before reduce-scatter"
    # DDP keeps no copy of its own: the gradients are views into its all-reduce buckets
    # (trainer/sharding.py, gradient_as_bucket_view).
    return MemoryEstimate(s, parts, notes)


def loss_bytes(tokens: int, vocab: int, hidden: int, *, chunk_tokens: int, hidden_bytes: int, trained_head_params: int) -> int:
    """The loss's memory at its peak over ``tokens`` trained positions: every position's logits
    (plain, ``chunk_tokens`` 0), or one chunk's plus the trained positions' hidden states the
    chunks start from and their gradient (computed in the forward pass, kept for backward) and,
    when the head trains, the fp32 head-sized gradient the chunks' head gradients are summed
    into (trainer/loss.py)."""
    if not chunk_tokens:
        return tokens * vocab * LOGIT_BYTES
    chunk = min(chunk_tokens, tokens)
    return chunk * vocab * LOGIT_BYTES + 2 * tokens * hidden * hidden_bytes + trained_head_params * 4


def _layer_activation_bytes(shape: ModelShape, s: Strategy, w: int, c: int, autocast: bool) -> int:
    # w: the weights' dtype as the layers see them; autocast: whether it casts them to bf16
    """What autograd saves per token in one decoder layer (the formula in the module docstring)."""
    h, q, i = shape.hidden, shape.q_width, shape.intermediate
    names = {name for name, *_ in shape.linears}
    fused = {"attn": "qkv_proj" in names, "mlp": "gate_up_proj" in names}
    # The projections of a layer by the tensor they read: (width, readers, is a norm's output).
    groups = {
        "attn": (h, ("qkv_proj",) if fused["attn"] else ("q_proj", "k_proj", "v_proj"), True),
        "o": (q, ("o_proj",), False),
        "mlp": (h, ("gate_up_proj",) if fused["mlp"] else ("gate_proj", "up_proj"), True),
        "down": (i, ("down_proj",), False),
    }
    targets = set(s.lora_targets or _default_lora_targets(shape)) if s.lora_r else set()
    on_gpu = s.device == "cuda"  # the trainer autocasts to bf16 there, whatever the weights' dtype
    inputs = 0
    for group, (width, readers, after_norm) in groups.items():
        # The tensor the group reads: a norm's output in the weights' dtype, else the compute dtype;
        # o_proj reads sdpa's own output (counted with attention) and down_proj the SwiGLU product.
        shared = 0 if group == "o" else width * (w if after_norm else c)
        if s.lora_r:
            # A frozen Linear saves no input; each adapter's lora_A saves its own copy whenever
            # autocast or peft (fp32 adapters on a bf16 input) casts it, else the shared tensor.
            targeted = len(targets & set(readers))
            if on_gpu or w != 4:
                inputs += targeted * width * (c if on_gpu else 4)
            elif targeted:
                inputs += shared
        elif autocast and after_norm:
            inputs += len(readers) * width * c  # each reader casts the fp32 norm output itself
        else:
            inputs += shared
    norm_weights_train = not s.lora_r
    norms = 2 * (4 * h + (w * h if norm_weights_train else 0))
    kv = q if s.attn_implementation == "sdpa" else shape.kv_width
    attention = c * (2 * q + 2 * kv) + 4 * shape.heads
    mlp = c * 3 * i  # gate and up outputs, SiLU(gate); their product is down_proj's input
    mask = c * (s.pack_length or s.batch_tokens) if s.attn_implementation == "sdpa" else 0
    lora = 0
    if s.lora_r:
        lora = (c if on_gpu else 4) * s.lora_r * sum(n for name, _, _, n in shape.linears if name in targets) // shape.num_layers
    return norms + inputs + attention + mlp + mask + lora


def _layer_matmul_params(shape: ModelShape) -> int:
    return sum(i * o * n for _, i, o, n in shape.linears) // shape.num_layers


def _default_lora_targets(shape: ModelShape) -> tuple[str, ...]:
    from trainer.lora import KNOWN_TARGETS

    names = {name for name, *_ in shape.linears}
    return tuple(name for name in KNOWN_TARGETS if name in names)


def _count(number: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if number >= size:
            return f"{number / size:.3g}{unit}"
    return str(number)
