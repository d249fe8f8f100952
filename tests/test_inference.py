"""`crosssite.inference`: Predictor against the evaluation pipeline, DICOM series and NIfTI volumes, ONNX
export, AdaBN on a shifted synthetic site, and bad input."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from crosssite.data import CLASS_NAMES, SyntheticParams, build_cache, eval_loader, load_site, read_image, read_volume
from crosssite.data import synthetic_site
from crosssite.errors import CheckpointError
from crosssite.evaluation import collect_probabilities
from crosssite.inference import MIN_ADAPT_IMAGES, InferenceError, Predictor, Preprocess, export_onnx, volume_score
from crosssite.models import create_model, load, save

IMAGE_SIZE = 64
# The test model is read with crosssite 0.1's central crop (still supported: a card may name any frame); the
# whole-slice frames are tested through training in test_faithful_rows.py and test_data_loaders.py.
FRAME = "crop"
SITE_NAMES = ["A", "B"]


def calibrate_norms(model: torch.nn.Module, images: list[torch.Tensor], seed: int = 0) -> None:
    """Stand-in for training: set each site slot's statistics from that site's ``images`` (one batch) and
    give each slot its own affine parameters, so an untrained model's probabilities spread over (0, 1) and
    differ between sites."""
    from crosssite.models import SiteBatchNorm

    norms = [m for m in model.modules() if isinstance(m, SiteBatchNorm)]
    for m in norms:
        m.momentum = None  # the first batch sets the statistics
    model.train()
    with torch.no_grad():
        for s, x in enumerate(images):
            model(x, torch.full((len(x),), s))
    for m in norms:
        m.momentum = 0.1
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".sites." in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    model.eval()


def save_tiny_model(path: Path, images: list[torch.Tensor], norm: str = "site", threshold: float | None = 0.5) -> Path:
    """An untrained width-1/16 redesigned COVID-Net with two sites calibrated on ``images`` (one batch per
    site), saved with a card like training's."""
    torch.manual_seed(0)
    model = create_model("covidnet_redesign", num_sites=2, width=0.0625, norm=norm)
    if norm == "site":
        calibrate_norms(model, images)
    card = {
        "site_names": SITE_NAMES,
        "class_names": list(CLASS_NAMES),
        "preprocessing": {"image_size": IMAGE_SIZE, "frame": FRAME, "mean": [0.63] * 3, "std": [0.29] * 3},
    }
    if threshold is not None:
        card["threshold"] = threshold
    save(model, path, card)
    return path


def real_files(site_a_path: Path, site_b_path: Path) -> tuple[list, list[list[int]], list[Path]]:
    """Four slices of each real site (two per class): the sites, their indices, and the files in order."""
    sites = [load_site(("A", site_a_path, None)), load_site(("B", site_b_path, None))]
    indices = []
    for site in sites:
        labels = site.labels
        indices.append([int(i) for c in (1, 0) for i in np.flatnonzero(labels == c)[:2]])
    files = [site.samples[i].path for site, ix in zip(sites, indices) for i in ix]
    return sites, indices, files


@pytest.fixture(scope="module")
def real(site_a_path: Path, site_b_path: Path) -> tuple[list, list[list[int]], list[Path]]:
    return real_files(site_a_path, site_b_path)


def site_images(files: list[Path]) -> list[torch.Tensor]:
    """Model inputs of the first and second half of ``files`` (one batch per site)."""
    pre = Preprocess(IMAGE_SIZE, frame=FRAME)
    x = torch.stack([pre(read_image(f)) for f in files])
    return list(x.chunk(2))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory, real: tuple) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model", site_images(real[2]))


def slice_p(records: list) -> np.ndarray:
    return np.array([r.p_covid for r in records if r.kind == "slice"])


# ------------------------------------------------------------------------------------ equal to evaluate


