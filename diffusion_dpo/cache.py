"""The latent and caption-embedding cache (docs/cache.md): each caption and image the run reads, encoded once."""

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import time
import uuid
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from accelerate.logging import get_logger
from diffusers.image_processor import VaeImageProcessor
from diffusers.training_utils import free_memory
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from diffusion_dpo import InputError, data
from diffusion_dpo.family import scaled_latents
from diffusion_dpo.run import first_line, format_bytes, removed_on_failure, save_atomically, stop_together


logger = get_logger(__name__)

CACHE_FORMAT_VERSION = 4
LATENT_ARRAYS = ("pair_latents", "crops", "checksums")  # written as images are encoded, (pair, orientation) each
MASK_ARRAYS = ("encoded", "undecodable")
CHECKED_ROWS = 16  # rows of each array whose checksums a run verifies before it trusts a cache


class CacheRequest(NamedTuple):
    """Source pairs to cache with the latents `epochs` training epochs read (None: held out, read as stored)."""

    source_pairs: data.PreferencePairs
    epochs: int | None = None


class PlannedCache(NamedTuple):
    """A resolved CacheRequest: its folder, the fields the folder's name hashes, the (pairs, orientations) read."""

    source_pairs: data.PreferencePairs
    path: Path
    key_fields: dict
    needed: np.ndarray


def drawn_orientations(n_pairs, n_orientations, seed, epoch):
    """Each pair's orientation in `epoch` (1: mirrored), from (seed, epoch) alone: precompute encodes what is read."""
    return np.random.default_rng([seed, epoch, 1]).integers(0, n_orientations, n_pairs)


