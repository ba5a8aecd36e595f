"""The image–text modality gap and zero-shot accuracy of CLIPs, on held-out ToyWorld images.

For each CLIP (a toy CLIP name, an open_clip ``local-dir:`` folder, or any name ``ovseg``'s
``load_clip`` takes), on ``--images-per-class`` held-out single-class images of each of the 312
ToyWorld classes, prints: zero-shot top-1 over all classes (seen and unseen), and the gap of
Liang et al. (NeurIPS 2022): mean cosine of an image to a caption of its class, to another image
of the same class and to images of other classes, the distance between the two modalities'
centroids, and how well the first principal component separates them. ``--plot`` draws each
CLIP's embeddings on their first two principal components.

Issue 22's targets: image–caption ≤ 0.40 (real CLIP's range), same-class image–image at least 0.2
above it, the modalities in separate PCA regions, zero-shot ≥ 80% on seen and on unseen classes.

    python benchmarks/modality_gap.py                       # the shipped toy CLIPs
    python benchmarks/modality_gap.py runs/clip-a runs/clip-b --plot /tmp/gap.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ovseg.backbones import TOY_CLIPS, load_backbone, load_clip
from ovseg.data.toyworld import ToyWorld
from ovseg.eval.gap import ClipEvaluation, evaluate_clip

COLUMNS = (
    ("zero_shot_top1_seen", "top-1 seen %", "{:.1f}"),
    ("zero_shot_top1_unseen", "top-1 unseen %", "{:.1f}"),
    ("gap_image_caption", "img–caption", "{:.3f}"),
    ("gap_image_image_same", "img–img same", "{:.3f}"),
    ("gap_image_image_other", "img–img other", "{:.3f}"),
    ("gap_caption_caption_other", "cap–cap other", "{:.3f}"),
    ("gap_centroid_distance", "centroid dist.", "{:.3f}"),
    ("gap_pca_separation", "PCA separation", "{:.2f}"),
)


def load(name: str):
    if name in TOY_CLIPS:
        return load_backbone(name)
    if Path(name).is_dir():
        return load_clip(f"local-dir:{name}")
    return load_clip(name)


def plot(evaluations: dict[str, ClipEvaluation], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(evaluations), figsize=(4.5 * len(evaluations), 4.2))
    for axis, (name, evaluation) in zip(
        [axes] if len(evaluations) == 1 else axes, evaluations.items(), strict=True
    ):
        both = torch.cat([evaluation.images, evaluation.captions])
        centred = both - both.mean(dim=0)
        components = torch.linalg.svd(centred, full_matrices=False).Vh[:2]
        projected = (centred @ components.T).numpy()
        count = len(evaluation.images)
        axis.scatter(*projected[:count].T, s=4, c="tab:blue", label="images")
        axis.scatter(*projected[count:].T, s=4, c="tab:orange", label="captions")
        metrics = evaluation.metrics
        axis.set_title(
            f"{Path(name).name}\nimg–caption {metrics['gap_image_caption']:.2f}, "
            f"img–img same {metrics['gap_image_image_same']:.2f}",
            fontsize=9,
        )
        axis.set_xticks([])
        axis.set_yticks([])
        axis.legend(loc="best", fontsize=8, markerscale=3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("clips", nargs="*", default=sorted(TOY_CLIPS))
    parser.add_argument("--images-per-class", type=int, default=2)
    parser.add_argument(
        "--image-size", type=int, default=None, help="default: each CLIP's own input size"
    )
    parser.add_argument("--templates", default="imagenet", choices=["imagenet", "short", "single"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=None, help="PCA scatter of every CLIP")
    parser.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    args = parser.parse_args()
    if args.images_per_class < 2:
        parser.error("--images-per-class must be at least 2 (same-class image pairs)")
    torch.set_num_threads(args.threads)

    evaluations: dict[str, ClipEvaluation] = {}
    for name in args.clips:
        backbone = load(name)
        size = args.image_size or backbone.image_size
        evaluations[name] = evaluate_clip(
            backbone,
            ToyWorld(image_size=size),
            images_per_class=args.images_per_class,
            image_size=size,
            templates=args.templates,
        )

    first = next(iter(evaluations.values())).metrics
    print(
        f"{first['num_classes']} classes × {args.images_per_class} held-out images, "
        f"{args.templates} templates for zero-shot\n"
    )
    print("| CLIP | " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for name, evaluation in evaluations.items():
        cells = [form.format(evaluation.metrics[key]) for key, _, form in COLUMNS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.plot:
        plot(evaluations, args.plot)
        print(f"\nPCA scatter: {args.plot}")
    if args.json:
        args.json.write_text(
            json.dumps({name: e.metrics for name, e in evaluations.items()}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
