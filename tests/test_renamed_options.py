"""Renamed options (issue 28): the adversarial options nested under ``--pipeline.model.adversarial.*``
and booleans named ``use_*``. Their old flags still set them (parsed as ``ns-train`` parses), with one
deprecation line each; a ``config.yml`` or a model package saved with the old names loads."""

import json
from pathlib import Path

import pytest
import yaml

from vq3d_nerfstudio.checks import renamed_option_notes
from vq3d_nerfstudio.stage1 import package as pkg
from vq3d_nerfstudio.stage1.adversarial import AdversarialConfig
from vq3d_nerfstudio.stage1.quantizer import VQConfig

M, A, D = "--pipeline.model.", "--pipeline.model.adversarial.", "--pipeline.datamanager."
RENAMED = [  # (old flag, new flag, a value other than vq3d-tiny's)
    (M + "adversarial-loss-mult", A + "loss-mult", "0.25"),
    (M + "discriminator", A + "discriminator", "patch"),
    (M + "discriminator-channels", A + "discriminator-channels", "16"),
    (M + "gan-loss", A + "objective", "hinge"),
    (M + "adversarial-start-step", A + "start-step", "7"),
    (M + "adversarial-ramp-steps", A + "ramp-steps", "3"),
    (M + "adaptive-adversarial-weight", A + "use-adaptive-weight", "True"),
    (M + "r1-gamma", A + "r1-gamma", "0.5"),
    (M + "r1-interval", A + "r1-interval", "2"),
    (M + "gan-resolution", A + "resolution", "16"),
    (M + "gan-images-per-batch", A + "images-per-batch", "3"),
    (M + "novel-view-max-yaw-deg", A + "novel-view-max-yaw-deg", "20"),
    (M + "novel-view-max-elevation-deg", A + "novel-view-max-elevation-deg", "10"),
    (M + "novel-view-radius-jitter", A + "novel-view-radius-jitter", "0.1"),
    (M + "discriminator-sees-disparity", A + "use-disparity", "True"),
    (M + "output-normals", M + "use-normals-output", "False"),
    (D + "multiview-supervision", D + "use-multiview-supervision", "True"),
    (M + "quantizer.kmeans-init", M + "quantizer.use-kmeans-init", "False"),  # after the vq-quantizer subcommand
]
QUANTIZER = M + "quantizer."


def ns_train(flags):
    """``ns-train vq3d-tiny <flags> [vq-quantizer <its flags>]`` parsed as ns-train parses it."""
    import tyro
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion

    main = [token for flag, value in flags if not flag.startswith(QUANTIZER) for token in (flag, value)]
    quantizer = [token for flag, value in flags if flag.startswith(QUANTIZER) for token in (flag, value)]
    return tyro.cli(AnnotatedBaseConfigUnion, args=["vq3d-tiny", *main, "vq-quantizer", *quantizer])


def test_old_flags_set_the_renamed_options_and_say_so_once():
    old = ns_train([(o, v) for o, _, v in RENAMED])
    new = ns_train([(n, v) for _, n, v in RENAMED])
    default = ns_train([])
    assert old.pipeline == new.pipeline
    assert old.pipeline.model.adversarial == AdversarialConfig(
        loss_mult=0.25, discriminator="patch", discriminator_channels=16, objective="hinge", start_step=7, ramp_steps=3,
        use_adaptive_weight=True, r1_gamma=0.5, r1_interval=2, resolution=16, images_per_batch=3,
        novel_view_max_yaw_deg=20.0, novel_view_max_elevation_deg=10.0, novel_view_radius_jitter=0.1, use_disparity=True,
    )
    assert (old.pipeline.model.use_normals_output, old.pipeline.datamanager.use_multiview_supervision) == (False, True)
    assert old.pipeline.model.quantizer.use_kmeans_init is False and default.pipeline.model.quantizer.use_kmeans_init is True
    argv = [token for o, _, v in RENAMED for token in (o, v)] + [RENAMED[0][0] + "=0.3"]  # one flag twice: one line
    notes = renamed_option_notes(old, argv)
    expected = {f"vq3d: {o} is deprecated, use {n} (the old names go at version 0.2.0)" for o, n, _ in RENAMED}
    assert len(notes) == len(RENAMED) and set(notes) == expected  # every renamed option is in the table
    assert renamed_option_notes(new, [token for _, n, v in RENAMED for token in (n, v)]) == []


def test_ns_train_prints_the_deprecation_line_before_the_run(tmp_path, monkeypatch, capsys):
    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    def save_config(*argv):
        config = build_trainer_config("vq3d-tiny")
        config.output_dir, config.experiment_name = tmp_path, "x"
        monkeypatch.setattr("sys.argv", ["ns-train", "vq3d-tiny", *argv])
        config.save_config()
        return capsys.readouterr().err.splitlines()

    assert save_config("--pipeline.model.gan-resolution", "16") == [
        "vq3d: --pipeline.model.gan-resolution is deprecated, use --pipeline.model.adversarial.resolution "
        "(the old names go at version 0.2.0)"
    ]
    assert save_config("--pipeline.model.adversarial.resolution", "16") == []