@pytest.mark.parametrize("site", [None, "B"])
def test_predictions_match_evaluation_pipeline(model_path: Path, real: tuple, site: str | None) -> None:
    sites, indices, files = real
    model, _ = load(model_path)
    cache = build_cache(sites, indices, IMAGE_SIZE, progress=False, frame=FRAME)
    loader = eval_loader(sites, indices, cache, IMAGE_SIZE, batch_size=3)
    expected = collect_probabilities(model, loader, site_override="mean-of-sites" if site is None else 1).p_covid

    records = Predictor.from_file(model_path, site=site, batch_size=5).predict(files)
    assert [r.kind for r in records] == ["slice"] * len(files)
    assert [Path(r.path) for r in records] == files
    p = slice_p(records)
    assert p.std() > 0.05, "the test model must tell the slices apart"
    np.testing.assert_allclose(p, expected, rtol=0, atol=1e-5)
    assert [r.label for r in records] == ["COVID" if v >= 0.5 else "non-COVID" for v in p]
    assert {r.norm for r in records} == {"mean-of-sites" if site is None else "B"}


def test_site_choice_changes_normalisation(model_path: Path, real: tuple) -> None:
    files = real[2][:4]
    a, b, mean = (slice_p(Predictor.from_file(model_path, site=s).predict(files)) for s in ("A", "B", None))
    assert np.abs(a - b).max() > 1e-3 and np.abs(a - mean).max() > 1e-3


def test_threshold_from_card(tmp_path: Path, real: tuple) -> None:
    path = save_tiny_model(tmp_path / "m", site_images(real[2]), threshold=None)
    predictor = Predictor.from_file(path)
    assert predictor.threshold == 0.5
    records = Predictor.from_file(path, threshold=0.0).predict(real[2][:2])
    assert {r.label for r in records} == {"COVID"}


# -------------------------------------------------------------------------------------------- volumes


def write_dicom_series(folder: Path, slices: list[np.ndarray]) -> list[Path]:
    """Single-frame CT DICOM files, one per grey slice; file names run opposite to the patient axis."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series = generate_uid()
    files = []
    for k, grey in enumerate(slices):
        hu = np.round(grey * 1500.0 - 1350.0)  # inverse of the lung window (level -600, width 1500)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice{len(slices) - 1 - k:02d}.dcm"  # reversed names: order must come from z
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = series, "CT"
        ds.ImagePositionPatient = [0.0, 0.0, float(k) * 2.5]
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = grey.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = hu.astype(np.int16).tobytes()
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        files.append(path)
    return files


def manual_p(model_path: Path, slices: list[np.ndarray]) -> np.ndarray:
    """P(COVID) of each slice straight from the data layer's transforms and the model (mean of sites)."""
    from crosssite.data import eval_transform, frame_slice, short_side_for

    model, _ = load(model_path)
    tf = eval_transform(IMAGE_SIZE, frame=FRAME)
    x = torch.stack([tf(frame_slice(s, short_side_for(IMAGE_SIZE), FRAME)) for s in slices])
    with torch.no_grad():
        return torch.softmax(model(x, None).logits, 1)[:, 1].double().numpy()


def test_dicom_series_and_nifti_volume(model_path: Path, real: tuple, tmp_path: Path) -> None:
    greys = [read_image(f)[:120, :160] for f in real[2][:5]]  # crop to one shape: a series has one size
    series = tmp_path / "series"
    dicoms = write_dicom_series(series, greys)
    volume = np.stack([np.round(g.T[::-1, ::-1] * 1500.0 - 1350.0) for g in greys[:4]], axis=-1)
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume.astype(np.int16), np.eye(4)), nifti)

    records = Predictor.from_file(model_path, top_k=3).predict([series, nifti])
    kinds = [r.kind for r in records]
    assert kinds == ["slice"] * 5 + ["volume"] + ["slice"] * 4 + ["volume"]

    dicom_rows, dicom_volume = records[:5], records[5]
    assert [Path(r.path) for r in dicom_rows] == dicoms  # patient-axis order, not name order
    assert [r.slice for r in dicom_rows] == list(range(5)) and {r.volume for r in dicom_rows} == {str(series)}
    np.testing.assert_allclose(slice_p(dicom_rows), manual_p(model_path, read_volume(series)), atol=1e-5)
    assert (dicom_volume.path, dicom_volume.n_slices, dicom_volume.top_k) == (str(series), 5, 3)
    assert dicom_volume.p_covid == pytest.approx(np.sort(slice_p(dicom_rows))[-3:].mean(), abs=1e-12)

    nifti_rows, nifti_volume = records[6:10], records[10]
    assert [(r.path, r.frame, r.slice, r.volume) for r in nifti_rows] == [
        (str(nifti), k, k, str(nifti)) for k in range(4)
    ]
    np.testing.assert_allclose(slice_p(nifti_rows), manual_p(model_path, read_volume(nifti)), atol=1e-5)
    assert (nifti_volume.n_slices, nifti_volume.top_k) == (4, 3)
    assert nifti_volume.label == ("COVID" if nifti_volume.p_covid >= 0.5 else "non-COVID")


