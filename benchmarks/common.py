"""Shared helpers for the benchmark scripts: machine description, timing, FLOP counts, results.

This module imports only the standard library, so every script can use it from either virtual
environment (the JAX one in ``.venv`` and the PyTorch/TRL one in ``.venv-baseline``). Scripts import
it as ``import common`` after putting ``benchmarks/`` on ``sys.path`` (a script that lives
directly in ``benchmarks/`` gets that for free).

Result format. Every script writes one JSON file (``write_results``)::

    {"machine": machine_info(...), "results": [record, ...]}

and each record is a flat dict::

    bench     "ppo" | "reward" | "sft" | "peak" | ...      what is measured
    case      "tiny" | "gpt2" | "f32-2048" | ...           which shape
    side      "ours" (alias "jax") | "trl" | "torch"       whose implementation
    dtype     "float32" | "bfloat16"                       compute dtype of the matmuls
    unit      "s/iter" | "s/step" | "FLOP/s"
    median, p10, p90, runs                                 seconds (see ``time_fn``); for "peak"
                                                           records ``value`` holds FLOP/s instead
    compile_s (optional)  time of the first call minus the median (trace + compile), seconds
    flops     (optional)  model FLOPs of one timed unit (``train_flops`` & co.); MFU uses it
    mfu_part  (optional)  {"flops": F, "median": s} for a sub-part whose MFU is reported on its
                          own, e.g. the PPO update inside a PPO iteration
    config    (optional)  dict of the shapes/settings used; notes (optional) free text

``update_results_md`` renders all records found in ``benchmarks/out/*.json`` into
``benchmarks/RESULTS.md``, pairing ``side="ours"`` with ``side="trl"`` records of the same
(bench, case, dtype) and printing the speed-up; it keeps the sections it does not write (the
``## Generation`` section written by ``benchmarks/generation.py``, a GPU run's section) as it finds
them.
"""

from __future__ import annotations

import datetime
import glob
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable, Iterable

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "out")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")

#: Speed-up targets of the benchmark issue: (bench, case) -> minimum ours/TRL throughput ratio.
TARGETS = {
    ("ppo", "tiny"): 10.0,
    ("ppo", "gpt2"): 3.0,
    ("reward", "gpt2"): 2.0,
    ("sft", "gpt2"): 2.0,
}
#: Target for SFT-step model FLOPs utilisation against the measured f32 matmul peak.
SFT_MFU_TARGET = 0.40

# ---------------------------------------------------------------------------------------------
# Machine description


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_device() -> str:
    """Where the PyTorch side runs: ``cuda`` when ``BENCH_TORCH_DEVICE=cuda``, else ``cpu``."""
    return "cuda" if os.environ.get("BENCH_TORCH_DEVICE", "cpu") == "cuda" else "cpu"


def machine_info(device: str | None = None) -> dict[str, Any]:
    """Describes the machine and the installed stack (nothing is imported to find versions).

    Args:
      device: what the timed code ran on, e.g. ``str(jax.devices()[0].device_kind)`` or ``"cpu"``.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {
        d: _version(d)
        for d in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "trl", "accelerate",
                  "numpy")
    }
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_gib": _ram_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device": device,
        "versions": {k: v for k, v in versions.items() if v is not None},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def quick() -> bool:
    """True when ``QUICK=1``: a fast smoke run with fewer iterations."""
    return os.environ.get("QUICK", "0") not in ("", "0", "false", "False")


# ---------------------------------------------------------------------------------------------
# Timing


def _percentile(xs: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of a non-empty list, q in [0, 100]."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(runs: list[float], first: float | None = None) -> dict[str, Any]:
    """Median/p10/p90 of per-iteration seconds; ``compile_s = first - median`` when given."""
    if not runs:
        raise ValueError("summarize: no timed runs (iters must be >= 1)")
    out: dict[str, Any] = {
        "median": statistics.median(runs),
        "p10": _percentile(runs, 10),
        "p90": _percentile(runs, 90),
        "runs": [round(r, 6) for r in runs],
    }
    if first is not None:
        out["first_s"] = first
        out["compile_s"] = max(first - out["median"], 0.0)
    return out


def time_fn(fn: Callable[[], Any], warmup: int = 1, iters: int = 5,
            sync: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Times ``fn()`` ``warmup + iters`` times; returns ``summarize`` of the last ``iters``.

    The first call's time is kept as ``first_s``, and ``compile_s = first_s - median`` estimates the
    trace/compile cost of a jitted ``fn``. ``sync(result)`` runs inside the timed region and must
    wait for asynchronous work (``jax.block_until_ready``); without it the result is unsynchronised.
    """
    if warmup < 1:
        raise ValueError(f"time_fn: warmup must be >= 1 (the first call is compile), got {warmup}")
    times = []
    for _ in range(warmup + iters):
        t0 = time.perf_counter()
        out = fn()
        if sync is not None:
            sync(out)
        times.append(time.perf_counter() - t0)
    return summarize(times[warmup:], first=times[0])


