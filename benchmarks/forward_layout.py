"""CPU time of the shipped model's forward pass per 64-px image: contiguous, channels-last and bf16 autocast.

    python benchmarks/forward_layout.py [--threads 1] [--batch 64]

256 random inputs in batches of ``--batch``, site None (the mean of the sites), inference mode, one untimed batch
first; CPU time (user + system) per image, so a neighbour's load moves it less than wall time.
"""

from __future__ import annotations

import argparse
import resource

import torch

from crosssite.models import load
from crosssite.pretrained import shipped_model


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def per_image_ms(model: torch.nn.Module, images: torch.Tensor, batch: int, bf16: bool = False) -> float:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(images[:batch], None)
        start = cpu_seconds()
        for i in range(0, len(images), batch):
            model(images[i : i + batch], None)
    return 1e3 * (cpu_seconds() - start) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, card = load(shipped_model())
    size = int(card["preprocessing"]["image_size"])
    images = torch.randn(256, 3, size, size, generator=torch.Generator().manual_seed(0))
    model.eval()
    print(f"contiguous:    {per_image_ms(model, images, args.batch):.2f} ms CPU per image")
    print(f"bf16 autocast: {per_image_ms(model, images, args.batch, bf16=True):.2f} ms CPU per image")
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    print(f"channels-last: {per_image_ms(model, images, args.batch):.2f} ms CPU per image")


if __name__ == "__main__":
    main()
