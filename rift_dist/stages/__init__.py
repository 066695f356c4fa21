"""The RiFT stages: adversarial training, MRC, fine-tuning, interpolation, evaluation."""

from rift_dist.stages.common import STAGES, StageContext, StageError

__all__ = ["STAGES", "StageContext", "StageError"]
