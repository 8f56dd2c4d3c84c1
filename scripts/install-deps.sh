#!/usr/bin/env bash
# Install the Debian packages infmoe needs (compiler, Open MPI, oneDNN, parallel
# HDF5, libyaml, zlib, the fortunes text of the demo corpus, and matplotlib and
# h5py for the plotting tools). Installs only what is missing, so it is cheap to
# run again. Needs root or sudo.
set -euo pipefail

PACKAGES=(
    build-essential pkg-config
    openmpi-bin libopenmpi-dev
    libdnnl-dev
    libhdf5-openmpi-dev hdf5-tools
    libyaml-dev zlib1g-dev
    fortunes fortunes-min
    python3-matplotlib python3-h5py
    slurm-wlm munge
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: all ${#PACKAGES[@]} packages are installed"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    SUDO=(sudo)
fi
echo "install-deps: installing ${missing[*]}"
"${SUDO[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${missing[@]}"
