"""Malformed input files end in a clear error raised by our code, never in a library traceback.

One table (:data:`CASES`) covers the files this project reads: comparisons JSONL/CSV, GGUF models
and tokenizers, Hugging Face model directories and tokenizer files. Each case writes a good file,
breaks it one way, and checks that loading it raises a ``DataError``/``ValueError``/
``FileNotFoundError`` (exactly that type) whose message names the file and matches what was
expected, raised from a frame inside ``rlhf_jax`` (not re-raised from deep inside tfds, numpy,
gguf, safetensors or tokenizers).
"""
import codecs
import csv
import dataclasses
import json
import pathlib
from typing import Callable

from flax import nnx
import numpy as np
import pytest

import rlhf_jax
from rlhf_jax.data import comparisons
from rlhf_jax.data import tokenizers as tk
from rlhf_jax.data.errors import DataError, DataReport
from rlhf_jax.models import gguf as gg
from rlhf_jax.models import hf
from rlhf_jax.models.config import PRESETS
from rlhf_jax.models.transformer import Transformer

gguf = pytest.importorskip("gguf")

PACKAGE = pathlib.Path(rlhf_jax.__file__).resolve().parent

# --- good files --------------------------------------------------------------------------------


def record(i, k=3, ranks=None):
    return {"id": f"q{i}", "prompt": f"Prompt {i}:", "labeler": "sim",
            "responses": [f" response {j} to {i}." for j in range(k)],
            "policies": [f"pi{j}" for j in range(k)],
            "ranks": list(ranks) if ranks is not None else [(i + j) % k for j in range(k)]}


def jsonl(path, objs, *, prefix=b""):
    lines = [o.encode() if isinstance(o, str) else json.dumps(o).encode() for o in objs]
    path.write_bytes(prefix + b"".join(line + b"\n" for line in lines))
    return path


def csv_file(path, rows, *, header=comparisons.CSV_COLUMNS, prefix="", delimiter=","):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(prefix)
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def csv_rows(recs, labeler="me"):
    return [[r["id"], r["prompt"], j, resp, r["policies"][j], r["ranks"][j], labeler]
            for r in recs for j, resp in enumerate(r["responses"])]


# Tiny llama GGUF: one block, rows a multiple of 32 (the Q8 block size).
L, D, N, KV, F = 1, 32, 2, 1, 64
HD = D // N


@pytest.fixture(scope="module")
def tiny_tok():
    return tk.train_bpe(["hello world, the cat sat on the mat"] * 5, vocab_size=270,
                        special_tokens=("<|endoftext|>", "<|im_end|>"))


def gguf_tensors(vocab):
    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.normal(0.0, 0.2, size=shape).astype(np.float32)

    out = {"token_embd.weight": r(vocab, D), "output_norm.weight": r(D),
           "output.weight": r(vocab, D)}
    for i in range(L):
        out.update({f"blk.{i}.attn_q.weight": r(N * HD, D), f"blk.{i}.attn_k.weight": r(KV * HD, D),
                    f"blk.{i}.attn_v.weight": r(KV * HD, D),
                    f"blk.{i}.attn_output.weight": r(D, N * HD),
                    f"blk.{i}.ffn_gate.weight": r(F, D), f"blk.{i}.ffn_up.weight": r(F, D),
                    f"blk.{i}.ffn_down.weight": r(D, F), f"blk.{i}.attn_norm.weight": r(D),
                    f"blk.{i}.ffn_norm.weight": r(D)})
    return out


