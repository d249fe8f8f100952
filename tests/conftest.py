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
