"""A disk that fills up while the precompute writes latents (another job filling it after the free-space check
passed): the run stops with one line, not a SIGBUS, and the same command continues once there is room. The disk is
a small tmpfs mounted in a private mount namespace (`unshare -rm`), skipped where none can be made."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import tiny_assets
from testing_utils import ROOT, cache_folders, command_line, run_trainer

import train_diffusion_dpo


def can_mount_a_tmpfs(tmp_path):
    if shutil.which("unshare") is None:
        return False
    folder = tmp_path / "probe"
    folder.mkdir()
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)])
    return probe.returncode == 0


def disk_usage(path):
    """Bytes the files under `path` take on disk (sparse files count only what was written)."""
    return sum(file.stat().st_blocks * 512 for file in path.rglob("*") if file.is_file())


def test_a_disk_full_while_encoding_latents_stops_in_one_line_and_the_run_continues_later(tiny_model, tmp_path):
    if not can_mount_a_tmpfs(tmp_path):
        pytest.skip("no private tmpfs can be mounted here (unshare -rm and mount are needed)")
    data = tiny_assets.build_pickapic_dataset(str(tmp_path / "data"), n_pairs=16, n_ties=0)
    flags = {
        "pretrained_model_name_or_path": tiny_model,
        "dataset_name": data,
        "resolution": 64,  # latents large enough to dominate the cache
        "train_batch_size": 2,
        "max_train_steps": 1,
        "no_hflip": True,
        "report_to": "none",
    }
    # What the cache takes on a roomy disk: the small disk holds its text part and half its latents.
    measured = tmp_path / "measured"
    run_trainer(
        train_diffusion_dpo, command_line({**flags, "output_dir": tmp_path / "out", "precompute_cache_dir": measured})
    )
    (cache,) = cache_folders(measured)
    latents = sum(disk_usage(cache / name) for name in ("pair_latents.npy", "crops.npy", "checksums.npy"))
    disk = (disk_usage(measured) - latents // 2) // 4096 * 4096

    small = tmp_path / "small"
    small.mkdir()
    argv = command_line({**flags, "precompute_cache_dir": small})
    # The free-space check is what another job defeats by filling the disk after it: here it is skipped.
    skip_the_check = (
        "import runpy, sys; import diffusion_dpo.cache as cache; cache.check_free_space = lambda *args: None; "
        "sys.argv[0] = 'train_diffusion_dpo.py'; runpy.run_path('train_diffusion_dpo.py', run_name='__main__')"
    )
    first, second = (
        f"{' '.join(argv)} --output_dir {tmp_path / run} > {tmp_path / run}.log 2>&1" for run in ("first", "second")
    )
    script = textwrap.dedent(
        f"""
        mount -t tmpfs -o size={disk} tmpfs {small}
        {sys.executable} -c "{skip_the_check}" {first}
        echo $? > {tmp_path / "first.rc"}
        mount -o remount,size=16m {small}
        {sys.executable} train_diffusion_dpo.py {second}
        echo $? > {tmp_path / "second.rc"}
        """
    )
    env_script = tmp_path / "run.sh"
    env_script.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(["unshare", "-rm", "bash", str(env_script)], cwd=ROOT, timeout=600, env=env, check=True)

    first = (tmp_path / "first.log").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "1", first[-2000:]  # not 135, SIGBUS
    assert "Traceback" not in first
    assert first.strip().splitlines()[-1].startswith(f"error: the disk of {small}")
    assert "is full" in first.strip().splitlines()[-1]
    second = (tmp_path / "second.log").read_text()
    assert (tmp_path / "second.rc").read_text().strip() == "0", second[-2000:]
    assert "Saved the trained LoRA" in second
