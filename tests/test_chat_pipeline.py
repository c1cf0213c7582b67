"""The chat-imdb task and the LoRA chat pipeline (experiments/chat.py).

Default: the prompt is SmolLM2's chat template, SFT batches put the loss on the response tokens
only (checked on the mask and on the loss itself), and a LoRA SFT step changes the adapters and
nothing else. Slow: the tiny chat pipeline end to end, and stopped + resumed == uninterrupted
(stopped in SFT, in the comparisons and in PPO).
"""
import dataclasses
import json
from pathlib import Path
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import chat
from rlhf_jax import losses
from rlhf_jax.data import batching
from rlhf_jax.models import lora
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.tasks import get_task
from rlhf_jax.tasks.chat import (chat_bpe, chat_prompt, CHAT_TEMPLATE, ChatImdbTask, IM_END,
                                 messages, split_review)

REVIEWS = [
    "I rented this movie because a friend said it was the best comedy of the year, and she was "
    "right: every scene made me laugh.",
    "What a waste of time.\n\nThe plot makes no sense and the acting is wooden from start "
    "to finish, a truly dreadful film.",
    "One of my favourite films of all time, with a wonderful cast and a story that stays with you.",
    "Short and sweet, and I loved it.",
    "The director clearly loved the books. Every frame of the first hour looks like a painting, "
    "the music is gorgeous, and the two leads have real chemistry; sadly the second hour drags "
    "on and on and never recovers its early promise or charm.",
    "this one just goes on and on without a single full stop in sight because the writer never "
    "learned where a sentence should end and neither did the editor who let it through",
] * 6


def _task() -> ChatImdbTask:
    """The chat task over REVIEWS (its IMDB sources replaced by in-memory records)."""
    task = ChatImdbTask(opening_words=4)
    recs = [{"text": t, "label": i % 2} for i, t in enumerate(REVIEWS)]
    task._sources = {"lm": recs, "prompts": recs, "eval": recs}
    return task


@pytest.fixture(scope="module")
def tok():
    return chat_bpe([r["text"] for r in _task().sft_source("train", len(REVIEWS))], 400)


def test_prompt_is_the_chat_template_with_the_opening_begun(tok):
    opening, rest = split_review("What a waste of time.\n\nThe plot", 4)
    assert (opening, rest) == ("What a waste of", " time. The plot")
    assert split_review("Short and sweet.", 6) == ("Short and sweet.", "")
    want = tok.apply_chat_template(messages(opening), add_generation_prompt=True) + opening
    assert chat_prompt(opening) == want
    assert want.endswith('begins: "What a waste of"<|im_end|>\n<|im_start|>assistant\nWhat a '
                         'waste of')
    assert isinstance(get_task("chat-imdb"), ChatImdbTask)
    assert tok.eos_token == IM_END and tok.chat_template == CHAT_TEMPLATE
    assert len(tok.encode(IM_END)) == 1


