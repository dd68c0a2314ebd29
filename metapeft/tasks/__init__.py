"""Task families: each samples batches of few-shot episodes as arrays with a leading task axis."""
from metapeft.tasks.base import Episodes, TaskFamily

__all__ = ["Episodes", "TaskFamily"]
