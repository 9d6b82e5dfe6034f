"""The handlers and values the bundle configs name as ``custom_components.handlers.X``, each defined in the module of
its concern: ``checkpoint`` (the resumable state, the model loaded back), ``training_report`` (what a run writes every
epoch), ``stopping`` (time budget, early stopping) and ``distributed`` (rank 0's output folder for all processes).
"""

from __future__ import annotations

# named by the bundle configs and by the configs that run folders keep, so they answer here too
from custom_components.checkpoint import ModelLoader as ModelLoader
from custom_components.checkpoint import ResumableCheckpoint as ResumableCheckpoint
from custom_components.distributed import from_rank0 as from_rank0
from custom_components.stopping import BUDGET_EPOCHS as BUDGET_EPOCHS
from custom_components.stopping import EarlyStopping as EarlyStopping
from custom_components.stopping import TimeBudget as TimeBudget
from custom_components.training_report import TrainingReport as TrainingReport