def test_chat_template_is_smollm2s():
    from rlhf_jax.data.tokenizers import load_tokenizer
    try:
        smol = load_tokenizer("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert smol.chat_template == CHAT_TEMPLATE and smol.eos_token == IM_END
    opening = "I rented this movie"
    assert chat_prompt(opening) == smol.apply_chat_template(messages(opening)) + opening


def test_sft_loss_is_on_the_response_tokens_only(tok):
    task = _task()
    recs = task.sft_source("train", len(REVIEWS))[:len(REVIEWS) // 6]
    # A long review is cut after its last sentence end within 24 words; one with no sentence
    # end in reach gives an empty response (skipped).
    assert recs[4]["response"] == " the books." and recs[5]["response"] == ""
    assert recs[0]["text"] == recs[0]["prompt"] + recs[0]["response"]
    seq_len = 80
    batch = next(iter(chat.sft_batches(task, tok, "train", seq_len, 8, seed=0,
                                       limit=len(REVIEWS), shuffle=False)))
    # Kept: the demonstrations with a response that fit whole (prompt + response + EOS).
    kept = []
    for rec in task.sft_source("train", len(REVIEWS)):
        p, r = tok.encode(rec["prompt"]), tok.encode(rec["response"]) if rec["response"] else []
        if r and len(p) + len(r) + 1 <= seq_len:
            kept.append((p, r))
    assert len(kept) < len(REVIEWS)  # the review without a sentence end gave none
    for row, (p, r) in enumerate(kept[:8]):
        tokens, mask, loss_mask = (batch[k][row] for k in ("tokens", "mask", "loss_mask"))
        np.testing.assert_array_equal(tokens[:len(p)], p)  # the prompt comes first, whole
        assert not loss_mask[:len(p)].any()  # ... and is never a target
        pos = np.arange(seq_len) - len(p)
        np.testing.assert_array_equal(loss_mask, (pos >= 0) & (pos <= len(r)))
        np.testing.assert_array_equal(tokens[loss_mask][:-1], r)
        assert tokens[len(p) + len(r)] == tok.eos_id  # the response ends the assistant's turn
        np.testing.assert_array_equal(mask, pos <= len(r))

    # The loss ignores what the model predicts at prompt positions: changing those logits leaves
    # it unchanged, changing one response position's logits does not.
    rng = np.random.default_rng(0)
    b, t = batch["tokens"].shape
    logits = jnp.asarray(rng.standard_normal((b, t, tok.vocab_size)), jnp.float32)
    args = (jnp.asarray(batch["tokens"]), jnp.asarray(batch["loss_mask"]))
    loss = float(losses.lm_loss(logits, *args)[0])
    predicts_prompt = ~np.asarray(batch["loss_mask"])[:, 1:]  # logits[:, t] predict tokens[t+1]
    noise = 5 * rng.standard_normal(logits.shape).astype(np.float32)
    at_prompt = np.concatenate([predicts_prompt, np.zeros((b, 1), bool)], axis=1)
    moved = logits + jnp.asarray(noise * at_prompt[..., None])
    assert float(losses.lm_loss(moved, *args)[0]) == pytest.approx(loss, abs=1e-6)
    first_resp = int(np.argmax(batch["loss_mask"][0])) - 1
    poked = logits.at[0, first_resp].add(jnp.asarray(noise[0, first_resp]))
    assert abs(float(losses.lm_loss(poked, *args)[0]) - loss) > 1e-4


def test_lora_sft_step_trains_the_adapters_only(tok):
    cfg = chat.PRESETS["tiny"]
    mcfg = chat.common.MODELS["tiny-llama"].replace(vocab_size=tok.vocab_size)
    model = lora.apply_lora(Transformer(mcfg, rngs=nnx.Rngs(params=0)), cfg.lora,
                            rngs=nnx.Rngs(params=1))
    parts = lora.split(model)
    base_before = jax.tree.map(np.array, parts.base)
    tx = chat._optimizer(3e-3, 1, 10, 1.0)
    train_step, eval_step = chat.make_sft_steps(parts.graphdef, tx)
    batch = batching.arrays_only(next(iter(chat.sft_batches(
        _task(), tok, "train", 96, 8, seed=0, limit=len(REVIEWS)))))
    adapters, opt_state = parts.lora, tx.init(parts.lora)
    # Adam's moments exist for the adapters only: the optimizer never sees a base weight.
    assert lora.tree_bytes(opt_state) <= 2 * lora.tree_bytes(parts.lora) + 64
    start = float(eval_step(adapters, parts.base, batch)["lm/loss"])
    a0 = jax.tree.map(np.array, adapters)
    for _ in range(3):
        adapters, opt_state, m = train_step(adapters, opt_state, parts.base, batch)
        assert np.isfinite(float(m["lm/grad_norm"])) and float(m["lm/grad_norm"]) > 0
    assert float(eval_step(adapters, parts.base, batch)["lm/loss"]) < start
    moved = [np.abs(np.asarray(x) - y).max() for x, y in zip(jax.tree.leaves(adapters),
                                                             jax.tree.leaves(a0))]
    assert min(moved) > 0  # every A and B moved (B from zero)
    for x, y in zip(jax.tree.leaves(parts.base), jax.tree.leaves(base_before)):
        np.testing.assert_array_equal(np.asarray(x), y)
    assert jax.tree.structure(adapters) == jax.tree.structure(parts.lora)


def test_lora_reward_step_trains_adapters_and_head_only_and_features_match_scores(tok):
    """``reward.method="lora"`` trains adapters + head on [B, K, T] rankings; the features the
    ``head`` method fits on give the same scores through the head."""
    mcfg = chat.common.MODELS["tiny-llama"].replace(vocab_size=tok.vocab_size)
    cfg = chat.PRESETS["tiny"]
    rm = chat.reward_model(cfg, Transformer(mcfg, rngs=nnx.Rngs(params=0)), layer=1)
    parts = lora.split(rm)
    rng = np.random.default_rng(0)
    b, k, t = 4, 3, 12
    batch = {"tokens": jnp.asarray(rng.integers(3, tok.vocab_size, (b, k, t))),
             "mask": jnp.ones((b, k, t), bool),
             "response_mask": jnp.asarray(np.arange(t) >= 6)[None, None].repeat(b, 0).repeat(k, 1),
             "ranks": jnp.asarray(np.argsort(rng.normal(size=(b, k)), 1)),
             "valid": jnp.ones((b, k), bool)}
    tx = chat._optimizer(3e-3, 1, 10, 1.0)
    train_step = chat.make_reward_step(parts, tx, tok.eos_id, "mean")
    score_fn, feature_fn = chat.make_reward_fns(parts, tok.eos_id, "mean")
    trainable = {"lora": parts.lora, "rest": parts.rest}
    args = (batch["tokens"], batch["mask"], batch["response_mask"])
    scores = score_fn((trainable, parts.base), *args)
    feats = feature_fn((trainable, parts.base), *args)
    assert feats.shape == (b, k, mcfg.d_model)
    np.testing.assert_allclose(rm.head(feats), scores, atol=1e-5)
    start = float(losses.ranking_loss(scores, batch["ranks"], batch["valid"])[0])
    before = jax.tree.map(np.array, (trainable, parts.base))
    opt_state = tx.init(trainable)
    for _ in range(3):
        trainable, opt_state, m = train_step(trainable, opt_state, parts.base, batch)
    assert float(m["rm/loss"]) < start
    moved = {jax.tree_util.keystr(path): float(np.abs(np.asarray(x) - y).max())
             for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(trainable),
                                     jax.tree.leaves(before[0])) if x.size > 1}
    # Adapters of block 0 and the head's weights learn; block 1 lies above the layer the head
    # reads, is never run, and gets no gradient.
    above = [p for p in moved if "'blocks'][1]" in p]
    assert above and all(moved[p] == 0 for p in above), moved
    assert all(v > 0 for p, v in moved.items() if p not in above), moved
    for x, y in zip(jax.tree.leaves(parts.base), jax.tree.leaves(before[1])):
        np.testing.assert_array_equal(np.asarray(x), y)


def test_the_pipeline_seed_seeds_ppo_and_ppo_seed_is_refused():
    cfg = dataclasses.replace(chat.PRESETS["tiny"], seed=3)
    assert cfg.errors() == []
    pcfg = chat.ppo_config(cfg)
    assert pcfg.seed == 3 and dataclasses.replace(pcfg, seed=0) == cfg.ppo
    bad = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, seed=1))
    assert [e for e in bad.errors() if e.startswith("ppo.seed=1")], bad.errors()


