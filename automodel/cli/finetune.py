"""``automodel finetune vlm -c CONFIG.yaml`` and ``automodel validate -c CONFIG.yaml``."""

from __future__ import annotations

import os

from automodel.cli.common import QUICKSTART, command, config_path, load, positive, quiet_libraries


def add_parsers(sub, parents) -> None:
    finetune = command(
        sub,
        "finetune",
        run_finetune,
        [parents.config, parents.nproc, parents.overrides],
        overrides=True,
        help="fine-tune a model from a YAML config",
        description="Fine-tune a vision-language model from a YAML config "
        f"(without -c: {QUICKSTART.name}).\nShort form: automodel CONFIG.yaml [overrides ...]",
        epilog="example:\n  automodel finetune vlm -c examples/vlm/quickstart.yaml "
        "--step_scheduler.max_steps 20",
    )
    finetune.add_argument("recipe", choices=["vlm"], help="the recipe: vlm")
    finetune.add_argument(
        "--print-config",
        action="store_true",
        help="print the full resolved config before the run (it is always saved as "
        "checkpoint_dir/config.yaml)",
    )
    command(
        sub,
        "validate",
        run_validate,
        [parents.config, parents.overrides],
        overrides=True,
        help="check a config without training",
        description="Resolve every _target_ and key of a config and print the resolved config; "
        "nothing loads.",
        epilog="example:\n  automodel validate -c examples/vlm/quickstart.yaml --optimizer.lr 1e-4",
    )


def run_finetune(ns, overrides: list[str]) -> int:
    nproc = positive("--nproc-per-node", ns.nproc_per_node)
    config = config_path(ns, QUICKSTART)
    cfg = load(config, overrides)
    from automodel.distributed.launch import launched_by_torchrun, relaunch

    relaunching = nproc > 1 and not launched_by_torchrun()
    if relaunching or ns.print_config:
        from automodel.config.loader import dump_yaml
        from automodel.recipes.vlm.config import resolve_config

        resolved, _ = resolve_config(cfg)  # a bad config stops here, once, not in every process
        if ns.print_config and int(os.environ.get("RANK", "0")) == 0:
            print(dump_yaml(resolved), end="", flush=True)
    if relaunching:
        return relaunch(nproc, ["finetune", "vlm", "-c", str(config), *overrides])
    quiet_libraries()
    from automodel.recipes.vlm.finetune import run

    run(cfg)
    return 0


def run_validate(ns, overrides: list[str]) -> int:
    config = config_path(ns)
    from automodel.config.loader import dump_yaml
    from automodel.recipes.vlm.config import resolve_config

    resolved, notices = resolve_config(load(config, overrides))
    print(dump_yaml(resolved), end="")
    for notice in notices:
        print(notice)
    print(f"{config}: ok")
    return 0
