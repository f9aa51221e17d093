"""Tensor-parallel worker processes. Rank 0 is the engine's own process: it schedules, samples, and sends each
step's inputs (one packed int64 array, see ModelRunner.pack) down a pipe to every worker; all ranks then run the
same forward, meeting in the all-reduces of the model and the gather of the logits.

Lifecycle: workers are spawned (never forked: torch's threads do not survive a fork), ignore Ctrl-C (the main
process shuts them down), and exit when their pipe closes, so no worker outlives the engine. A worker that fails
sends its traceback up its pipe and exits; its closed sockets make rank 0's next collective fail at once, and
rank 0 raises the worker's message."""

import multiprocessing as mp
import os
import signal
import socket
import traceback
import weakref
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from nanovllm.config import EngineConfig

TIMEOUT = timedelta(seconds=120)  # a collective waits at most this long (a peer's death is seen at once anyway)


def check_tensor_parallel(config: EngineConfig, hf_config) -> None:
    tp = config.tensor_parallel_size
    if config.device == "cuda" and tp > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs; this machine has {torch.cuda.device_count()}")
    if config.device == "cpu" and tp > (os.cpu_count() or 1):
        raise ValueError(f"tensor_parallel_size={tp} needs a CPU core per process; this machine has {os.cpu_count()}")
    heads = hf_config.num_attention_heads
    for name, value in [
        ("num_attention_heads", heads),
        ("num_key_value_heads", getattr(hf_config, "num_key_value_heads", None) or heads),
        ("intermediate_size", hf_config.intermediate_size),
    ]:
        if value % tp:
            raise ValueError(f"the model's {name}={value} is not divisible by tensor_parallel_size={tp}")


def init_distributed(config: EngineConfig, rank: int, port: int) -> None:
    if config.device == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if config.device == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=config.tensor_parallel_size,
        timeout=TIMEOUT,
    )


def worker_main(config: EngineConfig, rank: int, port: int, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import nanovllm.ops as ops
        from nanovllm.engine.model_runner import ModelRunner
        from nanovllm.loader import load_model

        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        init_distributed(config, rank, port)
        dtype, backend = config.torch_dtype(), ops.backend(config.ops)  # the config is rank 0's resolved one
        c = config
        loaded = load_model(c.model, dtype, c.device, c.max_model_len, None, c.tokenizer, backend, c.quantization)
        runner = ModelRunner(config, loaded.model, dtype, loaded.eos_token_ids)
        dist.barrier()  # loaded everywhere
        while True:
            try:
                step = conn.recv_bytes()
            except EOFError:  # the engine is gone
                break
            if not step:
                break
            inputs = runner.unpack(np.frombuffer(step, dtype=np.int64))
            runner.forward(inputs.input_ids, inputs.positions, inputs.meta, inputs.last)
    except BaseException:
        try:
            conn.send(f"worker {rank}: {traceback.format_exc()}")
        finally:
            os._exit(1)  # no clean-up that could block on a peer: the closed sockets tell rank 0
    dist.destroy_process_group()


class Workers:
    """The processes of ranks 1..tp-1, seen from rank 0, which joins the process group here too."""

    def __init__(self, config: EngineConfig):
        if dist.is_initialized():
            raise RuntimeError(
                "another tensor-parallel engine is running in this process: shut it down first "
                "(LLM.shutdown(), or use LLM as a context manager)"
            )
        ctx = mp.get_context("spawn")
        with socket.socket() as s:  # a free port now; the store binds it a moment later
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.procs, self.conns = [], []
        for rank in range(1, config.tensor_parallel_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(config, rank, port, child), daemon=True, name=f"nanovllm-tp{rank}"
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, shutdown, self.procs, self.conns)
        try:
            init_distributed(config, 0, port)
        except BaseException as e:
            raise self.failure(e) from e

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def send(self, step: np.ndarray) -> None:
        for conn in self.conns:
            conn.send_bytes(step)

    def failure(self, error: BaseException) -> RuntimeError:
        """After a failed step: stop every worker and say what went wrong, in the workers' words if they left any."""
        for proc in self.procs:
            proc.join(timeout=2)  # a failing worker exits right after writing its message
        messages = []
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            try:
                if conn.poll():
                    messages.append(conn.recv().strip())
            except (EOFError, OSError):
                pass
            if proc.exitcode is not None and not any(m.startswith(f"worker {rank}:") for m in messages):
                messages.append(f"worker {rank} died (exit code {proc.exitcode})")
        self.shutdown()
        detail = "\n".join(messages) or f"{type(error).__name__}: {error}"
        return RuntimeError(f"tensor parallelism failed; the engine cannot continue:\n{detail}")

    def shutdown(self) -> None:
        self._finalizer()

    def kill(self) -> None:
        """Stop now: workers may be waiting in a collective that will never complete."""
        for proc in self.procs:
            proc.kill()
        self._finalizer()


def shutdown(procs: list, conns: list) -> None:
    for conn in conns:
        try:
            conn.send_bytes(b"")  # the exit command
        except OSError:
            pass
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
    for conn in conns:
        conn.close()
    if dist.is_initialized():
        dist.destroy_process_group()
