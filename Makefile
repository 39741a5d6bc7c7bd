# Set-up and the two everyday jobs. Each target creates or reuses the local virtual environment.
#   make demo   generate the built-in data, train vq3d-tiny on the CPU, render orbit videos
#   make test   install the test needs and run the suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build this project is tested with (pip on this machine finds it on local disk);
# override to use another, e.g. make TORCH="torch==2.5.1 torchvision==0.20.1" test
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# apt-get runs as root directly, otherwise through sudo
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

DEMO_DATA ?= data/synth
DEMO_SCENES ?= 1000
DEMO_RUN := outputs/demo/vq3d-tiny/demo
DEMO_OUT ?= demo_out
SHIPPED_RUN ?= $(DEMO_RUN)
SHIPPED := vq3d_nerfstudio/models/vq3d-tiny-synth
SHIPPED_DESCRIPTION := vq3d-tiny (64 px, 16x16 tokens of one FSQ code) trained for 1650 steps on 1000 procedural \
vq3d synth scenes (boxes, cylinders and spheres on a checkered ground under a sky): good for that synthetic family, \
not for real photos

export PATH := $(abspath $(BIN)):$(PATH)

# Wheels for a CUDA machine without network (README, "On a GPU"): benchmarks/gpu_wheels.txt says
# what each is for; benchmarks/gpu.py installs the ones such a machine lacks.
GPU_PYTHON ?= 3.12
WHEELS ?= .whl
MANYLINUX := $(foreach v,2_17 2_24 2_27 2_28 2_31 2_34 2_35,--platform manylinux_$(v)_x86_64) \
	--platform manylinux2014_x86_64 --platform manylinux1_x86_64

.PHONY: install demo readme-picture shipped-model test gpu-wheels clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel setuptools
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# ns-render checks for an ffmpeg on PATH: use the one bundled in the imageio-ffmpeg wheel.
	ln -sf "$$($(BIN)/python -c 'import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())')" $(BIN)/ffmpeg
	# ns-export imports open3d, which needs the system's libusb: install it when missing (Debian/Ubuntu).
	$(BIN)/python -c "import ctypes; ctypes.CDLL('libusb-1.0.so.0')" 2>/dev/null || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q libusb-1.0-0; }
	touch $(STAMP)

demo: install
	$(BIN)/vq3d synth $(DEMO_DATA) --num-scenes $(DEMO_SCENES) --resolution 64
	$(BIN)/ns-train vq3d-tiny --data $(DEMO_DATA) --output-dir outputs --experiment-name demo \
		--timestamp demo --vis tensorboard
	$(BIN)/vq3d render-orbit --load-config $(DEMO_RUN)/config.yml --output-dir $(DEMO_OUT)

# The README's pictures, all from the demo run (run `make demo` first): the strip at the top, the
# reconstruction sheet (held-out scenes of a seed training never saw, and a real photo),
# interpolation, composites and splats.
readme-picture: install
	$(BIN)/vq3d synth data/synth_eval --seed 1 --num-scenes 20 --resolution 64
	$(BIN)/python benchmarks/demo_strip.py --load-config $(DEMO_RUN)/config.yml --output docs/demo_strip.png
	$(BIN)/vq3d export-splats --load-config $(DEMO_RUN)/config.yml --image data/synth_eval/scene_00001/images/frame_00000.png \
		--output $(DEMO_OUT)/splats/scene1.ply --report-views 0 15 --comparison docs/splats.png
	$(BIN)/python -c "from skimage import data; from PIL import Image; Image.fromarray(data.astronaut()).save('data/astronaut.jpg')"
	$(BIN)/vq3d reconstruct --load-config $(DEMO_RUN)/config.yml --output-dir $(DEMO_OUT)/reconstruct \
		--image data/synth_eval/scene_00000/images/frame_00000.png data/synth_eval/scene_00001/images/frame_00000.png \
		data/synth_eval/scene_00002/images/frame_00000.png data/synth_eval/scene_00003/images/frame_00000.png \
		data/astronaut.jpg --contact-sheet docs/reconstruct.png
	$(BIN)/vq3d interpolate --load-config $(DEMO_RUN)/config.yml --images data/synth_eval/scene_00000/images/frame_00000.png \
		data/synth_eval/scene_00004/images/frame_00000.png --steps 24 --output-dir $(DEMO_OUT)/interpolate
	for s in 5 6; do $(BIN)/vq3d compose --load-config $(DEMO_RUN)/config.yml --scene data/synth_eval/scene_00001/images/frame_00000.png \
		--object data/synth_eval/scene_0000$$s/images/frame_00000.png --position 0.2 -0.15 0.5 --scale 0.6 \
		--object-box -0.6 -0.42 -0.6 0.6 0.6 0.6 --num-frames 24 --output-dir $(DEMO_OUT)/compose$$s || exit 1; done
	$(BIN)/python -c "import imageio.v2 as iio, numpy as np; \
		a = np.concatenate([iio.imread('$(DEMO_OUT)/compose%d/composite_views.png' % s) for s in (5, 6)], 0); \
		iio.imwrite('docs/composite.png', a.repeat(3, 0).repeat(3, 1)); \
		b = iio.imread('$(DEMO_OUT)/interpolate/interpolation_strip.png'); iio.imwrite('docs/interpolation.png', b.repeat(3, 0).repeat(3, 1))"

# The model that ships with the install (README, Quick start): the demo run (or SHIPPED_RUN=<run>),
# scored on 20 scenes of a seed it never saw, packaged with float16 weights (1.9 MiB; measured on
# those scenes: within 0.001 dB of float32).
shipped-model: install
	test -f $(SHIPPED_RUN)/config.yml || $(MAKE) demo
	$(BIN)/vq3d synth data/synth_eval --seed 1 --num-scenes 20 --resolution 64
	$(BIN)/vq3d eval --load-config $(SHIPPED_RUN)/config.yml --scenes data/synth_eval --output $(DEMO_OUT)/shipped_eval.json
	$(BIN)/vq3d package --load-config $(SHIPPED_RUN)/config.yml --eval-results $(DEMO_OUT)/shipped_eval.json --half \
		--output $(SHIPPED) --overwrite --description "$(SHIPPED_DESCRIPTION)"

test: install
	# the browser tests drive Debian's chromium through Playwright (no browser download)
	test -x /usr/bin/chromium || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }
	# lint first (nerfstudio's ruff settings, pyproject.toml): a lint error fails make test and CI
	$(BIN)/ruff check vq3d_nerfstudio tests benchmarks
	$(BIN)/python -m pytest -q

gpu-wheels:
	mkdir -p $(WHEELS)
	sed 's/#.*//' benchmarks/gpu_wheels.txt | xargs $(PYTHON) -m pip download --quiet --disable-pip-version-check \
		--no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp $(MANYLINUX) -d $(WHEELS)
	$(PYTHON) benchmarks/gpu.py --check-wheels $(WHEELS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) outputs/demo
