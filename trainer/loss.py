"""The SFT loss: cross-entropy over trained tokens only, summed, divided by a count chosen by the caller.

Labels arrive unshifted (label t is the token at t). The target of logit t is label t+1, except
where t+1 starts a new packed sequence (its position id is 0): there the target is ignored, so
the last token of one conversation is never trained to predict the first of the next.

The loop divides the summed loss by the trained-token count of the whole optimizer step (all
gradient-accumulation micro-batches on all ranks), so 4 micro-batches of 1024 tokens give the
same update as one of 4096, and long and short conversations weigh per token, not per row.

:class:`CausalLMLoss` is the module the trainer runs (and DDP/FSDP wrap): the model and its loss
in one ``forward``. By default it never builds the ``(batch, width, vocab)`` logits tensor (for a
150k vocabulary and one 32k-token row that alone is 19 GB in fp32): it takes the decoder's
hidden states, keeps only the positions that have a trained target, and computes the LM head,
the cross-entropy and its gradients ``chunk_tokens`` positions at a time in the forward pass
(:class:`_LinearCrossEntropy`), so at most one chunk's logits exist and none is recomputed. The
result equals the plain loss (tests/trainer/test_loss.py holds value and gradients to it); the
memory saving and the time are measured by ``bench/loss_memory.py``.

An optional per-token ``weights`` tensor (a mixture group's loss weight, aligned with ``labels``)
scales each target's cross-entropy; the caller still divides by the unweighted target count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.schema import IGNORE_INDEX
from trainer.config import DEFAULT_CHUNK_TOKENS


def shifted_targets(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """``targets[:, t]`` = the label logit t is trained on; shape (batch, width - 1)."""
    targets = labels[:, 1:].long().clone()
    targets[position_ids[:, 1:] == 0] = IGNORE_INDEX
    return targets


def count_targets(batch: dict) -> int:
    """Trained targets in a collated batch (computed on the host, before any forward pass)."""
    return int(shifted_targets(batch["labels"], batch["position_ids"]).ne(IGNORE_INDEX).sum())


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of token cross-entropies over non-ignored targets; exactly 0 (not NaN) when there are none.

    ``logits`` are the model's full ``(batch, width, vocab)`` output; ``targets`` and ``weights``
    are ``(batch, width - 1)``.
    """
    flat_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    if weights is None:
        return F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    per_token = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return (per_token * weights.reshape(-1).to(per_token.dtype)).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed CE of ``head(hidden)`` whose backward is computed during the forward, a chunk at a time.

    The gradient of CE with respect to a logit row is ``softmax - onehot(target)``, known as soon
    as the chunk's logits are: so each chunk's logits are built, turned into their loss and
    their gradients for ``hidden`` and the head, and freed. The backward pass then only scales
    the kept gradients by the incoming one. Nothing is recomputed (activation checkpointing of
    the chunks would compute every logit twice) and at most one chunk's logits exist at a time.
    The same idea as Liger-Kernel's fused linear cross-entropy, in plain torch ops.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weights, chunk_tokens: int, softcap: float | None, needs_grad: bool):
        grad_hidden = torch.empty_like(hidden) if needs_grad and hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad and weight.requires_grad else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if needs_grad and bias is not None and bias.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            part = slice(start, start + chunk_tokens)
            chunk, chunk_targets = hidden[part], targets[part]
            logits = F.linear(chunk, weight, bias).float()  # bf16 matmul under autocast, like the model's head
            if softcap:
                squashed = torch.tanh(logits / softcap)
                logits = squashed * softcap
            log_probs = torch.log_softmax(logits, dim=-1)
            del logits
            losses = -log_probs.gather(1, chunk_targets[:, None]).squeeze(1)
            grad_logits = log_probs.exp_()  # softmax, in place of the log-probabilities
            grad_logits[torch.arange(len(chunk_targets), device=hidden.device), chunk_targets] -= 1.0
            if token_weights is not None:
                scale = token_weights[part].float()
                losses, grad_logits = losses * scale, grad_logits * scale[:, None]
            if softcap:
                grad_logits *= 1.0 - squashed.square()
            total += losses.sum()
            if not needs_grad:  # evaluation: the loss only
                continue
            # The backward matmuls in the dtype the forward ones ran in (bf16 under autocast).
            device = hidden.device.type
            grad_logits = grad_logits.to(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype)
            if grad_hidden is not None:
                grad_hidden[part] = (grad_logits @ weight.to(grad_logits.dtype)).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ chunk.to(grad_logits.dtype)).float()
            if grad_bias is not None:
                grad_bias += grad_logits.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.weight_dtypes
        return (
            grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None,
            (grad_weight * grad_total).to(weight_dtype) if grad_weight is not None else None,
            (grad_bias * grad_total).to(bias_dtype) if grad_bias is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    softcap: float | None = None,
) -> torch.Tensor:
    """:func:`summed_cross_entropy` from the decoder's ``hidden`` states ``(batch, width, hidden)``
    without the full logits: only trained positions, ``chunk_tokens`` of them at a time."""
    keep = targets.ne(IGNORE_INDEX)
    if not keep.any():
        # Still reach every parameter, the decoder's through `hidden`, so each gets a (zero)
        # gradient as on the plain path: DDP and FSDP reduce a gradient once it is there, and a
        # rank whose micro-batch has no trained target would otherwise skip its reductions
        # while the other ranks wait in theirs (a collective mismatch: crash or hang).
        zero = 0.0 * hidden.sum(dtype=torch.float32) + 0.0 * head.weight.sum(dtype=torch.float32)
        return zero + 0.0 * head.bias.sum(dtype=torch.float32) if head.bias is not None else zero
    return _LinearCrossEntropy.apply(
        hidden[:, :-1][keep],
        head.weight,
        head.bias,
        targets[keep],
        weights[keep] if weights is not None else None,
        chunk_tokens,
        softcap,
        torch.is_grad_enabled(),
    )


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (its LoRA layers are injected in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _decoder_and_head(model: torch.nn.Module):
    """(decoder, LM head, softcap) when the logits are ``head(decoder(x))`` (with Gemma's optional
    softcap), else None: then the plain path is the only exact one."""
    inner = unwrap_peft(model)
    decoder = getattr(inner, "base_model", None)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    config = getattr(inner, "config", None)
    if decoder is None or decoder is inner or not isinstance(head, torch.nn.Linear) or config is None:
        return None
    # Models that rescale their logits in forward (Cohere's logit_scale, Granite's logits_scaling).
    for rescaling in ("logit_scale", "logits_scaling"):
        if getattr(config, rescaling, None) not in (None, 1, 1.0):
            return None
    return decoder, head, getattr(config, "final_logit_softcapping", None)


class CausalLMLoss(torch.nn.Module):
    """A causal LM and its masked loss in one forward: ``(summed CE, trained-target count)``.

    ``chunk_tokens`` 0 takes the plain path (the model's own logits); otherwise the chunked one
    described in the module docstring, whenever the model's layout allows it.
    """

    def __init__(self, model: torch.nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self._layout = _decoder_and_head(model) if chunk_tokens else None

    @property
    def chunked(self) -> bool:
        return self._layout is not None

    def forward(self, input_ids, position_ids, labels, attention_mask=None, weights=None):
        targets = shifted_targets(labels, position_ids)
        target_weights = weights[:, 1:] if weights is not None else None
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        count = targets.ne(IGNORE_INDEX).sum()
        if self._layout is None:
            logits = self.model(**inputs).logits
            return summed_cross_entropy(logits, targets, target_weights), count
        decoder, head, softcap = self._layout
        hidden = decoder(**inputs).last_hidden_state
        return chunked_cross_entropy(hidden, head, targets, target_weights, chunk_tokens=self.chunk_tokens, softcap=softcap), count
