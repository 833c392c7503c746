"""Run the hello package once on this machine: lxm3 launch examples/hello_world/launcher.py"""

from lxm3 import xm, xm_cluster


def main() -> None:
    with xm_cluster.create_experiment(experiment_title="hello world") as experiment:
        executor = xm_cluster.Local()
        spec = xm_cluster.PythonPackage(path=".", entrypoint=xm_cluster.ModuleName("hello.main"))
        [executable] = experiment.package(
            [xm.Packageable(spec, executor_spec=executor.Spec(), args={"greeting": "hi there"})]
        )
        experiment.add(xm.Job(executable, executor, args=["a positional argument"]))


if __name__ == "__main__":
    main()
