#!/usr/bin/env python
"""Export a trained EoMT to ONNX: ``export_onnx.py CONFIG CHECKPOINT OUT.onnx --size H W``.

CONFIG and CHECKPOINT are what ``tools/merge_lora.py`` and ``tools/test.py`` take: a complete
mmengine checkpoint, an adapter-only one (``LoRACheckpointHook``), a plain state dict, an adapter
folder (``eomt_mm.lora.save_adapter``) or an already merged checkpoint. Any LoRA is folded into
the base weights (``merge_lora``) before export; files are read weights-only. The graph runs
whole-image inference with masked attention off.

Input ``images``: ``[B, 3, H, W]`` RGB, uint8 (default) or float32 (``--input-dtype``), values
0..255; the config's ``data_preprocessor`` normalisation (mean, std, channel order) is inside
the graph. ``--size H W`` fixes the size (multiples of the patch size; anything else is an error
here, at export time); with ``--dynamic`` it is only the example size and the graph takes any
height and width that are multiples of the patch size (at least 2 patches per side). The batch
is dynamic either way.

Outputs by name (``--outputs``, default ``seg_scores``): ``seg_scores [B, K, H, W]`` per-pixel
class scores (argmax = labels), ``class_logits [B, Q, K+1]``, ``mask_logits [B, Q, H/4, W/4]``
(patch 16), and for each ``--scores`` name (msp maxlogit entropy energy rba eam)
``anomaly_<name> [B, H, W]`` float32, computed in the graph as ``AnomalyEoMT`` computes it in
whole mode.

After writing, the file is run in onnxruntime next to the PyTorch model on random images (and
for ``--dynamic`` at a second size) and the export fails when an output differs by more than
``--tolerance`` relative to its largest value (``--no-check`` skips this).

Sliding windows stay outside the graph. Export a fixed square size equal to the config's
``test_cfg.crop_size`` and wrap the session with ``eomt_mm.models.utils.geometry``::

    layout = window_layout(height, width, crop)             # reference window placement
    windows = crop_windows(images.float(), layout)          # [N * B, 3, crop, crop], 0..255
    scores = session.run(['seg_scores'], {'images': windows.numpy()})[0]
    seg_scores = stitch_windows(torch.from_numpy(scores), layout, images.shape[0])

``crop_windows`` resizes the short side to the crop bilinearly on the raw 0..255 pixels, which
commutes with the affine normalisation in the graph, so this equals the model's slide mode.
Anomaly maps of windows are stitched on a canvas the same way ``AnomalyEoMT`` does
(``canvas_spans`` / ``stitch_on_canvas``), from each window's ``mask_logits``/``class_logits``.

Examples::

    python tools/export_onnx.py configs/eomt_lora_demo.py work_dirs/demo/iter_600.pth \\
        demo.onnx --size 128 256 --scores msp rba
    python tools/export_onnx.py CONFIG CKPT eomt.onnx --size 640 640 --dynamic \\
        --outputs seg_scores class_logits mask_logits --input-dtype float32

Exit status 1 with a message when the inputs do not fit or the check fails.
"""
from __future__ import annotations

import argparse
import copy
import os.path as osp
import pickle
import sys
from typing import Any, Optional, Sequence, Tuple

_TOOLS = osp.dirname(osp.abspath(__file__))
_REPO_ROOT = osp.dirname(_TOOLS)
for _path in (_REPO_ROOT, _TOOLS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import set_random_seed  # noqa: E402
from mmengine.utils import import_modules_from_strings  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402

import eomt_mm  # noqa: E402,F401  (registers the components)
from eomt_mm.anomaly.scores import SCORE_NAMES  # noqa: E402
from eomt_mm.engine.safe_checkpoint import install_safe_checkpointing  # noqa: E402
from eomt_mm.export import (INPUT_DTYPES, MIN_OPSET, TENSOR_OUTPUTS, ExportableEoMT,  # noqa: E402
                            ExportError, InputNormalization, compare_with_onnxruntime,
                            export_onnx)
from eomt_mm.lora import merge_lora  # noqa: E402
from eomt_mm.lora.adapters import is_adapter_path, lora_layers  # noqa: E402
from eomt_mm.models.segmentors import EoMT  # noqa: E402
# Loading a checkpoint of any of the supported kinds into the model a config builds is
# tools/merge_lora.py's job; it is reused, not repeated.
from merge_lora import MergeError, load_into, without_lora  # noqa: E402

DEFAULT_TOLERANCE = 1e-4


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description='Export a (LoRA-merged) EoMT with its normalisation, class scores and '
        'anomaly maps to ONNX.')
    parser.add_argument('config', help='config the checkpoint was trained with')
    parser.add_argument('checkpoint', help='mmengine checkpoint (complete or adapter-only), '
                        'state dict, merged checkpoint or adapter folder')
    parser.add_argument('out', help='output .onnx file')
    parser.add_argument('--size', type=int, nargs='+', required=True, metavar='PX',
                        help='input H W (or one value for a square), multiples of the patch '
                        'size; with --dynamic the example size')
    parser.add_argument('--dynamic', action='store_true',
                        help='any height / width that is a multiple of the patch size')
    parser.add_argument('--outputs', nargs='*', default=['seg_scores'], choices=TENSOR_OUTPUTS,
                        help='tensor outputs (default: seg_scores)')
    parser.add_argument('--scores', nargs='*', default=[], metavar='NAME',
                        help=f'anomaly maps anomaly_<NAME> ({" ".join(SCORE_NAMES)})')
    parser.add_argument('--input-dtype', default='uint8', choices=sorted(INPUT_DTYPES),
                        help='dtype of the images input (values 0..255 either way)')
    parser.add_argument('--opset', type=int, default=MIN_OPSET,
                        help=f'ONNX opset (default and minimum {MIN_OPSET})')
    parser.add_argument('--no-check', action='store_true',
                        help='skip the onnxruntime vs PyTorch comparison after export')
    parser.add_argument('--tolerance', type=float, default=DEFAULT_TOLERANCE,
                        help='largest allowed |onnx - torch| / max|torch| per output')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        metavar='KEY=VALUE', help='override config entries')
    return parser.parse_args(argv)


