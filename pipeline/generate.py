"""DVC stage `generate`: draw the embedded synthetic cohort into data/synthetic."""

from pathlib import Path

from smearnet.config import stage_params
from smearnet.errors import run_cli
from smearnet.io import remove_stale_siblings
from smearnet.data.synthetic import generate_cohort

OUT = Path("data/synthetic")


def main() -> None:
    params = stage_params("generate")
    synthetic = params.data.synthetic
    remove_stale_siblings(OUT)  # staging folders of a killed earlier run (generate_cohort names them alike)
    generate_cohort(OUT, scale=float(synthetic.scale), seed=int(params.seed),
                    workers=int(synthetic.workers), image_size=int(synthetic.image_size),
                    jpeg_quality=int(synthetic.jpeg_quality),
                    min_patients_per_group=int(synthetic.min_patients_per_group))


if __name__ == "__main__":
    run_cli(main)
