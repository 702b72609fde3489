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
hidden states, keeps only the positions that have a trained target, and computes the LM head
and cross-entropy ``chunk_tokens`` positions at a time under activation checkpointing, so at
most one chunk's logits exist, in the forward and again in the backward pass. The result equals
the plain loss (tests/test_trainer_loss.py holds it to 1e-6); the memory saving is measured by
``bench/loss_memory.py``.

An optional per-token ``weights`` tensor (a mixture group's loss weight, aligned with ``labels``)
scales each target's cross-entropy; the caller still divides by the unweighted target count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.schema import IGNORE_INDEX

# Trained positions whose logits exist at once in the chunked loss. 1024 x a 152k vocabulary is
# 0.6 GB of fp32 logits (and as much again for their gradient) instead of 19 GB for a 32k row.
DEFAULT_CHUNK_TOKENS = 1024


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


def _chunk_cross_entropy(hidden, head_weight, head_bias, targets, weights, softcap: float | None):
    logits = F.linear(hidden, head_weight, head_bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    per_token = F.cross_entropy(logits, targets, reduction="none")
    if weights is not None:
        per_token = per_token * weights.to(per_token.dtype)
    return per_token.sum()


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
    selected = hidden[:, :-1][keep]
    chosen = targets[keep]
    chosen_weights = weights[keep] if weights is not None else None
    total = hidden.new_zeros((), dtype=torch.float32)
    if selected.shape[0] == 0:
        # Still touch the head so every parameter takes part in the graph (DDP expects it).
        return total + 0.0 * head.weight.sum()
    for start in range(0, selected.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(
            _chunk_cross_entropy,
            selected[part], head.weight, head.bias, chosen[part],
            chosen_weights[part] if chosen_weights is not None else None, softcap,
            use_reentrant=False,
        )
    return total


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (its LoRA layers are injected in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _decoder_and_head(model: torch.nn.Module):
    """(decoder, LM head, softcap) when the logits are ``head(decoder(x))`` (with Gemma's optional
    softcap), else None: then the plain path is the only exact one."""
    inner = _unwrap(model)
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
        return chunked_cross_entropy(
            hidden, head, targets, target_weights, chunk_tokens=self.chunk_tokens, softcap=softcap
        ), count
