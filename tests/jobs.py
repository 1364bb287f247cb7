"""Launcher jobs (accelerate launch, torchrun) in tests: run one to its end, or kill all of it.

torchrun starts every worker in its own session, so killing the launcher (as
subprocess.run's timeout does) leaves the workers running, holding CPU and ports for the
rest of the suite. These helpers kill the launcher and every worker it started."""

from __future__ import annotations

import signal
import subprocess

from tests.helpers import REPO, train_env


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it, as a dying machine would."""
    import psutil

    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    for p in [*workers, psutil.Process(proc.pid) if proc.poll() is None else None]:
        if p is None:
            continue
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(workers, timeout=30)


def run_job(args: list[str], timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """subprocess.run(args) from the repository root, output captured; on timeout the whole
    job is killed before TimeoutExpired propagates."""
    proc = subprocess.Popen(args, cwd=REPO, env=env or train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)
