"""Shared fixtures: where the real data lives, and deterministic, thread-bounded torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("CROSSSITE_DATA", REPO.parent / "shared" / "data"))

# One thread: tiny models gain nothing from two, and a loaded 2-core machine slows badly under oversubscription.
torch.set_num_threads(1)

# Another CPU kind's arithmetic, to check that every assertion holds beyond this machine's kernels (the suite runs
# on AMD EPYC and Intel Xeon AMX machines, whose oneDNN and ATen kernels round differently):
#   CROSSSITE_TEST_MKLDNN=0 make test                             convolutions in ATen's kernels, not oneDNN's
#   ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 make test       AVX2 code paths in both libraries
#   CROSSSITE_TEST_THREADS=2 make test                             two threads: other reduction orders
if os.environ.get("CROSSSITE_TEST_MKLDNN") == "0":
    torch.backends.mkldnn.enabled = False
if os.environ.get("CROSSSITE_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["CROSSSITE_TEST_THREADS"]))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder holding the two real datasets (`sars_cov2_ct/`, `covid_ct/`)."""
    if not (DATA_ROOT / "sars_cov2_ct").is_dir():
        pytest.fail(f"real data not found at {DATA_ROOT}; set CROSSSITE_DATA")
    return DATA_ROOT


@pytest.fixture(scope="session")
def site_a_path(data_root: Path) -> Path:
    return data_root / "sars_cov2_ct"


@pytest.fixture(scope="session")
def site_b_path(data_root: Path) -> Path:
    return data_root / "covid_ct"


@pytest.fixture(scope="session")
def site_a(site_a_path: Path):
    """Site A (SARS-CoV-2 CT) loaded once for the whole test run."""
    from crosssite.data import load_site

    return load_site(f"A={site_a_path}")


@pytest.fixture(scope="session")
def site_b(site_b_path: Path):
    """Site B (COVID-CT, official split and patient ids) loaded once for the whole test run."""
    from crosssite.data import load_site

    return load_site(f"B={site_b_path}")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the decode cache and synthetic sites of the test run out of the user's home."""
    os.environ.setdefault("CROSSSITE_CACHE", str(tmp_path_factory.mktemp("crosssite-cache")))
