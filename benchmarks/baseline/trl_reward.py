"""TRL baseline: seconds per ``trl.RewardTrainer`` training step (TRL 1.12), GPT-2 small shape.

One step = collate 8 preference pairs (chosen and rejected stacked: 16 sequences of 128 tokens),
forward of ``GPT2ForSequenceClassification`` (``num_labels=1``, random-initialised, f32), the
Bradley–Terry loss ``-log σ(r_chosen - r_rejected)``, backward, AdamW step. The dataset is already
tokenised (``chosen_ids``/``rejected_ids`` columns of random ids, no pad id inside), so TRL skips
its tokenisation and every sequence has exactly 128 tokens.

What is timed: a ``TrainerCallback`` stamps ``on_train_begin`` and each ``on_step_end``; step i's
time is the gap between stamps; the first ``--warmup`` steps are dropped, the median of the rest is
reported. Model FLOPs per step: ``train_flops`` of benchmarks/common.py without an LM head:
``16·128 · (6·12·L·D² + 12·L·T·D)``.

Usage: ``.venv-baseline/bin/python benchmarks/baseline/trl_reward.py --out F.json``
"""

from __future__ import annotations

import argparse
import tempfile

import _setup
from _setup import common

PAIRS, LENGTH = 8, 128


def run(warmup: int, iters: int, shape: str = "gpt2") -> dict:
    from datasets import Dataset
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    threads = _setup.setup_torch(0)
    tok = _setup.gpt2_tokenizer()
    model = AutoModelForSequenceClassification.from_config(
        _setup.gpt2_config(shape, num_labels=1), dtype=torch.float32)
    n = PAIRS * (warmup + iters)
    ds = Dataset.from_dict({"chosen_ids": _setup.random_ids(n, LENGTH, seed=1),
                            "rejected_ids": _setup.random_ids(n, LENGTH, seed=2)})
    args = RewardConfig(**_setup.common_training_args(tempfile.mkdtemp(prefix="trl_rm_"),
                                                      warmup + iters),
                        per_device_train_batch_size=PAIRS, max_length=LENGTH,
                        disable_dropout=True, center_rewards_coefficient=None)
    timer = _setup.step_timer()
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                            callbacks=[timer])
    timing, total = _setup.run_trainer_steps(trainer, timer, warmup)
    n_layer, d, heads, _ = _setup.SHAPES[shape]
    flops = common.train_flops(n_layer, d, _setup.VOCAB, LENGTH, 2 * PAIRS * LENGTH,
                               lm_head=False)
    config = dict(layers=n_layer, d_model=d, heads=heads, vocab=_setup.VOCAB, pairs=PAIRS,
                  seq_len=LENGTH, threads=threads)
    return common.record("reward", shape, "trl", timing, unit="s/step", config=config,
                         flops=flops, train_total_s=total, quick=common.quick(),
                         api="trl.RewardTrainer/RewardConfig (TRL 1.12.0)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warmup", type=int, default=None, help="dropped steps (default 2)")
    p.add_argument("--iters", type=int, default=None, help="timed steps (default 5)")
    p.add_argument("--shape", default="gpt2", choices=list(_setup.SHAPES),
                   help="model shape (the benchmark is gpt2; tiny is a fast smoke test)")
    p.add_argument("--out", default=None, help="JSON output path (also printed)")
    a = p.parse_args()
    r = run(*_setup.iteration_counts(a.warmup, a.iters), shape=a.shape)
    print(f"# trl reward: median {r['median']:.3f} s/step, runs {r['runs']}", flush=True)
    common.write_results(a.out, [r], common.machine_info(_setup.torch_label()))


if __name__ == "__main__":
    main()
