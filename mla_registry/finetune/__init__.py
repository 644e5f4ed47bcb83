"""Recovery fine-tuning of a converted model: cross-entropy on transcripts, distillation from the original model
(KL to its teacher-forced logits), or their weighted sum; validation loss, early stopping, best weights kept,
resumable training state. One implementation serves ``mla-registry finetune`` and the ``finetune:`` block of
experiments.yaml.

- :mod:`.config`: :class:`FinetuneConfig` (YAML block and CLI options from one definition)
- :mod:`.trainable`: which parameters train
- :mod:`.objectives`: cross-entropy, top-k distillation
- :mod:`.loop`: cached inputs, steps, validation, early stopping; :func:`finetune`; :func:`validation_ce` (the
  teacher-forced cross entropy a run reports for every variant, trained or not)
- :mod:`.state`: the resumable state on disk
"""

from .config import DECAYS, OBJECTIVES, TRAINABLE, FinetuneConfig
from .loop import FinetuneCaches, FinetuneError, finetune, validation_ce
from .objectives import distill_kl, topk_teacher
from .state import STATE_DIR
from .trainable import trainable_parameters

__all__ = ["DECAYS", "OBJECTIVES", "STATE_DIR", "TRAINABLE", "FinetuneCaches", "FinetuneConfig", "FinetuneError",
           "distill_kl", "finetune", "topk_teacher", "trainable_parameters", "validation_ce"]
