import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HPCJOBS_NO_SQUEUE", "1") if "SLURM_JOB_ID" not in os.environ else None

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.fixture
def quickstart():
    return QUICKSTART


def need_fashion_mnist():
    if not os.path.isdir(FASHION):
        if os.environ.get("CI"):
            pytest.fail(f"{FASHION} missing in CI: apt-get install dataset-fashion-mnist")
        pytest.skip(f"{FASHION} missing: apt-get install dataset-fashion-mnist")
