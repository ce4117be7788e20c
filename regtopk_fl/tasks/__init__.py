"""Tasks: a model, its data split across workers, local updates, evaluation."""
from .base import LocalResult, Task

__all__ = ["LocalResult", "Task"]
