"""Speed of the paper's network on this machine: a thin entry point to `crosssite.bench` (also `crosssite bench`).

    python benchmarks/bench_model.py [--json] [--steps 5] [--compile] [--width 1.0] [--image-size 224]
"""

from crosssite.bench import main

if __name__ == "__main__":
    main()
