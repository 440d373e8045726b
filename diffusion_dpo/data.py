"""Preference pairs: the dataset layouts the trainers read, streamed (never downloaded or copied), labels and captions
read once and kept, images decoded as a viewer shows them; ties, invalid labels and broken images are counted skips.

Names used throughout: source pairs (`PreferencePairs`: rows, captions, which image won) are `source_pairs`,
`train_source`, `held_out_source`; the pairs read back from their cache (`cache.CachedPreferencePairs`) are
`train_pairs`, `held_out_pairs`.
"""

import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from accelerate.logging import get_logger
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from diffusion_dpo import InputError
from diffusion_dpo.run import first_line, removed_on_failure


logger = get_logger(__name__)

DEFAULT_DATASET = "yuvalkirstain/pickapic_v2"
DATASET_ALTERNATIVES = (
    "the original yuvalkirstain/pickapic_v2 has been reported unavailable since 2025; community mirrors with the "
    "same columns exist (e.g. liuhuohuo2/pick-a-pic-v2; kashif/pickascore is a small subset), or pass a local "
    "folder or .parquet file in Pick-a-Pic format (yuvalkirstain/pickapic_v2_no_images holds metadata only and "
    "cannot be trained on)"
)
# Precompute streams the source shard by shard, spread over processes and loader workers: a split with fewer files
# than this is split into its parquet row groups instead (a split of many files is not: that costs a read per file).
MIN_SOURCE_SHARDS = 64
# The row layouts the trainer reads: each role's column names, the first one a dataset has wins (--<role>_column
# names others). Every layout reduces a row to a label (1: the first image won, 0: the second, 0.5: a tie, NaN:
# invalid) and a caption, so the rest of the trainer never sees the layout.
CAPTION, PROMPT = ("caption", "prompt", "txt"), ("prompt", "caption", "txt")
DATA_LAYOUTS = {
    "pickapic": {"image_0": ("jpg_0",), "image_1": ("jpg_1",), "label": ("label_0",), "caption": CAPTION},
    "chosen_rejected": {"image_0": ("chosen",), "image_1": ("rejected",), "caption": PROMPT},
    "votes": {
        "image_0": ("image1",),
        "image_1": ("image2",),
        "vote_0": ("votes_image1",),
        "vote_1": ("votes_image2",),
        "caption": PROMPT,
    },
}
ROLES = ("image_0", "image_1", "label", "vote_0", "vote_1", "caption")  # each read from --<role>_column if given
# an image folder: a local folder whose metadata file's rows name image files relative to it
IMAGE_FOLDER_METADATA = ("metadata.jsonl", "metadata.csv")
INVALID_ROWS = {  # what a NaN label means, per layout
    "pickapic": "pairs with labels outside {0, 0.5, 1}",
    "chosen_rejected": "invalid pairs",
    "votes": "pairs with missing, NaN or negative votes",
}


class DataLayout(NamedTuple):
    """How the rows of a dataset hold a pair: the layout's name, the column each role reads as (column, field), field
    None for a column itself or a field of a struct column (a webdataset sample's .json file), and for an image folder
    the folder its image paths are relative to."""

    name: str
    columns: dict
    image_folder: str | None = None
    min_vote_margin: float = 1

    @property
    def image_columns(self):
        return [self.columns["image_0"][0], self.columns["image_1"][0]]

    @property
    def source_columns(self):
        """The columns the labels and captions pass streams: all but the images."""
        return sorted({column for role, (column, _) in self.columns.items() if not role.startswith("image")})

    @property
    def cache_fields(self):
        """The layout as the cache keys hold it: two layouts of the same files never share a cache."""
        fields = {"layout": self.name, "columns": {role: list(column) for role, column in self.columns.items()}}
        return {**fields, "min_vote_margin": self.min_vote_margin} if self.name == "votes" else fields

    def images(self, row):
        """The first and second image of a row (a dict of its image columns) as decode_image reads them: an image
        folder's paths become {"path": file} (ValueError for a path that is missing or leaves the folder)."""
        values = [row[column] for column in self.image_columns]
        return values if self.image_folder is None else [image_in_folder(self.image_folder, v) for v in values]


