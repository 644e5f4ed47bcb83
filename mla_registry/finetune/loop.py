"""The training loop: cached inputs, steps, validation, early stopping, best weights kept, resumable state.

Written here rather than with transformers' ``Trainer``: the Trainer needs ``accelerate`` (not a dependency),
pickles optimizer/RNG state with ``torch.save``, and feeds ``input_features`` to the whole model every step,
while the point of freezing the encoder is to feed cached encoder outputs instead. The loop is deterministic
(data order is a pure function of seed and step) and resumes to bit-identical weights.

With the encoder frozen (no trainable parameter in it, the usual case) it runs once per utterance and its outputs
are reused by every step and epoch (``utterances x frames x d_model`` floats: about 2.3 MB per utterance for
tiny.en); otherwise log-mel features are cached and the encoder trains. For ``distill`` the teacher runs once over
every utterance and only its top-k log-probabilities are kept (:mod:`.objectives`); the teacher is then released.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed, fingerprint, whisper
from ..encoder_cache import DEFAULT_BUDGET, EncoderOutputs, TensorStore, encoder_fingerprint, set_batches
from ..errors import DataError, MlaRegistryError
from ..process_memory import reuse_heap_memory
from . import state as st
from .config import FinetuneConfig
from .objectives import cross_entropy, distill_kl, masked_logits, teacher_forced_logits, topk_teacher
from .trainable import trainable_parameters


class FinetuneError(MlaRegistryError):
    """Fine-tuning cannot run as configured (nothing to train, no teacher for distillation, ...)."""


@dataclass
class Item:
    """One utterance, ready for teacher forcing: its encoder output (or features) under ``key`` in the caches'
    store, transcript, teacher top-k (a few kB: kept in memory)."""

    key: str
    text: str
    store: TensorStore
    teacher: dict[str, torch.Tensor] | None = None

    @property
    def source(self) -> torch.Tensor:
        return self.store.get(self.key)


@dataclass
class FinetuneCaches:
    """Encoder outputs (or features) and teacher top-k per (encoder or teacher weights, data, settings), shared by
    the fine-tuned variants of one experiment (they fine-tune one base model on the same data: encode and distil
    once). The tensors live in a :class:`~mla_registry.encoder_cache.TensorStore`: in memory up to
    ``budget_bytes``, beyond it on disk in ``directory``. The runner owns one for a run; a lone fine-tune makes
    its own (in its work directory) and closes it."""

    budget_bytes: int = DEFAULT_BUDGET
    directory: Path | None = None
    # a run's encoder outputs (in batches of ``outputs_batch_size``), looked up before encoding a set: the run's
    # validation CE has already encoded the validation set a fine-tune usually validates on
    encoder_outputs: EncoderOutputs | None = None
    outputs_batch_size: int = 16
    inputs: dict[tuple, list[tuple[str, str]]] = field(default_factory=dict)
    teachers: dict[tuple, tuple[float, list[dict[str, torch.Tensor]]]] = field(default_factory=dict)
    _store: TensorStore | None = None

    @property
    def store(self) -> TensorStore:
        if self._store is None:
            self._store = TensorStore(self.budget_bytes, self.directory)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


class Trainer:
    """The state and steps of one fine-tuning run (:func:`finetune` is the entry point)."""

    def __init__(self, model: nn.Module, processor, cfg: FinetuneConfig, params: dict[str, nn.Parameter],
                 encoder_frozen: bool, caches: FinetuneCaches):
        self.model, self.processor, self.cfg, self.params = model, processor, cfg, params
        self.encoder_frozen = encoder_frozen
        self.caches = caches
        ref = next(model.parameters())
        self.device, self.dtype = ref.device, ref.dtype
        self.opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self._perms: dict[int, list[int]] = {}

    # -- inputs
    @torch.no_grad()
    def prepare(self, utts, desc: str, quiet: bool) -> list[Item]:
        """Features (or encoder outputs, when the encoder is frozen) once per utterance; shared with later runs
        whose encoder weights (by hash) and data are the same."""
        from ..data import fingerprint_of

        encoder = encoder_fingerprint(self.model) if self.encoder_frozen else ""
        data_fp = fingerprint_of(utts)
        key = ("encoded" if self.encoder_frozen else "features", encoder, data_fp, self.cfg.batch_size,
               str(self.device), str(self.dtype))
        store = self.caches.store
        if key in self.caches.inputs:
            return [Item(k, text, store) for k, text in self.caches.inputs[key]]
        items: list[Item] = []
        was = self.model.training
        self.model.eval()
        shared = self.caches.encoder_outputs if self.encoder_frozen else None
        bs = self.caches.outputs_batch_size if shared is not None else self.cfg.batch_size
        prefix = fingerprint.of_json(key)[:12]
        for batch, set_key in tqdm(set_batches(encoder, utts, bs), desc=desc, disable=quiet, unit="batch",
                                   leave=False):
            src = shared.peek(set_key, tuple(u.id for u in batch)) if shared is not None else None
            if src is None:
                feats = whisper.input_features(self.processor, [u.audio for u in batch], self.device, self.dtype)
                src = whisper.encode(self.model, feats) if self.encoder_frozen else feats
            for j, u in enumerate(batch):
                name = f"{prefix}/{len(items)}"  # the utterance's position in the set
                store.put(name, src[j].to(self.device, self.dtype).clone())
                items.append(Item(name, u.text, store))
        self.model.train(was)
        self.caches.inputs[key] = [(it.key, it.text) for it in items]
        return items

    @torch.no_grad()
    def teach(self, teacher: nn.Module, sets: list[tuple[list, list[Item]]], same_encoder: bool, quiet: bool
              ) -> float:
        """Fill every item's teacher top-k (teacher-forced on its transcript); returns the mean teacher mass
        kept. The teacher reuses the cached encoder outputs when its encoder equals the model's frozen one."""
        cfg, proc = self.cfg, self.processor
        everything = [it for _, items in sets for it in items]
        key = ("teacher", fingerprint.of_tensors(teacher), tuple(it.text for it in everything), cfg.distill_topk,
               cfg.temperature, cfg.batch_size)
        if key in self.caches.teachers:
            kept_mass, tops = self.caches.teachers[key]
            for it, top in zip(everything, tops):
                it.teacher = top
            return kept_mass
        kept, count = 0.0, 0
        teacher.eval()
        for utts, items in sets:
            for i in tqdm(range(0, len(items), cfg.batch_size), desc="teacher logits", disable=quiet,
                          unit="batch", leave=False):
                batch = items[i: i + cfg.batch_size]
                ids, _, mask = whisper.teacher_forcing(teacher, proc.tokenizer, [it.text for it in batch],
                                                       self.device)
                if self.encoder_frozen and same_encoder:
                    hidden = torch.stack([it.source for it in batch]).to(self.device)
                else:
                    feats = whisper.input_features(proc, [u.audio for u in utts[i: i + cfg.batch_size]],
                                                   self.device, self.dtype)
                    hidden = whisper.encode(teacher, feats)
                logits = masked_logits(teacher, hidden, ids, mask, encoded=True)
                starts = [0, *mask.sum(-1).cumsum(0).tolist()]
                for j, it in enumerate(batch):
                    t = topk_teacher(logits[starts[j]: starts[j + 1]], cfg.distill_topk, cfg.temperature)
                    it.teacher = {k: v.cpu() for k, v in t.items()}
                    kept += float(t["logp"].exp().sum(-1).double().sum())
                    count += t["logp"].shape[0]
        self.caches.teachers[key] = (kept / max(count, 1), [it.teacher for it in everything])
        return kept / max(count, 1)

    # -- schedule
    def lr_at(self, step: int) -> float:
        """Learning rate of (0-based) ``step``: linear warm-up, then cosine / linear decay to 0, or constant."""
        c = self.cfg
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.decay == "constant":
            return c.lr
        progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        factor = 0.5 * (1 + math.cos(math.pi * progress)) if c.decay == "cosine" else 1 - progress
        return c.lr * max(0.0, factor)

    def batch_indices(self, step: int, n: int) -> list[int]:
        """The training utterances of ``step``: a stream of per-epoch permutations (seeded by seed and epoch),
        cut into batches, so resuming needs only the step number."""
        bs = self.cfg.batch_size
        out = []
        for pos in range(step * bs, (step + 1) * bs):
            epoch, i = divmod(pos, n)
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
                self._perms = {epoch: torch.randperm(n, generator=g).tolist()}
            out.append(self._perms[epoch][i])
        return out

    # -- steps
    def token_losses(self, items: list[Item]) -> torch.Tensor:
        """Per-token loss ``[N]`` of a batch under the configured objective."""
        c = self.cfg
        src = torch.stack([it.source for it in items]).to(self.device)
        logits, targets = teacher_forced_logits(self.model, self.processor.tokenizer, [it.text for it in items],
                                                src, encoded=self.encoder_frozen)
        loss = torch.zeros(logits.shape[0], device=logits.device)
        if c.uses_ce:
            loss = loss + cross_entropy(logits, targets)
        if c.uses_distill:
            teacher = {k: torch.cat([it.teacher[k] for it in items]).to(self.device) for k in items[0].teacher}
            kl = distill_kl(logits, teacher, c.temperature)
            loss = loss + (c.distill_weight if c.objective == "ce+distill" else 1.0) * kl
        return loss

    def train_step(self, items: list[Item], step: int) -> float:
        """One optimiser step on the batch ``items`` (mean loss over its tokens). Under torchrun each rank takes
        its slice of the batch and the gradients are summed across ranks (``all_reduce``, as DDP does), so the
        step equals the single-process step on the whole batch."""
        self.model.train()
        if self.encoder_frozen:
            self.model.get_encoder().eval()
        lr = self.lr_at(step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        world = distributed.world()
        mine = items[world.rank::world.size]
        losses = self.token_losses(mine) if mine else torch.zeros(0, device=self.device)
        tokens = distributed.all_sum(torch.tensor(float(losses.numel()), device=self.device))
        loss = losses.sum() / tokens
        loss.backward()
        if world.size > 1:
            for p in self.params.values():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                distributed.all_sum(p.grad)
            loss = distributed.all_sum(loss.detach())
        if self.cfg.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.max_grad_norm)
        self.opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def valid_loss(self, items: list[Item]) -> float:
        """Token-weighted mean loss (the configured objective) over the validation set (eval mode, no dropout)."""
        self.model.eval()
        bs = self.cfg.batch_size
        return token_mean([items[i: i + bs] for i in range(0, len(items), bs)], self.token_losses, self.device)[0]


