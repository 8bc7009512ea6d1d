"""One-off trial: why does the body server's compiled step take longer in the split than in one process? Not a
lambdasplit command.

1. In one process, arranged as the server is (main thread handed over, body compiled and run on threads of their
   own): body steps back to back, then with the device's share of a token (head layer, tail layer, norm, LM head)
   between them, at the same positions.
2. Split: a real body server (`serve --weights int4 --compile`) and a compiled int4 client on this machine; per
   decode step, the server's compute (its `cloud_us`) and the client's round trip.

    .venv/bin/python scripts/trials/server_step_gap.py

Measured 2026-12-07 on this 2-core machine, see the end of this file. Each part runs in a process of its own.
"""
import statistics, threading, time

import torch

from lambdasplit.client import body as remote
from lambdasplit.client.generate import SplitClient
from lambdasplit.server.body import BodyRuntime
from lambdasplit.server.process import ServerProcess
from lambdasplit.util.threads import hand_over, on_compute_thread, take_over
from lambdasplit.models.source import resolve_model

PROMPT = "Tell me about the history of the city of Paris in a few sentences."


def in_process():
    hand_over()
    runtime = BodyRuntime(resolve_model(None), 1, 29, "int4", device="cpu")
    runtime.compile()
    stack = runtime.model.body.layers
    device = on_compute_thread(lambda: SplitClient(None, server=None, split=(1, 29), speculate="off",
                                                   weights="int4", compile=True)).model

    def work():
        take_over()
        with torch.inference_mode():
            for between in (False, True):
                cache, dcache = stack.new_cache(), device.head.layers.new_cache()
                stack(torch.randn(1, 45, 576), cache, 0, compiled=False)
                device.tail(device.body(device.head(torch.zeros(1, 45, dtype=torch.long), dcache, 0), dcache, 0),
                            dcache, 0)
                times = []
                for pos in range(45, 125):
                    if between:
                        h = device.head(torch.zeros(1, 1, dtype=torch.long), dcache, pos)
                    t = time.perf_counter()
                    stack(torch.randn(1, 1, 576), cache, pos)
                    times.append(time.perf_counter() - t)
                    if between:
                        device.tail(h, dcache, pos)
                print(f"in one process, {'device work between body steps' if between else 'body steps back to back'}"
                      f": median {statistics.median(times[10:]) * 1e3:.2f} ms (positions 55..125)", flush=True)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()


def split():
    log = []
    send = remote.RemoteBody._send

    def timed(self, hidden, pos, rollback=False):
        t, before = time.perf_counter(), self.cloud_s
        out = send(self, hidden, pos, rollback)
        log.append((hidden.shape[0], time.perf_counter() - t, self.cloud_s - before))
        return out

    remote.RemoteBody._send = timed
    with ServerProcess(None, "1:29", "--weights", "int4", "--compile") as server:
        client = SplitClient(None, server=server.url, split=(1, 29), speculate="off", weights="int4", compile=True,
                             wire="fp32")
        ids = client.encode_prompt(PROMPT)
        for _ in range(2):
            log.clear()
            list(client.generate_ids(ids, max_new_tokens=128, stop_at_eos=False))
            steps = [(rt, cloud) for rows, rt, cloud in log if rows == 1]
            print(f"split: server compute median {statistics.median(c for _, c in steps) * 1e3:.2f} ms, round trip "
                  f"median {statistics.median(r for r, _ in steps) * 1e3:.2f} ms ({len(steps)} decode steps)",
                  flush=True)


if __name__ == "__main__":
    import subprocess, sys

    if len(sys.argv) > 1:  # each part in a process of its own: OpenMP teams of one would slow the other
        torch.set_num_threads(2)
        {"split": split, "in-process": in_process}[sys.argv[1]]()
    else:
        for part in ("split", "in-process"):
            subprocess.run([sys.executable, __file__, part], check=True)

# 2026-12-07, at 3138b35:
#   .venv/bin/python scripts/trials/server_step_gap.py      (this script's own processes at GNU OpenMP's default spin)
#     split: server compute median 11.57 ms, round trip median 13.63 ms (127 decode steps)
#     split: server compute median 12.10 ms, round trip median 15.42 ms (127 decode steps)
#     in one process, body steps back to back: median 7.04 ms (positions 55..125)
#     in one process, device work between body steps: median 8.20 ms (positions 55..125)
#   GOMP_SPINCOUNT=20000 .venv/bin/python scripts/trials/server_step_gap.py    (as the lambdasplit command sets it)
#     split: server compute median 9.67 ms, round trip median 11.56 ms (127 decode steps)
#     split: server compute median 9.63 ms, round trip median 11.95 ms (127 decode steps)
#     in one process, body steps back to back: median 7.57 ms (positions 55..125)
#     in one process, device work between body steps: median 8.77 ms (positions 55..125)
# So of the server's extra time: about 1.2 ms is the device's own work between steps (its LM head and layers push
# the body's weights out of the caches the two share on one machine), about 2 ms was the client's OpenMP workers
# spinning (gone at the spin count the command sets), and under 1 ms is left.
