"""Preference pairs (docs/data.md): the dataset layouts the trainers read, streamed, never copied; labels and captions
read once and kept; images decoded as a viewer shows them. Ties, invalid labels and broken images are counted skips."""

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
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
MIN_SOURCE_SHARDS = 64  # fewer files, spread over processes and loader workers: their parquet row groups are shards
# Each role's column names, the first a dataset has wins; a row becomes a label (1: the first image won) and a caption.
CAPTION, PROMPT = ("caption", "prompt", "txt"), ("prompt", "caption", "txt")
JPG = {"image_0": ("jpg_0",), "image_1": ("jpg_1",)}
DATA_LAYOUTS = {
    "pickapic": {**JPG, "label": ("label_0",), "caption": CAPTION},
    "chosen_rejected": {"image_0": ("chosen",), "image_1": ("rejected",), "caption": PROMPT},
    "votes": {
        "image_0": ("image1",),
        "image_1": ("image2",),
        "vote_0": ("votes_image1",),
        "vote_1": ("votes_image2",),
        "caption": PROMPT,
    },
    # examples/label_pairs_with_reward_model.py's reward scores: a label from their difference; never chosen by auto
    "scores": {**JPG, "score_0": ("score_0",), "score_1": ("score_1",), "caption": CAPTION},
}
ROLES = ("image_0", "image_1", "label", "vote_0", "vote_1", "caption")  # each read from --<role>_column if given
IMAGE_FOLDER_METADATA = ("metadata.jsonl", "metadata.csv")  # its rows name image files relative to the folder
INVALID_ROWS = {  # what a NaN label means, per layout
    "pickapic": "pairs with labels outside {0, 0.5, 1}",
    "chosen_rejected": "invalid pairs",
    "votes": "pairs with missing, NaN or negative votes",
    "scores": "pairs with missing or NaN scores",
}


class DataLayout(NamedTuple):
    """How rows hold a pair: each role's (column, field) (None: the column itself; else a struct's, e.g. a .json's)."""

    name: str
    columns: dict
    image_folder: str | None = None
    min_vote_margin: float = 1
    soft_labels: float | None = None  # --soft_labels: the label is p (the temperature of scores); None: 1/0/0.5

    @property
    def image_columns(self):
        return [self.columns["image_0"][0], self.columns["image_1"][0]]

    @property
    def cache_fields(self):
        """The layout as the cache keys hold it: two layouts of the same files never share a cache."""
        fields = {"layout": self.name, "columns": {role: list(column) for role, column in self.columns.items()}}
        return {**fields, "min_vote_margin": self.min_vote_margin} if self.name == "votes" else fields

    def images(self, row):
        """A row's two images for decode_image; an image folder's path missing or leaving it is a ValueError (skip)."""
        values = [row[column] for column in self.image_columns]
        if self.image_folder is None:
            return values
        for path in values:
            if not isinstance(path, str) or not path:
                raise ValueError(f"no image path ({path!r})")
            if os.path.isabs(path) or ".." in Path(path.replace("\\", "/")).parts:
                raise ValueError(f"image path '{path}' leaves the dataset folder")
        return [{"path": os.path.join(self.image_folder, path), "bytes": None} for path in values]


def image_folder_metadata(name):
    """The metadata file of an image folder dataset, or None when `name` is not one."""
    found = [file for file in IMAGE_FOLDER_METADATA if os.path.isfile(os.path.join(name, file))]
    if len(found) > 1:
        raise InputError(f"image folder '{name}' holds both {' and '.join(found)}; keep one")
    return os.path.join(name, found[0]) if found else None


