#!/usr/bin/env python
# Copyright 2026 The Diffusion-DPO toolkit authors. Licensed under the Apache License, Version 2.0.
"""AI feedback: preference pairs labelled by a reward model, written as a Pick-a-Pic-format parquet dataset.

Diffusion-DPO (Wallace et al. 2023, section 5.3) also learns from AI feedback: pairs whose preference comes from a
reward model (PickScore, HPSv2, CLIP score, the LAION aesthetic predictor, ImageReward) instead of people. Two
sources of pairs:

- `--dataset_name`: the pairs of a dataset in any layout the trainers read (Pick-a-Pic, chosen/rejected, votes,
  image folders, webdataset tars; docs/data.md), relabelled. `--ignore_existing_labels` reads only its images and
  captions, for pairs without a usable label (or an order to be judged afresh).
- `--prompts_file` / `--prompts_dataset`: nothing but prompts. `--images_per_prompt` images of each are generated
  with `--base_model` (seeds from (--seed, prompt index, image index)), scored, and the best is paired with the
  worst (or, `--pairing all`, every two of them). The same seeds draw the same images for any `--batch_size` up to
  float rounding: batched matrix products are not bitwise the same at every batch size on every CPU or GPU, so
  pixels may differ by a level or two and scores in their last digits, and a label only where two images' scores
  are about that close.

Output: OUTPUT_DIR/SPLIT-00000.parquet, SPLIT-00001.parquet, ... with columns caption, jpg_0, jpg_1 (encoded image
bytes: a dataset's as they came, generated images as PNG), label_0 (1: jpg_0 preferred, 0: jpg_1), score_0,
score_1, and where each pair came from. Pairs whose score margin is below --min_margin are dropped (and counted).
Each shard is written atomically once it holds --pairs_per_shard pairs; a rerun with the same flags continues after
the last shard written. The counts and settings are in OUTPUT_DIR/ai_feedback.json. Every trainer script
trains on OUTPUT_DIR as it is.

    python examples/label_pairs_with_reward_model.py --dataset_name yuvalkirstain/pickapic_v2 --scorer pickscore \
        --min_margin 0.5 --output_dir pickapic-pickscore --mixed_precision fp16
    python examples/label_pairs_with_reward_model.py --prompts_file prompts.txt \
        --base_model stable-diffusion-v1-5/stable-diffusion-v1-5 --images_per_prompt 4 --scorer pickscore \
        --output_dir sd15-pickscore-pairs --mixed_precision fp16
"""

import io
import itertools
import json
import os
import sys
import uuid
from collections import Counter
from pathlib import Path

import repo_paths  # noqa: F401  (puts the trainer scripts on sys.path)
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from evaluate_dpo import free_memory, load_pipeline, load_prompts
from filelock import FileLock, Timeout
from reward_models import SCORERS, add_scorer_model_arguments, check_scorer_available, load_scorer, score_images
from tqdm.auto import tqdm

import train_diffusion_dpo
from diffusion_dpo import InputError
from diffusion_dpo.args import OneLineErrorParser
from diffusion_dpo.data import DATA_LAYOUTS, decode_image, read_preference_rows, readable_columns, stream_split


SUMMARY_NAME = "ai_feedback.json"  # matches no split name, so datasets does not read it as data
LOCK_NAME = ".ai-feedback.lock"
SHARD_METADATA_KEY = b"ai_feedback"
# the trainers' data flags that this script passes on to read_preference_rows (see docs/data.md)
LAYOUT_FLAGS = ("data_layout", "image_0_column", "image_1_column", "caption_column")
LABEL_FLAGS = ("label_column", "vote_0_column", "vote_1_column", "min_vote_margin")
# which weights a scorer loads: part of the settings a resumed run must share
SCORER_MODEL_FLAGS = {
    "pickscore": ("pickscore_model", "pickscore_processor"),
    "clip": ("clip_model",),
    "hpsv2": ("hpsv2_version",),
    "aesthetic": ("aesthetic_model",),
    "image_reward": (),
}
COMMON_COLUMNS = [
    ("caption", pa.string()),
    ("jpg_0", pa.binary()),
    ("jpg_1", pa.binary()),
    ("label_0", pa.float64()),
    ("score_0", pa.float64()),
    ("score_1", pa.float64()),
]
DATASET_SCHEMA = pa.schema(COMMON_COLUMNS + [("source_row", pa.int64()), ("source_label_0", pa.float64())])
PROMPTS_SCHEMA = pa.schema(
    COMMON_COLUMNS
    + [
        ("prompt_index", pa.int64()),
        ("image_index_0", pa.int64()),
        ("image_index_1", pa.int64()),
        ("seed_0", pa.int64()),
        ("seed_1", pa.int64()),
    ]
)


