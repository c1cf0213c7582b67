"""LoRA (Hu et al. 2021) on the Transformer's attention and MLP projections.

A projection ``y = x · W`` (``W [*in, *out]``, see ``transformer._dense``) gets a low-rank update
``y + s · (x · A) · B`` with ``A [*in, r]``, ``B [r, *out]``, ``s = alpha / r``. ``A`` is drawn
from ``N(0, 1 / fan_in)`` and ``B`` starts at 0, so a freshly adapted model computes exactly the
base model's outputs. Only ``A`` and ``B`` are trained; ``W`` stays frozen.

Design: our own adapter pair, not ``nnx.LoRA`` / ``nnx.LoRALinear``. Those wrap ``nnx.Linear``
modules (2-D kernels, a ``base_module`` call, no ``alpha / r`` scale), while our Transformer holds
raw kernels of higher rank (the fused ``qkv [D, N + 2K, H]``, ``out [N, H, D]``) multiplied by
``_dense``. Wrapping them in ``nnx.Linear`` would change the parameter paths that the HF/GGUF key
tables, the checkpoints and the model bundles rely on. Instead :func:`apply_lora` attaches an
optional :class:`LoraAdapter` as ``module.lora_<proj>`` and the Transformer's ``_adapted`` hook adds
its update after the projection's ``_dense``. A model without adapters has no such attribute, so its
graph and outputs are bit-identical to before. Adapter leaves are :class:`LoraParam`, an
``nnx.Param`` subclass, so ``nnx.split(model, LoraParam, ...)`` separates the adapters from the
frozen base, and the base state keeps exactly the plain model's tree structure.

In short: ``apply_lora(model, LoraConfig(r, alpha))`` attaches ``LoraParam`` pairs (A random,
B = 0: the model starts exactly at the base) to the attention (q/k/v heads of the fused qkv, out)
and MLP (up, gate, down) projections. Adapters, frozen base and any head are separate states
(:func:`split`); the base state merged with the base graph (:func:`base_graphdef`) is the model
with adapters off, without a second copy. :func:`merge_lora` folds the adapters into the kernels
(HF export); adapter checkpoints name their base by path and sha256 (:func:`save_adapters`).

Targets are named after the Transformer's projections (both families fuse q, k and v into one
``qkv`` kernel): ``"qkv"`` (one pair over the whole fused projection, like PEFT on GPT-2's
``c_attn``), or any of ``"q"``, ``"k"``, ``"v"`` (one pair each on those heads of the fused
kernel, like PEFT on Llama's ``q_proj``/``k_proj``/``v_proj``); ``"out"`` (attention output);
``"up"``, ``"down"`` and ``"gate"`` (MLP; GPT-2 has no gate, so that target is skipped there).

Shapes: B batch, T tokens, D model, N query heads, K kv heads, H head dim, F MLP width, r rank.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.heads import ScalarHead, ScalarModel
from rlhf_jax.models.transformer import _dense, _scaled_normal, Attention, MLP, Transformer

#: Every target name; ``"qkv"`` excludes ``"q"``, ``"k"`` and ``"v"``.
TARGETS = ("qkv", "q", "k", "v", "out", "up", "gate", "down")
#: The projection (attribute of ``Attention`` / ``MLP``) each target adapts.
PROJECTION = {"qkv": "qkv", "q": "qkv", "k": "qkv", "v": "qkv", "out": "out", "up": "up",
              "gate": "gate", "down": "down"}
_PROJECTIONS = {Attention: ("qkv", "out"), MLP: ("up", "gate", "down")}
#: Where a scalar model keeps its Transformer (``ScalarModel.backbone``).
SCALAR_BACKBONE = ("backbone",)
_FORMAT = "rlhf_jax-lora-adapters"


class LoraParam(nnx.Param):
    """An adapter matrix (``A`` or ``B``); everything else in an adapted model is the base."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters.

    Attributes:
      rank: r, the inner dimension of each ``A [*in, r]`` / ``B [r, *out]`` pair.
      alpha: the update is scaled by ``alpha / rank`` (Hu et al. 2021), so changing the rank
        does not change the step size an optimizer needs.
      targets: projections to adapt (see the module docstring); a target the model family
        lacks (``"gate"`` on GPT-2) is skipped.
      dropout: dropout on the adapters' input. Only 0.0 is supported: the Transformer's forward
        takes no random key, and PPO needs the rollout and the update to compute the same
        log-probs (ratio 1 at the first epoch).
    """
    rank: int
    alpha: float
    targets: tuple[str, ...] = ("q", "k", "v", "out", "up", "down", "gate")
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        errs = []
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            errs.append(f"rank={self.rank!r}: expected a positive integer")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                and self.alpha > 0):
            errs.append(f"alpha={self.alpha!r}: expected a finite positive number")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            errs.append(f"targets={self.targets!r}: expected distinct names from {TARGETS}")
        if "qkv" in self.targets and {"q", "k", "v"} & set(self.targets):
            errs.append(f"targets={self.targets!r}: 'qkv' adapts the whole fused projection; "
                        "combine it with none of 'q', 'k', 'v'")
        if self.dropout != 0.0:
            errs.append(f"dropout={self.dropout!r}: only 0.0 is supported (the forward pass takes "
                        "no random key)")
        if errs:
            raise ValueError("invalid LoraConfig:\n  " + "\n  ".join(errs))

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return self.alpha / self.rank


class LoraPair(nnx.Module):
    """One low-rank update ``s · (x · A) · B``.

    Args:
      in_shape: the contracted axes of the projection's input (``(D,)``, ``(N, H)``, ``(F,)``).
      out_shape: the output axes this pair writes (a head slice of ``qkv``: ``(n, H)``).
      rank: r.
      scale: s = alpha / r.
      rngs: the ``params`` stream draws ``A ~ N(0, 1 / prod(in_shape))``; ``B = 0``.
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], rank: int,
                 scale: float, *, rngs: nnx.Rngs):
        self.scale = float(scale)
        self.n_in = len(in_shape)
        std = jnp.float32(1.0 / math.sqrt(math.prod(in_shape)))
        self.a = LoraParam(_scaled_normal(rngs.params(), std, (*in_shape, rank)))
        self.b = LoraParam(jnp.zeros((rank, *out_shape), jnp.float32))

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        """``[..., *in] -> [..., *out]`` f32, matmuls in ``dtype`` (as ``_dense``)."""
        return self.scale * _dense(_dense(x, self.a[...], dtype, self.n_in), self.b[...], dtype)

    def delta(self) -> jax.Array:
        """``s · A · B`` as a ``[*in, *out]`` f32 weight (full-precision matmul)."""
        a, b = self.a[...], self.b[...]
        r = b.shape[0]
        ab = jnp.dot(a.reshape(-1, r), b.reshape(r, -1), precision=jax.lax.Precision.HIGHEST)
        return self.scale * ab.reshape(a.shape[:-1] + b.shape[1:])


