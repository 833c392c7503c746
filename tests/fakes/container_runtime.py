#!/usr/bin/env python3
"""A stand-in for apptainer, singularity and docker, for tests only.

No container runtime can be installed on the test machines, so tests put this
script on the PATH under those names. It records its arguments (JSON lines in
$FAKE_RUNTIME_LOG), then does what the real runtime would do for the options
lxm3 uses: run the command after the image in the given working directory,
with the environment the container would see.
"""

import json
import os
import sys

SINGULARITY_VALUE_OPTIONS = {"--bind", "-B", "--pwd", "--env", "--home", "-H", "--overlay", "-o"}
DOCKER_VALUE_OPTIONS = {"-v", "--volume", "-w", "--workdir", "-e", "--env", "--user", "-u",
                        "--gpus", "--name", "--network"}


def main() -> int:
    tool = os.path.basename(sys.argv[0])
    args = sys.argv[1:]
    with open(os.environ["FAKE_RUNTIME_LOG"], "a") as log:
        log.write(json.dumps({"tool": tool, "argv": args}) + "\n")
    verb, rest = args[0], args[1:]
    docker = tool == "docker"
    if (docker and verb != "run") or (not docker and verb != "exec"):
        print(f"fake {tool}: unsupported verb {verb}", file=sys.stderr)
        return 2
    values = DOCKER_VALUE_OPTIONS if docker else SINGULARITY_VALUE_OPTIONS
    options, i = [], 0
    while rest[i].startswith("-"):
        if rest[i] in values:
            options.append((rest[i], rest[i + 1]))
            i += 2
        else:
            options.append((rest[i], None))
            i += 1
    command = rest[i + 1:]  # after the image
    cwd = next((v for k, v in options if k in ("--pwd", "-w", "--workdir")), os.getcwd())
    if docker:  # only what -e passes gets in
        env = {"PATH": os.environ["PATH"]}
        for key, value in options:
            if key in ("-e", "--env"):
                name, _, given = value.partition("=")
                if "=" in value:
                    env[name] = given
                elif name in os.environ:
                    env[name] = os.environ[name]
    else:
        prefix = "APPTAINERENV_" if tool == "apptainer" else "SINGULARITYENV_"
        clean = any(k in ("--cleanenv", "-e") for k, _ in options)
        env = {"PATH": os.environ["PATH"]} if clean else dict(os.environ)
        env.update({k[len(prefix):]: v for k, v in os.environ.items() if k.startswith(prefix)})
        env = {k: v for k, v in env.items() if not k.startswith(prefix)}
    env["FAKE_RUNTIME"] = tool
    os.chdir(cwd)
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    sys.exit(main())
