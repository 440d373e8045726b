"""Data and cache faults a user can cause: odd labels and captions, data files changed in place, damaged caches, a
full or unwritable disk, an interrupted precompute, a model the trainer cannot condition. Each ends in a counted
skip, a one-line message, or a refusal, never a silent wrong result. The data and cache machinery is shared
(diffusion_dpo.data, diffusion_dpo.cache): tested once, on the SD 1.5 script; refusing a model of another family is
each script's own, tested on every script."""

import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile

import diffusers
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny_assets
import transformers
from PIL import Image
from testing_utils import cache_folders, run_trainer

import diffusion_dpo.cache
from diffusion_dpo import InputError
from diffusion_dpo.cache import LATENT_ARRAYS, MASK_ARRAYS
from diffusion_dpo.data import load_preference_pairs, stream_split


def jpeg_pair(rng):
    """A (winner, loser) pair of JPEG bytes: a warm and a cool image."""
    return tuple(tiny_assets._jpeg_bytes(tiny_assets.make_shape_image(warm, rng, 32)) for warm in (True, False))


def write_split(folder, labels, captions, label_type=pa.string(), caption_type=pa.string(), **options):
    """One parquet file of Pick-a-Pic columns with the given labels and captions (images: warm first)."""
    rng = random.Random(0)
    images = [jpeg_pair(rng) for _ in labels]
    folder.mkdir(exist_ok=True)
    path = folder / "train-00000-of-00001.parquet"
    table = pa.table(
        {
            "caption": pa.array(captions, caption_type),
            "jpg_0": pa.array([pair[0] for pair in images], pa.binary()),
            "jpg_1": pa.array([pair[1] for pair in images], pa.binary()),
            "label_0": pa.array(labels, label_type),
        }
    )
    pq.write_table(table, path, **options)
    return path


# ---- labels and captions -------------------------------------------------------------------------------------------


def test_an_unparsable_label_drops_its_pair_not_its_file(dpo, cli_args, tmp_path, caplog):
    labels = ["1", "0", "left", "0.5", "1.0", "0", None]
    write_split(tmp_path / "data", labels, [f"caption {i}" for i in range(len(labels))])
    caplog.set_level(logging.INFO)
    pairs = load_preference_pairs(dpo.parse_args(cli_args(dataset_name=str(tmp_path / "data"))), "train")
    assert pairs.rows.tolist() == [0, 1, 4, 5]
    assert pairs.second_is_winner.tolist() == [False, True, False, True]
    assert "dropped 1 tied pairs and 2 pairs with labels outside {0, 0.5, 1}" in caplog.text
    assert "Skipping" not in caplog.text


def test_a_nan_caption_is_the_empty_caption(dpo, cli_args, tmp_path):
    rng = random.Random(0)
    images = [jpeg_pair(rng) for _ in range(3)]
    # pandas stores a column of missing captions as float NaN
    frame = pd.DataFrame(
        {
            "caption": [np.nan] * 3,
            "jpg_0": [pair[0] for pair in images],
            "jpg_1": [pair[1] for pair in images],
            "label_0": [1.0, 0.0, 1.0],
        }
    )
    (tmp_path / "data").mkdir()
    frame.to_parquet(tmp_path / "data" / "train-00000-of-00001.parquet")
    assert pq.read_schema(tmp_path / "data" / "train-00000-of-00001.parquet").field("caption").type == pa.float64()
    pairs = load_preference_pairs(dpo.parse_args(cli_args(dataset_name=str(tmp_path / "data"))), "train")
    assert pairs.captions == ["", "", ""]


# ---- a data file changed in place ----------------------------------------------------------------------------------


def keep_times(path, stat):
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_other_rows_of_the_same_size_and_mtime_change_the_identity(dpo, cli_args, tmp_path):
    options = dict(compression="none")  # same-length captions: the same file size
    path = write_split(tmp_path / "data", [1.0, 0.0], ["a red cat", "a big dog"], pa.float64(), **options)
    args = dpo.parse_args(cli_args(dataset_name=str(tmp_path / "data")))
    before, stat = stream_split(args, "train")[1], path.stat()
    write_split(tmp_path / "data", [1.0, 0.0], ["a tan cow", "a big dog"], pa.float64(), **options)
    keep_times(path, stat)
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert stream_split(args, "train")[1] != before