def image_folder_fingerprint(folder):
    """[files, hash of their names, sizes and modification times]: a replaced image must not reuse a cached latent."""
    digest, n_files = hashlib.sha256(), 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for file in sorted(files):
            with contextlib.suppress(OSError):  # vanished or unreadable: its pair is skipped when read
                path = os.path.join(root, file)
                stat = os.stat(path)
                digest.update(f"{os.path.relpath(path, folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
                n_files += 1
    return [n_files, digest.hexdigest()[:16]]


def readable_columns(stream):
    """({name a role can read: (column, field)}, columns): webdataset names without extension and struct fields too."""
    features = stream.features or dict(next(iter(stream), {}))  # not stated (csv...): the first row's values
    names = {column: (column, None) for column in features}
    for column, feature in features.items():
        if isinstance(feature, dict) and set(feature) != {"bytes", "path"}:  # a struct, not an image
            for field in feature:
                names.setdefault(f"{column}.{field}", (column, field))
                names.setdefault(field, (column, field))
    for column in features:
        names.setdefault(column.rsplit(".", 1)[0], (column, None))
    return names, list(features)


def data_layout(args, stream):
    """The layout of `stream`'s rows: --data_layout's, or (auto) the one layout whose columns the dataset has."""
    readable, present = readable_columns(stream)
    named = {role: getattr(args, f"{role}_column") for role in ROLES if getattr(args, f"{role}_column") is not None}
    fits, partial = {}, {}
    automatic = [name for name in DATA_LAYOUTS if name != "scores"]  # scores' files are pickapic's too
    for name in automatic if args.data_layout == "auto" else [args.data_layout]:
        unread = [f"--{role}_column" for role in named if role not in DATA_LAYOUTS[name]]
        if unread and args.data_layout != "auto":
            raise InputError(f"the {name} layout does not read {' and '.join(unread)}")
        if unread:  # a column flag this layout has no use for: the user means another layout
            continue
        wanted = {role: [named[role]] if role in named else names for role, names in DATA_LAYOUTS[name].items()}
        columns = {role: next((readable[c] for c in names if c in readable), None) for role, names in wanted.items()}
        lacking = [" or ".join(wanted[role]) for role, column in columns.items() if column is None]
        if not lacking:
            fits[name] = columns
        elif columns["image_0"] or columns["image_1"] or args.data_layout != "auto":
            partial[name] = lacking
    flags = "/".join(f"--{role}_column" for role in ROLES)
    if not fits and partial:
        name, lacking = min(partial.items(), key=lambda item: len(item[1]))
        raise InputError(
            f"dataset '{args.dataset_name}' lacks column(s) {lacking} of the {name} layout (it has {present}); name "
            f"yours with {flags}"
        )
    if not fits:
        accepted = "; ".join(
            f"{name} ({', '.join(map(' or '.join, roles.values()))})" for name, roles in DATA_LAYOUTS.items()
        )
        raise InputError(
            f"dataset '{args.dataset_name}' fits no layout (it has columns {present}); layouts accepted: {accepted}; "
            f"name your columns with {flags}, or choose a layout with --data_layout"
        )
    if len(fits) > 1:
        raise InputError(
            f"dataset '{args.dataset_name}' has the columns of the {' and '.join(fits)} layouts; choose one with "
            "--data_layout"
        )
    ((name, columns),) = fits.items()
    if any(columns[role][1] is not None for role in ("image_0", "image_1")):
        raise InputError(f"dataset '{args.dataset_name}': the images must be columns, not fields of {columns}")
    folder = os.path.abspath(args.dataset_name) if image_folder_metadata(args.dataset_name) else None
    soft_labels = args.soft_label_temperature if args.soft_labels else None
    return DataLayout(name, columns, folder, args.min_vote_margin, soft_labels)


def stream_split(args, split, columns=None):
    """`split` as a datasets stream and what identifies its data; with `columns`, parquet reads only their bytes."""
    name = args.dataset_name
    metadata = image_folder_metadata(name)
    if (os.path.isfile(name) or metadata) and split != args.dataset_split_name:
        raise InputError(
            f"'{name}' is {'an image folder' if metadata else 'a single file'}, so it has no split '{split}'; hold "
            "pairs out of it with --num_validation_pairs instead"
        )
    if metadata:  # an image folder: its metadata file is the split; images are read from their paths
        lines = Path(metadata).read_text(errors="replace").strip().splitlines()
        if len(lines) < (2 if metadata.endswith("csv") else 1):
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
    identity = {"dataset": os.path.abspath(name) if os.path.exists(name) else name, "config": builder.config.name}
    identity.update(split=split, shards=stream.num_shards)
    data_files = (getattr(builder.config, "data_files", None) or {}).get(split)
    if data_files is not None:  # Hub files are pinned to a commit, local ones carry their modification time
        identity.update(files=list(data_files), origin=[list(origin) for origin in data_files.origin_metadata])
        identity.update(contents=[local_file_fingerprint(file) for file in data_files])
    if columns is not None:
        stream = stream.select_columns(columns)
        for column in columns:  # images as raw bytes even in an Image column, so a broken file is a counted skip
            if stream.features is not None and isinstance(stream.features[column], datasets.Image):
                stream = stream.cast_column(column, datasets.Image(decode=False))
    return stream, identity


def local_file_fingerprint(file, tail_bytes=65536):
    """[size, hash of the tail] of a local file: a rewritten one may keep its modification time, not its footer."""
    with contextlib.suppress(OSError), open(file, "rb") as handle:  # None: remote, or unreadable (skipped when read)
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - tail_bytes))
        return [size, hashlib.sha256(handle.read()).hexdigest()[:16]]


