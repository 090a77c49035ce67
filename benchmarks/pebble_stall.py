"""Issue 21's cause, reproduced on pebble alone: SIGKILL a pool worker at a random moment.

    python benchmarks/pebble_stall.py 30

pebble's ProcessPool (what the process executor used before issue 21) with 2 forkserver
workers gets 40 tasks of 8 MiB (each returns 4 MiB, so receiving and sending take many
pipe writes), and one worker is SIGKILLed 0.05-0.6 s in. A run that takes about 120 s
stalled twice on the pool's 60 s channel-lock timeout, then broke. Results and a py-spy
dump of a stall: ``benchmarks/results/pebble-stall.md``. pebble is no longer used by the
tool; this stays as the record of why.
"""

import concurrent.futures as cf
import multiprocessing
import os
import random
import signal
import sys
import time

import pebble

PAYLOAD = 8 << 20  # 8 MiB per task: many pipe-buffer writes, so kills land mid-transfer


def work(data: bytes) -> bytes:
    return data[: len(data) // 2]  # a 4 MiB result: the send is long too


def one_run(seed: int) -> tuple[float, str]:
    rnd = random.Random(seed)
    ctx = multiprocessing.get_context("forkserver")
    pool = pebble.ProcessPool(max_workers=2, context=ctx)
    data = os.urandom(PAYLOAD)
    t0 = time.monotonic()
    futures = [pool.schedule(work, args=(data,)) for _ in range(40)]
    time.sleep(rnd.uniform(0.05, 0.6))
    pids = list(pool._pool_manager.worker_manager.workers)
    victim = rnd.choice(pids)
    os.kill(victim, signal.SIGKILL)
    outcome = "ok"
    for f in futures:
        try:
            f.result(timeout=150)
        except pebble.ProcessExpired:
            pass
        except cf.TimeoutError:
            outcome = "HANG"
            break
        except Exception as e:
            outcome = f"{type(e).__name__}: {e}"
            break
    took = time.monotonic() - t0
    pool.stop()
    pool.join(5)
    return took, outcome


if __name__ == "__main__":
    n = int(sys.argv[1])
    for i in range(n):
        took, outcome = one_run(i)
        print(f"run {i}: {took:.1f}s {outcome}", flush=True)
