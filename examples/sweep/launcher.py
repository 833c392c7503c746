"""A hyperparameter sweep as one array job.

    lxm3 launch examples/sweep/launcher.py                  # on this machine
    lxm3 launch examples/sweep/launcher.py --seeds 10       # more seeds
"""

import argparse
import itertools

from lxm3 import xm, xm_cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per learning rate")
    parser.add_argument("--parallel", type=int, default=None, help="tasks at once (default: cores)")
    flags = parser.parse_args()

    with xm_cluster.create_experiment(experiment_title="linear regression sweep") as experiment:
        executor = xm_cluster.Local(max_parallel_tasks=flags.parallel)
        spec = xm_cluster.PythonPackage(path=".", entrypoint=xm_cluster.ModuleName("sweep.train"))
        [executable] = experiment.package(
            [xm.Packageable(spec, executor_spec=executor.Spec(), args={"steps": 300})]
        )
        learning_rates = [0.01, 0.1]
        args = [
            # Names with spaces and quotes reach the program exactly as written.
            {"seed": seed, "learning_rate": lr, "name": f"lr={lr} seed's {seed}"}
            for lr, seed in itertools.product(learning_rates, range(flags.seeds))
        ]
        experiment.add(xm_cluster.ArrayJob(executable, executor, args=args))


if __name__ == "__main__":
    main()
