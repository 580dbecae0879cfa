"""DDP on CPU (gloo, 2 processes): a step over 2 x b samples equals one process over 2b samples.

What is compared and why it can be exact is explained in engine/distributed.py: sharded global sample
indices, DDP's gradient average, per-rank loss normalisation (equal to the global one when every
rank has the same class-weight sum: class weights 1/1 and no ignored pixels), and BatchNorm over the
global batch with --sync-bn (SyncBatchNormCPU: torch's nn.SyncBatchNorm refuses CPU tensors).
Also: Final.sh's launch lines and signal handling, with stub python/srun/scontrol.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from data.cache import build_cache
from data.config import load_config
from data.layout import discover
from engine.checkpoint import load_checkpoint
from engine.trainer import fit
from engine.validation import validate
from models import build_model
from tests.conftest import REPO, script_env, train_argv, train_options

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
LAST = "resu_last_axial.pth.tar"


# ----------------------------------------------------------------------------------------------
# Gradients of one DDP step (torch.multiprocessing, gloo) against one process


def _batch(n: int = 4, size: int = 32):
    """Input, labels (one class per sample: the ranks' class mixes differ) and labeled masks."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand((n, 3, size, size), generator=g) * 2 - 1
    y = torch.zeros((n, size, size), dtype=torch.long)
    y[0, 8:20, 8:20] = 1
    y[1, 4:30, 2:30] = 2
    y[3, :, 16:] = 3
    mask = torch.ones((n, 4), dtype=torch.bool)
    return x, y, mask


def _step(model, x, y, mask, class_weights) -> dict[str, torch.Tensor]:
    """Forward + backward of the supervised loss; returns parameter gradients and buffers."""
    from engine.runtime import unwrap
    from losses.partial import DeepSupervisedLoss

    loss = DeepSupervisedLoss(class_weights=class_weights)(model(x), y, mask)["loss"]
    loss.backward()
    net = unwrap(model)
    out = {f"grad/{n}": p.grad.detach().clone() for n, p in net.named_parameters()}
    out.update({f"buf/{n}": b.detach().clone() for n, b in net.named_buffers()
                if b.is_floating_point()})
    return out


CASES = {"sync_bn": (True, (1.0, 1.0)), "plain_bn": (False, (1.0, 1.0)), "sync_bn_cw": (True, (0.2, 1.2))}


def _worker(rank: int, init_file: str, out_file: str) -> None:
    import torch.distributed as tdist

    from engine.distributed import wrap_ddp
    from engine.runtime import DistInfo

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    x, y, mask = _batch()
    shard = slice(rank, None, WORLD)  # StepBatchSampler: rank r takes global samples r, r + W, ...
    results = {}
    for name, (sync, cw) in CASES.items():
        torch.manual_seed(0)
        model = wrap_ddp(build_model({"in_channels": 3, "num_classes": 4, "width": 4}),
                         torch.device("cpu"), DistInfo(rank=rank, world=WORLD), sync_bn=sync)
        results[name] = _step(model, x[shard], y[shard], mask[shard], cw)
    if rank == 0:
        torch.save(results, out_file)
    tdist.destroy_process_group()


def _rel_diff(a: dict, b: dict, prefix: str) -> float:
    """Largest ``max|a - b| / max|b|`` over the tensors whose name starts with ``prefix``.

    Tensors whose reference is numerically zero (below 1e-6 of the largest) are skipped: the fusion
    scorer's biases shift every scale's score equally, the softmax over scales ignores that, and their
    exact gradient is 0 (what is computed is rounding noise of ~1e-10).
    """
    keys = [k for k in b if k.startswith(prefix)]
    scale = max(float(b[k].abs().max()) for k in keys)
    worst = 0.0
    for k in keys:
        ref = float(b[k].abs().max())
        if ref > 1e-6 * scale:
            worst = max(worst, float((a[k] - b[k]).abs().max()) / ref)
    return worst


def test_ddp_gradients_equal_the_global_batch_with_sync_bn(tmp_path):
    import torch.multiprocessing as mp

    out_file = tmp_path / "ddp.pt"
    mp.start_processes(_worker, args=(str(tmp_path / "pg_init"), str(out_file)), nprocs=WORLD,
                       join=True, start_method="spawn")
    ddp = torch.load(out_file, weights_only=True)
    x, y, mask = _batch()
    ref = {}
    for cw in ((1.0, 1.0), (0.2, 1.2)):
        torch.manual_seed(0)
        ref[cw] = _step(build_model({"in_channels": 3, "num_classes": 4, "width": 4}), x, y, mask, cw)

    sync = ddp["sync_bn"]
    grad_diff = _rel_diff(sync, ref[(1.0, 1.0)], "grad/")
    buf_diff = _rel_diff(sync, ref[(1.0, 1.0)], "buf/")
    plain = _rel_diff(ddp["plain_bn"], ref[(1.0, 1.0)], "grad/")
    weighted = _rel_diff(ddp["sync_bn_cw"], ref[(0.2, 1.2)], "grad/")
    print(f"\nDDP vs one process, max relative difference: gradients {grad_diff:.2e}, BN running "
          f"statistics {buf_diff:.2e} (--sync-bn, class weights 1/1); without --sync-bn {plain:.2e}; "
          f"--sync-bn with class weights 0.2/1.2 {weighted:.2e}")
    # Equal up to float32 summation order (measured ~1e-5 for gradients, ~1e-7 for statistics).
    assert grad_diff < 1e-3 and buf_diff < 1e-5
    # Per-rank BatchNorm statistics change the gradient at the percent level ...
    assert plain > 1e-2
    # ... and so do unequal class-weight sums per rank (per-rank loss normalisation, documented).
    assert weighted > 1e-3


# ----------------------------------------------------------------------------------------------
# Final.py under torchrun against Final.py in one process


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b if b[k].is_floating_point())


