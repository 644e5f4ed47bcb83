"""Recovery fine-tuning of a converted model: cross-entropy on transcripts, distillation from the original model
(KL to its teacher-forced logits), or their weighted sum; validation loss, early stopping, best weights kept,
resumable training state.

One implementation serves ``mla-registry finetune`` and the ``finetune:`` block of experiments.yaml. The loop is
written here rather than with transformers' ``Trainer``: the Trainer needs ``accelerate`` (not a dependency of
this package), pickles optimizer/RNG state with ``torch.save``, and feeds ``input_features`` to the whole model
every step, while the point of freezing the encoder is to feed cached encoder outputs instead. The loop below is
short, deterministic (data order is a pure function of seed and step), and resumes to bit-identical weights.

Caching:

- encoder frozen (no trainable parameter in the encoder, the usual case): the encoder runs once per utterance
  and its outputs are reused by every step and epoch (``utterances x frames x d_model`` floats in memory:
  about 2.3 MB per utterance for tiny.en); otherwise log-mel features are cached and the encoder trains.
- teacher: for ``distill`` the original model runs once over every utterance, teacher-forced on its transcript,
  and only the top ``distill_topk`` log-probabilities per token are kept, plus the log of the remaining mass. Full
  logits would cost ``51864 x tokens x 4`` bytes (about 3 GB for 600 sentences); the top 64 cost a few MB and
  held 97 % of tiny.en's probability mass on builtin:tts-train. The KL is taken over the top-k classes plus one
  bucket for the rest of the vocabulary (exact when the top-k hold all the mass, a lower bound of the full KL
  otherwise; the mean kept mass is recorded as ``teacher_topk_mass``). The teacher is then released and no step
  pays for its forward pass.

Training state lives in ``work_dir/state`` (safetensors + JSON, no pickle), written atomically after every
validation: current and best trainable weights, AdamW moments, the torch RNG, the curve. A rerun with the same
configuration and the same starting model continues from the last validation; a finished run is not repeated.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .cache import atomic_dir
from .errors import DataError, KwargError, MlaRegistryError
from .families import whisper
from .surgery import SLOTS_ATTR

OBJECTIVES = ("ce", "distill", "ce+distill")
TRAINABLE = ("converted", "kv", "attention", "decoder", "all")
DECAYS = ("cosine", "linear", "constant")
STATE_DIR = "state"
STATE_FORMAT = 1


class FinetuneError(MlaRegistryError):
    """Fine-tuning cannot run as configured (nothing to train, no teacher for distillation, ...)."""


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# name -> (type test, type words, value check returning an error or None)
_SCHEMA: dict[str, tuple[Callable[[Any], bool], str, Callable[[Any], str | None]]] = {
    "train": (lambda v: isinstance(v, str), "a dataset reference (string)",
              lambda v: None if v.strip() else "must not be empty"),
    "valid": (lambda v: isinstance(v, str), "a dataset reference (string)",
              lambda v: None if v.strip() else "must not be empty"),
    "objective": (lambda v: isinstance(v, str), "a string",
                  lambda v: None if v in OBJECTIVES else f"allowed values: {', '.join(OBJECTIVES)}"),
    "distill_weight": (_num, "a number", lambda v: None if v >= 0 else "must be >= 0"),
    "trainable": (lambda v: isinstance(v, str), "a string",
                  lambda v: None if v in TRAINABLE else f"allowed values: {', '.join(TRAINABLE)}"),
    "steps": (_int, "an integer", lambda v: None if v >= 1 else "must be >= 1"),
    "batch_size": (_int, "an integer", lambda v: None if v >= 1 else "must be >= 1"),
    "lr": (_num, "a number", lambda v: None if v > 0 else "must be > 0"),
    "warmup_steps": (_int, "an integer", lambda v: None if v >= 0 else "must be >= 0"),
    "decay": (lambda v: isinstance(v, str), "a string",
              lambda v: None if v in DECAYS else f"allowed values: {', '.join(DECAYS)}"),
    "weight_decay": (_num, "a number", lambda v: None if v >= 0 else "must be >= 0"),
    "eval_every": (_int, "an integer", lambda v: None if v >= 1 else "must be >= 1"),
    "patience": (_int, "an integer", lambda v: None if v >= 0 else "must be >= 0 (0: no early stopping)"),
    "max_grad_norm": (_num, "a number", lambda v: None if v >= 0 else "must be >= 0 (0: no clipping)"),
    "seed": (_int, "an integer", lambda v: None if v >= 0 else "must be >= 0"),
    "train_limit": (lambda v: v is None or _int(v), "an integer or null",
                    lambda v: None if v is None or v >= 1 else "must be >= 1 (or null for all)"),
    "valid_limit": (lambda v: v is None or _int(v), "an integer or null",
                    lambda v: None if v is None or v >= 1 else "must be >= 1 (or null for all)"),
    "temperature": (_num, "a number", lambda v: None if v > 0 else "must be > 0"),
    "distill_topk": (_int, "an integer", lambda v: None if v >= 1 else "must be >= 1"),
}


@dataclass
class FinetuneConfig:
    """What to fine-tune, on what, and how. ``from_mapping`` reads the ``finetune:`` block of experiments.yaml.

    trainable: ``converted`` (every parameter of the converted attention modules), ``kv`` (those modules minus
    their ``q_proj``/``out_proj``: the factorised or pooled key/value projections), ``attention`` (every decoder
    attention module, plus converted slots), ``decoder`` (the whole decoder, plus converted slots), ``all``.
    Parameters the model itself keeps frozen (Whisper's sinusoidal encoder positions) stay frozen.
    """

    train: str  # dataset ref, default from the experiment's data.train
    valid: str  # dataset ref, default from data.valid
    objective: str = "distill"  # "ce" | "distill" | "ce+distill"
    distill_weight: float = 1.0  # weight of the KL in ce+distill (ce weight 1)
    trainable: str = "converted"
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 20  # linear warm-up from lr/warmup_steps to lr
    weight_decay: float = 0.0
    eval_every: int = 25  # validation every N steps (and at step 0 and at the end)
    patience: int = 4  # stop after this many validations without improvement (0: never stop early)
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 0
    train_limit: int | None = None
    valid_limit: int | None = None
    temperature: float = 1.0  # distillation temperature (the KL is scaled by T^2)
    distill_topk: int = 64  # teacher log-probabilities kept per token (+ one bucket for the rest)
    decay: str = "cosine"  # after warm-up: "cosine" | "linear" (to 0 at `steps`) | "constant"

    def __post_init__(self) -> None:
        problems = _problems({f.name: getattr(self, f.name) for f in fields(self)})
        if problems:
            raise KwargError("; ".join(problems))

    @property
    def uses_ce(self) -> bool:
        return self.objective in ("ce", "ce+distill")

    @property
    def uses_distill(self) -> bool:
        return self.objective in ("distill", "ce+distill")

    @classmethod
    def from_mapping(cls, block: Mapping[str, Any] | None, defaults: Mapping[str, Any] | None = None
                     ) -> FinetuneConfig:
        """A config from a YAML mapping; ``defaults`` is the experiment's ``data:`` mapping (train/valid refs).
        Unknown keys, wrong types and bad values raise :class:`KwargError` naming every key at fault."""
        block = {} if block is None else block
        if not isinstance(block, Mapping):
            raise KwargError(f"finetune must be a mapping of options ({', '.join(_SCHEMA)}), "
                             f"got {type(block).__name__}")
        values: dict[str, Any] = {}
        problems = [f"unknown finetune key '{k}'; allowed: {', '.join(_SCHEMA)}" for k in block if k not in _SCHEMA]
        for k, v in block.items():
            if k in _SCHEMA:
                if _SCHEMA[k][0] is _num and isinstance(v, str):  # YAML reads 3e-4 as a string
                    try:
                        v = float(v)
                    except ValueError:
                        pass
                values[k] = v
        for key in ("train", "valid"):
            if key not in values:
                default = (defaults or {}).get(key)
                if default:
                    values[key] = default
                else:
                    problems.append(f"finetune key '{key}' is missing: set data.{key} (shared by every variant) "
                                    f"or finetune.{key} to a dataset reference, e.g. builtin:tts-{key}")
        problems += _problems(values)
        if problems:
            raise KwargError("; ".join(problems))
        return cls(**values)


def _problems(values: Mapping[str, Any]) -> list[str]:
    out = []
    for k, v in values.items():
        test, words, check = _SCHEMA[k]
        if not test(v):
            out.append(f"finetune key '{k}' must be {words}, got {type(v).__name__} {v!r}")
            continue
        msg = check(v)
        if msg:
            out.append(f"finetune key '{k}'={v!r}: {msg}")
    return out


# --- what trains --------------------------------------------------------------------------------------------

def trainable_parameters(model: nn.Module, mode: str) -> dict[str, nn.Parameter]:
    """The parameters ``mode`` trains, by name (see :class:`FinetuneConfig`), in ``named_parameters`` order.
    Parameters that already have ``requires_grad=False`` are never selected."""
    if mode not in TRAINABLE:
        raise KwargError(f"finetune key 'trainable'={mode!r}: allowed values: {', '.join(TRAINABLE)}")
    converted = [r["path"] + "." for r in getattr(model, SLOTS_ATTR, [])]
    decoder_attn = [s.path + "." for s in whisper.slots(model) if s.kind.startswith("decoder")]
    decoder_ids = {id(p) for p in model.get_decoder().parameters()}

    def chosen(name: str, p: nn.Parameter) -> bool:
        in_converted = name.startswith(tuple(converted)) if converted else False
        if mode == "converted":
            return in_converted
        if mode == "kv":
            if not in_converted:
                return False
            rest = name[len(next(c for c in converted if name.startswith(c))):]
            return not rest.startswith(("q_proj.", "out_proj."))
        if mode == "attention":
            return in_converted or name.startswith(tuple(decoder_attn))
        if mode == "decoder":
            return in_converted or id(p) in decoder_ids
        return True

    return {n: p for n, p in model.named_parameters() if p.requires_grad and chosen(n, p)}


# --- the loss -----------------------------------------------------------------------------------------------

def topk_teacher(logits: torch.Tensor, k: int, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Top-``k`` teacher log-probabilities ``[N, k]``, their class ids, and the log of the remaining mass."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    k = min(k, logp.shape[-1])
    values, indices = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, indices, float("-inf"))
    return {"logp": values, "ids": indices.to(torch.int32), "log_tail": torch.logsumexp(rest, dim=-1)}


def distill_kl(student_logits: torch.Tensor, teacher: Mapping[str, torch.Tensor],
               temperature: float = 1.0) -> torch.Tensor:
    """Per-token ``KL(teacher || student)`` ``[N]`` over the teacher's top-k classes plus one bucket holding the
    rest of the vocabulary, times ``T^2``. Equal to the full KL when the teacher's top-k hold all its mass."""
    logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    ids = teacher["ids"].long()
    s_top = logp.gather(-1, ids)
    s_tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
    t_top, t_tail = teacher["logp"], teacher["log_tail"]
    kl = (t_top.exp() * (t_top - s_top)).sum(-1)
    tail = torch.where(torch.isfinite(t_tail), t_tail.exp() * (t_tail - s_tail), torch.zeros_like(t_tail))
    return (kl + tail) * temperature**2


def _logits(model: nn.Module, src: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, encoded: bool
            ) -> torch.Tensor:
    """Teacher-forced logits ``[N, vocab]`` at the ``mask`` positions only (row-major order): the vocabulary
    projection, the largest matmul of a step, skips the padding. ``src`` is the encoder output when ``encoded``,
    else log-mel features."""
    inputs = {"encoder_outputs": (src,)} if encoded else {"input_features": src}
    hidden = model.base_model(**inputs, decoder_input_ids=ids, use_cache=False).last_hidden_state
    return model.get_output_embeddings()(hidden[mask])


@dataclass
class _Item:
    """One utterance, ready for teacher forcing: encoder output (or features), transcript, teacher top-k."""

    source: torch.Tensor
    text: str
    teacher: dict[str, torch.Tensor] | None = None


# Encoder outputs and teacher top-k per (encoder, data, settings), shared by the fine-tuned variants of one process
# (an experiment fine-tunes several variants of one base model on the same data: encode and distil once).
_SHARED: dict[tuple, list] = {}


class _Trainer:
    """The state and steps of one fine-tuning run (internal; :func:`finetune` is the entry point)."""

    def __init__(self, model: nn.Module, processor, cfg: FinetuneConfig, params: dict[str, nn.Parameter],
                 encoder_frozen: bool):
        self.model, self.processor, self.cfg, self.params = model, processor, cfg, params
        self.encoder_frozen = encoder_frozen
        ref = next(model.parameters())
        self.device, self.dtype = ref.device, ref.dtype
        self.opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self._perms: dict[int, list[int]] = {}

    # -- inputs
    @torch.no_grad()
    def prepare(self, utts, desc: str, quiet: bool) -> list[_Item]:
        """Features (or encoder outputs, when the encoder is frozen) once per utterance; encoder outputs are
        shared with later runs in this process whose encoder weights (by hash) and data are the same."""
        from .data import fingerprint_of
        from .evaluate import encoder_fingerprint

        key = ("encoded" if self.encoder_frozen else "features",
               encoder_fingerprint(self.model) if self.encoder_frozen else "", fingerprint_of(utts),
               self.cfg.batch_size, str(self.device), str(self.dtype))
        if key in _SHARED:
            return [_Item(src, text) for src, text in _SHARED[key]]
        items: list[_Item] = []
        was = self.model.training
        self.model.eval()
        bs = self.cfg.batch_size
        for i in tqdm(range(0, len(utts), bs), desc=desc, disable=quiet, unit="batch", leave=False):
            batch = utts[i: i + bs]
            feats = whisper.input_features(self.processor, [u.audio for u in batch], self.device, self.dtype)
            src = self.model.get_encoder()(feats).last_hidden_state if self.encoder_frozen else feats
            items += [_Item(src[j].clone(), u.text) for j, u in enumerate(batch)]
        self.model.train(was)
        _SHARED[key] = [(it.source, it.text) for it in items]
        return items

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

    def token_losses(self, items: list[_Item]) -> torch.Tensor:
        """Per-token loss ``[N]`` of a batch under the configured objective."""
        c = self.cfg
        ids, labels, mask = whisper.teacher_forcing(self.model, self.processor.tokenizer,
                                                    [it.text for it in items], self.device)
        src = torch.stack([it.source for it in items]).to(self.device)
        logits = _logits(self.model, src, ids, mask, encoded=self.encoder_frozen)
        loss = torch.zeros(logits.shape[0], device=logits.device)
        if c.uses_ce:
            loss = loss + F.cross_entropy(logits.float(), labels[mask], reduction="none")
        if c.uses_distill:
            teacher = {k: torch.cat([it.teacher[k] for it in items]).to(self.device) for k in items[0].teacher}
            kl = distill_kl(logits, teacher, c.temperature)
            loss = loss + (c.distill_weight if c.objective == "ce+distill" else 1.0) * kl
        return loss

    def train_step(self, items: list[_Item], step: int) -> float:
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
    def valid_loss(self, items: list[_Item]) -> float:
        """Token-weighted mean loss over the validation set (eval mode, no dropout)."""
        self.model.eval()
        total, count = 0.0, 0
        batches = list(range(0, len(items), self.cfg.batch_size))
        for i in batches[distributed.world().rank::distributed.world().size]:  # under torchrun: a share each
            losses = self.token_losses(items[i: i + self.cfg.batch_size])
            total += float(losses.double().sum())
            count += losses.numel()
        total, count = distributed.all_sum(torch.tensor([total, float(count)], dtype=torch.float64,
                                                       device=self.device)).tolist()
        return total / max(count, 1)

    # -- state on disk
    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        state = self.opt.state_dict()["state"]
        out = {}
        for idx, name in enumerate(self.params):
            for key, value in state.get(idx, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                out[f"{name}::{key}"] = t.detach().cpu().clone().contiguous()
        return out

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        sd = self.opt.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for idx, name in enumerate(self.params):
            entries = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == name}
            if entries:
                state[idx] = {k: (v if k == "step" else v.to(self.device)) for k, v in entries.items()}
        sd["state"] = state
        self.opt.load_state_dict(sd)


def _weights_hash(model: nn.Module, cfg: FinetuneConfig, params: dict[str, nn.Parameter]) -> str:
    """Identifies the starting point: the config, the converted slots, what trains, and every starting weight."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": asdict(cfg), "slots": getattr(model, SLOTS_ATTR, []),
                         "trainable": list(params)}, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def _save_state(state_dir: Path, meta: dict[str, Any], current: dict[str, torch.Tensor],
                best: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor]) -> None:
    with atomic_dir(state_dir) as tmp:
        safetensors.torch.save_file(current, str(tmp / "params.safetensors"))
        safetensors.torch.save_file(best, str(tmp / "best.safetensors"))
        safetensors.torch.save_file(optimizer, str(tmp / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        safetensors.torch.save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _read_state(state_dir: Path, fingerprint: str, log: Callable[[str], None]) -> dict[str, Any] | None:
    path = state_dir / "state.json"
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log(f"fine-tune: ignoring unreadable training state {path} ({exc}); starting afresh")
        return None
    if meta.get("format") != STATE_FORMAT or meta.get("fingerprint") != fingerprint:
        log(f"fine-tune: training state in {state_dir} belongs to another configuration or starting model; "
            "starting afresh")
        return None
    return meta


def _copy_into(params: dict[str, nn.Parameter], values: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(values[name])


def _snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone().contiguous() for n, p in params.items()}


def _teacher_cache(trainer: _Trainer, teacher: nn.Module, sets: list[tuple[list, list[_Item]]], same_encoder: bool,
                   quiet: bool) -> float:
    """Fill every item's teacher top-k (teacher-forced on its transcript); returns the mean teacher mass kept.
    The teacher reuses the cached encoder outputs when its encoder is identical to the model's frozen one."""
    from .evaluate import state_fingerprint

    cfg, proc = trainer.cfg, trainer.processor
    key = ("teacher", state_fingerprint(teacher),
           tuple(it.text for _, items in sets for it in items), cfg.distill_topk, cfg.temperature, cfg.batch_size)
    if key in _SHARED:
        kept_mass, tops = _SHARED[key]
        for it, top in zip([it for _, items in sets for it in items], tops):
            it.teacher = top
        return kept_mass
    kept, count = 0.0, 0
    teacher.eval()
    with torch.no_grad():
        for utts, items in sets:
            for i in tqdm(range(0, len(items), cfg.batch_size), desc="teacher logits", disable=quiet,
                          unit="batch", leave=False):
                batch = items[i: i + cfg.batch_size]
                ids, _, mask = whisper.teacher_forcing(teacher, proc.tokenizer, [it.text for it in batch],
                                                       trainer.device)
                if trainer.encoder_frozen and same_encoder:
                    hidden = torch.stack([it.source for it in batch]).to(trainer.device)
                else:
                    feats = whisper.input_features(proc, [u.audio for u in utts[i: i + cfg.batch_size]],
                                                   trainer.device, trainer.dtype)
                    hidden = teacher.get_encoder()(feats).last_hidden_state
                logits = _logits(teacher, hidden, ids, mask, encoded=True)
                starts = [0, *mask.sum(-1).cumsum(0).tolist()]
                for j, it in enumerate(batch):
                    t = topk_teacher(logits[starts[j]: starts[j + 1]], cfg.distill_topk, cfg.temperature)
                    it.teacher = {k: v.cpu() for k, v in t.items()}
                    kept += float(t["logp"].exp().sum(-1).double().sum())
                    count += t["logp"].shape[0]
    _SHARED[key] = (kept / max(count, 1), [it.teacher for _, items in sets for it in items])
    return kept / max(count, 1)


def finetune(model: nn.Module, processor, cfg: FinetuneConfig, work_dir: str | Path, teacher_ref: str | None,
             quiet: bool = False, on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` in place, keeping the weights with the lowest validation loss; returns provenance
    (config, steps done, best step and loss, initial loss, curve, seconds, data fingerprints).

    ``work_dir`` holds the resumable training state; ``teacher_ref`` names the original model (needed by
    ``distill``). ``on_step(step, train_loss)`` is called after every optimiser step (1-based step).
    """
    from . import data, models
    from .evaluate import encoder_fingerprint

    quiet = quiet or not distributed.world().is_main

    t_start = time.perf_counter()

    def log(msg: str) -> None:
        if not quiet:
            tqdm.write(msg)

    params = trainable_parameters(model, cfg.trainable)
    if not params:
        raise FinetuneError(f"finetune key 'trainable'={cfg.trainable!r} selects no parameter of this model"
                            + (": it has no converted attention slot; use trainable='decoder' or 'all', or "
                               "convert it first" if cfg.trainable in ("converted", "kv") else ""))
    if cfg.uses_distill and not teacher_ref:
        raise FinetuneError(f"objective {cfg.objective!r} needs the original model as teacher: pass its reference "
                            "(--teacher, or the base model of the experiment)")
    work_dir = Path(work_dir)
    state_dir = work_dir / STATE_DIR
    fingerprint = _weights_hash(model, cfg, params)
    meta = _read_state(state_dir, fingerprint, log)
    if meta and meta.get("finished"):
        _copy_into(params, safetensors.torch.load_file(str(state_dir / "best.safetensors")))
        log(f"fine-tune: finished earlier (best valid loss {meta['best_valid_loss']:.4f} at step "
            f"{meta['best_step']}); loaded its best weights from {state_dir}")
        model.eval()
        return meta["provenance"]

    encoder_ids = {id(p) for p in model.get_encoder().parameters()}
    encoder_frozen = not any(id(p) in encoder_ids for p in params.values())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    trainer = _Trainer(model, processor, cfg, params, encoder_frozen)
    try:
        train_utts = data.load(cfg.train, limit=cfg.train_limit, quiet=quiet)
        valid_utts = data.load(cfg.valid, limit=cfg.valid_limit, quiet=quiet)
        for ref, utts in ((cfg.train, train_utts), (cfg.valid, valid_utts)):
            if not utts:
                raise DataError(f"fine-tune data '{ref}' has no utterances")
            if cfg.uses_ce and any(not u.text.strip() for u in utts):
                raise DataError(f"fine-tune data '{ref}': objective {cfg.objective!r} needs a transcript for "
                                "every utterance; use objective 'distill' for audio without transcripts")
        n_params = sum(p.numel() for p in params.values())
        log(f"fine-tune: {cfg.objective}, trainable={cfg.trainable} ({n_params:,} parameters in {len(params)} "
            f"tensors), {len(train_utts)} train / {len(valid_utts)} valid utterances, encoder "
            f"{'frozen (outputs cached)' if encoder_frozen else 'training'}")
        train = trainer.prepare(train_utts, "encoding train" if encoder_frozen else "features train", quiet)
        valid = trainer.prepare(valid_utts, "encoding valid" if encoder_frozen else "features valid", quiet)
        topk_mass = None
        if cfg.uses_distill:
            teacher = models.load_model(teacher_ref, device=trainer.device, dtype=trainer.dtype)
            missing = [i for i, u in enumerate(train_utts + valid_utts) if not u.text.strip()]
            if missing:  # distillation needs only audio: teacher-force the teacher's own transcript
                from .evaluate import DecodeSettings, transcribe

                both = train_utts + valid_utts
                texts, _ = transcribe(teacher, processor, [both[i] for i in missing],
                                      DecodeSettings(batch_size=cfg.batch_size), quiet=quiet,
                                      desc="teacher transcripts")
                for i, text in zip(missing, texts):
                    (train + valid)[i].text = text
            same = encoder_fingerprint(teacher) == encoder_fingerprint(model)
            topk_mass = _teacher_cache(trainer, teacher, [(train_utts, train), (valid_utts, valid)], same, quiet)
            del teacher

        step, curve, bad, seconds_before = 0, [], 0, 0.0
        resumed_from = None
        if meta:
            _copy_into(params, safetensors.torch.load_file(str(state_dir / "params.safetensors")))
            trainer.load_optimizer_tensors(safetensors.torch.load_file(str(state_dir / "optimizer.safetensors")))
            rng = safetensors.torch.load_file(str(state_dir / "rng.safetensors"))
            torch.set_rng_state(rng["torch"])
            if torch.cuda.is_available() and "cuda0" in rng:
                torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count())
                                              if f"cuda{i}" in rng])
            best = safetensors.torch.load_file(str(state_dir / "best.safetensors"))
            step, curve, bad = meta["step"], meta["curve"], meta["bad_evals"]
            best_step, best_loss, initial = meta["best_step"], meta["best_valid_loss"], meta["initial_valid_loss"]
            seconds_before = meta["seconds"]
            resumed_from = step
            log(f"fine-tune: resuming from step {step} (state in {state_dir})")
        else:
            torch.manual_seed(cfg.seed)
            initial = best_loss = trainer.valid_loss(valid)
            best_step, best = 0, _snapshot(params)
            curve = [{"step": 0, "train_loss": None, "valid_loss": initial, "lr": trainer.lr_at(0)}]

        def save(finished: bool, provenance: dict | None = None) -> None:
            m = {"format": STATE_FORMAT, "fingerprint": fingerprint, "step": step, "finished": finished,
                 "best_step": best_step, "best_valid_loss": best_loss, "initial_valid_loss": initial,
                 "bad_evals": bad, "curve": curve, "seconds": seconds_before + time.perf_counter() - t_start,
                 "provenance": provenance}
            if distributed.world().is_main:  # one writer; the others wait until the state is on disk
                _save_state(state_dir, m, _snapshot(params), best, trainer.optimizer_tensors())
            distributed.barrier()

        if not meta:
            save(False)
        stopped_early = bool(meta and cfg.patience and bad >= cfg.patience)
        bar = tqdm(total=cfg.steps, initial=step, desc="fine-tuning", disable=quiet, unit="step")
        losses: list[float] = []
        try:
            while step < cfg.steps and not stopped_early:
                batch = [train[i] for i in trainer.batch_indices(step, len(train))]
                loss = trainer.train_step(batch, step)
                if not math.isfinite(loss):
                    raise FinetuneError(f"training loss became {loss} at step {step + 1} (lr {trainer.lr_at(step)}"
                                        "); lower finetune.lr or raise warmup_steps")
                lr = trainer.lr_at(step)
                step += 1
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", best=f"{best_loss:.4f}")
                if on_step is not None:
                    on_step(step, loss)
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    v = trainer.valid_loss(valid)
                    curve.append({"step": step, "train_loss": sum(losses) / len(losses), "valid_loss": v, "lr": lr})
                    losses = []
                    if v < best_loss:
                        best_loss, best_step, best, bad = v, step, _snapshot(params), 0
                    else:
                        bad += 1
                        stopped_early = bool(cfg.patience and bad >= cfg.patience)
                    bar.set_postfix(loss=f"{loss:.4f}", valid=f"{v:.4f}", best=f"{best_loss:.4f}")
                    save(False)
        finally:
            bar.close()
        if stopped_early:
            log(f"fine-tune: stopped early at step {step}: no improvement in {cfg.patience} validations")
        _copy_into(params, best)
        provenance = {
            "config": asdict(cfg), "steps_done": step, "best_step": best_step, "best_valid_loss": best_loss,
            "initial_valid_loss": initial, "curve": curve,
            "seconds": round(seconds_before + time.perf_counter() - t_start, 3),
            "stopped_early": stopped_early, "resumed_from_step": resumed_from,
            "trainable_parameters": n_params, "encoder_cached": encoder_frozen,
            "train_data": {"ref": cfg.train, "utterances": len(train_utts),
                           "fingerprint": data.fingerprint_of(train_utts)},
            "valid_data": {"ref": cfg.valid, "utterances": len(valid_utts),
                           "fingerprint": data.fingerprint_of(valid_utts)},
            "teacher": teacher_ref if cfg.uses_distill else None,
            "teacher_topk_mass": topk_mass,
        }
        save(True, provenance)
        log(f"fine-tune: valid loss {initial:.4f} -> {best_loss:.4f} (best at step {best_step} of {step}), "
            f"{provenance['seconds']:.0f} s")
        return provenance
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.eval()