class LoraAdapter(nnx.Module):
    """The adapters of one projection ``y = x · W``, ``W [*in, *out]``.

    Each target ``t`` is a :class:`LoraPair` (an attribute named after it) that updates rows
    ``[lo_t, hi_t)`` of ``W``'s first output axis: the query, key or value heads of the fused
    ``qkv [D, N + 2K, H]`` kernel, or the whole axis. Output: ``y + Σ_t pad_t(s · (x·A_t)·B_t)``.
    """

    def __init__(self, spans: tuple[tuple[str, int, int], ...], in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], rank: int, scale: float, *, rngs: nnx.Rngs):
        self.spans = tuple(sorted(spans, key=lambda s: s[1]))
        self.width = out_shape[0]
        for name, lo, hi in self.spans:
            setattr(self, name, LoraPair(in_shape, (hi - lo, *out_shape[1:]), rank, scale,
                                         rngs=rngs))

    def pairs(self) -> list[tuple[str, int, int, LoraPair]]:
        return [(name, lo, hi, getattr(self, name)) for name, lo, hi in self.spans]

    def __call__(self, x: jax.Array, y: jax.Array, dtype) -> jax.Array:
        """``y [..., width, *rest]`` plus the update computed from ``x [..., *in]``.

        Several targets (q, k, v) run as two matmuls, not two each: ``x · [A_q | A_k | A_v]``
        (``[..., 3r]``) times the block matrix whose row block ``t`` holds ``B_t`` at its heads
        and zeros elsewhere (``[3r, width, *rest]``). The zero blocks add exact zeros; the
        matmuls stay small next to ``x · W``.
        """
        pairs = self.pairs()
        if len(pairs) == 1:
            return y + _fill([(lo, hi, pair(x, dtype)) for _, lo, hi, pair in pairs],
                             self.width, y.ndim - (pairs[0][3].b.ndim - 1))
        a = jnp.concatenate([pair.a[...] for *_, pair in pairs], axis=-1)  # [*in, T·r]
        b = jnp.concatenate([_fill([(lo, hi, pair.b[...])], self.width, 1)
                             for _, lo, hi, pair in pairs], axis=0)  # [T·r, width, *rest]
        n_in, scale = pairs[0][3].n_in, pairs[0][3].scale
        return y + scale * _dense(_dense(x, a, dtype, n_in), b, dtype)

    def delta(self) -> jax.Array:
        """The update of ``W`` as one ``[*in, *out]`` f32 array (zero on uncovered heads)."""
        pieces = [(lo, hi, pair.delta()) for _, lo, hi, pair in self.pairs()]
        return _fill(pieces, self.width, self.pairs()[0][3].n_in)


