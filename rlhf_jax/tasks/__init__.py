"""Tasks: where a stage's prompts, demonstrations and gold scorer come from.

A :class:`Task` gives the stages everything task-specific — SFT texts, rollout and evaluation
prompts, how prompts are cut to the query length, and a gold scorer (or none) — so no stage calls
a dataset's helpers directly. Choose one with a spec string (the ``task`` field of every stage's
config):

* ``imdb`` (default): continue IMDB movie reviews; gold = a sentiment classifier
  (:class:`ImdbTask`).
* ``chat-imdb``: the same reviews as chat turns in SmolLM2's template ("Write a short movie
  review that begins: ..."); SFT on the response only; the same gold scorer
  (:class:`ChatImdbTask`).
* ``jsonl:PATH``: your own prompts and demonstrations from ``PATH/train.jsonl`` and
  ``PATH/eval.jsonl``, no gold scorer (:class:`JsonlTask`).

Adding a task: subclass :class:`Task`, implement its four methods, and register it in
:func:`get_task`.
"""
from rlhf_jax.tasks.base import spread, Task
from rlhf_jax.tasks.chat import ChatImdbTask
from rlhf_jax.tasks.imdb import ImdbTask
from rlhf_jax.tasks.jsonl import JsonlTask

__all__ = ["Task", "ImdbTask", "ChatImdbTask", "JsonlTask", "get_task", "spread"]


def get_task(spec: str = "imdb", data_dir: str | None = None) -> Task:
    """The task named by ``spec`` (``imdb``, ``chat-imdb`` or ``jsonl:PATH``); ``data_dir`` is
    IMDB's TFDS folder."""
    if spec == "imdb":
        return ImdbTask(data_dir)
    if spec == "chat-imdb":
        return ChatImdbTask(data_dir)
    if spec.startswith("jsonl:"):
        return JsonlTask(spec.split(":", 1)[1])
    raise ValueError(f"task={spec!r}: expected 'imdb', 'chat-imdb' or 'jsonl:PATH'")
