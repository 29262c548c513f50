"""python bench.py [methods=[base,ft,ftl,mend,...]] [limit=200] [train_missing=true]"""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from metaedit.bench import run_bench
    from metaedit.cli import run_or_exit

    run_or_exit(run_bench, cfg)


if __name__ == "__main__":
    main()
