"""VQ3D stage 1 as a nerfstudio Model: image -> tokens -> tri-plane NeRF -> rendered rays.

One forward pass turns an image into a NeRF (no per-scene optimisation): a ViT encoder, a
factorized vector quantizer, and a ViT decoder that writes a tri-plane; nerfstudio's samplers and
renderers draw it (coarse samples, then PDF samples from the coarse weights, one shared field).
Rays with ``metadata["batch_idx"]`` use the tri-plane of that input image; rays without it (viewer,
``ns-render``, ``ns-export``) use the model's current scene, picked by ``cam_idx`` of the camera
(a training image), by :meth:`set_scene_images`, or by :attr:`default_scene` (the pipeline's
choice: ``default_scene_index`` of the eval images, or ``VQ3D_SCENE``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Dict, List, Literal, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.scene_box import OrientedBox
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.models.base_model import Model, ModelConfig
from nerfstudio.utils import colormaps
from torch.nn import Parameter

from vq3d_nerfstudio.checks import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ranged,
    renamed,
    under_current_names,
)
from vq3d_nerfstudio.geometry.poses import CanonicalCamera
from vq3d_nerfstudio.stage1 import losses
from vq3d_nerfstudio.stage1.adversarial import AdversarialConfig, legacy_adversarial_config
from vq3d_nerfstudio.stage1.baked import COLOUR_MIN_WEIGHT, BakedField, bake_resolution
from vq3d_nerfstudio.stage1.decoder import TriplaneDecoder
from vq3d_nerfstudio.stage1.edits import ComposedField
from vq3d_nerfstudio.stage1.encoder import ViTEncoder
from vq3d_nerfstudio.stage1.field import PointField, TriplaneField
from vq3d_nerfstudio.stage1.perceptual import LPIPS, LPIPSUnavailable
from vq3d_nerfstudio.stage1.quantizer import AnnotatedQuantizerUnion, VQConfig, code_perplexity, legacy_quantizer_config
from vq3d_nerfstudio.stage1.renderer import NerfRenderer
from vq3d_nerfstudio.stage1.scene import ShownScene
from vq3d_nerfstudio.stage1.triplane import PlaneLayout

#: Fields renamed since runs were first saved: old name -> new name (read by :func:`upgrade_model_fields`).
#: Removal: at version 0.2.0, when runs saved before commit 13128e1 (2026-12-02) no longer need to load.
RENAMED_FIELDS = {"num_coarse_samples": "coarse_samples_per_ray", "num_fine_samples": "fine_samples_per_ray"}


@dataclass
class Vq3dModelConfig(ModelConfig):
    """VQ3D stage 1 (Sargent et al., ICCV 2023). Sizes come from the preset table in
    ``ns/method_configs.py``; paper-scale values follow ViT-VQGAN (256 px, 8 px patches), with FSQ's
    15,360 codes in place of its 8192 learned ones. Choices the paper leaves open are written beside each field."""

    _target: Type = field(default_factory=lambda: Vq3dModel)
    enable_collider: bool = False
    """Unused: the model makes its own near/far collider from near_plane/far_plane."""
    image_size: PositiveInt = 64
    """Input image size (square, pixels); must equal the dataparser's image size."""
    canonical_camera: CanonicalCamera = CanonicalCamera()
    """The camera every input image is seen by (the tri-plane fills its frustum; novel views orbit at its
    distance); must equal the data's (vq3d-images --canonical-camera.*). A package keeps it."""
    patch_size: PositiveInt = 8
    """ViT patch size (pixels); the token grid is image_size / patch_size on a side."""
    hidden_dim: PositiveInt = 128
    """Transformer width of encoder and decoder."""
    num_encoder_layers: PositiveInt = 2
    """Transformer blocks in the encoder."""
    num_decoder_layers: PositiveInt = 2
    """Transformer blocks in the decoder."""
    num_heads: PositiveInt = 4
    """Attention heads."""
    quantizer: AnnotatedQuantizerUnion = field(default_factory=VQConfig)
    """How tokens become codes; on the command line a subcommand with its own options
    (``--pipeline.model.quantizer.*``). ``vq-quantizer``: ViT-VQGAN's factorized, l2-normalised
    codebook (the paper's choice); ``fsq-quantizer``: finite scalar quantization (Mentzer et al. 2023),
    a fixed grid of levels per channel with no codebook to learn or collapse, optionally G codes per
    token (``groups``). Both give code indices to stage 2, the token cache and edits.
    ``no-quantizer`` (beyond the paper): continuous tokens, for single-image 3D only; stage 2, token
    caches and code-space edits refuse such a run."""
    triplane_resolution: PositiveInt = 32
    """Tri-plane texels covering the canonical image, on a side; a multiple of the token grid. In
    the frustum layout the planes have ``triplane_margin`` more texels on each side."""
    triplane_channels: PositiveInt = 16
    """Feature channels per plane."""
    triplane_layout: Literal["frustum", "world"] = "frustum"
    """Where world points sample the planes (``triplane.PlaneLayout``). 'frustum': coordinates of
    the canonical camera's frustum (normalised image u, v and a contracted depth), so token (i, j)'s
    tile is exactly where image patch (i, j) lies at every depth, and >= 80% of the xy texels are
    seen by the input view. 'world': L-inf contraction of world xyz by
    scene_scale (kept for ablations); it left 65% of the xy plane unseen and patch (i, j) in other tokens' tiles."""
    triplane_margin: NonNegativeInt = 3
    """Frustum layout: texels beyond the canonical image edge on each side; the space only novel
    views see (the GAN's +-30 degree yaw) is contracted into them."""
    triplane_margin_source: Literal["replicate", "decoded"] = "replicate"
    """Frustum layout: what fills the margin. 'replicate': copies of the edge texels (then the 3x3
    refinement); 'decoded': the decoder writes it from rings of learned query tokens around the
    token grid (LRM-style; the margin must be a multiple of triplane_resolution / token grid, and
    only novel-view losses - multi-view supervision, the GAN - teach it anything)."""
    frustum_depth_halfwidth: PositiveFloat = 1.0
    """Frustum layout: half-width (world units of z-depth) of the slab around the pivot that the
    planes' depth axis resolves linearly (the synthetic objects and most of a photo's subject lie
    within 1 unit of the pivot); nearer space gets the rest of the near side, farther space is
    contracted (mip-NeRF 360) so the background at infinity fits."""
    frustum_depth_inner: ranged(float, 0, 1, low_open=True, high_open=True) = 0.5
    """Frustum layout: share of the depth axis ([-1, 1]) the pivot slab takes (0.5 as mip-NeRF 360)."""
    num_depth_frequencies: NonNegativeInt = 4
    """The density MLP also sees the plane coordinates and this many sin/cos frequencies of the
    depth coordinate (0: tri-plane features only). A canonical ray reads one xy
    texel at every depth; the depth input lets that texel place its surface along the ray."""
    decoder_upsampler: Literal["linear", "conv"] = "linear"
    """How the decoder turns tokens into plane texels: 'linear', one linear head per token tile
    (pixel shuffle); 'conv', nearest-upsampling + 3x3 convolutions (LRM / TripoSR style)."""
    field_hidden_dim: PositiveInt = 64
    """Width of the density and colour MLPs."""
    scene_scale: PositiveFloat = 1.5
    """World layout only: half-width (world units) of the cube kept linear by the scene
    contraction; beyond it space is contracted (mip-NeRF 360) so the unbounded background fits."""
    near_plane: PositiveFloat = 0.3
    """Where rays start (world units from the camera)."""
    far_plane: PositiveFloat = 1000.0
    """Where rays end; far enough to stand for infinity after contraction."""
    sampler_linear_until: PositiveFloat = 3.0
    """Coarse samples are uniform up to this distance, linear in disparity beyond."""
    coarse_samples_per_ray: PositiveInt = 32
    """Coarse samples per ray."""
    fine_samples_per_ray: PositiveInt = 32
    """PDF samples per ray drawn from the coarse weights (added to the coarse ones)."""
    rgb_loss_mult: NonNegativeFloat = 1.0
    """Weight of the MSE photometric loss on the fine render."""
    coarse_rgb_loss_mult: NonNegativeFloat = 0.1
    """Weight of the MSE photometric loss on the coarse render."""
    vq_loss_mult: NonNegativeFloat = 1.0
    """Weight of the codebook + commitment loss."""
    depth_loss_mult: NonNegativeFloat = 0.1
    """Weight of the depth loss (coarse and fine weights), applied when the data has depth."""
    depth_loss_type: Literal["pointwise", "accumulated"] = "pointwise"
    """'pointwise': VQ3D's loss on per-sample rendering weights; 'accumulated': the ablation,
    a loss on the rendered (expected) disparity only."""
    default_scene_index: NonNegativeInt = 0
    """Eval image shown when nothing else chose one (viewer, ns-render without --camera-idx); the
    VQ3D_SCENE environment variable overrides it for any command: 'eval:N', 'train:N' or a photo's path."""
    use_normals_output: renamed(bool, "--pipeline.model.output-normals") = True
    """Outside training, also output 'normals' in [0, 1] (density gradient at the expected depth;
    for ns-export's point clouds and meshes, and a viewer output)."""
    inference_field: Literal["baked", "exact"] = "baked"
    """What renders the shown scene outside training (the viewer, ns-render, render-orbit,
    reconstruct, interpolate, compose, point clouds): 'baked', the scene's field sampled once into a
    grid over plane coordinates (``stage1/baked.py``; the density logit and RGB, trilinear) and
    looked up at the same samples, colour only where a sample is seen; 'exact', the tri-plane field
    itself. Training, rays with batch_idx and ``vq3d eval`` always use the exact field. Measured on
    the shipped vq3d-tiny-synth, a 256x256 frame on 2 CPU cores (BENCHMARKS.md, render-throughput):
    0.31-0.36 s (the viewer's frame, the shown output only, 0.28-0.32 s) instead of 2.2-3.0 s (3.3-3.6 s
    before the exact path stopped evaluating coarse samples twice), plus 0.46-0.58 s once per scene to
    bake (three runs, this machine drifting); 47.8-48.9 dB PSNR and a 0.08% median depth error against the exact render (45-51
    dB over the four example scenes, canonical and 20 degree views)."""
    bake_nodes_per_texel: PositiveInt = 1
    """Baked inference field: grid nodes per plane texel interval along U and V (the texels are
    nodes; the depth axis gets at least as many, and 16 per period of the highest depth frequency).
    1 gives 139 x 70 x 70 nodes for vq3d-tiny (45-51 dB against the exact render at 256 px); 2 gives
    50-57 dB for a bake five times as long (2.1 s instead of 0.45 s)."""

    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    """3D-aware adversarial training (``--pipeline.model.adversarial.*``): a discriminator judges
    renders from the canonical camera and from novel cameras orbiting the pivot, where no ground
    truth exists (its loss weight 0, the default: no discriminator)."""
    perceptual_loss_mult: NonNegativeFloat = 0.0
    """Weight of LPIPS (VGG) between the canonical render and the input image, at the adversarial
    renders' size (``adversarial.resolution``, of ``adversarial.images_per_batch`` images)."""
    perceptual_weights: Optional[Path] = None
    """torchvision's ImageNet VGG16 state dict for LPIPS (default: the torch hub cache,
    ~/.cache/torch/hub/checkpoints/vgg16-397923af.pth, downloaded there when missing and online)."""
    perceptual_if_missing: Literal["error", "skip"] = "error"
    """Without the VGG weights: 'error' stops with one line saying where to put them; 'skip' trains
    without the perceptual loss and warns once."""

    def __setstate__(self, state: dict) -> None:
        """A run's ``config.yml`` written before a field was renamed loads with its values under the
        new names (``num_coarse_samples`` clashed with nerfstudio's own tests, which take any config
        with that field for vanilla-nerf's), and one written before the quantizer had its own config loads
        it nested (:func:`legacy_quantizer_config`). Removal: at version 0.2.0, when runs saved before
        commit 426d7d4 (2026-12-05) no longer need to load; then nerfstudio's default unpickling does.
        So do one written before the adversarial options had their own config and booleans were
        named ``use_*`` (:func:`upgrade_model_fields`)."""
        self.__dict__.update(upgrade_model_fields(state))


