"""TRL baseline: seconds per PPO iteration of ``trl.experimental.ppo.PPOTrainer`` (TRL 1.12).

One iteration is one pass of the loop in ``PPOTrainer.train()``: draw a batch of prompts, sample
``response_length`` tokens with ``model.generate`` (KV cache, temperature 0.7, no top-k/top-p, no
stop token so every response has the full length), score with the reference policy (log-probs),
the value model and the reward model, KL-shaped rewards + GAE + whitening, then
``num_ppo_epochs`` × ``num_mini_batches`` AdamW updates of policy + value model, and TRL's own
per-iteration logging and ``gc.collect()``.

What is timed: a ``TrainerCallback`` stamps ``on_train_begin`` and every ``on_step_end`` (called
once per iteration); iteration i's time is the gap between consecutive stamps. The first
``--warmup`` iterations are dropped; the report is the median of the rest. The update's share
(``mfu_part``) is timed from the first training forward of the iteration to ``on_step_end``
(the module-level ``forward`` of ``ppo_trainer`` is wrapped to stamp it).

Models: policy ``GPT2LMHeadModel``, reference = a deep copy of it, reward and value models
``GPT2ForSequenceClassification`` (``num_labels=1``), all random-initialised from ``GPT2Config``,
f32, dropout off. Prompts: random token ids (never the pad id), all of length ``query``.

Usage: ``.venv-baseline/bin/python benchmarks/baseline/trl_ppo.py --cases tiny gpt2 --out F.json``
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import _setup
from _setup import common

#: Cases of the benchmark issue: batch, query, response, epochs, minibatches (and the model shape
#: in ``_setup.SHAPES`` where it is not the case's name). ``gpt2-b64`` is
#: ``benchmarks/gpu_scale.py``'s GPT-2 case.
CASES = {
    "tiny": dict(batch=8, query=16, response=16, epochs=4, minibatches=1),
    "gpt2": dict(batch=16, query=64, response=32, epochs=4, minibatches=2),
    "gpt2-b64": dict(batch=64, query=64, response=64, epochs=4, minibatches=2, shape="gpt2"),
}


def run_case(name: str, warmup: int, iters: int) -> dict:
    from datasets import Dataset
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import ppo_trainer as ppo_module
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    c = dict(CASES[name])
    shape = c.pop("shape", name)
    threads = _setup.setup_torch(0)
    tok = _setup.gpt2_tokenizer()
    cfg = _setup.gpt2_config(shape)
    policy = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    policy.generation_config.eos_token_id = None
    policy.generation_config.pad_token_id = _setup.EOS_ID
    ref = copy.deepcopy(policy)
    cfg_scalar = _setup.gpt2_config(shape, num_labels=1)
    reward = AutoModelForSequenceClassification.from_config(cfg_scalar, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_config(cfg_scalar, dtype=torch.float32)

    n_iter = warmup + iters
    prompts = _setup.random_ids(c["batch"] * 4, c["query"], seed=1)
    dataset = Dataset.from_dict({"input_ids": prompts})
    out_dir = tempfile.mkdtemp(prefix="trl_ppo_")
    args = PPOConfig(
        **_setup.common_training_args(out_dir, n_iter),
        per_device_train_batch_size=c["batch"],
        gradient_accumulation_steps=1,
        num_mini_batches=c["minibatches"],
        num_ppo_epochs=c["epochs"],
        total_episodes=c["batch"] * n_iter,
        response_length=c["response"],
        stop_token=None,
        stop_token_id=None,
        temperature=0.7,
        local_rollout_forward_batch_size=c["batch"],
        num_sample_generations=0,
        kl_coef=0.05,
        missing_eos_penalty=None,
    )
    timer = _setup.step_timer()
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref,
                         reward_model=reward, value_model=value, train_dataset=dataset,
                         eval_dataset=dataset, callbacks=[timer])

    # Stamp the first training forward (PolicyAndValueWrapper) of each iteration: update start.
    update_starts: list[float] = []
    orig_forward = ppo_module.forward

    def stamped_forward(model, *a, **k):
        if isinstance(model, ppo_module.PolicyAndValueWrapper) or hasattr(model, "value_model"):
            if len(update_starts) < len(timer.stamps):
                update_starts.append(time.perf_counter())
        return orig_forward(model, *a, **k)

    ppo_module.forward = stamped_forward
    try:
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
    finally:
        ppo_module.forward = orig_forward

    steps = timer.step_times()
    if len(steps) != n_iter:
        raise RuntimeError(f"expected {n_iter} PPO iterations, the callback saw {len(steps)}")
    updates = [end - start for start, end in zip(update_starts, timer.stamps[1:])]
    timing = common.summarize(steps[warmup:], first=steps[0])
    upd = common.summarize(updates[warmup:])
    seq = c["query"] + c["response"]
    n_layer, d, _, _ = _setup.SHAPES[shape]
    update_flops = common.ppo_update_flops(n_layer, d, _setup.VOCAB, c["batch"], seq, c["epochs"],
                                           c["response"])
    config = dict(layers=n_layer, d_model=d, heads=_setup.SHAPES[shape][2], vocab=_setup.VOCAB,
                  **c, temperature=0.7, threads=threads)
    return common.record(
        "ppo", name, "trl", timing, unit="s/iter", dtype="float32", config=config,
        mfu_part={"name": "PPO update", "flops": update_flops, "median": upd["median"]},
        update_s=upd, train_total_s=total,
        api="trl.experimental.ppo.PPOTrainer/PPOConfig (TRL 1.12.0)",
        notes=("TRL PPOTrainer.train(): generate (HF generate, KV cache) + ref/value/reward "
               "forwards + GAE + epochs×minibatches AdamW; includes TRL's per-iteration "
               "logging and gc.collect()"),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["tiny", "gpt2"], choices=list(CASES))
    p.add_argument("--warmup", type=int, default=None,
                   help="dropped iterations (default 2; 1 for gpt2: ~1.5 min each)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed iterations (default 5; 3 for gpt2)")
    p.add_argument("--out", default=None, help="JSON output path (also printed)")
    a = p.parse_args()
    q = common.quick()
    recs = []
    for name in a.cases:
        big = name.startswith("gpt2")
        warmup = a.warmup if a.warmup is not None else (1 if q or big else 2)
        iters = a.iters if a.iters is not None else (2 if q else 3 if big else 5)
        r = run_case(name, warmup, iters)
        r["quick"] = q
        recs.append(r)
        print(f"# trl ppo {name}: median {r['median']:.3f} s/iter, runs {r['runs']}", flush=True)
    common.write_results(a.out, recs, common.machine_info(_setup.torch_label()))


if __name__ == "__main__":
    main()