def token_mean(batches: list, losses: Callable[[Any], torch.Tensor], device: torch.device) -> tuple[float, int]:
    """Token-weighted mean of the per-token ``losses(batch)`` over ``batches``, and the token count. Under
    torchrun each rank takes a share of the batches and the sums are all-reduced (every rank gets the total)."""
    world = distributed.world()
    total, count = 0.0, 0
    for batch in batches[world.rank::world.size]:
        out = losses(batch)
        total += float(out.double().sum())
        count += out.numel()
    total, count = distributed.all_sum(torch.tensor([total, float(count)], dtype=torch.float64,
                                                   device=device)).tolist()
    return total / max(count, 1), int(count)


@torch.no_grad()
def validation_ce(model: nn.Module, processor, utts: list, batch_size: int = 16,
                  encoder_outputs: EncoderOutputs | None = None, quiet: bool = False) -> dict[str, Any]:
    """Teacher-forced cross entropy of ``model`` on the transcripts of ``utts``: the token-weighted mean in eval
    mode, with the prompt and labels fine-tuning uses (:meth:`Trainer.token_losses`' ``ce`` term, whatever a
    fine-tune's objective was), so it compares every model alike, trained or not. One pass in batches of
    ``batch_size``; the encoder outputs come from ``encoder_outputs`` when given (shared with every model whose
    encoder is identical). Returns ``ce``, ``tokens``, ``utterances`` and ``seconds``."""
    if not utts or any(not u.text.strip() for u in utts):
        raise DataError("the validation CE needs a transcript for every validation utterance"
                        + ("" if utts else " (there are none)"))
    t0 = time.perf_counter()
    was = model.training
    model.eval()
    param = next(model.parameters())
    encoder = encoder_fingerprint(model) if encoder_outputs is not None else ""
    bar = tqdm(total=len(utts), desc="validation CE", disable=quiet, unit="utt", leave=False)

    def losses(keyed: tuple[list, str]) -> torch.Tensor:
        batch, key = keyed

        def features() -> torch.Tensor:
            return whisper.input_features(processor, [u.audio for u in batch])

        if encoder_outputs is not None:
            hidden, _ = encoder_outputs.get(model, key, tuple(u.id for u in batch), features)
        else:
            hidden = whisper.encode(model, features().to(param.device, param.dtype))
        logits, targets = teacher_forced_logits(model, processor.tokenizer, [u.text for u in batch], hidden,
                                                encoded=True)
        bar.update(len(batch))
        return cross_entropy(logits, targets)

    try:
        ce, tokens = token_mean(set_batches(encoder, utts, batch_size), losses, param.device)
    finally:
        bar.close()
        model.train(was)
    return {"ce": ce, "tokens": tokens, "utterances": len(utts), "seconds": round(time.perf_counter() - t0, 3)}