def write_gguf(path, tok, *, arch="llama", drop=(), raw=None, block_count=L, eos=None):
    """A tiny llama GGUF with `tok` embedded; `raw` = {name: (uint8 bytes, quant type)}."""
    model = json.loads(tok.backend.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    w = gguf.GGUFWriter(str(path), arch)
    if isinstance(block_count, int):
        w.add_block_count(block_count)
    else:
        w.add_string(f"{arch}.block_count", block_count)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(N)
    w.add_head_count_kv(KV)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>") if eos is None else eos)
    for name, arr in gguf_tensors(len(tokens)).items():
        if name in drop:
            continue
        if raw and name in raw:
            data, qtype = raw[name]
            w.add_tensor(name, data, raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_tok):
    """Good files every case starts from: GGUF bytes, a HF model directory, a tokenizer dir."""
    root = tmp_path_factory.mktemp("good")
    g = write_gguf(root / "tiny.gguf", tiny_tok)
    cfg = PRESETS["tiny-llama"]
    model_dir = root / "hf"
    hf.save_pretrained(Transformer(cfg, rngs=nnx.Rngs(0)), cfg, model_dir)
    tok_dir = tiny_tok.save(root / "tok")
    # The good files load: every failure below is caused by the corruption.
    assert gg.read_gguf(g)[0]["num_hidden_layers"] == L
    assert tk.from_gguf(g).vocab_size == tiny_tok.vocab_size
    assert hf.config_from_hf(json.loads((model_dir / "config.json").read_text())) == cfg
    assert tk.Tokenizer.load(tok_dir).vocab_size == tiny_tok.vocab_size
    return {"gguf": g.read_bytes(), "hf": model_dir, "tok": tok_dir, "tiny_tok": tiny_tok}


# --- corruptions -------------------------------------------------------------------------------

def gguf_offset(data: bytes, name: str) -> int:
    """Offset of the (length-prefixed) string `name` in GGUF bytes."""
    i = data.index(len(name).to_bytes(8, "little") + name.encode())
    return i


def tensor_type_offset(data: bytes, name: str, n_dims: int = 2) -> int:
    """Offset of the uint32 tensor type in the tensor-table entry of `name`."""
    return gguf_offset(data, name) + 8 + len(name) + 4 + 8 * n_dims


def patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


def gguf_case(transform, call=lambda p: gg.read_gguf(p)):
    def make(tmp, g):
        p = tmp / "model.gguf"
        p.write_bytes(transform(g["gguf"]))
        return (lambda: call(p)), p
    return make


def gguf_written(call=lambda p: gg.read_gguf(p), **kwargs):
    def make(tmp, g):
        p = write_gguf(tmp / "model.gguf", g["tiny_tok"], **kwargs)
        return (lambda: call(p)), p
    return make


def hf_case(mutate, call=lambda d: hf.load_pretrained(d)):
    """Copy of the good HF directory, `mutate(dir)`d; returns the file the error must name."""
    def make(tmp, g):
        d = tmp / "model"
        d.mkdir()
        for f in g["hf"].iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        named = mutate(d)
        return (lambda: call(d)), named
    return make


def edit_config(**changes):
    def mutate(d):
        cfg = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if v is KeyError:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (d / "config.json").write_text(json.dumps(cfg))
        return d / "config.json"
    return mutate


def write_file(name, content):
    def mutate(d):
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return d / name
    return mutate


def cut_safetensors(keep):
    def mutate(d):
        p = d / "model.safetensors"
        data = p.read_bytes()
        p.write_bytes(data[:keep(len(data))])
        return p
    return mutate


def edit_tensors(change, *, shards=False):
    """Rewrite model.safetensors with `change(tensors)` (or as two shards + index)."""
    from safetensors.numpy import load_file, save_file

    def mutate(d):
        tensors = load_file(str(d / "model.safetensors"))
        change(tensors)
        if not shards:
            save_file(tensors, str(d / "model.safetensors"))
            return d / "model.safetensors"
        (d / "model.safetensors").unlink()
        names = sorted(tensors)
        parts = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
                 "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for fname, keys in parts.items():
            save_file({k: tensors[k] for k in keys}, str(d / fname))
        weight_map = {k: f for f, keys in parts.items() for k in keys}
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return d
    return mutate


def drop_tensor(name):
    return lambda t: t.pop(name)


def transpose_tensor(name):
    def change(t):
        t[name] = np.ascontiguousarray(t[name].T)
    return change


def sharded_bad_shape(d):
    edit_tensors(transpose_tensor("model.layers.1.mlp.down_proj.weight"), shards=True)(d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    return d / index["weight_map"]["model.layers.1.mlp.down_proj.weight"]


def tok_case(mutate, call=lambda d: tk.Tokenizer.load(d)):
    def make(tmp, g):
        d = tmp / "tok"
        d.mkdir()
        for f in g["tok"].iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        named = mutate(d)
        return (lambda: call(d)), named
    return make


def comparison_file(name, content, call, **csv_kwargs):
    """`content` is a list of JSON values/strings (JSONL), of CSV rows, or raw bytes."""
    def make(tmp, g):
        p = tmp / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        elif name.endswith(".csv"):
            csv_file(p, content, **csv_kwargs)
        else:
            jsonl(p, content)
        return (lambda: call(p)), p
    return make


def comparison_dir(files, call, named=None):
    """A folder of comparison files {name: records}; `named` = the path the error must name."""
    def make(tmp, g):
        d = tmp / "comparisons"
        d.mkdir()
        for fname, recs in files.items():
            jsonl(d / fname, recs)
        return (lambda: call(d, tmp)), (d / named if named else d)
    return make


def read(p):
    return comparisons.read_comparisons(p)


def imp(p):
    return comparisons.import_rankings(p, labeler="me")


def build(d, tmp):
    return comparisons.build_comparisons(d, str(tmp / "tfds"))


def build_skip(d, tmp):
    return comparisons.build_comparisons(d, str(tmp / "tfds"), on_error="skip")


def all_tied(p):
    return comparisons.require_untied_pairs(comparisons.read_comparisons(p), str(p))


GOOD_JSON = json.dumps(record(0)).encode()


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str
    corruption: str
    make: Callable  # (tmp_path, good) -> (load, path the message must name)
    exc: type
    match: str

    @property
    def id(self):
        return f"{self.kind}: {self.corruption}"


RANKED3 = [record(i) for i in range(3)]

CASES = [
    # -- comparisons JSONL ---------------------------------------------------------------------
    Case("comparisons jsonl", "empty file", comparison_file("c.jsonl", [], read), DataError,
         r"no records: expected one JSON comparison object per line.*\[empty_file\]"),
    Case("comparisons jsonl", "only blank lines", comparison_file("c.jsonl", ["", "  "], read),
         DataError, r"\[empty_file\]"),
    Case("comparisons jsonl", "bytes that are not UTF-8",
         comparison_file("c.jsonl", GOOD_JSON + b"\n" + b'{"id": "\xff"}\n', read), DataError,
         r"c\.jsonl:2: bytes are not valid UTF-8"),
    Case("comparisons jsonl", "UTF-16 (Excel 'Unicode text')",
         comparison_file("c.jsonl", codecs.BOM_UTF16_LE + GOOD_JSON.decode().encode("utf-16-le"),
                         read), DataError, r"c\.jsonl:1: bytes are not valid UTF-8"),
    Case("comparisons jsonl", "malformed JSON", comparison_file("c.jsonl", [record(0), '{"id":'],
                                                                read), DataError,
         r"c\.jsonl:2: malformed JSON at column"),
    Case("comparisons jsonl", "wrong type", comparison_file(
        "c.jsonl", [dict(record(0), prompt=7)], read), DataError,
         r"c\.jsonl:1: field 'prompt': expected str, got int"),
    Case("comparisons jsonl", "rank out of range", comparison_file(
        "c.jsonl", [dict(record(0), ranks=[0, 1, 3])], read), DataError,
         r"c\.jsonl:1: field 'ranks\[2\]': expected a rank in \[0, 3\), got 3"),
    Case("comparisons jsonl", "duplicate id", comparison_file(
        "c.jsonl", [record(0), record(1), record(0)], read), DataError,
         r"c\.jsonl:3: field 'id': id 'q0' already used at .*c\.jsonl:1"),
    Case("comparisons jsonl", "mixed K", comparison_file(
        "c.jsonl", [record(0), record(1), record(2, k=2)], read), DataError,
         r"c\.jsonl:3: field 'responses': expected K=3 responses as in the first record "
         r"\(.*c\.jsonl:1\), got K=2"),
    Case("comparisons jsonl", "every ranking tied", comparison_file(
        "c.jsonl", [record(0, ranks=[0, 0, 0]), record(1, ranks=[1, 1, 1])], all_tied),
         DataError, r"expected at least 1 untied pair\(s\) of responses, got 0 in 2 records"),
    # -- comparisons folder / TFDS build -------------------------------------------------------
    Case("comparisons folder", "empty folder", comparison_dir({}, build), FileNotFoundError,
         r"no \*\.jsonl or \*\.jsonl\.gz files .*expected train\.jsonl or train-\*\.jsonl"),
    Case("comparisons folder", "only eval.jsonl", comparison_dir({"eval.jsonl": RANKED3}, build),
         FileNotFoundError, r"no 'train' split; expected train\.jsonl or train-\*\.jsonl "
         r"\(found \{'eval': \['eval\.jsonl'\]\}\)"),
    Case("comparisons folder", "empty train.jsonl",
         comparison_dir({"train.jsonl": []}, build, "train.jsonl"), DataError,
         r"train\.jsonl: no records"),
    Case("comparisons folder", "no valid record in train (skip mode)",
         comparison_dir({"train.jsonl": ["{bad", "{worse"]}, build_skip, "train.jsonl"),
         DataError, r"split 'train' has no valid record \(2 skipped\)"),
    Case("comparisons folder", "mixed K across the shards of a split",
         comparison_dir({"train.jsonl": RANKED3, "train-00001.jsonl": [record(5, k=4)]}, build,
                        "train-00001.jsonl"), DataError,
         r"train-00001\.jsonl:1: field 'responses': expected K=3 responses as in the first "
         r"record \(.*train\.jsonl:1\), got K=4"),
    Case("comparisons folder", "duplicate id across the shards of a split",
         comparison_dir({"train.jsonl": RANKED3, "train-00001.jsonl": [record(1)]}, build,
                        "train-00001.jsonl"), DataError,
         r"train-00001\.jsonl:1: field 'id': id 'q1' already used at .*train\.jsonl:2"),
    # -- labeling import (CSV / JSONL) ---------------------------------------------------------
    Case("labeling csv", "no prompt column", comparison_file(
        "l.csv", [[r[0]] + r[2:] for r in csv_rows(RANKED3)], imp,
        header=[c for c in comparisons.CSV_COLUMNS if c != "prompt"]),
         DataError, r"l\.csv:1: CSV header lacks columns \['prompt'\]"),
    Case("labeling csv", "semicolon-separated", comparison_file(
        "l.csv", csv_rows(RANKED3), imp, delimiter=";"),
         DataError, r"lacks columns .*separated by ';'"),
    Case("labeling csv", "empty file", comparison_file("l.csv", b"", imp), DataError,
         r"l\.csv: no header and no rows.*\[empty_file\]"),
    Case("labeling csv", "header only", comparison_file("l.csv", [], imp), DataError,
         r"l\.csv: a header but no rows.*\[empty_file\]"),
    Case("labeling csv", "bytes that are not UTF-8 (cp1252 export)",
         comparison_file("l.csv", ",".join(comparisons.CSV_COLUMNS).encode() +
                         b"\r\nq0,caf\xe9,0,a,p,0,me\r\n", imp), DataError,
         r"l\.csv:2: bytes are not valid UTF-8 at file byte"),
    Case("labeling csv", "rank not an integer", comparison_file(
        "l.csv", [row[:5] + ["first"] + row[6:] if i == 1 else row
                  for i, row in enumerate(csv_rows(RANKED3))], imp), DataError,
         r"l\.csv:3: field 'rank': expected an integer, got 'first'"),
    Case("labeling csv", "rank out of range", comparison_file(
        "l.csv", [row[:5] + [7] + row[6:] if i == 0 else row
                  for i, row in enumerate(csv_rows(RANKED3))], imp), DataError,
         r"l\.csv:2: field 'ranks\[0\]': expected a rank in \[0, 3\), got 7"),
    Case("labeling csv", "one id with two prompts", comparison_file(
        "l.csv", [row[:1] + ["other prompt"] + row[2:] if i == 2 else row
                  for i, row in enumerate(csv_rows(RANKED3))], imp), DataError,
         r"l\.csv:4: field 'prompt': id 'q0': expected the prompt of .*l\.csv:2"),
    Case("labeling csv", "a row with an extra cell (unquoted comma)", comparison_file(
        "l.csv", [row + ["stray"] if i == 4 else row
                  for i, row in enumerate(csv_rows(RANKED3))], imp), DataError,
         r"l\.csv:6: row has 8 cells, expected 7 as in the header"),
    Case("labeling csv", "a row with a blank id", comparison_file(
        "l.csv", [[""] + row[1:] if i == 3 else row
                  for i, row in enumerate(csv_rows(RANKED3))], imp), DataError,
         r"l\.csv:5: field 'id': expected a non-empty id"),
    Case("labeling csv", "mixed K", comparison_file(
        "l.csv", csv_rows(RANKED3[:2] + [record(2, k=2)]), imp), DataError,
         r"l\.csv:8: field 'responses': expected K=3 responses as in the first record "
         r"\(.*l\.csv:2\), got K=2"),
    Case("labeling jsonl", "not ranked yet", comparison_file(
        "l.jsonl", [dict(record(0), ranks=None)], imp), DataError,
         r"l\.jsonl:1: field 'ranks': not ranked yet"),
    Case("labeling jsonl", "duplicate id", comparison_file(
        "l.jsonl", [record(0), record(0)], imp), DataError,
         r"l\.jsonl:2: field 'id': id 'q0' already used"),
    # -- GGUF ----------------------------------------------------------------------------------
    Case("gguf", "empty file", gguf_case(lambda b: b""), ValueError,
         r"empty file; expected a GGUF file"),
    Case("gguf", "wrong magic", gguf_case(lambda b: b"GGML" + b[4:]), ValueError,
         r"not a GGUF file: expected magic b'GGUF' at byte 0, got b'GGML'"),
    Case("gguf", "wrong magic (gguf_metadata)", gguf_case(
        lambda b: b"PK\x03\x04" + b[4:], gg.gguf_metadata), ValueError, r"expected magic"),
    Case("gguf", "unsupported version", gguf_case(
        lambda b: patched(b, 4, (9).to_bytes(4, "little"))), ValueError,
         r"GGUF version 9; expected 2 or 3"),
    Case("gguf", "truncated inside the header", gguf_case(lambda b: b[:13]), ValueError,
         r"truncated in the header: expected 16 bytes for the tensor and metadata counts at "
         r"byte 8, the file has 13 bytes"),
    Case("gguf", "truncated inside the metadata (token list)", gguf_case(
        lambda b: b[:gguf_offset(b, "tokenizer.ggml.tokens") + 200]), ValueError,
         r"truncated in the metadata: expected \d+ bytes for .*metadata 'tokenizer\.ggml\.tokens'"
         r"\[\d+\]"),
    Case("gguf", "truncated inside the metadata (tokenizer)", gguf_case(
        lambda b: b[:gguf_offset(b, "tokenizer.ggml.merges") + 30], tk.from_gguf), ValueError,
         r"truncated in the metadata"),
    Case("gguf", "truncated inside the tensor table", gguf_case(
        lambda b: b[:gguf_offset(b, "blk.0.attn_q.weight") + 12]), ValueError,
         r"truncated in the tensor table: expected 19 bytes for the name of tensor #\d+"),
    Case("gguf", "truncated inside the tensor data", gguf_case(lambda b: b[:-100]), ValueError,
         r"truncated: expected \d+ bytes of tensor data for '[\w.]+' at byte \d+, the file ends "
         r"100 bytes short"),
    Case("gguf", "truncated inside the tensor data (load_pretrained)", gguf_case(
        lambda b: b[:len(b) // 2], hf.load_pretrained), ValueError,
         r"truncated: expected \d+ bytes of tensor data"),
    Case("gguf", "unknown tensor type id", gguf_case(lambda b: patched(
        b, tensor_type_offset(b, "blk.0.ffn_up.weight"), (99).to_bytes(4, "little"))),
         ValueError, r"tensor 'blk\.0\.ffn_up\.weight' has tensor type 99, which is not a GGML "
         r"type the gguf package knows; expected one of F32, F16"),
    Case("gguf", "unsupported quantisation (Q8_1)", gguf_written(raw={
        "blk.0.ffn_up.weight": (np.zeros((F, D // 32 * 40), np.uint8),
                                gguf.GGMLQuantizationType.Q8_1)}), ValueError,
         r"tensor 'blk\.0\.ffn_up\.weight' has type Q8_1, which cannot be dequantised"),
    Case("gguf", "unsupported architecture", gguf_written(arch="gpt2"), ValueError,
         r"general\.architecture='gpt2'; only 'llama'"),
    Case("gguf", "missing tensor", gguf_written(drop=("blk.0.ffn_down.weight",)), ValueError,
         r"missing tensor 'blk\.0\.ffn_down\.weight' \(model\.layers\.0\.mlp\.down_proj\.weight\)"),
    Case("gguf", "metadata of the wrong type", gguf_written(block_count="one"), ValueError,
         r"GGUF metadata 'llama\.block_count' = 'one'; expected an integer"),
    Case("gguf", "eos token id outside the vocabulary (tokenizer)", gguf_written(
        tk.from_gguf, eos=10_000), ValueError,
         r"tokenizer\.ggml\.eos_token_id=10000; expected a token id in \[0, \d+\)"),
    Case("gguf", "missing file (load_tokenizer)", lambda tmp, g: (
        (lambda: tk.load_tokenizer(tmp / "nope.gguf")), tmp / "nope.gguf"), FileNotFoundError,
         r"GGUF tokenizer file not found"),
    # -- Hugging Face model directory ----------------------------------------------------------
    Case("hf dir", "missing config.json", hf_case(
        lambda d: ((d / "config.json").unlink(), d / "config.json")[1]), FileNotFoundError,
         r"config\.json not found: expected a Hugging Face model directory"),
    Case("hf dir", "config.json not JSON", hf_case(write_file("config.json", "{'n_layer': 2,")),
         ValueError, r"config\.json: not valid JSON \(line 1, column 2"),
    Case("hf dir", "config.json a list", hf_case(write_file("config.json", "[1, 2]")),
         ValueError, r"config\.json: expected a JSON object, got a JSON list"),
    Case("hf dir", "unknown model_type", hf_case(edit_config(architectures=KeyError,
                                                             model_type="bert")),
         ValueError, r"config\.json: unsupported architecture model_type='bert'; supported: "
         r"GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM"),
    Case("hf dir", "unknown architecture", hf_case(edit_config(architectures=["MambaForCausalLM"])),
         ValueError, r"config\.json: unsupported architecture MambaForCausalLM"),
    Case("hf dir", "config key missing", hf_case(edit_config(hidden_size=KeyError)), ValueError,
         r"config\.json: config key 'hidden_size' is missing; expected an integer"),
    Case("hf dir", "config key of the wrong type", hf_case(edit_config(num_hidden_layers="2")),
         ValueError, r"config\.json: config key 'num_hidden_layers' = '2'; expected an integer"),
    Case("hf dir", "missing model.safetensors", hf_case(
        lambda d: ((d / "model.safetensors").unlink(), d)[1]), FileNotFoundError,
         r"has neither model\.safetensors nor model\.safetensors\.index\.json"),
    Case("hf dir", "model.safetensors truncated in the tensor data", hf_case(
        cut_safetensors(lambda n: n - 1000)), ValueError,
         r"model\.safetensors: truncated: expected \d+ bytes of tensor data \(up to the end of "
         r"tensor '[\w.]+'\), the file has \d+"),
    Case("hf dir", "model.safetensors truncated in the header", hf_case(
        cut_safetensors(lambda n: 5)), ValueError,
         r"model\.safetensors: truncated: expected an 8-byte header length, the file has 5 bytes"),
    Case("hf dir", "model.safetensors not safetensors", hf_case(
        write_file("model.safetensors", "version https://git-lfs.github.com/spec/v1\n")),
         ValueError, r"model\.safetensors: truncated or not a safetensors file: the first 8 "
         r"bytes announce a \d+-byte JSON header"),
    Case("hf dir", "model.safetensors header not JSON", hf_case(
        lambda d: (d / "model.safetensors").write_bytes(
            patched((d / "model.safetensors").read_bytes(), 8, b"#")) and d / "model.safetensors"),
         ValueError, r"model\.safetensors: corrupt: the header is not JSON"),
    Case("hf dir", "missing tensor", hf_case(edit_tensors(
        drop_tensor("model.layers.1.mlp.up_proj.weight"))), ValueError,
         r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight' for a "
         r"LlamaForCausalLM with 2 layers .*expected shape \(192, 64\)"),
    Case("hf dir", "wrong tensor shape", hf_case(edit_tensors(
        transpose_tensor("model.layers.0.mlp.down_proj.weight"))), ValueError,
         r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape "
         r"\(192, 64\); expected \(64, 192\)"),
    Case("hf dir", "sharded: wrong tensor shape names the shard", hf_case(sharded_bad_shape),
         ValueError,
         r"model-0000\d-of-00002\.safetensors: tensor 'model\.layers\.1\.mlp\.down_proj\.weight' "
         r"has shape \(192, 64\); expected \(64, 192\)"),
    Case("hf dir", "sharded: index points at a missing shard", hf_case(
        lambda d: (edit_tensors(lambda t: None, shards=True)(d),
                   (d / "model-00002-of-00002.safetensors").unlink(),
                   d / "model.safetensors.index.json")[2]), FileNotFoundError,
         r"lists shard 'model-00002-of-00002\.safetensors', which is missing"),
    Case("hf dir", "sharded: index not JSON", hf_case(
        lambda d: (edit_tensors(lambda t: None, shards=True)(d),
                   write_file("model.safetensors.index.json", "{")(d))[1]), ValueError,
         r"model\.safetensors\.index\.json: not valid JSON"),
    # -- tokenizer files -----------------------------------------------------------------------
    Case("tokenizer dir", "missing tokenizer.json", tok_case(
        lambda d: ((d / "tokenizer.json").unlink(), d)[1]), FileNotFoundError,
         r"no tokenizer\.json and no vocab\.json \+ merges\.txt \(found \['tokenizer_config"),
    Case("tokenizer dir", "tokenizer.json not JSON", tok_case(
        write_file("tokenizer.json", "<html>rate limited</html>")), ValueError,
         r"tokenizer\.json: not a tokenizer the `tokenizers` library can read"),
    Case("tokenizer dir", "tokenizer.json JSON the library rejects", tok_case(
        write_file("tokenizer.json", json.dumps({"version": "1.0", "model": {"type": "Nope"}}))),
         ValueError, r"tokenizer\.json: not a tokenizer the `tokenizers` library can read"),
    Case("tokenizer dir", "tokenizer.json not UTF-8", tok_case(
        write_file("tokenizer.json", b'{"version": "\xff"}')), ValueError,
         r"tokenizer\.json: not UTF-8 text"),
    Case("tokenizer dir", "tokenizer_config.json not JSON", tok_case(
        write_file("tokenizer_config.json", "{eos_token: x}"), tk.load_tokenizer), ValueError,
         r"tokenizer_config\.json: invalid JSON"),
    Case("tokenizer dir", "eos_token not in the vocabulary", tok_case(
        lambda d: (write_file("tokenizer_config.json", json.dumps({"eos_token": "</s>"}))(d),
                   d)[1]), ValueError,
         r"tok: eos_token '</s>' is not in the tokenizer's vocabulary"),
    Case("tokenizer dir", "vocab.json + merges.txt with a non-integer id", tok_case(
        lambda d: ((d / "tokenizer.json").unlink(), write_file("merges.txt", "a b\n")(d),
                   write_file("vocab.json", json.dumps({"a": 0, "b": "1"}))(d))[2]), ValueError,
         r"vocab\.json: token 'b' maps to '1'; expected \{token: integer id\}"),
]


def test_table_is_large_and_covers_every_kind():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)
    kinds = {c.kind for c in CASES}
    assert {"comparisons jsonl", "comparisons folder", "labeling csv", "gguf", "hf dir",
            "tokenizer dir"} <= kinds


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_file_ends_in_a_clear_error(case, tmp_path, good):
    load, named = case.make(tmp_path, good)
    with pytest.raises(case.exc, match=case.match) as e:
        load()
    assert type(e.value) is case.exc  # not a subclass such as UnicodeDecodeError
    assert str(named) in str(e.value), f"the message does not name {named}: {e.value}"
    origin = pathlib.Path(str(e.traceback[-1].path)).resolve()
    assert origin.is_relative_to(PACKAGE), f"raised from {origin}, not from rlhf_jax: {e.value}"


# --- accepted inputs and counts ----------------------------------------------------------------

def test_utf8_bom_is_accepted_in_jsonl_and_csv(tmp_path):
    """Excel's "CSV UTF-8" and Windows editors start files with a byte order mark."""
    recs = [record(i) for i in range(3)]
    p = jsonl(tmp_path / "c.jsonl", recs, prefix=codecs.BOM_UTF8)
    assert comparisons.read_comparisons(p) == recs
    assert comparisons.import_rankings(p) == recs
    c = csv_file(tmp_path / "l.csv", csv_rows(recs, labeler="sim"), prefix="\ufeff")
    assert c.read_bytes().startswith(codecs.BOM_UTF8)
    assert comparisons.import_rankings(c) == recs
    # Only a leading mark is dropped: one inside the data is still an error.
    bad = jsonl(tmp_path / "bad.jsonl", [recs[0]])
    bad.write_bytes(bad.read_bytes() + codecs.BOM_UTF8 + json.dumps(recs[1]).encode() + b"\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        comparisons.read_comparisons(bad)


def test_csv_blank_rows_are_ignored_and_column_order_is_free(tmp_path):
    recs = [record(i) for i in range(2)]
    header = list(reversed(comparisons.CSV_COLUMNS))
    rows = [list(reversed(r)) for r in csv_rows(recs, labeler="sim")] + [[""] * 7, [""] * 7]
    p = csv_file(tmp_path / "l.csv", rows, header=header)
    assert comparisons.import_rankings(p) == recs


def test_count_untied_pairs():
    assert comparisons.count_untied_pairs([]) == 0
    assert comparisons.count_untied_pairs([{"ranks": [0, 0, 0]}]) == 0
    assert comparisons.count_untied_pairs([{"ranks": [0, 1, 2]}]) == 3
    assert comparisons.count_untied_pairs([{"ranks": [0, 0, 1]}, {"ranks": [1, 0]}]) == 3
    assert comparisons.count_untied_pairs(iter([{"ranks": np.array([1, 0, 1, 0])}])) == 4
    assert comparisons.require_untied_pairs([{"ranks": [0, 0, 1]}], "x", minimum=2) == 2
    with pytest.raises(DataError, match=r"x: expected at least 3 untied"):
        comparisons.require_untied_pairs([{"ranks": [0, 0, 1]}], "x", minimum=3)


def test_untied_pairs_of_a_built_split(tmp_path):
    recs = [record(0, ranks=[0, 0, 0]), record(1, ranks=[0, 1, 1]), record(2)]
    jsonl(tmp_path / "train.jsonl", recs)
    _, src = comparisons.build_comparisons(tmp_path / "train.jsonl", str(tmp_path / "tfds"))
    assert comparisons.count_untied_pairs(src["train"]) == 0 + 2 + 3


def test_mixed_k_can_be_allowed(tmp_path):
    recs = [record(0), record(1, k=2)]
    with pytest.raises(DataError, match=r"<records>#1: field 'responses': expected K=3"):
        comparisons.write_comparisons(tmp_path / "w.jsonl", recs)  # never written, then
    assert not (tmp_path / "w.jsonl").exists()
    assert comparisons.write_comparisons(tmp_path / "w.jsonl", recs, allow_mixed_k=True) == 2
    p = jsonl(tmp_path / "train.jsonl", recs)
    assert comparisons.read_comparisons(p, allow_mixed_k=True) == recs
    _, src = comparisons.build_comparisons(p, str(tmp_path / "tfds"), allow_mixed_k=True)
    assert len(src["train"]) == 2


def test_require_splits_can_be_relaxed(tmp_path):
    jsonl(tmp_path / "eval.jsonl", [record(0)])
    _, src = comparisons.build_comparisons(tmp_path, str(tmp_path / "tfds"), require_splits=())
    assert set(src) == {"eval"}


def test_skip_mode_counts_every_bad_record(tmp_path):
    """Nothing is skipped without being counted, in JSONL, CSV and a multi-file split."""
    d = tmp_path / "src"
    d.mkdir()
    jsonl(d / "train.jsonl", [record(0), "{bad", record(1, k=2), record(2), record(0)])
    jsonl(d / "train-00001.jsonl", [])
    jsonl(d / "train-00002.jsonl", [record(3), dict(record(4), ranks=[0, 5, 1])])
    builder, src = comparisons.build_comparisons(d, str(tmp_path / "tfds"), on_error="skip")
    assert len(src["train"]) == builder.report.kept == 3
    assert dict(builder.report.skipped) == {"bad_json": 1, "mixed_k": 1, "duplicate_id": 1,
                                            "empty_file": 1, "rank_mismatch": 1}

    rows = csv_rows([record(0), record(1), record(2, k=2), record(3)])
    rows.insert(2, ["", "p", 0, "orphan", "pi0", 0, "me"])  # blank id: this row is skipped
    rows[5][1] = "another prompt"  # q1 has two prompts
    rep = DataReport()
    got = comparisons.import_rankings(csv_file(tmp_path / "l.csv", rows), on_error="skip",
                                      report=rep)
    assert [r["id"] for r in got] == ["q0", "q3"]
    assert rep.kept == 2 and dict(rep.skipped) == {"missing_field": 1, "prompt_mismatch": 1,
                                                   "mixed_k": 1}
    assert "l.csv:4" in rep.summary()  # the blank-id row, by line