def _size(values: Sequence[int]) -> Tuple[int, int]:
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ExportError(f'--size takes H W or one side, got {list(values)}')


def load_merged_model(config: str, checkpoint: str,
                      cfg_options: Optional[dict] = None) -> Tuple[EoMT, InputNormalization, str]:
    """Build the config's model, load CHECKPOINT, fold any LoRA in.

    Args:
        config: Config file.
        checkpoint: Any checkpoint kind of the module docstring.
        cfg_options: ``--cfg-options`` overrides.

    Returns:
        ``(model in eval mode without LoRA layers, input normalisation, what was loaded)``.

    Raises:
        ExportError: Missing config, not an EoMT, or a checkpoint that fits neither the model
            with LoRA nor the model without it.
    """
    install_safe_checkpointing()
    if not osp.isfile(config):
        raise ExportError(f'config file {config!r} does not exist')
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    if cfg.get('custom_imports'):
        import_modules_from_strings(**cfg['custom_imports'])
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    if 'model' not in cfg:
        raise ExportError(f'config {config!r} has no `model`')
    plain_cfg = without_lora(cfg.model.to_dict())
    normalization = InputNormalization.from_config(plain_cfg.get('data_preprocessor'))
    seed = cfg.get('randomness', {}).get('seed')

    def build(model_cfg: Any) -> torch.nn.Module:
        # As the Runner (and merge_lora.py) do: a base that is a seeded random init is rebuilt
        # identically for an adapter trained on it.
        if seed is not None:
            set_random_seed(seed, deterministic=cfg.get('randomness', {}).get(
                'deterministic', False))
        return MODELS.build(copy.deepcopy(model_cfg))

    model = build(cfg.model)
    try:
        kind = load_into(model, checkpoint)
    except MergeError as err:
        # A LoRA config and a checkpoint that lacks keys: maybe already merged (merge_lora.py
        # output), which fits the model built without LoRA.
        if not lora_layers(model) or is_adapter_path(checkpoint) or 'missing keys' not in str(err):
            raise ExportError(str(err)) from None
        model = build(plain_cfg)
        try:
            kind = load_into(model, checkpoint) + ' (already merged)'
        except MergeError as plain_err:
            raise ExportError(f'{err}\nnor does it fit the model without LoRA:\n{plain_err}') \
                from None
    if not isinstance(model, EoMT):
        raise ExportError(f'the model of {config!r} is a {type(model).__name__}; only EoMT '
                          'segmentors are exported')
    if lora_layers(model):
        merge_lora(model)
        kind += ', LoRA merged'
    return model.eval(), normalization, kind


def second_size(size: Tuple[int, int], patch: int) -> Tuple[int, int]:
    """Another valid size for checking a dynamic export (taller, and narrower where possible)."""
    height, width = size
    return height + 2 * patch, width - patch if width >= 3 * patch else width + patch


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the tool (see the module docstring); returns the exit status."""
    args = parse_args(argv)
    try:
        if osp.abspath(args.out) == osp.abspath(args.checkpoint):
            raise ExportError('OUT must differ from CHECKPOINT (it would be overwritten)')
        size = _size(args.size)
        model, normalization, kind = load_merged_model(args.config, args.checkpoint,
                                                       args.cfg_options)
        module = ExportableEoMT(model, normalization, outputs=args.outputs, scores=args.scores)
        export_onnx(module, args.out, size, dynamic=args.dynamic, input_dtype=args.input_dtype,
                    opset=args.opset)
        print(f'export_onnx: {kind} -> {args.out} (inputs images [B, 3, '
              f'{"H" if args.dynamic else size[0]}, {"W" if args.dynamic else size[1]}] '
              f'{args.input_dtype} RGB 0..255; outputs {", ".join(module.output_names)})')
        if not args.no_check:
            sizes = [size] + ([second_size(size, module.patch_size)] if args.dynamic else [])
            diffs = compare_with_onnxruntime(module, args.out, sizes, args.input_dtype)
            worst = max((d, name, s) for s, per in diffs.items() for name, d in per.items())
            for (height, width), per in diffs.items():
                print(f'export_onnx: onnxruntime vs PyTorch at {height}x{width}: ' + ', '.join(
                    f'{name} {d:.1e}' for name, d in per.items()))
            if worst[0] > args.tolerance:
                raise ExportError(
                    f'{args.out}: output {worst[1]} at {worst[2][0]}x{worst[2][1]} differs from '
                    f'PyTorch by {worst[0]:.2e} of its largest value (> --tolerance '
                    f'{args.tolerance}); the file is kept for inspection')
    except (ExportError, FileNotFoundError, ValueError, TypeError, RuntimeError,
            pickle.UnpicklingError) as err:
        print(f'export_onnx: error: {err}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