def upgrade_model_fields(state: Dict) -> Dict:
    """A model config's fields as saved by an older version (a ``config.yml``'s state, a package's
    ``config.json`` model object) under this version's names: renamed fields (:data:`RENAMED_FIELDS`,
    the :func:`~vq3d_nerfstudio.checks.renamed` options), the quantizer options nested
    (:func:`legacy_quantizer_config`), the adversarial ones nested (:func:`legacy_adversarial_config`).
    Fields saved under this version's names pass through. Removal: with those."""
    state = under_current_names(Vq3dModelConfig, state, RENAMED_FIELDS)
    if isinstance(state.get("quantizer"), str):  # saved before the quantizer had its own config
        state["quantizer"] = legacy_quantizer_config(state)
    if "adversarial" not in state:  # saved before the adversarial options had their own config
        state["adversarial"] = legacy_adversarial_config(state)
    return state


def _discriminator_under_adversarial(module, state_dict: Dict, prefix: str, *_) -> None:
    """A checkpoint saved when the discriminator was the model's own submodule (``discriminator.*``)
    loads into :attr:`Vq3dModel.adversarial` (``adversarial.discriminator.*``). Removal: with the
    old flags, at version 0.2.0."""
    old = prefix + "discriminator."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "adversarial." + key[len(prefix):]] = state_dict.pop(key)


