"""Hard kills: a stage runs as a subprocess (``python -m experiments.<stage> --preset tiny``), is
SIGKILLed at chosen and random moments (while a checkpoint is being written, between checkpoints,
while the final bundle is being written, at a random time after launch), and the same command is
re-run until it finishes. Its outputs must equal an uninterrupted run's bit for bit: the final
parameters (``load_bundle`` + ``params_of``), every metrics row (timings aside), the summary
(paths and timings aside), and for collect the comparison files.

The uninterrupted runs are the session's tiny pipeline (``tiny_run``), whose stages have the same
configs. The default suite kills PPO at 2 points; the slow suite kills every stage at 4 (16
points). The random moments come from ``random.Random(SEED)``; every wait is bounded.
"""
import dataclasses
import json
import os
from pathlib import Path
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import pipeline
from rlhf_jax.metrics import read_metrics
from rlhf_jax.runs import load_bundle, params_of

ROOT = Path(__file__).resolve().parents[1]
SEED = 20
POLL_S = 0.003
LAUNCH_TIMEOUT_S = 480
"""The longest one launch may take (a tiny stage takes 20-60 s on 2 busy cores)."""


@dataclasses.dataclass(frozen=True)
class Kill:
    """SIGKILL ``delay`` seconds after a path matching ``after`` (a glob relative to the workdir)
    appears anew (one that was not there, or was another file, at launch); ``after=None``:
    ``delay`` seconds after the launch."""
    after: str | None
    delay: float = 0.0

    def __str__(self):
        return f"{self.delay:.2f}s after " + (f"{self.after} appears" if self.after else "launch")


def command(stage: str, cfg, workdir: Path) -> list[str]:
    """The stage's command line on the tiny preset, reading the session pipeline's inputs."""
    s = pipeline.stage_configs(cfg)[stage]
    args = {"sft": lambda: ["--data-dir", s.data_dir],
            "collect": lambda: ["--data-dir", s.data_dir, "--gold-path", s.gold_path,
                                "--policies", *s.policies],
            "reward": lambda: ["--sft-dir", s.sft_dir, "--comparisons-dir", s.comparisons_dir],
            "ppo": lambda: ["--data-dir", s.data_dir, "--sft-dir", s.sft_dir, "--reward-dir",
                            s.reward_dir, "--gold-path", s.gold_path]}[stage]()
    return [sys.executable, "-m", f"experiments.{stage}", "--preset", "tiny",
            "--workdir", str(workdir), *args]


def _env() -> dict:
    """This session's devices and flags (conftest.py), and its compilation cache."""
    return {**os.environ, "JAX_THREEFRY_PARTITIONABLE": "true", "JAX_NUM_CPU_DEVICES": "8",
            "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5", "TQDM_DISABLE": "1"}


def _present(workdir: Path, pattern: str) -> dict[Path, int]:
    """``{path: inode}`` of the paths matching ``pattern`` now."""
    out = {}
    for p in workdir.glob(pattern):
        try:
            out[p] = p.stat().st_ino
        except FileNotFoundError:  # removed between the listing and the stat
            pass
    return out


def launch(cmd: list[str], workdir: Path, log: Path, kill: Kill | None) -> dict:
    """Runs ``cmd`` once; SIGKILLs it at ``kill``. Returns what happened: ``killed`` (False: the
    process ended first), ``mid_write`` (a temporary folder that triggered the kill was still
    there when the process died: the write was cut), ``rc``."""
    pattern = kill.after if kill else None
    at_launch = _present(workdir, pattern) if pattern else {}
    with open(log, "a") as out:
        out.write(f"\n=== {' '.join(cmd[2:4])} kill: {kill}\n")
        out.flush()
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        fire_at = t0 + kill.delay if kill and not pattern else None
        trigger = None
        try:
            while proc.poll() is None:
                now = time.monotonic()
                assert now - t0 < LAUNCH_TIMEOUT_S, f"launch took over {LAUNCH_TIMEOUT_S}s: {log}"
                if pattern and trigger is None:
                    new = [p for p, ino in _present(workdir, pattern).items()
                           if at_launch.get(p) != ino]
                    if new:
                        trigger, fire_at = new[0], now + kill.delay
                if fire_at is not None and now >= fire_at:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=60)
                    out.write(f"=== SIGKILL ({trigger or 'timer'}) after {now - t0:.2f}s\n")
                    return {"killed": True, "rc": proc.returncode, "mid_write": trigger
                            is not None and "tmp" in trigger.name and trigger.exists()}
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
    return {"killed": False, "rc": proc.returncode, "mid_write": False}


def run_with_kills(stage: str, cfg, workdir: Path, kills: list[Kill]) -> tuple[list, str]:
    """Launches the stage once per kill, then once more to the end (which must succeed); returns
    what each launch did and the log of them all."""
    cmd, log = command(stage, cfg, workdir), workdir.parent / f"{workdir.name}.log"
    results = []
    for kill in kills:
        results.append(dict(launch(cmd, workdir, log, kill), kill=str(kill)))
    final = launch(cmd, workdir, log, None)
    assert final["rc"] == 0, f"the re-run after the kills failed:\n{log.read_text()[-6000:]}"
    outcome = ["MISSED" if not r["killed"] else "killed mid-write" if r["mid_write"]
               else "killed" for r in results]
    print(f"[{stage}] " + "; ".join(f"{r['kill']}: {o}" for r, o in zip(results, outcome)))
    missed = [r["kill"] for r in results if not r["killed"]]
    assert not missed, f"[{stage}] these launches ended before their kill moment: {missed}"
    return results, log.read_text()


