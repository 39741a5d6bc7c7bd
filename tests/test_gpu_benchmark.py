"""benchmarks/gpu.py: its CPU smoke run (every part's code path), the wheel folder check, the
metadata it writes for a checkout, the cv2 stand-in, and the published section against its figures."""

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_environment

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_runs_every_part_and_leaves_benchmarks_md_alone(tmp_path):
    env = dict(cli_environment(), VQ3D_BENCHMARKS_MD=str(tmp_path / "BENCHMARKS.md"), VQ3D_GPU_BOOTSTRAPPED="1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--output-dir", str(tmp_path / "out")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((tmp_path / "out" / "gpu.json").read_text())
    for part in ("paper", "tiny", "stage2", "stage2_tiny", "cuda_tests"):
        assert part in figures and "error" not in figures[part], (part, figures.get(part))
    paper = figures["paper"]
    for key in ("amp", "fp32", "amp_gan", "fp32_gan"):
        assert paper[key]["images_per_s"] > 0 and "error" not in paper[key]
    assert [r["images_per_step"] for r in paper["batch_search"]] == [3, 6]  # the smoke's doubling
    assert figures["tiny"]["steps"] == 6 and len(figures["tiny"]["curve"]) >= 2
    assert figures["stage2"]["sample"]["images_per_s"] > 0
    assert figures["cuda_tests"]["returncode"] == 0  # on a CPU every cuda test skips
    assert set(figures["cuda_tests"]["tests"].values()) == {"SKIPPED"}
    assert (tmp_path / "out" / "vq3d-tiny-gpu.tar").stat().st_size < 16 * 2**20
    section = (tmp_path / "out" / "gpu_section.md").read_text()
    assert "### `vq3d` (paper preset" in section and "### Stage 2" in section
    assert not (tmp_path / "BENCHMARKS.md").exists()  # a smoke run publishes nothing


def test_check_wheels_finds_missing_extra_and_oversized_folders(gpu, tmp_path):
    pins = gpu.wheel_list()
    assert pins["nerfstudio"] == "1.1.5" and pins["gsplat"] == "1.4.0"
    for name, version in pins.items():
        (tmp_path / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"x")
    assert gpu.check_wheels(tmp_path) == []
    (tmp_path / "tyro-0.9.0-py3-none-any.whl").write_bytes(b"x")  # an older version left behind
    (tmp_path / f"gsplat-{pins['gsplat']}-py3-none-any.whl").unlink()
    problems = gpu.check_wheels(tmp_path)
    assert any("tyro-0.9.0" in p and "delete it" in p for p in problems)
    assert any(p.startswith("gsplat==1.4.0: missing") for p in problems)
    (tmp_path / "tyro-0.9.0-py3-none-any.whl").unlink()
    (tmp_path / f"gsplat-{pins['gsplat']}-py3-none-any.whl").write_bytes(b"x")
    with open(tmp_path / f"nerfstudio-{pins['nerfstudio']}-py3-none-any.whl", "wb") as f:
        f.truncate(65 * 2**20)  # sparse: 65 MiB on paper
    assert gpu.check_wheels(tmp_path) == [f"{tmp_path}: 65.0 MiB of wheels, over the 64 MiB budget"]


def test_checkout_metadata_carries_the_pyproject_entry_points(gpu, tmp_path):
    project = gpu.checkout_project()
    info = gpu.write_checkout_metadata(project, tmp_path)
    dist = importlib.metadata.Distribution.at(info)
    assert dist.metadata["Name"] == "vq3d_nerfstudio" and dist.version == project["version"]
    points = {(e.group, e.name): e.value for e in dist.entry_points}
    assert points[("nerfstudio.method_configs", "vq3d-tiny")] == "vq3d_nerfstudio.ns.method_configs:vq3d_tiny"
    assert points[("nerfstudio.dataparser_configs", "vq3d-images")] == project["entry-points"]["nerfstudio.dataparser_configs"]["vq3d-images"]
    assert points[("console_scripts", "vq3d")] == "vq3d_nerfstudio.scripts.cli:entrypoint"
    # as nerfstudio discovers methods: the group's entry points load the registered specification
    assert dist.entry_points.select(group="nerfstudio.method_configs")["vq3d-tiny"].load().config.method_name == "vq3d-tiny"


def test_cv2_stand_in_has_opencvs_constants_and_refuses_anything_else(gpu, tmp_path):
    cv2 = pytest.importorskip("cv2", reason="the reference is OpenCV itself")
    path = tmp_path / "standin.py"
    path.write_text(gpu.CV2_STANDIN)
    spec = importlib.util.spec_from_file_location("standin", path)
    standin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standin)
    for name in ("INTER_NEAREST", "INTER_LINEAR", "INTER_AREA", "BORDER_CONSTANT", "IMREAD_ANYDEPTH", "CV_32FC1"):
        assert getattr(standin, name) == getattr(cv2, name), name
    with pytest.raises(ImportError, match="cv2.imencode: OpenCV is not installed"):
        standin.imencode(".jpg", None)


def test_published_section_is_the_committed_figures(gpu):
    """BENCHMARKS.md's GPU section is what --publish makes of benchmarks/gpu_h200.json."""
    figures = json.loads((REPO / "benchmarks" / "gpu_h200.json").read_text())
    text = (REPO / "BENCHMARKS.md").read_text()
    published = text.split("<!-- gpu -->\n", 1)[1].split("<!-- /gpu -->", 1)[0]
    assert published == gpu.section(figures)