class Vq3dModel(Model):
    """See the module docstring."""

    config: Vq3dModelConfig

    def populate_modules(self):
        cfg = self.config
        self.encoder = ViTEncoder(cfg.image_size, cfg.patch_size, cfg.hidden_dim, cfg.num_encoder_layers, cfg.num_heads)
        self.grid_size = self.encoder.grid_size
        self.quantizer = cfg.quantizer.setup(cfg.hidden_dim)
        self.layout = PlaneLayout(
            kind=cfg.triplane_layout,
            camera=cfg.canonical_camera,
            inner_resolution=cfg.triplane_resolution,
            margin=cfg.triplane_margin if cfg.triplane_layout == "frustum" else 0,
            depth_halfwidth=cfg.frustum_depth_halfwidth,
            depth_inner=cfg.frustum_depth_inner,
            scene_scale=cfg.scene_scale,
        )
        self.decoder = TriplaneDecoder(
            self.grid_size,
            cfg.hidden_dim,
            cfg.num_decoder_layers,
            cfg.num_heads,
            cfg.triplane_channels,
            cfg.triplane_resolution,
            margin=self.layout.margin,
            upsampler=cfg.decoder_upsampler,
            margin_source=cfg.triplane_margin_source if cfg.triplane_layout == "frustum" else "replicate",
        )
        self.field = TriplaneField(
            cfg.triplane_channels, cfg.field_hidden_dim, self.layout, num_depth_frequencies=cfg.num_depth_frequencies
        )
        self.renderer = NerfRenderer(
            cfg.near_plane, cfg.far_plane, cfg.coarse_samples_per_ray, cfg.fine_samples_per_ray, cfg.sampler_linear_until
        )
        self.adversarial = cfg.adversarial.setup(camera=cfg.canonical_camera)
        """The adversarial component: the discriminator (None when off), its renders, param group and losses."""
        self.register_load_state_dict_pre_hook(_discriminator_under_adversarial)
        self.step = 0
        self._perceptual: List[torch.nn.Module] = []  # a list: frozen weights stay out of checkpoints
        # Scene shown for rays without batch_idx. Not state to save: a plain attribute, not a buffer.
        self.scene = ShownScene()
        """What rays without batch_idx render. Not state to save: a plain attribute, not a buffer."""
        self._last_cam_idx: Optional[int] = None
        self.idle_render = False
        """While True, cameras get a blank frame at the far plane without rendering (the viewer sets
        it while the browser draws the scene's splats)."""
        self.shown_outputs: Optional[Callable[[], Collection[str]]] = None
        """Set by the viewer: the names of the outputs it shows now. Outside training a render then
        skips the costly outputs not named ('normals', the baked path's 'rgb_coarse'; they come back
        black, so the viewer still lists them): normals alone took 28 of 369 ms of a 256 px baked frame
        under the profiler (BENCHMARKS.md, render throughput). None (ns-render, ns-export, the
        commands): every output."""
        self.image_loader: Optional[Callable[[str, int], torch.Tensor]] = None
        """Set by the pipeline: ``(split, index) -> [S, S, 3]`` image, for cam_idx / default scenes."""
        self.default_scene: Tuple[str, int] = ("eval", cfg.default_scene_index)
        """``(split, index)`` shown before anything else chose a scene, read by ``image_loader``
        (the pipeline sets it from ``VQ3D_SCENE``)."""

    @property
    def canonical_camera(self) -> CanonicalCamera:
        """The camera every input image is seen by (``config.canonical_camera``)."""
        return self.config.canonical_camera

    @property
    def camera_distance(self) -> float:
        """The canonical camera's distance from the pivot (world units)."""
        return self.config.canonical_camera.distance

    @property
    def fov_deg(self) -> float:
        """The canonical camera's horizontal field of view (degrees)."""
        return self.config.canonical_camera.fov_deg

    # ---- stage-1 interface (stage 2 uses only these) -------------------------------------------
    def encode(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """``[B, 3, S, S]`` in [0, 1] -> (quantized tokens ``[B, T, D]``, indices ``[B, T]``, VQ losses)."""
        return self.quantizer(self.encoder(images))

    @property
    def index_shape(self) -> Tuple[int, ...]:
        """One image's code grid: ``(h, w)``, or ``(h, w, G)`` with G > 1 codes per token."""
        groups = self.config.quantizer.groups
        return (self.grid_size, self.grid_size) + ((groups,) if groups > 1 else ())

    @torch.no_grad()
    def encode_to_indices(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` images in [0, 1] -> ``[B, h, w]`` code indices (raster order; ``[B, h, w, G]``
        with G codes per token)."""
        if not self.quantizer.has_codes:
            self.quantizer.snap(images)  # raises NoCodesError, the one-line reason
        _, indices = self.quantizer.quantize(self.encoder(images))
        return indices.reshape(-1, *self.index_shape)

    def decode_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]`` (``[B, h, w, G]``) code indices -> ``[B, 3, C, R, R]`` tri-planes."""
        grid = indices.shape[0], self.grid_size * self.grid_size
        tokens = self.quantizer.get_output_from_indices(indices.reshape(*grid, *self.index_shape[2:]))
        return self.decoder(tokens)

    # ---- scene selection for rays without batch_idx --------------------------------------------
    @torch.no_grad()
    def set_scene_images(self, image: torch.Tensor, key: Optional[Tuple[str, int]] = None) -> None:
        """Show this image's NeRF. ``image``: ``[S, S, 3]`` or ``[1, 3, S, S]`` in [0, 1]."""
        if image.dim() == 3:
            image = image.permute(2, 0, 1)[None]
        self.scene = ShownScene(image=image.to(self.device, torch.float32), key=key)

    @torch.no_grad()
    def set_scene_indices(self, indices: torch.Tensor, key: Optional[Tuple[str, int]] = None) -> None:
        """Show the NeRF decoded from a code grid (a stage-2 sample). ``indices``: ``[h, w]`` or ``[1, h, w]``
        (``[h, w, G]`` with G codes per token)."""
        indices = indices.reshape(1, *self.index_shape).to(self.device, torch.long)
        size = self.config.quantizer.codebook_size
        if int(indices.max()) >= size or int(indices.min()) < 0:
            raise ValueError(f"code indices must lie in [0, {size})")
        self.scene = ShownScene(indices=indices, key=key)

    @torch.no_grad()
    def set_scene_planes(self, planes: torch.Tensor, key: Optional[Tuple[str, int]] = None, composition=None) -> None:
        """Show given tri-planes ``[1, 3, C, R, R]`` (an interpolation, an edit), optionally with an
        object placed in them (:class:`vq3d_nerfstudio.stage1.edits.Placement`). They are not re-derived
        when the weights change: for inference."""
        self.scene = ShownScene(planes=planes.to(self.device), composition=composition, key=key)

    def show_image(self, split: str, index: int) -> None:
        """Show image ``index`` of ``split`` ('train' or 'eval'), loading it unless already shown."""
        if self.scene.key == (split, index) and self.scene.image is not None:
            return
        if self.image_loader is None:
            raise RuntimeError("no image loader: the pipeline sets one; or call set_scene_images(image)")
        self.set_scene_images(self.image_loader(split, index), key=(split, index))

    def _show_default_scene(self) -> None:
        """The scene shown before anything else chose one: :attr:`default_scene`."""
        self.show_image(*self.default_scene)

    @torch.no_grad()
    def current_planes(self) -> torch.Tensor:
        """Tri-planes of the shown image, encoded with the current weights (cached until they change)."""
        if self.scene.is_empty:
            self._show_default_scene()
        scene = self.scene
        if scene.planes is None:
            start = time.perf_counter()
            if scene.indices is not None:
                scene.planes = self.decode_from_indices(scene.indices)
            else:
                quantized, _ = self.quantizer.quantize(self.encoder(scene.image))
                scene.planes = self.decoder(quantized)
            scene.encode_seconds = time.perf_counter() - start
        return scene.planes

    # ---- rendering -----------------------------------------------------------------------------
    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        autoencoder = [*self.encoder.parameters(), *self.quantizer.parameters(), *self.decoder.parameters()]
        groups = {"autoencoder": autoencoder, "field": list(self.field.parameters())}
        self.adversarial.get_param_groups(groups)
        return groups

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        def set_step(step: int) -> None:
            self.step = step

        return [TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], set_step)]

    # ---- adversarial and perceptual training ---------------------------------------------------
    def prepare_training(self) -> None:
        """Load what only training needs (LPIPS weights). Without them: ``LPIPSUnavailable`` whose
        message says where to put them and how to train without (``perceptual_if_missing``)."""

        if self.config.perceptual_loss_mult > 0 and not self._perceptual:
            try:
                self._perceptual.append(LPIPS("vgg", self.config.perceptual_weights, download=True).to(self.device))
            except LPIPSUnavailable as err:
                if self.config.perceptual_if_missing == "error":
                    raise LPIPSUnavailable(
                        f"{err}; or train without it: --pipeline.model.perceptual-loss-mult 0 "
                        "(or --pipeline.model.perceptual-if-missing skip)"
                    ) from None
                from nerfstudio.utils.rich_utils import CONSOLE

                CONSOLE.print(f"[yellow]warning: training without the perceptual loss: {err}")
                self.config.perceptual_loss_mult = 0.0

    def whole_view_renders(self, planes: torch.Tensor, batch: Dict, with_novel: bool) -> Dict[str, torch.Tensor]:
        """:meth:`Adversarial.renders <vq3d_nerfstudio.stage1.adversarial.Adversarial.renders>` of
        ``planes`` (the batch's NeRFs): canonical views for LPIPS and the discriminator, and
        ``with_novel`` novel ones for the discriminator, with the matching real images."""
        render = lambda rays, image_index: self.render_rays(rays, planes, image_index, keep_samples=False)  # noqa: E731
        return self.adversarial.renders(render, planes.shape[0], batch, with_novel, self.device)

    def forward(self, ray_bundle: RayBundle, batch: Optional[Dict] = None) -> Dict[str, torch.Tensor]:
        """Render rays. With ``batch["input_images"]`` the images are encoded here (inside the
        DDP-wrapped call, so all trainable work is synchronised) and rays pick their image by
        ``metadata["batch_idx"]``; the VQ losses and code statistics join the outputs."""
        extra: Dict[str, torch.Tensor] = {}
        if batch is not None and "input_images" in batch:
            if self.training:
                self.scene.planes = None  # weights are about to change: re-encode the shown scene later
            quantized, indices, vq = self.encode(batch["input_images"])
            planes = self.decoder(quantized)
            batch_idx = ray_bundle.metadata["batch_idx"][:, 0].long()
            extra = {"vq_codebook": vq["codebook"], "vq_commitment": vq["commitment"], "batch_idx": batch_idx}
            if indices is not None:  # no-quantizer has no codes
                extra["code_indices"] = indices
            # Extra renders only when a loss uses them this step: the discriminator's (canonical and
            # novel views) once it has started, LPIPS's (canonical view) whenever it is on.
            with_novel = self.training and self.adversarial.active(self.step)
            if with_novel or (self.training and self.config.perceptual_loss_mult > 0):
                extra.update(self.whole_view_renders(planes, batch, with_novel))
        else:
            return self.get_outputs(ray_bundle)
        outputs = self.render_rays(ray_bundle, planes, batch_idx, keep_samples=bool(extra))
        outputs.update(extra)
        return outputs

    def get_outputs(self, ray_bundle: RayBundle) -> Dict[str, torch.Tensor]:
        """Render rays of the shown scene (with an object placed in it, when one is) with
        :meth:`shown_field`."""
        planes = self.current_planes()
        batch_idx = torch.zeros(len(ray_bundle), dtype=torch.long, device=planes.device)
        field = self.shown_field(planes)
        colour_min_weight = COLOUR_MIN_WEIGHT if self.renders_baked else None
        return self.render_rays(ray_bundle, planes, batch_idx, keep_samples=False, field=field, colour_min_weight=colour_min_weight)

    def shown_field(self, planes: torch.Tensor) -> PointField:
        """The field rays without batch_idx render (``planes``: the shown scene's, from
        :meth:`current_planes`). In training, with ``inference_field='exact'`` or a field that is not
        a tri-plane field, the field itself; otherwise the scene baked
        (:class:`~vq3d_nerfstudio.stage1.baked.BakedField`), once per scene: the bake is cached on
        the scene and redone whenever its planes are new (re-encoded after a training step). With an
        object placed, the composite of the scene's field and the object's (baked the same way)."""
        scene = self.scene
        baked = self.renders_baked
        field = self._baked(scene.baked, planes) if baked else self.field
        if baked:
            scene.baked = field
        if scene.composition is None:
            return field
        object_field = self.field
        if baked:
            object_field = scene.baked_object = self._baked(scene.baked_object, scene.composition.planes)
        return ComposedField(field, scene.composition, object_field)

    @contextlib.contextmanager
    def exact_field(self):
        """Within this block rays without batch_idx render the exact field (``ns-eval`` and the
        trainer's eval images score the model, not its baked preview)."""
        saved = self.config.inference_field
        self.config.inference_field = "exact"
        try:
            yield
        finally:
            self.config.inference_field = saved

    @property
    def renders_baked(self) -> bool:
        """Whether rays without batch_idx render baked fields now (:meth:`shown_field`)."""
        return not self.training and self.config.inference_field == "baked" and isinstance(self.field, TriplaneField)

    def _baked(self, cached: Optional[BakedField], planes: torch.Tensor) -> BakedField:
        """``cached`` if it was baked from ``planes`` (the same tensor), else a new bake of them."""
        if cached is not None and cached.source_planes is planes:
            return cached
        nodes = bake_resolution(self.layout, self.config.num_depth_frequencies, self.config.bake_nodes_per_texel)
        baked = BakedField.bake(self.field, planes.to(self.device), nodes)
        baked.source_planes = planes
        return baked

    @property
    def renderer_rgb(self):
        """The renderer's RGB compositor, under the name nerfstudio's ``Model.get_rgba_image`` (the
        exporters) reads."""
        return self.renderer.renderer_rgb

    def render_rays(
        self,
        ray_bundle: RayBundle,
        planes: torch.Tensor,
        batch_idx: torch.Tensor,
        keep_samples: bool,
        field: Optional[PointField] = None,
        colour_min_weight: Optional[float] = None,
    ) -> Dict[str, torch.Tensor]:
        """Render rays with this model's field (or ``field``, e.g. a scene with an object placed in
        it, or baked) through :class:`~vq3d_nerfstudio.stage1.renderer.NerfRenderer`; outside
        training with ``use_normals_output`` the outputs include normals (black unless :attr:`shown_outputs`
        names them)."""
        shown = None if self.training or self.shown_outputs is None else set(self.shown_outputs())
        normals = self.config.use_normals_output and not self.training
        outputs = self.renderer.render(
            ray_bundle, self.field if field is None else field, planes, batch_idx, keep_samples=keep_samples,
            normals=normals and (shown is None or "normals" in shown), colour_min_weight=colour_min_weight,
            coarse_colour=shown is None or "rgb_coarse" in shown,
        )
        if normals and "normals" not in outputs:
            outputs["normals"] = torch.zeros_like(outputs["rgb"])
        return outputs

    @torch.no_grad()
    def get_outputs_for_camera(self, camera: Cameras, obb_box: Optional[OrientedBox] = None) -> Dict[str, torch.Tensor]:
        """Render a camera's image of the current scene; a new ``cam_idx`` in the camera's metadata
        (the viewer's clicked training frustum, ``ns-render --camera-idx``) first selects that
        training image."""
        if self.idle_render:
            return self.blank_outputs(int(camera.height.reshape(-1)[0]), int(camera.width.reshape(-1)[0]))
        if camera.metadata and camera.metadata.get("cam_idx") is not None:
            cam_idx = camera.metadata["cam_idx"]
            cam_idx = int(cam_idx.reshape(-1)[0]) if torch.is_tensor(cam_idx) else int(cam_idx)
            # Only a change selects: the viewer sends its last clicked frustum with every frame, and
            # a scene chosen another way (GUI, set_scene_images) must stay until the next click.
            if cam_idx != self._last_cam_idx:
                self._last_cam_idx = cam_idx
                self.show_image("train", cam_idx)
            camera = Cameras(
                camera_to_worlds=camera.camera_to_worlds,
                fx=camera.fx,
                fy=camera.fy,
                cx=camera.cx,
                cy=camera.cy,
                width=camera.width,
                height=camera.height,
                distortion_params=camera.distortion_params,
                camera_type=camera.camera_type,
                times=camera.times,
            )
        return super().get_outputs_for_camera(camera, obb_box=obb_box)

    def ignore_camera_index(self, cam_idx: int) -> None:
        """Take ``cam_idx`` as already acted on: a camera sending it does not change the scene (the
        viewer sends its initial index 0 with every frame before anyone clicks a camera)."""
        self._last_cam_idx = cam_idx

    def blank_outputs(self, height: int, width: int) -> Dict[str, torch.Tensor]:
        """An ``[H, W, C]`` frame of every output a render has, black with everything at the far
        plane (see :attr:`idle_render`)."""
        channels = {"rgb": 3, "rgb_coarse": 3, "accumulation": 1, "depth": 1, "expected_depth": 1, "disparity": 1}
        if self.config.use_normals_output:
            channels["normals"] = 3
        outputs = {key: torch.zeros(height, width, c, device=self.device) for key, c in channels.items()}
        outputs["depth"] = outputs["expected_depth"] = torch.full((height, width, 1), self.config.far_plane, device=self.device)
        return outputs

    # ---- losses and metrics --------------------------------------------------------------------
    def _depth_target(self, outputs: Dict, batch: Dict) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Per-ray target disparity ``[R, 1]`` and mask ``[R, 1]`` (None: every ray), as the batch
        holds them: metric disparity, or relative pseudo-GT already mapped onto the canonical scene
        by the dataset, once per image (``vq3d_nerfstudio.data.dataset.RelativeDisparityConfig``)."""
        return batch["disparity"], batch.get("disparity_mask")

    def get_metrics_dict(self, outputs, batch) -> Dict[str, torch.Tensor]:
        gt = batch["image"].to(self.device)
        metrics = {"psnr": -10 * torch.log10(F.mse_loss(outputs["rgb"], gt).clamp_min(1e-10))}
        if "code_indices" in outputs:
            size = self.config.quantizer.codebook_size
            metrics["code_perplexity"] = code_perplexity(outputs["code_indices"], size)
            metrics["codes_used"] = torch.unique(outputs["code_indices"]).numel() / size
            restarted = getattr(self.quantizer, "last_restarted", None)
            if restarted is not None:
                metrics["codes_restarted"] = restarted.sum()  # churn: codes moved onto new latents this step
        return metrics

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, torch.Tensor]:
        cfg = self.config
        gt = batch["image"].to(self.device)
        loss_dict = {
            "rgb_loss": cfg.rgb_loss_mult * F.mse_loss(outputs["rgb"], gt),
            "rgb_loss_coarse": cfg.coarse_rgb_loss_mult * F.mse_loss(outputs["rgb_coarse"], gt),
        }
        if "vq_codebook" in outputs:
            loss_dict["vq_loss"] = cfg.vq_loss_mult * (outputs["vq_codebook"] + outputs["vq_commitment"])
        if "disparity" in batch and "weights_fine" in outputs and cfg.depth_loss_mult > 0:
            target, mask = self._depth_target(outputs, batch)
            loss_fn = losses.pointwise_depth_loss if cfg.depth_loss_type == "pointwise" else losses.accumulated_depth_loss
            depth_loss = loss_fn(outputs["weights_fine"], outputs["disp_fine"], target, mask) + loss_fn(
                outputs["weights_coarse"], outputs["disp_coarse"], target, mask
            )
            loss_dict["depth_loss"] = cfg.depth_loss_mult * depth_loss
        loss_dict.update(self.adversarial.get_loss_dict(self.step, outputs, loss_dict["rgb_loss"], self.decoder.refine.weight))
        if "gan_canonical_rgb" in outputs and cfg.perceptual_loss_mult > 0:
            if not self._perceptual:
                self.prepare_training()
            if self._perceptual:
                lpips = self._perceptual[0].to(outputs["gan_canonical_rgb"].device)
                distance = lpips(outputs["gan_canonical_rgb"], outputs["gan_real_rgb"]).mean()
                loss_dict["perceptual_loss"] = cfg.perceptual_loss_mult * distance
        return loss_dict

    def get_image_metrics_and_images(
        self, outputs: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, torch.Tensor]]:
        from pytorch_msssim import ssim

        gt = batch["image"].to(self.device)[..., :3]
        rgb = outputs["rgb"].clamp(0, 1)
        gt_chw, rgb_chw = gt.permute(2, 0, 1)[None], rgb.permute(2, 0, 1)[None]
        mse = F.mse_loss(rgb, gt).clamp_min(1e-10)
        metrics = {"psnr": float(-10 * torch.log10(mse)), "ssim": float(ssim(gt_chw, rgb_chw, data_range=1.0, size_average=True, win_size=7))}
        images = {
            "img": torch.cat([gt, rgb], dim=1),
            "disparity": colormaps.apply_colormap(outputs["disparity"] / outputs["disparity"].max().clamp_min(1e-6)),
            "accumulation": colormaps.apply_colormap(outputs["accumulation"]),
        }
        return metrics, images
