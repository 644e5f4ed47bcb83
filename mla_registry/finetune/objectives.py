"""The losses: cross-entropy on transcripts, and distillation from the original model's teacher-forced logits,
kept as top-k log-probabilities per token.

Full teacher logits would cost ``51864 x tokens x 4`` bytes (about 3 GB for 600 sentences); the top 64 cost a
few MB and held 97 % of tiny.en's probability mass on builtin:tts-train. The KL is taken over the top-k classes
plus one bucket for the rest of the vocabulary (exact when the top-k hold all the mass, a lower bound of the full
KL otherwise; the mean kept mass is recorded as ``teacher_topk_mass``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import whisper


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


def masked_logits(model: nn.Module, src: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, encoded: bool
                  ) -> torch.Tensor:
    """Teacher-forced logits ``[N, vocab]`` at the ``mask`` positions only (row-major order): the vocabulary
    projection, the largest matmul of a step, skips the padding. ``src`` is the encoder output when ``encoded``,
    else log-mel features."""
    inputs = {"encoder_outputs": (src,)} if encoded else {"input_features": src}
    hidden = model.base_model(**inputs, decoder_input_ids=ids, use_cache=False).last_hidden_state
    return model.get_output_embeddings()(hidden[mask])


def teacher_forced_logits(model: nn.Module, tokenizer, texts: list[str], src: torch.Tensor, encoded: bool
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, vocab]`` at the label positions of the transcripts ``texts`` (prompt + text + eos, as
    :func:`~mla_registry.whisper.teacher_forcing` builds them) and their target tokens ``[N]``; ``src`` as in
    :func:`masked_logits`. Training, the fine-tune's validation and the run's validation CE all start here."""
    ids, labels, mask = whisper.teacher_forcing(model, tokenizer, texts, src.device)
    return masked_logits(model, src, ids, mask, encoded), labels[mask]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy ``[N]`` (in float32 whatever the model's dtype)."""
    return F.cross_entropy(logits.float(), targets, reduction="none")
