"""The pre-flight report of a training mixture: what an epoch will hold, before any GPU time.

:func:`build_plan` is a pure function of a :class:`~trainer.mixture.Mixture` and the batch
planner the trainer uses, so ``sftkit plan``, ``RUN/plan.json`` (written at the start of
``sftkit train``) and the HTML page of ``sftkit inspect --mixture`` show the same figures.
Delivered shares are counted from epoch 0's micro-batches as the ranks will train them (the
tail a multi-rank run drops is left out); later epochs re-draw down-sampled rows and differ by a
few rows. JSON layout (``MixturePlan.to_json``)::

    {"mixture", "spec_sha256", "datasets", "by", "seed", "epoch_size",
     "groups": [{"name", "sources", "weight", "repeat", "max_tokens", "train_on", "loss_weight",
                 "rows", "tokens", "trained_tokens", "val_rows",           # the group's own rows
                 "target_share", "delivered_share",                        # in `by` units
                 "delivered_rows", "delivered_trained_tokens", "repeats", "capped"}],
     "rows", "trained_tokens", "delivered_rows", "delivered_tokens", "delivered_trained_tokens",
     "steps_per_epoch", "total_steps", "epochs", "max_steps", "batch_tokens", "packing",
     "grad_accum", "world_size", "padding_share", "truncated_rows", "truncated_tokens", "too_long_rows",
     "zero_trained_rows", "dropped_rows", "val_rows", "warnings"}

``repeats`` is how many times the group's rows are used per epoch on average (0.4: a 40 %
subset; 2.5: every row twice and half of them a third time). ``padding_share`` is the share of
the planned token slots (micro-batches x ``batch_tokens``) that hold no real token: padding, or
room a packed row could not fill. ``truncated_rows``, ``truncated_tokens`` (tokens cut off
those rows) and ``too_long_rows`` (refused whole) come from the folders' manifests: the latest
prepare run's tokenize figures.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trainer.batching import plan_efficiency
from trainer.mixture import BY_TOKENS, Mixture, load_mixture
from trainer.sampling import EpochPlanner

# More repeats per epoch than this and a group's rows are memorised long before the rest.
MAX_SAFE_REPEATS = 4.0
# A delivered share further than this from its target (in share points) is worth a warning.
SHARE_TOLERANCE = 0.01


@dataclass
class GroupPlan:
    name: str
    sources: list[str]
    weight: float | None
    repeat: float | None
    max_tokens: int | None
    train_on: str
    loss_weight: float
    rows: int
    tokens: int
    trained_tokens: int
    val_rows: int
    target_share: float
    delivered_share: float
    delivered_rows: int
    delivered_trained_tokens: int
    repeats: float
    capped: bool


@dataclass
class MixturePlan:
    mixture: str
    spec_sha256: str
    datasets: list[str]
    by: str
    seed: int
    epoch_size: float
    groups: list[GroupPlan]
    rows: int
    trained_tokens: int
    delivered_rows: int
    delivered_tokens: int
    delivered_trained_tokens: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    max_steps: int | None
    batch_tokens: int
    packing: bool
    grad_accum: int
    world_size: int
    padding_share: float
    truncated_rows: int
    truncated_tokens: int
    too_long_rows: int
    zero_trained_rows: int
    dropped_rows: int
    val_rows: int
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _manifest_figure(manifest: dict, stage: str, key: str) -> int:
    """A figure of the latest prepare run's stage (0 when the manifest has none)."""
    for entry in manifest.get("stages") or []:
        if entry.get("name") == stage:
            return int((entry.get("extra") or {}).get(key, 0) or 0)
    return 0


