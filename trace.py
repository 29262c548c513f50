"""python trace.py model=smollm2-135m prompt="The capital of France is" subject=France
python trace.py model=smollm2-135m data=worldfacts n_records=50   (averaged by token role)"""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="trace", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from metaedit.cli import run_or_exit
    from metaedit.tracing import run_trace

    run_or_exit(run_trace, cfg)


if __name__ == "__main__":
    main()