def test_a_data_file_rewritten_with_its_old_mtime_is_not_read_from_the_old_cache(dpo, cli_args, tmp_path):
    data = tiny_assets.build_pickapic_dataset(str(tmp_path / "data"), n_pairs=6, n_ties=0, seed=0)
    path = tmp_path / "data" / "train-00000-of-00001.parquet"
    stat = path.stat()
    run_trainer(dpo, cli_args(dataset_name=data, output_dir=tmp_path / "a", max_train_steps=1))
    tiny_assets.build_pickapic_dataset(data, n_pairs=6, n_ties=0, seed=1)
    keep_times(path, stat)
    run_trainer(dpo, cli_args(dataset_name=data, output_dir=tmp_path / "b", max_train_steps=1))
    assert len(cache_folders(tmp_path / "cache")) == 2
    assert len(list((tmp_path / "cache").glob("pairs-*.parquet"))) == 2
    args = dpo.parse_args(cli_args(dataset_name=data, output_dir=tmp_path / "c"))
    captions = pq.read_table(path).column("caption").to_pylist()
    assert load_preference_pairs(args, "train").captions == captions


# ---- a damaged cache -----------------------------------------------------------------------------------------------


def test_a_damaged_cache_file_is_named_in_one_line_before_anything_is_encoded(dpo, cli_args, tmp_path, monkeypatch):
    run_trainer(dpo, cli_args(output_dir=tmp_path / "a", max_train_steps=1))
    (cache,) = cache_folders(tmp_path / "cache")
    np.save(cache / "encoded.part-1.npy", np.load(cache / "encoded.npy"))  # a part file left by a killed process
    pristine = tmp_path / "pristine"
    shutil.copytree(cache, pristine)
    no_encoder_loads(monkeypatch)
    caption_arrays = json.loads((cache / "cache_info.json").read_text())["caption_arrays"]
    files = ["cache_info.json"] + [f"{name}.npy" for name in ("caption_index", *caption_arrays, *LATENT_ARRAYS)]
    files += [f"{name}.npy" for name in (*MASK_ARRAYS, "encoded.part-1")]
    damages = {"truncated": lambda data: data[: len(data) // 2], "overwritten": lambda data: b"\0" * len(data)}
    for name in files:
        for damage, damaged in damages.items():
            file = cache / name
            file.write_bytes(damaged(file.read_bytes()))
            with pytest.raises(InputError) as error:
                run_trainer(dpo, cli_args(output_dir=tmp_path / f"{name}-{damage}", max_train_steps=1))
            message = str(error.value)
            assert f"the cache file {file} is damaged" in message, (name, damage)
            assert f"delete the folder {cache} and run again" in message and "\n" not in message
            shutil.copyfile(pristine / file.name, file)


def test_garbage_under_an_intact_npy_header_is_named_by_the_checksums(dpo, cli_args, tmp_path):
    """The arrays load and have their shapes; only the checksums see the bytes are wrong (else NaN latents would end
    the run as non-finite steps, blamed on the learning rate)."""
    run_trainer(dpo, cli_args(output_dir=tmp_path / "a", max_train_steps=1))
    (cache,) = cache_folders(tmp_path / "cache")
    caption_arrays = json.loads((cache / "cache_info.json").read_text())["caption_arrays"]
    for name in ("pair_latents", *caption_arrays):
        file = cache / f"{name}.npy"
        intact, header_bytes = file.read_bytes(), np.load(file, mmap_mode="r").offset
        file.write_bytes(intact[:header_bytes] + b"\xff" * (len(intact) - header_bytes))  # NaN in every float
        with pytest.raises(InputError) as error:
            run_trainer(dpo, cli_args(output_dir=tmp_path / f"{name}-garbage", max_train_steps=1))
        assert re.fullmatch(
            f"the cache file {re.escape(str(file))} is damaged \\((row|pair) \\d+ differs from its checksum\\).*",
            str(error.value),
        ), str(error.value)
        file.write_bytes(intact)


def test_arrays_that_disagree_in_shape_are_named(dpo, cli_args, tmp_path):
    run_trainer(dpo, cli_args(output_dir=tmp_path / "a", max_train_steps=1))
    (cache,) = cache_folders(tmp_path / "cache")
    np.save(cache / "undecodable.npy", np.zeros(3, dtype=bool))  # another cache's mask, copied in by hand
    with pytest.raises(InputError, match=f"the cache file {cache / 'undecodable.npy'} is damaged"):
        run_trainer(dpo, cli_args(output_dir=tmp_path / "b", max_train_steps=1))


def test_a_damaged_labels_and_captions_cache_is_read_again(dpo, cli_args, tmp_path, caplog):
    run_trainer(dpo, cli_args(output_dir=tmp_path / "a", max_train_steps=1))
    (labels_cache,) = (tmp_path / "cache").glob("pairs-*.parquet")
    intact = labels_cache.read_bytes()
    labels_cache.write_bytes(intact[: len(intact) // 2])
    caplog.set_level(logging.WARNING)
    run_trainer(dpo, cli_args(output_dir=tmp_path / "b", max_train_steps=1))
    assert f"The labels and captions cache {labels_cache} is damaged" in caplog.text
    assert pq.read_table(labels_cache).equals(pq.read_table(pa.BufferReader(intact)))


def must_not_load(*args, **kwargs):
    raise AssertionError("a model was loaded although the run should have stopped before")


def no_encoder_loads(monkeypatch):
    """Makes loading the SD 1.5 script's text encoder or VAE fail the test."""
    monkeypatch.setattr(transformers.CLIPTextModel, "from_pretrained", must_not_load)
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", must_not_load)


# ---- the cache lock ------------------------------------------------------------------------------------------------


def test_waiting_for_another_runs_cache_lock_is_said(dpo, cli_args, tmp_path, caplog):
    lock_file = tmp_path / "cache" / ".precompute.lock"
    lock_file.parent.mkdir()
    hold = "import sys, time, filelock; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); print(1, flush=True)"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold + "; time.sleep(2)", str(lock_file)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "1"  # the other run holds the lock
        caplog.set_level(logging.INFO)
        run_trainer(dpo, cli_args(max_train_steps=1))  # waits its turn, then precomputes and trains
    finally:
        holder.kill()
        holder.wait()
    assert f"Waiting for the cache lock {lock_file}" in caplog.text
    assert len(cache_folders(tmp_path / "cache")) == 1


# ---- disk space ----------------------------------------------------------------------------------------------------


def test_a_cache_folder_that_cannot_be_written_is_refused_before_anything_loads(dpo, cli_args, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setattr(dpo.UNet2DConditionModel, "from_pretrained", must_not_load)
    no_encoder_loads(monkeypatch)
    with pytest.raises(InputError, match=f"cannot write to the cache folder {tmp_path / 'a-file' / 'cache'}"):
        run_trainer(dpo, cli_args(precompute_cache_dir=tmp_path / "a-file" / "cache"))


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root), unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def fill(disk, leave_free):
    """Fills `disk` with a dummy file so that `leave_free` bytes stay free."""
    (disk / "dummy").write_bytes(bytes(shutil.disk_usage(disk).free - leave_free))
    assert shutil.disk_usage(disk).free == leave_free


def partials(folder):
    return [path for path in folder.rglob("*") if ".partial-" in path.name]


def test_a_cache_that_does_not_fit_on_the_disk_stops_before_the_encoders_load(
    dpo, cli_args, small_disk, tmp_path, monkeypatch
):
    fill(small_disk, 48 * 1024)  # the labels and captions fit, the text embeddings and latents do not
    no_encoder_loads(monkeypatch)
    with pytest.raises(InputError) as error:
        run_trainer(dpo, cli_args(precompute_cache_dir=small_disk / "cache"))
    needed, free = re.match(
        f"not enough disk space for the precompute cache in {small_disk / 'cache'}: it needs ([0-9.]+) KiB, "
        "([0-9.]+) KiB are free",
        str(error.value),
    ).groups()
    assert float(needed) > 48 >= float(free)  # the labels and captions cache took a little of the 48 KiB
    assert not cache_folders(small_disk / "cache") and not partials(small_disk)


def test_a_disk_that_fills_up_while_the_cache_is_written_leaves_no_partial_files(
    dpo, cli_args, small_disk, monkeypatch
):
    fill(small_disk, 16 * 1024)
    # the free space check passes, as if another program filled the disk after it
    monkeypatch.setattr(diffusion_dpo.cache, "check_free_space", lambda *args: None)
    with pytest.raises(InputError, match=f"the disk of {small_disk / 'cache'} is full"):
        run_trainer(dpo, cli_args(precompute_cache_dir=small_disk / "cache"))
    assert not cache_folders(small_disk / "cache") and not partials(small_disk)


# ---- an interrupted precompute -------------------------------------------------------------------------------------


def test_an_interrupt_while_encoding_keeps_the_latents_encoded_so_far(dpo, cli_args, tmp_path, monkeypatch):
    encode, calls = diffusers.AutoencoderKL.encode, []

    def encode_or_interrupt(vae, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C (SIGTERM arrives as one too)
        return encode(vae, *args, **kwargs)

    monkeypatch.setattr(diffusers.AutoencoderKL, "encode", encode_or_interrupt)
    flags = dict(vae_encode_batch_size=2, precompute_commit_seconds=3600)  # a pair per batch; no periodic commit
    with pytest.raises(KeyboardInterrupt):
        run_trainer(dpo, cli_args(output_dir=tmp_path / "a", **flags))
    (cache,) = cache_folders(tmp_path / "cache")
    kept = np.load(cache / "encoded.npy")
    assert kept.sum() == 2  # the two batches encoded before the interrupt
    monkeypatch.setattr(diffusers.AutoencoderKL, "encode", encode)
    run_trainer(dpo, cli_args(output_dir=tmp_path / "b", **flags))
    encoded = np.load(cache / "encoded.npy")
    assert (encoded | ~kept).all() and encoded.any(axis=1).sum() == np.count_nonzero(
        ~np.load(cache / "undecodable.npy")
    )


def test_a_dataset_without_a_decodable_pair_stops_in_one_line(dpo, cli_args, tmp_path):
    """With --max_train_steps the epochs are planned from the usable pairs: none must stop the run, not divide by 0."""
    data = tiny_assets.build_pickapic_dataset(str(tmp_path / "data"), n_pairs=0, n_ties=0, corrupt_pairs=3)
    with pytest.raises(InputError) as error:
        run_trainer(dpo, cli_args(dataset_name=data, max_train_steps=2))
    assert str(error.value) == f"no pair of dataset '{data}' has two decodable images"


def test_a_truncated_webdataset_shard_keeps_its_intact_samples_and_is_named(dpo, cli_args, tmp_path, caplog):
    data = tiny_assets.build_webdataset_dataset(str(tmp_path / "data"), n_pairs=8, n_shards=2)
    damaged = tmp_path / "data" / "train-00001.tar"
    with tarfile.open(damaged) as tar:
        third_loser = tar.getmembers()[7]  # 3 files a sample: the cut falls inside the shard's third sample
    damaged.write_bytes(damaged.read_bytes()[: third_loser.offset_data + third_loser.size // 2])
    caplog.set_level(logging.WARNING)
    result = run_trainer(dpo, cli_args(dataset_name=data, max_train_steps=1))
    assert result["global_step"] == 1
    (cache,) = cache_folders(tmp_path / "cache")
    assert json.loads((cache / "cache_info.json").read_text())["pairs"] == 4 + 2  # shard 0's and the intact two
    assert not np.load(cache / "undecodable.npy").any()
    assert f"Skipping what follows row 2 of source file {damaged}: unreadable (ReadError" in caplog.text


@pytest.mark.parametrize("content", ["", "\n  \n"], ids=["empty", "blank lines"])
def test_an_image_folder_whose_metadata_names_no_pairs_is_one_line(dpo, cli_args, tmp_path, content):
    data = tiny_assets.build_image_folder_dataset(str(tmp_path / "data"), n_pairs=2)
    (tmp_path / "data" / "metadata.jsonl").write_text(content)
    with pytest.raises(InputError) as error:
        run_trainer(dpo, cli_args(dataset_name=data))
    assert str(error.value) == f"image folder '{data}': metadata.jsonl names no image pairs"  # not Pick-a-Pic's note


def test_pairs_with_the_same_image_on_both_sides_are_counted_and_skipped(dpo, cli_args, tmp_path, caplog):
    """Nothing to prefer: such a pair's loss would be ln 2 with no gradient. The same pixels re-encoded too."""
    rng = random.Random(0)
    pairs = [jpeg_pair(rng) for _ in range(6)]
    same_pixels = io.BytesIO()
    Image.open(io.BytesIO(pairs[4][0])).save(same_pixels, format="PNG")
    pairs[1] = (pairs[1][0], pairs[1][0])
    pairs[4] = (pairs[4][0], same_pixels.getvalue())
    (tmp_path / "data").mkdir()
    table = {
        "caption": [f"caption {i}" for i in range(6)],
        "jpg_0": pa.array([pair[0] for pair in pairs], pa.binary()),
        "jpg_1": pa.array([pair[1] for pair in pairs], pa.binary()),
        "label_0": [1.0] * 6,
    }
    pq.write_table(pa.table(table), tmp_path / "data" / "train-00000-of-00001.parquet")
    caplog.set_level(logging.INFO)
    run_trainer(dpo, cli_args(dataset_name=str(tmp_path / "data"), max_train_steps=1))
    (cache,) = cache_folders(tmp_path / "cache")
    assert np.load(cache / "undecodable.npy").tolist() == [False, True, False, False, True, False]
    assert "skipping 2 of 6 pairs with an undecodable image or the same image on both sides" in caplog.text


# ---- a model the trainer cannot condition --------------------------------------------------------------------------

# each script given the tiny model of another family, and the script its message must point to
OTHER_FAMILY = {
    "train_diffusion_dpo": ("tiny_sdxl_model", "train_diffusion_dpo_sdxl.py"),
    "train_diffusion_dpo_sdxl": ("tiny_model", "train_diffusion_dpo.py"),
    "train_diffusion_dpo_sd3": ("tiny_model", "train_diffusion_dpo.py"),
    "train_diffusion_dpo_flux": ("tiny_sd3_model", "train_diffusion_dpo_sd3.py"),
    "train_diffusion_dpo_flux2": ("tiny_flux_model", "train_diffusion_dpo_flux.py"),
}


def refusal(dpo, argv, capsys):
    """The one line a trainer stops with on `argv`: when it parses the flags (exit status 2) or as its run starts."""
    try:
        dpo.parse_args(argv)
    except SystemExit as exit_info:
        assert exit_info.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        return line
    with pytest.raises(InputError) as error:
        run_trainer(dpo, argv)
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.every_script
def test_a_model_of_another_family_is_refused_in_one_line_naming_its_script(dpo, cli_args, tmp_path, request, capsys):
    fixture, other_script = OTHER_FAMILY[dpo.__name__]
    model = request.getfixturevalue(fixture)
    line = refusal(dpo, cli_args(pretrained_model_name_or_path=model), capsys)
    assert model in line and other_script in line
    assert not (tmp_path / "cache").exists()  # before any data is read


def test_the_sd3_script_sends_a_flux_model_to_the_flux_script(cli_args, tiny_flux_model, capsys):
    """A FLUX.1 folder lacks SD3's third text encoder: the line names the Flux script, not --no_t5."""
    import train_diffusion_dpo_sd3

    line = refusal(train_diffusion_dpo_sd3, cli_args(pretrained_model_name_or_path=tiny_flux_model), capsys)
    assert "train_diffusion_dpo_flux.py" in line and "--no_t5" not in line


def test_a_unet_with_a_class_embedding_is_refused(dpo, cli_args, tiny_pipeline, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline, model)
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps({**config, "class_embed_type": "timestep"}))
    with pytest.raises(InputError, match="has a unet of another kind \\(class_embed_type 'timestep'\\)"):
        run_trainer(dpo, cli_args(pretrained_model_name_or_path=model))
