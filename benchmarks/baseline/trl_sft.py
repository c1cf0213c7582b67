"""TRL baseline: seconds per ``trl.SFTTrainer`` training step (TRL 1.12), GPT-2 small shape.

One step = collate 8 sequences of 256 tokens (no packing, no padding-free), forward of
``GPT2LMHeadModel`` (random-initialised, f32), next-token cross-entropy over every token, backward,
AdamW step. The dataset is already tokenised (an ``input_ids`` column of random ids, no pad id
inside), so TRL skips tokenisation and adds no EOS; every row has exactly 256 tokens.

``--loss-type``: TRL 1.12 defaults to ``"chunked_nll"`` (LM head + cross-entropy recomputed in
chunks under activation checkpointing to save memory); ``"nll"`` is the plain full-logits loss. Both
are valid TRL set-ups; run_all.sh reports the faster one, so the baseline gets its best showing.

What is timed: a ``TrainerCallback`` stamps ``on_train_begin`` and each ``on_step_end``; step i's
time is the gap between stamps; the first ``--warmup`` steps are dropped, the median of the rest is
reported. Model FLOPs per step: ``train_flops`` of benchmarks/common.py with the LM head:
``8·256 · (6·(12·L·D² + V·D) + 12·L·T·D)``.

Usage: ``.venv-baseline/bin/python benchmarks/baseline/trl_sft.py --out F.json``
"""

from __future__ import annotations

import argparse
import tempfile

import _setup
from _setup import common

BATCH, LENGTH = 8, 256


def run(warmup: int, iters: int, shape: str = "gpt2", loss_type: str = "nll") -> dict:
    from datasets import Dataset
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    threads = _setup.setup_torch(0)
    tok = _setup.gpt2_tokenizer()
    model = AutoModelForCausalLM.from_config(_setup.gpt2_config(shape), dtype=torch.float32)
    n = BATCH * (warmup + iters)
    ds = Dataset.from_dict({"input_ids": _setup.random_ids(n, LENGTH, seed=1)})
    args = SFTConfig(**_setup.common_training_args(tempfile.mkdtemp(prefix="trl_sft_"),
                                                   warmup + iters),
                     per_device_train_batch_size=BATCH, max_length=LENGTH, packing=False,
                     padding_free=False, loss_type=loss_type, completion_only_loss=False,
                     assistant_only_loss=False)
    timer = _setup.step_timer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         callbacks=[timer])
    timing, total = _setup.run_trainer_steps(trainer, timer, warmup)
    n_layer, d, heads, _ = _setup.SHAPES[shape]
    flops = common.train_flops(n_layer, d, _setup.VOCAB, LENGTH, BATCH * LENGTH, lm_head=True)
    config = dict(layers=n_layer, d_model=d, heads=heads, vocab=_setup.VOCAB, batch=BATCH,
                  seq_len=LENGTH, threads=threads, loss_type=loss_type)
    return common.record("sft", shape, "trl", timing, unit="s/step", config=config, flops=flops,
                         train_total_s=total, quick=common.quick(),
                         api=f"trl.SFTTrainer/SFTConfig (TRL 1.12.0), loss_type={loss_type}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warmup", type=int, default=None, help="dropped steps (default 2)")
    p.add_argument("--iters", type=int, default=None, help="timed steps (default 5)")
    p.add_argument("--loss-type", nargs="+", default=None, choices=["nll", "chunked_nll"],
                   help="TRL loss implementations to time, the fastest is reported "
                   "(default both; QUICK=1: nll)")
    p.add_argument("--shape", default="gpt2", choices=list(_setup.SHAPES),
                   help="model shape (the benchmark is gpt2; tiny is a fast smoke test)")
    p.add_argument("--out", default=None, help="JSON output path (also printed)")
    a = p.parse_args()
    counts = _setup.iteration_counts(a.warmup, a.iters)
    runs = []
    for lt in a.loss_type or (["nll"] if common.quick() else ["nll", "chunked_nll"]):
        r = run(*counts, shape=a.shape, loss_type=lt)
        print(f"# trl sft {lt}: median {r['median']:.3f} s/step, runs {r['runs']}", flush=True)
        runs.append(r)
    best = min(runs, key=lambda r: r["median"])
    best["alternatives"] = {r["config"]["loss_type"]: r["median"] for r in runs}
    best["notes"] = "fastest TRL loss_type of " + ", ".join(
        f"{k}: {v:.3f} s" for k, v in best["alternatives"].items())
    common.write_results(a.out, [best], common.machine_info(_setup.torch_label()))


if __name__ == "__main__":
    main()
