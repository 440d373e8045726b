"""The cache: every caption encoded once with the family's text encoders, every image the run reads encoded once with
its VAE, kept on disk and shared by the processes of a run and by later runs. Training then reads only the cache.

A cache folder holds, for one set of source pairs (docs/cache.md):
  caption_index.npy        (pairs,) int32: each pair's row of the caption arrays; row 0 is the unconditional input
  <caption array>.npy      (unique captions + 1, ...) float16, as the family's text encoder returns them
  pair_latents.npy         (pairs, orientations, 2 = winner/loser, C, h, w) float16, shifted and scaled as the
                           family's pipeline decodes them; sparse on disk until encoded
  crops.npy                (pairs, orientations, 2, 6) int32: each image's original height and width, the crop's top,
                           left, height and width: SDXL's micro-conditioning (its time ids)
  checksums.npy            (pairs, orientations) uint32: CRC-32 of each (pair, orientation)'s latents and crops
  encoded.npy              (pairs, orientations) bool: which latents are there
  undecodable.npy          (pairs,) bool: pairs with an image that could not be decoded (skipped)
  encoded.part-<k>.npy ... what process k of a machine encoded, until folded in
  cache_info.json          the key fields the folder's name is hashed from, the caption arrays' names, and the
                           CRC-32 of some of their rows
"""

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

from diffusion_dpo import InputError
from diffusion_dpo.data import (
    PreferencePairs,
    cache_root,
    decode_image,
    resize_and_crop,
    shard_batches,
    source_file,
    stream_split,
)
from diffusion_dpo.run import first_line, format_bytes, removed_on_failure, save_atomically, stop_together


logger = get_logger(__name__)

CACHE_FORMAT_VERSION = 4
LATENT_ARRAYS = ("pair_latents", "crops", "checksums")  # written as images are encoded, (pair, orientation) each
CHECKED_ROWS = 16  # rows of each array whose checksums a run verifies before it trusts a cache
MASK_ARRAYS = ("encoded", "undecodable")
CAPTION_BATCH = 64  # captions per text-encoder forward


class CacheRequest(NamedTuple):
    """A request for the cache of some source pairs, holding the latents that `epochs` training epochs read; epochs
    None: a held-out set, each pair read as stored."""

    source_pairs: PreferencePairs
    epochs: int | None = None


class PlannedCache(NamedTuple):
    """A cache request resolved: the source pairs, their cache folder, the fields its name is hashed from, and the
    latents the run reads ((pairs, orientations) bool, see latents_read)."""

    source_pairs: PreferencePairs
    path: Path
    key_fields: dict
    needed: np.ndarray


def drawn_orientations(n_pairs, n_orientations, seed, epoch):
    """The orientation (0: as stored, 1: mirrored) each pair is read in during `epoch`, a function of (seed, epoch)
    alone. The sampler reads it and the precompute encodes exactly these latents, so a one-epoch run encodes every
    image once even with flipping on."""
    return np.random.default_rng([seed, epoch, 1]).integers(0, n_orientations, n_pairs)


def latents_read(n_pairs, args, epochs=None):
    """(pairs, orientations) bool: the latents a run reads in `epochs` training epochs; None: a held-out set (read
    as stored, orientation 0)."""
    needed = np.zeros((n_pairs, 1 if args.no_hflip else 2), dtype=bool)
    if epochs is None:
        needed[:, 0] = True
    for epoch in range(epochs or 0):
        needed[np.arange(n_pairs), drawn_orientations(n_pairs, needed.shape[1], args.seed, epoch)] = True
    return needed


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
    needed = latents_read(len(request.source_pairs), args, request.epochs)
    return PlannedCache(request.source_pairs, cache_root(args) / key, key_fields, needed)


class PairsToDecode(NamedTuple):
    """Source pairs for PairPixels to decode: those at `positions` (None: all)."""

    source_pairs: PreferencePairs
    positions: np.ndarray | None = None