def image_in_folder(folder, path):
    """An image folder's image as a datasets Image dict. Paths are relative to the folder: an absolute path or one
    with `..` is refused (its pair is skipped), so that a metadata file never reads outside its folder."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"no image path ({path!r})")
    if os.path.isabs(path) or ".." in Path(path.replace("\\", "/")).parts:
        raise ValueError(f"image path '{path}' leaves the dataset folder")
    return {"path": os.path.join(folder, path), "bytes": None}


def image_folder_metadata(name):
    """The metadata file of an image folder dataset, or None when `name` is not one."""
    if not os.path.isdir(name):
        return None
    found = [file for file in IMAGE_FOLDER_METADATA if os.path.isfile(os.path.join(name, file))]
    if len(found) > 1:
        raise InputError(f"image folder '{name}' holds both {' and '.join(found)}; keep one")
    return os.path.join(name, found[0]) if found else None


def image_folder_fingerprint(folder):
    """[files, hash of their names, sizes and modification times] of an image folder: its images are not in the
    data files that identify other datasets, and a replaced image must not reuse a cached latent."""
    digest, n_files = hashlib.sha256(), 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for file in sorted(files):
            with contextlib.suppress(OSError):  # vanished or unreadable: its pair is skipped when read
                stat = os.stat(os.path.join(root, file))
                digest.update(f"{os.path.relpath(os.path.join(root, file), folder)}\0{stat.st_size}\0".encode())
                digest.update(f"{stat.st_mtime_ns}\n".encode())
                n_files += 1
    return [n_files, digest.hexdigest()[:16]]


def readable_columns(stream):
    """Every name a layout's role can read in `stream`, {name: (column, field)}: a column answers to its name, and
    without its extension (a webdataset names columns after its sample files' extensions: 000001.jpg_0.jpg is
    column "jpg_0.jpg", read as jpg_0); a field of a struct column (a webdataset sample's .json) to its name and to
    "column.field"."""
    features = stream.features
    if features is None:  # csv and other sources that do not state their features: the first row's values
        features = {name: value for name, value in next(iter(stream), {}).items()}
    names = {column: (column, None) for column in features}
    for column, feature in features.items():
        if isinstance(feature, dict) and set(feature) != {"bytes", "path"}:  # a struct, not an image
            for field in feature:
                names.setdefault(f"{column}.{field}", (column, field))
                names.setdefault(field, (column, field))
    for column in features:
        names.setdefault(column.rsplit(".", 1)[0], (column, None))
    return names, list(features)


def layout_summary():
    return "; ".join(
        f"{name} ({', '.join(' or '.join(names) for names in roles.values())})" for name, roles in DATA_LAYOUTS.items()
    )


def data_layout(args, stream):
    """The layout of `stream`'s rows: --data_layout's, or (auto) the one layout whose columns the dataset has.
    Stops in one line naming the dataset's columns when no layout, or more than one, fits."""
    readable, present = readable_columns(stream)
    named = {role: getattr(args, f"{role}_column") for role in ROLES if getattr(args, f"{role}_column") is not None}
    candidates = list(DATA_LAYOUTS) if args.data_layout == "auto" else [args.data_layout]
    fits, partial = {}, {}
    for name in candidates:
        roles = DATA_LAYOUTS[name]
        unread = [f"--{role}_column" for role in named if role not in roles]
        if unread and args.data_layout != "auto":
            raise InputError(f"the {name} layout does not read {' and '.join(unread)}")
        if unread:  # a column flag this layout has no use for: the user means another layout
            continue
        columns, lacking = {}, []
        for role, defaults in roles.items():
            wanted = [named[role]] if role in named else defaults
            found = next((readable[column] for column in wanted if column in readable), None)
            if found is None:
                lacking.append(" or ".join(wanted))
            else:
                columns[role] = found
        if not lacking:
            fits[name] = columns
        elif "image_0" in columns or "image_1" in columns or args.data_layout != "auto":
            partial[name] = lacking
    flags = "/".join(f"--{role}_column" for role in ROLES)
    if not fits and partial:
        name, lacking = min(partial.items(), key=lambda item: len(item[1]))
        raise InputError(
            f"dataset '{args.dataset_name}' lacks column(s) {lacking} of the {name} layout (it has {present}); name "
            f"yours with {flags}"
        )
    if not fits:
        raise InputError(
            f"dataset '{args.dataset_name}' fits no layout (it has columns {present}); layouts accepted: "
            f"{layout_summary()}; name your columns with {flags}, or choose a layout with --data_layout"
        )
    if len(fits) > 1:
        raise InputError(
            f"dataset '{args.dataset_name}' has the columns of the {' and '.join(fits)} layouts; choose one with "
            "--data_layout"
        )
    ((name, columns),) = fits.items()
    if any(columns[role][1] is not None for role in ("image_0", "image_1")):
        raise InputError(f"dataset '{args.dataset_name}': the images must be columns, not fields of {columns}")
    metadata = image_folder_metadata(args.dataset_name)
    folder = os.path.abspath(args.dataset_name) if metadata else None
    return DataLayout(name, columns, folder, args.min_vote_margin)


def stream_split(args, split, columns=None):
    """`split` of --dataset_name as a datasets stream (nothing is downloaded up front; rows are read as they are
    iterated), and what identifies its data. With `columns`, parquet sources (Pick-a-Pic's among them) read only
    those columns' bytes: the captions and labels of 851k pairs without a JPEG."""
    name = args.dataset_name
    metadata = image_folder_metadata(name)
    if (os.path.isfile(name) or metadata) and split != args.dataset_split_name:
        raise InputError(
            f"'{name}' is {'an image folder' if metadata else 'a single file'}, so it has no split '{split}'; hold "
            "pairs out of it with --num_validation_pairs instead"
        )
    if metadata:  # an image folder: its metadata file is the split; images are read from their paths
        if len(Path(metadata).read_text(errors="replace").strip().splitlines()) < (
            2 if metadata.endswith("csv") else 1
        ):
            raise InputError(f"image folder '{name}': {Path(metadata).name} names no image pairs")
        location = dict(path="json" if metadata.endswith(".jsonl") else "csv", data_files={split: metadata})
    elif os.path.isfile(name):
        location = dict(path="parquet", data_files=name)
    else:
        location = dict(path=name, name=args.dataset_config_name)
    try:
        builder = datasets.load_dataset_builder(**location, cache_dir=args.cache_dir)
        if columns is not None and hasattr(builder.config, "columns"):
            builder = datasets.load_dataset_builder(**location, cache_dir=args.cache_dir, columns=columns)
        stream = builder.as_streaming_dataset(split=split)
        if stream.num_shards < MIN_SOURCE_SHARDS:  # few large files: their parquet row groups become the shards
            with contextlib.suppress(Exception):  # a file that cannot be read: keep whole files (it is skipped later)
                stream = stream.reshard()
    except Exception as error:  # the datasets library raises many types; all mean "cannot load this"
        note = "" if os.path.exists(name) else f". Note: {DATASET_ALTERNATIVES}"  # a Hub id may be a lost mirror
        raise InputError(
            f"cannot load dataset '{name}' split '{split}': {first_line(error).rstrip('.')}{note}"
        ) from None
    data_files = (getattr(builder.config, "data_files", None) or {}).get(split)
    identity = {
        "dataset": os.path.abspath(name) if os.path.exists(name) else name,
        "config": builder.config.name,
        "split": split,
        "shards": stream.num_shards,
    }
    if data_files is not None:  # Hub files are pinned to a commit, local ones carry their modification time
        identity.update(
            files=list(data_files),
            origin=[list(origin) for origin in data_files.origin_metadata],
            contents=[local_file_fingerprint(file) for file in data_files],
        )
    if columns is not None:
        stream = stream.select_columns(columns)
        for column in columns:  # images as raw bytes even in an Image column, so a broken file is a counted skip
            if stream.features is not None and isinstance(stream.features[column], datasets.Image):
                stream = stream.cast_column(column, datasets.Image(decode=False))
    return stream, identity


def local_file_fingerprint(file, tail_bytes=65536):
    """[size, hash of the last bytes] of a local file (None for a remote one): a file rewritten with other rows keeps
    its modification time when it is restored by a copy or sync, or rewritten within the clock's resolution, but
    not its footer (a parquet file's footer holds its row groups' offsets and statistics). Cheap for any size."""
    if not os.path.isfile(file):
        return None
    with contextlib.suppress(OSError), open(file, "rb") as handle:  # an unreadable file is skipped when read
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - tail_bytes))
        return [size, hashlib.sha256(handle.read()).hexdigest()[:16]]
    return None


