"""Few-shot evaluation as in the Flamingo paper, with OpenFlamingo's prompts, draws and metrics.

``python -m flamingo_pytorch.evaluate --help`` runs it; ``EvalModel`` wraps a model for it, and
``runner.run`` evaluates one on several tasks (see docs/evaluation.md).
"""

from flamingo_pytorch.evaluation.models import EvalModel
from flamingo_pytorch.evaluation.runner import TASKS, TaskData, run
from flamingo_pytorch.evaluation.tasks import evaluate_captioning, evaluate_classification, evaluate_vqa

__all__ = ["TASKS", "EvalModel", "TaskData", "evaluate_captioning", "evaluate_classification", "evaluate_vqa", "run"]
