"""New tokens per second: our compiled KV-cache sampler vs Hugging Face ``generate`` (PyTorch).

Both sides run the same randomly initialised GPT-2 weights (built in torch, written with
``save_pretrained``, read back by ``rlhf_jax.models.hf.load_pretrained``), the same batch of
64-token prompts, ``--new-tokens`` (64) new tokens with EOS stopping disabled
(``min_new_tokens``), plain sampling at temperature 1 (no top-k / top-p), the KV cache on, f32,
and all CPU cores (``torch.set_num_threads``). Figures are the median over ``--repeats`` runs after
one warm-up; our compile time (first call minus a run) is reported separately.
``--compute-dtype bfloat16`` adds rows for our sampler with bf16 matmuls (f32 accumulation); the
f32 rows are the like-for-like comparison, unless ``--hf-bf16`` also times HF with bf16 weights,
which our bf16 rows are then compared with.

On a GPU: ``BENCH_TORCH_DEVICE=cuda`` puts the HF model on the GPU (f32 matmuls in TF32, as JAX
does by default there); JAX uses its default device.

Run (the table is printed; ``--out`` rewrites the "## Generation" section of RESULTS.md)::

    .venv/bin/python benchmarks/generation.py --configs tiny gpt2 --batch-sizes 1 8 32 \
        --repeats 5 --out benchmarks/RESULTS.md

``--compute-dtype bfloat16`` is for accelerators and CPUs with bf16 units: XLA:CPU in jax 0.10
has no bf16 × bf16 → f32 dot and stops with "Unsupported element type for DotThunk".
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/)

PROMPT_LEN = 64
SECTION = "## Generation"


@dataclasses.dataclass
class Row:
    config: str
    impl: str
    batch: int
    tokens_per_s: float
    run_s: float
    compile_s: float | None = None
    hf_tokens_per_s: float | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.hf_tokens_per_s is None else self.tokens_per_s / self.hf_tokens_per_s


def _hf_config(name: str):
    from transformers import GPT2Config

    from rlhf_jax.models.config import PRESETS
    cfg = PRESETS[name]
    if cfg.family != "gpt2":
        raise ValueError(f"--configs {name}: only gpt2-family presets are benchmarked")
    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                      n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.mlp_dim,
                      layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
                      bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1,
                      pad_token_id=cfg.vocab_size - 1)


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench_hf(model, prompts: np.ndarray, repeats: int, new_tokens: int) -> float:
    """Median seconds of one ``generate`` call (after one warm-up call), on the model's device."""
    import torch
    ids = torch.from_numpy(prompts.astype(np.int64)).to(model.device)
    mask = torch.ones_like(ids)
    eos = model.config.eos_token_id

    def run():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, use_cache=True, eos_token_id=eos,
                                 pad_token_id=eos)
        out = out.cpu()  # waits for the device
        assert out.shape == (ids.shape[0], PROMPT_LEN + new_tokens), out.shape

    run()
    return statistics.median(_time(run, repeats))