def plan_cache(args, family, request, weight_dtype):
    """The PlannedCache of a CacheRequest: its folder's name changes with anything its contents depend on."""
    key_fields = {
        "format": CACHE_FORMAT_VERSION,
        **family.cache_key(args, weight_dtype),
        "encode_dtype": [str(weight_dtype), str(family.vae_dtype(args, weight_dtype))],  # text encoders, VAE
        "resolution": args.resolution,
        "crop": f"random(seed={args.seed})" if args.random_crop else "center",
        "hflip": not args.no_hflip,
        "pairs": request.source_pairs.fingerprint,  # changes with the data, the split, the subset and the order
        "layout": request.source_pairs.layout.cache_fields,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    n_pairs = len(request.source_pairs)
    needed = np.zeros((n_pairs, 1 if args.no_hflip else 2), dtype=bool)
    needed[:, 0] = request.epochs is None  # a held-out set is read as stored
    for epoch in range(request.epochs or 0):
        needed[np.arange(n_pairs), drawn_orientations(n_pairs, needed.shape[1], args.seed, epoch)] = True
    return PlannedCache(request.source_pairs, data.cache_root(args) / key, key_fields, needed)


class PairsToDecode(NamedTuple):
    """Source pairs for PairPixels to decode: those at `positions` (None: all)."""

    source_pairs: data.PreferencePairs
    positions: np.ndarray | None = None


class PairPixels(torch.utils.data.IterableDataset):
    """Decodes the pairs of `to_decode` (PairsToDecode each), streaming the shards that hold them (its own in each
    process `part` and loader worker): winner first, in every orientation, with each image's crop."""

    def __init__(self, args, to_decode, part=0, parts=1):
        self.args = args
        self.to_decode = to_decode
        self.image_processor = VaeImageProcessor(do_resize=False)
        self.num_orientations = 1 if args.no_hflip else 2
        self.splits = {source_pairs.identity["split"]: source_pairs for source_pairs, _ in to_decode}
        tasks = {}  # (split, shard) -> {row in the split: [(group, position), ...]}
        for group, (source_pairs, positions) in enumerate(to_decode):
            positions = np.arange(len(source_pairs)) if positions is None else positions
            shards = np.searchsorted(source_pairs.shard_starts, source_pairs.rows[positions], side="right") - 1
            for position, shard in zip(positions.tolist(), shards.tolist()):
                rows = tasks.setdefault((source_pairs.identity["split"], shard), {})
                rows.setdefault(int(source_pairs.rows[position]), []).append((group, position))
        self.tasks = {task: tasks[task] for task in sorted(tasks)[part::parts]}  # this process's shards
        self.num_pairs = sum(len(found) for rows in self.tasks.values() for found in rows.values())

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        tasks = list(self.tasks)[worker.id :: worker.num_workers] if worker is not None else list(self.tasks)
        streams = {}
        for split, shard in tasks:
            source_pairs = self.splits[split]
            columns = source_pairs.layout.image_columns
            if split not in streams:
                streams[split] = data.stream_split(self.args, split, columns)[0]
            wanted, row = self.tasks[(split, shard)], int(source_pairs.shard_starts[shard])
            # .iter() (in shard_batches), not a for loop over the stream: inside a DataLoader worker the latter
            # splits the (one) shard among the workers again, and all but one would see nothing
            for batch in data.shard_batches(streams[split], shard, 64, data.source_file(source_pairs.identity, shard)):
                for offset in range(len(batch[columns[0]])):
                    for group, position in wanted.get(row + offset, ()):
                        yield self.decode(group, position, {column: batch[column][offset] for column in columns})
                row += len(batch[columns[0]])
            # the rows past those read: the rest of a file that could not be read
            yield from (self.skipped(*found) for at, pairs in wanted.items() if at >= row for found in pairs)

    def skipped(self, group, position):
        pixels = torch.zeros(self.num_orientations, 2, 3, self.args.resolution, self.args.resolution)
        crops = torch.zeros(self.num_orientations, 2, 6, dtype=torch.int32)
        return {"group": group, "index": position, "ok": False, "pixels": pixels, "crops": crops}

    def decode(self, group, position, example):
        item = self.skipped(group, position)
        source_pairs, resolution = self.to_decode[group].source_pairs, self.args.resolution
        try:
            images = [data.decode_image(value) for value in source_pairs.layout.images(example)]
        except Exception as error:  # PIL raises OSError, ValueError, SyntaxError... for broken files
            logger.warning(
                f"Skipping pair {position}: undecodable image ({type(error).__name__}: {error})",
                main_process_only=False,
            )
            return item
        if images[0].size == images[1].size and images[0].tobytes() == images[1].tobytes():
            logger.warning(f"Skipping pair {position}: the same image on both sides", main_process_only=False)
            return item  # nothing to prefer: its DPO loss would be ln 2 with no gradient, whatever the model
        if source_pairs.second_is_winner[position]:
            images.reverse()
        crop_rng = np.random.default_rng([self.args.seed, position]) if self.args.random_crop else None
        pictures, crops = [], np.zeros((2, 2, 6), dtype=np.int32)  # (orientation, image, crop)
        for side, image in enumerate(images):
            picture, (top, left, resized_width) = data.resize_and_crop(image, resolution, crop_rng)
            pictures.append(picture)
            # the mirrored image was cropped at the mirrored offset
            for orientation, crop_left in enumerate((left, resized_width - left - resolution)):
                crops[orientation, side] = [image.height, image.width, top, crop_left, resolution, resolution]
        pixels = self.image_processor.preprocess(pictures)
        n = self.num_orientations
        item.update(ok=True, pixels=torch.stack([pixels, pixels.flip(-1)][:n]), crops=torch.from_numpy(crops[:n]))
        return item


def image_latent_shape(args, family):
    """(channels, height, width) of one image's latent, from the VAE's config alone."""
    vae_config = family.vae_config(args)
    latent_size = args.resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)
    return (vae_config["latent_channels"], latent_size, latent_size)


