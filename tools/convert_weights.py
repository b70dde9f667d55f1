"""Convert DINOv2 / DINOv3 / EoMT weights into the eomt_mm checkpoint format.

Examples::

    # Meta DINOv2-B with registers, kernel resampled to 16 px, pos-embed for 640 px inputs
    python tools/convert_weights.py dinov2_vitb14_reg4_pretrain.pth dinov2_b_reg4_p16.pth \
        --format meta-dinov2 --patch-size 16 --img-size 640 --arch b
    # timm weights (model.safetensors of vit_large_patch14_reg4_dinov2.lvd142m)
    python tools/convert_weights.py model.safetensors dinov2_l_reg4_p16.pth --format timm \
        --patch-size 16 --img-size 1024
    # official EoMT Lightning checkpoint / Hugging Face EoMT
    python tools/convert_weights.py eomt_coco.bin eomt_mm_coco.pth --format eomt
    python tools/convert_weights.py model.safetensors eomt_mm_hf.pth --format hf-eomt
    # DINOv3: Meta's hub file / transformers DINOv3ViTModel / EomtDinov3ForUniversalSegmentation
    python tools/convert_weights.py dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth \
        dinov3_vitl16.pth --format meta-dinov3 --arch l
    python tools/convert_weights.py model.safetensors dinov3_vitl16.pth --format hf-dinov3
    python tools/convert_weights.py model.safetensors eomt_mm_hf.pth --format hf-eomt-dinov3
    # the reference's DINOv3 EoMT checkpoints are deltas: add them to their DINOv3 weights
    python tools/convert_weights.py pytorch_model.bin eomt_dinov3_ade.pth --format eomt-dinov3 \
        --base dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth

Backbone-only files load with ``init_cfg=dict(type='Pretrained', checkpoint=DST,
prefix='backbone.')`` on the ``DINOv2`` backbone; full EoMT files with ``load_from=DST``.
The conversion refuses (exit code 1, message listing the keys) a checkpoint that does not fit.
"""
import argparse
import sys
from typing import Optional, Sequence

from eomt_mm.converters import FORMATS, CheckpointConversionError, convert_file
from eomt_mm.engine.safe_checkpoint import install_safe_checkpointing


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='source checkpoint (.pth/.pt/.bin/.ckpt or .safetensors)')
    parser.add_argument('dst', help='output file (written atomically)')
    parser.add_argument('--format', required=True, choices=list(FORMATS),
                        help='source format: ' + '; '.join(
                            f'{name}: {source.description}' for name, source in FORMATS.items()))
    parser.add_argument('--patch-size', type=int, default=None,
                        help='resample the patch kernel to this size (e.g. 16); default: keep')
    parser.add_argument('--img-size', type=int, nargs='+', default=None,
                        help='resize pos_embed to img_size // patch_size (one value or H W); '
                             'default: keep the source grid')
    parser.add_argument('--arch', default=None,
                        help="require this arch (DINOv2: 's', 'b', 'l', 'g'; DINOv3: 's', "
                             "'s+', 'b', 'l', 'l+', 'h+', '7b'); records num_heads")
    parser.add_argument('--base', default=None,
                        help='--format eomt-dinov3 only: the DINOv3 weights (Meta .pth or '
                             'transformers model.safetensors) the delta checkpoint was trained '
                             'from')
    args = parser.parse_args(argv)
    if args.img_size is not None and len(args.img_size) not in (1, 2):
        parser.error('--img-size takes one value or two (H W)')
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    install_safe_checkpointing()  # as in every tool here: mmengine loads weights only
    args = parse_args(argv)
    img_size = None
    if args.img_size is not None:
        img_size = args.img_size[0] if len(args.img_size) == 1 else tuple(args.img_size)
    try:
        convert_file(args.src, args.dst, args.format, patch_size=args.patch_size,
                     img_size=img_size, arch=args.arch, base_path=args.base)
    except (CheckpointConversionError, FileNotFoundError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