def test_torchrun_final_py_equals_single_process(tiny_data, tmp_path):
    """One step: 2 ranks x batch 2 with --sync-bn == 1 process x batch 4; validation gathered right.

    One step, because RMSprop divides each gradient by its own running RMS: a first update is about
    ``10 * lr * sign(g)``, so weights compare the gradients' signs (and the exact gradients are compared
    above). Over more steps the float32-rounding differences of DDP's summation order get amplified
    wherever a gradient is near 0 (measured: 5e-5, 9e-5, then 9e-3 after steps 1, 2, 3 at 32x32, where
    the deepest BatchNorm sees 2x2 maps): chaotic, not wrong.
    """
    config = tmp_path / "weights_1_1.yaml"
    text = (REPO / "configs" / "default.yaml").read_text()
    config.write_text("\n".join("class_weights: [1.0, 1.0]" if ln.startswith("class_weights:") else ln
                                for ln in text.splitlines()) + "\n")
    # batch norm: what --sync-bn is about
    common = ["--no-semi", "--norm", "batch", "--config", str(config), "--epochs", "1",
              "--steps-per-epoch", "1"]
    ddp_out, one_out = tmp_path / "ddp", tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "Final.py", *train_argv(tiny_data, ddp_out, *common, "-b", "2", "--sync-bn")]
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("final validation") == 1  # only rank 0 logs
    one = fit(train_options(tiny_data, one_out, semi=False, norm="batch", config=str(config), epochs=1,
                            steps_per_epoch=1, batchsize=4))

    a, b = load_checkpoint(ddp_out / LAST), load_checkpoint(one_out / LAST)
    params = {k: v for k, v in b["model"].items() if "running" not in k}
    weight_diff = _max_diff(a["model"], params)
    stats_diff = _max_diff(a["model"], {k: v for k, v in b["model"].items() if "running" in k})
    print(f"\nweights after one RMSprop step (lr 5e-4, updates ~5e-3): max abs difference "
          f"{weight_diff:.2e}; BN running statistics {stats_diff:.2e}")
    assert weight_diff < 1e-3  # measured 5e-5; a wrong sample, BN statistic or sign: ~1e-2
    assert stats_diff < 1e-4
    assert a["step"] == b["step"] == 1 and a["args"]["world"] == WORLD

    # The validation split over the ranks and gathered equals validating the same network alone.
    net = build_model(a["model_args"])
    net.load_state_dict(a["model"])
    cfg = replace(load_config(config), inplane_size=(32, 32))
    cases = [c for c in discover(cfg, tiny_data) if c.split == "validation"]
    vols = build_cache(cases, cfg, tiny_data / ".unimos_cache", views=("axial",), workers=0, progress=False)
    alone = validate(net, vols, cfg, "axial", 3, torch.device("cpu"))
    summary = json.loads((ddp_out / "train_summary_axial.json").read_text())
    assert summary["world"] == WORLD and set(summary["validation"]) == set(alone)
    for k, v in alone.items():
        assert summary["validation"][k] == pytest.approx(v, abs=1e-9)
    assert one["validation"].keys() == alone.keys()


