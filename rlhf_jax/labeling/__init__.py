"""Human labeling: a web app where people rank the K responses of each prompt.

A session, end to end::

    python -m experiments.collect ... --labeler export        # writes <workdir>/to_label/*.jsonl
    python -m rlhf_jax.labeling serve <workdir>               # http://127.0.0.1:8765/
    # ... people rank in their browsers; /agreement shows how they agree ...
    python -m rlhf_jax.labeling export <workdir> --out <workdir>/ranked
    python -m experiments.collect ... --labeler import --rankings-file <workdir>/ranked

Modules:

* :mod:`~rlhf_jax.labeling.store` — the SQLite database (WAL, ``synchronous=FULL``): items,
  leases that expire, rankings (idempotent by ``submission_id``, unique per item and labeler),
  skips, undo. At most ``labels_per_item`` labelers rank an item; everything survives a crash.
* :mod:`~rlhf_jax.labeling.server` — the FastAPI app (JSON API, the page, the agreement view),
  body validation and size limit, tokens for non-loopback hosts.
* :mod:`~rlhf_jax.labeling.records` — reading the JSONL to label; exporting rankings in the
  comparisons schema (:mod:`rlhf_jax.data.comparisons`).
* :mod:`~rlhf_jax.labeling.agreement` — Kendall's τ-b between labelers and with gold scores.
* :mod:`~rlhf_jax.labeling.client` — an HTTP client and the simulated labeler
  (:func:`rlhf_jax.labelers.simulated_ranks`) acting through it
  (``python -m rlhf_jax.labeling simulate URL --labeler NAME --gold-from FILES``).
* ``static/`` — ``index.html``/``app.js``/``style.css`` (ranking page) and
  ``agreement.html``/``agreement.js``: plain files, no build step. Text from the data is only
  ever inserted with ``textContent``.

The page shows the prompt and the K responses in an order shuffled per item and labeler (stable
across reloads; policies never leave the server). People drag responses into rank rows (same row
= tie) or type response numbers best-first (Shift+number ties with the previous pick), then
submit; they can skip an item and undo their last ranking. ``docs/labeling.md`` is the guide.
"""