def build_plan(
    mixture: Mixture, planner: EpochPlanner, *, grad_accum: int = 1, epochs: float = 3.0, max_steps: int | None = None
) -> MixturePlan:
    """The report of ``mixture`` trained under ``planner`` (its ``order`` is the mixture's)."""
    train, groups = mixture.train, mixture.groups
    kept = train.kept
    group = train.group[kept]
    trained = train.trained[kept]
    length = train.length[kept].astype(np.int64)
    count = len(groups)

    plan = planner.global_plan(0)
    per_rank = len(plan) // planner.world_size
    plan = plan[: per_rank * planner.world_size]  # what the ranks train; a multi-rank run drops the rest
    rows = np.fromiter((r for batch in plan for packed in batch for r in packed), np.int64)
    steps_per_epoch = -(-per_rank // grad_accum)
    total_steps = max_steps if max_steps is not None else max(1, math.ceil(epochs * steps_per_epoch))

    delivered_rows = np.bincount(group[rows], minlength=count)
    delivered_trained = np.bincount(group[rows], weights=trained[rows], minlength=count)
    natural_rows = np.bincount(group, minlength=count)
    natural_trained = np.bincount(group, weights=trained, minlength=count)
    by_tokens = mixture.spec.by == BY_TOKENS
    delivered = delivered_trained if by_tokens else delivered_rows.astype(float)
    natural = natural_trained if by_tokens else natural_rows.astype(float)
    delivered_share = delivered / max(delivered.sum(), 1)
    target = mixture.target_shares
    val_rows = np.bincount(mixture.val.group[mixture.val.kept], minlength=count)
    tokens = np.bincount(group, weights=length, minlength=count)

    group_plans = []
    for g, spec in enumerate(groups):
        matched = sorted({name for (_, name), gid in zip(mixture.sources, mixture.source_group) if gid == g})
        group_plans.append(
            GroupPlan(
                name=spec.name,
                sources=matched,
                weight=spec.weight,
                repeat=spec.repeat,
                max_tokens=spec.max_tokens,
                train_on=spec.train_on,
                loss_weight=spec.loss_weight,
                rows=int(natural_rows[g]),
                tokens=int(tokens[g]),
                trained_tokens=int(natural_trained[g]),
                val_rows=int(val_rows[g]),
                target_share=float(target[g]),
                delivered_share=float(delivered_share[g]),
                delivered_rows=int(delivered_rows[g]),
                delivered_trained_tokens=int(delivered_trained[g]),
                repeats=float(delivered[g] / natural[g]) if natural[g] else 0.0,
                capped=bool(spec.max_tokens is not None and _budget_tokens(mixture, g, natural_trained[g]) > spec.max_tokens),
            )
        )

    report = MixturePlan(
        mixture=str(mixture.path),
        spec_sha256=mixture.sha256,
        datasets=[str(f) for f in mixture.folders],
        by=mixture.spec.by,
        seed=mixture.seed,
        epoch_size=float(mixture.budgets.sum()),
        groups=group_plans,
        rows=len(kept),
        trained_tokens=int(trained.sum()),
        delivered_rows=len(rows),
        delivered_tokens=int(length[rows].sum()),
        delivered_trained_tokens=int(trained[rows].sum()),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        epochs=epochs,
        max_steps=max_steps,
        batch_tokens=planner.batch_tokens,
        packing=planner.packing,
        grad_accum=grad_accum,
        world_size=planner.world_size,
        padding_share=1.0 - plan_efficiency(planner.lengths, plan, planner.batch_tokens) if plan else 0.0,
        truncated_rows=sum(_manifest_figure(m, "tokenize", "truncated") for m in mixture.manifests),
        truncated_tokens=sum(_manifest_figure(m, "tokenize", "truncated_tokens") for m in mixture.manifests),
        too_long_rows=sum(
            int(((m.get("counts") or {}).get("rejected") or {}).get("tokenize", {}).get("too_long", 0)) for m in mixture.manifests
        ),
        zero_trained_rows=int((trained == 0).sum()),
        dropped_rows=int(len(train.group) - len(kept)),
        val_rows=int(len(mixture.val.kept)),
    )
    report.warnings = [*mixture.shared_sources, *_warnings(report)]
    return report


def _budget_tokens(mixture: Mixture, g: int, natural_trained: float) -> float:
    """Group g's uncapped trained-token budget (by rows: its row budget at the group's mean)."""
    budget = mixture.budgets[g]
    if mixture.spec.by == BY_TOKENS:
        return budget
    rows = np.count_nonzero(mixture.train.group == g)
    return budget * natural_trained / max(rows, 1)


def _warnings(report: MixturePlan) -> list[str]:
    out = []
    for g in report.groups:
        if g.repeats > MAX_SAFE_REPEATS:
            out.append(
                f"group {g.name!r} is repeated {g.repeats:.1f} times an epoch (more than {MAX_SAFE_REPEATS:g}): its "
                "rows will be memorised long before the rest; "
                + ("lower its repeat" if g.repeat is not None else "lower its weight")
                + " or add data to it"
            )
        if g.rows and not g.val_rows and report.val_rows:
            out.append(
                f"group {g.name!r} has no validation row: early stopping judges the mixture without it "
                "(prepare its sources with a val split)"
            )
        if g.rows and not g.delivered_rows:
            out.append(
                f"group {g.name!r} delivers no row this epoch: its budget ({100 * g.target_share:.2f} % of the epoch) "
                "is too small for even one of its rows; raise its weight (or use repeat) or leave it out of the spec"
            )
        elif g.capped:
            out.append(
                f"group {g.name!r} is capped by max_tokens {g.max_tokens:,}: it delivers {100 * g.delivered_share:.1f} % "
                f"instead of {100 * g.target_share:.1f} % (the other groups are not scaled up)"
            )
        elif abs(g.delivered_share - g.target_share) > SHARE_TOLERANCE:
            out.append(
                f"group {g.name!r} delivers {100 * g.delivered_share:.1f} % instead of {100 * g.target_share:.1f} %: "
                "its rows are large next to its budget (or the tail dropped across ranks)"
            )
    if not report.val_rows:
        out.append("the mixture has no validation row: nothing is evaluated and early stopping never fires")
    if not report.steps_per_epoch:
        out.append(
            f"an epoch holds no optimizer step ({report.delivered_rows:,} row(s) delivered for {report.world_size} "
            f"rank(s) at --batch-tokens {report.batch_tokens:,}): `sftkit train` would refuse it; raise epoch_size "
            "(when the spec sets one), or lower --batch-tokens or the number of ranks"
        )
    if report.zero_trained_rows:
        out.append(f"{report.zero_trained_rows:,} row(s) have no trained token (after train_on); they cost compute and teach nothing")
    return out


def plan_mixture(
    path,
    *,
    batch_tokens: int = 8192,
    pack_length: int | None = None,
    packing: bool = True,
    grad_accum: int = 1,
    world_size: int = 1,
    seed: int = 0,
    epochs: float = 3.0,
    max_steps: int | None = None,
) -> MixturePlan:
    """``sftkit plan``: load the mixture and report it under these training settings."""
    mixture = load_mixture(path, default_seed=seed)
    sampler = mixture.sampler()
    planner = EpochPlanner(
        mixture.train.length[mixture.train.kept],
        seed,
        batch_tokens,
        packing,
        pack_length,
        0,
        world_size,
        order=sampler.epoch_order,
    )
    return build_plan(mixture, planner, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps)


PLAN_FILE = "plan.json"


def announce_plan(mixture: Mixture, planner: EpochPlanner, config) -> MixturePlan:
    """At the start of ``sftkit train --mixture``: print the plan and write ``RUN/plan.json``.

    A run folder that holds checkpoints keeps the plan.json it started with: a resume must have
    the same plan anyway, and a run refused (a changed spec, or a forgotten --resume) must not
    lose the record of the old one. Without checkpoints the run starts at step 0 and the plan is
    the current one."""
    from pipeline.fsutil import write_json_atomic
    from pipeline.report.plan import print_plan
    from trainer.checkpoint import list_checkpoints

    report = build_plan(mixture, planner, grad_accum=config.grad_accum, epochs=config.epochs, max_steps=config.max_steps)
    path = Path(config.out) / PLAN_FILE
    if not (path.is_file() and list_checkpoints(Path(config.out))):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(report.to_json(), path)
    print_plan(None, report.to_json())
    return report