# ------------------------------------------------------------------------------------------------
# The tiny pipeline end to end (slow: about eight small programs compile per run).


def _adapters(cfg) -> dict:
    """``{stage: (adapter.json, adapter leaves)}`` of a finished run, each loaded back onto the
    base its folder names (SFT: the pretrained base; reward and PPO: the merged SFT model)."""
    root = Path(cfg.root)
    base = chat.load_base(cfg, get_task(cfg.task, cfg.data_dir))
    sft = chat.sft_model(cfg, base)
    models = {"sft": lora.base_model(base.model), "reward": chat.reward_model(cfg, sft),
              "ppo": lora.base_model(sft)}
    out = {}
    for stage, model in models.items():
        folder = root / stage / "adapters"
        lora.load_adapters(folder, model)  # refuses a model on another base
        out[stage] = (lora.read_adapter_meta(folder),
                      [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, lora.LoraParam))])
    out["base_hash"] = base.hash
    return out


@pytest.fixture(scope="module")
def chat_runs(tiny_run, tmp_path_factory):
    """The tiny chat pipeline uninterrupted, and the same run stopped twice and resumed."""
    root = tmp_path_factory.mktemp("chat")
    cfg = dataclasses.replace(chat.PRESETS["tiny"], root=str(root / "whole"),
                              data_dir=tiny_run[0].data_dir,
                              gold_path=str(Path(tiny_run[0].root) / "gold.pkl"))
    whole = chat.train(cfg)
    parts = dataclasses.replace(cfg, root=str(root / "resumed"))
    stopped = [chat.train(dataclasses.replace(parts, sft=dataclasses.replace(
        cfg.sft, stop_after=cfg.sft.steps // 2)))]
    stopped.append(chat.train(dataclasses.replace(parts, collect=dataclasses.replace(
        cfg.collect, stop_after=1))))
    stopped.append(chat.train(dataclasses.replace(parts, ppo=dataclasses.replace(
        cfg.ppo, stop_after=cfg.ppo.iterations // 2))))
    resumed = chat.train(parts)
    return cfg, whole, parts, stopped, resumed


@pytest.mark.slow
def test_tiny_chat_pipeline_runs_end_to_end(chat_runs):
    cfg, s, *_ = chat_runs
    root = Path(cfg.root)
    for key in ("sft_gold_positive", "ppo_gold_positive", "ppo_kl_to_sft",
                "rm_heldout_accuracy_vs_gold", "sft_eval_response_loss", "peak_rss_mib"):
        assert np.isfinite(s[key]), key
    assert 0 <= s["rm_heldout_accuracy_vs_gold"] <= 1
    assert set(s["stage_seconds"]) == set(chat.STAGES)
    assert s["peak_rss_mib"] > 100
    assert len(s["collect_mean_gold_by_policy"]) == 4  # SFT and base at two temperatures
    # Adapters name their base; only adapters were trained: the base the SFT adapters name is a
    # fresh tiny Llama of the same seed, and the later stages name the SFT model (merged).
    loaded = _adapters(cfg)
    (sft_meta, sft_leaves), (rm_meta, _), (ppo_meta, ppo_leaves) = (
        loaded[k] for k in ("sft", "reward", "ppo"))
    assert sft_meta["base_hash"] == loaded["base_hash"]
    assert max(np.abs(x).max() for x in sft_leaves) > 0
    assert max(np.abs(x).max() for x in ppo_leaves) > 0
    assert rm_meta["base_hash"] == ppo_meta["base_hash"] != sft_meta["base_hash"]
    assert rm_meta["model"] == "ScalarModel" and ppo_meta["model"] == "Transformer"
    held = json.loads((root / "ppo" / "summary.json").read_text())["held_bytes"]
    assert held["total"] - held["base"] < held["base"]  # the PPO program holds the base once
    samples = (root / "ppo" / "samples.md").read_text()
    assert "SFT response" in samples and "PPO response" in samples
    assert (root / "ppo" / "hf" / "config.json").exists()
    report = (root / "report.md").read_text()
    assert "gold P(positive), PPO" in report and "peak resident memory" in report
    # Re-running a finished pipeline skips every stage and reports the same figures.
    again = chat.train(cfg)
    assert {k: v for k, v in again.items() if k != "peak_rss_mib"} == \
        {k: v for k, v in s.items() if k != "peak_rss_mib"}


@pytest.mark.slow
def test_the_lora_reward_model_runs_through_ppo(chat_runs, tmp_path):
    """``reward.method="lora"`` (the tiny preset fits a head): on the same SFT model and
    comparisons, adapters are trained, saved with their method, and PPO reads them."""
    cfg = chat_runs[0]
    for name in ("sft", "collect"):
        shutil.copytree(Path(cfg.root) / name, tmp_path / name)
    run = dataclasses.replace(
        cfg, root=str(tmp_path), reward=dataclasses.replace(cfg.reward, method="lora",
                                                            layer=None, pool="last"),
        ppo=dataclasses.replace(cfg.ppo, iterations=2, eval_every=2, hf_export=False))
    s = chat.train(run)
    rm = json.loads((tmp_path / "reward" / "summary.json").read_text())
    assert rm["steps"] == cfg.reward.epochs * cfg.collect.train_prompts // cfg.reward.batch_size
    notes = json.loads((tmp_path / "reward" / "adapters" / "notes.json").read_text())
    assert notes["method"] == "lora" and notes["layer"] is None and notes["pool"] == "last"
    rows = [json.loads(x) for x in open(tmp_path / "reward" / "metrics.jsonl")]
    assert len(rows) >= 2 and all(np.isfinite(r["rm/loss"]) for r in rows)
    _, leaves = _adapters(run)["reward"]
    assert max(np.abs(x).max() for x in leaves) > 0
    assert np.isfinite(s["ppo_gold_positive"])


@pytest.mark.slow
def test_stopped_and_resumed_chat_pipeline_equals_uninterrupted(chat_runs):
    cfg, whole, parts, stopped, resumed = chat_runs
    assert stopped[0] == {"stage": "sft", "stopped_at": cfg.sft.steps // 2}
    assert stopped[1] == {"stage": "collect", "stopped_at": "train: 1 of 4 columns"}
    assert stopped[2] == {"stage": "ppo", "stopped_at": cfg.ppo.iterations // 2}
    a, b = Path(cfg.root), Path(parts.root)
    assert not list((b / "collect").glob("*columns.json"))  # the kept column, used and removed
    loaded_a, loaded_b = _adapters(cfg), _adapters(parts)
    for stage in ("sft", "reward", "ppo"):
        (meta_a, leaves_a), (meta_b, leaves_b) = loaded_a[stage], loaded_b[stage]
        assert meta_a["base_hash"] == meta_b["base_hash"]
        for x, y in zip(leaves_a, leaves_b):
            np.testing.assert_array_equal(x, y, err_msg=stage)
    for split in ("train", "eval"):
        assert (a / "collect" / f"{split}.jsonl").read_text() == \
            (b / "collect" / f"{split}.jsonl").read_text()
    figures = [k for k in whole if k not in ("stage_seconds", "total_seconds", "peak_rss_mib")]
    assert {k: whole[k] for k in figures} == {k: resumed[k] for k in figures}
