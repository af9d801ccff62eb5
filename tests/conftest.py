import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HPCJOBS_NO_SQUEUE", "1") if "SLURM_JOB_ID" not in os.environ else None

import pytest  # noqa: E402

# submitit's import runs logging.config.dictConfig, which closes every logging handler that
# exists by then, absl's too (made when TensorFlow is imported) and with it the stream absl
# held: a pytest capture file of an earlier test, and the run dies ("lost sys.stderr").
# Imported first, before any test imports TensorFlow, it closes nothing of anyone's.
import submitit  # noqa: E402,F401

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


def need_horovod():
    try:
        import horovod.tensorflow  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("Horovod missing in CI: bash slurm/install-horovod.sh")
        pytest.skip("Horovod not built here: bash slurm/install-horovod.sh")