# ---------------------------------------------------------------------------------------------
# Model FLOPs (GPT-2 family). Formula: PaLM appendix B (Chowdhery et al. 2022).


def gpt2_matmul_params(n_layer: int, d_model: int, vocab: int, lm_head: bool = True) -> int:
    """Weights that take part in matmuls: 12·L·D² per block (+ V·D for the tied LM head).

    Per block: qkv D×3D, attention out D×D, MLP D×4D and 4D×D. Biases, norms and the embedding
    lookups are not matmuls and are left out.
    """
    return 12 * n_layer * d_model * d_model + (vocab * d_model if lm_head else 0)


def forward_flops(n_layer: int, d_model: int, vocab: int, seq_len: int, tokens: int,
                  lm_head: bool = True) -> float:
    """Forward model FLOPs: ``tokens · (2·N + 4·L·T·D)`` (attention without the causal halving)."""
    n = gpt2_matmul_params(n_layer, d_model, vocab, lm_head)
    return float(tokens) * (2.0 * n + 4.0 * n_layer * seq_len * d_model)


def train_flops(n_layer: int, d_model: int, vocab: int, seq_len: int, tokens: int,
                lm_head: bool = True) -> float:
    """Forward + backward model FLOPs: ``tokens · (6·N + 12·L·T·D)`` (PaLM's MFU numerator).

    N = ``gpt2_matmul_params``; T = sequence length; tokens = batch · T (padding included).
    """
    return 3.0 * forward_flops(n_layer, d_model, vocab, seq_len, tokens, lm_head)


def ppo_update_flops(n_layer: int, d_model: int, vocab: int, batch: int, seq_len: int,
                     epochs: int, response: int) -> float:
    """Model FLOPs of the PPO epochs×minibatches update of one iteration.

    Every epoch runs forward+backward over the whole rollout batch (split into minibatches) for the
    policy and the value model (separate backbone, scalar head, no LM head) over ``batch · seq_len``
    tokens, ``seq_len = query + response``. The policy's LM head is counted on the ``batch ·
    response`` positions whose log-probs the loss uses: logits of query positions are not model
    work PPO needs (an implementation that computes them spends FLOPs this count leaves out).
    """
    tokens = batch * seq_len
    policy = (train_flops(n_layer, d_model, vocab, seq_len, tokens, lm_head=False)
              + 6.0 * batch * response * vocab * d_model)
    value = train_flops(n_layer, d_model, vocab, seq_len, tokens, lm_head=False)
    return epochs * (policy + value)


# ---------------------------------------------------------------------------------------------
# Result files


def record(bench: str, case: str, side: str, timing: dict[str, Any], *, unit: str = "s/step",
           dtype: str = "float32", **extra: Any) -> dict[str, Any]:
    """One result record (see the module docstring); ``timing`` comes from ``time_fn``."""
    rec = {"bench": bench, "case": case, "side": side, "dtype": dtype, "unit": unit}
    rec.update(timing)
    rec.update(extra)
    return rec