def source_file(identity, shard):
    files = identity.get("files")
    return f"source file {files[shard]}" if files and len(files) == identity["shards"] else f"source shard {shard}"


def cache_root(args):
    return Path(
        args.precompute_cache_dir or os.path.join(args.cache_dir or datasets.config.HF_DATASETS_CACHE, "diffusion_dpo")
    )


def check_cache_root_writable(args):
    """Stops in one line when the cache folder cannot be created or written to (a path under a file, a read-only
    mount, no permission), before any data is read or model loaded."""
    root = cache_root(args)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as error:
        raise InputError(
            f"cannot write to the cache folder {root} ({error.strerror or error}); choose a writable one with "
            "--precompute_cache_dir"
        ) from None


def parse_label(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan  # an invalid label: counted and dropped


def layout_column(batch, column):
    """The values of a layout's (column, field) in an arrow batch."""
    name, field = column
    values = batch.column(name)
    return values if field is None else pc.struct_field(values, field)


def numbers(values):
    """Arrow values as float64, row by row: a value that is not a number (e.g. "left") becomes NaN."""
    try:
        return values.cast(pa.float64())
    except pa.ArrowException:  # not all numbers: parsed one by one
        return pa.array([parse_label(value) for value in values.to_pylist()], pa.float64())


def vote_labels(votes_0, votes_1, min_margin):
    """Labels from vote counts: 1 or 0 for the image with at least `min_margin` more votes, 0.5 (a tie) for closer
    pairs, NaN (invalid) where a count is missing, not a number, infinite or negative."""
    votes_0, votes_1 = (votes.to_numpy(zero_copy_only=False).astype(np.float64) for votes in (votes_0, votes_1))
    margin = votes_0 - votes_1
    labels = np.where(margin >= min_margin, 1.0, np.where(margin <= -min_margin, 0.0, 0.5))
    valid = np.isfinite(votes_0) & np.isfinite(votes_1) & (votes_0 >= 0) & (votes_1 >= 0)
    return pa.array(np.where(valid, labels, np.nan), pa.float64())


def parse_labels_and_captions(batch, layout):
    """A batch's labels as float64 and captions as strings, row by row, as `layout` reads them (see DATA_LAYOUTS): a
    label that is not a number (e.g. "left") becomes NaN, an invalid label; a missing caption (null, or a float NaN
    as pandas writes one) becomes null, which is trained as the empty caption."""
    captions = layout_column(batch, layout.columns["caption"])
    if layout.name == "pickapic":
        labels = numbers(layout_column(batch, layout.columns["label"]))
    elif layout.name == "votes":
        votes = [numbers(layout_column(batch, layout.columns[role])) for role in ("vote_0", "vote_1")]
        labels = vote_labels(*votes, layout.min_vote_margin)
    else:  # chosen_rejected: the first image, the chosen one, won
        labels = pa.array(np.ones(len(batch)), pa.float64())
    if pa.types.is_floating(captions.type):  # not "nan"
        captions = pc.if_else(pc.is_nan(captions), pa.scalar(None, captions.type), captions)
    return pa.table({"label": labels, "caption": captions.cast(pa.string())})


def read_labels_and_captions(path):
    """The labels and captions cache at `path`, or None when there is none or it is damaged (a truncated copy, a full
    disk): it is then read from the data again, and replaced."""
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
        json.loads(table.schema.metadata[b"shard_starts"])
        return table
    except Exception as error:  # pyarrow raises several types for a damaged file
        logger.warning(
            f"The labels and captions cache {path} is damaged ({type(error).__name__}); reading them again.",
            main_process_only=False,
        )
        return None


def shard_batches(stream, shard, batch_size, name):
    """The batches of one source shard, `name`d in messages. A file broken partway (a truncated tar or parquet file)
    keeps its intact rows: after a failed batch the shard is read again row by row, up to the first row that fails,
    and what is lost is logged; a broken file costs its broken rows, not the run."""
    shard_stream, read = stream.shard(stream.num_shards, shard, contiguous=True), 0
    try:
        for batch in shard_stream.iter(batch_size):
            yield batch
            read += len(batch) if isinstance(batch, pa.Table) else len(next(iter(batch.values())))
        return
    except Exception as error:  # datasets and its readers raise many types; all mean "cannot read on"
        failure = error
    rows = shard_stream.iter(1)
    for row in itertools.count():
        try:
            batch = next(rows)
        except StopIteration:
            break
        except Exception as error:
            failure = error
            break
        if row >= read:
            yield batch
    logger.warning(
        f"Skipping what follows row {row} of {name}: unreadable ({type(failure).__name__}: {first_line(failure)})",
        main_process_only=False,
    )


def labels_and_captions(args, split, identity, num_shards, layout):
    """Every row's label and caption, read shard by shard (so each shard's first row is known), and kept beside the
    latent caches: a later run, or another process of this one, starts without reading the data again."""
    key_fields = [identity, layout.cache_fields]
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_root(args) / f"pairs-{key}.parquet"
    table = read_labels_and_captions(path)
    if table is None:
        stream, _ = stream_split(args, split, layout.source_columns)
        schema = pa.schema([("label", pa.float64()), ("caption", pa.string())])

        def read_shard(shard):
            batches = shard_batches(stream.with_format("arrow"), shard, 10_000, source_file(identity, shard))
            return pa.concat_tables(
                [schema.empty_table()] + [parse_labels_and_captions(b, layout).cast(schema) for b in batches]
            )

        with ThreadPoolExecutor(max_workers=8) as pool:  # the shards' reads overlap (remote files: round trips)
            shards = list(
                tqdm(
                    pool.map(read_shard, range(num_shards)),
                    total=num_shards,
                    desc="Reading labels and captions",
                    disable=num_shards < 2,
                )
            )
        shard_starts = np.cumsum([0] + [len(shard) for shard in shards]).tolist()
        table = pa.concat_tables([schema.empty_table()] + shards).replace_schema_metadata(
            {"shard_starts": json.dumps(shard_starts)}
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        with removed_on_failure(path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")) as partial:
            pq.write_table(table, partial)
            os.replace(partial, path)
    shard_starts = np.asarray(json.loads(table.schema.metadata[b"shard_starts"]), dtype=np.int64)
    return table.column("label").to_numpy(zero_copy_only=False), table.column("caption").to_pylist(), shard_starts


class PreferencePairs:
    """The decided pairs of one split, or a subset of them: each pair's row in the split, caption and which image
    won, from one pass over the label and caption columns. Images stay in the source until precompute streams them.

    Names used throughout: these source pairs are `source_pairs` (`train_source`, `held_out_source`); the pairs
    read back from their cache, CachedPreferencePairs, are `cached` (`train_pairs`, `held_out_pairs`).
    """

    def __init__(self, identity, rows, captions, second_is_winner, shard_starts, layout):
        self.identity = identity  # what identifies the split's data (see stream_split)
        self.rows = rows
        self.captions = captions
        self.second_is_winner = second_is_winner  # label 0: the second image won (pairs are stored winner first)
        self.shard_starts = shard_starts  # the first row of each source shard (file), then the number of rows
        self.layout = layout  # which columns hold the images (DataLayout)

    def __len__(self):
        return len(self.rows)

    def subset(self, positions):
        positions = np.asarray(positions, dtype=np.int64)
        return PreferencePairs(
            self.identity,
            self.rows[positions],
            [self.captions[i] for i in positions],
            self.second_is_winner[positions],
            self.shard_starts,
            self.layout,
        )

    def sample(self, n, seed):
        """Positions of n pairs drawn at random from as few source shards as hold them (shards in a seeded random
        order): a subset of a large dataset then streams a fraction of its files, not all of them."""
        rng = np.random.default_rng(seed)
        shard_rank = np.argsort(rng.permutation(len(self.shard_starts) - 1))
        shard_of_pair = np.searchsorted(self.shard_starts, self.rows, side="right") - 1
        order = np.lexsort((rng.random(len(self)), shard_rank[shard_of_pair]))
        return np.sort(order[:n])

    @property
    def fingerprint(self):
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode())
        digest.update(self.rows.astype(np.int64).tobytes())
        return digest.hexdigest()[:20]


def load_preference_pairs(args, split):
    """The decided pairs of one split: ties and invalid labels dropped, images not read yet."""
    stream, identity = stream_split(args, split)
    layout = data_layout(args, stream)
    if layout.image_folder is not None:
        identity["images"] = image_folder_fingerprint(layout.image_folder)
    labels, captions, shard_starts = labels_and_captions(args, split, identity, stream.num_shards, layout)
    is_tie = labels == 0.5
    is_decided = (labels == 0.0) | (labels == 1.0)
    n_invalid = int((~is_tie & ~is_decided).sum())
    logger.info(
        f"Split '{split}' ({layout.name} layout): dropped {int(is_tie.sum())} tied pairs and {n_invalid} "
        f"{INVALID_ROWS[layout.name]}."
    )
    rows = np.flatnonzero(is_decided)
    if len(rows) == 0:
        raise InputError(
            f"dataset '{args.dataset_name}' split '{split}' has no preference pairs left after dropping "
            f"{int(is_tie.sum())} ties and {n_invalid} invalid labels"
        )
    return PreferencePairs(
        identity,
        rows,
        ["" if captions[r] is None else captions[r] for r in rows],
        labels[rows] == 0.0,
        shard_starts,
        layout,
    )


class PreferenceRow(NamedTuple):
    """A row of a dataset as read_preference_rows yields it."""

    row: int  # its position in the split (PreferencePairs.rows counts the same way)
    caption: str | None
    image_0: object  # the layout's first image (jpg_0, chosen, image1), as decode_image takes it; None: unreadable
    image_1: object  # the second (jpg_1, rejected, image2)
    label: float  # 1: the first image won, 0: the second, 0.5: a tie, NaN: an invalid label or votes


def read_preference_rows(args, split=None):
    """Every row of `split` (default --dataset_split_name) of --dataset_name as the trainer reads it, in any layout,
    streamed in order and nothing written: PreferenceRow(row, caption, image_0, image_1, label). Images are raw
    (encoded bytes, or a datasets Image dict {"bytes", "path"}, an image folder's files as {"path": file}): pass
    them to decode_image. `args`: the trainer's parse_args(...) result, of which the data flags are read."""
    split = split or args.dataset_split_name
    layout = data_layout(args, stream_split(args, split)[0])
    stream, _ = stream_split(args, split, sorted({column for column, _ in layout.columns.values()}))
    row = 0
    for batch in stream.with_format("arrow").iter(64):
        parsed = parse_labels_and_captions(batch, layout)
        images = [batch.column(column).to_pylist() for column in layout.image_columns]
        for caption, label, *pair in zip(
            parsed.column("caption").to_pylist(), parsed.column("label").to_pylist(), *images
        ):
            try:
                pair = layout.images(dict(zip(layout.image_columns, pair)))
            except ValueError:  # an image folder's row whose path is missing or leaves the folder
                pair = [None, None]
            yield PreferenceRow(row, caption, *pair, label)
            row += 1


def training_and_validation_pairs(args, accelerator):
    """The training pairs and the held-out pairs (None without --validation_split_name or --num_validation_pairs),
    from their own split or set aside from the training split. The machine's main process reads the labels and
    captions first (and keeps them); its other processes then read what it kept."""
    with accelerator.local_main_process_first():
        return split_pairs(args)


def split_pairs(args):
    check_cache_root_writable(args)
    train_source = load_preference_pairs(args, args.dataset_split_name)
    held_out_source = None
    if args.validation_split_name is not None:
        held_out_source = load_preference_pairs(args, args.validation_split_name)
        if args.num_validation_pairs:
            held_out_source = held_out_source.subset(held_out_source.sample(args.num_validation_pairs, args.seed))
    elif args.num_validation_pairs:
        if args.num_validation_pairs >= len(train_source):
            raise InputError(
                f"--num_validation_pairs {args.num_validation_pairs} leaves no training pairs "
                f"(the split has {len(train_source)})"
            )
        held_out = train_source.sample(args.num_validation_pairs, args.seed)
        held_out_source = train_source.subset(held_out)
        train_source = train_source.subset(np.setdiff1d(np.arange(len(train_source)), held_out))
    if args.max_train_samples is not None:
        train_source = train_source.subset(train_source.sample(args.max_train_samples, args.seed))
    logger.info(
        f"Training on {len(train_source)} preference pairs"
        + (f", validating on {len(held_out_source)} held-out pairs." if held_out_source is not None else ".")
    )
    return train_source, held_out_source


def decode_image(value):
    """Raw bytes, a datasets Image dict, or a PIL image -> RGB PIL image as an image viewer shows it (raises on
    undecodable data): turned as its EXIF orientation says, the first frame of an animation, 16-bit and float images
    scaled to 8 bit (float images in [0, 1] taken as 0..1, others as 0..255), transparency composited on white."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()
    image = value if isinstance(value, Image.Image) else Image.open(io.BytesIO(value))
    image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # convert("RGB") would clip these, not scale them
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if image.mode == "F":
            scale = 255.0 if pixels.max() <= 1.0 else 1.0
        elif image.mode == "I" and pixels.max() <= 255:
            scale = 1.0
        else:
            scale = 255.0 / 65535.0
        image = Image.fromarray(np.clip(np.round(pixels * scale), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")  # also forces the full decode, so truncated files fail here


def resize_and_crop(image, resolution, crop_rng):
    """Resizes the short side to `resolution` and crops a square (centred, or where crop_rng says). Returns the crop
    and where it was taken, (top, left, width of the resized image), which SDXL is conditioned on."""
    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.BILINEAR)
    if crop_rng is None:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left = int(crop_rng.integers(0, width - resolution + 1))
        top = int(crop_rng.integers(0, height - resolution + 1))
    return image.crop((left, top, left + resolution, top + resolution)), (top, left, width)