# --- the run ---------------------------------------------------------------------------------------------------

def _check(model: nn.Module, cfg: FinetuneConfig, params: dict[str, nn.Parameter], teacher_ref: str | None) -> None:
    if not params:
        raise FinetuneError(f"finetune key 'trainable'={cfg.trainable!r} selects no parameter of this model"
                            + (": it has no converted attention slot; use trainable='decoder' or 'all', or "
                               "convert it first" if cfg.trainable in ("converted", "kv") else ""))
    if cfg.uses_distill and not teacher_ref:
        raise FinetuneError(f"objective {cfg.objective!r} needs the original model as teacher: pass its reference "
                            "(--teacher, or the base model of the experiment)")


def _load_data(cfg: FinetuneConfig, quiet: bool) -> tuple[list, list]:
    from .. import data

    train = data.load(cfg.train, limit=cfg.train_limit, quiet=quiet, lazy=True)  # audio read when encoded
    valid = data.load(cfg.valid, limit=cfg.valid_limit, quiet=quiet, lazy=True)
    for ref, utts in ((cfg.train, train), (cfg.valid, valid)):
        if not utts:
            raise DataError(f"fine-tune data '{ref}' has no utterances")
        if cfg.uses_ce and any(not u.text.strip() for u in utts):
            raise DataError(f"fine-tune data '{ref}': objective {cfg.objective!r} needs a transcript for every "
                            "utterance; use objective 'distill' for audio without transcripts")
    return train, valid