def test_dicom_series_with_a_corrupt_file(model_path: Path, real: tuple, tmp_path: Path) -> None:
    greys = [read_image(f)[:100, :100] for f in real[2][:3]]
    dicoms = write_dicom_series(tmp_path / "series", greys)
    (tmp_path / "series" / "broken.dcm").write_bytes(b"garbage" * 20)
    records = Predictor.from_file(model_path).predict([tmp_path / "series", dicoms[1]])
    assert [(r.kind, Path(r.path).name, r.slice) for r in records] == [
        ("error", "broken.dcm", None),  # not a DICOM file: known from its first bytes, so among the inputs that failed
        ("slice", "slice02.dcm", 0), ("slice", "slice01.dcm", 1), ("slice", "slice00.dcm", 2),
        ("volume", "series", None),
        ("slice", "slice01.dcm", None),  # a DICOM file given alone is a lone slice
    ]
    assert records[4].n_slices == 3 and records[0].error.startswith("not a DICOM file")
    assert records[5].p_covid == pytest.approx(records[2].p_covid, abs=1e-6)


def test_dicom_series_with_an_unreadable_header(model_path: Path, real: tuple, tmp_path: Path) -> None:
    """A header that cannot be parsed makes the series order fail as a whole: the bad file is reported, and
    the readable slices still come in patient-axis order (file names run the other way)."""
    greys = [read_image(f)[:100, :100] for f in real[2][:3]]
    dicoms = write_dicom_series(tmp_path / "series", greys)
    raw = bytearray(dicoms[0].read_bytes())
    raw[136] = 0xFF  # the length of the first meta element becomes odd for its VR
    (tmp_path / "series" / "a_broken.dcm").write_bytes(bytes(raw))
    records = Predictor.from_file(model_path).predict([tmp_path / "series"])
    assert [(r.kind, Path(r.path).name, r.slice) for r in records] == [
        ("error", "a_broken.dcm", None),
        ("slice", "slice02.dcm", 0), ("slice", "slice01.dcm", 1), ("slice", "slice00.dcm", 2),
        ("volume", "series", None),
    ]
    assert "bytes" in records[0].error  # the parser's reason, beside the file's path in the row


def test_volume_score() -> None:
    assert volume_score([0.1, 0.9, 0.5, 0.7], 2) == (pytest.approx(0.8), 2)
    assert volume_score([0.2, 0.4], 5) == (pytest.approx(0.3), 2)
    assert volume_score([0.2, 0.4, 0.9], None) == (pytest.approx(0.5), 3)
    with pytest.raises(ValueError):
        volume_score([], 3)


# ----------------------------------------------------------------------------------------------- ONNX


def test_onnx_export_matches_pytorch(model_path: Path, real: tuple, tmp_path: Path) -> None:
    import onnxruntime as ort

    onnx_path = export_onnx(model_path, tmp_path / "model.onnx", site="B")
    files = real[2]
    torch_p = slice_p(Predictor.from_file(model_path, site="B").predict(files))
    onnx_predictor = Predictor.from_file(onnx_path, batch_size=3)
    records = onnx_predictor.predict(files)
    np.testing.assert_allclose(slice_p(records), torch_p, rtol=0, atol=1e-4)
    assert {r.norm for r in records} == {"B"}
    assert onnx_predictor.preprocess.to_dict() == Preprocess(IMAGE_SIZE, [0.63] * 3, [0.29] * 3, FRAME).to_dict()

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model, _ = load(model_path)
    for batch in (1, 5):  # the batch dimension is dynamic
        x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
        with torch.no_grad():
            expected = torch.softmax(model(x, torch.full((batch,), 1)).logits, 1).numpy()
        np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], expected, rtol=0, atol=1e-4)


