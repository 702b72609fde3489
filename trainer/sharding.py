"""How the trained objective is spread over ranks: DDP replicas or FSDP2 shards, plus activation checkpointing.

Without ``--fsdp`` every rank holds the whole model and DDP all-reduces gradients (kept in its
buckets: no second copy). With ``--fsdp`` (under torchrun, more than one rank) FSDP2's
``fully_shard`` splits parameters, gradients and AdamW moments across ranks: one unit per
decoder layer, then the root unit, the
:class:`~trainer.loss.CausalLMLoss` objective, which keeps what is left (embeddings, final norm,
LM head). A layer's full weights exist only while it runs. On CUDA the units compute in bf16 and
reduce gradients in fp32 over fp32 master shards; on CPU (gloo) they compute and reduce in the
dtype the weights are stored in (fp32, or bf16 with ``--dtype bf16``).

Both DDP and FSDP2 reduce a gradient as the *mean* over ranks, so the loop's normaliser (global
trained tokens / world size) means the same under either: the step's gradient is the sum of
every token's gradient over all ranks divided by the step's trained-token count.

Things that differ under FSDP and that the loop asks this module about:

* gradient accumulation: only the last micro-batch of a step reduce-scatters (:func:`micro_batch_sync`);
* clipping: each rank holds a shard of every gradient, the norm must be the global one (:func:`clip_grad_norm`);
* evaluation: every forward all-gathers the layers, so every rank must run as many as the busiest
  one (:func:`idle_batches`);
* ``final/``: the full weights are gathered to rank 0 (:func:`full_state_dict`).

A single process with ``--fsdp`` trains unsharded (nothing to shard across) but still writes the
sharded checkpoint format, so a run can move between one and several ranks.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from pipeline.schema import IGNORE_INDEX
from trainer import distributed, lora
from trainer.batching import collate_packed
from trainer.loss import unwrap_peft


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's repeated blocks (``model.model.layers`` in Llama, Qwen, Mistral, Gemma, Phi):
    the one ``nn.ModuleList`` among the base model's direct children (peft wrappers looked through)."""
    inner = unwrap_peft(model)
    base = getattr(inner, "base_model", inner)
    lists = [child for child in base.children() if isinstance(child, nn.ModuleList)]
    if len(lists) != 1:
        raise ValueError(
            f"cannot find the decoder layers of {type(inner).__name__}: expected one nn.ModuleList in "
            f"{type(base).__name__}, found {len(lists)}; --fsdp and --activation-checkpointing need them"
        )
    return lists[0]


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.

    transformers' own switch (on every decoder layer), not torch's ``checkpoint_wrapper``: it keeps every parameter name
    (a wrapper inserts ``_checkpoint_wrapped_module.`` into them), so state dicts, sharded
    checkpoints and ``final/`` are the same with and without it, and it composes with FSDP2,
    whose pre-forward hook sees the recomputation during backward and re-gathers the layer.
    Non-reentrant: the reentrant variant needs inputs that require grad and runs a nested
    backward that DDP's and FSDP2's gradient hooks do not expect.
    """
    decoder_layers(model)  # the same clear error as --fsdp for a model without decoder layers
    inner = unwrap_peft(model)
    enable = getattr(inner, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # older transformers: the same switch under its former name
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def wrap(objective: nn.Module, device: torch.device, fsdp: bool) -> nn.Module:
    """The module the loop calls for training: ``objective`` itself on one rank, sharded in place
    under ``fsdp``, else a DDP replica."""
    world_size = distributed.current().world_size
    if world_size == 1:
        return objective
    if fsdp:
        shard(objective, device)
        return objective
    # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets instead of beside
    # them, which saves one model-sized copy of the gradients.
    return nn.parallel.DistributedDataParallel(
        objective, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
    )


def shard(objective: nn.Module, device: torch.device) -> None:
    """FSDP2 in place: one unit per decoder layer, then the objective as root (build the optimizer after this)."""
    from torch.distributed.device_mesh import init_device_mesh

    if lora.is_lora(objective.model):
        raise ValueError(
            "--fsdp does not take --lora-r yet (final/ would need the adapters gathered from the shards); "
            "drop --fsdp to train LoRA with DDP"
        )
    mesh = init_device_mesh(device.type, (distributed.current().world_size,))
    if device.type == "cuda":
        layer_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # The root's float inputs are per-token loss weights: keep them fp32, not rounded to bf16.
        root_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    else:
        layer_policy = root_policy = MixedPrecisionPolicy()  # weights compute and reduce in their own dtype
    for layer in decoder_layers(objective.model):
        fully_shard(layer, mesh=mesh, mp_policy=layer_policy)
    fully_shard(objective, mesh=mesh, mp_policy=root_policy)


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule) or any(isinstance(m, FSDPModule) for m in module.modules())


def micro_batch_sync(wrapped: nn.Module, last: bool):
    """Context for one micro-batch's backward: gradients cross ranks only on the step's last one,
    the others accumulate locally (DDP ``no_sync``; FSDP2 keeps unsharded gradients)."""
    if isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if isinstance(wrapped, nn.parallel.DistributedDataParallel) and not last:
        return wrapped.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(parameters, max_norm: float) -> float:
    """``clip_grad_norm_`` that clips by, and returns, the global norm when gradients are FSDP shards.

    The norm over DTensor gradients is a DTensor: replicated by recent torch, a per-rank partial
    value by older releases. ``full_tensor`` turns either into the global norm on every rank."""
    parameters = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return float(total)


def idle_batches(objective: nn.Module, count: int, pad_token_id: int, device: torch.device) -> list[dict]:
    """Batches without a trained target, so that this rank runs as many forwards as the busiest
    rank: under FSDP each forward all-gathers every layer, a collective all ranks must join.
    They add 0 to the loss sum and to the target count. None are needed without FSDP."""
    if not is_sharded(objective):
        return []
    busiest = distributed.all_reduce_max(count, device)
    empty = collate_packed([[{"input_ids": [pad_token_id], "labels": [IGNORE_INDEX]}]], pad_token_id)
    return [empty] * (busiest - count)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0's CPU (a collective), for ``save_pretrained``; None
    when the model is not sharded (then ``save_pretrained`` reads the model itself)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
