"""A stand-in for a training script: fits y = 3x + 1 by gradient descent."""

import argparse
import os
import random


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning_rate", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--name", default="")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    data = [(x, 3 * x + 1 + rng.gauss(0, 0.1)) for x in (rng.uniform(-1, 1) for _ in range(64))]
    w, b = rng.uniform(-1, 1), 0.0
    for _ in range(args.steps):
        grad_w = sum(2 * (w * x + b - y) * x for x, y in data) / len(data)
        grad_b = sum(2 * (w * x + b - y) for x, y in data) / len(data)
        w, b = w - args.learning_rate * grad_w, b - args.learning_rate * grad_b
    loss = sum((w * x + b - y) ** 2 for x, y in data) / len(data)
    print(f"task {os.environ['LXM_TASK_ID']}/{os.environ['LXM_NUM_TASKS']} {args.name!r}: "
          f"seed={args.seed} lr={args.learning_rate} -> w={w:.3f} b={b:.3f} loss={loss:.4f}")


if __name__ == "__main__":
    main()
