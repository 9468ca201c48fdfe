"""attnlib.training: optimizer, train/eval steps, checkpoints and the loop.

* ``make_optimizer`` / ``make_schedule`` / ``weight_decay_mask`` (optim):
  optax AdamW with warmup-cosine learning rate, global-norm clipping, decay on
  matrices only.
* ``lm_loss``, ``train_step`` / ``make_train_step``, ``eval_step`` /
  ``make_eval_step``, ``evaluate``, ``cast_params`` (steps): next-token
  cross-entropy, ``nnx.jit`` steps, pure-bfloat16 parameters.
* ``Checkpointer`` (checkpoint): orbax ``CheckpointManager`` of model and
  optimizer state, step, metadata and an optional RNG key.
* ``ProgressBar`` (progress): console bar.
* ``fit`` / ``History`` (loop): the training loop with eval, checkpoints,
  exact resume and logging.
"""

from attnlib.training.checkpoint import Checkpointer
from attnlib.training.loop import History
from attnlib.training.loop import fit
from attnlib.training.optim import make_optimizer
from attnlib.training.optim import make_schedule
from attnlib.training.optim import weight_decay_mask
from attnlib.training.progress import ProgressBar
from attnlib.training.steps import cast_params
from attnlib.training.steps import eval_step
from attnlib.training.steps import evaluate
from attnlib.training.steps import lm_loss
from attnlib.training.steps import make_eval_step
from attnlib.training.steps import make_train_step
from attnlib.training.steps import train_step

__all__ = [
    "Checkpointer",
    "History",
    "ProgressBar",
    "cast_params",
    "eval_step",
    "evaluate",
    "fit",
    "lm_loss",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "train_step",
    "weight_decay_mask",
]
