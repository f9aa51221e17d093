"""The communication a tensor-parallel step adds, measured alone on this machine: one all-reduce of a
[tokens, hidden] activation over torch.distributed (gloo on CPU, NCCL on CUDA), and sending one step's packed
inputs down a pipe to a worker. A step makes 2 all-reduces per layer, one logits gather, one pipe send per worker.

    python benchmarks/tp_comm.py --hidden 576 --tokens 1 64 256 2048
"""

import argparse
import multiprocessing as mp
import socket
import time

import numpy as np
import torch
import torch.distributed as dist


def all_reduce_times(rank: int, port: int, hidden: int, tokens: list[int], iters: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    times = {}
    for t in tokens:
        x = torch.randn(t, hidden)
        for _ in range(10):
            dist.all_reduce(x)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        times[t] = (time.perf_counter() - start) / iters
    if out is not None:
        out.send(times)
    dist.destroy_process_group()


def pipe_reader(conn) -> None:
    conn.send_bytes(b"ready")
    while conn.recv_bytes():
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256, 2048])
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer = ctx.Process(target=all_reduce_times, args=(1, port, args.hidden, args.tokens, args.iters, None))
    peer.start()
    mine, theirs = ctx.Pipe()
    all_reduce_times(0, port, args.hidden, args.tokens, args.iters, theirs)
    ar = mine.recv()
    peer.join()
    parent, child = ctx.Pipe()
    reader = ctx.Process(target=pipe_reader, args=(child,))
    reader.start()
    parent.recv_bytes()  # started
    print(f"{'tokens':>7} {'all-reduce us':>14} {'pipe send us':>13}   (hidden {args.hidden}, fp32, 2 processes)")
    for t in args.tokens:
        packed = np.zeros(6 + 5 * t + 2 * 64 + 64 * 32, dtype=np.int64)  # ~ a step of t tokens over 64 sequences
        for _ in range(10):
            parent.send_bytes(packed)
        start = time.perf_counter()
        for _ in range(args.iters):
            parent.send_bytes(packed)
        send = (time.perf_counter() - start) / args.iters
        print(f"{t:>7} {ar[t] * 1e6:>14.0f} {send * 1e6:>13.0f}")
    parent.send_bytes(b"")
    reader.join()


if __name__ == "__main__":
    main()