OLD_CONFIG_YML = """\
!!python/object:vq3d_nerfstudio.ns.pipeline.Vq3dPipelineConfig
datamanager: !!python/object:vq3d_nerfstudio.data.datamanager.Vq3dDataManagerConfig
  dataparser: !!python/object:vq3d_nerfstudio.data.dataparser.Vq3dImagesDataParserConfig
    camera_distance: 2.0
  multiview_supervision: true
  multiview_views: 3
model: !!python/object:vq3d_nerfstudio.stage1.model.Vq3dModelConfig
  adaptive_adversarial_weight: true
  adversarial_loss_mult: 0.1
  adversarial_ramp_steps: 5000
  adversarial_start_step: 20000
  discriminator: patch
  discriminator_sees_disparity: true
  gan_images_per_batch: 8
  gan_loss: hinge
  gan_resolution: 64
  hidden_dim: 48
  novel_view_max_yaw_deg: 25.0
  output_normals: false
  quantizer: !!python/object:vq3d_nerfstudio.stage1.quantizer.VQConfig
    _target: !!python/name:vq3d_nerfstudio.stage1.quantizer.FactorizedQuantizer ''
    kmeans_init: false
    size: 64
"""
"""A ``config.yml`` (the parts that changed) as ns-train wrote it before issue 28's renames."""


def test_a_config_yml_with_the_old_names_loads_under_the_new_ones():
    """nerfstudio loads ``config.yml`` with ``yaml.Loader``, as here; what the old file did not hold
    takes its default, and a new config goes through yaml unchanged."""
    pipeline = yaml.load(OLD_CONFIG_YML, Loader=yaml.Loader)
    model = pipeline.model
    assert model.adversarial == AdversarialConfig(
        loss_mult=0.1, discriminator="patch", objective="hinge", start_step=20_000, ramp_steps=5_000,
        use_adaptive_weight=True, resolution=64, images_per_batch=8, novel_view_max_yaw_deg=25.0, use_disparity=True,
    )
    assert model.use_normals_output is False and model.hidden_dim == 48
    assert model.quantizer == VQConfig(size=64, use_kmeans_init=False)
    assert pipeline.datamanager.use_multiview_supervision is True and pipeline.datamanager.multiview_views == 3
    assert not {"adversarial_loss_mult", "gan_loss", "output_normals"} & set(vars(model))
    assert "kmeans_init" not in vars(model.quantizer) and "multiview_supervision" not in vars(pipeline.datamanager)
    again = yaml.load(yaml.dump(pipeline), Loader=yaml.Loader)
    assert again.model.adversarial == model.adversarial and again.model.quantizer == model.quantizer
    assert again.datamanager.use_multiview_supervision is True


SHIPPED = Path(pkg.__file__).resolve().parents[1] / "models" / "vq3d-tiny-synth" / "config.json"


def test_a_package_with_the_old_names_loads_and_new_ones_store_the_new_layout():
    """The shipped package's config.json (flat adversarial options, ``output_normals``) loads with its
    values; a package written now stores them nested, and reads back the same."""
    fields = json.loads(SHIPPED.read_text())["model"]
    assert "adversarial" not in fields and "output_normals" in fields  # the old layout, unedited
    config = pkg.config_from_json(dict(fields), SHIPPED, pkg.camera_from_data(json.loads(SHIPPED.read_text())["data"]))
    assert config.adversarial == AdversarialConfig(
        loss_mult=fields["adversarial_loss_mult"], discriminator=fields["discriminator"], start_step=fields["adversarial_start_step"],
        ramp_steps=fields["adversarial_ramp_steps"], resolution=fields["gan_resolution"],
        images_per_batch=fields["gan_images_per_batch"], use_disparity=fields["discriminator_sees_disparity"],
    )
    assert config.use_normals_output is fields["output_normals"]
    written = pkg.config_to_json(config)
    assert written["adversarial"]["resolution"] == fields["gan_resolution"] and "gan_resolution" not in written
    assert "use_normals_output" in written and "output_normals" not in written
    back = pkg.config_from_json(json.loads(json.dumps(written)), SHIPPED, config.canonical_camera)
    assert back == config
    old_vq = dict(fields, quantizer={"type": "vq-quantizer", "size": 64, "code_dim": 8, "commitment_beta": 0.25,
                                     "kmeans_init": False, "dead_code_fraction": 0.03})
    assert pkg.config_from_json(old_vq, SHIPPED, config.canonical_camera).quantizer.use_kmeans_init is False


@pytest.mark.parametrize("edit", [lambda a: a.update(warp_drive=1), lambda a: a.pop("resolution")], ids=["unknown", "missing"])
def test_a_package_with_other_adversarial_fields_is_one_error(edit):
    from vq3d_nerfstudio.errors import PackageError

    fields = pkg.config_to_json(pkg.Vq3dModelConfig())
    edit(fields["adversarial"])
    with pytest.raises(PackageError, match="'model.adversarial' fields .* remake the package"):
        pkg.config_from_json(fields, SHIPPED, pkg.CanonicalCamera())
