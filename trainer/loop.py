"""The training loop, top to bottom: plan -> fetch micro-batches -> masked loss -> step -> eval/save.

Everything that is not the loop lives next door: the data (:mod:`trainer.data`), batch plans and
collate (:mod:`trainer.batching`, :mod:`trainer.sampling`), the loss (:mod:`trainer.loss`), the
optimizer and schedule (:mod:`trainer.schedule`), checkpoints (:mod:`trainer.checkpoint`),
telemetry (:mod:`trainer.metrics`), process groups (:mod:`trainer.distributed`) and how the model
is spread over them, DDP or FSDP2 (:mod:`trainer.sharding`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import shutil
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.fsutil import TMP_PREFIX
from trainer import distributed, lora, sharding
from trainer.batching import PlannedBatches
from trainer.checkpoint import (
    TrainState,
    checkpoint_config,
    list_checkpoints,
    load_checkpoint,
    remove_partial,
    save_checkpoint,
    step_dir,
)
from trainer.config import TrainConfig
from trainer.loss import CausalLMLoss, count_targets
from trainer.metrics import MetricsLog, plot_loss, progress_bar
from trainer.sampling import EpochPlanner, eval_plan
from trainer.schedule import build_optimizer, build_scheduler

FINAL_DIR = "final"
# Settings that decide which rows each micro-batch holds; a resume must keep them. The number
# of ranks may change: the data position is converted (TrainState.on_ranks). A mixture counts by
# its content hash, so a spec edited in place is noticed.
PLAN_KEYS = ("data", "mixture_sha256", "seed", "batch_tokens", "pack_length", "packing", "grad_accum")
# What a LoRA checkpoint's adapters are bound to (its frozen base is not in the checkpoint).
LORA_KEYS = ("model", "lora_r", "lora_alpha", "lora_targets")


class SFTTrainer:
    """Fine-tunes ``model`` on a ShardDataset: ``compute_loss(batch)`` and ``train()``."""

    def __init__(self, model, train_dataset, eval_dataset, config: TrainConfig | dict, tokenizer=None):
        self.config = config = config if isinstance(config, TrainConfig) else TrainConfig(**config)
        self.dist = distributed.current()
        self.device = distributed.resolve_device(config.device, self.dist)
        if config.lora_r:
            model = lora.apply_lora(
                model,
                r=config.lora_r,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                targets=config.lora_targets,
                merge=config.merge,
            )
        self.model = model.to(self.device)
        if self.dist.is_main and any(p.requires_grad and p.dtype == torch.bfloat16 for p in self.model.parameters()):
            print(
                "note: training bf16 weights directly: an update smaller than 1/256 of a weight rounds away "
                "(at lr 1e-5, most of them); prefer --dtype fp32 (bf16 autocast on GPU) or --lora-r with --dtype bf16"
            )
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset if eval_dataset is not None and len(eval_dataset) else None
        self.tokenizer = tokenizer
        self.pad_token_id = _pad_token_id(tokenizer, model)
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        if config.activation_checkpointing:
            sharding.checkpoint_activations(self.model)
        # The model and its loss in one module: what DDP (or FSDP) wraps and the loop calls.
        self.objective = CausalLMLoss(self.model, config.loss_chunk_tokens)
        self.wrapped = sharding.wrap(self.objective, self.device, fsdp=config.fsdp)  # before the optimizer sees the parameters
        self.planner = EpochPlanner(
            train_dataset.lengths,
            config.seed,
            config.batch_tokens,
            config.packing,
            config.pack_length,
            self.dist.rank,
            self.dist.world_size,
            order=getattr(train_dataset, "epoch_order", None),  # a mixture's
        )
        self.steps_per_epoch = self.planner.steps_per_epoch(config.grad_accum)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{config.data or config.mixture} has too few training rows for {self.dist.world_size} rank(s) at "
                f"--batch-tokens {config.batch_tokens}"
            )
        self.total_steps = config.max_steps if config.max_steps is not None else max(1, math.ceil(config.epochs * self.steps_per_epoch))
        self.optimizer = build_optimizer(self.model, config.lr, config.weight_decay, self.device)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, config.warmup_ratio)
        self.state = TrainState(world_size=self.dist.world_size)

    # --- the loss ------------------------------------------------------------------------
    def compute_loss(self, batch: dict, num_targets: float | None = None) -> torch.Tensor:
        """Summed CE over the batch's trained targets / ``num_targets`` (default: their own count)."""
        loss_sum, count = self._loss_sum(self.wrapped, batch)
        return loss_sum / (max(num_targets, 1) if num_targets is not None else count.clamp(min=1))

    def _loss_sum(self, objective, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed CE, number of trained targets), both still on the device: no host sync here."""
        inputs = {
            "input_ids": batch["input_ids"].to(self.device, non_blocking=True).long(),
            "position_ids": batch["position_ids"].to(self.device, non_blocking=True).long(),
            "labels": batch["labels"].to(self.device, non_blocking=True),
        }
        if not batch.get("packed", False):  # a mask would hide the restarting positions of packed rows
            inputs["attention_mask"] = batch["attention_mask"].to(self.device, non_blocking=True).long()
        if batch.get("loss_weights") is not None:
            inputs["weights"] = batch["loss_weights"].to(self.device, non_blocking=True)
        with self._autocast():
            return objective(**inputs)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # --- one optimizer step's worth of forward/backward ------------------------------------
    def forward_backward(self, micro_batches: list[dict], stop_requested: bool = False) -> dict:
        """Accumulate gradients over this rank's micro-batches, normalised by the step's trained
        tokens on every rank; returns global loss/token figures. Nothing runs if any rank must stop."""
        local_targets = sum(count_targets(b) for b in micro_batches)
        local_tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
        global_targets, global_tokens, stop = distributed.all_reduce_sum([local_targets, local_tokens, float(stop_requested)], self.device)
        if stop:
            return {"stop": True}
        # DDP and FSDP2 average gradients over ranks; scaling by world size turns that into a plain sum.
        normaliser = max(global_targets, 1) / self.dist.world_size
        loss_sum = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            with sharding.micro_batch_sync(self.wrapped, last=index == len(micro_batches) - 1):
                batch_loss_sum, _ = self._loss_sum(self.wrapped, batch)
                (batch_loss_sum / normaliser).backward()
            loss_sum += batch_loss_sum.detach()
        (global_loss_sum,) = distributed.all_reduce_sum([float(loss_sum)], self.device)
        return {
            "stop": False,
            "loss": global_loss_sum / global_targets if global_targets else 0.0,
            "trained_tokens": int(global_targets),
            "tokens": int(global_tokens),
        }

    def optimizer_step(self, trained_tokens: int) -> float:
        grad_norm = sharding.clip_grad_norm(self.model.parameters(), self.config.max_grad_norm)
        if trained_tokens:
            self.optimizer.step()
            self.scheduler.step()
        else:  # nothing to learn from: Adam's moments must not move, the schedule still advances
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    # --- data ------------------------------------------------------------------------------
    def _step_batches(self) -> Iterator[tuple[int, int, list[dict], float]]:
        """Yield (epoch, next micro index, micro-batches, seconds waited) per optimizer step,
        starting at the saved position; the plan of each epoch is derived, never stored."""
        epoch, start = self.state.epoch, self.state.micro_index
        workers = self.config.num_workers if self.config.num_workers is not None else (2 if self.device.type == "cuda" else 0)
        while True:
            plan = self.planner.rank_plan(epoch)
            loader = torch.utils.data.DataLoader(
                PlannedBatches(self.train_dataset, plan[start:], self.pad_token_id),
                batch_size=None,
                num_workers=workers,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=4 if workers else None,
                worker_init_fn=_ignore_sigterm if workers else None,
                # Its own generator: a loader draws a seed when it starts, and drawing it from the
                # global RNG would shift dropout's masks after a resume (which restarts the loader).
                generator=torch.Generator().manual_seed(self.config.seed),
            )
            batches = _started(loader)
            index = start
            while index < len(plan):
                waited = time.perf_counter()
                count = min(self.config.grad_accum, len(plan) - index)
                micro = [next(batches) for _ in range(count)]
                index += count
                yield epoch, index, micro, time.perf_counter() - waited
            epoch, start = epoch + 1, 0

    # --- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> tuple[float, int]:
        """Mean CE per trained token over the whole validation split (every rank a disjoint part)."""
        self.model.eval()
        plan = eval_plan(
            self.eval_dataset.lengths,
            self.config.batch_tokens,
            self.config.packing,
            self.config.pack_length,
            self.dist.rank,
            self.dist.world_size,
        )
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        targets = torch.zeros((), dtype=torch.int64, device=self.device)
        idle = sharding.idle_batches(self.objective, len(plan), self.pad_token_id, self.device)
        for batch in itertools.chain(PlannedBatches(self.eval_dataset, plan, self.pad_token_id), idle):
            batch_sum, batch_targets = self._loss_sum(self.objective, batch)  # not DDP: ranks may differ in count
            loss_sum += batch_sum.double()
            targets += batch_targets
        loss_sum, targets = distributed.all_reduce_sum([float(loss_sum), float(targets)], self.device)
        self.model.train()
        return (loss_sum / targets if targets else float("nan")), int(targets)

    # --- the loop --------------------------------------------------------------------------
    def train(self) -> dict:
        config, run_dir = self.config, Path(self.config.out)
        self._start_or_resume(run_dir)
        state = self.state
        log = MetricsLog(run_dir, enabled=self.dist.is_main, resume_step=state.step if config.resume else None)
        bar = progress_bar(self.total_steps, state.step, enabled=self.dist.is_main and config.progress)
        stop_reason = "max_steps"
        self.model.train()
        with _SigtermFlag() as sigterm:
            batches = self._step_batches()
            while state.step < self.total_steps:
                epoch, next_index, micro, waited = next(batches)
                started = time.perf_counter() - waited
                result = self.forward_backward(micro, stop_requested=sigterm.raised)
                if result["stop"]:
                    stop_reason = "sigterm"
                    break
                lr = self.scheduler.get_last_lr()[0]
                grad_norm = self.optimizer_step(result["trained_tokens"])
                state.step += 1
                state.epoch, state.micro_index = epoch, next_index
                state.tokens_seen += result["tokens"]
                state.trained_tokens_seen += result["trained_tokens"]
                elapsed = time.perf_counter() - started
                log.write(
                    {
                        "type": "train",
                        "step": state.step,
                        "epoch": epoch,
                        "loss": result["loss"],
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens": result["tokens"],
                        "trained_tokens": result["trained_tokens"],
                        "tokens_per_s": result["tokens"] / elapsed,
                        "data_wait": waited / elapsed,
                    }
                )
                bar.update(1)
                bar.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{lr:.2e}", epoch=epoch)

                saved_best = False
                if self.eval_dataset is not None and state.step % config.eval_every == 0:
                    saved_best = self._evaluate_and_track(log, run_dir)
                    if config.patience is not None and state.evals_since_best >= config.patience:
                        stop_reason = "early_stopping"
                if state.step % config.save_every == 0 and not saved_best:
                    self._save(run_dir)
                if stop_reason == "early_stopping":
                    break
            batches.close()
            bar.close()
            # Still under the SIGTERM flag: a second SIGTERM (schedulers resend it) cannot kill the
            # process halfway through the checkpoint it is waiting for.
            self._save(run_dir)
            log.write({"type": "stop", "step": state.step, "reason": stop_reason})
            log.close()
            if stop_reason != "sigterm":
                self._save_final(run_dir)
        return self._summary(run_dir, stop_reason)

    def _evaluate_and_track(self, log: MetricsLog, run_dir: Path) -> bool:
        """Evaluate, update early-stopping counters, and checkpoint when the model is the best yet."""
        state = self.state
        eval_loss, eval_tokens = self.evaluate()
        improved = eval_loss < state.best_eval_loss
        if improved:
            state.best_eval_loss, state.best_step, state.evals_since_best = eval_loss, state.step, 0
        else:
            state.evals_since_best += 1
        log.write({"type": "eval", "step": state.step, "eval_loss": eval_loss, "eval_tokens": eval_tokens, "best": improved})
        if improved:
            self._save(run_dir)
        return improved

    # --- checkpoints and the final model ---------------------------------------------------
    def _start_or_resume(self, run_dir: Path) -> None:
        if self.dist.is_main:
            remove_partial(run_dir)
        distributed.barrier()
        found = list_checkpoints(run_dir)
        if found and not self.config.resume:
            raise ValueError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another --out")
        if self.config.resume and found:
            step, path = found[-1]
            self._check_same_plan(path)
            state = load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
            self.state, skipped = state.on_ranks(self.dist.world_size)
            if self.dist.is_main:
                print(f"resuming {run_dir} from step {step} (epoch {self.state.epoch}, micro-batch {self.state.micro_index})")
                if state.world_size != self.dist.world_size:
                    print(
                        f"the run was saved on {state.world_size} rank(s) and continues on {self.dist.world_size}: "
                        f"{state.micro_index} micro-batches per rank become {self.state.micro_index}, "
                        f"skipping {skipped} micro-batch(es) of epoch {state.epoch}"
                    )
        elif self.config.resume and self.dist.is_main:
            print(f"--resume: no checkpoint in {run_dir}, starting from step 0")

    def _check_same_plan(self, path: Path) -> None:
        """The saved data position only means something under the same batch plan."""
        saved = checkpoint_config(path)
        current = self._saved_config()
        changed = [key for key in PLAN_KEYS if saved.get(key) != current[key]]
        if "mixture_sha256" in changed and saved.get("mixture_sha256") and current["mixture_sha256"]:
            raise ValueError(
                f"cannot resume {path}: the mixture {self.config.mixture} changed since this checkpoint (weights, "
                "groups, seed or folders), so its saved position points into another epoch order; resume with the "
                "spec the run started with, or start a new run (another --out) to train with the new mixture"
            )
        if changed:
            details = ", ".join(f"{key} {saved.get(key)} -> {current[key]}" for key in changed)
            raise ValueError(f"cannot resume {path}: the batch plan changed ({details}); resume with the same settings")
        # A LoRA checkpoint holds only adapters: they mean something on the base they were trained on.
        lora_keys = [key for key in LORA_KEYS if saved.get(key) != current[key]]
        if saved.get("lora_r") and lora_keys:
            details = ", ".join(f"{key} {saved.get(key)} -> {current[key]}" for key in lora_keys)
            raise ValueError(f"cannot resume {path}: it holds LoRA adapters of another setup ({details})")
        if not saved.get("lora_r") and current["lora_r"]:
            raise ValueError(
                f"cannot resume {path}: it is a full fine-tune's checkpoint and --lora-r {current['lora_r']} asks for "
                "LoRA adapters; resume without --lora-r, or start the LoRA run in another --out (its --model may be "
                "this run's final/)"
            )
        saved_dtype = saved.get("dtype", "fp32")  # checkpoints from before --dtype were fp32
        if saved_dtype != current["dtype"]:
            raise ValueError(
                f"cannot resume {path}: its weights and optimizer state are {saved_dtype} and --dtype asks for "
                f"{current['dtype']}; resume with --dtype {saved_dtype}"
            )

    def _save(self, run_dir: Path) -> None:
        save_checkpoint(
            run_dir,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=self.state,
            config=self._saved_config(),
            keep_last=self.config.keep_last,
            sharded=self.config.fsdp,
        )

    def _saved_config(self) -> dict:
        """The settings a checkpoint records, with the mixture's content hash (None without one)."""
        return {**self.config.model_dump(mode="json"), "mixture_sha256": getattr(self.train_dataset, "spec_sha256", None)}

    def _save_final(self, run_dir: Path) -> None:
        """``RUN/final``: the best checkpoint's weights (or the last ones when there was no eval)."""
        if self.state.best_step >= 0 and self.state.best_step != self.state.step:
            load_checkpoint(step_dir(run_dir, self.state.best_step), model=self.model)
        weights = sharding.full_state_dict(self.model)  # FSDP: gathered on rank 0 (every rank takes part)
        if self.dist.is_main:
            final, tmp = run_dir / FINAL_DIR, run_dir / f"{TMP_PREFIX}{FINAL_DIR}"
            shutil.rmtree(tmp, ignore_errors=True)
            if lora.is_lora(self.model):
                lora.save_final(self.model, tmp, self.tokenizer, merge=self.config.merge)
            else:
                self.model.save_pretrained(tmp, state_dict=weights)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            plot_loss(run_dir)
        distributed.barrier()

    def _summary(self, run_dir: Path, stop_reason: str) -> dict:
        state = self.state
        return {
            "steps": state.step,
            "epoch": state.epoch,
            "stop_reason": stop_reason,
            "tokens_seen": state.tokens_seen,
            "trained_tokens_seen": state.trained_tokens_seen,
            "best_eval_loss": state.best_eval_loss if state.best_step >= 0 else None,
            "best_step": state.best_step if state.best_step >= 0 else None,
            "run_dir": str(run_dir),
            "final_dir": str(run_dir / FINAL_DIR) if stop_reason != "sigterm" else None,
        }


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between steps, so it can save and exit cleanly."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def _handle(self, signum, frame):
        self.raised = True

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def _started(loader: torch.utils.data.DataLoader) -> Iterator:
    """``iter(loader)``, its worker processes started with SIGTERM held back.

    A worker forked while a scheduler signals the whole group would meet the signal before its
    ``worker_init_fn`` (:func:`_ignore_sigterm`) runs, under torch's own handler, which ends it: the
    main process would fail with a traceback instead of saving. Started with SIGTERM blocked (the
    mask a forked or spawned process inherits; a forkserver's workers do not), a worker keeps such
    a signal pending until it ignores it; this process gets its own as soon as its workers are
    started."""
    if not loader.num_workers or not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _ignore_sigterm(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM: a scheduler signals the whole process group, and a worker
    killed by it would make the main process fail with a traceback instead of saving and stopping.
    Workers still end when the loader closes, and on their own when the main process is gone. One
    sent while the worker started (held back by :func:`_started`) is dropped here with it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _pad_token_id(tokenizer, model) -> int:
    for candidate in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(model.config, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if candidate is not None:
            return int(candidate)
    return 0


def run_training(config: TrainConfig) -> dict:
    """``sftkit train``: build tokenizer, datasets and model from the config, train, return final metrics."""
    from pipeline.report.integrity import load_manifest
    from trainer.data import ShardDataset
    from trainer.mixture import load_mixture
    from trainer.models import load_model, resolve_tokenizer

    if config.data is None and config.mixture is None:  # both at once: TrainConfig refuses that
        raise ValueError("give the training data as --data DIR (a folder made by `sftkit prepare`) or as --mixture FILE (a mixture spec)")
    # A missing or damaged manifest or spec: one sentence before anything starts.
    mixture = load_mixture(config.mixture, default_seed=config.seed) if config.mixture is not None else None
    if mixture is None:
        load_manifest(config.data)
    data_dir = mixture.folders[0] if mixture is not None else config.data
    if Path(config.out).exists() and not Path(config.out).is_dir():
        raise ValueError(f"--out {config.out} is a file; give a folder for the run (created if missing)")
    info = distributed.init_from_env(config.device)
    try:
        tokenizer = resolve_tokenizer(Path(data_dir), config.model, config.tokenizer)
        # Rank 0 builds any missing memory-map companions first; the others then just open them.
        if not info.is_main:
            distributed.barrier()
        if mixture is not None:
            train_dataset, eval_dataset = mixture.datasets(tokenizer)
        else:
            train_dataset = ShardDataset(data_dir, "train", tokenizer=tokenizer)
            eval_dataset = ShardDataset(data_dir, "val", tokenizer=tokenizer)
        if info.is_main:
            distributed.barrier()
        if len(train_dataset) == 0:
            raise ValueError(f"{data_dir} has no training rows")
        longest = int(max(train_dataset.lengths.max(), eval_dataset.lengths.max(initial=0)))
        max_positions = max(4096, config.pack_length or config.batch_tokens, longest)
        model = load_model(
            config.model,
            tokenizer,
            seed=config.seed,
            max_positions=max_positions,
            attn_implementation=config.attn_implementation,
            dtype=config.dtype,
        )
        torch.manual_seed(config.seed)
        trainer = SFTTrainer(model, train_dataset, eval_dataset, config, tokenizer=tokenizer)
        if mixture is not None and info.is_main:
            from trainer.mixture_plan import announce_plan

            announce_plan(mixture, trainer.planner, config)
        return trainer.train()
    finally:
        distributed.shutdown()