def source_file(identity, shard):
    files = identity.get("files")
    return f"source file {files[shard]}" if files and len(files) == identity["shards"] else f"source shard {shard}"


def cache_root(args):
    default = os.path.join(args.cache_dir or datasets.config.HF_DATASETS_CACHE, "diffusion_dpo")
    return Path(args.precompute_cache_dir or default)


def parse_label(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan  # an invalid label: counted and dropped


def layout_column(batch, column):
    """The values of a layout's (column, field) in an arrow batch."""
    name, field = column
    return batch.column(name) if field is None else pc.struct_field(batch.column(name), field)


def numbers(values):
    """Arrow values as float64, row by row: a value that is not a number (e.g. "left") becomes NaN."""
    try:
        return values.cast(pa.float64())
    except pa.ArrowException:  # not all numbers: parsed one by one
        return pa.array([parse_label(value) for value in values.to_pylist()], pa.float64())


def parse_labels_and_captions(batch, layout):
    """A batch's labels and captions (null, or a float NaN as pandas writes one: no caption) as `layout` reads them."""
    captions = layout_column(batch, layout.columns["caption"])
    if layout.name == "pickapic":
        labels = numbers(layout_column(batch, layout.columns["label"]))
    elif layout.name == "votes":  # 1 or 0 for at least --min_vote_margin more votes, closer a tie, bad counts NaN
        votes_0, votes_1 = (np.asarray(numbers(layout_column(batch, layout.columns[r]))) for r in ("vote_0", "vote_1"))
        margin, min_margin = votes_0 - votes_1, layout.min_vote_margin
        labels = np.where(margin >= min_margin, 1.0, np.where(margin <= -min_margin, 0.0, 0.5))
        if layout.soft_labels is not None:  # p with a Laplace prior (one more vote each): 2:0 gives 0.75, 0:0 0.5
            labels = (votes_0 + 1) / (votes_0 + votes_1 + 2)
        valid = np.isfinite(votes_0) & np.isfinite(votes_1) & (votes_0 >= 0) & (votes_1 >= 0)
        labels = pa.array(np.where(valid, labels, np.nan), pa.float64())
    elif layout.name == "scores":  # p = sigmoid((score_0 - score_1) / tau); hard: the higher score won, equal a tie
        s_0, s_1 = (np.asarray(numbers(layout_column(batch, layout.columns[r]))) for r in ("score_0", "score_1"))
        tau, difference = layout.soft_labels, s_0 - s_1
        labels = np.sign(difference) / 2 + 0.5 if tau is None else np.exp(-np.logaddexp(0, -difference / tau))
        labels = pa.array(labels, pa.float64())
    else:  # chosen_rejected: the first image, the chosen one, won
        labels = pa.array(np.ones(len(batch)), pa.float64())
    if pa.types.is_floating(captions.type):  # not "nan"
        captions = pc.if_else(pc.is_nan(captions), pa.scalar(None, captions.type), captions)
    return pa.table({"label": labels, "caption": captions.cast(pa.string())})


def shard_batches(stream, shard, batch_size, name):
    """The batches of one source shard; a file broken partway (truncated) keeps its rows up to the first that fails."""
    shard_stream, read = stream.shard(stream.num_shards, shard, contiguous=True), 0
    try:
        for batch in shard_stream.iter(batch_size):
            yield batch
            read += len(batch) if isinstance(batch, pa.Table) else len(next(iter(batch.values())))
        return
    except Exception as error:  # datasets and its readers raise many types; all mean "cannot read on"
        failure = error
    row = 0
    try:
        for batch in shard_stream.iter(1):
            if row >= read:
                yield batch
            row += 1
    except Exception as error:
        failure = error
    logger.warning(
        f"Skipping what follows row {row} of {name}: unreadable ({type(failure).__name__}: {first_line(failure)})",
        main_process_only=False,
    )


@dataclasses.dataclass(eq=False)
class PreferencePairs:
    """The decided pairs of a split, or a subset: their rows, captions and winners (images stay in the source)."""

    identity: dict  # what identifies the split's data (see stream_split)
    rows: np.ndarray
    captions: list
    second_is_winner: np.ndarray  # label 0: the second image won (pairs are stored winner first)
    shard_starts: np.ndarray  # the first row of each source shard (file), then the number of rows
    layout: DataLayout
    preference: np.ndarray | None = None  # --soft_labels: p, the probability that the stored-first image is preferred

    def __len__(self):
        return len(self.rows)

    def subset(self, positions):
        positions = np.asarray(positions, dtype=np.int64)
        fields = {"rows": self.rows, "second_is_winner": self.second_is_winner, "preference": self.preference}
        picked = {name: None if value is None else value[positions] for name, value in fields.items()}
        return dataclasses.replace(self, captions=[self.captions[i] for i in positions], **picked)

    def sample(self, n, seed):
        """Positions of n random pairs from as few source shards as hold them: a subset streams a part of the files."""
        rng = np.random.default_rng(seed)
        shard_rank = np.argsort(rng.permutation(len(self.shard_starts) - 1))
        shard_of_pair = np.searchsorted(self.shard_starts, self.rows, side="right") - 1
        return np.sort(np.lexsort((rng.random(len(self)), shard_rank[shard_of_pair]))[:n])

    @property
    def fingerprint(self):
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode())
        digest.update(self.rows.astype(np.int64).tobytes())
        return digest.hexdigest()[:20]


