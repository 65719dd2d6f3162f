#!/usr/bin/env python
"""IAUNet training / evaluation script (detectron2 ``DefaultTrainer``; ``iaunet.engine.Trainer``).

python train_net.py --config-file configs/synthetic/iaunet_quick.yaml
python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
python train_net.py --config-file CFG --resume
python train_net.py --config-file CFG --num-gpus 8
python train_net.py --config-file CFG --num-gpus 2 MODEL.DEVICE cpu   # CPU workers (gloo)

Exit status: 0 done; 75 preempted (SIGTERM/SIGUSR1: checkpoint written, continue with --resume);
74 an output could not be written (disk full, read-only, no permission); 66 no loadable checkpoint
(iaunet.engine.stopping); 2 bad command line / config.
"""

import logging

# iaunet first: it imports detectron2 and fvcore with fvcore's import-time torch.jit.script
# FutureWarning silenced (iaunet/__init__.py); detectron2.engine first would print it.
import iaunet  # noqa: F401

# isort: split
import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser, launch
from detectron2.evaluation import verify_results

from iaunet.checkpoint import AtomicCheckpointer
from iaunet.config import exit_on_config_error, load_config
from iaunet.engine import Trainer, check_config, setup
from iaunet.engine.stopping import exit_on_run_error, install_signal_handlers, launcher
from iaunet.evaluation import visualize_predictions


def main(args):
    if not args.eval_only:  # first: a SIGTERM during setup stops training before its first step
        install_signal_handlers()
    with exit_on_run_error("train_net.py"):  # unloadable checkpoint, unwritable output: one line
        # Bad datasets (a folder's file at fault) end the command with one line too.
        cfg = exit_on_config_error(lambda: setup(args), "train_net.py")
        if args.eval_only:
            model = Trainer.build_model(cfg)
            AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
                cfg.MODEL.WEIGHTS, resume=args.resume
            )
            res = Trainer.test(cfg, model)
            # prediction | ground truth images in OUTPUT_DIR/vis, of what the evaluation scored
            visualize_predictions(cfg, Trainer.inference_model(cfg, model))
            if comm.is_main_process():
                verify_results(cfg, res)
            return res
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    logging.getLogger(__name__).info(f"Command line arguments: {args}")
    # Config errors end the command with one line, before any worker starts.
    exit_on_config_error(
        lambda: check_config(load_config(args.config_file, args.opts), not args.eval_only),
        "train_net.py",
    )
    # With several processes: forward SIGTERM/SIGUSR1 to the workers, exit with their status.
    with launcher(args.num_gpus * args.num_machines):
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