# ----------------------------------------------------------------------------------------------------------------
# 1. Arguments
# ----------------------------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    source = parser.add_argument_group("source of pairs (one)").add_mutually_exclusive_group()
    source.add_argument(
        "--dataset_name",
        help="Relabel the pairs of this dataset: Hub id, local folder, .parquet file or image folder, in any layout "
        "the trainers read (docs/data.md).",
    )
    source.add_argument("--prompts_file", help="Make pairs from these prompts: a text file, one prompt per line.")
    source.add_argument("--prompts_dataset", help="Make pairs from the prompts of a dataset (--prompts_column).")

    data = parser.add_argument_group("--dataset_name: as the trainers read it")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--dataset_split_name", default="train")
    data.add_argument("--cache_dir", default=None, help="Where Hub files are downloaded.")
    data.add_argument("--data_layout", default="auto", choices=["auto", *DATA_LAYOUTS])
    for flag in ("image_0_column", "image_1_column", "caption_column", "label_column"):
        data.add_argument(f"--{flag}", default=None)
    data.add_argument("--vote_0_column", default=None)
    data.add_argument("--vote_1_column", default=None)
    data.add_argument("--min_vote_margin", type=float, default=1)
    data.add_argument(
        "--ignore_existing_labels",
        action="store_true",
        help="Read only the two images and the caption of each row (--data_layout and the label and vote flags "
        "are not used): for pairs without a usable label, e.g. Pick-a-Pic-format rows without label_0, or "
        "chosen/rejected pairs in no particular order. Without it, the dataset's label is kept as source_label_0 "
        "and its agreement with the reward model is counted. Either way the reward model labels every pair.",
    )

    prompts = parser.add_argument_group("--prompts_file / --prompts_dataset: pairs generated by a base model")
    prompts.add_argument("--prompts_split", default="train", help="Split of --prompts_dataset.")
    prompts.add_argument("--prompts_column", default="caption", help="Column of --prompts_dataset with the prompts.")
    prompts.add_argument("--num_prompts", type=int, default=None, help="Use the first N prompts (default: all).")
    prompts.add_argument("--base_model", default=None, help="Hub id or local folder of a text-to-image pipeline.")
    prompts.add_argument("--revision", default=None, help="Revision of --base_model.")
    prompts.add_argument("--variant", default=None, help="Weight variant of --base_model, e.g. 'fp16'.")
    prompts.add_argument("--images_per_prompt", type=int, default=4)
    prompts.add_argument(
        "--pairing",
        default="best_worst",
        choices=["best_worst", "all"],
        help="best_worst: one pair per prompt, its best image against its worst; all: every two images of a "
        "prompt whose margin reaches --min_margin.",
    )
    prompts.add_argument("--seed", type=int, default=0, help="Image j of prompt i is drawn from (seed, i, j).")
    prompts.add_argument("--num_inference_steps", type=int, default=30)
    prompts.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's own.")
    prompts.add_argument("--resolution", type=int, default=None, help="Square side in pixels (default: the model's).")

    scoring = parser.add_argument_group("reward model")
    scoring.add_argument("--scorer", default="pickscore", choices=SCORERS, help="The reward model that labels.")
    add_scorer_model_arguments(scoring)
    scoring.add_argument(
        "--min_margin",
        type=float,
        default=0.0,
        help="Drop pairs whose two scores differ by less than this (in the scorer's units; PickScore and CLIP "
        "score are 100 x cosine). Exact ties are always dropped.",
    )
    scoring.add_argument("--batch_size", type=int, default=8, help="Pairs (or generated images) per model call.")
    scoring.add_argument("--device", default="auto", help="auto: cuda when available, else cpu.")
    scoring.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", required=True)
    output.add_argument(
        "--output_split",
        default=None,
        help="Name of the written split, the shards' prefix (default: --dataset_split_name, or train).",
    )
    output.add_argument("--pairs_per_shard", type=int, default=1000, help="Pairs per written parquet file.")
    output.add_argument(
        "--max_pairs",
        type=int,
        default=None,
        help="Stop once the output holds this many pairs (a rerun without it goes on).",
    )
    return parser.parse_and_check(input_args, validate_args)