def test_binned_pool_equals_adaptive_pool_and_odd_maps_export(tmp_path: Path) -> None:
    """The redesign pools its last map to 2x2; at 224 px (7x7) and 48 px (3x3) the bins overlap, which the
    ONNX exporter cannot express with AdaptiveAvgPool2d; the export's replacement computes the same bins."""
    import onnxruntime as ort

    from crosssite.inference.export import BinnedAvgPool2d

    for side in (7, 3, 4, 5):
        x = torch.randn(2, 3, side, side + 1)
        torch.testing.assert_close(BinnedAvgPool2d(2)(x), torch.nn.AdaptiveAvgPool2d(2)(x), rtol=0, atol=1e-6)
    size = 48  # last feature map 3x3
    model = create_model("covidnet_redesign", num_sites=2, norm="site", width=0.0625, image_size=size).eval()
    save(model, tmp_path / "m48", {"site_names": ["a", "b"], "preprocessing": {"image_size": size}})
    path = export_onnx(tmp_path / "m48", tmp_path / "m48.onnx", site="b")
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = torch.softmax(model(x, torch.full((3,), 1)).logits, 1).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], expected, rtol=0, atol=1e-4)


def test_int8_export_on_real_slices(model_path: Path, site_a_path: Path, tmp_path: Path) -> None:
    """Static int8 export calibrated on real site-A slices: a quantised graph that keeps the card, runs in
    `Predictor`, and stays close to the PyTorch model on slices it was not calibrated on."""
    import onnx

    from crosssite.inference.export import OnnxBackend, export_int8

    calibration = [site_a_path / "COVID", site_a_path / "non-COVID"]
    done = export_int8(model_path, tmp_path / "int8.onnx", calibration, site="A", max_slices=32)
    assert done.calibration_slices == 32 and done.errors == []

    graph = onnx.load(str(done.path)).graph
    ops = [node.op_type for node in graph.node]
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    convs = ops.count("Conv")
    assert convs > 10 and len(int8_weights) == convs  # every convolution's weights are stored as int8
    assert ops.count("QuantizeLinear") > convs // 2  # activations are quantised too
    weights = [np.frombuffer(t.raw_data, np.int8) for t in int8_weights]
    assert max(int(np.abs(w).max()) for w in weights) <= 64  # 7-bit range (reduce_range) on every CPU

    card = OnnxBackend(done.path).card
    assert card["norm"] == "A" and card["quantization"]["calibration_slices"] == 32
    files = sorted((site_a_path / "COVID").glob("*.png"))[1:9]  # site A, between the evenly spread calibration picks
    torch_p = slice_p(Predictor.from_file(model_path, site="A").predict(files))
    records = Predictor.from_file(done.path).predict(files)
    assert {r.norm for r in records} == {"A"}
    diff = np.abs(slice_p(records) - torch_p)
    assert torch_p.std() > 0.02 and diff.mean() < 0.03 and diff.max() < 0.1, (torch_p, diff)
    assert 0 < done.mean_abs_p_diff < 0.03 and done.max_abs_p_diff < 0.1  # measured on the calibration slices


def test_int8_export_needs_enough_readable_slices(model_path: Path, real: tuple, tmp_path: Path) -> None:
    from crosssite.inference.export import MIN_CALIBRATION_SLICES, export_int8

    folder = tmp_path / "calib"
    folder.mkdir()
    for f in real[2]:
        shutil.copy(f, folder / f.name)
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InferenceError, match=f"at least {MIN_CALIBRATION_SLICES} readable slices.*gave 8 "
                                              r"\(1 unreadable; first: .*broken.png"):
        export_int8(model_path, tmp_path / "x.onnx", [folder], site="A")
    assert not (tmp_path / "x.onnx").exists()


