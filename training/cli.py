"""`dicom-node-train`: data, training, evaluation and export of models for the node."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from inference.spec import ModelSpec
from common.yamlfile import ConfigError, load_yaml, validate

app = typer.Typer(help="Train models for the DICOM node and write their Triton model-repository entries.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

DEMO_EPOCHS = 50
DEFAULT_SPEC = Path(__file__).resolve().parent / "specs" / "lesion-seg.yaml"
SpecOption = typer.Option(DEFAULT_SPEC, "--spec", help="Node-side model spec (preprocessing, labels).")


def _spec(path: Path) -> ModelSpec:
    try:
        return validate(load_yaml(path), ModelSpec)
    except ConfigError as exc:
        typer.echo(f"invalid spec:\n{exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Output folder (MSD layout)."),
    count: int = typer.Option(40, help="Number of phantoms."),
    spacing: float = typer.Option(2.0, help="Voxel size in mm."),
    seed: int = typer.Option(0),
) -> None:
    """Synthetic CT phantoms (384x384x192 mm) with lesion labels, as an MSD-layout dataset."""
    from training.data.synthetic import make_training_set

    make_training_set(out, count, spacing, seed)
    typer.echo(f"wrote {count} phantoms to {out}")


@app.command("phantom-study")
def phantom_study(
    out: Path = typer.Argument(..., help="Folder for the DICOM CT series."),
    slices: int = typer.Option(96),
    size: int = typer.Option(256),
    pixel_spacing: float = typer.Option(1.5),
    slice_spacing: float = typer.Option(2.0),
    seed: int = typer.Option(0),
) -> None:
    """A DICOM CT study of a random phantom; its truth is written beside it (<out>.truth.json)."""
    from phantom.study import make_dicom_study, truth_path

    files, phantom = make_dicom_study(out, slices, size, pixel_spacing, slice_spacing, seed)
    typer.echo(f"wrote {len(files)} images to {out}; {len(phantom.lesions)} lesions in {truth_path(out)}")


@app.command("from-dicom-seg")
def from_dicom_seg(
    source: Path = typer.Argument(..., help="Folder with CT series and the DICOM SEG objects annotating them."),
    out: Path = typer.Argument(..., help="Output folder (MSD layout)."),
) -> None:
    """Convert DICOM CT + SEG pairs (e.g. exported from a PACS) into training data."""
    from training.data.dicom_seg import dicom_seg_to_msd

    dicom_seg_to_msd(source, out)
    typer.echo(f"wrote {out / 'dataset.json'}")


@app.command()
def train(
    data: Path = typer.Argument(..., help="MSD-layout dataset folder."),
    out: Path = typer.Argument(..., help="Run folder: checkpoints and metrics."),
    spec: Path = SpecOption,
    epochs: int = typer.Option(20),
    iterations: int = typer.Option(10, help="Iterations per epoch."),
    batch_size: int = typer.Option(2),
    learning_rate: float = typer.Option(2e-3),
    seed: int = typer.Option(0),
    resume: Optional[Path] = typer.Option(None, help="Continue from a last.pt checkpoint."),
) -> None:
    """Train a MONAI 3D UNet (Dice + cross-entropy); best.pt is chosen on validation Dice."""
    from training.train import TrainConfig, train as run

    summary = run(TrainConfig(data=data, out=out, spec=_spec(spec), epochs=epochs, iterations_per_epoch=iterations,
                              batch_size=batch_size, learning_rate=learning_rate, seed=seed, resume=resume))
    typer.echo(f"best validation Dice {summary['best_dice_mean']:.4f}; checkpoints in {out}")


@app.command()
def evaluate(
    checkpoint: Path = typer.Argument(...),
    data: Path = typer.Argument(..., help="MSD-layout dataset folder."),
    spec: Path = SpecOption,
) -> None:
    """Dice per label of a checkpoint on a dataset."""
    from training.evaluate import evaluate as run

    typer.echo(json.dumps(run(checkpoint, data, _spec(spec)), indent=2))


@app.command()
def export(
    checkpoint: Path = typer.Argument(...),
    repository: Path = typer.Option(Path("models"), help="Model repository to write the entry into."),
    spec: Path = SpecOption,
    dice: Optional[float] = typer.Option(None, help="Validation Dice to record in the spec's description."),
) -> None:
    """ONNX export (checked against PyTorch) and the Triton model-repository entry."""
    from inference.export.repository import export_onnx, write_entry
    from training.train import load_network

    model_spec = _spec(spec)
    onnx = repository / model_spec.name / str(model_spec.version) / "model.onnx"
    if model_spec.task == "classification":
        from training.classification import load_classifier

        classifier, _ = load_classifier(checkpoint, model_spec)
        error = export_onnx(classifier, onnx, model_spec, dynamic_spatial=False)
        entry = write_entry(repository, model_spec, onnx)
        typer.echo(f"exported {entry} (ONNX vs PyTorch max error {error:.1e})")
        return
    network, network_config = load_network(checkpoint, model_spec)
    error = export_onnx(network, onnx, model_spec, divisor=network_config.divisor)
    entry = write_entry(repository, model_spec, onnx)
    typer.echo(f"exported {entry} (ONNX vs PyTorch max error {error:.1e})")


@app.command()
def demo(
    work: Path = typer.Option(Path("build/demo-training"), help="Scratch folder for data and checkpoints."),
    repository: Path = typer.Option(Path("models"), help="Where the model entry goes."),
    seed: int = typer.Option(0),
) -> None:
    """Train the shipped demo model from scratch (a few minutes on 2 CPU cores) and export it."""
    from training.data.synthetic import make_training_set
    from training.train import TrainConfig, train as run

    make_training_set(work / "data", count=40, spacing=2.0, seed=seed)
    summary = run(TrainConfig(data=work / "data", out=work / "run", spec=_spec(DEFAULT_SPEC), epochs=DEMO_EPOCHS,
                              iterations_per_epoch=20, batch_size=2, learning_rate=3e-3, val_fraction=0.1,
                              val_interval=5, seed=seed))
    export(work / "run" / "best.pt", repository, DEFAULT_SPEC, None)
    (repository / "lesion-seg" / "training.json").write_text(json.dumps({
        "command": f"dicom-node-train demo --seed {seed}",
        "best_validation_dice": summary["best_dice_mean"],
        "epochs": summary["epochs"],
    }, indent=2) + "\n")
    typer.echo(f"demo model: validation Dice {summary['best_dice_mean']:.4f}")


CLASSIFIER_SPEC = Path(__file__).resolve().parent / "specs" / "chest-nodule-cls.yaml"
ClassifierSpecOption = typer.Option(CLASSIFIER_SPEC, "--spec", help="Node-side classifier spec (task: classification).")


@app.command("synth-dx")
def synth_dx(
    out: Path = typer.Argument(..., help="Folder for DICOM DX files, labels.csv and truth.json."),
    count: int = typer.Option(200, help="Number of radiographs (half with a nodule)."),
    size: int = typer.Option(192, help="Rows and columns."),
    seed: int = typer.Option(0),
) -> None:
    """Synthetic chest radiographs with and without a nodule-like opacity, labelled in a CSV."""
    from phantom.radiograph import make_dx_dataset

    make_dx_dataset(out, count, seed, size)
    typer.echo(f"wrote {count} radiographs and labels.csv to {out}")


@app.command("train-classifier")
def train_classifier_command(
    data: Path = typer.Argument(..., help="Folder of DICOM files (a site's own data, or synth-dx output)."),
    out: Path = typer.Argument(..., help="Run folder: checkpoints, metrics, ROC plot."),
    labels: Optional[Path] = typer.Option(None, help="CSV with columns file,label (default: <data>/labels.csv)."),
    test_data: Optional[Path] = typer.Option(None, help="Held-out folder (with labels.csv) for the final metrics."),
    spec: Path = ClassifierSpecOption,
    architecture: str = typer.Option("densenet", help="densenet (small), densenet121 or resnet (MONAI)."),
    spatial_dims: int = typer.Option(2, help="2 (radiographs: patch_size [X, Y, 1]) or 3 (volumes)."),
    epochs: int = typer.Option(10),
    batch_size: int = typer.Option(16),
    learning_rate: float = typer.Option(2e-3),
    val_fraction: float = typer.Option(0.2),
    seed: int = typer.Option(0),
) -> None:
    """Train a MONAI DenseNet/ResNet classifier; metrics per epoch, held-out metrics and ROC at the end."""
    summary = _train_classifier(data, out, labels, test_data, _spec(spec), architecture, spatial_dims, epochs,
                                batch_size, learning_rate, val_fraction, seed)
    typer.echo(json.dumps({"best_validation": summary["best_validation"], "test": summary.get("test")}, indent=2))


def _train_classifier(data: Path, out: Path, labels: Optional[Path], test_data: Optional[Path], model_spec: ModelSpec,
                      architecture: str, spatial_dims: int, epochs: int, batch_size: int, learning_rate: float,
                      val_fraction: float, seed: int) -> dict:
    import torch

    from training.classification import (ClassificationTrainConfig, ClassifierConfig, evaluate_classifier,
                                         load_classifier, train_classifier)
    from training.data.dicom_labels import load_labelled_dicom

    inputs, targets, _ = load_labelled_dicom(data, labels or data / "labels.csv", model_spec)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(len(inputs) * val_fraction)))
    val, train = order[:n_val], order[n_val:]
    config = ClassificationTrainConfig(out=out, spec=model_spec, epochs=epochs, batch_size=batch_size,
                                       learning_rate=learning_rate, seed=seed,
                                       network=ClassifierConfig(architecture=architecture,  # type: ignore[arg-type]
                                                                spatial_dims=spatial_dims))  # type: ignore[arg-type]
    summary = train_classifier(config, (inputs[train], targets[train]), (inputs[val], targets[val]))
    if test_data is not None:
        test_inputs, test_targets, _ = load_labelled_dicom(test_data, test_data / "labels.csv", model_spec)
        network, _ = load_classifier(out / "best.pt", model_spec)
        summary["test"] = evaluate_classifier(network, (test_inputs, test_targets), model_spec, out, "test")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


@app.command("demo-classifier")
def demo_classifier(
    work: Path = typer.Option(Path("build/demo-classifier"), help="Scratch folder for data and checkpoints."),
    repository: Path = typer.Option(Path("models"), help="Where the model entry goes."),
    train_count: int = typer.Option(1200),
    test_count: int = typer.Option(200),
    epochs: int = typer.Option(25),
    seed: int = typer.Option(0),
) -> None:
    """Train the shipped demo classifier (synthetic DX, a few minutes on 2 CPU cores) and export it."""
    from phantom.radiograph import make_dx_dataset

    make_dx_dataset(work / "train", train_count, seed)
    make_dx_dataset(work / "test", test_count, seed + 1)  # another seed: held out
    model_spec = _spec(CLASSIFIER_SPEC)
    summary = _train_classifier(work / "train", work / "run", None, work / "test", model_spec, "densenet", 2, epochs,
                                16, 2e-3, 0.2, seed)
    export(work / "run" / "best.pt", repository, CLASSIFIER_SPEC, None)
    entry = repository / model_spec.name
    (entry / "training.json").write_text(json.dumps({
        "command": f"dicom-node-train demo-classifier --seed {seed}",
        "train_images": train_count, "test_images": test_count, "epochs": epochs,
        "best_validation": summary["best_validation"], "test": summary["test"],
    }, indent=2) + "\n")
    for name in ("test_roc.png", "test_metrics.csv"):
        (entry / name).write_bytes((work / "run" / name).read_bytes())
    typer.echo(f"demo classifier: held-out metrics {json.dumps(summary['test'])}")


DETECTOR_SPEC = Path(__file__).resolve().parent / "specs" / "nodule-det.yaml"
DetectorSpecOption = typer.Option(DETECTOR_SPEC, "--spec", help="Node-side detector spec (task: detection).")


@app.command("synth-chest")
def synth_chest(
    out: Path = typer.Argument(..., help="Output folder (MSD layout; label 1: nodules)."),
    count: int = typer.Option(48, help="Number of chest phantoms."),
    seed: int = typer.Option(0),
) -> None:
    """Synthetic chest CT phantoms with lungs, vessels and 0-4 solid nodules (4-12 mm), as an MSD dataset."""
    from training.detection import make_chest_set

    make_chest_set(out, count, seed)
    typer.echo(f"wrote {count} chest phantoms to {out}")


@app.command("train-detector")
def train_detector_command(
    data: Path = typer.Argument(..., help="MSD dataset whose label marks the findings (synth-chest, from-dicom-seg)."),
    out: Path = typer.Argument(..., help="Run folder: last.pt and metrics.json."),
    test_data: Optional[Path] = typer.Option(None, help="Held-out MSD dataset: FROC and mAP of the exported model."),
    spec: Path = DetectorSpecOption,
    iterations: int = typer.Option(1500),
    batch_size: int = typer.Option(4),
    learning_rate: float = typer.Option(1e-3),
    seed: int = typer.Option(0),
) -> None:
    """Train a MONAI RetinaNet; each connected component of the label is one finding (its box)."""
    from training.detection import evaluate_detector, export_detector, train_detector

    model_spec = _spec(spec)
    summary = train_detector(data, out, model_spec, iterations, batch_size, learning_rate, seed)
    if test_data is not None:
        onnx = out / "model.onnx"
        export_detector(out / "last.pt", onnx, model_spec)
        summary["test"] = evaluate_detector(onnx, test_data, model_spec)
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))


@app.command("export-detector")
def export_detector_command(
    checkpoint: Path = typer.Argument(...),
    repository: Path = typer.Option(Path("models"), help="Model repository to write the entry into."),
    spec: Path = DetectorSpecOption,
) -> None:
    """ONNX export of a detector (boxes decoded in the model, checked against PyTorch) and its repository entry."""
    from inference.export.repository import write_entry
    from training.detection import export_detector

    model_spec = _spec(spec)
    onnx = repository / model_spec.name / str(model_spec.version) / "model.onnx"
    error = export_detector(checkpoint, onnx, model_spec)
    entry = write_entry(repository, model_spec, onnx)
    typer.echo(f"exported {entry} (ONNX vs PyTorch max error {error:.1e})")


@app.command("demo-detector")
def demo_detector(
    work: Path = typer.Option(Path("build/demo-detector"), help="Scratch folder for data and checkpoints."),
    repository: Path = typer.Option(Path("models"), help="Where the model entry goes."),
    train_count: int = typer.Option(48),
    test_count: int = typer.Option(16),
    iterations: int = typer.Option(2000),
    false_positives: float = typer.Option(0.25, help="Operating point: false positives per scan on validation."),
    seed: int = typer.Option(0),
) -> None:
    """Train the shipped demo detector (synthetic chest CT, ~30 minutes on 2 CPU cores), choose its
    operating threshold on a validation set, evaluate it on a held-out set and export it."""
    import math

    from inference.export.repository import write_entry
    from training.detection import evaluate_detector, export_detector, make_chest_set, train_detector

    for name, count, offset in (("train", train_count, 0), ("test", test_count, 1), ("validation", test_count, 2)):
        make_chest_set(work / name, count, seed + offset)  # other seeds: held out
    model_spec = _spec(DETECTOR_SPEC)
    summary = train_detector(work / "train", work / "run", model_spec, iterations, 4, 1e-3, seed)
    onnx = repository / model_spec.name / str(model_spec.version) / "model.onnx"
    export_detector(work / "run" / "last.pt", onnx, model_spec)
    validation = evaluate_detector(onnx, work / "validation", model_spec)
    cut = validation["score_above_for_rate"][f"{false_positives:g}"]
    threshold = min(0.99, max(0.5, math.ceil(cut * 100 + 1e-9) / 100))  # above every allowed false positive
    model_spec = model_spec.model_copy(update={"postprocessing": model_spec.postprocessing.model_copy(
        update={"threshold": threshold})})
    entry = write_entry(repository, model_spec, onnx)
    test = evaluate_detector(onnx, work / "test", model_spec)
    (entry / "training.json").write_text(json.dumps({
        "command": f"dicom-node-train demo-detector --seed {seed}",
        "train_volumes": train_count, "validation_volumes": test_count, "test_volumes": test_count,
        "iterations": iterations, "final_loss": summary["history"][-1]["loss"],
        "operating_threshold": {"false_positives_per_scan_on_validation": false_positives, "threshold": threshold},
        "validation": validation, "test": test,
    }, indent=2) + "\n")
    typer.echo(f"demo detector: threshold {threshold}; held-out {json.dumps(test)}")


def main() -> None:
    app(prog_name="dicom-node-train")
