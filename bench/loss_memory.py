"""Peak memory of the loss on CPU: chunked cross-entropy vs the plain loss on full logits.

A Qwen2-0.5B-sized LM head (hidden 896, vocabulary 151,936, no bias) over ``--tokens`` trained
positions (every target trained, the worst case): one forward + backward of

* plain: ``summed_cross_entropy(head(hidden), targets)``, the full ``(tokens, vocab)`` fp32 logits;
* chunked: ``chunked_cross_entropy(hidden, head, targets, chunk_tokens=1024)`` (trainer/loss.py:
  each chunk's logits, loss and gradients in the forward pass, nothing recomputed).

Each runs in its own subprocess, so neither inherits the other's heap; the peak is the process's
``ru_maxrss`` and its working memory that peak minus the resident size just before the loss (the
head, its input and torch itself). The two losses (and the head's gradient norms) must agree to
1e-6 relative. The estimator's logits row (trainer/memory.py) is printed next to the measurements.

    .venv/bin/python -m bench.loss_memory                  # 8,192 tokens (the plain path needs ~16 GB)
    .venv/bin/python -m bench.loss_memory --tokens 16384   # the plain path needs ~32 GB

Writes bench/results/loss_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os

from bench._common import argument_parser, max_rss_bytes, module_command, print_table, run_child, stopwatch, write_results

HIDDEN, VOCAB, CHUNK = 896, 151_936, 1024


def child(mode: str, tokens: int, chunk: int) -> dict:
    import psutil
    import torch

    from trainer.loss import chunked_cross_entropy, summed_cross_entropy

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    hidden = torch.randn(1, tokens + 1, HIDDEN, requires_grad=True)
    targets = torch.randint(0, VOCAB, (1, tokens))
    before = psutil.Process().memory_info().rss
    with stopwatch() as lap:
        if mode == "plain":
            loss = summed_cross_entropy(head(hidden), targets)
        else:
            loss = chunked_cross_entropy(hidden, head, targets, chunk_tokens=chunk)
        loss.backward()
    peak = max_rss_bytes()
    return {
        "mode": mode,
        "loss": loss.item(),
        "head_grad_norm": head.weight.grad.norm().item(),
        "hidden_grad_norm": hidden.grad.norm().item(),
        "peak_rss": peak,
        "rss_before_loss": before,
        "working_memory": peak - before,
        "seconds": lap.seconds,
    }


def run(mode: str, tokens: int, chunk: int) -> dict:
    command = module_command(__spec__.name, "--child", mode, "--tokens", tokens, "--chunk", chunk)
    return run_child(command, what=f"the {mode} loss (out of memory?)").last_json()


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=8192, help="trained positions")
    parser.add_argument("--chunk", type=int, default=CHUNK, help="chunked loss: positions per chunk")
    parser.add_argument("--child", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.chunk)))
        return

    plain, chunked = run("plain", args.tokens, args.chunk), run("chunked", args.tokens, args.chunk)
    relative = abs(plain["loss"] - chunked["loss"]) / abs(plain["loss"])
    grad_relative = max(abs(plain[key] - chunked[key]) / abs(plain[key]) for key in ("head_grad_norm", "hidden_grad_norm"))
    # The estimator's logits rows for the same shapes (its hidden-state and head-gradient terms included).
    from trainer.memory import loss_bytes

    estimated = {
        mode: loss_bytes(args.tokens, VOCAB, HIDDEN, chunk_tokens=chunk, hidden_bytes=4, trained_head_params=VOCAB * HIDDEN)
        for mode, chunk in (("plain", 0), ("chunked", args.chunk))
    }
    results = {
        "tokens": args.tokens,
        "vocab": VOCAB,
        "hidden": HIDDEN,
        "chunk_tokens": args.chunk,
        "plain": plain,
        "chunked": chunked,
        "working_memory_ratio": plain["working_memory"] / chunked["working_memory"],
        "peak_rss_ratio": plain["peak_rss"] / chunked["peak_rss"],
        "time_ratio": chunked["seconds"] / plain["seconds"],
        "loss_relative_difference": relative,
        "grad_norm_relative_difference": grad_relative,
        "estimated_logits_bytes": estimated,
    }
    gib = 2**30
    print(f"loss forward+backward, {args.tokens:,} trained tokens, vocab {VOCAB:,}, hidden {HIDDEN} (fp32, CPU)")
    print_table(
        ["", "peak RSS", "working", "estimate", "seconds", "loss"],
        [
            [
                r["mode"],
                f"{r['peak_rss'] / gib:.2f} G",
                f"{r['working_memory'] / gib:.2f} G",
                f"{estimated[r['mode']] / gib:.2f} G",
                f"{r['seconds']:.2f}",
                f"{r['loss']:.6f}",
            ]
            for r in (plain, chunked)
        ],
        indent=0,
    )
    print(
        f"plain / chunked: {results['working_memory_ratio']:.1f}x working memory, {results['peak_rss_ratio']:.1f}x peak RSS; "
        f"chunked / plain time: {results['time_ratio']:.2f}x"
    )
    print(f"loss relative difference {relative:.2e}, gradient norms {grad_relative:.2e} (must be <= 1e-6)")
    write_results("loss_memory", results, args.out)
    if relative > 1e-6:
        raise SystemExit("the chunked loss differs from the plain loss by more than 1e-6")


if __name__ == "__main__":
    main()