def validate_args(args):
    """Rejects bad input before any model or data is loaded."""
    if args.dataset_name is None and args.prompts_file is None and args.prompts_dataset is None:
        raise InputError("one of the arguments --dataset_name --prompts_file --prompts_dataset is required")
    args.mode = "dataset" if args.dataset_name is not None else "prompts"
    if args.mode == "prompts":
        if args.base_model is None:
            raise InputError("pairs from prompts need --base_model, the model that draws the images")
        if args.images_per_prompt < 2:
            raise InputError("--images_per_prompt must be at least 2 (a pair needs two images)")
        if args.prompts_file is not None and not os.path.isfile(args.prompts_file):
            raise InputError(f"--prompts_file {args.prompts_file}: no such file")
        if args.resolution is not None and (args.resolution < 8 or args.resolution % 8 != 0):
            raise InputError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    for name in ("batch_size", "pairs_per_shard", "max_pairs", "num_prompts", "num_inference_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1")
    if not (np.isfinite(args.min_margin) and args.min_margin >= 0):
        raise InputError(f"--min_margin must be a non-negative number, got {args.min_margin}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mixed_precision == "fp16" and not args.device.startswith("cuda"):
        raise InputError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    args.output_split = args.output_split or (args.dataset_split_name if args.mode == "dataset" else "train")
    if not args.output_split.isidentifier():  # it names files that datasets must read as that split
        raise InputError(f"--output_split must be a plain name like train, got '{args.output_split}'")
    check_output_apart_from_input(args)
    check_scorer_available(args.scorer, "--scorer")  # last: importing it can take seconds


def check_output_apart_from_input(args):
    """Shards written into (or around) a local dataset would be read as its data by the next run or trainer."""
    output = Path(args.output_dir).resolve()  # symlinks and relative paths resolved, the folder need not exist
    for flag in ("dataset_name", "prompts_dataset"):
        source = getattr(args, flag)
        if source is None or not os.path.exists(source):
            continue  # a Hub id
        source_path = Path(source).resolve()
        if output == source_path or output in source_path.parents or source_path in output.parents:
            raise InputError(
                f"--output_dir {args.output_dir} is, holds or lies inside --{flag} {source}: the labelled shards "
                "would be read as part of it; choose a folder apart from the input"
            )


def settings(args):
    """What the labels depend on: a rerun into the same --output_dir must have the same."""
    names = ["mode", "scorer", *SCORER_MODEL_FLAGS[args.scorer], "min_margin", "mixed_precision"]
    if args.mode == "dataset":
        names += ["dataset_name", "dataset_config_name", "dataset_split_name", "ignore_existing_labels"]
        names += list(LAYOUT_FLAGS) if args.ignore_existing_labels else [*LAYOUT_FLAGS, *LABEL_FLAGS]
    else:
        names += ["prompts_file", "prompts_dataset", "prompts_split", "prompts_column", "base_model", "revision"]
        names += ["variant", "images_per_prompt", "pairing", "seed", "num_inference_steps", "guidance_scale"]
        names += ["resolution"]
    return {name: getattr(args, name) for name in names}


# ----------------------------------------------------------------------------------------------------------------
# 2. Output: shards written as they fill, resumable
# ----------------------------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes the pairs of a split into SPLIT-00000.parquet, SPLIT-00001.parquet, ... as each fills.

    Input is consumed in units (a dataset row, a prompt), in order; a unit's pairs never straddle two shards. Each
    shard records in its metadata the units it covers and their counts (pairs kept, dropped and why), so a rerun
    finds where to go on from the shards alone: a killed run loses at most the shard it was filling. A shard is
    written under a hidden name and renamed when complete, and a lock keeps a second run out of the folder."""

    def __init__(self, output_dir, split, schema, pairs_per_shard, run_settings):
        self.dir, self.split, self.schema, self.pairs_per_shard = Path(output_dir), split, schema, pairs_per_shard
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(self.dir / LOCK_NAME))
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise InputError(f"--output_dir {self.dir}: another labelling run is writing there")
        for partial in self.dir.glob(f".{split}-*.partial-*"):  # a killed run's unfinished shard
            partial.unlink()
        self.summary = read_summary(self.dir)
        entry = self.summary.get(split)
        self.shards = self.existing_shards()
        if self.shards and entry is None:
            raise InputError(f"--output_dir {self.dir} holds {split} shards that this script did not record")
        if self.shards and entry["settings"] != json.loads(json.dumps(run_settings)):
            changed = sorted(
                k for k in {**entry["settings"], **run_settings} if entry["settings"].get(k) != run_settings.get(k)
            )
            raise InputError(
                f"--output_dir {self.dir} holds split '{split}' labelled with other settings ({', '.join(changed)} "
                "differ); rerun with the same flags to resume, or choose a new --output_dir"
            )
        self.entry = {"settings": run_settings, "finished": False}
        self.done_already = bool(
            entry and entry.get("finished") and entry.get("shards") == [path.name for path, _ in self.shards]
        )
        if self.done_already:
            self.entry = entry
        self.summary[split] = self.entry
        self.write_summary()
        self.counts = Counter()
        for _, record in self.shards:
            self.counts.update(record["counts"])
        self.next_unit = self.shards[-1][1]["last_unit"] + 1 if self.shards else 0
        self.pending, self.pending_counts, self.first_pending_unit = [], Counter(), self.next_unit

    def existing_shards(self):
        """[(path, record)] of the complete shards, numbered 0, 1, ... without a gap."""
        shards = []
        for number, path in enumerate(sorted(self.dir.glob(f"{self.split}-[0-9][0-9][0-9][0-9][0-9].parquet"))):
            if path.name != shard_name(self.split, number):
                raise InputError(
                    f"--output_dir {self.dir}: {shard_name(self.split, number)} is missing before {path.name}; "
                    "delete the shards after the gap to resume from it"
                )
            shards.append((path, json.loads(pq.read_schema(path).metadata[SHARD_METADATA_KEY])))
        return shards

    @property
    def kept(self):
        return self.counts["kept"] + self.pending_counts["kept"]

    def add(self, unit, pairs, counts):
        """The pairs and counts of one unit of input."""
        self.pending += pairs
        self.pending_counts.update(counts)
        self.next_unit = unit + 1
        if len(self.pending) >= self.pairs_per_shard:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        name = shard_name(self.split, len(self.shards))
        record = {
            "first_unit": self.first_pending_unit,
            "last_unit": self.next_unit - 1,
            "counts": self.pending_counts,
        }
        table = pa.Table.from_pylist(self.pending, self.schema)
        table = table.replace_schema_metadata({SHARD_METADATA_KEY: json.dumps(record)})
        partial = self.dir / f".{name}.partial-{uuid.uuid4().hex[:8]}"
        pq.write_table(table, partial)
        os.replace(partial, self.dir / name)
        self.shards.append((self.dir / name, record))
        self.counts.update(self.pending_counts)
        self.pending, self.pending_counts, self.first_pending_unit = [], Counter(), self.next_unit

    def finish(self, finished):
        """Writes what is pending and the summary; units after the last shard that kept no pair are counted in the
        summary only (a finished split is not read again)."""
        self.flush()
        self.counts.update(self.pending_counts)
        self.entry.update(
            finished=finished,
            shards=[path.name for path, _ in self.shards],
            counts=dict(sorted(self.counts.items())),
        )
        self.write_summary()
        self.lock.release()
        return self.entry

    def write_summary(self):
        partial = self.dir / f".{SUMMARY_NAME}.partial-{uuid.uuid4().hex[:8]}"
        partial.write_text(json.dumps(self.summary, indent=2, default=int) + "\n")
        os.replace(partial, self.dir / SUMMARY_NAME)


def shard_name(split, number):
    return f"{split}-{number:05d}.parquet"


def read_summary(output_dir):
    path = Path(output_dir) / SUMMARY_NAME
    return json.loads(path.read_text()) if path.exists() else {}


def judge(score_0, score_1, min_margin):
    """(label_0, why it is dropped or None): 1 when the first image scores higher."""
    if score_0 == score_1:
        return None, "dropped_tie"
    if abs(score_0 - score_1) < min_margin:
        return None, "dropped_below_margin"
    return float(score_0 > score_1), None


# ----------------------------------------------------------------------------------------------------------------
# 3. Pairs of a dataset, relabelled
# ----------------------------------------------------------------------------------------------------------------


def trainer_args(args):
    """The trainer's parse_args result that reads --dataset_name as these flags say (its other flags unused)."""
    argv = ["--dataset_name", args.dataset_name, "--dataset_split_name", args.dataset_split_name]
    flags = ["dataset_config_name", "cache_dir", *LAYOUT_FLAGS, *LABEL_FLAGS]
    if args.ignore_existing_labels:  # the images and caption only, as a layout without labels reads them
        flags = ["dataset_config_name", "cache_dir", "caption_column"]
        argv += ["--data_layout", "chosen_rejected", *image_columns_without_labels(args)]
    for flag in flags:
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    return data_flags(argv)


def data_flags(argv):
    """The SD 1.5 trainer's parse_args result for these data flags (all trainer scripts read data alike); nothing is
    logged, so no tracker is asked for."""
    return train_diffusion_dpo.parse_args([*argv, "--report_to", "none"])


def image_columns_without_labels(args):
    """--image_0_column/--image_1_column: the user's, or the first image columns of a trainer layout the dataset
    has (jpg_0/jpg_1, chosen/rejected, image1/image2)."""
    if args.image_0_column and args.image_1_column:
        return ["--image_0_column", args.image_0_column, "--image_1_column", args.image_1_column]
    plain = data_flags(["--dataset_name", args.dataset_name, *config_flags(args)])
    stream, _ = stream_split(plain, args.dataset_split_name)
    readable, present = readable_columns(stream)
    for roles in DATA_LAYOUTS.values():
        first = args.image_0_column or roles["image_0"][0]
        second = args.image_1_column or roles["image_1"][0]
        if first in readable and second in readable:
            return ["--image_0_column", first, "--image_1_column", second]
    raise InputError(
        f"dataset '{args.dataset_name}' has no pair of image columns the trainers know (it has {present}); name "
        "them with --image_0_column and --image_1_column"
    )


def config_flags(args):
    return [
        flag
        for name in ("dataset_config_name", "cache_dir")
        if getattr(args, name) is not None
        for flag in (f"--{name}", getattr(args, name))
    ]


def encoded_bytes(value):
    """A row's image as the encoded bytes it was stored as (an image folder's file read as it is)."""
    if isinstance(value, dict):
        return value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()
    return bytes(value)


def decoded_pair(row):
    """(image_0, image_1, bytes_0, bytes_1) of a PreferenceRow, or None when either image is unreadable."""
    try:
        raw = [encoded_bytes(row.image_0), encoded_bytes(row.image_1)]
        return [decode_image(value) for value in raw] + raw
    except Exception:  # missing, corrupt or truncated: the pair is dropped and counted, as the trainer skips it
        return None


def dataset_rows(args):
    """The rows of the split as the trainer reads them; its first row is read here, so that a dataset the trainer
    cannot read (no layout fits, no such split) stops the run before anything is written."""
    rows = read_preference_rows(trainer_args(args))
    first = next(rows, None)
    if first is None:
        raise InputError(f"dataset '{args.dataset_name}' split '{args.dataset_split_name}' has no rows")
    return itertools.chain([first], rows)


def label_dataset(args, rows, scorer, writer):
    """Relabels every row of the split after the ones already written; returns whether the split was finished."""
    # Rows already in a shard are streamed past, not decoded (read_preference_rows starts at the first row).
    rows = (row for row in rows if row.row >= writer.next_unit)
    progress = tqdm(desc=f"Labelling with {args.scorer}", unit="row", initial=writer.next_unit)
    for batch in iter(lambda: list(itertools.islice(rows, args.batch_size)), []):
        decoded = [decoded_pair(row) for row in batch]
        readable = [(row, pair) for row, pair in zip(batch, decoded) if pair is not None]
        images = [pair[0] for _, pair in readable] + [pair[1] for _, pair in readable]
        captions = [row.caption or "" for row, _ in readable] * 2
        scores = score_images(scorer, images, captions, batch_size=len(images)) if images else []
        # the first images' scores, then the second images': (score_0, score_1) by row
        scores = dict(zip([row.row for row, _ in readable], zip(scores[: len(readable)], scores[len(readable) :])))
        for row, pair in zip(batch, decoded):
            progress.update()
            counts, pairs = Counter(rows=1), []
            if pair is None:
                counts["dropped_undecodable"] += 1
            else:
                score_0, score_1 = scores[row.row]
                label, dropped = judge(score_0, score_1, args.min_margin)
                source_label = None if args.ignore_existing_labels else row.label
                if dropped:
                    counts[dropped] += 1
                else:
                    counts["kept"] += 1
                    if source_label in (0.0, 1.0):
                        counts["agreed" if label == source_label else "flipped"] += 1
                    pairs.append(
                        dict(
                            caption=row.caption,
                            jpg_0=pair[2],
                            jpg_1=pair[3],
                            label_0=label,
                            score_0=score_0,
                            score_1=score_1,
                            source_row=row.row,
                            source_label_0=source_label,
                        )
                    )
            writer.add(row.row, pairs, counts)
            if args.max_pairs is not None and writer.kept >= args.max_pairs:
                return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# 4. Pairs generated from prompts
# ----------------------------------------------------------------------------------------------------------------


def image_seed(seed, prompt_index, image_index):
    """The seed of one generated image: the same for any batching, device or --num_prompts."""
    return int(np.random.SeedSequence([seed, prompt_index, image_index]).generate_state(1)[0])


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pairs_of_prompt(scores, pairing):
    """(i, j) image pairs of one prompt, i < j: its best and worst image, or every two."""
    if pairing == "all":
        return list(itertools.combinations(range(len(scores)), 2))
    best, worst = int(np.argmax(scores)), int(np.argmin(scores))
    return [tuple(sorted((best, worst)))] if best != worst else [(0, 1)]  # all equal: a tie, dropped


def label_prompts(args, prompts, pipeline, scorer, writer):
    """Generates, scores and pairs the images of every prompt after the ones already written; returns whether all
    prompts were done."""
    extra = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    n = args.images_per_prompt
    # enough prompts per step that a pipeline call renders about --batch_size images
    step = max(1, args.batch_size // n)
    progress = tqdm(total=len(prompts), initial=writer.next_unit, desc="Generating and scoring", unit="prompt")
    for start in range(writer.next_unit, len(prompts), step):
        indices = list(range(start, min(start + step, len(prompts))))
        jobs = [(i, j) for i in indices for j in range(n)]
        images = []
        for first in range(0, len(jobs), args.batch_size):
            batch = jobs[first : first + args.batch_size]
            images += pipeline(
                prompt=[prompts[i] for i, _ in batch],
                generator=[torch.Generator().manual_seed(image_seed(args.seed, i, j)) for i, j in batch],
                num_inference_steps=args.num_inference_steps,
                height=args.resolution,
                width=args.resolution,
                **extra,
            ).images
        scores = score_images(scorer, images, [prompts[i] for i, _ in jobs], args.batch_size)
        for position, i in enumerate(indices):
            own_scores = scores[position * n : (position + 1) * n]
            own_images = images[position * n : (position + 1) * n]
            counts, pairs = Counter(prompts=1, images=n), []
            for a, b in pairs_of_prompt(own_scores, args.pairing):
                label, dropped = judge(own_scores[a], own_scores[b], args.min_margin)
                if dropped:
                    counts[dropped] += 1
                    continue
                counts["kept"] += 1
                pairs.append(
                    dict(
                        caption=prompts[i],
                        jpg_0=png_bytes(own_images[a]),
                        jpg_1=png_bytes(own_images[b]),
                        label_0=label,
                        score_0=own_scores[a],
                        score_1=own_scores[b],
                        prompt_index=i,
                        image_index_0=a,
                        image_index_1=b,
                        seed_0=image_seed(args.seed, i, a),
                        seed_1=image_seed(args.seed, i, b),
                    )
                )
            writer.add(i, pairs, counts)
            progress.update()
            if args.max_pairs is not None and writer.kept >= args.max_pairs:
                return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# 5. main
# ----------------------------------------------------------------------------------------------------------------


def main(args):
    """Labels, writes and reports; returns the split's entry of ai_feedback.json (settings, counts, shards)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    # unusable prompts or data stop the run before anything loads or is written
    prompts = load_prompts(args) if args.mode == "prompts" else None
    rows = dataset_rows(args) if args.mode == "dataset" else None
    schema = DATASET_SCHEMA if args.mode == "dataset" else PROMPTS_SCHEMA
    writer = ShardWriter(args.output_dir, args.output_split, schema, args.pairs_per_shard, settings(args))
    if writer.done_already:
        writer.lock.release()
        print(f"{args.output_dir}: split '{args.output_split}' is already labelled; nothing to do.")
        return writer.entry
    if args.max_pairs is not None and writer.kept >= args.max_pairs:
        print(f"{args.output_dir} already holds {writer.kept} pairs (--max_pairs {args.max_pairs}); nothing to do.")
        return writer.finish(finished=False)
    if writer.shards:
        print(f"Resuming after {len(writer.shards)} shards ({writer.kept} pairs) at input unit {writer.next_unit}.")
    try:
        pipeline = None
        if args.mode == "prompts":
            pipeline = load_pipeline(args.base_model, dtype, args.device, args.revision, args.variant)
        scorer = load_scorer(args.scorer, args, args.device, dtype)
        if args.mode == "dataset":
            finished = label_dataset(args, rows, scorer, writer)
        else:
            finished = label_prompts(args, prompts, pipeline, scorer, writer)
    except BaseException:
        writer.lock.release()  # the complete shards stay: a rerun resumes after them
        raise
    del pipeline
    free_memory()
    entry = writer.finish(finished)
    report(args, entry)
    return entry


def report(args, entry):
    counts = Counter(entry["counts"])
    unit = "rows" if args.mode == "dataset" else "prompts"
    print(
        f"{'Finished' if entry['finished'] else 'Stopped at --max_pairs'}: {counts['kept']} pairs labelled by "
        f"{args.scorer} from {counts[unit]} {unit}, in {len(entry['shards'])} shards of {args.output_dir}. Dropped: "
        f"{counts['dropped_below_margin']} with a score margin below {args.min_margin}, {counts['dropped_tie']} exact "
        f"ties" + (f", {counts['dropped_undecodable']} with an undecodable image." if args.mode == "dataset" else ".")
    )
    if counts["agreed"] + counts["flipped"]:
        print(
            f"The reward model agrees with the dataset's label on {counts['agreed']} of "
            f"{counts['agreed'] + counts['flipped']} labelled pairs; {counts['flipped']} pairs are flipped."
        )


if __name__ == "__main__":
    try:
        main(parse_args())
    except InputError as error:
        sys.exit(f"error: {error}")
