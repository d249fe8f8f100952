"""Start-up imports only what a command uses: ``crosssite --help`` loads no torch at all, and ``crosssite predict``
on one slice loads neither the training stack (scikit-learn; SciPy too unless the model's frame is a canonical
view, which segments the slice with it), nor the service (FastAPI, uvicorn), nor
federated learning (Flower), nor plotting (matplotlib), nor torch's compiler (dynamo, inductor), nor ONNX Runtime.
Checked on ``sys.modules`` in a fresh interpreter; how long start-up takes is measured in docs/RELIABILITY.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from crosssite.data.transforms import CANONICAL_FRAMES
from crosssite.pretrained import shipped_model

NEVER = ("sklearn", "scipy", "matplotlib", "fastapi", "starlette", "uvicorn", "flwr", "torch._dynamo",
         "torch._inductor", "onnxruntime", "onnx")

def loaded_after(code: str, cwd: Path) -> list[str]:
    """The modules of ``NEVER`` and the top-level packages torch, pydicom, nibabel, scikit-learn, SciPy (with their
    submodules) loaded once ``code`` ran in a fresh interpreter."""
    roots = sorted({m.split(".")[0] for m in NEVER} | {"torch", "pydicom", "nibabel"})
    report = (f"import json, sys\nroots, never = {roots!r}, {list(NEVER)!r}\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in roots or m in never)))")
    done = subprocess.run([sys.executable, "-c", f"{code}\n{report}"], capture_output=True, text=True, cwd=cwd,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_imports_no_torch_and_no_extras(tmp_path: Path) -> None:
    loaded = loaded_after("import crosssite.cli\nfrom crosssite.cli import app", tmp_path)
    assert [m for m in loaded if m.split(".")[0] in ("torch", "sklearn", "scipy", "pydicom", "nibabel")] == []
    assert [m for m in loaded if m in NEVER] == []


def test_predict_on_one_slice_imports_only_what_it_uses(tmp_path: Path, site_a_path: Path) -> None:
    slice_png = site_a_path / "COVID" / "Covid (1).png"
    code = ("import sys\nfrom crosssite.cli import app\n"
            f"try:\n    app(['predict', {str(slice_png)!r}])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n")
    loaded = loaded_after(code, tmp_path)
    assert "torch" in loaded  # it did predict
    # a model on a canonical frame segments the slice (SciPy's ndimage, scikit-image): then SciPy is in use
    frame = json.loads(shipped_model().with_suffix(".json").read_text())["preprocessing"]["frame"]
    used = ("scipy",) if frame in CANONICAL_FRAMES else ()
    assert all(m in loaded for m in used)
    assert [m for m in loaded if m in NEVER and m not in used] == []