def test_missing_onnx_packages_give_an_install_hint(model_path: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from crosssite.inference.export import export_int8

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    for call in (lambda: export_onnx(model_path, tmp_path / "m.onnx"),
                 lambda: export_int8(model_path, tmp_path / "m.onnx", [tmp_path]),
                 lambda: Predictor.from_file(tmp_path / "m.onnx")):
        with pytest.raises(InferenceError, match=r"need onnxruntime: pip install 'crosssite\[onnx\]'"):
            call()
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_rejects_site_choice_and_bad_files(tmp_path: Path, model_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(CheckpointError, match="bad.onnx"):
        Predictor.from_file(bad)
    with pytest.raises(InferenceError, match="unknown site 'C'.*A, B"):
        export_onnx(model_path, tmp_path / "x.onnx", site="C")


# ---------------------------------------------------------------------------------------------- AdaBN


@contextlib.contextmanager
def one_thread():
    """A tiny network trains faster on one thread than on several contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_tiny(sites: list, seed: int, steps: int, size: int, pre: Preprocess | None = None) -> torch.nn.Module:
    """A short plain training loop with site-specific BN on synthetic sites (batches of 12 per site); inputs
    made by ``pre`` (default: `Preprocess(size)`, the fallback normalisation).

    It trains in float64 and returns the float32 model: in float32, Adam turns the rounding noise of gradients
    that are zero in exact arithmetic (a bias before batch norm) into full-size steps, so the trained model, and
    every quality figure a test asserts on it, depended on the CPU kind's kernels; float64's noise (about 1e-16)
    stays far below Adam's epsilon (1e-8), and the model is the same on every CPU kind."""
    pre = pre or Preprocess(size)
    data = []
    for site in sites:
        x = torch.stack([pre(read_image(s.path)) for s in site.samples]).double()
        data.append((x, torch.as_tensor(site.labels)))
    torch.manual_seed(seed)
    model = create_model("covidnet_redesign", num_sites=len(sites), width=0.0625, norm="site").double()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        picks = [torch.randint(len(x), (12,), generator=g) for x, _ in data]
        x = torch.cat([x[i] for (x, _), i in zip(data, picks)])
        y = torch.cat([y[i] for (_, y), i in zip(data, picks)])
        site = torch.arange(len(sites)).repeat_interleave(12)
        loss = torch.nn.functional.cross_entropy(model(x, site).logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.float().eval()


def shifted_copy(site, folder: Path, contrast: float, offset: float) -> list[int]:
    """Write the site's slices through another scanner calibration, ``clip(contrast * x + offset)``, as a
    new hospital's PNG export; return their labels."""
    folder.mkdir(parents=True)
    for k, s in enumerate(site.samples):
        grey = np.asarray(Image.open(s.path), dtype=np.float64) / 255.0
        pixels = np.round(np.clip(contrast * grey + offset, 0.0, 1.0) * 255.0).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{k:03d}.png")
    return [s.label for s in site.samples]


@pytest.mark.slow
def test_adabn_raises_auc_on_a_shifted_site(tmp_path: Path) -> None:
    """A model trained briefly on two synthetic sites meets a third whose images are rendered with twice the
    contrast (and clipped). Its features are then off-scale for the known sites' statistics, and AdaBN
    re-estimates them from the new site's own images. The offset keeps the intensity the input
    normalisation maps to zero (0.63) in place, so the shift is one per-channel renormalisation can undo up
    to clipping and zero padding stays neutral. Margins (AdaBN AUC - mean-of-sites AUC) measured with
    training seeds 0-5 (float64 training, so the same on every CPU kind): +0.15 (the seed used), +0.48, +0.12,
    +0.09, +0.10, +0.08. The synthetic scanner
    ``shift`` alone (blur, noise, resolution) gave no gain on this tiny model (-0.05 to 0)."""
    size = 32
    with one_thread():
        sources = [synthetic_site(n, SyntheticParams(shift=s, n=96, size=size)) for n, s in (("a", 0.0), ("b", 0.5))]
        model = train_tiny(sources, seed=0, steps=40, size=size)
    path = tmp_path / "trained"
    save(model, path, {"site_names": ["a", "b"], "preprocessing": {"image_size": size}})
    target = synthetic_site("c", SyntheticParams(shift=0.25, n=32, seed=1, size=size))
    labels = shifted_copy(target, tmp_path / "c", contrast=2.0, offset=-0.63)

    mean = Predictor.from_file(path).predict([tmp_path / "c"])
    adapted_predictor = Predictor.from_file(path, adapt=True)
    adapted = adapted_predictor.predict([tmp_path / "c"])
    auc_mean, auc_adapted = roc_auc_score(labels, slice_p(mean)), roc_auc_score(labels, slice_p(adapted))
    assert {r.norm for r in adapted} == {"adabn:64"}
    assert auc_adapted > auc_mean + 0.05, (auc_mean, auc_adapted)

    # the adapted model saved as a model file with a third site gives the same probabilities
    adapted_predictor.save_adapted(tmp_path / "adapted", name="c")
    reloaded = Predictor.from_file(tmp_path / "adapted", site="c")
    assert reloaded.site_names == ["a", "b", "c"]
    np.testing.assert_allclose(slice_p(reloaded.predict([tmp_path / "c"])), slice_p(adapted), atol=1e-6)


# ------------------------------------------------------------------------------------------ bad input


def test_folder_with_corrupt_file(model_path: Path, real: tuple, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    for f in real[2][:2]:
        shutil.copy(f, folder / f.name)
    shutil.copy(real[2][5], folder / "sub" / real[2][5].name)
    (folder / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"ignored")

    (tmp_path / "nothing").mkdir()

    records = Predictor.from_file(model_path).predict([folder, tmp_path / "missing.png", tmp_path / "nothing"])
    by_kind = {k: [r for r in records if r.kind == k] for k in ("slice", "error", "skipped")}
    assert len(by_kind["slice"]) == 3 and len(records) == 7
    errors = {Path(r.path).name: r.error for r in by_kind["error"]}
    assert set(errors) == {"broken.png", "missing.png", "nothing"} and all(errors.values())
    assert errors["missing.png"] == "file does not exist" and "no supported image files" in errors["nothing"]
    assert [Path(r.path).name for r in by_kind["skipped"]] == ["notes.txt"]
    direct = slice_p(Predictor.from_file(model_path).predict(str(folder / real[2][0].name)))  # one path
    assert slice_p(by_kind["slice"])[0] == pytest.approx(direct[0], abs=1e-6)


def test_any_size_and_mode(model_path: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (5, 300, 4), dtype=np.uint8), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (40, 30), dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(rng.integers(0, 256, (700, 90), dtype=np.uint8)).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).save(tmp_path / "tiny.jpg")
    records = Predictor.from_file(model_path).predict([tmp_path])
    assert [r.kind for r in records] == ["slice"] * 4
    assert all(0.0 <= r.p_covid <= 1.0 for r in records)


def test_request_errors(model_path: Path, real: tuple, tmp_path: Path) -> None:
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    with pytest.raises(InferenceError, match="no image files found"):
        Predictor.from_file(model_path).predict([tmp_path / "empty"])
    with pytest.raises(InferenceError, match=f"at least {MIN_ADAPT_IMAGES} images.*got 3"):
        Predictor.from_file(model_path, adapt=True).predict(real[2][:3])
    with pytest.raises(InferenceError, match="unknown site 'Z'; the model knows: A, B"):
        Predictor.from_file(model_path, site="Z")
    with pytest.raises(InferenceError, match="not both"):
        Predictor.from_file(model_path, site="A", adapt=True)


def test_corrupt_or_foreign_model_file(model_path: Path, tmp_path: Path) -> None:
    weights = tmp_path / "m.safetensors"
    weights.write_bytes(model_path.with_suffix(".safetensors").read_bytes()[:300])
    shutil.copy(model_path.with_suffix(".json"), tmp_path / "m.json")
    with pytest.raises(CheckpointError, match="m.safetensors"):
        Predictor.from_file(tmp_path / "m")
    card = (tmp_path / "m.json").read_text().replace('"format_version": 1', '"format_version": 99')
    (tmp_path / "m.json").write_text(card)
    with pytest.raises(CheckpointError, match="format_version"):
        Predictor.from_file(tmp_path / "m")


def test_shared_norm_model_reports_shared(tmp_path: Path, real: tuple) -> None:
    path = save_tiny_model(tmp_path / "shared", [], norm="batch")
    records = Predictor.from_file(path, site="A").predict(real[2][:2])
    assert {r.norm for r in records} == {"shared"}