def _rows(path: Path) -> list[dict]:
    """Every metrics row in file order, timings removed."""
    rows = [json.loads(x) for x in open(path) if x.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def _summary(workdir: Path) -> dict:
    s = json.loads((workdir / "summary.json").read_text())
    for k in ("config", "median_iteration_seconds"):
        s.pop(k, None)
    return s


def assert_same_outputs(stage: str, got: Path, ref: Path) -> None:
    """``got`` (killed and re-run) equals ``ref`` (uninterrupted), bit for bit."""
    assert _summary(got) == _summary(ref)
    if stage == "collect":
        for name in ("train.jsonl", "eval.jsonl"):
            assert (got / name).read_bytes() == (ref / name).read_bytes(), name
        return
    assert _rows(got / "metrics.jsonl") == _rows(ref / "metrics.jsonl")
    assert [r["step"] for r in read_metrics(got / "metrics.jsonl")] == \
        [r["step"] for r in _rows(got / "metrics.jsonl")]  # every step once, in order
    for bundle in ("final", "half") if stage == "sft" else ("final",):
        a = jax.tree_util.tree_leaves_with_path(params_of(load_bundle(got / bundle)[0]))
        b = jax.tree_util.tree_leaves_with_path(params_of(load_bundle(ref / bundle)[0]))
        assert [p for p, _ in a] == [p for p, _ in b]
        for (path, x), (_, y) in zip(a, b):
            np.testing.assert_array_equal(x, y, err_msg=f"{bundle}{jax.tree_util.keystr(path)}")
    if stage == "ppo":
        for name in ("hf/model.safetensors", "hf/config.json"):
            assert (got / "final" / name).read_bytes() == (ref / "final" / name).read_bytes()
        assert (got / "samples.md").read_text() == (ref / "samples.md").read_text()
    leftovers = [p.name for p in got.rglob("*") if ".orbax-checkpoint-tmp" in p.name
                 or p.name.startswith((".final", ".half", ".tokenizer"))]
    assert not leftovers, leftovers


def test_ppo_killed_at_two_points_resumes_bit_identically(tiny_run, tmp_path):
    """Killed while checkpoint 4 is being written (rows 3-4 were logged after checkpoint 2), then
    at a random moment after checkpoint 4 (evaluation, samples, the final bundle)."""
    cfg, _ = tiny_run
    rng = random.Random(SEED)
    kills = [Kill("ckpt/4.orbax-checkpoint-tmp"), Kill("ckpt/4", rng.uniform(0.0, 0.3))]
    results, log = run_with_kills("ppo", cfg, tmp_path / "ppo", kills)
    assert "resumed from iteration 2" in log and "resumed from iteration 4" in log, log[-3000:]
    if results[0]["mid_write"]:
        assert "removed 4.orbax-checkpoint-tmp" in log
    assert_same_outputs("ppo", tmp_path / "ppo", Path(pipeline.stage_configs(cfg)["ppo"].workdir))


def _plan(stage: str, seconds: float, rng: random.Random) -> list[Kill]:
    """Kill moments for a stage whose uninterrupted run took ``seconds`` (in-process, so a
    subprocess, which also imports and compiles, always runs longer than a random moment drawn
    from a part of it). The tiny presets' checkpoint steps are single digits (``ckpt/[0-9]``)."""
    if stage == "collect":  # no checkpoints: its outputs are the fingerprint and two splits
        return [Kill(None, rng.uniform(0.1, 0.4) * seconds), Kill("fingerprint.json"),
                Kill("train.jsonl"), Kill("eval.jsonl")]
    return [Kill(None, rng.uniform(0.2, 0.6) * seconds),       # start-up, data, compile, steps
            Kill("ckpt/*.orbax-checkpoint-tmp"),                # mid-checkpoint write
            Kill("ckpt/[0-9]", rng.uniform(0.0, 0.5)),          # between checkpoints
            Kill(".final.tmp")]                                 # mid final bundle


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "collect", "reward", "ppo"])
def test_every_stage_killed_at_random_points_resumes_bit_identically(tiny_run, tmp_path, stage):
    cfg, _ = tiny_run
    seconds = json.loads((Path(cfg.root) / "timings.json").read_text())[stage]
    plan = _plan(stage, seconds, random.Random(f"{SEED}-{stage}"))
    results, log = run_with_kills(stage, cfg, tmp_path / stage, plan)
    assert len(results) == 4 and all(r["killed"] for r in results)
    if stage != "collect":
        assert results[1]["mid_write"], "the mid-checkpoint kill found the write complete"
        assert "a checkpoint whose writing was interrupted" in log
    assert_same_outputs(stage, tmp_path / stage, Path(pipeline.stage_configs(cfg)[stage].workdir))
