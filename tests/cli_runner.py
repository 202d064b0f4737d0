"""Run command lines (`python -m eval.x ...`, `python bench/x.py ...`) each in its own process, fast.

A fresh interpreter spends ~10 s importing torch, transformers, DeepSpeed and lm-eval before a command
reads its first argument, so a table of bad inputs would take minutes. `CliRunner` starts one server
process with the venv's python (sys.executable, OMP_NUM_THREADS=1) that imports those libraries once;
every command then runs in a child forked from it, as the interpreter would run it: `sys.argv` set, the
module run as `__main__` (runpy), stdout and stderr to files, an uncaught exception printed by
sys.excepthook (the "Traceback" a user would see) with exit code 1, SystemExit's code as the exit code.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SERVER = r'''
import json, os, runpy, sys
proto = os.fdopen(os.dup(1), "w", buffering=1)  # replies; the libraries' own prints go to stderr
os.dup2(2, 1)
import torch, transformers, deepspeed, lm_eval, lm_eval.models, datasets  # the slow imports, once
import adapt.train.checkpoint, adapt.train.loop, adapt.decode, adapt.cli.errors  # noqa: F401

ROOT = os.getcwd()

def child(req):
    import signal
    signal.alarm(req.get("timeout", 0))  # a command still running then is killed by SIGALRM: a hang
    sys.argv = list(req["argv"])
    os.environ.update(req["env"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    code = 0
    try:
        os.chdir(req.get("cwd") or ROOT)
        if req["module"]:
            sys.path[0] = ROOT
            runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = os.path.dirname(os.path.abspath(req["script"]))
            runpy.run_path(req["script"], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

print("ready", file=proto)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(req)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), file=proto)
'''


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def pinned_env() -> dict[str, str]:
    """The environment of every command: one thread, no network, the venv's tools on PATH."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


class CliRunner:
    def __init__(self, workdir: Path):
        self.workdir, self.count = Path(workdir), 0
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, env=pinned_env(), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the command runner did not start")

    def run(self, argv: list[str], env: dict[str, str] | None = None, timeout: int = 0,
            cwd: Path | None = None) -> Result:
        """Run `python -m MODULE ARGS` (argv = ["-m", MODULE, *ARGS]) or `python SCRIPT ARGS` in `cwd` (default: the
        repository); a command still running after `timeout` seconds (0: no limit) is killed (code -SIGALRM)."""
        self.count += 1
        out, err = (self.workdir / f"{self.count}.{name}" for name in ("out", "err"))
        module, rest = (argv[1], argv[2:]) if argv[0] == "-m" else (None, argv[1:])
        script = None if module else str(ROOT / argv[0])
        req = {"argv": [module or script, *rest], "module": module, "script": script, "env": env or {},
               "stdout": str(out), "stderr": str(err), "timeout": int(timeout), "cwd": str(cwd) if cwd else None}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return Result(reply["code"], out.read_text(), err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def run_fresh(argv: list[str], timeout: float = 300) -> Result:
    """The same command in a fresh interpreter of the venv (slow: for the few checks of the real start-up)."""
    python = argv[0] == "-m" or argv[0].endswith(".py")
    cmd = [sys.executable, *argv] if python else [os.path.join(os.path.dirname(sys.executable), argv[0]), *argv[1:]]
    proc = subprocess.run(cmd, cwd=ROOT, env=pinned_env(), capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)
