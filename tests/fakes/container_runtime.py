#!/usr/bin/env python3
"""A stand-in for apptainer, singularity and docker, for tests only.

No container runtime can be installed on the test machines, so tests put this
script on the PATH under those names. It records its arguments (JSON lines in
$FAKE_RUNTIME_LOG), then does what the real runtime would do for the options
lxm3 uses: run the command after the image in the given working directory,
with the environment the container would see.

It also builds, as far as lxm3 can tell: ``docker build -t TAG -f FILE
[--iidfile F] CONTEXT`` checks that what the Dockerfile copies is in the
context and logs the Dockerfile's text (a ``built`` entry); the image's id is
the hash of the Dockerfile and the files it copies (as docker's layer cache,
the same inputs give the same image), kept with its tag in a small "daemon"
file ($FAKE_DOCKER_STATE, default beside the log). ``docker image inspect --format
{{.Id}} REF`` reads it back. ``apptainer/singularity build OUT SOURCE`` writes
OUT from a ``docker-daemon:`` image of that daemon or a ``docker-archive:``
file: a fresh file each time, as real builds are (they embed a timestamp).
With $FAKE_DOCKER_DOWN set, docker fails as it does when its daemon is down.
"""

import hashlib
import json
import os
import sys

SIF_SIZE = 256 * 1024


def daemon_file() -> str:
    return os.environ.get("FAKE_DOCKER_STATE") or os.path.join(
        os.path.dirname(os.environ["FAKE_RUNTIME_LOG"]), "fake-docker-daemon.json")


def load_daemon() -> dict:
    try:
        with open(daemon_file()) as f:
            return json.load(f)
    except OSError:
        return {}


def full_reference(ref: str) -> str:
    return ref if ":" in ref.rsplit("/", 1)[-1] or ref.startswith("sha256:") else ref + ":latest"


def docker_build(args) -> int:
    names = {"-t": "t", "--tag": "t", "-f": "f", "--file": "f", "--iidfile": "iidfile"}
    options, context = {}, None
    i = 0
    while i < len(args):
        if args[i] in names:
            options[names[args[i]]] = args[i + 1]
            i += 2
        elif args[i].startswith("-"):
            print(f"fake docker build: unknown option {args[i]}", file=sys.stderr)
            return 2
        else:
            context = args[i]
            i += 1
    dockerfile = options.get("f") or os.path.join(context, "Dockerfile")
    with open(dockerfile) as f:
        text = f.read()
    # As docker's layer cache: the same Dockerfile and copied files give the same image.
    digest = hashlib.sha256(text.encode())
    for line in text.splitlines():
        if not line.startswith("COPY ") or "--from=" in line:
            continue
        rest = line[5:].strip()
        sources = json.loads(rest)[:-1] if rest.startswith("[") else rest.split()[:-1]
        for source in sources:
            path = os.path.join(context, source)
            if not os.path.isfile(path):
                print(f'COPY failed: file not found in build context: "{source}"', file=sys.stderr)
                return 1
            with open(path, "rb") as f:
                digest.update(source.encode() + b"\0" + f.read())
    image_id = "sha256:" + digest.hexdigest()
    daemon = load_daemon()
    daemon[full_reference(options["t"])] = image_id
    with open(daemon_file(), "w") as f:
        json.dump(daemon, f)
    if "iidfile" in options:
        with open(options["iidfile"], "w") as f:
            f.write(image_id)
    with open(os.environ["FAKE_RUNTIME_LOG"], "a") as log:  # the Dockerfile is gone after the build
        log.write(json.dumps({"tool": "docker", "built": {
            "tag": options["t"], "id": image_id, "context": context, "dockerfile": text}}) + "\n")
    print(f"Successfully built {image_id[7:19]}\nSuccessfully tagged {options['t']}")
    return 0


def docker_inspect(args) -> int:
    if args[:2] != ["--format", "{{.Id}}"] or len(args) != 3:
        print(f"fake docker image inspect: unsupported arguments {args}", file=sys.stderr)
        return 2
    ref = full_reference(args[2])
    image_id = load_daemon().get(ref) or (ref if ref in load_daemon().values() else None)
    if image_id is None:
        print(f"Error: No such image: {args[2]}", file=sys.stderr)
        return 1
    print(image_id)
    return 0


def sif_build(args) -> int:
    args = [a for a in args if a not in ("--force", "-F")]
    out, source = args
    transport, _, ref = source.partition(":")
    if transport == "docker-daemon":
        origin = load_daemon().get(full_reference(ref))
        if origin is None:
            print(f"FATAL: docker-daemon image {ref} not found", file=sys.stderr)
            return 255
    elif transport == "docker-archive":
        with open(ref, "rb") as f:
            origin = "sha256:" + hashlib.sha256(f.read()).hexdigest()
    else:
        print(f"fake build: unsupported source {source}", file=sys.stderr)
        return 2
    if os.path.exists(out):
        print(f"FATAL: {out} exists; use --force", file=sys.stderr)
        return 255
    head = f"FAKE-SIF from {source} image {origin}\n".encode()
    with open(out, "wb") as f:
        f.write(head + os.urandom(SIF_SIZE - len(head)))
    return 0

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
    if docker and os.environ.get("FAKE_DOCKER_DOWN"):
        print("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
              "Is the docker daemon running?", file=sys.stderr)
        return 1
    if docker and (verb == "build" or args[:2] == ["buildx", "build"]):
        return docker_build(rest if verb == "build" else args[2:])
    if docker and (verb == "inspect" or args[:2] == ["image", "inspect"]):
        return docker_inspect(rest if verb == "inspect" else args[2:])
    if not docker and verb == "build":
        return sif_build(rest)
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
