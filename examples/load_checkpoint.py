"""Load a checkpoint into a model written without input sizes: no random init first.

An eager convnet is trained for a step and its state dict saved as ``.safetensors``.
The same network written with deferred layers (no input sizes anywhere) is then
given that file with ``di.load_state_dict``: every size is read off the saved
tensors, the layers are built on ``meta`` (no memory, no random numbers) and the
saved tensors are put in place. A checkpoint that does not fit, or a file cut
short, is refused with the offending keys or the file's name, and the model is
left as it was.

Run: ``python examples/load_checkpoint.py`` — prints one ``name: value`` line per
check and exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def eager_convnet(channels: int, classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, classes),
    )


def deferred_convnet(classes: int) -> nn.Sequential:
    """The same network with no input size written: channels and features are inferred."""
    return nn.Sequential(
        dnn.Conv2d(8, 3, padding=1),
        dnn.BatchNorm2d(),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        dnn.Linear(classes),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=3, help="input channels of the images")
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args(argv)

    # 1. An eager model, trained one step (so its running statistics moved too).
    torch.manual_seed(0)
    eager = eager_convnet(args.channels, args.classes)
    images = torch.randn(16, args.channels, 12, 12)
    optimizer = torch.optim.SGD(eager.parameters(), lr=0.1)
    nn.functional.cross_entropy(eager(images), torch.randint(args.classes, (16,))).backward()
    optimizer.step()
    eager.eval()

    checks: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "convnet.safetensors"
        save_file(eager.state_dict(), str(path))
        print(f"checkpoint: {path.name} ({path.stat().st_size} bytes)")

        # 2. A checkpoint that does not fit is refused; the model stays deferred.
        model = deferred_convnet(args.classes)
        print(f"before: built={di.is_built(model)}, pending={di.pending(model)}")
        placeholders = list(model.parameters())
        truncated = {k: v for k, v in eager.state_dict().items() if not k.startswith("5.")}
        truncated["head.weight"] = torch.zeros(1)
        try:
            di.load_state_dict(model, truncated)
        except di.DeferredInitError as error:
            print(f"refused: {str(error).split('. ')[0]}")
            checks["ill-fitting checkpoint refused"] = True
        else:
            checks["ill-fitting checkpoint refused"] = False
        # So is a file cut short in transit: an error naming the file, nothing loaded.
        broken = Path(tmp) / "broken.safetensors"
        broken.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        try:
            di.load_state_dict(model, broken)
        except di.DeferredInitError as error:
            checks["truncated file refused"] = broken.name in str(error)
        else:
            checks["truncated file refused"] = False
        same = all(p is q for p, q in zip(model.parameters(), placeholders, strict=True))
        checks["model unchanged after refusal"] = not di.is_built(model) and same

        # 3. The checkpoint that fits: sizes from the file, no random init.
        rng = torch.get_rng_state()
        di.load_state_dict(model, path)
        checks["random number generator untouched"] = torch.equal(rng, torch.get_rng_state())

    print(model)
    checks["built"] = di.is_built(model)
    checks["same layers as eager"] = repr(model) == repr(eager)
    checks["parameter objects kept (an optimizer made before holds them)"] = all(
        p is q for p, q in zip(model.parameters(), placeholders, strict=True)
    )
    want, got = eager.state_dict(), model.state_dict()
    checks["values equal the checkpoint"] = list(got) == list(want) and all(
        torch.equal(got[k], want[k]) for k in want
    )
    checks["no tensor left on meta"] = all(t.device.type != "meta" for t in got.values())
    model.eval()
    test = torch.randn(4, args.channels, 12, 12)
    with torch.no_grad():
        checks["outputs equal the eager model"] = torch.equal(model(test), eager(test))

    for name, ok in checks.items():
        print(f"{name}: {ok}")
    print(f"all checks passed: {all(checks.values())}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