def bench_ours(model, prompts: np.ndarray, repeats: int, eos: int,
               new_tokens: int) -> tuple[float, float]:
    """(median seconds of one compiled ``sample`` call, compile seconds)."""
    import jax

    from rlhf_jax import generation
    cfg = generation.SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, eos_id=eos,
                                    pad_id=eos, min_new_tokens=new_tokens)
    tokens = jax.numpy.asarray(prompts, jax.numpy.int32)
    mask = jax.numpy.ones(prompts.shape, bool)
    calls = iter(range(10 ** 9))

    def run():
        out = generation.sample_jit(model, tokens, mask, jax.random.key(next(calls)), cfg)
        out.tokens.block_until_ready()
        assert bool(out.mask.all()), "a row stopped early"

    first = _time(run, 1)[0]
    times = _time(run, repeats)
    median = statistics.median(times)
    return median, max(first - median, 0.0)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jax
    import torch
    import transformers
    gpu = (f"{torch.cuda.get_device_name(0)} (torch on cuda, TF32), "
           if common.torch_device() == "cuda" else "")
    return (f"{gpu}{cpu}, {os.cpu_count()} cores visible, Python {platform.python_version()}, "
            f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")


def markdown(rows: list[Row], args, where: str) -> str:
    lines = [
        SECTION, "",
        f"`benchmarks/generation.py` — new tokens/s sampling {args.new_tokens} tokens after a "
        f"{PROMPT_LEN}-token prompt (EOS stopping off, temperature 1, no top-k/top-p, KV cache "
        f"on), random GPT-2 weights shared by both sides. Median of {args.repeats} runs after "
        "one warm-up; our compile time is separate. \"ratio\" = ours / HF at the same batch; the "
        "f32 rows are like-for-like, bf16 rows use bf16 matmuls with f32 accumulation (and are "
        "compared with HF's bf16 row where there is one).", "",
        f"Machine: {where}. Run {datetime.date.today().isoformat()}: "
        f"`{shlex.join(['python', 'benchmarks/generation.py'] + sys.argv[1:])}`.", "",
        "| model | implementation | batch | new tokens/s | s / call | compile s | ratio vs HF |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.config} | {r.impl} | {r.batch} | {r.tokens_per_s:,.0f} | "
                     f"{r.run_s:.3f} | {'' if r.compile_s is None else f'{r.compile_s:.1f}'} | "
                     f"{'' if r.ratio is None else f'{r.ratio:.2f}x'} |")
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines) + "\n"


def write_section(path: pathlib.Path, section: str) -> None:
    """Replace (or append) the ``## Generation`` section, keeping every other section."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "gpt2"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compute-dtype", action="append", choices=["float32", "bfloat16"],
                        default=[], help="extra compute dtypes for ours (float32 always runs)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--hf-bf16", action="store_true",
                        help="also time HF generate with bf16 weights (our bf16 rows' reference)")
    parser.add_argument("--note", default="", help="a line appended under the table")
    parser.add_argument("--out", type=pathlib.Path, nargs="?",
                        const=pathlib.Path(__file__).with_name("RESULTS.md"), default=None,
                        help="write the markdown section here (default benchmarks/RESULTS.md)")
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(os.cpu_count())
    if common.torch_device() == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    from transformers import GPT2LMHeadModel

    from rlhf_jax.models.hf import load_pretrained

    dtypes = ["float32"] + [d for d in dict.fromkeys(args.compute_dtype) if d != "float32"]
    rows: list[Row] = []
    for name in args.configs:
        hf_cfg = _hf_config(name)
        torch.manual_seed(0)
        hf_model = GPT2LMHeadModel(hf_cfg).eval()
        with tempfile.TemporaryDirectory() as tmp:
            hf_model.save_pretrained(tmp)
            ours = {d: load_pretrained(tmp, compute_dtype=d)[1] for d in dtypes}
        rng = np.random.default_rng(0)
        for batch in args.batch_sizes:
            prompts = rng.integers(0, hf_cfg.vocab_size - 1, (batch, PROMPT_LEN))
            hf_tps: dict[str, float] = {}
            hf_dtypes = ["float32"] + (["bfloat16"] if args.hf_bf16 else [])
            for dtype in [] if args.skip_hf else hf_dtypes:
                model = hf_model.to(device=common.torch_device(), dtype=getattr(torch, dtype))
                hf_s = bench_hf(model, prompts, args.repeats, args.new_tokens)
                hf_tps[dtype] = batch * args.new_tokens / hf_s
                label = "f32" if dtype == "float32" else "bf16"
                rows.append(Row(name, f"HF transformers generate (torch, {label})", batch,
                                hf_tps[dtype], hf_s))
                print(rows[-1], flush=True)
            hf_model.to(device="cpu", dtype=torch.float32)
            for dtype in dtypes:
                run_s, compile_s = bench_ours(ours[dtype], prompts, args.repeats,
                                              hf_cfg.eos_token_id, args.new_tokens)
                label = "f32" if dtype == "float32" else "bf16"
                rows.append(Row(name, f"rlhf_jax sample ({label})", batch,
                                batch * args.new_tokens / run_s, run_s, compile_s,
                                hf_tps.get(dtype, hf_tps.get("float32"))))
                print(rows[-1], flush=True)
    where = machine()
    section = markdown(rows, args, where)
    print()
    print(section)
    if args.out is not None:
        write_section(args.out, section)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