def _fill(pieces: list[tuple[int, int, jax.Array]], width: int, axis: int) -> jax.Array:
    """The ``(lo, hi, array)`` pieces concatenated along ``axis`` into ``width`` rows, zeros where
    no piece lies."""
    if len(pieces) == 1 and pieces[0][:2] == (0, width):
        return pieces[0][2]
    parts, at = [], 0
    for lo, hi, d in pieces + [(width, width, None)]:
        if lo > at:
            ref = pieces[0][2]
            parts.append(jnp.zeros(ref.shape[:axis] + (lo - at,) + ref.shape[axis + 1:],
                                   ref.dtype))
        if d is not None:
            parts.append(d)
        at = hi
    return jnp.concatenate(parts, axis=axis)


# ---------------------------------------------------------------------------------------------
# Attaching, splitting, merging


def backbone(model: nnx.Module) -> tuple[tuple[str, ...], Transformer]:
    """``(path, transformer)``: the Transformer a model adapts: the model itself (``()``) or a
    scalar model's ``backbone`` (:data:`SCALAR_BACKBONE`)."""
    if isinstance(model, Transformer):
        return (), model
    inner = getattr(model, SCALAR_BACKBONE[0], None)
    if isinstance(inner, Transformer):
        return SCALAR_BACKBONE, inner
    raise TypeError(f"LoRA adapts a Transformer or a model with a Transformer `backbone`, got "
                    f"{type(model).__name__}")


def _adapted_modules(model: nnx.Module):
    """``(module, projection)`` of every projection of the backbone (adapted or not)."""
    for block in backbone(model)[1].blocks:
        for module in (block.attn, block.mlp):
            for proj in _PROJECTIONS[type(module)]:
                if getattr(module, proj) is not None:
                    yield module, proj


def lora_config(model: nnx.Module) -> LoraConfig | None:
    """The :class:`LoraConfig` the model's adapters were attached with (None: no adapters)."""
    return getattr(backbone(model)[1], "lora_config", None)


