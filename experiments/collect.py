"""Stage 2 — collect comparisons: K responses per prompt from several LMs, ranked by a labeler.

For held-out prompts (the first tokens of IMDB reviews that SFT never trained on) every policy in
``policies`` samples at every temperature in ``temperatures`` (K = len(policies) × len(temperatures)
responses; "several LMs" as in InstructGPT). A labeler then ranks the K responses:

* ``labeler="simulated"`` (default): a gold sentiment scorer (TF-IDF + logistic regression trained
  on
  IMDB labels, independent of the reward model) with Bradley–Terry noise
  ``P(a ≻ b) = σ((g_a − g_b)/τ)`` (:mod:`rlhf_jax.labelers`).
* ``labeler="export"``: writes ``to_label/{train,eval}.jsonl`` for people and stops (no
  ``summary.json``, so the pipeline does not go on); after ranking, ``labeler="import"
  --rankings-file <workdir>/to_label`` reads the prompts, responses and ranks back.

Run::

    python -m experiments.collect --preset default

Outputs: ``train.jsonl`` / ``eval.jsonl`` (``rlhf_jax.data.comparisons`` schema, with gold scores),
``summary.json`` (labeler/gold agreement, mean gold score per policy), and the gold scorer
(``gold_path``), shared with the later stages for evaluation.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from flax import nnx
import jax
import numpy as np

from experiments import common
from rlhf_jax import parallel
from rlhf_jax.checkpoint import files_digest
from rlhf_jax.data import comparisons
from rlhf_jax.data.batching import decode_rows
from rlhf_jax.generation import sample_split, SamplingConfig
from rlhf_jax.labelers import simulated_ranks
from rlhf_jax.loop import check_output_dir, fingerprint, guard_outputs
from rlhf_jax.runs import bundle_digest, load_bundle, write_summary
from rlhf_jax.tasks import get_task


@dataclasses.dataclass(frozen=True)
class Config:
    """Comparison collection."""
    workdir: str = "runs/default/collect"
    policies: tuple[str, ...] = ("runs/default/sft/final", "runs/default/sft/half")
    """Model bundles that write responses (an SFT run's ``final/`` and ``half/``)."""
    temperatures: tuple[float, ...] = (0.7, 0.85, 1.0)
    """Every policy samples at each: K = 2 × 3 = 6 responses, 15 pairs per prompt. On the same
    held-out pairs, reward models fitted to K = 6 (2 epochs) scored 0.797 vs gold, ones fitted to
    K = 4 (temperatures 0.7 and 1.0, 3 epochs, the same time) 0.760 (3 seeds each; README)."""
    gold_path: str = "runs/default/gold.pkl"
    """Where the gold scorer is cached (trained on first use from the IMDB ``lm`` split)."""
    gold_train_texts: int | None = 10000
    """Fit the gold scorer on N ``lm`` reviews spread over the split (None: all ~20k)."""
    task: str = "imdb"
    """Where prompts and the gold scorer come from: ``imdb`` or ``jsonl:PATH``."""
    data_dir: str | None = None
    train_prompts: int = 2400
    """Prompts (from the task's training prompts) for the reward model's training comparisons."""
    eval_prompts: int = 300
    """Prompts (from the task's held-out prompts) for held-out comparisons."""
    query_len: int = 16
    response_len: int = 24
    labeler: str = "simulated"
    """``simulated`` | ``export`` | ``import``."""
    labeler_temperature: float = 0.5
    """τ of the simulated labeler (0 = always agrees with the gold ordering)."""
    rankings_file: str | None = None
    """With ``labeler=import``: the file people filled in (JSONL or CSV from ``export``)."""
    batch_size: int = 200
    """Prompts per sampling call."""
    compute_dtype: str = "float32"
    seed: int = 0
    mesh: str | None = None
    """Device mesh, e.g. ``data=2,fsdp=4`` (axes ``data``, ``fsdp``, ``tensor``: parameters and
    optimizer state sharded over ``fsdp``, batches over ``data × fsdp``); None: every device on
    the data axis, parameters replicated."""

    def errors(self) -> list[str]:
        errs = (parallel.mesh_errors(self.mesh)
                + common.positive(self, "train_prompts", "eval_prompts", "query_len",
                                  "response_len", "batch_size")
                + common.one_of(self, "labeler", ("simulated", "export", "import"))
                + common.one_of(self, "compute_dtype", ("float32", "bfloat16")))
        if not self.policies or not self.temperatures or \
                len(self.policies) * len(self.temperatures) < 2:
            errs.append(f"policies={self.policies!r} x temperatures={self.temperatures!r}: "
                        "expected at least 2 responses per prompt")
        if any(not t > 0 for t in self.temperatures):
            errs.append(f"temperatures={self.temperatures!r}: expected positive numbers")
        if self.labeler == "import" and not self.rankings_file:
            errs.append("rankings_file=None: labeler=import needs the file people filled in")
        return errs


PRESETS: dict[str, Config] = {
    "default": Config(),
    "tiny": Config(workdir="runs/tiny/collect",
                   policies=("runs/tiny/sft/final", "runs/tiny/sft/half"), temperatures=(1.0,),
                   gold_path="runs/tiny/gold.pkl", gold_train_texts=2000, train_prompts=16,
                   eval_prompts=8,
                   query_len=8, response_len=8, batch_size=8, compute_dtype="float32"),
    "smollm2": Config(workdir="runs/smollm2/collect",
                      policies=("runs/smollm2/sft/final", "runs/smollm2/sft/half"),
                      gold_path="runs/smollm2/gold.pkl", train_prompts=1000, eval_prompts=200,
                      query_len=32, response_len=32, batch_size=50, compute_dtype="bfloat16"),
}


def sample_responses(cfg: Config, prompt_tokens, prompt_mask, mesh, tokenizer) -> tuple[list, list]:
    """``(responses [N][K] texts, names [K])`` from every policy × temperature."""
    texts, names = [], []
    n = len(prompt_tokens)
    bs = cfg.batch_size
    for p_i, policy_dir in enumerate(cfg.policies):
        model, _, _, _ = load_bundle(policy_dir, kind="lm", compute_dtype=cfg.compute_dtype)
        graphdef, params = nnx.split(model)
        params = parallel.shard(params, mesh)
        for temp in cfg.temperatures:
            scfg = SamplingConfig(max_new_tokens=cfg.response_len, temperature=temp,
                                  pad_id=tokenizer.pad_id, min_new_tokens=1)
            fn = jax.jit(lambda p, t, m, k, scfg=scfg: sample_split(graphdef, p, t, m, k, scfg))
            key = jax.random.fold_in(jax.random.key(cfg.seed), len(names))
            col = []
            for s in range(0, n, bs):
                t, m = prompt_tokens[s:s + bs], prompt_mask[s:s + bs]
                pad = (-len(t)) % parallel.batch_devices(mesh)
                if pad:  # keep every batch divisible by the devices; padded rows are dropped
                    t, m = np.concatenate([t, t[:pad]]), np.concatenate([m, m[:pad]])
                out = fn(params, *parallel.shard_batch((t, m), mesh), jax.random.fold_in(key, s))
                host = parallel.to_host(out)
                col += decode_rows(tokenizer, host.tokens, host.mask)[:len(t) - pad]
            texts.append(col)
            names.append(f"{Path(policy_dir).parent.name}/{Path(policy_dir).name}@T={temp}")
            print(f"[collect] sampled {n} responses from {names[-1]}")
    return [list(r) for r in zip(*texts)], names


def train(cfg: Config) -> dict:
    common.check(cfg, cfg.errors())
    workdir = check_output_dir("collect", cfg.workdir)
    mesh = parallel.make_mesh(spec=cfg.mesh)
    task = get_task(cfg.task, cfg.data_dir)
    _, _, tok, _ = load_bundle(cfg.policies[0], kind="lm")
    rng = np.random.default_rng(cfg.seed)
    summary = {"stage": "collect", "labeler": cfg.labeler, "config": dataclasses.asdict(cfg)}
    gold = None
    if cfg.labeler == "simulated" or cfg.gold_path:
        gold, acc = task.gold_scorer(cfg.gold_path, cfg.gold_train_texts)
        if gold is not None:
            summary["gold_heldout_review_accuracy"] = acc
            print(f"[collect] gold scorer accuracy on held-out {task.name} texts: {acc:.3f}")
        elif cfg.labeler == "simulated":
            raise ValueError(f"labeler='simulated' needs a gold scorer and task {cfg.task!r} has "
                             "none: use --labeler export (people rank the responses)")

    # Finished splits are kept on a re-run, so they must come from the same config and models.
    inputs = {f"policy{i}": bundle_digest(p) for i, p in enumerate(cfg.policies)}
    if gold is not None and cfg.gold_path and Path(cfg.gold_path).exists():
        inputs["gold"] = files_digest([cfg.gold_path])
    if cfg.labeler == "import":
        inputs["rankings"] = files_digest(
            [_rankings_file(cfg.rankings_file, s) for s in ("train", "eval")])
    kept = {s: (workdir / f"{s}.jsonl").exists() for s in ("train", "eval")}
    parallel.sync("collect-start")  # every process has seen which splits exist
    if parallel.is_main():  # several processes: process 0 writes
        if cfg.labeler != "export":
            guard_outputs("collect", workdir, fingerprint(
                cfg, exclude=("policies", "gold_path", "rankings_file", "data_dir"),
                data=inputs), [workdir / "train.jsonl", workdir / "eval.jsonl"])
        (workdir / "summary.json").unlink(missing_ok=True)  # written last: the finished marker
    for split, n in (("train", cfg.train_prompts), ("eval", cfg.eval_prompts)):
        out_path = workdir / f"{split}.jsonl"
        if kept[split]:  # written by this run before it was stopped (guard_outputs)
            print(f"[collect] {out_path} exists; kept")
            records = [json.loads(x) for x in open(out_path, encoding="utf-8") if x.strip()]
            names = records[0]["policies"]
            g = np.array([r["gold_scores"] for r in records], np.float32) \
                if gold is not None else None
            if cfg.labeler == "simulated":  # the labeler's random stream, as if never stopped
                simulated_ranks(g, cfg.labeler_temperature, rng)
            summary.update(split_figures(split, records, names, g))
            continue
        if cfg.labeler == "import":  # the people's file holds prompts, responses and ranks
            records = comparisons.import_rankings(_rankings_file(cfg.rankings_file, split))
            names = records[0]["policies"]
        else:
            tokens, mask, _ = task.prompt_set(split, tok, cfg.query_len, n)
            prompts = decode_rows(tok, tokens, mask)
            responses, names = sample_responses(cfg, tokens, mask, mesh, tok)
            records = [{"id": f"{split}-{i}", "prompt": p, "responses": r,
                        "labeler": cfg.labeler, "policies": names}
                       for i, (p, r) in enumerate(zip(prompts, responses))]
        g = None
        if gold is not None:
            g = gold.score([x for r in records for x in r["responses"]]).reshape(len(records), -1)
            for rec, row in zip(records, g):
                rec["gold_scores"] = [float(v) for v in row]
        if cfg.labeler == "export":
            path = workdir / "to_label" / f"{split}.jsonl"
            if parallel.is_main():
                path.parent.mkdir(exist_ok=True)
                comparisons.export_for_labeling(records, path)
            print(f"[collect] wrote {path}: fill in the ranks, then re-run with "
                  f"--labeler import --rankings-file {path.parent}")
            continue
        if cfg.labeler == "simulated":
            ranks = simulated_ranks(g, cfg.labeler_temperature, rng)
            for rec, r in zip(records, ranks):
                rec["ranks"] = [int(x) for x in r]
        if parallel.is_main():
            comparisons.write_comparisons(out_path, records)  # atomic: no half file after a kill
        summary.update(split_figures(split, records, names, g))
    if cfg.labeler == "export":
        # No summary.json: the stage is not finished until the rankings are imported.
        return {"stage": "collect", "stopped_at": "waiting for rankings",
                "to_label": str(workdir / "to_label")}
    write_summary(workdir, summary)
    return summary


def headline(summary: dict) -> list[tuple[str, str, object, str]]:
    return [("gold_scorer_review_accuracy", "gold scorer accuracy on held-out reviews",
             summary.get("gold_heldout_review_accuracy"), ".3f"),
            ("labeler_gold_agreement", "simulated labeler agreement with gold order",
             summary.get("train_labeler_gold_pair_agreement"), ".3f")]


def split_figures(split: str, records: list, names: list, gold_scores) -> dict:
    """A split's summary figures, from its records and their gold scores ``[N, K]`` (None: no
    gold scorer): the same whether the split was written now or kept from a stopped run."""
    out = {}
    if gold_scores is not None:
        out[f"{split}_mean_gold_prob_by_policy"] = dict(
            zip(names, (1 / (1 + np.exp(-gold_scores))).mean(axis=0).round(4).tolist()))
        ranks = np.array([rec["ranks"] for rec in records])
        out[f"{split}_labeler_gold_pair_agreement"] = _pair_agreement(ranks, gold_scores)
    out[f"{split}_comparisons"] = len(records)
    return out


def _rankings_file(path: str | None, split: str) -> Path:
    """The filled-in file for ``split``: ``path`` itself, or ``path/<split>.jsonl|csv``."""
    if not path:
        raise ValueError("labeler=import needs --rankings-file (a file, or the to_label folder)")
    p = Path(path)
    if p.is_dir():
        for ext in (".jsonl", ".csv"):
            if (p / f"{split}{ext}").exists():
                return p / f"{split}{ext}"
        raise FileNotFoundError(f"no {split}.jsonl or {split}.csv in {p}")
    if not p.exists():
        raise FileNotFoundError(f"rankings file {p} does not exist")
    return p


def _pair_agreement(ranks: np.ndarray, gold: np.ndarray) -> float:
    """Fraction of untied labeled pairs whose order matches the gold scores' order."""
    i, j = np.triu_indices(ranks.shape[1], 1)
    untied = ranks[:, i] != ranks[:, j]
    agree = (ranks[:, i] < ranks[:, j]) == (gold[:, i] > gold[:, j])
    return float(agree[untied].mean()) if untied.any() else float("nan")


if __name__ == "__main__":
    train(common.parse(Config, PRESETS))
