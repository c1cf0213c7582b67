"""Data: tokenizers, TFDS builders (array_record, no TensorFlow) and grain batching.

Modules (imported explicitly, so ``import rlhf_jax.data.tokenizers`` stays light):

* ``tokenizers``  -- GPT-2 BPE, trained byte-level BPE, HF/GGUF tokenizers, chat templates.
* ``comparisons`` -- the comparisons JSONL schema, reader/writer, labeling export/import, and the
  ``rlhf_comparisons`` builder.
* ``imdb``        -- offline IMDB reviews (``rlhf_imdb``: splits ``lm``/``prompts``/``eval``).
* ``tldr``        -- TL;DR SFT and human comparisons (Stiennon et al. 2020), downloaded.
* ``hh``          -- Anthropic HH-RLHF, downloaded; prompt split from the shared prefix.
* ``batching``    -- SFT / packed LM / comparison / prompt batches with grain; resumable iterators.
* ``errors``      -- ``DataError`` (names file, line, field) and ``DataReport`` (skip counts).
* ``build``       -- ``python -m rlhf_jax.data.build imdb`` and friends.
"""