def _distil(trainer: Trainer, teacher_ref: str, processor, data: tuple[list, list], items: tuple[list, list],
            quiet: bool) -> float:
    """Load the teacher, label audio without transcripts with its own greedy transcript, cache its top-k."""
    from .. import model_refs
    from ..evaluate import DecodeSettings, transcribe

    teacher = model_refs.load_model(teacher_ref, device=trainer.device, dtype=trainer.dtype)
    both, both_items = data[0] + data[1], items[0] + items[1]
    missing = [i for i, u in enumerate(both) if not u.text.strip()]
    if missing:  # distillation needs only audio: teacher-force the teacher's own transcript
        texts, _ = transcribe(teacher, processor, [both[i] for i in missing],
                              DecodeSettings(batch_size=trainer.cfg.batch_size), quiet=quiet,
                              desc="teacher transcripts")
        for i, text in zip(missing, texts):
            both_items[i].text = text
    same = fingerprint.of_tensors(teacher.get_encoder()) == fingerprint.of_tensors(trainer.model.get_encoder())
    return trainer.teach(teacher, [(data[0], items[0]), (data[1], items[1])], same, quiet)


def finetune(model: nn.Module, processor, cfg: FinetuneConfig, work_dir: str | Path, teacher_ref: str | None,
             quiet: bool = False, on_step: Callable[[int, float], None] | None = None,
             caches: FinetuneCaches | None = None, resume: bool = True) -> dict[str, Any]:
    """Fine-tune ``model`` in place, keeping the weights with the lowest validation loss; returns provenance
    (config, steps done, best step and loss, initial loss, curve, seconds, data fingerprints).

    ``work_dir`` holds the resumable training state; ``teacher_ref`` names the original model (needed by
    ``distill``). ``on_step(step, train_loss)`` is called after every optimiser step (1-based step).
    ``caches`` shares encoder outputs and teacher top-k with other fine-tunes of the same process.
    ``resume=False`` trains from step 0 even when ``work_dir`` holds a matching state, finished or not (the
    runner's ``--force``); the new run's state replaces it at its first validation.
    """
    quiet = quiet or not distributed.world().is_main
    t_start = time.perf_counter()
    reuse_heap_memory()  # the 51864-wide logits of every step reuse freed memory (see process_memory)

    def log(msg: str) -> None:
        if not quiet:
            tqdm.write(msg)

    params = trainable_parameters(model, cfg.trainable)
    _check(model, cfg, params, teacher_ref)
    state_dir = Path(work_dir) / st.STATE_DIR
    fp = st.start_fingerprint(model, cfg, params)
    meta = st.read_state(state_dir, fp, log) if resume else None
    if not resume and (state_dir / "state.json").exists():
        log(f"fine-tune: starting afresh, not resuming the training state in {state_dir}")
    if meta and meta.get("finished"):
        st.copy_into(params, st.load_tensors(state_dir, "best"))
        log(f"fine-tune: finished earlier (best valid loss {meta['best_valid_loss']:.4f} at step "
            f"{meta['best_step']}); loaded its best weights from {state_dir}")
        model.eval()
        return meta["provenance"]

    encoder_ids = {id(p) for p in model.get_encoder().parameters()}
    encoder_frozen = not any(id(p) in encoder_ids for p in params.values())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    own = caches is None
    caches = caches or FinetuneCaches(directory=Path(work_dir) / "inputs")
    trainer = Trainer(model, processor, cfg, params, encoder_frozen, caches)
    try:
        train_utts, valid_utts = _load_data(cfg, quiet)
        n_params = sum(p.numel() for p in params.values())
        log(f"fine-tune: {cfg.objective}, trainable={cfg.trainable} ({n_params:,} parameters in {len(params)} "
            f"tensors), {len(train_utts)} train / {len(valid_utts)} valid utterances, encoder "
            f"{'frozen (outputs cached)' if encoder_frozen else 'training'}")
        what = "encoding" if encoder_frozen else "features"
        train = trainer.prepare(train_utts, f"{what} train", quiet)
        valid = trainer.prepare(valid_utts, f"{what} valid", quiet)
        topk_mass = (_distil(trainer, teacher_ref, processor, (train_utts, valid_utts), (train, valid), quiet)
                     if cfg.uses_distill else None)
        run = _Run(trainer, state_dir, fp, meta, t_start, log)
        run.train(train, valid, on_step, quiet)
        provenance = {
            "config": asdict(cfg), "steps_done": run.step, "best_step": run.best_step,
            "best_valid_loss": run.best_loss, "initial_valid_loss": run.initial, "curve": run.curve,
            "seconds": round(run.seconds(), 3), "stopped_early": run.stopped_early,
            "resumed_from_step": run.resumed_from, "trainable_parameters": n_params,
            "encoder_cached": encoder_frozen,
            "train_data": _data_record(cfg.train, train_utts), "valid_data": _data_record(cfg.valid, valid_utts),
            "teacher": teacher_ref if cfg.uses_distill else None, "teacher_topk_mass": topk_mass,
        }
        run.save(True, provenance)
        log(f"fine-tune: valid loss {run.initial:.4f} -> {run.best_loss:.4f} (best at step {run.best_step} of "
            f"{run.step}), {provenance['seconds']:.0f} s")
        return provenance
    finally:
        if own:
            caches.close()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.eval()


