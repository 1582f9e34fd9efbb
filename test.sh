#!/usr/bin/env bash
# The whole test set-up on a brand-new machine, then the suite (the README's second command; CI runs it):
# 1. the Debian packages of the local Slurm cluster the cluster tests start (slurm-wlm, slurmdbd, munge,
#    MariaDB), installed only when missing - as root here, through sudo on a workstation;
# 2. a virtual environment (.venv) with the project and its test extras;
# 3. the linters (ruff check, ruff format --check, mypy: configured in pyproject.toml), then
# 4. pytest, with any arguments given to this script (default: the whole suite, quietly).
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1

PACKAGES="slurm-wlm slurmdbd munge mariadb-server"
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null \
        || ! command -v munged >/dev/null; then
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
        echo "test.sh: the cluster tests need the Debian packages $PACKAGES; run as root or install sudo" >&2
        exit 1
    fi
    echo "test.sh: installing $PACKAGES (the tests' local Slurm cluster)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $PACKAGES >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
