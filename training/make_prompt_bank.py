"""Generate and cache DPSeg's Stable Diffusion visual prompts for whole vocabularies.

One image per (class, template): 80 templates × 171 classes = 13,680 images for COCO-Stuff. The
bank is the one DPSeg reads (same generator, seeds and keys), so a model built with the same
config finds every prompt cached. Reruns skip what is cached (resumable); classes are sharded
over processes (``--shard I --num-shards N``, or torchrun's RANK/WORLD_SIZE, one GPU each);
each shard writes its manifest, and the shard that completes the bank writes ``manifest.json``.

    python training/make_prompt_bank.py --config training/configs/paper/dpseg-convnext-b-768.json \
        --vocabulary coco-stuff-171 --cache-dir prompt-bank
    torchrun --nproc_per_node=8 training/make_prompt_bank.py --config ... \
        --vocabulary coco-stuff-171 ade-150 pc-59 voc-20 --encode

``--export FILE`` then writes the embeddings of every class of the vocabularies to one file that
DPSeg's bank reads before its cache (``VisualPromptBank(shipped=...)``): how the toy DPSeg ships
the prompts of all ToyWorld classes (``--vocabulary toyworld``), so known names cost nothing:

    python training/make_prompt_bank.py --config assets/dpseg-toy.json --vocabulary toyworld \
        --export assets/visual-prompts-toy.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import ovseg
from ovseg.vocabulary import list_vocabularies, load_vocabulary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True, help="a DPSeg training config")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a method_config field (JSON value), e.g. prompt_resolution=512",
    )  # fmt: skip
    parser.add_argument(
        "--vocabulary",
        nargs="+",
        required=True,
        help=f"bundled: {', '.join(list_vocabularies())}, or toyworld (every ToyWorld class)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="the bank's folder")
    parser.add_argument(
        "--encode", action="store_true", help="also cache the frozen-encoder embeddings"
    )
    parser.add_argument("--shard", type=int, default=None, help="this process's shard")
    parser.add_argument("--num-shards", type=int, default=None)
    parser.add_argument("--classes-per-call", type=int, default=4)
    parser.add_argument(
        "--export",
        type=Path,
        default=None,
        help="write every class's embeddings to this file (implies --encode; one shard only)",
    )
    args = parser.parse_args(argv)
    args.encode = args.encode or args.export is not None
    return args


def classes_of(name: str) -> list[tuple[str, ...]]:
    """A bundled vocabulary, or "toyworld": every ToyWorld class with its synonyms."""
    if name == "toyworld":
        from ovseg.data.toyworld import ToyWorld

        return [(c.name, *c.synonyms) for c in ToyWorld(image_size=64).classes]
    return list(load_vocabulary(name))


def shard_from(args: argparse.Namespace) -> tuple[int, int]:
    """(shard, shard count) from the flags, else torchrun's environment, else (0, 1)."""
    if args.num_shards is not None:
        shard, count = args.shard or 0, args.num_shards
    else:
        shard, count = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= shard < count:
        raise SystemExit(f"--shard must be in [0, {count}); got {shard}.")
    return shard, count


def method_settings(args: argparse.Namespace) -> dict[str, Any]:
    record = json.loads(args.config.read_text())
    if record.get("method") != "dpseg":
        raise SystemExit(
            f"{args.config} trains {record.get('method')!r}; visual prompts are DPSeg's."
        )
    settings = dict(record.get("method_config", {}))
    for override in args.set:
        key, _, raw = override.partition("=")
        try:
            settings[key] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key] = raw
    if args.cache_dir is not None:
        settings["prompt_cache_dir"] = str(args.cache_dir)
    return settings


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    shard, num_shards = shard_from(args)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", shard % torch.cuda.device_count())))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method = ovseg.load("dpseg", device=device, **method_settings(args))
    bank, templates = method.prompt_bank, list(method.templates)
    count = method.config.prompts_per_class
    bank.progress = False
    jobs = [
        (name, synonyms)
        for name in args.vocabulary
        for k, synonyms in enumerate(classes_of(name))
        if k % num_shards == shard
    ]
    bar = tqdm(total=len(jobs) * count, desc=f"prompt bank {shard + 1}/{num_shards}", unit="image")
    for start in range(0, len(jobs), args.classes_per_call):
        classes = [synonyms for _, synonyms in jobs[start : start + args.classes_per_call]]
        if args.encode:
            bank.embeddings(classes, templates, count)
        else:
            bank.images(classes, templates, count)
        bar.update(len(classes) * count)
    bar.close()

    manifests = bank.cache_dir / "manifests"
    manifests.mkdir(parents=True, exist_ok=True)
    summary = {
        "generator": bank.generator.id,
        "encoder": bank.encoder_id if args.encode else None,
        "templates": templates,
        "prompts_per_class": count,
        "resolution": bank.resolution,
        "seed": bank.seed,
        "vocabularies": args.vocabulary,
        "num_shards": num_shards,
    }
    entries = [
        {
            "vocabulary": name,
            "class": list(synonyms),
            "template": entry.template_index,
            "seed": entry.seed,
            "image": str(bank.image_path(entry).relative_to(bank.cache_dir)),
        }
        for name, synonyms in jobs
        for entry in bank.entries([synonyms], templates, count)[0]
    ]
    shard_file = manifests / f"shard-{shard:03d}-of-{num_shards:03d}.json"
    _write_json(shard_file, {**summary, "shard": shard, "entries": entries})
    complete = {
        name: not bank.missing(
            classes_of(name), templates, count,
            kind="embeddings" if args.encode else "images",
        )
        for name in args.vocabulary
    }  # fmt: skip
    result = {**summary, "shard": shard, "images": len(entries), "complete": complete}
    if all(complete.values()):
        shard_files = sorted(manifests.glob(f"shard-*-of-{num_shards:03d}.json"))
        merged = [e for path in shard_files for e in json.loads(path.read_text())["entries"]]
        if len(shard_files) == num_shards:
            _write_json(bank.cache_dir / "manifest.json", {**summary, "entries": merged})
            result["manifest"] = str(bank.cache_dir / "manifest.json")
    if args.export is not None:
        if num_shards != 1:
            raise SystemExit("--export needs the whole vocabulary in one process (one shard).")
        classes = [synonyms for name in args.vocabulary for synonyms in classes_of(name)]
        result["exported"] = bank.export_embeddings(args.export, classes, templates, count)
        result["export"] = str(args.export)
    print(json.dumps({key: value for key, value in result.items() if key != "templates"}))
    return result


def _write_json(path: Path, record: dict[str, Any]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(path)


if __name__ == "__main__":
    main()
