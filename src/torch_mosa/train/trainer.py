"""The training loop. `Trainer(model_config, train_config, out_dir).train()` reads top to bottom like nanoGPT's
train.py: setup, distributed from the environment, data, model, resume, compile and wrap, then the loop (lr, eval,
checkpoint, micro-steps syncing gradients only on the last, clip, step, log), a final evaluation and the summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import resource
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from torch_mosa.checks import resolve_device
from torch_mosa.config import MoSAConfig
from torch_mosa.data.shards import BatchLoader, TokenDataset
from torch_mosa.data.synthetic import recall_task
from torch_mosa.flops import model_flops
from torch_mosa.inference.router_health import model_router_health, record_selections
from torch_mosa.models.lm import MoSALM
from torch_mosa.ops.documents import document_ids_from_separators
from torch_mosa.train import checkpoint as ckpt
from torch_mosa.train.causal import setup_causal_training
from torch_mosa.train.config import TrainConfig
from torch_mosa.runs import TOKENIZER_DIR
from torch_mosa.train.data import RecallLoader, absolute_data_spec, evaluate_recall, prepare_data
from torch_mosa.train.distributed import (DistInfo, all_reduce_mean, barrier, gradient_sync, setup_distributed,
                                          shard_fsdp, teardown_distributed, wrap_ddp)
from torch_mosa.train.evaluate import evaluate
from torch_mosa.train.metrics import MetricsWriter, write_summary


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step and the last good checkpoint."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a step, whose checkpoint was written; the message says how to
    resume. `signal_number` is the signal received."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


class Trainer:
    """Trains `model_config` under `train_config`, writing everything into the run directory `out_dir`.

    The model's vocab_size is taken from the data. resume=True continues from the run's latest checkpoint (an
    error if there is none; a corrupt latest one is skipped for the one before, with a warning); without it a run
    directory that already holds checkpoints is refused. The data spec is stored absolute and the tokenizer is
    copied into the run, so the run directory serves evaluation and generation from anywhere (torch_mosa.runs).
    SIGINT or SIGTERM (in the main thread) stops training after the current step with a checkpoint, raising
    TrainingInterrupted; the final checkpoint is written before the final validation.
    """

    def __init__(self, model_config: MoSAConfig, train_config: TrainConfig, out_dir: str | Path, resume: bool = False,
                 label: str = "train"):
        self.model_config = model_config
        self.label = label  # names the run on its progress bar (a comparison trains many)
        self.config = dataclasses.replace(train_config, data=absolute_data_spec(train_config.data))
        self.out_dir = Path(out_dir)
        self.resume = resume
        self._signal: int | None = None

    def train(self) -> dict:
        """Run to `train_config.steps` optimizer steps; returns the summary (also written to summary.json)."""
        cfg = self.config
        # ---- setup: device, processes (a process group made by the caller is left to the caller), determinism
        device_type = resolve_device(cfg.device).type
        owns_process_group = not torch.distributed.is_initialized()
        info = self.info = setup_distributed(device_type)
        device = self.device = torch.device(device_type, info.local_rank) if device_type == "cuda" else torch.device("cpu")
        previous_determinism = torch.are_deterministic_algorithms_enabled()
        created = info.is_main and not self.out_dir.exists()
        self._started = False
        clean_exit = False
        try:
            if device.type == "cpu":  # free on CPU; on CUDA it would need CUBLAS_WORKSPACE_CONFIG and slow kernels
                torch.use_deterministic_algorithms(True, warn_only=True)
            summary = self._train(device, info)
            clean_exit = True
            return summary
        except BaseException:
            if created and not self._started:  # a run that failed before its first step leaves no directory
                shutil.rmtree(self.out_dir, ignore_errors=True)
            raise
        finally:
            torch.use_deterministic_algorithms(previous_determinism)
            if owns_process_group:
                teardown_distributed(clean_exit)

    def _train(self, device: torch.device, info: DistInfo) -> dict:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        autocast_dtype = self._autocast_dtype(device, info)
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        latest = ckpt.latest_checkpoint(self.out_dir)
        if self.resume and latest is None:
            raise ValueError(f"resume=True but {str(self.out_dir)!r} holds no checkpoint")
        if not self.resume and latest is not None:
            raise ValueError(f"{str(self.out_dir)!r} already holds checkpoints ({latest.name}); resume it or choose "
                             "another output directory")
        state = self._load_resume_state() if self.resume else None
        if state is not None and state["step"] >= cfg.steps:
            raise ValueError(f"steps={cfg.steps} but the run in {str(self.out_dir)!r} is already at step "
                             f"{state['step']}: pass --steps greater than {state['step']} to continue it")

        # ---- data: every rank reads the same data and takes its slice of each global batch
        seq_len = cfg.seq_len or self.model_config.max_seq_len
        if seq_len > self.model_config.max_seq_len:
            raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={self.model_config.max_seq_len}")
        data_dir = prepare_data(cfg.data, self.out_dir, tokenizer=cfg.tokenizer, vocab_size=cfg.data_vocab_size,
                                seq_len=seq_len, seed=cfg.seed, info=info, progress=cfg.progress)
        train_data, val_data = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
        if info.is_main:
            train_data.tokenizer.save(self.out_dir / TOKENIZER_DIR)
        model_config = dataclasses.replace(self.model_config, vocab_size=train_data.vocab_size)
        micro_batch = self._micro_batch_size(info)
        # The synthetic task trains on whole generated sequences, loss on the answers only: random windows of
        # its token stream would cut queries off the pairs they ask for, and recall would stay at chance.
        task = recall_task(train_data.meta)
        if cfg.pack_documents and task is not None:
            raise ValueError("pack_documents=True needs a text corpus (--data): the synthetic task's sequences are "
                             "single documents already")
        self._separator = train_data.eot_id if cfg.pack_documents else None
        if task is None:
            loader = BatchLoader(train_data, micro_batch, seq_len, seed=cfg.seed, rank=info.rank,
                                 world_size=info.world_size, device=device)
        elif task.seq_len != seq_len:
            raise ValueError(f"the synthetic task in {str(data_dir)!r} has sequences of {task.seq_len} tokens; "
                             f"train it with seq_len={task.seq_len}, not {seq_len}")
        else:
            loader = RecallLoader(task, micro_batch, grad_accum_steps=cfg.grad_accum_steps, rank=info.rank,
                                  world_size=info.world_size, device=device)
        tokens_per_step = cfg.batch_size * seq_len

        # ---- model and optimizer (built on the raw module: its parameter names are the checkpoint's keys)
        model = MoSALM(model_config).to(device)
        if cfg.strategy == "fsdp" and info.world_size > 1:
            shard_fsdp(model, device.type)
        optimizer = torch.optim.AdamW(model.optimizer_groups(cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                      eps=cfg.eps, fused=device.type == "cuda")
        run_config = {"model": model_config.to_dict(), "train": cfg.to_dict()}

        # ---- resume
        step, tokens, elapsed_before = 0, 0, 0.0
        if state is not None:
            trainer_state = self._restore(state, model, optimizer, loader, model_config)
            step, tokens, elapsed_before = trainer_state["step"], trainer_state["tokens"], trainer_state["elapsed_s"]
        elif info.is_main:  # a fresh run: no TensorBoard events of an earlier run in this directory
            shutil.rmtree(self.out_dir / "tensorboard", ignore_errors=True)
        if info.is_main:  # on resume too: the options given then (e.g. --steps, --batch-size) are the run's now
            (self.out_dir / ckpt.CONFIG_FILE).write_text(json.dumps(run_config, indent=2) + "\n")

        # causal training: capacity and threshold EMA on the MoSA layers, set after resume (it loads the thresholds)
        self.causal_meter = (setup_causal_training(model, seq_len, cfg.causal_capacity_factor, cfg.threshold_momentum,
                                                   resumed=self.resume) if cfg.routing == "causal" else None)

        # ---- compile and wrap for multi-process training
        train_model = torch.compile(model) if cfg.compile else model
        if cfg.strategy == "ddp" and info.world_size > 1:
            train_model = wrap_ddp(train_model, info, device.type)
        autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())

        metrics = MetricsWriter(self.out_dir, cfg.tensorboard, resume_step=step) if info.is_main else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        bar = tqdm(total=cfg.steps, initial=step, desc=self.label, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and info.is_main))
        start_step, session_start = step, time.perf_counter()
        train_time, interval_time, interval_tokens = 0.0, 0.0, 0

        def validate() -> dict:
            if task is None:
                result = evaluate(model, val_data, micro_batch, seq_len, cfg.eval_batches, device, rank=info.rank,
                                  world_size=info.world_size, drop_last=cfg.strategy == "fsdp",
                                  autocast_dtype=autocast_dtype, pack_documents=cfg.pack_documents,
                                  routing=cfg.routing)
            else:
                result = evaluate_recall(model, task, micro_batch, cfg.eval_batches,
                                         grad_accum_steps=cfg.grad_accum_steps, rank=info.rank,
                                         world_size=info.world_size, device=device, autocast=autocast,
                                         routing=cfg.routing)
            if metrics:
                metrics.log(step=step, tokens=tokens, val_loss=result["loss"], val_ppl=result["ppl"],
                            val_bpb=result.get("bpb"), val_recall_accuracy=result.get("recall_accuracy"))
            return result

        def save() -> Path | None:
            trainer_state = {"step": step, "tokens": tokens, "loader": loader.state_dict(), "rng": ckpt.rng_state(),
                             "elapsed_s": elapsed_before + time.perf_counter() - session_start}
            return self._save(step, model, optimizer, trainer_state, run_config)

        # ---- the loop: one optimizer step per iteration
        train_loss = None
        self._started = True
        try:
            with self._stop_on_signals():
                while step < cfg.steps:
                    lr = cfg.lr_at(step)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    if cfg.eval_interval and step > start_step and step % cfg.eval_interval == 0:
                        validate()
                    if cfg.checkpoint_interval and step > start_step and step % cfg.checkpoint_interval == 0:
                        save()

                    step_start = time.perf_counter()
                    # router health: MoSA layers keep their selection only on steps that log (no cost on the others)
                    logs_this_step = metrics is not None and ((step + 1) % cfg.log_interval == 0
                                                              or step + 1 == cfg.steps)
                    record_selections(model, logs_this_step)
                    train_loss, grad_norm = self._step(train_model, model, optimizer, loader, autocast, step)
                    step += 1
                    tokens += tokens_per_step

                    step_time = time.perf_counter() - step_start
                    train_time += step_time
                    interval_time += step_time
                    interval_tokens += tokens_per_step
                    tokens_per_s = interval_tokens / interval_time
                    bar.update(1)
                    bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.2e}")
                    log_now = step % cfg.log_interval == 0 or step == cfg.steps
                    # the rates are a collective: every rank takes them, rank 0 logs them
                    routing_rates = self.causal_meter.rates(info) if self.causal_meter and log_now else {}
                    if metrics and log_now:
                        router_averaged, router_per_layer = model_router_health(model)
                        metrics.log(step=step, tokens=tokens, lr=lr, train_loss=train_loss, grad_norm=grad_norm,
                                    tokens_per_s=tokens_per_s,
                                    elapsed_s=elapsed_before + time.perf_counter() - session_start,
                                    **router_averaged, **routing_rates)
                        metrics.log_tensorboard(step, router_per_layer)
                        interval_time, interval_tokens = 0.0, 0
                    if step < cfg.steps and self._stop_requested(info):  # after the last step: finish the run
                        interrupted_at = save()
                        raise TrainingInterrupted(
                            f"{signal.Signals(self._signal).name} received: stopped after step {step} of {cfg.steps} "
                            f"with checkpoint {interrupted_at}; continue with `mosa train --out {self.out_dir} "
                            "--resume`", self._signal)

            # ---- final checkpoint (before the validation, so a run killed during it keeps its last step), final
            # evaluation and summary
            checkpoint_path = save()
            result = validate()
        finally:
            bar.close()
            if metrics:
                metrics.close()
        summary = {
            "steps": step, "tokens": tokens, "train_loss": train_loss,
            "val_loss": result["loss"], "val_ppl": result["ppl"], "val_bpb": result.get("bpb"),
            "val_tokens": result["tokens"], "val_recall_accuracy": result.get("recall_accuracy"),
            "params": model.num_parameters(),
            "forward_flops_per_token": model_flops(model_config, seq_len) / seq_len,
            "tokens_per_s": (step - start_step) * tokens_per_step / train_time if train_time else None,
            **peak_memory(device),
            "wall_clock_s": elapsed_before + time.perf_counter() - session_start,
            "device": str(device), "world_size": info.world_size, "seq_len": seq_len, "batch_size": cfg.batch_size,
            "preset": model_config.preset, "attention": model_config.attention, "sparsity": model_config.sparsity,
            "head_counts": model_config.head_counts(), "data": str(data_dir),
            "checkpoint": str(checkpoint_path) if checkpoint_path else None, "routing": cfg.routing,
            **(self.causal_meter.run_rates(info) if self.causal_meter else {}),
        }
        if info.is_main:
            write_summary(self.out_dir, summary)
        return summary

    def _step(self, train_model, model, optimizer, loader, autocast, step: int) -> tuple[float, float | None]:
        """One optimizer step over grad_accum_steps micro-batches; gradients are all-reduced on the last one only.

        Returns the step's loss (mean over micro-batches and ranks) and the gradient norm before clipping.
        """
        cfg = self.config
        loss_sum = torch.zeros((), device=self.device)
        for micro_step in range(cfg.grad_accum_steps):
            x, y = next(loader)
            # packed rows: the layout is built here, outside a compiled model, so its host reads break no graph
            packed = {} if self._separator is None else {
                "documents": model.document_layout(x, document_ids_from_separators(x, self._separator))}
            with gradient_sync(train_model, sync=micro_step == cfg.grad_accum_steps - 1):
                with autocast:  # the forward only: backward runs in the dtypes autocast chose for each op
                    _, loss = train_model(x, y, routing=cfg.routing, **packed)
                (loss / cfg.grad_accum_steps).backward()
            loss_sum += loss.detach()
            if self.causal_meter:
                self.causal_meter.add()
        train_loss = all_reduce_mean(loss_sum / cfg.grad_accum_steps, self.info).item()
        if not math.isfinite(train_loss):
            latest = ckpt.latest_checkpoint(self.out_dir)
            kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written before it"
            raise NonFiniteLossError(f"training loss is {train_loss} at step {step + 1}; stopping ({kept}). Lower "
                                     "the learning rate, check the data, or resume from the checkpoint.")
        grad_norm = None
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # DTensor under FSDP
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return train_loss, grad_norm

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """While training, SIGINT and SIGTERM ask the loop to stop after the current step (see _stop_requested);
        a second signal acts as it would have without this (Ctrl-C twice aborts at once). Only the main thread can
        install handlers: elsewhere (a trainer run in a thread) signals keep their usual effect."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

        def request_stop(number, frame):
            self._signal = number
            for n, handler in previous.items():
                signal.signal(n, handler)
            if self.info.is_main:
                print(f"\n{signal.Signals(number).name}: stopping after this step with a checkpoint "
                      "(send it again to abort at once)", file=sys.stderr, flush=True)

        for number in previous:
            signal.signal(number, request_stop)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _stop_requested(self, info: DistInfo) -> bool:
        """Whether any rank received a stop signal (all ranks then save together: saving is a collective)."""
        if info.world_size == 1:
            return self._signal is not None
        flag = torch.tensor([0 if self._signal is None else self._signal], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self._signal = int(flag.item()) or None
        return self._signal is not None

    def _load_resume_state(self) -> dict:
        """The newest readable checkpoint of the run; a corrupt latest one falls back to the previous one with a
        warning naming both."""
        candidates = ckpt.checkpoint_dirs(self.out_dir)[::-1]
        for i, path in enumerate(candidates):
            try:
                return ckpt.load_checkpoint(path)
            except ckpt.CheckpointError as error:
                if i + 1 == len(candidates):
                    raise
                warnings.warn(f"{error}; resuming from the previous checkpoint {candidates[i + 1]} instead",
                              stacklevel=3)

    def _micro_batch_size(self, info: DistInfo) -> int:
        """Sequences per rank per micro-step: batch_size / (grad_accum_steps * world_size), which must divide."""
        cfg = self.config
        parts = cfg.grad_accum_steps * info.world_size
        if cfg.batch_size % parts:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by grad_accum_steps x world_size = "
                             f"{cfg.grad_accum_steps} x {info.world_size}")
        return cfg.batch_size // parts

    def _autocast_dtype(self, device: torch.device, info: DistInfo) -> torch.dtype | None:
        """bfloat16 autocast on CUDA (or when asked for), none for float32 and under FSDP's own mixed precision."""
        dtype = self.config.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.type == "cuda" else "float32"
        if dtype == "float32" or (self.config.strategy == "fsdp" and info.world_size > 1 and device.type == "cuda"):
            return None
        return torch.bfloat16

    def _restore(self, state: dict, model, optimizer, loader, model_config: MoSAConfig) -> dict:
        """Load model, optimizer, loader and RNG states from a loaded checkpoint; returns the trainer state."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        path = state["path"]
        saved = MoSAConfig.from_dict(state["config"]["model"])
        if saved != model_config:
            differ = {f.name: (getattr(saved, f.name), getattr(model_config, f.name))
                      for f in dataclasses.fields(saved) if getattr(saved, f.name) != getattr(model_config, f.name)}
            raise ValueError(f"the model config differs from checkpoint {path}'s (saved, given): {differ}")
        options = StateDictOptions(full_state_dict=True)
        try:
            set_model_state_dict(model, state["model"], options=options)
            set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
        except (RuntimeError, KeyError) as error:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {error}") from None
        loader.load_state_dict(state["trainer"]["loader"])
        ckpt.set_rng_state(state["trainer"]["rng"])
        return state["trainer"]

    def _save(self, step: int, model, optimizer, trainer_state: dict, run_config: dict) -> Path | None:
        """Gather full state dicts (a collective under FSDP, so every rank calls this); rank 0 writes them."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
        path = None
        if self.info.is_main:
            path = ckpt.save_checkpoint(self.out_dir, step, model_state, optimizer_state, trainer_state, run_config,
                                        keep=self.config.keep_checkpoints)
        barrier(self.info)
        return path


def peak_memory(device: torch.device) -> dict:
    """Peak CUDA memory allocated by tensors, or on CPU the process's peak resident set (all it has ever used)."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda_allocated"}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "cpu_process_rss"}