def write_results(path: str | None, records: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    """Writes ``{"machine", "results"}`` to ``path`` (and always prints it to stdout)."""
    text = json.dumps({"machine": machine, "results": records}, indent=1, sort_keys=True)
    print(text)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")
    return text


def load_results(paths: Iterable[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Reads result files; returns (records, machines), records tagged with their ``file``."""
    records, machines = [], []
    for p in sorted(paths):
        with open(p) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: not a benchmark result file ({e})") from e
        if not isinstance(data, dict) or "results" not in data:
            raise ValueError(f"{p}: expected an object with 'machine' and 'results' keys")
        machines.append(data.get("machine", {}))
        for r in data["results"]:
            records.append(dict(r, file=os.path.basename(p)))
    return records, machines


# ---------------------------------------------------------------------------------------------
# RESULTS.md


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "—"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 1:
        return f"{x:.2f}"
    if x >= 0.01:
        return f"{x:.3f}"
    return f"{x * 1e3:.2f} ms"


def _fmt_timing(r: dict[str, Any] | None) -> str:
    if r is None:
        return "—"
    return f"{_fmt_s(r['median'])} ({_fmt_s(r['p10'])}–{_fmt_s(r['p90'])}, n={len(r['runs'])})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _peak(records: list[dict[str, Any]], side: str, dtype: str) -> dict[str, Any] | None:
    best = None
    for r in records:
        if r["bench"] == "peak" and r["side"] == side and r["dtype"] == dtype:
            if best is None or r["value"] > best["value"]:
                best = r
    return best


def _limit_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of the "how far a speed-up can go" table (see ``render_results``)."""
    peak = _peak(records, "jax", "float32")
    if not peak:
        return []
    by_key = _by_key(records)
    rows = []
    for (bench, case), target in TARGETS.items():
        trl = by_key.get((bench, case, "trl", "float32"))
        ours = by_key.get((bench, case, "ours", "float32"))
        if not trl or not ours:
            continue
        if bench == "ppo":  # the update is the part with a FLOP count; the rollout is not bounded
            if not (trl.get("update_s") and ours.get("mfu_part")):
                continue
            what, flops = f"{case} PPO update", ours["mfu_part"]["flops"]
            trl_s, ours_s = trl["update_s"]["median"], ours["mfu_part"]["median"]
        else:
            if not ours.get("flops"):
                continue
            what, flops, trl_s, ours_s = f"{case} {bench} step", ours["flops"], trl["median"], \
                ours["median"]
        floor = flops / peak["value"]
        rows.append([what, f"{flops / 1e12:.3f}", _fmt_s(floor), _fmt_s(trl_s),
                     f"{trl_s / floor:.2f}×", f"≥{target:g}× (whole {bench} "
                     f"{'iteration' if bench == 'ppo' else 'step'})", _fmt_s(ours_s),
                     f"{trl_s / ours_s:.2f}×"])
    return rows


def _shape_text(cfg: dict[str, Any] | None) -> str:
    if not cfg:
        return ""
    keys = ("layers", "d_model", "heads", "vocab", "batch", "pairs", "query", "response",
            "seq_len", "epochs", "minibatches")
    return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def _side(r: dict[str, Any]) -> str:
    """"ours" for our records (written as "ours" or "jax"), else the record's side."""
    return "ours" if r["side"] in ("ours", "jax") and r["bench"] != "peak" else r["side"]


def _by_key(records: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """Records by ``(bench, case, side, dtype)``, with our records under side "ours"."""
    return {(r["bench"], r["case"], _side(r), r.get("dtype", "float32")): r for r in records}


_SECTIONS = [
    ("ppo", "PPO iteration (rollout + scoring + update)", "s/iter"),
    ("reward", "Reward-model training step (Bradley–Terry, pairs)", "s/step"),
    ("sft", "SFT training step", "s/step"),
]


def render_results(records: list[dict[str, Any]], machines: list[dict[str, Any]]) -> str:
    """Markdown for everything except the sections other scripts or people write."""
    by_key = _by_key(records)
    lines = ["# Benchmark results", ""]
    lines += [
        "Written by `benchmarks/run_all.sh` (`make bench`); see `benchmarks/README.md` for what",
        "each figure means. Times are the median of the timed iterations after warm-up, with the",
        "10th–90th percentile range and the number of timed runs in brackets; compile time is",
        "reported separately and excluded. Speed-up = TRL seconds / ours seconds (higher is better",
        "for us).",
        "",
    ]
    lines += ["## Machine", ""]
    hosts: dict[str, list[str]] = {}
    versions: dict[str, str] = {}
    for m in machines:
        if not m.get("cpu_model"):
            continue
        host = (f"{m.get('cpu_model')}, {m.get('logical_cores')} logical cores "
                f"({m.get('usable_cores')} usable), {m.get('ram_gib')} GiB RAM, "
                f"{m.get('platform')}, Python {m.get('python')}")
        hosts.setdefault(host, [])
        if m.get("date"):
            hosts[host].append(m["date"])
        if m.get("device") and m["device"] not in hosts[host]:
            hosts[host].insert(0, m["device"])
        versions.update(m.get("versions", {}))
    for host, extra in hosts.items():
        devices = [e for e in extra if "UTC" not in e]
        dates = sorted(e for e in extra if "UTC" in e)
        when = f"; run {dates[0]} – {dates[-1]}" if dates else ""
        lines.append(f"- CPU: {host}; devices: {', '.join(devices) or '?'}{when}")
    if versions:
        lines.append("- Software: " + ", ".join(f"{k} {versions[k]}" for k in sorted(versions)))
    if quick_runs := sorted({r["file"] for r in records if r.get("quick")}):
        lines += ["", f"**Smoke run (QUICK=1): few iterations, figures are indicative only** "
                  f"({', '.join(quick_runs)})."]
    lines.append("")

    for bench, title, unit in _SECTIONS:
        order = {"tiny": 0, "gpt2": 1}
        cases = sorted({r["case"] for r in records if r["bench"] == bench},
                       key=lambda c: (order.get(c, 2), c))
        if not cases:
            continue
        lines += [f"## {title}", ""]
        rows = []
        for case in cases:
            trl = by_key.get((bench, case, "trl", "float32"))
            ours = by_key.get((bench, case, "ours", "float32"))
            cfg = dict((trl or {}).get("config") or {}, **((ours or {}).get("config") or {}))
            ratio = trl["median"] / ours["median"] if trl and ours else None
            target = TARGETS.get((bench, case))
            verdict = ""
            if ratio is not None and target is not None:
                verdict = "met" if ratio >= target else "not met"
            compile_s = ours.get("compile_s") if ours else None
            rows.append([
                case, _shape_text(cfg), _fmt_timing(trl), _fmt_timing(ours),
                f"{ratio:.2f}×" if ratio else "—",
                f"≥{target:g}× {verdict}".strip() if target else "—",
                _fmt_s(compile_s) if compile_s is not None else "—",
            ])
        lines += _table(["case", "shape", f"TRL {unit}", f"ours {unit}", "speed-up", "target",
                         "ours compile s"], rows)
        notes = [f"- {r['side']} {r['case']}: {r['notes']}" for r in records
                 if r["bench"] == bench and r.get("notes")]
        lines += [""] + notes + ([""] if notes else [])

    # MFU
    mfu_rows = []
    for r in records:
        if r["bench"] == "peak":
            continue
        parts = []
        if r.get("flops") and r["bench"] != "ppo":
            parts.append((f"{r['bench']} step", r["flops"], r["median"]))
        if r.get("mfu_part"):
            p = r["mfu_part"]
            parts.append((p.get("name", "part"), p["flops"], p["median"]))
        for name, flops, secs in parts:
            peak_side = "jax" if _side(r) == "ours" else "torch"
            peak = _peak(records, peak_side, r.get("dtype", "float32"))
            peak_f32 = _peak(records, peak_side, "float32")
            achieved = flops / secs
            mfu = achieved / peak["value"] if peak else None
            mfu32 = achieved / peak_f32["value"] if peak_f32 else None
            target = ""
            if r["bench"] == "sft" and _side(r) == "ours" and r.get("dtype") == "float32" and mfu:
                target = f"≥{SFT_MFU_TARGET:.0%} " + ("met" if mfu >= SFT_MFU_TARGET else "not met")
            mfu_rows.append([
                f"{r['side']} {r['case']} {name}", r.get("dtype", "float32"), f"{flops / 1e12:.3f}",
                _fmt_s(secs), f"{achieved / 1e12:.3f}",
                f"{peak['value'] / 1e12:.3f}" if peak else "—",
                f"{mfu:.1%}" if mfu is not None else "—",
                f"{mfu32:.1%}" if mfu32 is not None else "—", target or "—",
            ])
    limit_rows = _limit_rows(records)
    if limit_rows:
        lines += ["## How far a speed-up can go on this machine", ""]
        lines += [
            "The least time a step can take is its model FLOPs divided by the measured f32 matmul",
            "peak (JAX's, the faster one). TRL seconds divided by that floor is the largest",
            "speed-up any implementation doing the same model work could show here; a target",
            "above it cannot be met on this machine by code alone.",
            "",
        ]
        lines += _table(["what", "model TFLOP", "floor s (at JAX f32 peak)", "TRL s",
                         "largest possible speed-up", "target", "ours s", "our speed-up"],
                        limit_rows)
        lines.append("")
    peaks = [r for r in records if r["bench"] == "peak"]
    if peaks:
        lines += ["## Measured matmul peak", ""]
        lines += _table(["side", "dtype", "case", "TFLOP/s (best of runs)", "notes"], [[
            p["side"], p["dtype"], p["case"], f"{p['value'] / 1e12:.3f}", p.get("notes", "")
        ] for p in sorted(peaks, key=lambda p: (p["side"], p["dtype"], p["case"]))])
        lines.append("")
    if mfu_rows:
        lines += ["## Model FLOPs utilisation", ""]
        lines += [
            "Model FLOPs per step = tokens · (6·N + 12·L·T·D) for forward+backward (PaLM",
            "appendix B), N = matmul weights (12·L·D² + V·D with the LM head), T = sequence",
            "length, D = d_model; the PPO update counts policy + value model (no LM head) over",
            "epochs × batch × (query + response) tokens, plus the policy's LM head on the",
            "epochs × batch × response positions whose log-probs PPO uses (logits of query",
            "positions are not counted as model work). MFU = achieved FLOP/s / measured matmul",
            "peak of the same dtype from the same run (JAX peak for ours, torch peak for TRL);",
            "the 'MFU vs f32 peak' column always divides by the f32 peak.",
            "",
        ]
        lines += _table(["what", "dtype", "model TFLOP/step", "s/step", "achieved TFLOP/s",
                         "peak TFLOP/s", "MFU", "MFU vs f32 peak", "target"], mfu_rows)
        lines.append("")
    return "\n".join(lines)


_SECTION_RE = re.compile(r"^## (.*?)\n.*?(?=^## |\Z)", re.S | re.M)


def update_results_md(records: list[dict[str, Any]], machines: list[dict[str, Any]],
                      path: str = RESULTS_MD) -> str:
    """Rewrites ``path`` from ``records``, keeping verbatim every ``## `` section that the
    records do not produce: ``## Generation`` (written by ``generation.py``) and hand-written
    ones such as a GPU run's figures."""
    text = render_results(records, machines).rstrip() + "\n"
    ours = {m.group(1) for m in _SECTION_RE.finditer(text)}
    if os.path.exists(path):
        with open(path) as f:
            for m in _SECTION_RE.finditer(f.read()):
                if m.group(1) not in ours:
                    text += "\n" + m.group(0).rstrip() + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def main(argv: list[str] | None = None) -> None:
    """``python benchmarks/common.py [RESULT.json ...]``: rewrite RESULTS.md from result files."""
    argv = sys.argv[1:] if argv is None else argv
    paths = argv or glob.glob(os.path.join(OUT_DIR, "*.json"))
    records, machines = [], []
    for p in paths:
        try:
            r, m = load_results([p])
        except (ValueError, OSError) as e:  # e.g. a file in another script's own format
            print(f"skipped {p}: {e}")
            continue
        records += r
        machines += m
    update_results_md(records, machines)
    print(f"wrote {RESULTS_MD} from {len(records)} records in {len(paths)} files")


if __name__ == "__main__":
    main()