def _validation_worker(rank: int, port: int, data: str, out: str, record: str) -> None:
    """One rank of an in-process semi-supervised DDP run (batch norm, no --sync-bn) that records a
    checksum of the BatchNorm statistics of every network it validates."""
    import engine.validation

    os.environ.update({"WORLD_SIZE": str(WORLD), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    real, seen = engine.validation.validate, []

    def recording(net, *args, **kwargs):
        seen.append(sum(float(b.double().sum()) for n, b in net.named_buffers() if "running" in n))
        return real(net, *args, **kwargs)

    engine.validation.validate = recording
    fit(train_options(Path(data), Path(out), semi=True, teacher="ema", norm="batch", semi_warmup=0.9,
                      epochs=1, steps_per_epoch=3))
    Path(record).with_suffix(f".rank{rank}.json").write_text(json.dumps(seen))


def test_ddp_ranks_validate_the_ema_teacher_rank_0_saves(tiny_data, tmp_path):
    """Without --sync-bn each rank's EMA teacher copies its BatchNorm statistics from that rank's own
    student after every step, and in a supervised (warm-up) step those were just updated from the
    rank's own batch. The validation is split over the ranks, so each must first take rank 0's
    statistics (which rank 0 saves), for the student as for the teacher. All three steps here are
    warm-up steps; without the teacher's broadcast the ranks validated different teachers."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, record = tmp_path / "run", tmp_path / "seen"
    mp.start_processes(_validation_worker, args=(port, str(tiny_data), str(out), str(record)), nprocs=WORLD,
                       start_method="spawn")
    seen = [json.loads(record.with_suffix(f".rank{r}.json").read_text()) for r in range(WORLD)]
    assert len(seen[0]) == 2  # the student, then the teacher
    assert seen[1] == seen[0]
    ema = load_checkpoint(out / LAST)["ema"]["model"]
    assert seen[0][1] == sum(float(v.double().sum()) for k, v in ema.items() if "running" in k)


# ----------------------------------------------------------------------------------------------
# Final.sh (plain bash, stub python / srun / scontrol)

_STUB = """#!/bin/bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
if [[ "$(basename "$0")" == scontrol && "$1" == show ]]; then printf 'node7\\nnode8\\n'; exit 0; fi
if [[ "$(basename "$0")" == python && "${STUB_MODE:-}" == wait ]]; then
  trap 'echo "got USR1" >> "$STUB_LOG"; exit 3' USR1
  trap 'echo "got TERM" >> "$STUB_LOG"; exit 3' TERM
  echo ready >> "$STUB_LOG"
  for _ in $(seq 1 300); do sleep 0.1; done
  exit 0
fi
exit "${STUB_RC:-0}"
"""


def _stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "srun", "scontrol"):
        p = bin_dir / name
        p.write_text(_STUB)
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _final_sh_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    bin_dir = _stubs(tmp_path)
    env.update({"PATH": f"{bin_dir}:{env['PATH']}", "PYTHON": str(bin_dir / "python"),
                "STUB_LOG": str(tmp_path / "calls.log"), "SLURM_SUBMIT_DIR": str(tmp_path)})
    env.pop("GPUS_PER_NODE", None)
    env.update(extra)
    return env


def _calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_final_sh_single_process_passes_arguments_and_exit_code(tmp_path):
    env = _final_sh_env(tmp_path, STUB_RC="2", VIEW="coronal")
    proc = subprocess.run(["bash", str(REPO / "Final.sh"), "--epochs", "7"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2  # bad input stays bad input: no requeue
    (call,) = _calls(tmp_path)
    assert call.startswith("python Final.py --data ./data --out ./runs/unimos --view coronal")
    assert call.endswith("--resume auto --epochs 7")
    assert not (tmp_path / "logs").exists()  # only created under Slurm


@pytest.mark.parametrize(("name", "value"), [("SLURM_ARRAY_TASK_ID", "5"), ("GPUS_PER_NODE", "2x"),
                                           ("NNODES", "0"), ("GRACE", "-1"), ("MASTER_PORT", "x"),
                                           ("GPUS_PER_NODE", "08")])
def test_final_sh_bad_environment_is_one_line_exit_2(tmp_path, name, value):
    """An array index past the three views was bash's "unbound variable"; "2x" GPUs per node an
    arithmetic error, after which one process ran anyway."""
    env = _final_sh_env(tmp_path, **{name: value})
    proc = subprocess.run(["bash", str(REPO / "Final.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and \
        proc.stderr.startswith(f"error: {name}: ") and f"'{value}'" in proc.stderr, proc.stderr
    assert not _calls(tmp_path)  # nothing started


@pytest.mark.parametrize("slurm", [False, True])
def test_final_sh_forwards_usr1_and_requeues(tmp_path, slurm):
    extra = {"SLURM_JOB_ID": "4242"} if slurm else {}
    env = _final_sh_env(tmp_path, STUB_MODE="wait", **extra)
    proc = subprocess.Popen(["bash", str(REPO / "Final.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if "ready" in _calls(tmp_path):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    calls = _calls(tmp_path)
    assert "got USR1" in calls
    if slurm:
        assert proc.returncode == 0 and calls[-1] == "scontrol requeue 4242", (out, calls)
    else:
        assert proc.returncode == 3 and not any(c.startswith("scontrol") for c in calls), (out, calls)


def test_final_sh_multi_node_launch_line(tmp_path):
    env = _final_sh_env(tmp_path, SLURM_JOB_ID="1234", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4",
                        SLURM_JOB_NODELIST="node[7-8]", SLURM_CPUS_PER_TASK="16")
    proc = subprocess.run(["bash", str(REPO / "Final.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = _calls(tmp_path)
    assert calls[0] == "scontrol show hostnames node[7-8]"
    srun = calls[1].split()
    assert srun[:12] == ["srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1",
                         "--cpus-per-task", "16", "--kill-on-bad-exit=1", env["PYTHON"], "-m"]
    line = calls[1]
    for part in ("torch.distributed.run --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d",
                 "--rdzv_endpoint node7:29734 --rdzv_id 1234",
                 "--signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown_timeout 170",
                 "Final.py --data", "--workers 16 --resume auto"):
        assert part in line, line
    # torchrun of this torch accepts the launch line as it is.
    from torch.distributed.run import get_args_parser

    launch = line.split(" -m torch.distributed.run ", 1)[1].split()
    parsed = get_args_parser().parse_args(launch)
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.rdzv_endpoint) == ("2", "4", "node7:29734")
    assert "SIGUSR1" in parsed.signals_to_handle and int(parsed.shutdown_timeout) == 170
    assert parsed.training_script == "Final.py"


@pytest.mark.slow
def test_final_sh_torchrun_preemption_resumes_exactly(tiny_data, tmp_path):
    """bash Final.sh with 2 CPU ranks: SIGUSR1 -> torchrun -> workers save -> exit 3; rerun finishes the
    run with the same weights as an uninterrupted 2-rank run."""
    tiny = [*train_argv(tiny_data, tmp_path / "unused")[4:], "--epochs", "3", "--amp", "none", "--no-semi"]
    env_common = script_env(GPUS_PER_NODE="2", DATA=str(tiny_data), PYTHON=sys.executable)
    env_common = {k: v for k, v in env_common.items() if not k.startswith("SLURM_")}
    ref_env = {**env_common, "OUT": str(tmp_path / "ref"), "MASTER_PORT": str(_free_port())}
    ref = subprocess.run(["bash", str(REPO / "Final.sh"), *tiny], env=ref_env, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    env = {**env_common, "OUT": str(tmp_path / "run"), "MASTER_PORT": str(_free_port())}
    proc = subprocess.Popen(["bash", str(REPO / "Final.sh"), *tiny], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch 1/3"):
                proc.send_signal(signal.SIGUSR1)
                break
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err[-3000:]
    stopped = load_checkpoint(tmp_path / "run" / LAST)["step"]
    assert 2 < stopped <= 6
    env["MASTER_PORT"] = str(_free_port())
    done = subprocess.run(["bash", str(REPO / "Final.sh"), *tiny], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = load_checkpoint(tmp_path / "run" / LAST), load_checkpoint(tmp_path / "ref" / LAST)
    assert got["step"] == want["step"] == 6
    assert _max_diff(got["model"], want["model"]) == 0.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
