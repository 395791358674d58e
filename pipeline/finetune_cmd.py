"""`python -m pipeline finetune`: flags mirror FinetuneConfig's fields; prints what fine-tuning bought and cost."""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal

from pipeline.finetune import FinetuneConfig, finetune
from pipeline.predict_cmd import add_trust_pickle


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = FinetuneConfig(model="")
    p.add_argument("--model", required=True, help="stage-two model directory, e.g. results/<run>/best")
    p.add_argument("--data", default=d.data, help="image folder (default: the images the features came from)")
    p.add_argument("--out", default=d.out, help="output directory (default: <model>/finetune)")
    p.add_argument("--unfreeze", default=d.unfreeze,
                   help="phase 2 trains the top N blocks (a number) or every layer from this name on (default: %(default)s)")
    p.add_argument("--head-epochs", type=int, default=d.head_epochs, help="phase 1 epochs, base frozen (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="phase 2 epochs at most (default: %(default)s)")
    p.add_argument("--head-lr", type=float, default=d.head_lr, help="phase 1 Adam learning rate (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="phase 2 Adam learning rate, cosine-decayed to 0 (default: %(default)s)")
    p.add_argument("--patience", type=int, default=d.patience, help="early-stopping patience in epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--image-size", type=int, default=d.image_size, help="default: the size the features were extracted at")
    p.add_argument("--augment-policy", default=d.augment_policy,
                   help="augmentation policy of training views (default: %(default)s)")
    p.add_argument("--monitor-fraction", type=float, default=d.monitor_fraction,
                   help="share of train held out for early stopping (default: %(default)s)")
    p.add_argument("--precision", default=d.precision, help="auto (mixed on GPU) | float32 | mixed")
    p.add_argument("--workers", type=int, default=d.workers, help="decoder threads (0: one per core)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--overwrite", action="store_true", help="train again even if the output model exists")
    add_trust_pickle(p)


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # pre-emption stops as cleanly as Ctrl-C; the last epoch's backup is kept


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)})
    out = finetune(cfg)
    rec = json.loads((out / "model.json").read_text())
    m, phases = rec["metrics"], rec["phases"]
    print(f"fine-tuned {rec['head']} on {rec['n_fit']} images: accuracy {m['start_accuracy']:.4f} -> "
          f"{m['accuracy']:.4f} ({rec['scheme']}, {rec['n_eval']} images); stage two reported "
          f"{rec['stage_two']['metrics']['accuracy']:.4f}")
    print("  " + "; ".join(f"phase {k}: {v['epochs']} epoch(s), {v['seconds']:.0f} s" for k, v in phases.items()))
    print(f"model:   {out / 'model.keras'}")
    print(f"next:    make predict MODEL={out} DATA=<image folder>")
    return 0
