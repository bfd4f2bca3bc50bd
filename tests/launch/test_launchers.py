"""The launchers in launch/: dry runs print what they would start; the Slurm script, run
with stand-in `scontrol` and `srun`, gives every node the coordinator of the first node,
the process count and its own process id."""

import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--", "--stage=sft", "--config=configs/qwen3_32b.py", "--workdir=/shared/run1"]
LAUNCH = "-m katjax.launch --stage=sft --config=configs/qwen3_32b.py --workdir=/shared/run1"


def _run(script, *argv, env=None, check=True):
  p = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *argv],
                     capture_output=True, text=True, timeout=60, env=env)
  if check:
    assert p.returncode == 0, p.stderr
  return p


def test_tpu_pod_dry_run_runs_the_same_command_on_every_worker():
  out = _run("tpu_pod.py", "--tpu=pod1", "--zone=us-east5-a", "--project=p", "--dry-run",
             *ARGS).stdout
  assert out.startswith("gcloud compute tpus tpu-vm ssh pod1 --zone=us-east5-a "
                        "--project=p --worker=all ")
  assert f"cd katjax && python3 {LAUNCH}" in out


def test_ray_dry_run_plans_one_process_per_host():
  out = _run("ray_trainer.py", "--hosts=3", "--python=python3", "--dry-run", *ARGS).stdout
  assert "3 bundles {'GPU': 8, 'CPU': 8}, strategy STRICT_SPREAD" in out
  for i in range(3):
    assert (f"actor {i}: JAX_COORDINATOR_ADDRESS=<actor 0 ip:port> JAX_NUM_PROCESSES=3 "
            f"JAX_PROCESS_ID={i} python3 {LAUNCH}") in out


def _stub(path, body):
  path.write_text("#!/bin/bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_gives_each_node_its_process_id(tmp_path):
  dry = _run("slurm.py", "--nodes=2", "--gpus-per-node=4", "--partition=gpu", "--dry-run",
             f"--repo={tmp_path}", f"--python={tmp_path}/python", *ARGS).stdout
  assert "#SBATCH --nodes=2\n" in dry and "#SBATCH --gpus-per-node=4\n" in dry
  assert "#SBATCH --partition=gpu\n" in dry and "# would run: sbatch katjax_sft.sbatch" in dry
  script = tmp_path / "job.sbatch"
  script.write_text(dry.rsplit("# would run", 1)[0])
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _stub(bin_dir / "scontrol", 'echo gpu-node-7; echo gpu-node-8\n')
  # srun: run the command of every task, as Slurm would on each node
  _stub(bin_dir / "srun", 'cmd="${@: -1}"; for i in 0 1; do SLURM_PROCID=$i bash -c "$cmd"; '
                          'done\n')
  _stub(tmp_path / "python", 'echo "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES '
                             '$JAX_PROCESS_ID $*"\n')
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
             SLURM_JOB_NODELIST="gpu-node-[7-8]", SLURM_NNODES="2")
  out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  rest = LAUNCH
  assert out.stdout.splitlines() == [f"gpu-node-7:8476 2 0 {rest}", f"gpu-node-7:8476 2 1 {rest}"]


@pytest.mark.parametrize("script,flags", [("slurm.py", ["--nodes=2"]),
                                          ("tpu_pod.py", ["--tpu=x", "--zone=z"]),
                                          ("ray_trainer.py", ["--hosts=2"])])
def test_launchers_refuse_a_run_without_shared_workdir(script, flags):
  p = _run(script, *flags, "--dry-run", "--", "--stage=sft", check=False)
  assert p.returncode != 0 and "--workdir" in p.stderr