def load_preference_pairs(args, split):
    """The decided pairs of one split, images not read yet: every row's label and caption is read once (shard by
    shard, so each shard's first row is known) and kept, ties and invalid labels dropped and counted."""
    stream, identity = stream_split(args, split)
    layout = data_layout(args, stream)
    if layout.image_folder is not None:
        identity["images"] = image_folder_fingerprint(layout.image_folder)
    soft = [] if layout.soft_labels is None else [layout.soft_labels]  # the votes' and scores' labels are p
    key = hashlib.sha256(json.dumps([identity, layout.cache_fields, *soft], sort_keys=True).encode()).hexdigest()[:20]
    path = cache_root(args) / f"pairs-{key}.parquet"
    shard_starts = None
    if path.exists():
        try:
            table = pq.read_table(path)
            shard_starts = json.loads(table.schema.metadata[b"shard_starts"])
        except Exception as error:  # pyarrow raises several types for a damaged file (a truncated copy, a full disk)
            logger.warning(
                f"The labels and captions cache {path} is damaged ({type(error).__name__}); reading them again.",
                main_process_only=False,
            )
    if shard_starts is None:
        columns = sorted({column for role, (column, _) in layout.columns.items() if not role.startswith("image")})
        labels_stream = stream_split(args, split, columns)[0].with_format("arrow")
        schema = pa.schema([("label", pa.float64()), ("caption", pa.string())])
        n_shards = stream.num_shards

        def read_shard(shard):
            batches = shard_batches(labels_stream, shard, 10_000, source_file(identity, shard))
            return pa.concat_tables([schema.empty_table(), *(parse_labels_and_captions(b, layout) for b in batches)])

        with ThreadPoolExecutor(max_workers=8) as pool:  # the shards' reads overlap (remote files: round trips)
            shards = pool.map(read_shard, range(n_shards))
            shards = list(tqdm(shards, "Reading labels and captions", n_shards, disable=n_shards < 2))
        shard_starts = np.cumsum([0] + [len(shard) for shard in shards]).tolist()
        table = pa.concat_tables([schema.empty_table(), *shards])
        table = table.replace_schema_metadata({"shard_starts": json.dumps(shard_starts)})
        path.parent.mkdir(parents=True, exist_ok=True)
        with removed_on_failure(path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")) as partial:
            pq.write_table(table, partial)
            os.replace(partial, path)
    labels, captions = table.column("label").to_numpy(zero_copy_only=False), table.column("caption").to_pylist()
    # --soft_labels keeps every pair with a p in [0, 1], ties (p = 0.5) too
    n_ties = 0 if soft else int((labels == 0.5).sum())
    rows = np.flatnonzero((labels >= 0) & (labels <= 1) if soft else (labels == 0.0) | (labels == 1.0))
    n_invalid = len(labels) - n_ties - len(rows)
    invalid = "pairs with no preference probability in [0, 1]" if soft else INVALID_ROWS[layout.name]
    dropped = f"{n_ties} tied pairs and {n_invalid} {invalid}"
    logger.info(f"Split '{split}' ({layout.name} layout): dropped {dropped}.")
    if len(rows) == 0:
        raise InputError(
            f"dataset '{args.dataset_name}' split '{split}' has no preference pairs left after dropping "
            f"{n_ties} ties and {n_invalid} invalid labels"
        )
    captions = ["" if captions[row] is None else captions[row] for row in rows]
    shard_starts = np.asarray(shard_starts, dtype=np.int64)
    preference = np.maximum(labels[rows], 1 - labels[rows]).astype(np.float32) if soft else None  # p of the first
    return PreferencePairs(identity, rows, captions, labels[rows] < 0.5, shard_starts, layout, preference)


class PreferenceRow(NamedTuple):
    """A row of a dataset as read_preference_rows yields it."""

    row: int  # its position in the split (PreferencePairs.rows counts the same way)
    caption: str | None
    image_0: object  # the layout's first image (jpg_0, chosen, image1), as decode_image takes it; None: unreadable
    image_1: object  # the second (jpg_1, rejected, image2)
    label: float  # 1: the first image won, 0: the second, 0.5: a tie, NaN: an invalid label or votes


def read_preference_rows(args, split=None):
    """Every row of `split` as a trainer (`args`: its parse_args result) reads it, images raw, for decode_image."""
    split = split or args.dataset_split_name
    layout = data_layout(args, stream_split(args, split)[0])
    stream, _ = stream_split(args, split, sorted({column for column, _ in layout.columns.values()}))
    rows = itertools.count()
    for batch in stream.with_format("arrow").iter(64):
        parsed = parse_labels_and_captions(batch, layout)
        images = [batch.column(column).to_pylist() for column in layout.image_columns]
        for caption, label, *pair in zip(parsed["caption"].to_pylist(), parsed["label"].to_pylist(), *images):
            try:
                pair = layout.images(dict(zip(layout.image_columns, pair)))
            except ValueError:  # an image folder's row whose path is missing or leaves the folder
                pair = [None, None]
            yield PreferenceRow(next(rows), caption, *pair, label)


def training_and_validation_pairs(args, accelerator):
    """The training and held-out source pairs (None: none), the labels and captions read first by the main process."""
    root = cache_root(args)
    try:  # a path under a file, a read-only mount, no permission: one line before any data is read or model loaded
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as error:
        raise InputError(
            f"cannot write to the cache folder {root} ({error.strerror or error}); choose a writable one with "
            "--precompute_cache_dir"
        ) from None
    with accelerator.local_main_process_first():
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
    held_out = f", validating on {len(held_out_source)} held-out pairs" if held_out_source is not None else ""
    logger.info(f"Training on {len(train_source)} preference pairs{held_out}.")
    return train_source, held_out_source


def decode_image(value):
    """Raw bytes, a datasets Image dict or a PIL image as an image viewer shows it, in RGB (raises if undecodable)."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()
    image = value if isinstance(value, Image.Image) else Image.open(io.BytesIO(value))
    image.seek(0)  # an animation's first frame
    image = ImageOps.exif_transpose(image)
    # 16-bit and float images scaled to 8 bit (float ones in [0, 1] as 0..1), which convert("RGB") would clip
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if image.mode == "F":
            scale = 255.0 if pixels.max() <= 1.0 else 1.0
        else:
            scale = 1.0 if image.mode == "I" and pixels.max() <= 255 else 255.0 / 65535.0
        image = Image.fromarray(np.clip(np.round(pixels * scale), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:  # composited on white
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")  # also forces the full decode, so truncated files fail here


def resize_and_crop(image, resolution, crop_rng):
    """A square crop (centred, or where crop_rng says) of the image resized, and (top, left, resized width)."""
    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.BILINEAR)
    if crop_rng is None:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left = int(crop_rng.integers(0, width - resolution + 1))
        top = int(crop_rng.integers(0, height - resolution + 1))
    return image.crop((left, top, left + resolution, top + resolution)), (top, left, width)
