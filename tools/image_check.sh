# Runs inside the image (tools/image.sh check feeds it to bash): the whole digits pipeline with
# `dvc repro` (1 epoch), then one Kubeflow component through KFP's local runner, as the image's user.
set -euo pipefail
[ "$(id -u)" != 0 ] || { echo "error: the image runs as root" >&2; exit 1; }
[ ! -e /tmp/ca-bundle.pem ] || { echo "error: the build's CA bundle (extra_ca) landed in the image" >&2; exit 1; }
echo "check: user $(id -un), $(python --version), $(git --version), adalabelhash $(python -c 'import adalabelhash; print(adalabelhash.__version__)')"
if [ "$DEVICE" = gpu ]; then  # the two onnxruntime builds share one module name: exactly one may be installed
    pip show -q onnxruntime-gpu && ! pip show -q onnxruntime 2>/dev/null
else
    pip show -q onnxruntime && ! pip show -q onnxruntime-gpu 2>/dev/null
fi

# A DVC project from the code and params the image holds.
project=$(mktemp -d)/project
cp -r /opt/adalabelhash "$project"
cd "$project"
python - <<'PY'
import yaml
params = yaml.safe_load(open("params.yaml"))
params["train"]["epochs"] = 1
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
PY
export GIT_AUTHOR_NAME=check GIT_AUTHOR_EMAIL=check@localhost GIT_COMMITTER_NAME=check GIT_COMMITTER_EMAIL=check@localhost
git init -q && dvc init -q && git add -A && git commit -qm "image check"
adalabelhash get-data digits --out data/digits
dvc repro 2>&1 | tee repro.log
if grep -q "Failed to import Git" repro.log; then echo "error: MLflow cannot use git in the image" >&2; exit 1; fi
python - <<'PY'
import json
metrics = json.load(open("build/evaluate/metrics.json"))
assert metrics["queries"] == 200 and 0 < metrics["mAP"] <= 1, metrics
print(f"check: dvc repro done, mAP {metrics['mAP']:.4f} after 1 epoch")
PY

# One step through the Kubeflow component code path: KFP's executor runs the component's body
# in a subprocess of this Python, with the image's kfp (install_kfp_package=False).
python - <<'PY'
import os
import warnings
from pathlib import Path

from kfp import local

from adalabelhash.params import load_params
from components.kfp_components import prepare_dataset
from pipelines.pipeline import defaults

root = Path("kfp-local").resolve()
os.environ["TMPDIR"] = str(root / "tmp")
(root / "tmp").mkdir(parents=True)
local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
warnings.filterwarnings("ignore", "You may be attemping to run a task", RuntimeWarning)  # the image is Python
prepare = defaults(load_params("params.yaml"))["prepare"]  # the pipeline's own argument
task = prepare_dataset(prepare=prepare, data_root="", data_version="image-check")
dataset = task.outputs["dataset"]
assert dataset.metadata["images"] == 1797 and (Path(dataset.path) / "manifest.parquet").is_file(), dataset.metadata
print(f"check: kfp component prepare_dataset ran: {dataset.metadata['images']:.0f} images")
PY