class PairPixels(torch.utils.data.IterableDataset):
    """Streams the source shards that hold pending pairs (each DataLoader worker its own shards) and yields those
    pairs decoded and cropped, winner first, plus their mirrored copies, with each image's crop. `to_decode`: a list
    of PairsToDecode; items carry the number of theirs in it ("group") and the pair's position in it ("index")."""

    def __init__(self, args, to_decode, part=0, parts=1):
        self.args = args
        self.resolution = args.resolution
        self.random_crop = args.random_crop
        self.seed = args.seed
        self.image_processor = VaeImageProcessor(do_resize=False)
        self.num_orientations = 1 if args.no_hflip else 2
        self.to_decode = to_decode
        self.tasks = {}  # (split, shard) -> {row in the split: [(group, position), ...]}
        self.splits = {}  # per split: its source pairs (identity, shard starts)
        for group, (source_pairs, positions) in enumerate(to_decode):
            split = source_pairs.identity["split"]
            self.splits[split] = source_pairs
            positions = np.arange(len(source_pairs)) if positions is None else positions
            shards = np.searchsorted(source_pairs.shard_starts, source_pairs.rows[positions], side="right") - 1
            for position, shard in zip(positions.tolist(), shards.tolist()):
                rows = self.tasks.setdefault((split, shard), {})
                rows.setdefault(int(source_pairs.rows[position]), []).append((group, position))
        self.tasks = {task: self.tasks[task] for task in sorted(self.tasks)[part::parts]}  # this process's shards
        self.num_pairs = sum(len(found) for rows in self.tasks.values() for found in rows.values())

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        tasks = list(self.tasks)[worker.id :: worker.num_workers] if worker is not None else list(self.tasks)
        streams = {}
        for split, shard in tasks:
            source_pairs = self.splits[split]
            columns = source_pairs.layout.image_columns
            if split not in streams:
                streams[split] = stream_split(self.args, split, columns)[0]
            stream, wanted = streams[split], self.tasks[(split, shard)]
            row, unseen = int(source_pairs.shard_starts[shard]), {found for rows in wanted.values() for found in rows}
            # .iter() (in shard_batches), not a for loop over the stream: inside a DataLoader worker the latter
            # splits the (one) shard among the workers again, and all but one would see nothing
            for batch in shard_batches(stream, shard, 64, source_file(source_pairs.identity, shard)):
                for offset in range(len(batch[columns[0]])):
                    for group, position in wanted.get(row + offset, ()):
                        unseen.discard((group, position))
                        yield self.decode(group, position, {column: batch[column][offset] for column in columns})
                row += len(batch[columns[0]])
            yield from (self.skipped(group, position) for group, position in sorted(unseen))  # unreadable rows

    def skipped(self, group, position):
        pixels = torch.zeros(self.num_orientations, 2, 3, self.resolution, self.resolution)
        crops = torch.zeros(self.num_orientations, 2, 6, dtype=torch.int32)
        return {"group": group, "index": position, "ok": False, "pixels": pixels, "crops": crops}

    def decode(self, group, position, example):
        item = self.skipped(group, position)
        try:
            images = [decode_image(value) for value in self.to_decode[group].source_pairs.layout.images(example)]
        except Exception as error:  # PIL raises OSError, ValueError, SyntaxError... for broken files
            logger.warning(
                f"Skipping pair {position}: undecodable image ({type(error).__name__}: {error})",
                main_process_only=False,
            )
            return item
        if images[0].size == images[1].size and images[0].tobytes() == images[1].tobytes():
            logger.warning(f"Skipping pair {position}: the same image on both sides", main_process_only=False)
            return item  # nothing to prefer: its DPO loss would be ln 2 with no gradient, whatever the model
        if self.to_decode[group].source_pairs.second_is_winner[position]:
            images.reverse()
        crop_rng = np.random.default_rng([self.seed, position]) if self.random_crop else None
        pictures, crops, mirrored_crops, size = [], [], [], [self.resolution, self.resolution]
        for image in images:
            picture, (top, left, resized_width) = resize_and_crop(image, self.resolution, crop_rng)
            pictures.append(picture)
            crops.append([image.height, image.width, top, left, *size])
            # the mirrored image was cropped at the mirrored offset
            mirrored_crops.append([image.height, image.width, top, resized_width - left - self.resolution, *size])
        pixels = self.image_processor.preprocess(pictures)
        orientations = [(pixels, crops), (pixels.flip(-1), mirrored_crops)][: self.num_orientations]
        return {
            **item,
            "ok": True,
            "pixels": torch.stack([p for p, _ in orientations]),
            "crops": torch.tensor([c for _, c in orientations], dtype=torch.int32),
        }


def image_latent_shape(args, family):
    """(channels, height, width) of one image's latent, from the VAE's config alone."""
    vae_config = family.vae_config(args)
    latent_size = args.resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)
    return (vae_config["latent_channels"], latent_size, latent_size)