def check_free_space(args, family, planned_caches):
    """Stops in one line, before any encoder loads, when the cache's disk cannot hold what the precompute writes."""

    def on_disk(n_bytes):  # in whole 4 KiB disk blocks
        return -(-n_bytes // 4096) * 4096

    chunks = [2 * 2 * math.prod(image_latent_shape(args, family)), 2 * 6 * 4, 4]  # a (pair, orientation) of each
    needed = 0
    for planned in planned_caches:
        n_pairs, n_orientations = planned.needed.shape
        todo = LatentCache(planned.path, planned.needed).todo if planned.path.exists() else planned.needed
        if not planned.path.exists():  # a new cache's caption arrays, and its caption index and masks (and copies)
            n_captions = len(set(planned.source_pairs.captions) | {""})
            needed += on_disk(n_captions * family.caption_bytes(args)) + 3 * on_disk(n_pairs * (n_orientations + 5))
        for chunk in chunks:  # sparse files: each latent takes whole disk blocks, all no more than the file's size
            needed += min(on_disk(n_pairs * n_orientations * chunk), int(todo.sum()) * on_disk(chunk + 4096))
    root = data.cache_root(args)
    free = shutil.disk_usage(root).free
    if needed > free:
        raise InputError(
            f"not enough disk space for the precompute cache in {root}: it needs {format_bytes(needed)}, "
            f"{format_bytes(free)} are free; free some space or choose another folder with --precompute_cache_dir"
        )


def create_missing_caches(args, family, planned_caches, device, weight_dtype):
    """Creates the caches not there yet (only then do text encoders load), renamed when complete, never half valid."""
    new_caches = [planned for planned in planned_caches if not planned.path.exists()]
    if not new_caches:
        return
    encode = family.load_text_encoder(args, device, weight_dtype)
    for planned in new_caches:
        captions = planned.source_pairs.captions
        # Row 0 is the pipeline's unconditional input, which prompt dropout trains: the empty caption's encoding, or
        # zeros where the pipeline forces them (SDXL); then an empty caption in the data gets a row of its own.
        zeros = planned.key_fields.get("unconditional") == "zeros"
        captioned = sorted(set(captions) - (set() if zeros else {""}))
        logger.info(f"Creating the latent and text-embedding cache {planned.path} ({len(captioned)} unique captions)")
        partial = planned.path.with_name(f".{planned.path.name}.partial-{uuid.uuid4().hex[:8]}")
        with removed_on_failure(partial):
            partial.mkdir(parents=True)
            row_of = {"": 0, **{caption: row for row, caption in enumerate(captioned, start=1)}}
            np.save(partial / "caption_index.npy", np.array([row_of[c] for c in captions], dtype=np.int32))
            texts = ["", *captioned]
            files = {}  # written batch by batch (a T5 caption takes MiBs): memory holds one batch, not the set
            with torch.inference_mode(), contextlib.ExitStack() as open_files:
                for start in range(0, len(texts), 64):
                    for name, rows in encode(texts[start : start + 64]).items():
                        rows = rows.cpu().half().numpy()
                        if start == 0 and zeros:
                            rows[0] = 0
                        if name not in files:
                            files[name] = open_files.enter_context(open(partial / f"{name}.npy", "wb"))
                            header = {
                                "descr": rows.dtype.str,
                                "fortran_order": False,
                                "shape": (len(texts), *rows.shape[1:]),
                            }
                            np.lib.format.write_array_header_1_0(files[name], header)
                        files[name].write(rows.tobytes())
            arrays = {name: np.load(partial / f"{name}.npy", mmap_mode="r") for name in files}
            n_pairs, n_orientations = planned.needed.shape
            latent_shapes = (np.float16, (2, *image_latent_shape(args, family))), (np.int32, (2, 6)), (np.uint32, ())
            for name, (dtype, shape) in zip(LATENT_ARRAYS, latent_shapes):
                # allocated, not written: the file stays sparse on disk until latents are encoded into it
                np.lib.format.open_memmap(partial / f"{name}.npy", "w+", dtype, (n_pairs, n_orientations, *shape))
            np.save(partial / "encoded.npy", np.zeros((n_pairs, n_orientations), dtype=bool))
            np.save(partial / "undecodable.npy", np.zeros(n_pairs, dtype=bool))
            checked_rows = np.unique(np.linspace(0, len(captioned), CHECKED_ROWS).astype(int)).tolist()
            checksums = {name: [zlib.crc32(array[row]) for row in checked_rows] for name, array in arrays.items()}
            info = dict(planned.key_fields, pairs=n_pairs, caption_arrays=list(arrays), caption_checksums=checksums)
            info.update(checked_rows=checked_rows, unique_captions=len(captioned))
            (partial / "cache_info.json").write_text(json.dumps(info, indent=2))
            os.replace(partial, planned.path)
    del encode
    free_memory()


class LatentCache:
    """A cache open for encoding its `todo` latents with pwrite, not a memory map: a full disk then fails the write
    with ENOSPC (one line), not the process with SIGBUS. Masks are saved as encoded<suffix>.npy (see fold_parts)."""

    def __init__(self, path, needed, suffix=""):
        self.path = path
        self.suffix = suffix
        self.encoded = np.load(path / "encoded.npy")
        self.undecodable = np.load(path / "undecodable.npy")
        self.todo = needed & ~self.encoded & ~self.undecodable[:, None]
        self.files = {}  # array name -> (file descriptor, data offset, bytes per (pair, orientation), dtype)

    def open(self):
        for name in LATENT_ARRAYS:
            array = np.load(self.path / f"{name}.npy", mmap_mode="r")
            chunk = array.dtype.itemsize * math.prod(array.shape[2:])
            self.files[name] = (os.open(self.path / f"{name}.npy", os.O_WRONLY), array.offset, chunk, array.dtype)

    def store(self, index, orientation, latent, crop):
        checksum = zlib.crc32(crop.tobytes(), zlib.crc32(latent.tobytes()))
        for name, value in zip(LATENT_ARRAYS, (latent, crop, checksum)):
            fd, offset, chunk, dtype = self.files[name]
            written = np.ascontiguousarray(value, dtype=dtype).tobytes()
            if os.pwrite(fd, written, offset + (index * self.encoded.shape[1] + orientation) * chunk) != len(written):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a short write: the disk filled up
        self.encoded[index, orientation] = True

    def commit(self):
        for fd, *_ in self.files.values():  # the latents reach the disk before the masks that say they are there
            os.fsync(fd)
        save_atomically(self.path / f"encoded{self.suffix}.npy", self.encoded)
        save_atomically(self.path / f"undecodable{self.suffix}.npy", self.undecodable)

    def close(self):
        self.commit()
        for fd, *_ in self.files.values():
            os.close(fd)


class VaeEncoder:
    """VAE latents as the pipeline decodes them; on CUDA out-of-memory the batch halves, and stays halved."""

    def __init__(self, vae, batch_size, device, dtype, memory_format, vae_latents=scaled_latents):
        self.vae, self.batch_size, self.vae_latents = vae, batch_size, vae_latents
        self.device, self.dtype, self.memory_format = device, dtype, memory_format
        self.backed_off = False

    @torch.inference_mode()
    def __call__(self, images):
        latents, start = [], 0
        while start < len(images):
            chunk = images[start : start + self.batch_size]
            try:
                encoded = self.vae.encode(chunk.to(self.device, self.dtype, memory_format=self.memory_format))
                latents.append(encoded.latent_dist.mean)
                start += len(chunk)
                continue
            except torch.cuda.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
            # outside the except clause: the failed forward's tensors, held by its traceback, are released by now
            self.batch_size = len(chunk) // 2
            free_memory()
            if not self.backed_off:
                logger.warning(
                    f"CUDA out of memory encoding {len(chunk)} images at once: VAE batch halved to "
                    f"{self.batch_size} (halved again if needed); a lower --vae_encode_batch_size avoids the retry",
                    main_process_only=False,
                )
                self.backed_off = True
        return self.vae_latents(self.vae, torch.cat(latents).float())


def encode_latents(args, family, planned_caches, device, weight_dtype, part=0, parts=1):
    """Encodes the latents the caches lack (this process its `part`), committed every --precompute_commit_seconds."""
    # channels-last convolutions encode 1.4x faster on CPU (measured); on GPUs only with --channels_last
    channels_last = getattr(args, "channels_last", False) or device.type == "cpu"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    caches = [LatentCache(p.path, p.needed, f".part-{part}" if parts > 1 else "") for p in planned_caches]
    for cache in caches:  # logged by the main process
        logger.info(
            f"Cache {cache.path.name}: {int(cache.encoded.sum())} pair latents present, {int(cache.todo.sum())} "
            f"to encode{f' by {parts} processes' if parts > 1 else ''}"
        )
    todo = [PairsToDecode(p.source_pairs, np.flatnonzero(c.todo.any(axis=1))) for p, c in zip(planned_caches, caches)]
    pixels = PairPixels(args, todo, part, parts)
    if pixels.num_pairs == 0:
        return
    vae_dtype = family.vae_dtype(args, weight_dtype)
    vae = family.load_vae(args, vae_dtype).to(device).eval().requires_grad_(False).to(memory_format=memory_format)
    encoder = VaeEncoder(vae, args.vae_encode_batch_size, device, vae_dtype, memory_format, family.vae_latents)
    decoders = args.dataloader_num_workers or max(1, min(4, (os.cpu_count() or 1) // parts))  # overlap the VAE
    loader = torch.utils.data.DataLoader(
        pixels, batch_size=max(1, args.vae_encode_batch_size // 2), num_workers=min(len(pixels.tasks), decoders)
    )
    started = last_commit = time.monotonic()
    n_images = 0
    progress = tqdm(total=pixels.num_pairs, desc="Encoding images", disable=part != 0)
    try:  # interrupted (Ctrl-C, SIGTERM) or failed: what was encoded is kept, and the next run goes on from there
        for cache in caches:
            cache.open()
        for batch in loader:
            progress.update(len(batch["index"]))
            group, index, ok = batch["group"].numpy(), batch["index"].numpy(), batch["ok"].numpy()
            for g, i in zip(group[~ok], index[~ok]):
                caches[g].undecodable[i] = True
            wanted = np.stack([caches[g].todo[i] for g, i in zip(group, index)]) & ok[:, None]
            if wanted.any():
                images = batch["pixels"][torch.from_numpy(wanted)]  # (n, 2, 3, H, W): the (pair, orientation)s wanted
                latents = encoder(images.flatten(0, 1))
                latents = latents.view(*images.shape[:2], *latents.shape[1:]).cpu().to(torch.float16).numpy()
                n_images += 2 * len(latents)
                crops = batch["crops"][torch.from_numpy(wanted)].numpy()
                for latent, crop, (row, orientation) in zip(latents, crops, np.argwhere(wanted)):
                    caches[group[row]].store(index[row], orientation, latent, crop)
            if time.monotonic() - last_commit > args.precompute_commit_seconds:
                for cache in caches:
                    cache.commit()
                last_commit = time.monotonic()
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = format_bytes(shutil.disk_usage(data.cache_root(args)).free)
        raise InputError(
            f"the disk of {data.cache_root(args)} is full ({free} free) while encoding latents; what was encoded is "
            "kept: free some space and run again, or choose another folder with --precompute_cache_dir"
        ) from None
    finally:
        progress.close()
        for cache in caches:
            cache.close()
    seconds = time.monotonic() - started
    backed_off = f"; VAE batch {encoder.batch_size} after out-of-memory" if encoder.backed_off else ""
    logger.info(
        f"Process {part} encoded {n_images} images of {len(pixels.tasks)} source shards in {seconds:.1f} s "
        f"({n_images / seconds:.1f} images/s){backed_off}",
        main_process_only=False,
    )
    del vae, encoder
    free_memory()


def fold_parts(cache_path):
    """Folds the processes' masks into encoded.npy / undecodable.npy: saved after their latents, a killed run's too."""
    for name in MASK_ARRAYS:
        parts = sorted(cache_path.glob(f"{name}.part-*.npy"))
        if parts:
            masks = [np.load(cache_path / f"{name}.npy"), *map(np.load, parts)]
            save_atomically(cache_path / f"{name}.npy", np.logical_or.reduce(masks))
            for part in parts:
                part.unlink()


def damaged_cache_file(file, reason):
    return InputError(
        f"the cache file {file} is damaged ({reason}); delete the folder {file.parent} and run again to rebuild it"
    )


def check_cache_files(cache_path):
    """Checks every array's shape and some rows' checksums: a damaged file stops the run in one line, early."""
    try:
        info = json.loads((cache_path / "cache_info.json").read_text())
        caption_arrays = info["caption_arrays"]
    except Exception as error:  # missing, truncated, or of another format
        raise damaged_cache_file(cache_path / "cache_info.json", first_line(error)) from None
    names = ["caption_index", *caption_arrays, *LATENT_ARRAYS, *MASK_ARRAYS]
    names += [part.name[: -len(".npy")] for part in sorted(cache_path.glob("*.part-*.npy"))]
    arrays = {}
    for name in names:
        try:
            arrays[name] = np.load(cache_path / f"{name}.npy", mmap_mode="r")
        except Exception as error:  # numpy raises ValueError, OSError, EOFError... for a damaged file
            raise damaged_cache_file(cache_path / f"{name}.npy", f"{type(error).__name__}: {first_line(error)}")
    if arrays["encoded"].ndim != 2:
        raise damaged_cache_file(cache_path / "encoded.npy", f"shape {arrays['encoded'].shape}")
    pair, n_captions = arrays["encoded"].shape, len(arrays[caption_arrays[0]])  # (pairs, orientations)
    leading_dims = {"encoded": pair, "checksums": pair, "undecodable": pair[:1], "caption_index": pair[:1]}
    leading_dims.update(pair_latents=(*pair, 2), crops=(*pair, 2, 6), **dict.fromkeys(caption_arrays, (n_captions,)))
    for name, array in arrays.items():  # each array's shape starts with these
        expected = leading_dims[name.split(".")[0]]
        if array.shape[: len(expected)] != expected:
            raise damaged_cache_file(cache_path / f"{name}.npy", f"shape {array.shape}, expected {expected} first")
    caption_index = np.asarray(arrays["caption_index"])
    if pair[0] and not 0 <= caption_index.min() <= caption_index.max() < n_captions:
        raise damaged_cache_file(cache_path / "caption_index.npy", f"rows outside the {n_captions} embeddings")
    for name in caption_arrays:
        for row, expected in zip(info["checked_rows"], info["caption_checksums"][name]):
            if zlib.crc32(np.ascontiguousarray(arrays[name][row])) != expected:
                raise damaged_cache_file(cache_path / f"{name}.npy", f"row {row} differs from its checksum")
    encoded = np.argwhere(np.asarray(arrays["encoded"]))
    sampled = np.unique(np.linspace(0, len(encoded) - 1, CHECKED_ROWS).astype(int)) if len(encoded) else []
    for index, orientation in encoded[sampled]:
        latent, crop = (np.ascontiguousarray(arrays[name][index, orientation]) for name in ("pair_latents", "crops"))
        if zlib.crc32(crop.tobytes(), zlib.crc32(latent.tobytes())) != arrays["checksums"][index, orientation]:
            raise damaged_cache_file(cache_path / "pair_latents.npy", f"pair {index} differs from its checksum")


def load_or_precompute(args, family, requests, accelerator, weight_dtype):
    """The CachedPreferencePairs of each CacheRequest, precomputed under a file lock: runs sharing a cache take turns
    (under it only a machine's own processes synchronise, so machines never wait for each other under it)."""
    planned_caches = [plan_cache(args, family, request, weight_dtype) for request in requests]
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    # a process group of this machine's processes (every process takes part in creating it)
    machine = torch.distributed.new_subgroups(per_machine)[0] if accelerator.num_processes > 1 else None
    root = data.cache_root(args)
    lock = FileLock(root / ".precompute.lock")
    try:
        with stop_together(machine):  # the machine's processes only: other machines may wait for the lock
            if accelerator.is_local_main_process:
                root.mkdir(parents=True, exist_ok=True)
                try:
                    lock.acquire(timeout=0)
                except Timeout:  # another run holds it: say why nothing happens, then take turns as always
                    logger.info(
                        f"Waiting for the cache lock {lock.lock_file}: another run is precomputing into {root}",
                        main_process_only=False,
                    )
                    lock.acquire()
                # what killed runs left: caches and their masks are written only under the lock this process holds
                for leftover in [*root.glob(".*.partial-*/"), *root.glob("*/.*.partial-*")]:
                    logger.info(f"Removing {leftover}, left by an interrupted run")
                    if leftover.is_dir():
                        shutil.rmtree(leftover, ignore_errors=True)
                    else:
                        leftover.unlink(missing_ok=True)
                for planned in planned_caches:
                    if planned.path.exists():
                        check_cache_files(planned.path)
                        fold_parts(planned.path)
                check_free_space(args, family, planned_caches)
                create_missing_caches(args, family, planned_caches, accelerator.device, weight_dtype)
        with stop_together(machine):
            part = accelerator.local_process_index
            encode_latents(args, family, planned_caches, accelerator.device, weight_dtype, part, per_machine)
        if accelerator.is_local_main_process:
            for planned in planned_caches:
                fold_parts(planned.path)
                undecodable = np.load(planned.path / "undecodable.npy")
                if undecodable.any():
                    logger.warning(
                        f"Cache {planned.path.name}: skipping {int(undecodable.sum())} of {len(undecodable)} "
                        "pairs with an undecodable image or the same image on both sides."
                    )
    finally:
        if lock.is_locked:
            lock.release()
    accelerator.wait_for_everyone()
    if machine is not None:
        torch.distributed.destroy_process_group(machine)
    return [CachedPreferencePairs(p.path, p.needed, p.source_pairs.preference) for p in planned_caches]


class CachedPreferencePairs(torch.utils.data.Dataset):
    """Pairs (with every latent in `needed` encoded; None: any) read by (pair index, orientation, drop caption);
    with --soft_labels each pair's p (`preference`, from the source pairs: not cached, the latents stay shareable)."""

    def __init__(self, cache_path, needed=None, preference=None):
        self.cache_path, self.preference = Path(cache_path), preference
        self.caption_arrays = json.loads((self.cache_path / "cache_info.json").read_text())["caption_arrays"]
        self.encoded = np.load(self.cache_path / "encoded.npy")
        usable = ~np.load(self.cache_path / "undecodable.npy")
        usable &= self.encoded.any(axis=1) if needed is None else (self.encoded | ~needed).all(axis=1)
        self.valid_indices = np.flatnonzero(usable)
        self.arrays = None  # opened lazily, once per DataLoader worker

    def __len__(self):
        return len(self.valid_indices)

    def __getitem__(self, key):
        if self.arrays is None:
            names = ["caption_index", *LATENT_ARRAYS, *self.caption_arrays]
            self.arrays = {name: np.load(self.cache_path / f"{name}.npy", mmap_mode="r") for name in names}
        index, orientation, drop_caption = key
        if not self.encoded[index, orientation]:  # never read the zeros of a latent that was not encoded
            raise RuntimeError(f"pair {index} orientation {orientation} is not in the cache {self.cache_path}")
        caption_row = 0 if drop_caption else int(self.arrays["caption_index"][index])
        item = {name: np.array(self.arrays[name][index, orientation]) for name in ("pair_latents", "crops")}
        item.update({name: np.array(self.arrays[name][caption_row]) for name in self.caption_arrays})
        if self.preference is not None:
            item["preference"] = np.array(self.preference[index])
        return {name: torch.from_numpy(value) for name, value in item.items()}


@dataclasses.dataclass
class PairSampler(torch.utils.data.Sampler):
    """Order, flips and caption dropout from (seed, epoch) alone: a resumed run reads as an uninterrupted one would."""

    cached: "CachedPreferencePairs"
    seed: int
    proportion_empty_prompts: float
    epoch: int = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.cached)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.cached))
        drop_caption = rng.random(len(order)) < self.proportion_empty_prompts
        orientations = drawn_orientations(*self.cached.encoded.shape, self.seed, self.epoch)
        for pair, drop in zip(self.cached.valid_indices[order].tolist(), drop_caption.tolist()):
            yield pair, int(orientations[pair]), drop


def steps_per_epoch(args, n_pairs, num_processes):
    """Optimizer steps in one epoch over `n_pairs` pairs, batched as accelerate's prepared loader batches them."""
    return math.ceil(math.ceil(n_pairs / args.train_batch_size / num_processes) / args.gradient_accumulation_steps)


def planned_epochs(args, n_pairs, num_processes):
    """Epochs a run over `n_pairs` (> 0) pairs covers (the count the training loop arrives at)."""
    if args.max_train_steps is None:
        return args.num_train_epochs
    return math.ceil(args.max_train_steps / steps_per_epoch(args, n_pairs, num_processes))


def precompute_pairs(args, family, accelerator, train_source, held_out_source, weight_dtype):
    """The cached training and held-out pairs; when skipped pairs shorten the epochs, the extra epochs are encoded."""
    held_out_requests = [CacheRequest(held_out_source)] if held_out_source is not None else []
    n_processes, n_pairs, epochs = accelerator.num_processes, len(train_source), 0
    while planned_epochs(args, n_pairs, n_processes) > epochs:  # at least once
        epochs = planned_epochs(args, n_pairs, n_processes)
        requests = [CacheRequest(train_source, epochs), *held_out_requests]
        train_pairs, *held_out = load_or_precompute(args, family, requests, accelerator, weight_dtype)
        if len(train_pairs) == 0:
            raise InputError(f"no pair of dataset '{args.dataset_name}' has two decodable images")
        n_pairs = len(train_pairs)
    if n_pairs < args.train_batch_size * n_processes:
        processes = f" on {n_processes} processes" if n_processes > 1 else ""
        raise InputError(
            f"--train_batch_size {args.train_batch_size} needs at least {args.train_batch_size * n_processes} usable "
            f"pairs{processes}; the data has {n_pairs}"
        )
    return train_pairs, held_out[0] if held_out else None


def training_dataloader(args, train_pairs):
    return torch.utils.data.DataLoader(
        train_pairs,
        batch_size=args.train_batch_size,
        sampler=PairSampler(train_pairs, args.seed, args.proportion_empty_prompts),
        num_workers=args.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=args.dataloader_num_workers > 0,
    )
