"""Helpers for the tests that run the tools on the demo config (not collected).

The demo config (configs/eomt_lora_demo.py: a 6-block 96-wide EoMT with LoRA)
is trained for a handful of iterations on a small demo data set rendered into
a temporary folder. Every run gets its own experiment and visualizer name:
mmengine hands out one instance per name within a process.
"""
import importlib.util
import sys
import uuid
from pathlib import Path
from typing import List

from eomt_mm.engine.checkpoint import load_checkpoint_weights_only

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / 'tools'
# The demo renderer is a package of tools/ (not of eomt_mm); appended, so nothing is shadowed.
if str(TOOLS) not in sys.path:
    sys.path.append(str(TOOLS))

from demo_data import generate_demo_dataset  # noqa: E402
DEMO_CONFIG = REPO / 'configs' / 'eomt_lora_demo.py'
# MaskAnnealingHook needs at least 6 iterations for its windows.
MAX_ITERS = 6
CKPT_INTERVAL = 3
NUM_TRAIN = 8
NUM_VAL = 2


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f'_eomt_demo_tool_{name}',
                                                  TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_demo_data(root: Path) -> Path:
    """Render a small demo data set (8 train, 2 val, no anomaly split)."""
    info = generate_demo_dataset(root, num_train=NUM_TRAIN, num_val=NUM_VAL,
                                 num_anomaly=0)
    return Path(info.root)


def data_options(data_root: Path) -> List[str]:
    """--cfg-options that point every dataloader at ``data_root``."""
    return [
        f'{loader}.dataset.data_root={data_root}'
        for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
    ]


def run_options(tag: str = '') -> List[str]:
    """--cfg-options for a short CPU run with unique mmengine instance names."""
    name = f'demo_{tag}_{uuid.uuid4().hex[:8]}'
    return [
        f'train_cfg.max_iters={MAX_ITERS}',
        f'param_scheduler.0.end={MAX_ITERS}',
        'param_scheduler.0.warmup_iters=[1,2]',
        'train_dataloader.batch_size=2',
        f'default_hooks.checkpoint.interval={CKPT_INTERVAL}',
        'default_hooks.checkpoint.max_keep_ckpts=-1',
        'default_hooks.logger.interval=1',
        # No validation while training: these tests evaluate with test.py.
        'train_cfg.val_interval=1000',
        'train_cfg.val_begin=1000',
        f'experiment_name={name}',
        f'visualizer.name={name}',
    ]


def train_args(work_dir: Path, data_root: Path, *extra_options: str,
               tag: str = '', flags=()) -> List[str]:
    """Arguments for tools/train.py main() on the demo config."""
    return [
        str(DEMO_CONFIG), '--work-dir',
        str(work_dir), *flags, '--cfg-options', *run_options(tag),
        *data_options(data_root), *extra_options
    ]


def state_dict_of(checkpoint: Path) -> dict:
    """The model weights of a checkpoint (weights-only load)."""
    return load_checkpoint_weights_only(str(checkpoint))['state_dict']


def snapshot(work_dir: Path) -> dict:
    """Bytes of every checkpoint file (and last_checkpoint) in ``work_dir``."""
    files = sorted(work_dir.glob('*.pth')) + sorted(
        work_dir.glob('last_checkpoint'))
    return {p.name: p.read_bytes() for p in files}
