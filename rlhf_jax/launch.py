"""Start N local processes of one command, joined by ``jax.distributed``.

    python -m rlhf_jax.launch --nproc 2 -- python -m experiments.sft --preset tiny --mesh fsdp=8
    python -m rlhf_jax.launch --nproc 2 --cpu-devices 4 -- python -m experiments.ppo --preset tiny

Each process gets ``JAX_COORDINATOR_ADDRESS`` (``127.0.0.1:<free port>``), ``JAX_NUM_PROCESSES``
and ``JAX_PROCESS_ID``; the experiments call :func:`rlhf_jax.parallel.initialize_distributed`
when they parse their command line, which joins them (CPU collectives over gloo; GPUs and TPUs use
their own). ``--cpu-devices K`` runs on the CPU with K simulated devices per process (a test of a
multi-host set-up on one machine); otherwise each process sees the accelerators the environment
gives it (set ``CUDA_VISIBLE_DEVICES`` per process with ``--gpus-per-process``).

Every process runs the same command on the same data: the global batch is identical everywhere and
each process feeds its own devices' rows; only process 0 writes metrics, summaries and bundles
(checkpoints are written by all, through orbax). If one process fails, the others are stopped and
the launcher exits with the failing status.

On a cluster, start one process per host with the scheduler instead (SLURM's ``srun``, Open MPI,
Cloud TPU and Kubernetes set the variables that ``jax.distributed.initialize`` detects), or set
``JAX_COORDINATOR_ADDRESS=<host 0>:<port>``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` yourself.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    """A TCP port that nothing listens on at the moment."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(rank: int, nproc: int, port: int, cpu_devices: int | None = None,
                gpus_per_process: int | None = None, base: dict | None = None) -> dict:
    """The environment of process ``rank`` of ``nproc``."""
    env = dict(os.environ if base is None else base)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(nproc),
               JAX_PROCESS_ID=str(rank))
    if cpu_devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count="
                                             f"{cpu_devices}"])
        env["JAX_PLATFORMS"] = "cpu"
        env["JAX_NUM_CPU_DEVICES"] = str(cpu_devices)
    if gpus_per_process:
        first = rank * gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(gpus_per_process))
    return env


def launch(command: list[str], nproc: int, cpu_devices: int | None = None,
           gpus_per_process: int | None = None, port: int | None = None,
           timeout: float | None = None) -> int:
    """Runs ``command`` as ``nproc`` processes; returns the first non-zero exit status (0 if all
    succeed). A failing process (or the timeout) stops the others."""
    if nproc < 1:
        raise ValueError(f"nproc={nproc}: expected a positive integer")
    if not command:
        raise ValueError("no command to launch (put it after --)")
    port = port or free_port()
    procs = [subprocess.Popen(command, env=process_env(r, nproc, port, cpu_devices,
                                                       gpus_per_process))
             for r in range(nproc)]
    start, status = time.monotonic(), 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed or (timeout and time.monotonic() - start > timeout):
                status = failed[0] if failed else 124
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return status or next((p.returncode for p in procs if p.returncode), 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: python -m rlhf_jax.launch --nproc N [--cpu-devices K] -- "
                         "COMMAND ...")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.launch",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, required=True, help="processes to start")
    parser.add_argument("--cpu-devices", type=int, default=None,
                        help="run on the CPU with this many simulated devices per process")
    parser.add_argument("--gpus-per-process", type=int, default=None,
                        help="give process r the GPUs r*K ... r*K+K-1 (CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before stopping all")
    args = parser.parse_args(argv[:cut])
    return launch(argv[cut + 1:], args.nproc, args.cpu_devices, args.gpus_per_process,
                  args.port, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