def _data_record(ref: str, utts: list) -> dict[str, Any]:
    from ..data import fingerprint_of

    return {"ref": ref, "utterances": len(utts), "fingerprint": fingerprint_of(utts)}


class _Run:
    """Steps, validations, best weights and the saved state of one fine-tuning run (fresh or resumed)."""

    def __init__(self, trainer: Trainer, state_dir: Path, fp: str, meta: dict | None, t_start: float,
                 log: Callable[[str], None]):
        self.t, self.state_dir, self.fp, self.meta, self.t_start, self.log = trainer, state_dir, fp, meta, t_start, log
        self.step, self.curve, self.bad, self.seconds_before = 0, [], 0, 0.0
        self.resumed_from: int | None = None
        self.stopped_early = False

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.t_start

    def start(self, valid: list[Item]) -> None:
        t, meta = self.t, self.meta
        if meta:
            st.copy_into(t.params, st.load_tensors(self.state_dir, "params"))
            st.load_optimizer_tensors(t.opt, t.params, st.load_tensors(self.state_dir, "optimizer"), t.device)
            st.restore_rng(self.state_dir)
            self.best = st.load_tensors(self.state_dir, "best")
            self.step, self.curve, self.bad = meta["step"], meta["curve"], meta["bad_evals"]
            self.best_step, self.best_loss, self.initial = meta["best_step"], meta["best_valid_loss"], \
                meta["initial_valid_loss"]
            self.seconds_before = meta["seconds"]
            self.resumed_from = self.step
            self.stopped_early = bool(t.cfg.patience and self.bad >= t.cfg.patience)
            self.log(f"fine-tune: resuming from step {self.step} (state in {self.state_dir})")
        else:
            torch.manual_seed(t.cfg.seed)
            self.initial = self.best_loss = t.valid_loss(valid)
            self.best_step, self.best = 0, st.snapshot(t.params)
            self.curve = [{"step": 0, "train_loss": None, "valid_loss": self.initial, "lr": t.lr_at(0)}]
            self.save(False)

    def save(self, finished: bool, provenance: dict | None = None) -> None:
        m = {"format": st.STATE_FORMAT, "fingerprint": self.fp, "step": self.step, "finished": finished,
             "best_step": self.best_step, "best_valid_loss": self.best_loss, "initial_valid_loss": self.initial,
             "bad_evals": self.bad, "curve": self.curve, "seconds": self.seconds(), "provenance": provenance}
        if distributed.world().is_main:  # one writer; the others wait until the state is on disk
            st.save_state(self.state_dir, m, st.snapshot(self.t.params), self.best,
                          st.optimizer_tensors(self.t.opt, self.t.params))
        distributed.barrier()

    def validate(self, valid: list[Item], losses: list[float], lr: float) -> None:
        v = self.t.valid_loss(valid)
        self.curve.append({"step": self.step, "train_loss": sum(losses) / len(losses), "valid_loss": v, "lr": lr})
        if v < self.best_loss:
            self.best_loss, self.best_step, self.best, self.bad = v, self.step, st.snapshot(self.t.params), 0
        else:
            self.bad += 1
            self.stopped_early = bool(self.t.cfg.patience and self.bad >= self.t.cfg.patience)
        self.save(False)

    def train(self, train: list[Item], valid: list[Item], on_step: Callable[[int, float], None] | None,
              quiet: bool) -> None:
        t, cfg = self.t, self.t.cfg
        self.start(valid)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="fine-tuning", disable=quiet, unit="step")
        losses: list[float] = []
        try:
            while self.step < cfg.steps and not self.stopped_early:
                loss = t.train_step([train[i] for i in t.batch_indices(self.step, len(train))], self.step)
                if not math.isfinite(loss):
                    raise FinetuneError(f"training loss became {loss} at step {self.step + 1} (lr "
                                        f"{t.lr_at(self.step)}); lower finetune.lr or raise warmup_steps")
                lr = t.lr_at(self.step)
                self.step += 1
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", best=f"{self.best_loss:.4f}")
                if on_step is not None:
                    on_step(self.step, loss)
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    self.validate(valid, losses, lr)
                    losses = []
        finally:
            bar.close()
        if self.stopped_early:
            self.log(f"fine-tune: stopped early at step {self.step}: no improvement in {cfg.patience} validations")
        st.copy_into(t.params, self.best)