def apply_lora(model: nnx.Module, lcfg: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Attaches adapters to ``model`` (a Transformer or a scalar model's backbone), in place.

    Every adapted projection ``x · W`` becomes ``x · W + s · (x · A) · B`` with ``B = 0``, so
    the model's outputs are unchanged until the adapters are trained.

    Args:
      model: the model; its parameters become the frozen base.
      lcfg: rank, alpha and targets.
      rngs: the ``params`` stream draws the ``A`` matrices.

    Returns:
      ``model`` (for chaining).

    Raises:
      ValueError: the model already has adapters, or no target exists in its family.
    """
    _, tf = backbone(model)
    if lora_config(model) is not None:
        raise ValueError(f"the model already has LoRA adapters ({lora_config(model)}); "
                         "merge_lora or remove_adapters first")
    cfg: ModelConfig = tf.cfg
    n, k = cfg.num_heads, cfg.num_kv_heads
    heads = {"qkv": (0, n + 2 * k), "q": (0, n), "k": (n, n + k), "v": (n + k, n + 2 * k)}
    added = 0
    for module, proj in _adapted_modules(model):
        spans = tuple((t, *heads.get(t, (0, 0))) for t in lcfg.targets if PROJECTION[t] == proj)
        if not spans:
            continue
        shape = getattr(module, proj).shape
        n_in = 2 if proj == "out" else 1
        if proj != "qkv":
            spans = ((proj, 0, shape[n_in]),)
        setattr(module, "lora_" + proj, LoraAdapter(spans, shape[:n_in], shape[n_in:],
                                                    lcfg.rank, lcfg.scale, rngs=rngs))
        added += 1
    if not added:
        raise ValueError(f"LoRA targets {lcfg.targets} match no projection of a {cfg.family} "
                         "model")
    tf.lora_config = lcfg
    return model


def adapters(model: nnx.Module) -> list[tuple[nnx.Module, str, LoraAdapter]]:
    """``(module, projection, adapter)`` of every attached adapter."""
    return [(m, p, getattr(m, "lora_" + p)) for m, p in _adapted_modules(model)
            if getattr(m, "lora_" + p, None) is not None]


def remove_adapters(model: nnx.Module) -> nnx.Module:
    """Deletes the adapters (in place): the model becomes its plain base. Returns ``model``."""
    for module, proj, _ in adapters(model):
        delattr(module, "lora_" + proj)
    _, tf = backbone(model)
    if hasattr(tf, "lora_config"):
        delattr(tf, "lora_config")
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A new model without adapters whose kernels are ``W + s · A · B`` (``model`` unchanged).

    Merged and adapted models agree to float rounding (~1e-6 in f32); the merged one is a plain
    model again (``save_pretrained``, the sampler, any code that knows no LoRA).
    """
    merged = nnx.clone(model)
    kernels = _merged_kernels(*nnx.split(merged))
    for (module, proj, _), kernel in zip(adapters(merged), kernels):
        getattr(module, proj).set_value(kernel)
    return remove_adapters(merged)


@functools.partial(jax.jit, static_argnums=0)
def _merged_kernels(graphdef: nnx.GraphDef, state: nnx.State) -> list[jax.Array]:
    """``W + s · A · B`` of every adapted projection, in :func:`adapters` order (one program:
    eager, each kernel shape would compile its own small ops)."""
    model = nnx.merge(graphdef, state)
    return [getattr(module, proj)[...] + adapter.delta()
            for module, proj, adapter in adapters(model)]


def base_graphdef(model: nnx.Module) -> nnx.GraphDef:
    """The graph of ``model`` without adapters.

    ``nnx.merge(base_graphdef(model), split(model).base)`` is the base model (adapters off),
    built from the same arrays: no second copy of the weights.
    """
    return nnx.graphdef(remove_adapters(nnx.clone(model)))


def base_model(model: nnx.Module) -> Transformer:
    """The backbone with its adapters off: a plain Transformer on the same arrays (no copy)."""
    return remove_adapters(nnx.clone(backbone(model)[1]))


def scalar_model_on_base(model: nnx.Module, lcfg: LoraConfig, *, rngs: nnx.Rngs,
                         head_init: str = "reward", layer: int | None = None) -> ScalarModel:
    """A LoRA scalar model (reward model or critic) on ``model``'s base: the backbone is the
    base's arrays (shared, not copied) with fresh adapters, plus a new :class:`ScalarHead`.

    Args:
      model: a Transformer (adapted or not) whose base to share.
      lcfg: the scalar model's own adapters.
      rngs: draws the adapters' ``A`` and a reward head's weights.
      head_init: ``"reward"`` or ``"value"`` (see :class:`ScalarHead`).
      layer: the head reads the hidden states after this many blocks (:class:`ScalarModel`).
    """
    cfg = backbone(model)[1].cfg
    scalar = nnx.eval_shape(lambda: ScalarModel(cfg, head_init=head_init, rngs=nnx.Rngs(0),
                                                layer=layer))
    scalar.backbone = base_model(model)
    scalar.head = ScalarHead(cfg.d_model, init=head_init, rngs=rngs)
    return apply_lora(scalar, lcfg, rngs=rngs)


class LoraSplit(NamedTuple):
    """An adapted model in parts (see :func:`split`)."""
    graphdef: nnx.GraphDef
    """The adapted model's graph (merge it with :func:`join` of the parts)."""
    lora: nnx.State
    """The adapter leaves (:class:`LoraParam`), paths from the model root."""
    base: nnx.State
    """The frozen backbone: a plain Transformer's parameters, paths from the backbone; its
    tree structure equals that of ``nnx.state`` of a Transformer without adapters."""
    rest: nnx.State
    """Everything else (a scalar model's head), paths from the model root; empty for an LM."""
    prefix: tuple[str, ...]
    """Where the backbone sits in the model (``()`` or :data:`SCALAR_BACKBONE`)."""


def split(model: nnx.Module) -> LoraSplit:
    """``graphdef, lora, base, rest``: ``nnx.split(model, LoraParam, ...)`` with the non-adapter
    part divided into the backbone (the base, shared by every model adapted from it) and the
    rest. No array is copied."""
    prefix, _ = backbone(model)
    graphdef, lora, other = nnx.split(model, LoraParam, ...)
    flat = list(nnx.to_flat_state(other))
    n = len(prefix)
    base = nnx.from_flat_state([(p[n:], v) for p, v in flat if tuple(p[:n]) == prefix])
    rest = nnx.from_flat_state([(p, v) for p, v in flat if tuple(p[:n]) != prefix])
    return LoraSplit(graphdef, lora, base, rest, prefix)


def join(lora: nnx.State, base: nnx.State, rest: nnx.State | None = None,
         prefix: tuple[str, ...] = ()) -> nnx.State:
    """The inverse of :func:`split`: one state for ``nnx.merge(graphdef, ...)`` (no copies;
    inside ``jit`` a pure restructuring of the pytrees)."""
    if prefix:
        base = nnx.from_flat_state([(tuple(prefix) + tuple(p), v)
                                    for p, v in nnx.to_flat_state(base)])
    states = [s for s in (lora, base, rest) if s is not None]
    return nnx.merge_state(*states)


def tree_bytes(tree) -> int:
    """Bytes held by the arrays of a pytree (typed PRNG keys by their key data)."""
    total = 0
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        total += int(x.nbytes)
    return total


# ---------------------------------------------------------------------------------------------
# Adapter checkpoints and export


def _value(v):
    return v[...] if isinstance(v, nnx.Variable) else v


def base_hash(model_or_base) -> str:
    """``sha256`` hex digest of a base's parameters: the model's backbone without adapters, or a
    base state (:attr:`LoraSplit.base`).

    Deterministic: leaves in sorted path order, each contributing ``path:dtype:shape`` and its
    C-order bytes. Paths are relative to the backbone, so a policy and a reward model adapted
    from the same base have the same hash.
    """
    base = split(model_or_base).base if isinstance(model_or_base, nnx.Module) else model_or_base
    h = hashlib.sha256()
    flat = sorted(((tuple(map(str, p)), v) for p, v in nnx.to_flat_state(base)),
                  key=lambda pv: pv[0])
    for path, v in flat:
        arr = np.ascontiguousarray(np.asarray(_value(v)))
        h.update(f"{'/'.join(path)}:{arr.dtype.str}:{arr.shape}\n".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _trainable_tree(parts: LoraSplit) -> dict:
    tree = {"lora": nnx.to_pure_dict(parts.lora)}
    if jax.tree.leaves(parts.rest):
        tree["rest"] = nnx.to_pure_dict(parts.rest)
    return tree


def save_adapters(directory: str | os.PathLike, model: nnx.Module, base_path: str | os.PathLike,
                  base_hash_hex: str | None = None) -> Path:
    """Writes the adapters (and a scalar model's head) without the base.

    Layout: ``adapter.json`` (the :class:`LoraConfig`, ``base_path``, ``base_hash``, model kind
    and config) and ``params/`` (an orbax checkpoint, :class:`rlhf_jax.checkpoint.Checkpointer`,
    of ``{"lora": adapters, "rest": head}`` as pure dicts). Saving again replaces the contents.

    Args:
      directory: output folder (created).
      model: an adapted Transformer or scalar model.
      base_path: where the base came from (a model bundle, a HF directory, a GGUF file); recorded
        so that a failed load can say which base the adapters need.
      base_hash_hex: :func:`base_hash` of the base if already known (it is computed otherwise).

    Returns:
      the folder.
    """
    from rlhf_jax.checkpoint import Checkpointer

    lcfg = lora_config(model)
    if lcfg is None:
        raise ValueError("save_adapters: the model has no LoRA adapters (apply_lora first)")
    parts = split(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": _FORMAT, "version": 1, "lora": dataclasses.asdict(lcfg),
            "base_path": str(base_path), "base_hash": base_hash_hex or base_hash(parts.base),
            "model": type(model).__name__,
            "config": dataclasses.asdict(backbone(model)[1].cfg)}
    with Checkpointer(directory / "params", max_to_keep=1) as ckpt:
        step = 0 if ckpt.latest_step() is None else ckpt.latest_step() + 1
        ckpt.save(step, _trainable_tree(parts), {"base_hash": meta["base_hash"]})
    (directory / "adapter.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_adapter_meta(directory: str | os.PathLike) -> dict:
    """``adapter.json`` of an adapter folder (:func:`save_adapters`)."""
    file = Path(directory) / "adapter.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {directory} is not a LoRA adapter folder "
                                "(written by rlhf_jax.models.lora.save_adapters)")
    meta = json.loads(file.read_text())
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{file}: expected an object with format={_FORMAT!r}")
    return meta


def load_adapters(directory: str | os.PathLike, model: nnx.Module, *,
                  base_path: str | os.PathLike | None = None) -> nnx.Module:
    """Loads adapters saved by :func:`save_adapters` onto ``model`` (in place; returned).

    A model without adapters gets them attached with the saved :class:`LoraConfig`; one with
    adapters must have the same config. The model's base must be the one the adapters were
    trained on (same :func:`base_hash`).

    Args:
      directory: the adapter folder.
      model: a Transformer or scalar model holding the base.
      base_path: where ``model``'s base came from, named in the error message.

    Raises:
      ValueError: a different base (the message names both hashes and both paths), a different
        LoRA config or model kind.
    """
    from rlhf_jax.checkpoint import Checkpointer

    meta = read_adapter_meta(directory)
    lcfg = LoraConfig(**meta["lora"])
    if meta.get("model") != type(model).__name__:
        raise ValueError(f"{directory}: adapters of a {meta.get('model')}, loaded onto a "
                         f"{type(model).__name__}")
    have = base_hash(model)
    if have != meta["base_hash"]:
        where = f" ({base_path})" if base_path is not None else ""
        raise ValueError(
            f"{directory}: these LoRA adapters were trained on the base {meta['base_path']} "
            f"(sha256 {meta['base_hash']}), but the model they are loaded onto has a different "
            f"base{where} (sha256 {have}); load them onto the base they were trained on")
    current = lora_config(model)
    if current is None:
        apply_lora(model, lcfg, rngs=nnx.Rngs(params=0))
    elif current != lcfg:
        raise ValueError(f"{directory}: adapters saved with {lcfg}, the model has {current}")
    parts = split(model)
    template = _trainable_tree(parts)
    with Checkpointer(Path(directory) / "params", max_to_keep=1) as ckpt:
        tree, _ = ckpt.restore(template)
    nnx.replace_by_pure_dict(parts.lora, tree["lora"])
    nnx.update(model, parts.lora)
    if "rest" in template:
        nnx.replace_by_pure_dict(parts.rest, tree["rest"])
        nnx.update(model, parts.rest)
    return model


def save_merged_pretrained(model: Transformer, path: str | os.PathLike, *,
                           extra_config: dict | None = None) -> None:
    """Exports ``merge_lora(model)`` as a Hugging Face directory (``AutoModelForCausalLM``)."""
    from rlhf_jax.models.hf import save_pretrained

    if not isinstance(model, Transformer):
        raise TypeError(f"HF export takes a Transformer, got {type(model).__name__}")
    save_pretrained(merge_lora(model), model.cfg, path, extra_config=extra_config)
