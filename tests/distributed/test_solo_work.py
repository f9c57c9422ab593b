"""Work rank 0 does alone (distributed.on_main: data preparation, the run directory's claim) may take
longer than --dist_timeout_s without the other ranks timing out, and they still stop at once when rank 0 dies.
Two small processes (no training), a few seconds each."""
import subprocess
import sys
import time

from cotmi_ds.distributed import free_port
from tests.conftest import REPO, child_env


SCRIPT = """
import os, sys, time
from cotmi_ds.distributed import init_distributed, on_main, shutdown
env = init_distributed(timeout_s=2)
def work():
    if sys.argv[1] == "die":
        os._exit(9)
    time.sleep(6)  # three times the collective timeout
    return "done"
t = time.monotonic()
on_main(work, env)
print(f"waited {time.monotonic() - t:.1f} s", flush=True)
shutdown()
"""


def _two_ranks(mode):
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, mode], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env=child_env(RANK=str(r), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    try:
        return [p.communicate(timeout=300)[0] for p in procs], [p.returncode for p in procs]
    finally:
        for p in procs:
            p.kill()


def test_the_others_wait_past_the_collective_timeout_for_rank_0_alone():
    outs, codes = _two_ranks("slow")
    assert codes == [0, 0], outs
    assert float(outs[1].split("waited ")[1].split()[0]) >= 5.5, outs


def test_the_others_stop_at_once_when_rank_0_dies_during_its_solo_work():
    t = time.monotonic()
    outs, codes = _two_ranks("die")
    assert codes[0] == 9 and codes[1] != 0, outs
    assert "waited" not in outs[1]
    assert time.monotonic() - t < 120, outs
