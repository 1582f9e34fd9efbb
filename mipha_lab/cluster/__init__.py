"""Running experiments as cluster jobs: profiles (slurm/*.yaml), submitit jobs, submission."""