def precompute_bytes(args, family, planned_caches):
    """Bytes the precompute will write for `planned_caches`: a new cache's caption arrays, caption index and masks,
    and the latents still to encode. Latent files are sparse: each latent written takes whole disk blocks, all of
    them no more than the file's full size."""

    def on_disk(n_bytes, block=4096):
        return -(-n_bytes // block) * block

    chunks = [2 * 2 * math.prod(image_latent_shape(args, family)), 2 * 6 * 4, 4]  # a (pair, orientation) of each
    total = 0
    for planned in planned_caches:
        (n_pairs, n_orientations), todo = planned.needed.shape, planned.needed
        if planned.path.exists():
            todo = todo & ~np.load(planned.path / "encoded.npy") & ~np.load(planned.path / "undecodable.npy")[:, None]
        else:
            n_captions = len({str(caption) for caption in planned.source_pairs.captions} | {""})
            total += on_disk(n_captions * family.caption_bytes(args))
            total += 3 * on_disk(n_pairs * (4 + n_orientations + 1))  # caption index, masks and their copies
        if todo.any():
            for chunk in chunks:
                total += min(on_disk(n_pairs * n_orientations * chunk), int(todo.sum()) * on_disk(chunk + 4096))
    return total


def check_free_space(args, family, planned_caches):
    """Stops in one line, before any encoder is loaded, when the cache folder's disk cannot hold what the precompute
    writes."""
    root = cache_root(args)
    needed, free = precompute_bytes(args, family, planned_caches), shutil.disk_usage(root).free
    if needed > free:
        raise InputError(
            f"not enough disk space for the precompute cache in {root}: it needs {format_bytes(needed)}, "
            f"{format_bytes(free)} are free; free some space or choose another folder with --precompute_cache_dir"
        )


@torch.inference_mode()
def encode_text(encode, captions):
    """{array name: (len(captions), ...) float16 array} from the family's encode, CAPTION_BATCH captions at a time."""
    batches = [encode(captions[start : start + CAPTION_BATCH]) for start in range(0, len(captions), CAPTION_BATCH)]
    return {name: torch.cat([batch[name].cpu() for batch in batches]).to(torch.float16).numpy() for name in batches[0]}


def create_cache(args, planned, encode, latent_shape):
    """The new cache folder of a PlannedCache: its caption arrays, empty latent storage and masks, written under a
    temporary name and renamed when complete (an interrupted run never leaves a folder that looks valid)."""
    with removed_on_failure(planned.path.with_name(f".{planned.path.name}.partial-{uuid.uuid4().hex[:8]}")) as partial:
        partial.mkdir(parents=True)
        captions = [str(caption) for caption in planned.source_pairs.captions]
        # Row 0 is the pipeline's unconditional input, which prompt dropout trains: the empty caption's encoding, or
        # zeros where the pipeline forces them (SDXL); then an empty caption in the data gets a row of its own.
        zeros = planned.key_fields.get("unconditional") == "zeros"
        captioned = sorted(set(captions) - (set() if zeros else {""}))
        row_of = {"": 0, **{caption: row for row, caption in enumerate(captioned, start=1)}}
        np.save(partial / "caption_index.npy", np.array([row_of[c] for c in captions], dtype=np.int32))
        arrays = encode_text(encode, ["", *captioned])
        for name, array in arrays.items():
            if zeros:
                array[0] = 0
            np.save(partial / f"{name}.npy", array)
        checked_rows = np.unique(np.linspace(0, len(captioned), CHECKED_ROWS).astype(int)).tolist()
        checksums = {name: [zlib.crc32(array[row]) for row in checked_rows] for name, array in arrays.items()}
        logger.info(
            f"Encoded {len(captioned)} unique captions for {len(captions)} pairs ({captions.count('')} empty)."
        )
        n_pairs, n_orientations = planned.needed.shape
        latent_arrays = (np.float16, (2, *latent_shape)), (np.int32, (2, 6)), (np.uint32, ())
        for name, (dtype, shape) in zip(LATENT_ARRAYS, latent_arrays):
            # allocated, not written: the file stays sparse on disk until latents are encoded into it
            np.lib.format.open_memmap(partial / f"{name}.npy", "w+", dtype, (n_pairs, n_orientations, *shape))
        np.save(partial / "encoded.npy", np.zeros((n_pairs, n_orientations), dtype=bool))
        np.save(partial / "undecodable.npy", np.zeros(n_pairs, dtype=bool))
        info = {
            **planned.key_fields,
            "pairs": n_pairs,
            "caption_arrays": list(arrays),
            "caption_checksums": checksums,
            "checked_rows": checked_rows,
            "unique_captions": len(captioned),
        }
        (partial / "cache_info.json").write_text(json.dumps(info, indent=2))
        os.replace(partial, planned.path)


def create_missing_caches(args, family, planned_caches, device, weight_dtype):
    """Creates the caches of `planned_caches` that do not exist yet; the text encoders load only if one is missing."""
    new_caches = [planned for planned in planned_caches if not planned.path.exists()]
    if new_caches:
        encode = family.load_text_encoder(args, device, weight_dtype)
        for planned in new_caches:
            logger.info(f"Creating the latent and text-embedding cache {planned.path}")
            create_cache(args, planned, encode, image_latent_shape(args, family))
        del encode
        free_memory()


class LatentCache:
    """The latent storage of one cache, open for encoding: its masks, the latents this process encodes into it
    (`todo`, (pairs, orientations) bool), and once `open`, the files written. Latents are written with pwrite, not
    through a memory map: a disk that fills up fails the write with ENOSPC, which is reported in one line, where a
    memory-mapped write would kill the process with SIGBUS. Masks are saved as encoded<suffix>.npy (see fold_parts).
    """

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

    def store(self, index, orientation, **values):
        n_orientations = self.encoded.shape[1]
        for name, value in values.items():
            fd, offset, chunk, dtype = self.files[name]
            data = np.ascontiguousarray(value, dtype=dtype).tobytes()
            if os.pwrite(fd, data, offset + (index * n_orientations + orientation) * chunk) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a short write: the disk filled up
        self.encoded[index, orientation] = True

    def commit(self):
        """Latents reach the disk before the masks that say they are there."""
        for fd, *_ in self.files.values():
            os.fsync(fd)
        save_atomically(self.path / f"encoded{self.suffix}.npy", self.encoded)
        save_atomically(self.path / f"undecodable{self.suffix}.npy", self.undecodable)

    def close(self):
        for fd, *_ in self.files.values():
            os.close(fd)
        self.files = {}


class VaeEncoder:
    """VAE latents (distribution means), shifted and scaled as the pipeline decodes them, `batch_size` images per
    forward (--vae_encode_batch_size). On CUDA out-of-memory the batch halves (logged once) and the failed batch is
    encoded again, down to one image; the smaller size is kept for the rest of the precompute."""

    def __init__(self, vae, batch_size, device, dtype, memory_format):
        self.vae, self.batch_size = vae, batch_size
        self.device, self.dtype, self.memory_format = device, dtype, memory_format
        self.backed_off = False

    @torch.inference_mode()
    def __call__(self, images):
        latents, start = [], 0
        while start < len(images):
            chunk = images[start : start + self.batch_size]
            try:
                pixels = chunk.to(self.device, self.dtype, memory_format=self.memory_format)
                latents.append(self.vae.encode(pixels).latent_dist.mean)
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
        config = self.vae.config
        return (torch.cat(latents).float() - (config.get("shift_factor") or 0.0)) * config.scaling_factor


def encode_latents(args, family, planned_caches, device, weight_dtype, part=0, parts=1):
    """Encodes the latents the PlannedCaches need and lack. With `parts` > 1 the processes of a machine share the
    work: each streams its own source shards and saves its masks as encoded.part-<part>.npy (see fold_parts).
    Latents are committed every --precompute_commit_seconds (written out first, then the masks replaced
    atomically), so an interrupted precompute loses at most that much work and the next run resumes it."""
    # channels-last convolutions encode 1.4x faster on CPU (measured); on GPUs only with --channels_last
    channels_last = getattr(args, "channels_last", False) or device.type == "cpu"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    caches = [LatentCache(p.path, p.needed, f".part-{part}" if parts > 1 else "") for p in planned_caches]
    if part == 0:
        for cache in caches:
            logger.info(
                f"Cache {cache.path.name}: {int(cache.encoded.sum())} pair latents present, {int(cache.todo.sum())} "
                f"to encode{f' by {parts} processes' if parts > 1 else ''}"
            )
    # The source is streamed shard by shard, reading only shards with pending pairs; decoding and resizing run in
    # loader workers (each its own shards), overlapping the VAE.
    to_decode = [
        PairsToDecode(p.source_pairs, np.flatnonzero(c.todo.any(axis=1))) for p, c in zip(planned_caches, caches)
    ]
    pixels = PairPixels(args, to_decode, part, parts)
    if pixels.num_pairs == 0:
        return
    vae_dtype = family.vae_dtype(args, weight_dtype)
    vae = family.load_vae(args, vae_dtype).to(device).eval().requires_grad_(False).to(memory_format=memory_format)
    encoder = VaeEncoder(vae, args.vae_encode_batch_size, device, vae_dtype, memory_format)
    # without --dataloader_num_workers: up to 4 decoders per process, sharing the machine's cores
    decoders = args.dataloader_num_workers or max(1, min(4, (os.cpu_count() or 1) // parts))
    loader = torch.utils.data.DataLoader(
        pixels, batch_size=max(1, args.vae_encode_batch_size // 2), num_workers=min(len(pixels.tasks), decoders)
    )
    started = last_commit = time.monotonic()
    n_images = 0
    progress = tqdm(total=pixels.num_pairs, desc="Encoding images", disable=not (part == 0))
    try:
        for cache in caches:
            cache.open()
        for batch in loader:
            progress.update(len(batch["index"]))
            group, index, ok = batch["group"].numpy(), batch["index"].numpy(), batch["ok"].numpy()
            for g, i in zip(group[~ok], index[~ok]):
                caches[g].undecodable[i] = True
            if not ok.any():
                continue
            group, index = group[ok], index[ok]
            wanted = torch.from_numpy(np.stack([caches[g].todo[i] for g, i in zip(group, index)]))
            images = batch["pixels"][torch.from_numpy(ok)][wanted]  # (n, 2, 3, H, W): the (pair, orientation)s wanted
            crops = batch["crops"][torch.from_numpy(ok)][wanted].numpy()
            latents = encoder(images.flatten(0, 1))
            latents = latents.view(*images.shape[:2], *latents.shape[1:]).cpu().to(torch.float16).numpy()
            n_images += 2 * len(latents)
            for latent, crop, (row, orientation) in zip(latents, crops, zip(*np.nonzero(wanted.numpy()))):
                checksum = zlib.crc32(crop.tobytes(), zlib.crc32(latent.tobytes()))
                caches[group[row]].store(index[row], orientation, pair_latents=latent, crops=crop, checksums=checksum)
            if time.monotonic() - last_commit > args.precompute_commit_seconds:
                for cache in caches:
                    cache.commit()
                last_commit = time.monotonic()
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise InputError(
            f"the disk of {cache_root(args)} is full ({format_bytes(shutil.disk_usage(cache_root(args)).free)} free) "
            "while encoding latents; what was encoded is kept: free some space and run again, or choose another "
            "folder with --precompute_cache_dir"
        ) from None
    finally:  # interrupted (Ctrl-C, SIGTERM) or failed: what was encoded is kept, and the next run goes on from there
        progress.close()
        for cache in caches:
            cache.commit()
            cache.close()
    seconds = time.monotonic() - started
    logger.info(
        f"Process {part} encoded {n_images} images of {len(pixels.tasks)} source shards in {seconds:.1f} s "
        f"({n_images / seconds:.1f} images/s)"
        + (f"; VAE batch {encoder.batch_size} after out-of-memory" if encoder.backed_off else ""),
        main_process_only=False,
    )
    del vae, encoder
    free_memory()


def fold_parts(cache_path):
    """Folds the masks that the processes of a machine saved for their parts into encoded.npy / undecodable.npy.
    A part is saved only after its latents reached the disk, so parts left by a killed run are folded in as well."""
    for name in MASK_ARRAYS:
        parts = sorted(cache_path.glob(f"{name}.part-*.npy"))
        if parts:
            save_atomically(
                cache_path / f"{name}.npy",
                np.logical_or.reduce([np.load(cache_path / f"{name}.npy"), *map(np.load, parts)]),
            )
            for part in parts:
                part.unlink()


def damaged_cache_file(file, reason):
    return InputError(
        f"the cache file {file} is damaged ({reason}); delete the folder {file.parent} and run again to rebuild it"
    )


def check_cache_files(cache_path):
    """Opens every array of an existing cache folder and checks that their shapes agree, so that a damaged file (a
    truncated copy, a disk that filled up) stops the run here, before any encoding or training, in one line."""
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
    n_pairs, n_orientations = arrays["encoded"].shape
    n_captions = len(arrays[caption_arrays[0]])
    leading_dims = {  # what each array's shape must start with
        "encoded": (n_pairs, n_orientations),
        "undecodable": (n_pairs,),
        "caption_index": (n_pairs,),
        "pair_latents": (n_pairs, n_orientations, 2),
        "crops": (n_pairs, n_orientations, 2, 6),
        "checksums": (n_pairs, n_orientations),
        **{name: (n_captions,) for name in caption_arrays},
    }
    for name, array in arrays.items():
        expected = leading_dims[name.split(".")[0]]
        if array.shape[: len(expected)] != expected:
            raise damaged_cache_file(cache_path / f"{name}.npy", f"shape {array.shape}, expected {expected} first")
    caption_index = np.asarray(arrays["caption_index"])
    if n_pairs and not 0 <= caption_index.min() <= caption_index.max() < n_captions:
        raise damaged_cache_file(cache_path / "caption_index.npy", f"rows outside the {n_captions} embeddings")
    check_contents(cache_path, arrays, info)


def check_contents(cache_path, arrays, info):
    """Checks the contents of some rows of every array against the checksums written with them: a file overwritten
    under an intact header (a bad copy, a disk fault) is named here, not blamed on the learning rate later."""
    for name in info["caption_arrays"]:
        for row, expected in zip(info["checked_rows"], info["caption_checksums"][name]):
            if zlib.crc32(np.ascontiguousarray(arrays[name][row])) != expected:
                raise damaged_cache_file(cache_path / f"{name}.npy", f"row {row} differs from its checksum")
    encoded = np.argwhere(np.asarray(arrays["encoded"]))
    sampled = np.unique(np.linspace(0, len(encoded) - 1, CHECKED_ROWS).astype(int)) if len(encoded) else []
    for index, orientation in encoded[sampled]:
        latent, crop = (np.ascontiguousarray(arrays[name][index, orientation]) for name in ("pair_latents", "crops"))
        if zlib.crc32(crop.tobytes(), zlib.crc32(latent.tobytes())) != arrays["checksums"][index, orientation]:
            raise damaged_cache_file(cache_path / "pair_latents.npy", f"pair {index} differs from its checksum")


def remove_leftover_partials(args, planned_caches):
    """Removes what killed runs left under temporary names: cache folders and their mask files are written only
    under the precompute lock, which this process holds."""
    leftovers = [p for p in cache_root(args).glob(".*.partial-*") if p.is_dir()]
    for planned in planned_caches:
        leftovers += planned.path.glob(".*.partial-*") if planned.path.is_dir() else []
    for leftover in leftovers:
        logger.info(f"Removing {leftover}, left by an interrupted run")
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def load_or_precompute(args, family, requests, accelerator, weight_dtype):
    """The CachedPreferencePairs of each CacheRequest in `requests`, precomputing what their caches lack.

    The local main process of each machine creates missing caches (text embeddings); then every process of the
    machine encodes its share of the missing latents (its own source shards, on its own GPU). A file lock makes runs
    that share a cache folder (other machines on a shared disk, other jobs) take turns instead of encoding twice;
    inside it only the machine's own processes synchronise, so machines never wait for each other under it.
    """
    planned_caches = [plan_cache(args, family, request, weight_dtype) for request in requests]
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    machine = None
    if accelerator.num_processes > 1:  # a process group of this machine's processes (every process takes part)
        machine, _ = torch.distributed.new_subgroups(group_size=per_machine)
    lock = FileLock(cache_root(args) / ".precompute.lock")
    try:
        with stop_together(machine):  # the machine's processes only: other machines may wait for the lock
            if accelerator.is_local_main_process:
                cache_root(args).mkdir(parents=True, exist_ok=True)
                try:
                    lock.acquire(timeout=0)
                except Timeout:  # another run holds it: say why nothing happens, then take turns as always
                    logger.info(
                        f"Waiting for the cache lock {lock.lock_file}: another run is precomputing into "
                        f"{cache_root(args)}",
                        main_process_only=False,
                    )
                    lock.acquire()
                remove_leftover_partials(args, planned_caches)
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
    return [CachedPreferencePairs(planned.path, planned.needed) for planned in planned_caches]


class CachedPreferencePairs(torch.utils.data.Dataset):
    """Reads precomputed pairs from the memory-mapped cache; keys are (pair index, orientation, drop caption). The
    pairs are those with every latent in `needed` encoded (None: any) and both images decodable."""

    def __init__(self, cache_path, needed=None):
        self.cache_path = Path(cache_path)
        self.caption_arrays = json.loads((self.cache_path / "cache_info.json").read_text())["caption_arrays"]
        self.encoded = np.load(self.cache_path / "encoded.npy")
        usable = ~np.load(self.cache_path / "undecodable.npy")
        usable &= self.encoded.any(axis=1) if needed is None else (self.encoded | ~needed).all(axis=1)
        self.valid_indices = np.flatnonzero(usable)
        self.num_pairs, self.num_orientations = self.encoded.shape
        self._arrays = None  # opened lazily, once per DataLoader worker

    def __len__(self):
        return len(self.valid_indices)

    def __getitem__(self, key):
        if self._arrays is None:
            names = ["caption_index", *LATENT_ARRAYS, *self.caption_arrays]
            self._arrays = {name: np.load(self.cache_path / f"{name}.npy", mmap_mode="r") for name in names}
        index, orientation, drop_caption = key
        if not self.encoded[index, orientation]:  # never read the zeros of a latent that was not encoded
            raise RuntimeError(f"pair {index} orientation {orientation} is not in the cache {self.cache_path}")
        caption_row = 0 if drop_caption else int(self._arrays["caption_index"][index])
        item = {name: np.array(self._arrays[name][index, orientation]) for name in ("pair_latents", "crops")}
        item.update({name: np.array(self._arrays[name][caption_row]) for name in self.caption_arrays})
        return {name: torch.from_numpy(value) for name, value in item.items()}


class PairSampler(torch.utils.data.Sampler):
    """Shuffles the pairs every epoch and draws each pair's flip and caption dropout from (seed, epoch) alone: with
    every data-side random choice here (not in workers or global RNG state), a resumed run reads the data in the
    same order as an uninterrupted one."""

    def __init__(self, cached, seed, proportion_empty_prompts):
        self.cached = cached
        self.seed = seed
        self.proportion_empty_prompts = proportion_empty_prompts
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.cached)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.cached))
        drop_caption = rng.random(len(order)) < self.proportion_empty_prompts
        orientations = drawn_orientations(self.cached.num_pairs, self.cached.num_orientations, self.seed, self.epoch)
        for position, pair in enumerate(order):
            index = int(self.cached.valid_indices[pair])
            yield index, int(orientations[index]), bool(drop_caption[position])


def steps_per_epoch(args, n_pairs, num_processes):
    """Optimizer steps in one epoch over `n_pairs` pairs, batched as accelerate's prepared loader batches them."""
    return math.ceil(math.ceil(n_pairs / args.train_batch_size / num_processes) / args.gradient_accumulation_steps)


def planned_epochs(args, n_pairs, num_processes):
    """Epochs a run over `n_pairs` (> 0) pairs covers (the count the training loop arrives at)."""
    if args.max_train_steps is None:
        return args.num_train_epochs
    return math.ceil(args.max_train_steps / steps_per_epoch(args, n_pairs, num_processes))


def precompute_pairs(args, family, accelerator, train_source, held_out_source, weight_dtype):
    """The cached training pairs and held-out pairs (None without held-out source pairs), precomputed as needed.
    Pairs with an undecodable image are skipped, which shortens the epochs; when the usable pairs then need more
    epochs than were planned for, the latents of the extra epochs are encoded too."""
    held_out_requests = [CacheRequest(held_out_source)] if held_out_source is not None else []
    epochs = planned_epochs(args, len(train_source), accelerator.num_processes)
    while True:
        requests = [CacheRequest(train_source, epochs), *held_out_requests]
        train_pairs, *held_out = load_or_precompute(args, family, requests, accelerator, weight_dtype)
        if len(train_pairs) == 0:
            raise InputError(f"no pair of dataset '{args.dataset_name}' has two decodable images")
        if planned_epochs(args, len(train_pairs), accelerator.num_processes) <= epochs:
            break
        epochs = planned_epochs(args, len(train_pairs), accelerator.num_processes)
    if len(train_pairs) < args.train_batch_size * accelerator.num_processes:
        raise InputError(
            f"--train_batch_size {args.train_batch_size} needs at least "
            f"{args.train_batch_size * accelerator.num_processes} usable pairs"
            f"{f' on {accelerator.num_processes} processes' if accelerator.num_processes > 1 else ''}; "
            f"the data has {len(train_pairs)}"
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
