"""engine.runtime.retain_freed_memory: freed tensor memory is reused instead of faulted in again."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Forward passes of a width-8 MOSNet over a 256 x 256 slice, as segment.py runs them on the CPU (one
# thread, channels_last, inference mode); prints the minor page faults of 10 passes after 3 warm-ups
_FAULTS = textwrap.dedent("""
    import resource, sys
    import torch
    sys.path.insert(0, {root!r})
    from engine.runtime import retain_freed_memory
    tuned = retain_freed_memory() if {retain} else False
    from models import DEFAULT_NORM, build_model
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model({{"in_channels": 3, "num_classes": 4, "width": 8, "norm": DEFAULT_NORM}}).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 256, 256).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            model(x)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    from engine.runtime import release_freed_memory

    def rss_mb():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() / 2**20

    kept = rss_mb()
    release_freed_memory()
    print(tuned, faults, round(kept - rss_mb(), 1))
""")


def _faults(retain: bool) -> tuple[str, int, float]:
    """(whether the allocator was tuned, page faults of 10 passes, MB given back by
    release_freed_memory afterwards), from a fresh process."""
    code = _FAULTS.format(root=str(ROOT), retain=retain)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True)
    tuned, faults, released = out.stdout.split()
    return tuned, int(faults), float(released)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults_and_can_be_released():
    tuned, with_retain, released = _faults(True)
    if tuned != "True":
        pytest.skip("no glibc here (or another allocator is preloaded)")
    _, without, _ = _faults(False)
    if without < 5_000:
        pytest.skip(f"the default allocator faulted only {without} pages here: nothing to show")
    # glibc's default gives most freed activations back and faults them in again: ~6,000-7,000 page
    # faults per pass here (62,017-72,525 for 10 passes in three runs); retained, 513-1,984
    assert with_retain < without / 10, (with_retain, without)
    # the kept activations (several MB of a width-8 network's 256 x 256 pass) can be given back
    assert released > 1.0, released
