"""python train.py method=mend model=tiny-gpt2 data=synthetic [overrides...]"""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from metaedit.cli import run_or_exit
    from metaedit.training import train

    run_or_exit(train, cfg)


if __name__ == "__main__":
    main()
