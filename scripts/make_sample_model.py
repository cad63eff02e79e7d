#!/usr/bin/env python3
"""Build (once) the sample fp16 checkpoint SmolLM2-135M-Instruct into quantkit's cache and print its folder.

Tests, the README's sample run and the benchmarks all use this folder.
"""

from quantkit.sample import ensure_sample

if __name__ == "__main__":
    print(ensure_sample(log=lambda m: print(m, flush=True)))
